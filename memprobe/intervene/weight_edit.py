"""Learn a low-rank edit of MLP output weights that suppresses memorized tokens (a `LowRankEdit`).

Why learned, not selected: ablating the neurons that score highest for memorized tokens also removes
what they do for ordinary text, and a few of them break the model (experiments/suppress.py). Here the
edit is fitted to the trade-off itself: a rank-r change B A of the MLP out-projection at a band of layers, trained
with an unlikelihood loss, -log(1 - p(token)), on the memorized tokens of the build texts (pushing
their probability below the labeller's confidence threshold without rewarding any other token) plus
`kl_weight` x KL(original || edited) on every token of ordinary control texts (keeping the model
unchanged there). The base model is frozen; only A and B train. A low rank keeps the edit from
storing text-specific facts, so it has to find what memorized recitation shares across texts; it is
judged on memorized texts it was not built from.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn

from memprobe.adapters import adapter_for
from memprobe.errors import MemprobeError
from memprobe.intervene.ablation import LowRankEdit
from memprobe.intervene.localizers import Target, mlp_shape
from memprobe.precision import native_bfloat16


def _batch(targets: Sequence[Target]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and the positions to score, all (n, T)."""
    width = max(len(t.token_ids) for t in targets)
    ids = torch.zeros(len(targets), width, dtype=torch.long)
    mask = torch.zeros(len(targets), width, dtype=torch.long)
    pos = torch.zeros(len(targets), width, dtype=torch.bool)
    for i, t in enumerate(targets):
        n = len(t.token_ids)
        ids[i, :n], mask[i, :n], pos[i, :n] = t.token_ids, 1, t.positions
    return ids, mask, pos


class _Replay(nn.Module):
    """Stands in for a frozen block below the edit: returns (a copy of) what the real block returned."""

    def __init__(self, output: object, block: nn.Module) -> None:
        super().__init__()
        self.output = output
        if hasattr(block, "attention_type"):  # some models pick each block's attention mask by it
            self.attention_type = block.attention_type

    def forward(self, *args: object, **kwargs: object) -> object:
        copy = lambda v: v.clone() if isinstance(v, torch.Tensor) else v  # noqa: E731 - a block may add in place
        return tuple(copy(v) for v in self.output) if isinstance(self.output, tuple) else copy(self.output)


class _PassThrough(nn.Module):
    """Stands in for the output head, so the model returns the final hidden states."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


@contextmanager
def _swapped(model: nn.Module, swaps: dict[str, nn.Module]) -> Iterator[None]:
    """Temporarily replace the submodules at the given paths."""
    originals = {path: model.get_submodule(path) for path in swaps}
    try:
        for path, module in swaps.items():
            model.set_submodule(path, module)
        yield
    finally:
        for path, module in originals.items():
            model.set_submodule(path, module)


class EditForward:
    """Next-token log-probs at chosen positions of one fixed batch, computing only what the edit changes.

    Why: the base is frozen and the edit starts at layer `start`, so the blocks below it give the same
    output at every step; they run once (their output is replayed after), and the vocabulary head runs
    only at the positions scored (not at padding or unscored tokens). Both shortcuts are checked once
    against the full model (a family whose head does more than the head module, e.g. logit soft-capping,
    falls back to the full forward).
    """

    def __init__(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, where: torch.Tensor,
                 start: int, autocast: torch.dtype | None = None) -> None:
        self.model, self.ids, self.mask, self.where = model, ids, mask, where  # where: (n, T - 1) scored
        self.autocast = autocast  # the reference, the replayed blocks and every call in this dtype
        adapter = adapter_for(model)
        recorded = {}
        hook = (model.get_submodule(adapter.block(start - 1)).register_forward_hook(
            lambda _m, _a, out: recorded.setdefault("out", out)) if start > 0 else None)
        try:
            with torch.no_grad():
                self.reference = self._full()
        finally:
            if hook is not None:
                hook.remove()
        self.head = model.get_submodule(adapter.unembed)
        self.swaps = {adapter.block(i): _Replay(recorded["out"], model.get_submodule(adapter.block(i)))
                      for i in range(start)}
        self.swaps[adapter.unembed] = _PassThrough()
        try:
            with torch.no_grad():
                self.fast = torch.allclose(self._shortcut(), self.reference, rtol=1e-4, atol=1e-4)
        except (AttributeError, TypeError, IndexError, RuntimeError):  # a forward the shortcut cannot follow
            self.fast = False

    def _cast(self) -> Any:
        if self.autocast is None:
            return nullcontext()
        return torch.autocast(self.ids.device.type, dtype=self.autocast)

    def _full(self) -> torch.Tensor:
        with self._cast():
            logits = self.model(input_ids=self.ids, attention_mask=self.mask, use_cache=False).logits
        return torch.log_softmax(logits[:, :-1][self.where].float(), -1)

    def _shortcut(self) -> torch.Tensor:
        with self._cast(), _swapped(self.model, self.swaps):
            hidden = self.model(input_ids=self.ids, attention_mask=self.mask, use_cache=False).logits
            head = self.head(hidden[:, :-1][self.where])
        return torch.log_softmax(head.float(), -1)

    def __call__(self) -> torch.Tensor:
        """(scored positions, vocab) log-probs under the model as currently hooked."""
        return self._shortcut() if self.fast else self._full()

    def split_logits(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Float logits at the first k scored positions and at the rest, the head run apart on each.

        Why: on a CPU, indexing or slicing a (positions, vocab) tensor and scattering its gradient
        back costs about as much as the head itself; two heads over the split hidden states do not.
        """
        if not self.fast:
            with self._cast():
                logits = self.model(input_ids=self.ids, attention_mask=self.mask, use_cache=False).logits
            logits = logits[:, :-1][self.where].float()
            return logits[:k], logits[k:]
        with self._cast(), _swapped(self.model, self.swaps):
            hidden = self.model(input_ids=self.ids, attention_mask=self.mask, use_cache=False).logits
            hidden = hidden[:, :-1][self.where]
            return self.head(hidden[:k]).float(), self.head(hidden[k:]).float()


def train_low_rank_edit(model: nn.Module, memorized: Sequence[Target], controls: Sequence[Target], *,
                        layers: Sequence[int] | None = None, rank: int = 4, kl_weight: float = 10.0,
                        steps: int = 30, lr: float = 3e-3, max_tokens: int = 64, max_controls: int | None = 16,
                        seed: int = 0, progress: bool = False, mixed_precision: bool | None = None) -> LowRankEdit:
    """Fit a rank-`rank` edit of the MLP out-projection at `layers` (default: from the middle to near the end).

    memorized: targets whose positions are the memorized tokens; controls: ordinary texts (all
    positions). Each text is cut to its first `max_tokens` tokens and at most `max_controls` control
    texts (a seeded sample) are used: the CPU budget. Full-batch Adam for `steps` steps; deterministic
    for a given `seed` and precision. mixed_precision (default: where bfloat16 is native,
    `native_bfloat16`): the frozen model's matmuls (reference and every step) in bfloat16 autocast,
    the factors, losses and optimizer in float32; on smollm2 and the audit's texts it trains 1.9x
    faster with the same held-out suppression (benchmarks/bench_suppression.py).
    """
    if max_controls is not None and len(controls) > max_controls:
        keep = np.random.default_rng(seed).permutation(len(controls))[:max_controls]
        controls = [controls[i] for i in sorted(keep.tolist())]
    memorized = [Target(t.token_ids[:max_tokens], t.positions[:max_tokens]) for t in memorized]
    controls = [Target(t.token_ids[:max_tokens], t.positions[:max_tokens]) for t in controls]
    if not memorized or not controls:
        raise MemprobeError("a learned edit needs memorized texts (what to suppress) and control texts (what to keep)")
    if rank < 1 or steps < 1 or kl_weight < 0:
        raise MemprobeError(f"need rank >= 1, steps >= 1 and kl_weight >= 0, got {rank}, {steps}, {kl_weight}")
    n_layers, d_mlp = mlp_shape(model)
    if layers is None:  # from just below the middle to two layers before the end (14..27 of 30)
        start = max(0, n_layers // 2 - 1)
        layers = list(range(start, max(start + 1, n_layers - 2)))
    layers = list(layers)
    if not layers or min(layers) < 0 or max(layers) >= n_layers:
        raise MemprobeError(f"layers must lie in 0..{n_layers - 1}, got {layers}")
    adapter = adapter_for(model)
    d_model = adapter.d_model(model)
    g = torch.Generator().manual_seed(seed)
    # B starts at 0, so the edit starts as the identity; A random so that gradients reach B
    device = next(model.parameters()).device
    factors = {i: ((torch.randn(rank, d_mlp, generator=g) / math.sqrt(d_mlp)).to(device).requires_grad_(),
                   torch.zeros(d_model, rank, device=device, requires_grad=True)) for i in layers}
    ids, mask, pos = _batch([*memorized, *controls])
    n_mem = len(memorized)
    scored = torch.cat([pos[:n_mem, 1:], mask[n_mem:, 1:].bool()])  # logit t scores token t + 1
    if not scored[:n_mem].any():
        raise MemprobeError("the memorized targets mark no token to suppress")
    is_mem = (torch.arange(len(ids))[:, None] < n_mem).expand_as(scored)[scored]
    mem_targets = ids[:, 1:][scored][is_mem]
    was_training = model.training
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    model.eval()
    handles = []
    try:
        ids, mask, scored = ids.to(device), mask.to(device), scored.to(device)
        is_mem, mem_targets = is_mem.to(device), mem_targets.to(device)
        if mixed_precision is None:
            mixed_precision = native_bfloat16(device)
        forward = EditForward(model, ids, mask, scored, start=min(layers),
                              autocast=torch.bfloat16 if mixed_precision else None)
        n_scored_mem = int(is_mem.sum())  # memorized texts come first, so their positions are a prefix
        reference = forward.reference[n_scored_mem:]
        reference_p = reference.exp()
        reference_neg_entropy = (reference_p * reference).sum(-1)  # KL = this - sum p_ref log p_edited
        handles = [model.get_submodule(adapter.at(i, adapter.mlp_out)).register_forward_hook(
            lambda _m, args, out, i=i: out + (args[0] @ factors[i][0].T) @ factors[i][1].T) for i in layers]
        history = []
        opt = torch.optim.Adam([t for pair in factors.values() for t in pair], lr=lr)
        for step in range(steps):
            mem_logits, control_logits = forward.split_logits(n_scored_mem)
            log_p_target = mem_logits.gather(-1, mem_targets[:, None])[:, 0] - torch.logsumexp(mem_logits, -1)
            unlikelihood = -torch.log1p(-log_p_target.exp().clamp(max=1 - 1e-6)).mean()
            control_lp = torch.log_softmax(control_logits, -1)
            kl = (reference_neg_entropy - (reference_p * control_lp).sum(-1)).mean()
            loss = unlikelihood + kl_weight * kl
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append({"step": step, "unlikelihood": unlikelihood.item(), "kl": kl.item()})
            if progress:
                print(f"low-rank edit step {step}: unlikelihood {history[-1]['unlikelihood']:.4f}, "
                      f"KL {history[-1]['kl']:.4f}", flush=True)
    finally:
        for h in handles:
            h.remove()
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    meta = {"method": "low-rank-edit", "layers": layers, "rank": rank, "kl_weight": kl_weight, "steps": steps,
            "lr": lr, "max_tokens": max_tokens, "seed": seed, "built_from": len(memorized), "controls": len(controls),
            "final": history[-1], "mixed_precision": "bfloat16" if mixed_precision else None}
    return LowRankEdit({i: (a.detach().cpu().clone(), b.detach().cpu().clone()) for i, (a, b) in factors.items()}, 1.0, meta)


def random_low_rank_like(edit: LowRankEdit, seed: int = 0) -> LowRankEdit:
    """A random edit with the same layers, rank and per-layer norm of B A: the baseline beside a learned one."""
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for layer, (a, b) in edit.factors.items():
        ra, rb = torch.randn(a.shape, generator=g), torch.randn(b.shape, generator=g)
        scale = (b @ a).norm() / (rb @ ra).norm().clamp_min(1e-12)
        factors[layer] = (ra, rb * scale)
    return LowRankEdit(factors, edit.strength, {**edit.meta, "method": "random-low-rank", "seed": seed})
