"""One probe per site over a whole activation store: cross-validated scores and final fits.

Why streamed and batched: a store of every layer is larger than memory, but one site's rows of
interest are small. So sites are read a few at a time (as many as fit `memory_mb`), and for each
site every problem (cross-validation folds, shuffled-label controls) is fitted in one batched
L-BFGS run (memprobe.probes.estimators.fit_logistic_batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from memprobe.errors import MemprobeError
from memprobe.probes.estimators import LogisticProbe, fit_logistic_batch
from memprobe.probes.evaluate import CrossValidation, cross_validate
from memprobe.probes.features import read_rows


@dataclass(frozen=True)
class SweepFit:
    """Per site: the decision scores of every problem on every row, and its standardised weights."""

    sites: list[str]
    scores: dict[str, np.ndarray]  # site -> (P, N)
    standardized_coef: dict[str, np.ndarray]  # site -> (P, D)
    fits: dict[str, dict[str, np.ndarray]]  # site -> coef (P, D), intercept (P,), mean, scale


def balanced_weights(y: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Weights that give each class of the training rows equal total weight; 0 off the training rows."""
    w = np.zeros(len(y))
    for value in (0, 1):
        rows = train & (y == value)
        if not rows.any():
            raise MemprobeError(f"a training split has no rows of class {value}: every fold needs both classes")
        w[rows] = 0.5 / rows.sum()
    return w


class ProbeSweep:
    """Dense logistic probes (see LogisticProbe) for many sites, fitted together.

    window: features are the mean activation over that many positions (memprobe.probes.features); with
    window > 1 every method needs `doc_start`, the first store row of each row's document.
    """

    def __init__(self, alpha: float = 1e-2, max_iter: int = 200, tol: float = 1e-6, memory_mb: int = 768,
                 progress: bool = True, window: int = 1) -> None:
        self.window = window
        self.alpha = alpha
        self.max_iter = max_iter
        self.tol = tol
        self.memory_mb = memory_mb
        self.progress = progress

    def _site_groups(self, store: Any, sites: Sequence[str], n_rows: int) -> list[list[str]]:
        """Sites of equal width, in store order, as many per group as fit the memory budget."""
        budget = self.memory_mb * 2**20
        groups: list[list[str]] = []
        for width in dict.fromkeys(store.widths[s] for s in sites):
            groups.append([])
            for site in (s for s in sites if store.widths[s] == width):
                if groups[-1] and (len(groups[-1]) + 1) * n_rows * width * 4 * 2 > budget:  # X, a row sample
                    groups.append([])
                groups[-1].append(site)
        return groups

    def run(self, store: Any, rows: np.ndarray, targets: np.ndarray, weights: np.ndarray,
            sites: Sequence[str] | None = None, doc_start: np.ndarray | None = None) -> SweepFit:
        """Fit problem p (targets[p], weights[p] over `rows`) at every site; score every row.

        Why rows are read training rows first, into one buffer for all groups: the fit then reads a
        contiguous view (no copy of the rows it trains on), and no group pays for fresh memory.
        """
        sites = list(store.sites if sites is None else sites)
        rows = np.asarray(rows, dtype=np.int64)
        Y = torch.as_tensor(np.atleast_2d(targets), dtype=torch.float32)
        W = torch.as_tensor(np.atleast_2d(weights), dtype=torch.float32)
        trains = (W > 0).any(0).numpy()
        order = np.concatenate([np.flatnonzero(trains), np.flatnonzero(~trains)])
        n_train = int(trains.sum())
        Y, W = Y[:, order[:n_train]], W[:, order[:n_train]]
        starts = None if doc_start is None else np.asarray(doc_start)[order]
        scores, coefs, fits = {}, {}, {}
        groups = self._site_groups(store, sites, len(rows))
        buffer = torch.empty(max(len(g) * store.widths[g[0]] for g in groups) * len(rows)) if groups else None
        for group in tqdm(groups, desc="probe sweep", disable=not self.progress):
            X = buffer[: len(group) * len(rows) * store.widths[group[0]]].view(len(group), len(rows), -1)
            for i, site in enumerate(group):
                read_rows(store, site, rows[order], window=self.window, doc_start=starts, out=X[i])
            fit = fit_logistic_batch(X[:, :n_train], Y, W, alpha=self.alpha, max_iter=self.max_iter, tol=self.tol)
            for i, site in enumerate(group):
                logits = (fit.coef[i] @ X[i].T + fit.intercept[i][:, None]).numpy()
                scores[site] = np.empty_like(logits)
                scores[site][:, order] = logits
                coefs[site] = fit.standardized_coef[i].numpy()
                fits[site] = {"coef": fit.coef[i].numpy(), "intercept": fit.intercept[i].numpy(),
                              "mean": fit.mean[i].numpy(), "scale": fit.scale[i].numpy(), "n_iter": fit.n_iter}
        return SweepFit(sites, scores, coefs, fits)

    def cross_validate(self, store: Any, rows: np.ndarray, y: np.ndarray, folds: np.ndarray, *,
                       sites: Sequence[str] | None = None, n_shuffled: int = 1, seed: int = 0,
                       trainable: np.ndarray | None = None, doc_start: np.ndarray | None = None,
                       ) -> CrossValidation:
        """Out-of-fold scores per site and the shuffled-label control (memprobe.probes.evaluate)."""
        return cross_validate(self, store, rows, y, folds, sites=sites, n_shuffled=n_shuffled, seed=seed,
                              trainable=trainable, doc_start=doc_start)

    def fit(self, store: Any, rows: np.ndarray, y: np.ndarray, sites: Sequence[str] | None = None,
            doc_start: np.ndarray | None = None) -> dict[str, LogisticProbe]:
        """One class-balanced LogisticProbe per site trained on all `rows`."""
        y = np.asarray(y).astype(int)
        fit = self.run(store, rows, y[None].astype(np.float64),
                       balanced_weights(y, np.ones(len(y), dtype=bool))[None], sites, doc_start)
        probes = {}
        for site in fit.sites:
            probe = LogisticProbe(alpha=self.alpha, max_iter=self.max_iter, tol=self.tol, class_weight="balanced")
            f = fit.fits[site]
            probe.classes_ = np.array([0, 1])
            probe.n_features_in_ = f["coef"].shape[1]
            probe.coef_, probe.intercept_ = f["coef"][:1], f["intercept"][:1]
            probe.standardized_coef_ = fit.standardized_coef[site][0]
            probe.mean_, probe.scale_ = f["mean"][0], f["scale"][0]
            probe.n_iter_ = np.array([f["n_iter"]])
            probes[site] = probe
        return probes
