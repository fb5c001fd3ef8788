"""Nested document-grouped cross-validation of probes over a grid of (site, window).

Why nested: picking the best of many sites and windows by cross-validation and reporting that same
cross-validated AUC is "best of N", optimistic by construction (on pure noise the best of 60 sites
sits well above 0.5). Here outer folds hold whole document families; inside each outer training set
an inner grouped cross-validation chooses (site, window) by ROC-AUC, the chosen probe is refitted on
the whole outer training set and only then scores the outer test documents. The choice never sees
an outer test row (`choose_in_fold` is handed the training rows only, and every test row is read
after every fold has chosen).

Beside the nested AUC the result keeps what the old protocol reports (the best grid point's
out-of-fold AUC, labelled optimistic), output-only baselines, and a document-level null: the whole
nested procedure rerun with the labels permuted among documents (labels live at documents: each
document keeps its tokens, its label moves), folds rebuilt from the permuted labels as for the
real run.

Cost: per window and outer fold one batched ProbeSweep.run over the training rows (every site,
every inner fold and the refit in one L-BFGS batch), then one read per (site, window) to score the
outer test rows of every fold; the null repeats that `n_null` times. With a StepCache each run (the
real one, each null) is a content-keyed step, so a killed job resumes from the last finished run.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memprobe.errors import MemprobeError
from memprobe.io.atomic import atomic_write
from memprobe.memdata import group_folds
from memprobe.metrics import roc_auc, roc_curve
from memprobe.probes.evaluate import detection
from memprobe.probes.features import read_rows
from memprobe.probes.sweep import ProbeSweep, balanced_weights
from memprobe.studies.result import Result

GridPoint = tuple[str, int]  # (site, window)


@dataclass(frozen=True)
class NestedConfig:
    """Settings of a nested cross-validation (all recorded in the result)."""

    sites: tuple[str, ...] | None = None  # None: every site of the store
    windows: tuple[int, ...] = (1, 16)
    n_outer: int = 5  # at most; fewer when fewer document families hold positives
    n_inner: int = 4  # at most, likewise inside each outer training set
    n_null: int = 1  # permutations of the document labels, each a full nested rerun (0: none)
    alpha: float = 1e-2
    max_iter: int = 150
    n_boot: int = 200  # document-bootstrap draws for each interval
    seed: int = 0


@dataclass(frozen=True)
class FoldChoice:
    """What one outer training set chose: the grid point with the best inner AUC, every grid point's
    inner AUC, and every grid point's probe refitted on all of the training rows (coef, intercept)."""

    site: str
    window: int
    inner_auc: dict[GridPoint, float]
    refit: dict[GridPoint, tuple[np.ndarray, float]]
    n_inner: int


def _n_folds(groups: np.ndarray, y: np.ndarray, wanted: int, what: str) -> int:
    positive = len(set(groups[y == 1].tolist()))
    negative_only = len(set(groups.tolist()) - set(groups[y == 1].tolist()))
    n = min(wanted, positive)
    if n < 2 or negative_only < 1:
        raise MemprobeError(
            f"{what}: {positive} document families hold positives and {negative_only} hold only "
            "negatives; grouped cross-validation needs at least 2 with positives and 1 without "
            "(add documents, or lower the fold count)")
    return n


def choose_in_fold(store: Any, rows: np.ndarray, y: np.ndarray, groups: np.ndarray, *,
                   sites: Sequence[str], windows: Sequence[int], n_inner: int, seed: int = 0,
                   doc_start: np.ndarray | None = None, alpha: float = 1e-2,
                   max_iter: int = 150) -> FoldChoice:
    """Choose (site, window) by inner grouped CV on these rows only (an outer training set).

    Per window one batched sweep fits, at every site, one probe per inner fold plus the refit on
    all rows; the inner out-of-fold scores give each grid point's AUC. Ties go to the first grid
    point in (site, window) order.
    """
    rows, y, groups = np.asarray(rows, dtype=np.int64), np.asarray(y).astype(int), np.asarray(groups)
    n_inner = _n_folds(groups, y, n_inner, "inner cross-validation")
    inner = group_folds(groups, y, n_folds=n_inner, seed=seed)
    targets = np.repeat(y[None].astype(np.float64), n_inner + 1, axis=0)
    weights = np.stack([balanced_weights(y, inner != j) for j in range(n_inner)]
                       + [balanced_weights(y, np.ones(len(y), dtype=bool))])
    inner_auc: dict[GridPoint, float] = {}
    refit: dict[GridPoint, tuple[np.ndarray, float]] = {}
    for window in windows:
        sweep = ProbeSweep(alpha=alpha, max_iter=max_iter, progress=False, window=int(window))
        fit = sweep.run(store, rows, targets, weights, list(sites), doc_start)
        for site in sites:
            oof = np.empty(len(y))
            for j in range(n_inner):
                oof[inner == j] = fit.scores[site][j, inner == j]
            inner_auc[(site, int(window))] = roc_auc(oof, y)
            f = fit.fits[site]
            refit[(site, int(window))] = (np.asarray(f["coef"][n_inner], dtype=np.float64),
                                          float(f["intercept"][n_inner]))
    grid = [(s, int(w)) for s in sites for w in windows]
    best = max(grid, key=lambda g: inner_auc[g])  # max keeps the first of equal values
    return FoldChoice(best[0], best[1], inner_auc, refit, n_inner)


@dataclass(frozen=True)
class Procedure:
    """One run of the nested procedure: its outer folds, each outer training set's choice, and every
    grid point's outer-test scores (fold f's rows scored by the refit on the other folds)."""

    outer: np.ndarray
    choices: list[FoldChoice]
    grid_scores: dict[GridPoint, np.ndarray]

    @property
    def nested_scores(self) -> np.ndarray:
        """Each row scored by the grid point its outer training set chose."""
        out = np.empty(len(self.outer))
        for f, c in enumerate(self.choices):
            out[self.outer == f] = self.grid_scores[(c.site, c.window)][self.outer == f]
        return out

    def save(self, path: str | Path) -> Path:
        """Scores, folds and choices (not the refitted weights) in one .npz, written atomically."""
        meta = {"grid": [list(g) for g in self.grid_scores],
                "choices": [{"site": c.site, "window": c.window, "n_inner": c.n_inner,
                             "inner_auc": [[s, w, v] for (s, w), v in c.inner_auc.items()]}
                            for c in self.choices]}
        buffer = io.BytesIO()
        np.savez(buffer, meta=np.array(json.dumps(meta)), outer=self.outer,
                 grid_scores=np.stack(list(self.grid_scores.values())))
        return atomic_write(path, buffer.getbuffer())

    @classmethod
    def load(cls, path: str | Path) -> Procedure:
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            choices = [FoldChoice(c["site"], c["window"], {(s, w): v for s, w, v in c["inner_auc"]},
                                  {}, c["n_inner"]) for c in meta["choices"]]
            grid = {(s, int(w)): v for (s, w), v in zip(meta["grid"], z["grid_scores"], strict=True)}
            return cls(z["outer"], choices, grid)


def run_procedure(store: Any, rows: np.ndarray, y: np.ndarray, groups: np.ndarray,
                  doc_start: np.ndarray | None, sites: Sequence[str], config: NestedConfig,
                  seed: int) -> Procedure:
    """One nested run: outer folds, a choice per outer training set, then outer test scores of every
    grid point's refit (test rows are read only after every fold has chosen)."""
    n_outer = _n_folds(groups, y, config.n_outer, "outer cross-validation")
    outer = group_folds(groups, y, n_folds=n_outer, seed=seed)
    choices = []
    for f in range(n_outer):
        train = outer != f
        choices.append(choose_in_fold(
            store, rows[train], y[train], groups[train], sites=sites, windows=config.windows,
            n_inner=config.n_inner, seed=seed, doc_start=None if doc_start is None else doc_start[train],
            alpha=config.alpha, max_iter=config.max_iter))
    grid_scores = {(s, int(w)): np.empty(len(y)) for s in sites for w in config.windows}
    for window in config.windows:
        for site in sites:
            X = read_rows(store, site, rows, window=int(window), doc_start=doc_start).double().numpy()
            for f, choice in enumerate(choices):
                coef, intercept = choice.refit[(site, int(window))]
                test = outer == f
                grid_scores[(site, int(window))][test] = X[test] @ coef + intercept
    return Procedure(outer, choices, grid_scores)


def _cached_procedure(cache: Any, name: str, store: Any, rows: np.ndarray, y: np.ndarray,
                      groups: np.ndarray, doc_start: np.ndarray | None, sites: list[str],
                      config: NestedConfig, seed: int) -> Procedure:
    """`run_procedure`, kept as one step of `cache` (a StepCache) when given, keyed by the store's
    content, the rows, labels, families, settings and code: a killed run loses one procedure at most."""
    if cache is None:
        return run_procedure(store, rows, y, groups, doc_start, sites, config, seed)
    from memprobe.probes import estimators, features, sweep

    output = f"{'-'.join(name.split())}.npz"
    path = getattr(store, "path", None)
    cache.run(name, [output],
              lambda out: run_procedure(store, rows, y, groups, doc_start, sites, config, seed).save(out),
              inputs={"store": Path(path).resolve() if path is not None else store.identity,
                      "rows": rows, "y": y, "groups": groups, "doc_start": doc_start},
              settings={**asdict(config), "sites": sites, "seed": seed},
              code=[run_procedure, choose_in_fold, Procedure, sweep, estimators, features])
    return Procedure.load(cache.root / output)


def _document_labels(y: np.ndarray, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(unique documents, each document's label, each row's document index); refuses mixed documents."""
    unique, index = np.unique(docs.astype(str), return_inverse=True)
    high, low = np.zeros(len(unique), dtype=int), np.ones(len(unique), dtype=int)
    np.maximum.at(high, index, y)
    np.minimum.at(low, index, y)
    mixed = unique[high != low]
    if len(mixed):
        raise MemprobeError(
            f"documents {mixed[:3].tolist()} hold rows of both labels: the shuffled null permutes "
            "labels among documents, so every document needs one label (split such documents, or "
            "pass a finer `docs`)")
    return unique, high, index


def nested_cross_validate(store: Any, rows: np.ndarray, y: np.ndarray, groups: np.ndarray,
                          docs: np.ndarray, *, doc_start: np.ndarray | None = None,
                          baselines: Mapping[str, np.ndarray] | None = None,
                          config: NestedConfig = NestedConfig(), cache: Any = None) -> NestedCV:
    """Nested grouped CV of probes on `rows` of `store` (an ActivationStore or TensorStore).

    y: 0/1 per row; groups: the fold unit (document families; a family never spans folds);
    docs: each row's document (bootstrap unit, and where labels live for the null: one label per
    document); doc_start: each row's document start in the store (needed for windows > 1);
    baselines: output-only scores per row (higher = more likely positive), reported beside it;
    cache: a memprobe.studies.cache.StepCache keeping each run (the real one, each null) as a step.
    """
    rows, y = np.asarray(rows, dtype=np.int64), np.asarray(y).astype(int)
    groups, docs = np.asarray(groups).astype(str), np.asarray(docs).astype(str)
    if not (len(rows) == len(y) == len(groups) == len(docs)):
        raise MemprobeError(f"rows ({len(rows)}), y ({len(y)}), groups ({len(groups)}) and docs "
                            f"({len(docs)}) must have one entry per example")
    if not np.isin(y, (0, 1)).all():
        raise MemprobeError("y must hold 0/1 labels (1 = positive)")
    if max(config.windows) > 1 and doc_start is None:
        raise MemprobeError("windows > 1 need doc_start (each row's first store row of its "
                            "document, e.g. TokenSet.store_doc_starts) so windows stay in their text")
    sites = list(store.sites if config.sites is None else config.sites)
    unknown = [s for s in sites if s not in store.sites]
    if unknown:
        raise MemprobeError(f"sites {unknown} are not in the store (it holds {list(store.sites)[:6]} ...)")
    baselines = {k: np.asarray(v, dtype=np.float64) for k, v in (baselines or {}).items()}
    for name, v in baselines.items():
        if v.shape != y.shape:
            raise MemprobeError(f"baseline {name!r} has {v.size} scores for {y.size} rows")
    _, doc_label, doc_index = _document_labels(y, docs)

    real = _cached_procedure(cache, "nested run", store, rows, y, groups, doc_start, sites, config,
                             config.seed)
    rng = np.random.default_rng(config.seed)
    null_y, nulls = [], []
    for i in range(config.n_null):
        null_y.append(rng.permutation(doc_label)[doc_index])
        nulls.append(_cached_procedure(cache, f"nested null {i}", store, rows, null_y[-1], groups,
                                       doc_start, sites, config, config.seed + 1 + i))
    return NestedCV(config=config, sites=sites, y=y, docs=docs, groups=groups, baselines=baselines,
                    real=real, nulls=nulls, null_y=np.array(null_y).reshape(len(nulls), len(y)))


def _key(point: GridPoint) -> str:
    return f"{point[0]}|w{point[1]}"


@dataclass(frozen=True)
class NestedCV(Result):
    """The real nested run, its null reruns (labels `null_y[i]` for `nulls[i]`), baselines.

    `nested_scores[i]`: row i scored by the probe its outer training set chose and refitted;
    `grid_scores[(site, window)]`: the same outer folds with that grid point fixed (its max over
    the grid is the optimistic best-of-grid figure).
    """

    config: NestedConfig
    sites: list[str]
    y: np.ndarray
    docs: np.ndarray
    groups: np.ndarray
    baselines: dict[str, np.ndarray]
    real: Procedure
    nulls: list[Procedure]
    null_y: np.ndarray

    @property
    def outer_folds(self) -> np.ndarray:
        return self.real.outer

    @property
    def choices(self) -> list[FoldChoice]:
        return self.real.choices

    @property
    def nested_scores(self) -> np.ndarray:
        return self.real.nested_scores

    @property
    def grid_scores(self) -> dict[GridPoint, np.ndarray]:
        return self.real.grid_scores

    @property
    def grid_auc(self) -> dict[GridPoint, float]:
        return {g: roc_auc(s, self.y) for g, s in self.grid_scores.items()}

    def null_runs(self) -> list[dict[str, Any]]:
        """Per permutation: the nested AUC, the best-of-grid AUC and the choices."""
        return [{"nested_auc": roc_auc(run.nested_scores, y),
                 "best_of_grid_auc": max(roc_auc(v, y) for v in run.grid_scores.values()),
                 "chosen": [[c.site, c.window] for c in run.choices]}
                for run, y in zip(self.nulls, self.null_y, strict=True)]

    def per_fold(self) -> list[dict[str, Any]]:
        out = []
        for f, c in enumerate(self.choices):
            test = self.outer_folds == f
            y = self.y[test]
            out.append({
                "fold": f, "chosen_site": c.site, "chosen_window": c.window,
                "inner_auc_of_chosen": c.inner_auc[(c.site, c.window)], "n_inner_folds": c.n_inner,
                "outer_auc": roc_auc(self.nested_scores[test], y) if 0 < y.sum() < len(y) else None,
                "test_documents": len(set(self.docs[test].tolist())),
                "test_positive_rows": int(y.sum()), "test_negative_rows": int((1 - y).sum()),
                "inner_auc": {_key(g): v for g, v in c.inner_auc.items()}})
        return out

    def to_dict(self) -> dict[str, Any]:
        cfg = self.config
        grid_auc = self.grid_auc
        best = max(grid_auc, key=grid_auc.__getitem__)
        folds = self.per_fold()
        nested = detection(self.nested_scores, self.y, self.docs, n_boot=cfg.n_boot, seed=cfg.seed)
        null_runs = self.null_runs()
        null_aucs = [r["nested_auc"] for r in null_runs]
        chosen: dict[str, int] = {}
        for c in self.choices:
            chosen[_key((c.site, c.window))] = chosen.get(_key((c.site, c.window)), 0) + 1
        pos_docs = set(self.docs[self.y == 1].tolist())
        return {
            "protocol": (f"nested document-grouped CV: {len(self.choices)} outer folds by document "
                         "family; (site, window) chosen by inner grouped CV AUC inside each outer "
                         "training set, refitted there, scored on the outer test documents"),
            "config": asdict(cfg),
            "grid": {"sites": self.sites, "windows": list(cfg.windows), "points": len(grid_auc)},
            "counts": {"rows": int(len(self.y)), "positive_rows": int(self.y.sum()),
                       "negative_rows": int((1 - self.y).sum()), "positive_documents": len(pos_docs),
                       "negative_documents": len(set(self.docs.tolist()) - pos_docs),
                       "families": len(set(self.groups.tolist()))},
            "nested": {**nested,
                       "mean_outer_fold_auc": float(np.mean([f["outer_auc"] for f in folds
                                                             if f["outer_auc"] is not None]))},
            "per_fold": folds,
            "chosen_counts": chosen,
            "best_of_grid_optimistic": {
                "site": best[0], "window": best[1], "roc_auc": grid_auc[best],
                "note": ("NOT held out: the best of the grid's out-of-fold AUCs on the same outer "
                         "folds (the old protocol's figure); the choice saw the test documents"),
                "auc_per_grid_point": {_key(g): v for g, v in grid_auc.items()}},
            "null": {"protocol": ("the whole nested procedure rerun with labels permuted among "
                                  "documents (each keeps its rows); folds rebuilt from them"),
                     "n_permutations": len(null_runs), "nested_auc": null_aucs,
                     "nested_auc_mean": float(np.mean(null_aucs)) if null_aucs else None,
                     "best_of_grid_auc": [r["best_of_grid_auc"] for r in null_runs],
                     "p_value": ((1 + sum(a >= nested["roc_auc"] for a in null_aucs))
                                 / (1 + len(null_aucs))) if null_aucs else None,
                     "chosen": [r["chosen"] for r in null_runs]},
            "baselines": {name: detection(v, self.y, self.docs, n_boot=cfg.n_boot, seed=cfg.seed)
                          for name, v in self.baselines.items()},
        }

    def figure(self, title: str = "") -> Any:
        """Left: ROC of each outer fold and pooled, the null and the baselines. Right: the AUCs."""
        import matplotlib.pyplot as plt

        d = self.to_dict()
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4.2))
        for f in range(len(self.choices)):
            test = self.outer_folds == f
            if 0 < self.y[test].sum() < test.sum():
                fpr, tpr, _ = roc_curve(self.nested_scores[test], self.y[test])
                ax.plot(fpr, tpr, lw=0.7, alpha=0.6, color="C0")
        fpr, tpr, _ = roc_curve(self.nested_scores, self.y)
        ax.plot(fpr, tpr, lw=2, color="C0", label=f"nested, pooled ({d['nested']['roc_auc']:.3f})")
        for i, run in enumerate(self.nulls):
            fpr, tpr, _ = roc_curve(run.nested_scores, self.null_y[i])
            ax.plot(fpr, tpr, ls="--", lw=1, color="0.5", label="shuffled null" if i == 0 else None)
        for j, (name, v) in enumerate(self.baselines.items()):
            fpr, tpr, _ = roc_curve(v, self.y)
            ax.plot(fpr, tpr, ls=":", color=f"C{j + 2}", label=f"{name} ({d['baselines'][name]['roc_auc']:.3f})")
        ax.plot([0, 1], [0, 1], lw=0.5, c="k")
        ax.set(xlabel="false positive rate", ylabel="true positive rate",
               title=title or "outer folds (thin), pooled (thick)")
        ax.legend(fontsize=7, loc="lower right")
        labels = ["nested", "best of grid\n(optimistic)", *self.baselines]
        values = [d["nested"]["roc_auc"], d["best_of_grid_optimistic"]["roc_auc"],
                  *(d["baselines"][n]["roc_auc"] for n in self.baselines)]
        cis = [d["nested"].get("roc_auc_ci95"), None,
               *(d["baselines"][n].get("roc_auc_ci95") for n in self.baselines)]
        for i, (v, ci) in enumerate(zip(values, cis, strict=True)):
            bx.bar(i, v, color="C0" if i == 0 else ("C1" if i == 1 else "0.7"))
            if ci:
                bx.errorbar(i, v, yerr=[[v - ci[0]], [ci[1] - v]], color="k", capsize=3)
        nulls = d["null"]["nested_auc"]
        if nulls:
            bx.scatter(np.zeros(len(nulls)), nulls, marker="x", color="k", zorder=3,
                       label="null, nested")
            bx.scatter(np.ones(len(nulls)), d["null"]["best_of_grid_auc"], marker="x", color="C3",
                       zorder=3, label="null, best of grid")
            bx.legend(fontsize=7)
        bx.axhline(0.5, ls="--", c="0.5", lw=0.8)
        bx.set_xticks(range(len(labels)), labels, fontsize=7, rotation=30, ha="right")
        bx.set(ylim=(0, 1.02), ylabel="ROC-AUC (document-bootstrap 95%)")
        return fig
