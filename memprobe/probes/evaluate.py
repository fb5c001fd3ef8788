"""Detection numbers for probes with intervals that respect documents.

Why resample documents, not tokens: tokens of one document are strongly correlated (a memorized text
is memorized throughout), so a token bootstrap gives intervals that are far too narrow. Here each
bootstrap draw takes whole documents with replacement (a cluster bootstrap); the metrics themselves
come from memprobe.metrics.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from memprobe.metrics import roc_auc, tpr_at_fpr

METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "roc_auc": roc_auc,
    "tpr_at_fpr_0.01": lambda s, y: tpr_at_fpr(s, y, 0.01),
}


def document_bootstrap(scores: np.ndarray, labels: np.ndarray, docs: np.ndarray, *, n_boot: int = 200,
                       seed: int = 0, level: float = 0.95) -> dict[str, list[float]]:
    """Percentile intervals of every METRICS entry, resampling documents with replacement.

    Draws that hold a single class are redrawn (the metrics are undefined there).
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    _, doc_index = np.unique(np.asarray(docs).astype(str), return_inverse=True)
    members = [np.flatnonzero(doc_index == d) for d in range(doc_index.max() + 1)]
    rng = np.random.default_rng(seed)
    values: dict[str, list[float]] = {name: [] for name in METRICS}
    while len(values["roc_auc"]) < n_boot:
        idx = np.concatenate([members[d] for d in rng.integers(0, len(members), len(members))])
        y = labels[idx]
        if y.all() or not y.any():
            continue
        for name, fn in METRICS.items():
            values[name].append(fn(scores[idx], y))
    tail = (1 - level) / 2
    return {name: np.quantile(v, [tail, 1 - tail]).tolist() for name, v in values.items()}


def detection(scores: np.ndarray, labels: np.ndarray, docs: np.ndarray, *, n_boot: int = 200,
              seed: int = 0) -> dict[str, float | list[float]]:
    """ROC-AUC and TPR at 1% FPR, each with a 95% document-bootstrap interval (n_boot 0: none)."""
    out: dict[str, float | list[float]] = {name: fn(scores, labels) for name, fn in METRICS.items()}
    if n_boot:
        for name, ci in document_bootstrap(scores, labels, docs, n_boot=n_boot, seed=seed).items():
            out[f"{name}_ci95"] = ci
    return out
