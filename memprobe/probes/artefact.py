"""A trained probe as a small artefact (probe.safetensors + probe.json), and scoring texts with it.

Why this shape (as SAELens ships SAEs): the weights are one safetensors file anyone can load, and
the JSON says everything needed to use them correctly: the model and its file hash, the site, which
position's activation scores a token, and how the probe was trained.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from memprobe.errors import MemprobeError
from memprobe.io import atomic_path, atomic_write
from memprobe.probes.estimators import LogisticProbe

WEIGHTS, CONFIG, DIRECTIONS = "probe.safetensors", "probe.json", "directions.safetensors"
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "data" / "probes"
FEATURE_OFFSET = -1  # token t is scored from the activation at t-1, the state that predicts it
DEFAULT_WINDOW = 16  # positions averaged per feature (memprobe.probes.features); chosen on smollm2, see README


def default_probe_dir(model_name: str) -> Path:
    """Where the shipped default probe of a named model lives."""
    return DEFAULT_DIR / model_name


def save_probe(out_dir: str | Path, probe: LogisticProbe, *, site: str, model_info: dict[str, Any],
               training: dict[str, Any], window: int = 1) -> Path:
    """Write the probe's direction and offset (plus standardisation) and a JSON description."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {"coef": torch.as_tensor(np.asarray(probe.coef_[0], dtype=np.float32)),
               "intercept": torch.as_tensor(np.asarray(probe.intercept_, dtype=np.float32)),
               "standardized_coef": torch.as_tensor(np.asarray(probe.standardized_coef_, dtype=np.float32))}
    with atomic_path(out / WEIGHTS) as tmp:
        save_file(tensors, tmp, metadata={"format": "memprobe-probe"})
    feature = "activation[t-1]" if window == 1 else f"mean(activation[max(0, t-{window}) .. t-1])"
    config = {"format": "memprobe-probe", "version": 1, "site": site, "feature_offset": FEATURE_OFFSET,
              "window": window, "model": model_info,
              "estimator": {"class": type(probe).__name__, **probe.get_params()},
              "score": f"sigmoid({feature} @ coef + intercept): probability that token t is memorized",
              "training": training}
    atomic_write(out / CONFIG, json.dumps(config, indent=2) + "\n")
    return out


def save_directions(out_dir: str | Path, directions: dict[str, np.ndarray]) -> Path:
    """Probe directions (raw-space coefficients) of several sites beside a probe, e.g. every layer's
    residual stream, for interventions that steer or ablate along them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / DIRECTIONS) as tmp:
        save_file({site: torch.as_tensor(np.asarray(v, dtype=np.float32)) for site, v in directions.items()},
                  tmp, metadata={"format": "memprobe-probe-directions"})
    return out / DIRECTIONS


def memorization_direction(loaded: Any, layer: int, probe_dir: str | Path | None = None) -> torch.Tensor:
    """The probe direction in the residual stream after block `layer` (blocks.{layer}.hook_resid_post):
    a unit vector pointing toward "memorized", from the model's shipped probe directions."""
    path = Path(probe_dir or default_probe_dir(loaded.name)) / DIRECTIONS
    if not path.is_file():
        raise MemprobeError(f"no probe directions at {path}: build them with `memprobe probe train --model "
                            f"{loaded.name} --site auto --directions --out DIR`")
    directions = load_file(path)
    site = f"blocks.{layer}.hook_resid_post"
    if site not in directions:
        raise MemprobeError(f"no probe direction for {site} in {path}; it has {len(directions)} sites, e.g. "
                            f"{', '.join(sorted(directions)[:3])}")
    v = directions[site].float()
    return v / v.norm().clamp_min(1e-12)


def load_probe(path: str | Path) -> tuple[LogisticProbe, dict[str, Any]]:
    """The probe and its JSON description from a directory written by save_probe."""
    path = Path(path)
    if not (path / WEIGHTS).is_file() or not (path / CONFIG).is_file():
        raise MemprobeError(f"no probe at {path}: expected {WEIGHTS} and {CONFIG}; train one with "
                            "`memprobe probe train --model M --out DIR`")
    config = json.loads((path / CONFIG).read_text())
    config.setdefault("window", 1)  # probes written before windows existed read one position
    tensors = load_file(path / WEIGHTS)
    probe = LogisticProbe(**{k: v for k, v in config["estimator"].items() if k != "class"})
    probe.classes_ = np.array([0, 1])
    probe.coef_ = tensors["coef"].numpy()[None]
    probe.intercept_ = tensors["intercept"].numpy()
    probe.standardized_coef_ = tensors["standardized_coef"].numpy()
    probe.n_features_in_ = probe.coef_.shape[1]
    return probe, config


AUTO_SITES = "blocks.*.hook_resid_post"  # what `site="auto"` chooses among


def probe_tokens(records: Sequence[dict[str, Any]], *, min_doc_fraction: float = 0.5) -> Any:
    """The tokens a probe trains on, from `memprobe.labels.label_documents` records: memorized vs
    confident control tokens (memprobe.memdata.build_token_set), repetition documents left out."""
    from memprobe.memdata import REPETITION, build_token_set

    tokens = build_token_set(records, min_doc_fraction=min_doc_fraction)
    tokens = tokens.subset(tokens.category != REPETITION)
    if len(set(tokens.label.tolist())) < 2:
        raise MemprobeError("training needs memorized tokens and confident control tokens; found "
                            f"{tokens.counts()}: add candidate texts the model memorized and control texts")
    return tokens


def probe_capture_sites(site: str, *, candidates: str = AUTO_SITES, directions: bool = False) -> str:
    """The sites a capture for `train_probe` must hold (comma-separated)."""
    wanted = (candidates if site == "auto" else site).split(",") + ([AUTO_SITES] if directions else [])
    return ",".join(dict.fromkeys(wanted))


def train_probe(store: Any, tokens: Any, *, site: str, alpha: float = 1e-2, window: int = DEFAULT_WINDOW,
                candidates: str = AUTO_SITES, n_folds: int = 5, seed: int = 0, directions: bool = False,
                progress: bool = False) -> tuple[LogisticProbe, dict[str, Any]]:
    """Fit a probe at `site` on labelled tokens (`probe_tokens`) read from a capture `store` of their
    documents (sites from `probe_capture_sites`; `memprobe probe train` does the labelling and capture).

    site="auto": the site among `candidates` with the best grouped cross-validated AUC (n_folds folds by
    document family, INSIDE these documents: nothing else is looked at); the training record reports
    that inner CV AUC, which is optimistic for the chosen site (a selection on the same folds).
    directions: also fit a per-position probe at every residual-stream site (window 1; steering acts
    on one position) and return their directions under `training["directions"]` (popped by callers
    that save them with save_directions). Returns the probe and a description of its training data.
    """
    from memprobe.probes.features import read_rows

    missing = set(tokens.doc_id.tolist()) - {d["id"] for d in store.documents}
    if missing:
        raise MemprobeError(f"{len(missing)} labelled documents are not in the store (e.g. {sorted(missing)[0]!r}): "
                            "capture every document the tokens come from")
    training: dict[str, Any] = {}
    if site == "auto":
        site, training["site_selection"] = select_site(store, tokens, candidates, window=window, alpha=alpha,
                                                        n_folds=n_folds, seed=seed, progress=progress)
    rows, starts = tokens.store_rows(store, FEATURE_OFFSET), tokens.store_doc_starts(store)
    X = read_rows(store, site, rows, window=window, doc_start=starts).numpy().astype(np.float64)
    if directions:
        from memprobe.probes.sweep import ProbeSweep

        resid = [s for s in store.sites if s.endswith("hook_resid_post")]
        fitted = ProbeSweep(alpha=alpha, max_iter=150, progress=progress).fit(store, rows, tokens.label, sites=resid)
        training["directions"] = {s: p.coef_[0] for s, p in fitted.items()}
    probe = LogisticProbe(alpha=alpha, class_weight="balanced").fit(X, tokens.label)
    training.update({"site": site, "documents": len(set(tokens.doc_id.tolist())), "tokens": tokens.counts(),
                     "window": window, "capture_dtype": store.dtype})
    return probe, training


def select_site(store: Any, tokens: Any, candidates: str = AUTO_SITES, *, window: int = DEFAULT_WINDOW,
                alpha: float = 1e-2, n_folds: int = 5, seed: int = 0, progress: bool = False,
                ) -> tuple[str, dict[str, Any]]:
    """The site of `store` matching `candidates` (globs, comma-separated) with the best grouped-CV AUC
    on `tokens` (memprobe.studies.probe_sweep), and how it was chosen (with that inner CV AUC)."""
    from memprobe.studies.probe_sweep import ProbeSweepConfig, run_probe_sweep

    patterns = candidates.split(",")
    sites = tuple(s for s in store.sites if any(fnmatch.fnmatch(s, p) for p in patterns))
    config = ProbeSweepConfig(sites=sites, window=window, n_folds=n_folds, seed=seed, alpha=alpha, n_boot=0,
                              top_neurons=0)
    result = run_probe_sweep(store, tokens, config, progress=progress)
    if result.status != "ok":
        raise MemprobeError(f"--site auto cannot choose a site: {result.reason}; pass --site or more documents")
    auc = {s: v["probe"]["roc_auc"] for s, v in result.per_site.items()}
    return result.best_site, {"method": f"best of {len(auc)} sites by {result.n_folds}-fold CV grouped by "
                              "document family, inside the training data", "candidates": candidates,
                              "cv_auc_inner": auc[result.best_site], "auc_per_site": auc}


@torch.inference_mode()
def score_documents(loaded: Any, docs: Sequence[dict[str, Any]], probe: LogisticProbe, config: dict[str, Any],
                    *, batch_tokens: int = 2048) -> list[dict[str, Any]]:
    """Per-token memorization probabilities: {"id", "token_ids", "scores"} with scores[0] None."""
    from memprobe.backends import make_backend
    from memprobe.capture import batches, pad_batch, pad_id, tokenize_documents
    from memprobe.probes.features import window_mean

    expected = config["model"].get("name")
    if expected != loaded.info.get("name"):
        raise MemprobeError(f"this probe was trained on {expected}, not {loaded.info.get('name')}: pass "
                            f"--model {expected} or a probe trained on this model")
    if config.get("feature_offset") != FEATURE_OFFSET:
        raise MemprobeError(f"unsupported probe feature_offset {config.get('feature_offset')}")
    site = config["site"]
    runner = make_backend("hooks", loaded)
    tokenized = tokenize_documents(loaded, docs)
    coef = torch.as_tensor(probe.coef_[0], dtype=torch.float32)
    intercept = float(probe.intercept_[0])
    out: list[dict[str, Any] | None] = [None] * len(tokenized)
    lengths = [len(d.token_ids) for d in tokenized]
    for group in batches(lengths, range(len(tokenized)), batch_tokens):
        ids, mask = pad_batch([tokenized[i].token_ids for i in group], pad_id(loaded))
        acts = runner.run(ids.to(loaded.device), mask.to(loaded.device), [site])[site].float().cpu()
        acts = window_mean(acts, int(config.get("window", 1)))
        probs = torch.sigmoid(acts @ coef + intercept)
        for row, i in enumerate(group):
            n = lengths[i]
            scores = [None] + [round(float(p), 6) for p in probs[row, : n - 1]]
            out[i] = {"id": tokenized[i].id, "token_ids": tokenized[i].token_ids, "scores": scores}
    return out  # type: ignore[return-value]
