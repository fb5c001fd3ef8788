"""UnitMem and ClassMem: how selective each unit is for a single data point (or a single class).

Definitions (Wang, Dziedzic, Backes, Boenisch, NeurIPS 2024, after the selectivity index of
Morcos et al. 2018):

- For unit u and point n, mu_n = the mean activation of u over the A augmentations of n.
- mu_max = max_n mu_n, and mu_-max = the mean of mu_n over all *other* points
  (`reduce="mean"`, the selectivity-index definition) or their median (`reduce="median"`,
  what the paper's reference code computes).
- UnitMem(u) = (mu_max - mu_-max) / (mu_max + mu_-max), in [0, 1] for non-negative activations:
  1 when the unit fires for one point only, 0 when it fires equally for all.

ClassMem is the same index over class-conditional means: mu_c = the mean of the per-point means of
the points of class c; mu_max = max_c mu_c; mu_-max = the mean (or median) of the other classes.
(The reference code's "class memorization" never groups points by class; this one does.)

Units: one value per unit and point. For convolutions pass channel activations averaged over space
(`memprobe.backends.torch_hooks.capture_modules(..., spatial_mean=True)`), for MLPs the neurons
(for transformers, averaged over the tokens of a text).

Negative activations: the index is only meaningful for non-negative activations (post-ReLU; the
ratio is unbounded and can change sign otherwise). `negatives="error"` (default) refuses them;
`"clip"` keeps the positive part max(a, 0) (GELU's small negative lobe, or the positive half of
a SiLU-gated neuron); `"abs"` uses |a| (a signed neuron's magnitude). Both are applied to every
activation *before* averaging over augmentations.

Dead units (mu_max + mu_-max == 0, e.g. a ReLU that never fires) get 0, not NaN.

Performance: `unitmem(..., reduce="mean")` on an in-memory array is O(points x units) memory;
`UnitMemAccumulator` gives the identical result in one streaming pass over batches of points with
O(units) memory (running sum, running max and its argmax per unit), so it can run over any number
of points while capturing them. The median needs all per-point means, so it has no O(units)
streaming form (`UnitMemAccumulator(keep_means=True)` keeps them: O(points x units)).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch

from memprobe.errors import MemprobeError

Reduce = Literal["mean", "median"]
Negatives = Literal["error", "clip", "abs"]

__all__ = [
    "ClassMemAccumulator",
    "UnitMemAccumulator",
    "channel_mean",
    "classmem",
    "selectivity_index",
    "stream_unitmem",
    "unit_points",
    "token_mean",
    "unitmem",
]


def _as_tensor(acts, name: str = "acts") -> tuple[torch.Tensor, bool]:
    """(float64 tensor, was_numpy)."""
    if isinstance(acts, torch.Tensor):
        return acts.detach().to(device="cpu", dtype=torch.float64), False
    try:
        arr = np.asarray(acts, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise MemprobeError(f"{name} must be a torch tensor or numpy array of numbers: {exc}") from None
    return torch.from_numpy(arr), True


def _handle_negatives(t: torch.Tensor, negatives: str, what: str) -> torch.Tensor:
    if negatives not in ("error", "clip", "abs"):
        raise MemprobeError(f"negatives must be 'error', 'clip' or 'abs', not {negatives!r}")
    if not torch.isfinite(t).all():
        raise MemprobeError(f"{what} contain NaN or inf: check the captured activations")
    if negatives == "clip":
        return t.clamp(min=0)
    if negatives == "abs":
        return t.abs()
    if (t < 0).any():
        lo = float(t.min())
        raise MemprobeError(
            f"{what} have negative values (min {lo:.4g}), but UnitMem/ClassMem are defined for "
            "non-negative activations (post-ReLU). Capture a post-ReLU site, or pass "
            "negatives='clip' (positive part, e.g. GELU/SiLU outputs) or negatives='abs' (magnitude)"
        )
    return t


def _check_reduce(reduce: str) -> None:
    if reduce not in ("mean", "median"):
        raise MemprobeError(f"reduce must be 'mean' (selectivity index) or 'median' (reference code), not {reduce!r}")


def selectivity_index(mu_max: torch.Tensor, mu_rest: torch.Tensor) -> torch.Tensor:
    """(mu_max - mu_rest) / (mu_max + mu_rest), with 0 where the denominator is 0 (dead units)."""
    num = mu_max - mu_rest
    den = mu_max + mu_rest
    out = torch.zeros_like(num)
    ok = den > 0
    out[ok] = num[ok] / den[ok]
    return out


def _median_of_rest(means: torch.Tensor) -> torch.Tensor:
    """Per column, the median of all rows but (one copy of) the largest: drop the last sorted row.

    The ordinary median (the mean of the two middle values for an even count), as numpy.median.
    """
    k = means.shape[0] - 1
    rest = means.sort(dim=0).values[:k]
    if k % 2:
        return rest[k // 2]
    return (rest[k // 2 - 1] + rest[k // 2]) / 2


def _index_over_rows(means: torch.Tensor, reduce: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Selectivity over the rows of `means` (rows, units): (index per unit, argmax row per unit)."""
    n = means.shape[0]
    mu_max, arg = means.max(dim=0)
    if reduce == "mean":
        mu_rest = (means.sum(dim=0) - mu_max) / (n - 1)
    else:
        mu_rest = _median_of_rest(means)
    return selectivity_index(mu_max, mu_rest), arg


def _out(values: torch.Tensor, was_numpy: bool, like: torch.Tensor | None = None):
    if was_numpy:
        return values.numpy()
    if like is not None and like.dtype.is_floating_point:
        return values.to(like.dtype)
    return values.float()


def unitmem(
    acts,
    reduce: Reduce = "mean",
    *,
    negatives: Negatives = "error",
    return_argmax: bool = False,
):
    """UnitMem of each unit from activations of shape (points, augmentations, units).

    `acts` may be a torch tensor or a numpy array; the result has the same kind (float64 for
    numpy, the input's float dtype for torch), one value per unit. `reduce="mean"` is the
    selectivity-index definition (mu_-max = mean over the other points); `reduce="median"` is the
    reference-code variant. `return_argmax=True` also returns, per unit, the index of the point
    with the largest mean activation (the point the unit is selective for).

    Raises MemprobeError for a wrong shape, fewer than 2 points, NaNs, or negative activations
    with `negatives="error"`.
    """
    _check_reduce(reduce)
    t, was_numpy = _as_tensor(acts)
    if t.ndim != 3:
        raise MemprobeError(
            f"acts must have shape (points, augmentations, units), got {tuple(t.shape)}; for a single "
            "augmentation per point add a middle axis of size 1"
        )
    n, a, u = t.shape
    if n < 2:
        raise MemprobeError(
            f"UnitMem needs at least 2 points (got {n}): selectivity compares the top point with the others"
        )
    if a < 1 or u < 1:
        raise MemprobeError(f"acts has an empty axis: shape {tuple(t.shape)}")
    t = _handle_negatives(t, negatives, "activations")
    means = t.mean(dim=1)
    values, arg = _index_over_rows(means, reduce)
    like = acts if isinstance(acts, torch.Tensor) else None
    out = _out(values, was_numpy, like)
    if return_argmax:
        return out, (arg.numpy() if was_numpy else arg)
    return out


def classmem(
    acts,
    labels,
    reduce: Reduce = "mean",
    *,
    negatives: Negatives = "error",
    return_argmax: bool = False,
):
    """ClassMem (class selectivity) of each unit: the UnitMem index over class-conditional means.

    `acts` has shape (points, augmentations, units) (or (points, units)); `labels` one class per
    point. mu_c = mean over the points of class c of their augmentation-mean activation; the index
    compares the top class with the mean (or median) of the others. Needs >= 2 classes.
    """
    _check_reduce(reduce)
    t, was_numpy = _as_tensor(acts)
    if t.ndim == 2:
        t = t.unsqueeze(1)
    if t.ndim != 3:
        raise MemprobeError(f"acts must have shape (points, augmentations, units), got {tuple(t.shape)}")
    lab = torch.as_tensor(np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)).reshape(-1)
    if lab.numel() != t.shape[0]:
        raise MemprobeError(f"labels has {lab.numel()} entries but acts has {t.shape[0]} points")
    t = _handle_negatives(t, negatives, "activations")
    classes, inv = torch.unique(lab, return_inverse=True)
    if len(classes) < 2:
        raise MemprobeError("ClassMem needs points from at least 2 classes")
    means = t.mean(dim=1)
    sums = torch.zeros(len(classes), means.shape[1], dtype=torch.float64).index_add_(0, inv, means)
    counts = torch.bincount(inv, minlength=len(classes)).to(torch.float64)
    class_means = sums / counts[:, None]
    values, arg = _index_over_rows(class_means, reduce)
    like = acts if isinstance(acts, torch.Tensor) else None
    out = _out(values, was_numpy, like)
    if return_argmax:
        cls = classes[arg]
        return out, (cls.numpy() if was_numpy else cls)
    return out


class UnitMemAccumulator:
    """Streaming UnitMem (mean variant) in one pass with O(units) memory.

    Feed batches of points with `update(acts)` (shape (batch_points, augmentations, units): all
    augmentations of a point in the same call) or their augmentation means with
    `update_means(means)` (shape (batch_points, units)); `compute()` returns the same values as
    `unitmem(all_acts, reduce="mean")`. State: running sum, max and argmax per unit (float64).

    `keep_means=True` also keeps every per-point mean so `compute("median")` works (O(points x units)).
    """

    def __init__(self, n_units: int | None = None, *, negatives: Negatives = "error", keep_means: bool = False):
        if negatives not in ("error", "clip", "abs"):
            raise MemprobeError(f"negatives must be 'error', 'clip' or 'abs', not {negatives!r}")
        self.negatives = negatives
        self.keep_means = keep_means
        self.n_points = 0
        self.n_units = n_units
        self._sum: torch.Tensor | None = None
        self._max: torch.Tensor | None = None
        self._arg: torch.Tensor | None = None
        self._means: list[torch.Tensor] = []

    def _init(self, u: int, device: torch.device) -> None:
        if self.n_units is not None and self.n_units != u:
            raise MemprobeError(f"this accumulator has {self.n_units} units, the batch has {u}")
        self.n_units = u
        self._sum = torch.zeros(u, dtype=torch.float64, device=device)
        self._max = torch.full((u,), -torch.inf, dtype=torch.float64, device=device)
        self._arg = torch.zeros(u, dtype=torch.long, device=device)

    @torch.no_grad()
    def update(self, acts) -> None:
        """Add a batch of shape (batch_points, augmentations, units): all augmentations of a point."""
        t = acts.detach() if isinstance(acts, torch.Tensor) else torch.from_numpy(np.asarray(acts))
        if t.ndim != 3:
            raise MemprobeError(f"a batch must have shape (points, augmentations, units), got {tuple(t.shape)}")
        if t.shape[1] < 1:
            raise MemprobeError("a batch has no augmentations")
        t = _handle_negatives(t.to(torch.float64), self.negatives, "activations")
        self._add(t.mean(dim=1))

    @torch.no_grad()
    def update_means(self, means) -> None:
        """Add per-point augmentation means of shape (batch_points, units).

        With negatives='clip' or 'abs', the means must be of already clipped / absolute
        activations (the transform comes before averaging); negative means are always refused.
        """
        m = means.detach() if isinstance(means, torch.Tensor) else torch.from_numpy(np.asarray(means))
        if m.ndim != 2:
            raise MemprobeError(f"means must have shape (points, units), got {tuple(m.shape)}")
        self._add(_handle_negatives(m.to(torch.float64), "error", "per-point mean activations"))

    def _add(self, m: torch.Tensor) -> None:
        if m.shape[0] == 0:
            return
        if self._sum is None:
            self._init(m.shape[1], m.device)
        elif m.shape[1] != self.n_units:
            raise MemprobeError(f"this accumulator has {self.n_units} units, the batch has {m.shape[1]}")
        self._sum += m.sum(dim=0)
        bmax, barg = m.max(dim=0)
        better = bmax > self._max  # strict: the first point wins ties, as torch.max over all points
        self._max = torch.where(better, bmax, self._max)
        self._arg = torch.where(better, barg + self.n_points, self._arg)
        self.n_points += m.shape[0]
        if self.keep_means:
            self._means.append(m.cpu())

    def compute(self, reduce: Reduce = "mean") -> torch.Tensor:
        """UnitMem per unit (float64 tensor)."""
        _check_reduce(reduce)
        if self.n_points < 2:
            raise MemprobeError(f"UnitMem needs at least 2 points (got {self.n_points})")
        if reduce == "median":
            if not self.keep_means:
                raise MemprobeError(
                    "the median variant needs every per-point mean: create the accumulator with keep_means=True"
                )
            return _index_over_rows(torch.cat(self._means), "median")[0]
        rest = (self._sum - self._max) / (self.n_points - 1)
        return selectivity_index(self._max, rest).cpu()

    @property
    def argmax(self) -> torch.Tensor:
        """Index (in feeding order) of the point each unit responds to most."""
        if self._arg is None:
            raise MemprobeError("no points added yet")
        return self._arg.cpu()

    @property
    def max_mean(self) -> torch.Tensor:
        """mu_max of each unit: its largest per-point mean (<= 0 marks a unit that never fires)."""
        if self._max is None:
            raise MemprobeError("no points added yet")
        return self._max.cpu()

    @property
    def state_bytes(self) -> int:
        """Bytes held by the streaming state (excluding kept means)."""
        if self._sum is None:
            return 0
        return sum(t.element_size() * t.numel() for t in (self._sum, self._max, self._arg))


class ClassMemAccumulator:
    """Streaming ClassMem with O(classes x units) memory: per-class sums of per-point means."""

    def __init__(self, *, negatives: Negatives = "error"):
        if negatives not in ("error", "clip", "abs"):
            raise MemprobeError(f"negatives must be 'error', 'clip' or 'abs', not {negatives!r}")
        self.negatives = negatives
        self._sums: dict[int, torch.Tensor] = {}
        self._counts: dict[int, int] = {}

    @torch.no_grad()
    def update(self, acts, labels: Sequence[int] | torch.Tensor | np.ndarray) -> None:
        t = acts.detach() if isinstance(acts, torch.Tensor) else torch.from_numpy(np.asarray(acts))
        if t.ndim == 2:
            t = t.unsqueeze(1)
        if t.ndim != 3:
            raise MemprobeError(f"a batch must have shape (points, augmentations, units), got {tuple(t.shape)}")
        lab = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
        if lab.size != t.shape[0]:
            raise MemprobeError(f"labels has {lab.size} entries but the batch has {t.shape[0]} points")
        means = _handle_negatives(t.to(torch.float64), self.negatives, "activations").mean(dim=1).cpu()
        for c in np.unique(lab):
            rows = torch.from_numpy(np.nonzero(lab == c)[0])
            s = means[rows].sum(dim=0)
            key = int(c)
            self._sums[key] = self._sums[key] + s if key in self._sums else s
            self._counts[key] = self._counts.get(key, 0) + len(rows)

    def compute(self, reduce: Reduce = "mean") -> torch.Tensor:
        _check_reduce(reduce)
        if len(self._sums) < 2:
            raise MemprobeError("ClassMem needs points from at least 2 classes")
        keys = sorted(self._sums)
        class_means = torch.stack([self._sums[k] / self._counts[k] for k in keys])
        return _index_over_rows(class_means, reduce)[0]


def channel_mean(t: torch.Tensor) -> torch.Tensor:
    """Conv units: (B, C, H, W) -> (B, C), averaging each channel over space (identity for (B, C))."""
    return t.mean(dim=tuple(range(2, t.ndim))) if t.ndim > 2 else t


def token_mean(t: torch.Tensor) -> torch.Tensor:
    """Transformer units: (B, T, D) -> (B, D), averaging each neuron over the tokens."""
    return t.mean(dim=1) if t.ndim == 3 else t


def unit_points(sites: Sequence[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Hook points that reduce each site to one value per unit while capturing (`channel_mean`,
    unless a HookPoint brings its own transform), so a capture for UnitMem holds O(units) per view."""
    from memprobe.backends.torch_hooks import HookPoint

    if isinstance(sites, Mapping):
        return {k: v if v.transform is not None else HookPoint(v.module, v.io, channel_mean) for k, v in sites.items()}
    return {s: HookPoint(s, "output", channel_mean) for s in sites}


@torch.no_grad()
def stream_unitmem(
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    negatives: Negatives = "error",
    labels=None,
    keep_means: bool = False,
) -> dict[str, UnitMemAccumulator] | tuple[dict[str, UnitMemAccumulator], dict[str, ClassMemAccumulator]]:
    """UnitMem at many sites in one streaming pass over batches of captured augmented views.

    Each batch is {site: (A, b, ...)}: the `A` augmented views of `b` points (as
    `memprobe.capture.capture_augmented(model, images, unit_points(sites), include_original=False,
    ...)` yields); each view's value is
    reduced to one value per unit (`channel_mean`: a conv channel averaged over space; a site
    captured through a HookPoint with its own transform, e.g. `token_mean`, is already reduced) and
    fed to a `UnitMemAccumulator`. Memory is O(units) per site, whatever the number of points. With
    `labels` (one class per point), ClassMem accumulators are returned too.
    """
    accs: dict[str, UnitMemAccumulator] = {}
    caccs: dict[str, ClassMemAccumulator] | None = {} if labels is not None else None
    start = 0
    for batch in batches:
        b = 0
        for s, v in batch.items():
            n_aug, b = v.shape[:2]
            v = channel_mean(v.flatten(0, 1)).reshape(n_aug, b, -1).transpose(0, 1)  # (b, A, units)
            accs.setdefault(s, UnitMemAccumulator(negatives=negatives, keep_means=keep_means)).update(v)
            if caccs is not None:
                if start + b > len(labels):
                    raise MemprobeError(f"{len(labels)} labels for more points than that")
                caccs.setdefault(s, ClassMemAccumulator(negatives=negatives)).update(v, labels[start : start + b])
        start += b
    if not accs:
        raise MemprobeError("no sites given")
    if start < 2:
        raise MemprobeError(f"UnitMem needs at least 2 points (got {start})")
    if labels is not None and len(labels) != start:
        raise MemprobeError(f"{len(labels)} labels for {start} images")
    return (accs, caccs) if caccs is not None else accs
