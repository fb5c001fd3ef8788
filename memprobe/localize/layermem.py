"""SSLMem, LayerMem and ΔLayerMem: how much an encoder memorizes its training points, per layer.

SSLMem (Wang et al., ICLR 2024). A candidate encoder f is trained on shared + candidate points, a
reference encoder g on shared + independent points (same seed and hyperparameters). The
alignment distance of a point x under a model at a representation r is

    d(x) = 1/A * sum_a || n(r(x)) - n(r(t_a(x))) ||_2,     n(v) = v / ||v||_2,

the mean over A augmentations t_a of the distance between the L2-normalised representations of
the point and of its augmented view (augmentations act on the raw image, before any input
normalisation). Then, for candidate points,

    SSLMem(x) = d_g(x) - d_f(x)              ("raw": f aligns the views of x better than g does),
    by_sum    = raw / (d_g(x) + d_f(x))       (per point, in [-1, 1]),
    by_range  = raw / (max_c raw - min_c raw) (over the candidate set; the paper's reference code).

LayerMem (Wang, Dziedzic, Backes, Boenisch, NeurIPS 2024): SSLMem computed from the
representation at layer l, averaged over a chosen set of candidates (e.g. the top memorized ones,
or random ones); ΔLayerMem(l) = LayerMem(l) - LayerMem(l-1) (and LayerMem(1) for the first).

Layer representations are captured (memprobe.capture.capture_augmented: this module never runs a
model) with forward hooks on the real modules, so residual additions are
kept: a ResNet block's site is the block's output (skip + residual branch, after its ReLU), a
transformer's "attention half" is the residual stream after the attention addition and its "MLP
half" the stream after the MLP addition (`residual_sites`). Extracting layers by slicing
`model.children()` (as the paper's reference code does) silently drops the skip connections of
every block that is cut open.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from memprobe.adapters import adapter_for, family_of
from memprobe.backends.torch_hooks import HookPoint
from memprobe.errors import MemprobeError

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
Norm = Literal["range", "sum", "raw"]

__all__ = [
    "LayerMemResult",
    "SSLMemScores",
    "alignment_distances",
    "delta_layermem",
    "view_alignment",
    "layermem",
    "residual_sites",
    "select_points",
    "sslmem",
]


def view_alignment(reps: torch.Tensor) -> torch.Tensor:
    """Alignment distance (b,) float64 of each point from its representations (V, b, ...): view 0 the
    point itself, views 1.. its augmentations; each representation flattened and L2-normalised."""
    if reps.ndim < 2 or reps.shape[0] < 2:
        raise MemprobeError(f"need the original and at least one augmented view (V >= 2, b, ...), got "
                            f"shape {tuple(reps.shape)}")
    n_views, b = reps.shape[:2]
    r = torch.nn.functional.normalize(reps.reshape(n_views * b, -1).float(), dim=1).reshape(n_views, b, -1)
    return (r[1:] - r[0]).norm(dim=-1).mean(dim=0).double().cpu()


def alignment_distances(batches: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Alignment distance of every point at every site, from batches of captured views.

    Each batch is {site: (V, b, ...)} (as `memprobe.capture.capture_augmented` yields for one
    model) or {model: {site: (V, b, ...)}} (several models on the same views, which SSLMem needs);
    the result has the same nesting with one (N,) float64 tensor per site, points in batch order.
    """
    parts: dict[str, Any] = {}
    for batch in batches:
        for key, value in batch.items():
            if isinstance(value, Mapping):
                for site, reps in value.items():
                    parts.setdefault(key, {}).setdefault(site, []).append(view_alignment(reps))
            else:
                parts.setdefault(key, []).append(view_alignment(value))
    if not parts:
        raise MemprobeError("no captured views given: capture them with memprobe.capture.capture_augmented")
    return {k: ({s: torch.cat(v) for s, v in d.items()} if isinstance(d, dict) else torch.cat(d))
            for k, d in parts.items()}


@dataclass(frozen=True)
class SSLMemScores:
    """SSLMem of each candidate point: raw = d_g - d_f, and its two normalisations."""

    d_f: torch.Tensor
    d_g: torch.Tensor
    raw: torch.Tensor
    by_sum: torch.Tensor
    by_range: torch.Tensor

    def get(self, norm: Norm = "range") -> torch.Tensor:
        return {"range": self.by_range, "sum": self.by_sum, "raw": self.raw}[norm]


def _check_pair(d_f: torch.Tensor, d_g: torch.Tensor, ids_f, ids_g) -> None:
    if d_f.ndim != 1 or d_g.ndim != 1:
        raise MemprobeError(f"distances must be 1-D (one per point), got shapes {tuple(d_f.shape)} and {tuple(d_g.shape)}")
    if d_f.shape != d_g.shape:
        raise MemprobeError(
            f"f and g were evaluated on different point sets ({d_f.numel()} vs {d_g.numel()} points): "
            "SSLMem compares the same candidate points under both encoders"
        )
    if (ids_f is None) != (ids_g is None):
        raise MemprobeError("give point ids for both f and g, or for neither")
    if ids_f is not None:
        a, b = np.asarray(ids_f).reshape(-1), np.asarray(ids_g).reshape(-1)
        if a.shape != b.shape or not np.array_equal(a, b):
            diff = int((a != b).sum()) if a.shape == b.shape else abs(a.size - b.size)
            raise MemprobeError(
                f"f and g were evaluated on mismatched point sets ({diff} ids differ): evaluate both "
                "encoders on the same candidates in the same order"
            )
        if a.size != d_f.numel():
            raise MemprobeError(f"{a.size} point ids for {d_f.numel()} distances")
    if not (torch.isfinite(d_f).all() and torch.isfinite(d_g).all()):
        raise MemprobeError("alignment distances contain NaN/inf")


def sslmem(d_f, d_g, *, ids_f=None, ids_g=None) -> SSLMemScores:
    """SSLMem per point from alignment distances under f (candidate model) and g (reference).

    `ids_f` / `ids_g` (optional) name the points each vector refers to; they must match exactly.
    The range normalisation divides by (max - min) of raw over the points given (the candidates);
    a constant raw gives 0 rather than NaN.
    """
    d_f = torch.as_tensor(d_f, dtype=torch.float64).detach().cpu()
    d_g = torch.as_tensor(d_g, dtype=torch.float64).detach().cpu()
    _check_pair(d_f, d_g, ids_f, ids_g)
    raw = d_g - d_f
    den = d_g + d_f
    by_sum = torch.where(den > 0, raw / torch.where(den > 0, den, 1.0), torch.zeros_like(raw))
    rng = float(raw.max() - raw.min()) if raw.numel() else 0.0
    by_range = raw / rng if rng > 0 else torch.zeros_like(raw)
    return SSLMemScores(d_f, d_g, raw, by_sum, by_range)


def select_points(scores: torch.Tensor, *, top: int | None = None, random: int | None = None, seed: int = 0) -> torch.Tensor:
    """Indices of the `top` highest scores (descending), or of `random` points drawn without replacement."""
    if (top is None) == (random is None):
        raise MemprobeError("ask for either top=k or random=k")
    k = top if top is not None else random
    n = scores.numel()
    if not 0 < k <= n:
        raise MemprobeError(f"cannot select {k} of {n} points")
    if top is not None:
        return torch.argsort(scores, descending=True, stable=True)[:k]
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]


def delta_layermem(values: Mapping[str, float]) -> dict[str, float]:
    """ΔLayerMem(l) = LayerMem(l) - LayerMem(l-1) in the given (input-to-output) order; the first
    layer's Δ is its LayerMem (the input has none)."""
    out, prev = {}, 0.0
    for site, v in values.items():
        out[site] = float(v) - prev
        prev = float(v)
    return out


@dataclass
class LayerMemResult:
    """Per-layer SSLMem scores and their averages over the chosen point set."""

    scores: dict[str, SSLMemScores]
    points: torch.Tensor
    norm: Norm
    layermem: dict[str, float] = field(default_factory=dict)
    delta: dict[str, float] = field(default_factory=dict)
    layermem_std: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "norm": self.norm,
            "n_points": int(self.points.numel()),
            "layermem": self.layermem,
            "delta_layermem": self.delta,
            "layermem_std": self.layermem_std,
        }


def layermem(
    d_f: Mapping[str, torch.Tensor],
    d_g: Mapping[str, torch.Tensor],
    points: torch.Tensor | Sequence[int] | None = None,
    *,
    norm: Norm = "range",
    ids_f=None,
    ids_g=None,
) -> LayerMemResult:
    """LayerMem and ΔLayerMem from per-site alignment distances of the candidates under f and g.

    `d_f`, `d_g`: {site: (N,) distances}, sites in input-to-output order, the same candidates in
    the same order (checked; pass `ids_f` / `ids_g` to check by id). `points` selects which
    candidates to average over (indices; default all). Normalisation is per site over all N
    candidates (`norm="range"`, the reference code), per point (`"sum"`) or none (`"raw"`).
    """
    if list(d_f) != list(d_g):
        raise MemprobeError(f"f and g have different sites: {list(d_f)} vs {list(d_g)}")
    if not d_f:
        raise MemprobeError("no sites given")
    scores = {s: sslmem(d_f[s], d_g[s], ids_f=ids_f, ids_g=ids_g) for s in d_f}
    n = next(iter(scores.values())).raw.numel()
    idx = torch.arange(n) if points is None else torch.as_tensor(points, dtype=torch.long).reshape(-1)
    if idx.numel() == 0:
        raise MemprobeError("the point set to average over is empty")
    if int(idx.max()) >= n or int(idx.min()) < -n:
        raise MemprobeError(f"point index out of range for {n} candidates")
    res = LayerMemResult(scores, idx, norm)
    for s, sc in scores.items():
        v = sc.get(norm)[idx]
        res.layermem[s] = float(v.mean())
        res.layermem_std[s] = float(v.std()) if v.numel() > 1 else 0.0
    res.delta = delta_layermem(res.layermem)
    return res


def residual_sites(model: nn.Module) -> dict[str, HookPoint]:
    """Residual-stream sites after each transformer block's attention half and MLP half.

    Supports BERT-style encoders (`encoder.layer.{i}`: attention output = LayerNorm(x + attn),
    layer output = LayerNorm(h + mlp)), every decoder family with a `memprobe.adapters` adapter
    (the attention half is its hook_resid_mid, x + attn; the MLP half the block output; parallel
    blocks have no attention half, so only "L{i}.mlp"), and modules
    that mark the two points themselves with submodules named `attn_out` and `mlp_out` in each
    block of a `blocks` list (memprobe's small ViT). Keys: "L{i}.attn", "L{i}.mlp".
    """
    names = dict(model.named_modules())
    out: dict[str, HookPoint] = {}
    if family_of(model) is not None:
        adapter = adapter_for(model)
        for i in range(adapter.n_layers):
            if adapter.has("hook_resid_mid"):
                out[f"L{i}.attn"] = adapter.point(i, "hook_resid_mid")
            out[f"L{i}.mlp"] = adapter.point(i, "hook_resid_post")
        return out
    # BERT blocks: (block prefix, module after attention, read its output)
    layouts = [(p, "attention", "output") for p in ("encoder.layer", "bert.encoder.layer", "model.encoder.layer")]
    for prefix, attn, io in layouts:
        i = 0
        while f"{prefix}.{i}.{attn}" in names:
            out[f"L{i}.attn"] = HookPoint(f"{prefix}.{i}.{attn}", io)
            out[f"L{i}.mlp"] = HookPoint(f"{prefix}.{i}", "output")
            i += 1
        if out:
            return out
    i = 0
    while f"blocks.{i}.attn_out" in names:
        out[f"L{i}.attn"] = HookPoint(f"blocks.{i}.attn_out", "output")
        out[f"L{i}.mlp"] = HookPoint(f"blocks.{i}.mlp_out", "output")
        i += 1
    if not out:
        raise MemprobeError(
            f"no transformer blocks recognised in {type(model).__name__}: pass the sites yourself "
            "(module paths whose outputs include the residual addition)"
        )
    return out
