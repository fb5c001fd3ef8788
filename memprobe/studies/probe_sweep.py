"""The probe-sweep study: one memorization probe per site, grouped cross-validation, baselines beside it.

Why a study: the audit's probe step and experiments/probe_layers.py ran the same sweep with their own
code and drifted (result keys, baselines, caches). Both now call `run_probe_sweep` with a
`ProbeSweepConfig`; the audit screens (3 folds, short L-BFGS budget), the experiment runs the full
evaluation, and the numbers come from one implementation.

Method (unchanged from the experiment the README quotes): tokens are memorized vs confident control
tokens (memprobe.memdata; repetition tokens are scored, never trained on); token t is scored from the
activation(s) before it (FEATURE_OFFSET, `window`); folds hold whole document families
(`group_folds`); each site gets a class-balanced L2 logistic probe per fold plus a shuffled-label
probe (the chance control); AUCs carry document-bootstrap intervals.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memprobe.errors import MemprobeError
from memprobe.memdata import REPETITION, TokenSet, group_folds
from memprobe.probes.artefact import DEFAULT_WINDOW, FEATURE_OFFSET
from memprobe.probes.evaluate import CrossValidation, detection
from memprobe.probes.features import read_rows
from memprobe.probes.sweep import ProbeSweep
from memprobe.studies.cache import StepCache
from memprobe.studies.result import Result


@dataclass(frozen=True)
class ProbeSweepConfig:
    """Settings of a probe sweep (all part of a cached sweep's key)."""

    sites: tuple[str, ...] | None = None  # None: every site of the store
    window: int = DEFAULT_WINDOW  # positions averaged per feature (1: Slonski's per-token probe)
    n_folds: int = 5  # at most; fewer when fewer document families hold memorized tokens
    seed: int = 0
    alpha: float = 1e-2
    max_iter: int = 150
    tol: float = 1e-6  # largest gradient entry at which a fit stops (scikit-learn's default is 1e-4)
    n_shuffled: int = 1
    n_boot: int = 200  # document-bootstrap draws per interval (0: none)
    top_neurons: int = 20
    top_neurons_at: str = "best"  # "best" site, or "best_mlp" (the best mlp.hook_post site)

    def sweep(self, progress: bool = True) -> ProbeSweep:
        return ProbeSweep(
            alpha=self.alpha, max_iter=self.max_iter, tol=self.tol, progress=progress, window=self.window
        )


class TensorStore:
    """Activations already in memory, read like an ActivationStore: {site: (rows, d)} plus each row's
    document (`doc_ids`, one entry per row, documents contiguous) so TokenSet rows resolve."""

    def __init__(self, activations: Mapping[str, torch.Tensor], doc_ids: Sequence[str]) -> None:
        self.activations = {s: torch.as_tensor(v) for s, v in activations.items()}
        self.sites = list(self.activations)
        self.widths = {s: int(v.shape[1]) for s, v in self.activations.items()}
        self._starts: dict[str, range] = {}
        ids = list(doc_ids)
        for i, doc in enumerate(ids):
            if doc not in self._starts:
                end = i
                while end < len(ids) and ids[end] == doc:
                    end += 1
                self._starts[doc] = range(i, end)
        self.identity = hashlib.sha256(
            b"".join(s.encode() + v.float().numpy().tobytes() for s, v in self.activations.items())
            + "\n".join(ids).encode()
        ).hexdigest()

    def __len__(self) -> int:
        return len(next(iter(self.activations.values())))

    def read(self, site: str, lo: int, hi: int) -> torch.Tensor:
        return self.activations[site][lo:hi]

    def doc_rows(self, doc: str) -> range:
        return self._starts[doc]


def _store_input(store: Any) -> Any:
    """What identifies a store in a cache key: its directory's content, or the tensors' digest."""
    return (
        Path(store.path).resolve() if getattr(store, "path", None) is not None else store.identity
    )


def cached_cross_validation(
    cache: StepCache | None,
    name: str,
    sweep: ProbeSweep,
    store: Any,
    rows: np.ndarray,
    y: np.ndarray,
    folds: np.ndarray,
    **kwargs: Any,
) -> CrossValidation:
    """`sweep.cross_validate`, kept in `cache` (when given) under a key of the store's content, the
    rows, labels, split and every setting, and the sweep's code: a rerun with the same inputs skips it."""
    if cache is None:
        return sweep.cross_validate(store, rows, y, folds, **kwargs)
    from memprobe.probes import estimators
    from memprobe.probes import sweep as sweep_module

    trainable = kwargs.get("trainable")
    inputs = {
        "store": _store_input(store),
        "rows": rows,
        "y": y,
        "folds": folds,
        "trainable": None if trainable is None else np.asarray(trainable, dtype=bool),
        "doc_start": kwargs.get("doc_start"),
    }
    settings = {
        "alpha": sweep.alpha,
        "max_iter": sweep.max_iter,
        "tol": sweep.tol,
        "window": sweep.window,
        **{k: v for k, v in kwargs.items() if k not in ("trainable", "doc_start")},
    }
    output = f"{'-'.join(name.split())}.npz"
    cache.run(
        name,
        [output],
        lambda path: sweep.cross_validate(store, rows, y, folds, **kwargs).save_arrays(path),
        inputs=inputs,
        settings=settings,
        code=[sweep_module, estimators, cached_cross_validation],
    )
    return CrossValidation.load_arrays(cache.root / output)


@dataclass
class ProbeSweepResult(Result):
    """Per-site probe AUCs beside output-only baselines; arrays for further analysis stay attached."""

    config: ProbeSweepConfig
    status: str  # "ok" | "skipped"
    reason: str = ""
    best_site: str | None = None
    per_site: dict[str, dict[str, Any]] = field(default_factory=dict)
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)
    top_neurons: list[dict[str, Any]] = field(default_factory=list)
    token_counts: dict[str, Any] = field(default_factory=dict)
    n_folds: int = 0
    # not part of to_dict: what the experiments analyse further
    cv: CrossValidation | None = None
    final_probe: Any = None  # the LogisticProbe at the top-neuron site, trained on every main token
    tokens: TokenSet | None = None
    main: np.ndarray | None = None  # memorized vs control tokens (no repetition)
    rows: np.ndarray | None = None
    doc_start: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.status != "ok":
            return {"status": self.status, "reason": self.reason}
        return {
            "status": "ok",
            "best_site": self.best_site,
            "per_site": self.per_site,
            "baselines": self.baselines,
            "top_neurons": self.top_neurons,
            "token_counts": self.token_counts,
            "window": self.config.window,
            "n_folds": self.n_folds,
            "split": f"{self.n_folds}-fold cross-validation grouped by document family",
            "config": asdict(self.config),
        }

    def figure(self, title: str = "") -> Any:
        """Probe AUC per site kind (rows) and layer (columns)."""
        from memprobe.plots import heatmap
        from memprobe.sites import layer_of, site_kind

        if self.status != "ok":
            raise MemprobeError(
                f"the probe sweep was skipped ({self.reason}): there is nothing to plot"
            )
        auc = {s: v["probe"]["roc_auc"] for s, v in self.per_site.items()}
        kinds = list(dict.fromkeys(site_kind(s) for s in auc))
        n_layers = max(layer_of(s) for s in auc) + 1
        grid = np.full((len(kinds), n_layers), np.nan)
        for s, v in auc.items():
            grid[kinds.index(site_kind(s)), layer_of(s)] = v
        fig = heatmap(
            grid,
            row_labels=kinds,
            col_labels=[str(i) for i in range(n_layers)],
            vmin=0.5,
            vmax=1.0,
            title=title
            or "probe ROC-AUC, memorized vs confident control tokens (held-out documents)",
            cbar_label="ROC-AUC",
        )
        fig.axes[0].set_xlabel("layer")
        return fig


def run_probe_sweep(
    store: Any,
    tokens: TokenSet,
    config: ProbeSweepConfig,
    *,
    cache: StepCache | None = None,
    progress: bool = True,
) -> ProbeSweepResult:
    """Cross-validate a probe at every site of `store` (an ActivationStore, or a TensorStore) on `tokens`.

    `tokens` carries the labels (memorized = 1), the document families folds are grouped by, and the
    output-only baselines. Too few families of either class to test on unseen documents gives a
    "skipped" result (with the reason), not an error. `cache`: keep the cross-validation there.
    """
    main = tokens.category != REPETITION
    y = tokens.label
    positives = sorted(set(tokens.group[main & (y == 1)].tolist()))
    negatives = sorted(set(tokens.group[main & (y == 0)].tolist()))
    if len(positives) < 2 or len(negatives) < 2:
        return ProbeSweepResult(
            config,
            "skipped",
            reason=(
                f"{len(positives)} memorized and {len(negatives)} control document families: probes need at least 2 "
                "of each to be trained and tested on different documents"
            ),
        )
    rows, starts = tokens.store_rows(store, FEATURE_OFFSET), tokens.store_doc_starts(store)
    folds = group_folds(
        tokens.group, y, n_folds=min(config.n_folds, len(positives)), seed=config.seed
    )
    sweep = config.sweep(progress)
    cv = cached_cross_validation(
        cache,
        "probe sweep",
        sweep,
        store,
        rows,
        y,
        folds,
        sites=None if config.sites is None else list(config.sites),
        n_shuffled=config.n_shuffled,
        seed=config.seed,
        trainable=main,
        doc_start=starts,
    )
    per_site = {}
    for s in (s for s in store.sites if s in cv.oof):
        shuffled = detection(cv.shuffled[s][main], y[main], tokens.doc_id[main], n_boot=0)
        per_site[s] = {
            "probe": detection(
                cv.oof[s][main],
                y[main],
                tokens.doc_id[main],
                n_boot=config.n_boot,
                seed=config.seed,
            ),
            "shuffled_labels_auc": shuffled["roc_auc"],
            "shuffled_labels_tpr_at_fpr_0.01": shuffled["tpr_at_fpr_0.01"],
        }
    best = max(per_site, key=lambda s: per_site[s]["probe"]["roc_auc"])
    baselines = {
        name: detection(
            v[main], y[main], tokens.doc_id[main], n_boot=config.n_boot, seed=config.seed
        )
        for name, v in tokens.baselines().items()
    }
    result = ProbeSweepResult(
        config,
        "ok",
        best_site=best,
        per_site=per_site,
        baselines=baselines,
        token_counts=tokens.counts(),
        n_folds=cv.n_folds,
        cv=cv,
        tokens=tokens,
        main=main,
        rows=rows,
        doc_start=starts,
    )
    at = best
    if config.top_neurons_at == "best_mlp":
        mlp = [s for s in per_site if s.endswith("mlp.hook_post")]
        at = max(mlp, key=lambda s: per_site[s]["probe"]["roc_auc"]) if mlp else None
    if at is not None and config.top_neurons:
        probe = sweep.fit(store, rows[main], y[main], sites=[at], doc_start=starts[main])[at]
        X = read_rows(store, at, rows[main], window=config.window, doc_start=starts[main]).numpy()
        ym = y[main]
        result.final_probe = probe
        result.top_neurons = [
            {
                "neuron": f"{at}[{int(i)}]",
                "index": int(i),
                "weight": float(probe.standardized_coef_[i]),
                "mean_memorized": float(X[ym == 1, i].mean()),
                "mean_control": float(X[ym == 0, i].mean()),
            }
            for i in np.argsort(-np.abs(probe.standardized_coef_))[: config.top_neurons]
        ]
    return result
