"""Evaluation metrics for detectors and predictors: ROC curve, AUC, TPR/FPR at fixed points, bootstrap CIs.

Why our own (not sklearn.metrics): every analysis reports the same low-FPR numbers (TPR at 1% FPR, FPR at
75% TPR) with the same tie handling and the same input checks, and bootstrap intervals around any of them.
Convention everywhere: numpy in, floats out; a *higher* score means "more likely positive"; labels are
booleans or 0/1. Bad input (NaN scores, lengths that differ, a single class) raises MemprobeError.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from memprobe.errors import MemprobeError

Metric = Callable[[np.ndarray, np.ndarray], float]


def _check(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise MemprobeError(f"scores ({scores.size}) and labels ({labels.size}) must have the same length")
    if not np.all(np.isfinite(scores)):
        raise MemprobeError(f"{int((~np.isfinite(scores)).sum())} scores are NaN or infinite: drop or fix them first")
    if labels.dtype != bool:
        if not np.isin(labels, (0, 1)).all():
            raise MemprobeError("labels must be booleans or 0/1 (positive = 1)")
        labels = labels.astype(bool)
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == labels.size:
        raise MemprobeError("labels hold a single class: ROC metrics need both positives and negatives")
    return scores, labels


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at every distinct score, starting at (0, 0) with threshold +inf.

    Tied scores form one point (no arbitrary order among ties), as in sklearn.metrics.roc_curve with
    drop_intermediate=False.
    """
    scores, labels = _check(scores, labels)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tp = np.cumsum(y)[last_of_tie]
    fp = (last_of_tie + 1) - tp
    tpr = np.r_[0.0, tp / y.sum()]
    fpr = np.r_[0.0, fp / (~y).sum()]
    return fpr, tpr, np.r_[np.inf, s[last_of_tie]]


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a random positive > a random negative), ties count 1/2."""
    scores, labels = _check(scores, labels)
    from scipy.stats import rankdata

    ranks = rankdata(scores)  # average ranks handle ties
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def tpr_at_fpr(scores: np.ndarray, labels: np.ndarray, fpr: float = 0.01) -> float:
    """Highest true-positive rate among thresholds whose false-positive rate is <= `fpr` (LiRA's metric)."""
    if not 0.0 <= fpr <= 1.0:
        raise MemprobeError(f"fpr must be in [0, 1], not {fpr}")
    f, t, _ = roc_curve(scores, labels)
    return float(t[f <= fpr + 1e-12].max())


def fpr_at_tpr(scores: np.ndarray, labels: np.ndarray, tpr: float = 0.75) -> float:
    """Lowest false-positive rate among thresholds whose true-positive rate is >= `tpr` (Dentan et al.)."""
    if not 0.0 <= tpr <= 1.0:
        raise MemprobeError(f"tpr must be in [0, 1], not {tpr}")
    f, t, _ = roc_curve(scores, labels)
    return float(f[t >= tpr - 1e-12].min())


def bootstrap_ci(
    metric: Metric,
    scores: np.ndarray,
    labels: np.ndarray,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of `metric(scores, labels)`, resampling samples with replacement.

    Resamples that draw a single class are redrawn (the metric is undefined there), so the interval is
    conditional on both classes being present.
    """
    scores, labels = _check(scores, labels)
    if not 0.0 < level < 1.0:
        raise MemprobeError(f"level must be in (0, 1), not {level}")
    if n_boot < 2:
        raise MemprobeError(f"n_boot must be at least 2, not {n_boot}")
    rng = np.random.default_rng(seed)
    values = np.empty(n_boot)
    done = 0
    while done < n_boot:
        idx = rng.integers(0, scores.size, scores.size)
        y = labels[idx]
        if y.all() or not y.any():
            continue
        values[done] = metric(scores[idx], y)
        done += 1
    tail = (1.0 - level) / 2
    lo, hi = np.quantile(values, [tail, 1.0 - tail])
    return float(lo), float(hi)


def detection_summary(
    scores: np.ndarray, labels: np.ndarray, *, n_boot: int = 0, seed: int = 0
) -> dict[str, float | list[float]]:
    """The standard block every detector reports: AUC, FPR at 75% TPR, TPR at 1% and 0.1% FPR (+ CIs)."""
    metrics: dict[str, Metric] = {
        "roc_auc": roc_auc,
        "fpr_at_tpr_0.75": lambda s, y: fpr_at_tpr(s, y, 0.75),
        "tpr_at_fpr_0.01": lambda s, y: tpr_at_fpr(s, y, 0.01),
        "tpr_at_fpr_0.001": lambda s, y: tpr_at_fpr(s, y, 0.001),
    }
    out: dict[str, float | list[float]] = {name: fn(scores, labels) for name, fn in metrics.items()}
    if n_boot:
        for name, fn in metrics.items():
            out[f"{name}_ci95"] = list(bootstrap_ci(fn, scores, labels, n_boot=n_boot, seed=seed))
    return out
