"""Ground-truth memorization from shadow models trained on random 50% splits.

Each sample is IN the training set of exactly half the shadow models (LiRA's balanced splits), so for every
sample we see its logit gap when a model trained on it and when it did not. Three scores follow:
- `lira_scores`: Carlini et al.'s likelihood ratio for a *target* model: log N(g_t | IN fit) -
  log N(g_t | OUT fit), Gaussians fitted per sample on the shadows' gaps (how much more the target's gap
  on that sample looks like "trained on it" than "not trained on it").
- `counterfactual_memorization`: mean gap IN minus mean gap OUT (Zhang et al. 2021, on the gap).
- `feldman_memorization`: P[correct | IN] - P[correct | OUT] (Feldman & Zhang 2020, label memorization).
Training is generic: `train_fn(train_indices, seed) -> logits of all samples`, any model, any framework.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from memprobe.errors import MemprobeError
from memprobe.io import atomic_path

TrainFn = Callable[[np.ndarray, int], np.ndarray]


def _check_logits(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64).ravel()
    if logits.ndim != 2 or logits.shape[0] != labels.size:
        raise MemprobeError(f"logits must be (samples, classes) with one row per label; got {logits.shape} "
                            f"for {labels.size} labels")
    if logits.shape[1] < 2:
        raise MemprobeError("logits need at least 2 classes")
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise MemprobeError(f"labels must be class indices in [0, {logits.shape[1]})")
    if not np.isfinite(logits).all():
        raise MemprobeError("logits hold NaN/inf: the model diverged; lower the learning rate")
    return logits, labels


def logit_margin(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """z_y - max_{c != y} z_c: positive iff the sample is classified correctly."""
    logits, labels = _check_logits(logits, labels)
    rows = np.arange(labels.size)
    own = logits[rows, labels]
    others = logits.copy()
    others[rows, labels] = -np.inf
    return own - others.max(1)


def confidence_gap(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """LiRA's scaled confidence log(p_y / (1 - p_y)) = z_y - logsumexp_{c != y} z_c, computed stably."""
    logits, labels = _check_logits(logits, labels)
    rows = np.arange(labels.size)
    others = logits.copy()
    others[rows, labels] = -np.inf
    top = others.max(1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(others - top).sum(1))
    return logits[rows, labels] - lse


def shadow_splits(n_samples: int, n_shadows: int, seed: int = 0) -> np.ndarray:
    """Boolean (n_shadows, n_samples): each sample IN exactly n_shadows // 2 models, each model ~50% IN."""
    if n_shadows < 2 or n_shadows % 2:
        raise MemprobeError(f"n_shadows must be even and >= 2 (half IN, half OUT per sample), not {n_shadows}")
    rng = np.random.default_rng(seed)
    ranks = rng.random((n_shadows, n_samples)).argsort(0).argsort(0)
    return ranks < n_shadows // 2


@dataclass
class ShadowRuns:
    """What the shadows saw (`in_mask`, (S, n)) and produced (`logits`, (S, n, C)) for `labels` (n,)."""

    in_mask: np.ndarray
    logits: np.ndarray
    labels: np.ndarray

    @property
    def gaps(self) -> np.ndarray:
        """(S, n) LiRA confidence gaps of every shadow on every sample."""
        return np.stack([confidence_gap(lg, self.labels) for lg in self.logits])

    @property
    def correct(self) -> np.ndarray:
        """(S, n) whether each shadow classifies each sample correctly."""
        return self.logits.argmax(-1) == self.labels[None]

    def _in_out(self) -> tuple[np.ndarray, np.ndarray]:
        n_in = self.in_mask.sum(0)
        n_out = (~self.in_mask).sum(0)
        if n_in.min() < 1 or n_out.min() < 1:
            raise MemprobeError("some samples are never IN or never OUT of a shadow's training set: "
                                "use shadow_splits (balanced) or more shadows")
        return n_in, n_out


def train_shadows(train_fn: TrainFn, labels: np.ndarray, n_shadows: int, *, seed: int = 0,
                  cache_dir: str | Path | None = None,
                  progress: Callable[[int, int], None] | None = None) -> ShadowRuns:
    """Train `n_shadows` models with `train_fn(train_indices, seed)` on balanced 50% splits.

    `train_fn` returns logits (n, C) for *all* n samples. With `cache_dir`, each shadow's logits are saved
    as `shadow{i}.safetensors` and reused, so an interrupted run resumes where it stopped.
    """
    labels = np.asarray(labels).astype(np.int64).ravel()
    splits = shadow_splits(labels.size, n_shadows, seed)
    cache = Path(cache_dir) if cache_dir is not None else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    logits = []
    for i, keep in enumerate(splits):
        path = cache / f"shadow{i}.safetensors" if cache is not None else None
        if path is not None and path.exists():
            saved = load_file(path)
            if not np.array_equal(saved["in_mask"].astype(bool), keep):
                raise MemprobeError(f"{path} was trained on another split (different seed or size): "
                                    "use a new cache_dir")
            out = saved["logits"]
        else:
            out = np.asarray(train_fn(np.flatnonzero(keep), seed * 100_003 + i), dtype=np.float32)
            _check_logits(out, labels)
            if path is not None:
                with atomic_path(path) as tmp:  # an existing file is a finished shadow: never a partial one
                    save_file({"logits": out, "in_mask": keep.astype(np.uint8)}, tmp)
        logits.append(out)
        if progress is not None:
            progress(i + 1, n_shadows)
    return ShadowRuns(splits, np.stack(logits), labels)


def lira_scores(runs: ShadowRuns, target_logits: np.ndarray, *, global_variance: bool = False,
                min_std: float = 1e-3) -> np.ndarray:
    """Per-sample log-likelihood ratio of the target's gap under the IN vs OUT Gaussian fits.

    High = the target treats the sample like a training sample it needed to see (memorized).
    `global_variance=True` uses one IN and one OUT variance for all samples (LiRA's choice with few
    shadows); stds are floored at `min_std` so a sample on which all shadows agree stays finite.
    """
    from scipy.stats import norm

    runs._in_out()
    g = runs.gaps
    target = confidence_gap(target_logits, runs.labels)
    mask = runs.in_mask
    g_in = np.where(mask, g, np.nan)
    g_out = np.where(~mask, g, np.nan)
    mu_in, mu_out = np.nanmean(g_in, 0), np.nanmean(g_out, 0)
    if global_variance:
        sd_in = np.full_like(mu_in, np.nanstd(g_in - mu_in))
        sd_out = np.full_like(mu_out, np.nanstd(g_out - mu_out))
    else:
        sd_in, sd_out = np.nanstd(g_in, 0), np.nanstd(g_out, 0)
    sd_in, sd_out = np.maximum(sd_in, min_std), np.maximum(sd_out, min_std)
    return norm.logpdf(target, mu_in, sd_in) - norm.logpdf(target, mu_out, sd_out)


def counterfactual_memorization(runs: ShadowRuns) -> np.ndarray:
    """Mean confidence gap over shadows that trained on the sample minus over those that did not."""
    n_in, n_out = runs._in_out()
    g = runs.gaps
    return (g * runs.in_mask).sum(0) / n_in - (g * ~runs.in_mask).sum(0) / n_out


def feldman_memorization(runs: ShadowRuns) -> np.ndarray:
    """Feldman's label memorization: P[correct | IN] - P[correct | OUT], estimated over the shadows."""
    n_in, n_out = runs._in_out()
    c = runs.correct
    return (c & runs.in_mask).sum(0) / n_in - (c & ~runs.in_mask).sum(0) / n_out


def top_fraction(scores: np.ndarray, fraction: float = 0.1) -> np.ndarray:
    """Boolean mask of the `fraction` highest scores ("memorized" = top 10% by default); ties broken stably."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if not 0.0 < fraction < 1.0:
        raise MemprobeError(f"fraction must be in (0, 1), not {fraction}")
    if not np.isfinite(scores).all():
        raise MemprobeError("scores hold NaN/inf: cannot rank them")
    n_top = max(1, int(round(fraction * scores.size)))
    mask = np.zeros(scores.size, dtype=bool)
    mask[np.argsort(-scores, kind="stable")[:n_top]] = True
    return mask
