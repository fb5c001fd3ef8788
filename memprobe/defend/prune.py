"""Prune MLP weights of a fine-tuned model: magnitude, or activation-aware (Wanda, Sun et al. 2024).

Why MLP weights: Gupta et al. 2025 study pruning as a memorization defense; MLP layers are where
fine-tuned facts are thought to live, and the family adapter names them (`neuron_in` projections
and the out-projection), so no module path appears here. Magnitude pruning zeroes the smallest
|W| of each matrix; Wanda zeroes, in each output row, the smallest |W_ij| * ||x_j|| with ||x_j||
the L2 norm of input feature j over calibration tokens (padding excluded). Each matrix ends with
exactly floor(sparsity * size) zeros among the chosen entries (ties broken by position). The model
is pruned in place; call it on a copy to keep the original.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from memprobe.capture import pad_batch
from memprobe.errors import MemprobeError

METHODS = ("magnitude", "wanda")
SPARSITIES = (0.1, 0.3, 0.5)


def mlp_matrices(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of every MLP weight matrix, from the family adapter."""
    from memprobe.adapters import adapter_for

    adapter = adapter_for(model)
    rels = (*(adapter.neuron_in or (adapter.mlp_in,)), adapter.mlp_out)
    return [(adapter.at(i, rel), model.get_submodule(adapter.at(i, rel)))
            for i in range(adapter.n_layers) for rel in rels]


def _as_out_in(module: nn.Module, conv1d: bool) -> torch.Tensor:
    """The weight as a (out, in) view (HF Conv1D stores (in, out)); in-place writes reach it."""
    return module.weight.data.T if conv1d else module.weight.data


@torch.no_grad()
def input_norms(model: nn.Module, calibration: Sequence[Sequence[int]], batch_size: int = 8) -> dict[str, torch.Tensor]:
    """L2 norm of each input feature of every MLP matrix over the calibration tokens."""
    sums: dict[str, torch.Tensor] = {}
    current_mask: list[torch.Tensor] = []
    handles = []

    def hook(path: str):  # noqa: ANN202
        def pre(_m: nn.Module, args: tuple) -> None:
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])  # (tokens, in); OPT is flat
            x = x[current_mask[0].reshape(-1).bool()]
            sums[path] = sums.get(path, 0) + (x**2).sum(0)

        return pre

    for path, module in mlp_matrices(model):
        handles.append(module.register_forward_pre_hook(hook(path)))
    device = next(model.parameters()).device
    try:
        for lo in range(0, len(calibration), batch_size):
            rows = [list(r) for r in calibration[lo : lo + batch_size]]
            ids, mask = pad_batch(rows, 0)
            current_mask[:] = [mask.to(device)]
            model(input_ids=ids.to(device), attention_mask=mask.to(device))
    finally:
        for h in handles:
            h.remove()
    return {k: v.sqrt().float() for k, v in sums.items()}


@torch.no_grad()
def prune_mlp(
    model: nn.Module, sparsity: float, *, method: str = "magnitude",
    calibration: Sequence[Sequence[int]] | None = None,
) -> dict[str, Any]:
    """Zero `sparsity` of every MLP matrix's weights (in place); returns what was pruned."""
    from memprobe.adapters import adapter_for

    if method not in METHODS:
        raise MemprobeError(f"pruning method {method!r}: choose one of {', '.join(METHODS)}")
    if not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise MemprobeError(f"sparsity={sparsity!r}: give a fraction in [0, 1) (the study uses {SPARSITIES})")
    if method == "wanda" and not calibration:
        raise MemprobeError("Wanda pruning needs calibration token ids (ordinary text the model was trained on)")
    conv1d = adapter_for(model).conv1d
    norms = input_norms(model, calibration) if method == "wanda" else {}
    zeros = total = 0
    for path, module in mlp_matrices(model):
        w = _as_out_in(module, conv1d)
        if method == "magnitude":  # one threshold per matrix: the layout does not matter
            k = int(sparsity * w.numel())
            if k:
                flat = module.weight.data.view(-1)
                flat[torch.topk(flat.abs(), k, largest=False).indices] = 0.0
        else:
            score = w.abs() * norms[path][None, :]
            k = int(sparsity * w.shape[1])
            if k:
                idx = torch.topk(score, k, dim=1, largest=False).indices
                w.scatter_(1, idx, 0.0)
        zeros += int((w == 0).sum())
        total += w.numel()
    return {"method": method, "sparsity": sparsity, "matrices": len(mlp_matrices(model)),
            "weights": total, "zero_weights": zeros, "achieved_sparsity": zeros / total}
