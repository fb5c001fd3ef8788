"""What every localizer reads: a memorized target and the MLP neurons it can drop.

Every method scores every MLP neuron (the input of the MLP out-projection, site
`blocks.{i}.mlp.hook_post`) for a target: token ids plus the positions whose prediction is the
memorized continuation. Scores are (n_layers, d_mlp), so `top_neurons` turns any of them into a
`NeuronEdit`. The helpers here are the forward passes the methods share, written once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from memprobe.adapters import adapter_for
from memprobe.intervene.ablation import NeuronEdit


@dataclass(frozen=True)
class Target:
    """One memorized sequence: token ids (T,) and a bool mask (T,) of the positions to be suppressed
    (position t means "token t predicted from tokens < t")."""

    token_ids: torch.Tensor
    positions: torch.Tensor

    @classmethod
    def suffix(cls, ids: Sequence[int], prefix_len: int) -> Target:
        mask = torch.zeros(len(ids), dtype=torch.bool)
        mask[prefix_len:] = True
        return cls(torch.as_tensor(list(ids), dtype=torch.long), mask)

    @property
    def n_scored(self) -> int:
        """How many tokens are predicted at target positions (the first token is never predicted)."""
        return int(self.positions[1:].sum())

    def feeding_positions(self) -> torch.Tensor:
        """Positions whose activations compute a target prediction (position t-1 predicts token t)."""
        feed = self.positions.roll(-1)
        feed[-1] = False
        return feed


def mlp_shape(model: nn.Module) -> tuple[int, int]:
    """(n_layers, d_mlp): the shape of every per-neuron score."""
    adapter = adapter_for(model)
    return adapter.n_layers, adapter.mlp_width(model)


@contextmanager
def mlp_intercept(
    model: nn.Module, scales: torch.Tensor | None = None, store: list | None = None
) -> Iterator[None]:
    """Multiply every layer's MLP activations by `scales[layer]` (broadcast over positions) and/or
    append them (with grad) to `store`, during the block."""
    adapter = adapter_for(model)
    handles = []

    def make(layer: int):
        def pre(_m, args):
            a = args[0]
            if scales is not None:
                a = a * scales[layer]
            if store is not None:
                if a.requires_grad:
                    a.retain_grad()
                store.append(a)
            return (a, *args[1:])

        return pre

    try:
        for i in range(adapter.n_layers):
            mod = model.get_submodule(adapter.at(i, adapter.mlp_out))
            handles.append(mod.register_forward_pre_hook(make(i)))
        yield
    finally:
        for h in handles:
            h.remove()


def target_logprob(model: nn.Module, target: Target) -> torch.Tensor:
    """Sum of log p(token t | < t) over the target positions (a differentiable scalar)."""
    ids = target.token_ids[None].to(next(model.parameters()).device)
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
    logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
    return logp[target.positions[1:].to(logp.device)].sum()


def background_logprob(model: nn.Module, background: Sequence[Target]) -> torch.Tensor:
    """Sum over background texts of their per-token log-likelihood (what a mask must keep)."""
    return sum((target_logprob(model, b) / max(b.n_scored, 1) for b in background), torch.zeros(()))


def mlp_activations(model: nn.Module, target: Target) -> torch.Tensor:
    """Every MLP neuron's activation at every position of `target`: (n_layers, T, d_mlp)."""
    store: list[torch.Tensor] = []
    with torch.no_grad(), mlp_intercept(model, store=store):
        model(input_ids=target.token_ids[None].to(next(model.parameters()).device), use_cache=False)
    return torch.stack([a[0] for a in store])


def scaled_gradients(
    model: nn.Module, target: Target, alpha: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_pos a * g, sum_pos g) for g = d(target log-lik)/d(activation), activations scaled by `alpha`."""
    n_layers, width = mlp_shape(model)
    scales = torch.full((n_layers, width), alpha, requires_grad=True)
    shift = torch.zeros((n_layers, width), requires_grad=True)
    adapter = adapter_for(model)
    handles = []
    for i in range(n_layers):
        mod = model.get_submodule(adapter.at(i, adapter.mlp_out))
        handles.append(mod.register_forward_pre_hook(
            lambda _m, args, i=i: (args[0] * scales[i] + shift[i], *args[1:])))
    try:
        target_logprob(model, target).backward()
    finally:
        for h in handles:
            h.remove()
    return scales.grad.detach(), shift.grad.detach()


def mean_activations(model: nn.Module, targets: Sequence[Target]) -> torch.Tensor:
    """Mean activation of every neuron over all positions of `targets` (the mean-ablation value)."""
    return torch.cat([mlp_activations(model, t) for t in targets], dim=1).mean(1)


def top_neurons(
    scores: torch.Tensor,
    fraction: float | None = None,
    *,
    k: int | None = None,
    strength: float = 1.0,
    means: torch.Tensor | None = None,
    meta: dict | None = None,
) -> NeuronEdit:
    """A NeuronEdit of the top `fraction` (or `k`) neurons by score: zero ablation, or mean ablation
    toward `means` (n_layers, d_mlp) when given."""
    flat = scores.flatten()
    k = k if k is not None else max(1, round(fraction * flat.numel()))
    idx = torch.topk(flat, k).indices
    width = scores.shape[1]
    neurons: dict[int, list[int]] = {}
    for i in sorted(idx.tolist()):
        neurons.setdefault(i // width, []).append(i % width)
    chosen = {k_: torch.tensor(v) for k_, v in neurons.items()}
    targets = None if means is None else {k_: means[k_, v] for k_, v in chosen.items()}
    return NeuronEdit(chosen, strength, targets, meta=meta or {})
