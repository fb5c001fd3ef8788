"""Detection numbers for probes with intervals that respect documents; grouped cross-validation.

Why resample documents, not tokens: tokens of one document are strongly correlated (a memorized text
is memorized throughout), so a token bootstrap gives intervals that are far too narrow. Here each
bootstrap draw takes whole documents with replacement (a cluster bootstrap); the metrics themselves
come from memprobe.metrics.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memprobe.io.atomic import atomic_write
from memprobe.metrics import roc_auc, tpr_at_fpr
from memprobe.studies.result import Result

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


@dataclass(frozen=True)
class CrossValidation(Result):
    """Out-of-fold probe scores per site, and the shuffled-label control, from one batched sweep.

    `oof[site][i]`: row i scored by the probe of the fold that left it out; `shuffled[site]`: the
    same for probes trained on labels permuted within each fold's training rows (averaged over
    `n_shuffled` permutations); `fit`: the sweep fit (`fit.standardized_coef[site][f]` is fold f's
    probe for f < n_folds). `y`, `folds` and `trainable` are the labels and split it was run on.
    """

    oof: dict[str, np.ndarray]
    shuffled: dict[str, np.ndarray]
    fit: Any  # memprobe.probes.sweep.SweepFit
    y: np.ndarray
    folds: np.ndarray
    trainable: np.ndarray

    @property
    def sites(self) -> list[str]:
        return list(self.oof)

    @property
    def n_folds(self) -> int:
        return len(np.unique(self.folds))

    def fold_coef(self, site: str) -> np.ndarray:
        """The standardised weights of each fold's (real-label) probe at `site`: (n_folds, D)."""
        return self.fit.standardized_coef[site][: self.n_folds]

    def auc(self, site: str, mask: np.ndarray | None = None, *, shuffled: bool = False) -> float:
        """ROC-AUC of the out-of-fold (or shuffled-label) scores on `mask` (default: the trainable rows)."""
        mask = self.trainable if mask is None else mask
        scores = (self.shuffled if shuffled else self.oof)[site]
        return roc_auc(scores[mask], self.y[mask])

    def to_dict(self) -> dict[str, Any]:
        return {"n_folds": self.n_folds, "rows": int(len(self.y)), "trainable_rows": int(self.trainable.sum()),
                "auc": {s: self.auc(s) for s in self.sites},
                "shuffled_labels_auc": {s: self.auc(s, shuffled=True) for s in self.sites}}

    def figure(self, title: str = "") -> Any:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(max(4.0, 0.3 * len(self.sites)), 3.5))
        x = np.arange(len(self.sites))
        ax.bar(x - 0.2, [self.auc(s) for s in self.sites], 0.4, label="probe")
        ax.bar(x + 0.2, [self.auc(s, shuffled=True) for s in self.sites], 0.4, label="shuffled labels")
        ax.set_xticks(x, self.sites, rotation=90, fontsize=6)
        ax.set_ylabel("out-of-fold ROC-AUC")
        ax.set_title(title or f"{self.n_folds}-fold grouped cross-validation")
        ax.legend(fontsize=7)
        return fig

    def save_arrays(self, path: str | Path) -> Path:
        """Every array (scores, fold weights, split) in one .npz, written atomically (for caches)."""
        buffer = io.BytesIO()
        np.savez(buffer, y=self.y, folds=self.folds, trainable=self.trainable,
                 **{f"oof/{s}": v for s, v in self.oof.items()},
                 **{f"shuffled/{s}": v for s, v in self.shuffled.items()},
                 **{f"coef/{s}": v for s, v in self.fit.standardized_coef.items()})
        return atomic_write(path, buffer.getbuffer())

    @classmethod
    def load_arrays(cls, path: str | Path) -> CrossValidation:
        """Read back `save_arrays` (the fit keeps only its standardised weights)."""
        from memprobe.probes.sweep import SweepFit

        with np.load(path) as z:
            sites = [k.removeprefix("oof/") for k in z.files if k.startswith("oof/")]
            coef = {s: z[f"coef/{s}"] for s in sites}
            return cls({s: z[f"oof/{s}"] for s in sites}, {s: z[f"shuffled/{s}"] for s in sites},
                       SweepFit(sites, {}, coef, {}), z["y"], z["folds"], z["trainable"])


def cross_validate(sweep: Any, store: Any, rows: np.ndarray, y: np.ndarray, folds: np.ndarray, *,
                   sites: Sequence[str] | None = None, n_shuffled: int = 1, seed: int = 0,
                   trainable: np.ndarray | None = None, doc_start: np.ndarray | None = None) -> CrossValidation:
    """Grouped cross-validation of `sweep` (a ProbeSweep) at every site, in one batched fit.

    Rows outside `trainable` (default: all) are never trained on but still scored. Each fold's
    training rows also get `n_shuffled` label permutations, the chance-level control.
    """
    from memprobe.probes.sweep import balanced_weights

    y, folds = np.asarray(y), np.asarray(folds)
    trainable = np.ones(len(y), dtype=bool) if trainable is None else np.asarray(trainable, dtype=bool)
    fold_ids = np.unique(folds)
    rng = np.random.default_rng(seed)
    targets, weights = [], []
    for rep in range(1 + n_shuffled):
        for f in fold_ids:
            train = (folds != f) & trainable
            t = y.astype(np.float64).copy()
            if rep:
                t[train] = rng.permutation(t[train])
            targets.append(t)
            weights.append(balanced_weights(t.astype(int), train))
    fit = sweep.run(store, rows, np.stack(targets), np.stack(weights), sites, doc_start)
    n_f = len(fold_ids)
    oof, shuffled = {}, {}
    for site, s in fit.scores.items():
        real = np.empty(len(y))
        fake = np.zeros(len(y))
        for i, f in enumerate(fold_ids):
            held = folds == f
            real[held] = s[i, held]
            for rep in range(1, 1 + n_shuffled):
                fake[held] += s[rep * n_f + i, held] / n_shuffled
        oof[site], shuffled[site] = real, fake
    return CrossValidation(oof, shuffled, fit, y, folds, trainable)
