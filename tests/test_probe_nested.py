"""Nested cross-validation of probes (memprobe.probes.nested): why it exists (best of a noise grid is
inflated, the nested figure is not), that it finds a real signal, that the choice never reads the
outer test documents, and experiments/probe_nested.py --quick end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from memprobe.errors import MemprobeError
from memprobe.probes import nested
from memprobe.probes.nested import NestedConfig, NestedCV, choose_in_fold, nested_cross_validate
from memprobe.studies.cache import StepCache
from memprobe.studies.probe_sweep import TensorStore

ROOT = Path(__file__).resolve().parents[1]
CONFIG = NestedConfig(n_null=2, n_boot=100, max_iter=100, seed=1)


def synthetic(seed: int, *, informative: str | None = None, n_docs: int = 30, T: int = 20,
              n_noise: int = 24, D: int = 2, poison: np.ndarray | None = None):
    """Documents of T rows, alternately positive/negative. Noise sites: a random offset per document
    (so a site can separate documents by chance) plus noise per row. The informative site shifts
    feature 0 by 0.8 for positives under row noise of sd 1: weak per row, strong averaged over 16."""
    rng = np.random.default_rng(seed)
    y_doc = np.arange(n_docs) % 2
    docs = np.repeat([f"d{i:02d}" for i in range(n_docs)], T)
    y = np.repeat(y_doc, T)
    acts = {}
    for s in range(n_noise):
        x = np.repeat(rng.normal(size=(n_docs, D)), T, axis=0) + rng.normal(size=(n_docs * T, D))
        acts[f"noise{s:02d}"] = x
    if informative:
        x = rng.normal(size=(n_docs * T, D)) + 0.2 * np.repeat(rng.normal(size=(n_docs, D)), T, axis=0)
        x[:, 0] += 0.8 * y
        acts[informative] = x
    if poison is not None:
        for x in acts.values():
            x[poison] = np.nan
    store = TensorStore({k: torch.tensor(v, dtype=torch.float32) for k, v in acts.items()}, docs.tolist())
    position = np.tile(np.arange(T), n_docs)
    rows = np.flatnonzero(position >= 1)  # row 0 of a document predicts nothing
    baseline = 0.2 * y[rows] + np.random.default_rng(seed + 100).normal(size=len(rows))
    return store, rows, y[rows], docs[rows], rows - position[rows], baseline


def run(store, rows, y, docs, starts, baseline) -> NestedCV:
    return nested_cross_validate(store, rows, y, docs, docs, doc_start=starts,
                                 baselines={"output": baseline}, config=CONFIG)


@pytest.fixture(scope="module")
def informative():
    data = synthetic(1, informative="signal")
    return data, run(*data)


def test_best_of_a_noise_grid_is_inflated_and_the_nested_figure_is_not():
    """Six pure-noise data sets (30 documents, 24 sites x 2 windows): the best grid point's
    out-of-fold AUC is far above 0.5 every time; the nested AUC scatters around 0.5 and its
    document-bootstrap interval covers 0.5 (in all but one draw, as a 95% interval may miss)."""
    config = NestedConfig(n_null=0, n_boot=100, max_iter=100, seed=1)
    best, nested_auc, covers = [], [], []
    for seed in range(6):
        store, rows, y, docs, starts, _ = synthetic(seed)
        out = nested_cross_validate(store, rows, y, docs, docs, doc_start=starts, config=config).to_dict()
        assert out["grid"]["points"] == 48 and "NOT held out" in out["best_of_grid_optimistic"]["note"]
        best.append(out["best_of_grid_optimistic"]["roc_auc"])
        nested_auc.append(out["nested"]["roc_auc"])
        lo, hi = out["nested"]["roc_auc_ci95"]
        covers.append(lo < 0.5 < hi)
    assert min(best) > 0.65, best  # the best of 48 noise points, on the documents it was picked on
    assert abs(np.mean(nested_auc) - 0.5) < 0.07, nested_auc
    assert np.mean(best) > np.mean(nested_auc) + 0.15
    assert sum(covers) >= 5, covers


def test_nested_cv_chooses_the_informative_point_in_every_fold(informative):
    (_, _, y, docs, _, baseline), result = informative
    out = result.to_dict()
    assert out["chosen_counts"] == {"signal|w16": 5}
    assert [f["chosen_window"] for f in out["per_fold"]] == [16] * 5
    auc = out["nested"]["roc_auc"]
    assert auc > 0.8 and out["nested"]["roc_auc_ci95"][0] > 0.6
    assert auc > max(out["null"]["nested_auc"]) + 0.25 and out["null"]["p_value"] == 1 / 3
    assert auc > out["baselines"]["output"]["roc_auc"] + 0.2
    # the per-row probe at the same site is weaker than the windowed one (what made the choice)
    grid = out["best_of_grid_optimistic"]["auc_per_grid_point"]
    assert grid["signal|w1"] < grid["signal|w16"] - 0.1
    assert out["counts"]["positive_documents"] == out["counts"]["negative_documents"] == 15
    assert sum(f["test_documents"] for f in out["per_fold"]) == 30


def test_the_choice_never_reads_outer_test_rows(informative, monkeypatch):
    (store, rows, y, docs, starts, baseline), result = informative
    fold0 = result.per_fold()[0]
    test = result.outer_folds == 0
    # 1. a store whose fold-0 test rows are NaN gives fold 0 the very same choice and inner AUCs
    poisoned = synthetic(1, informative="signal", poison=rows[test])[0]
    choice = choose_in_fold(poisoned, rows[~test], y[~test], docs[~test], sites=result.sites,
                            windows=CONFIG.windows, n_inner=CONFIG.n_inner, seed=CONFIG.seed,
                            doc_start=starts[~test], alpha=CONFIG.alpha, max_iter=CONFIG.max_iter)
    assert (choice.site, choice.window) == (fold0["chosen_site"], fold0["chosen_window"])
    got = {f"{s}|w{w}": v for (s, w), v in choice.inner_auc.items()}
    assert np.allclose([got[k] for k in fold0["inner_auc"]], list(fold0["inner_auc"].values()), atol=1e-6)
    # 2. the procedure hands each choice exactly its outer training rows, nothing of the test fold
    seen = []
    real = nested.choose_in_fold
    monkeypatch.setattr(nested, "choose_in_fold", lambda store, r, *a, **k: seen.append(r) or real(store, r, *a, **k))
    again = nested_cross_validate(store, rows, y, docs, docs, doc_start=starts,
                                  config=NestedConfig(n_null=0, n_boot=0, max_iter=100, seed=1))
    assert len(seen) == 5
    for f, r in enumerate(seen):
        assert set(r.tolist()) == set(rows[again.outer_folds != f].tolist())
    assert np.array_equal(again.nested_scores, result.nested_scores)


def test_a_killed_run_resumes_from_its_finished_procedures(informative, tmp_path, monkeypatch):
    (store, rows, y, docs, starts, baseline), result = informative
    cache = StepCache(tmp_path / "cache")
    calls = []
    real = nested.run_procedure

    def dies_in_the_second_null(*args, **kwargs):
        calls.append(args[-1])
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while the second null runs
        return real(*args, **kwargs)

    monkeypatch.setattr(nested, "run_procedure", dies_in_the_second_null)
    with pytest.raises(KeyboardInterrupt):
        nested_cross_validate(store, rows, y, docs, docs, doc_start=starts,
                              baselines={"output": baseline}, config=CONFIG, cache=cache)
    calls.clear()
    resumed = nested_cross_validate(store, rows, y, docs, docs, doc_start=starts,
                                    baselines={"output": baseline}, config=CONFIG, cache=cache)
    assert calls == [CONFIG.seed + 2]  # only the unfinished null ran again
    assert resumed.to_dict() == result.to_dict()  # the same numbers as an uninterrupted run
    assert resumed.plot(tmp_path / "f.png") and (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_input_is_refused(informative):
    (store, rows, y, docs, starts, baseline), result = informative
    mixed = docs.copy()
    mixed[y == 1] = "one"
    mixed[:5] = "one"  # a document holding both labels: the document-level null is undefined
    with pytest.raises(MemprobeError, match="both labels"):
        nested_cross_validate(store, rows, y, docs, mixed, doc_start=starts, config=CONFIG)
    with pytest.raises(MemprobeError, match="doc_start"):
        nested_cross_validate(store, rows, y, docs, docs, config=CONFIG)
    with pytest.raises(MemprobeError, match="not in the store"):
        nested_cross_validate(store, rows, y, docs, docs, doc_start=starts,
                              config=NestedConfig(sites=("nope",)))


def test_experiment_quick_lab_writes_the_readme_keys(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "probe_nested.py"), "--corpus", "lab", "--quick",
         "--cache", str(tmp_path / "cache"), "--out", str(tmp_path), "--figures", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "probe_nested_lab_quick.json").read_text())["results"]
    assert {"nested", "per_fold", "chosen_counts", "best_of_grid_optimistic", "null", "baselines",
            "examples_by_side", "confidence", "definition"} <= set(res)
    assert res["grid"]["points"] == 8 and res["config"]["windows"] == [1, 16]  # tiny-llama: 2 layers x 2 kinds
    lo, hi = res["nested"]["roc_auc_ci95"]
    assert lo <= res["nested"]["roc_auc"] <= hi
    assert len(res["per_fold"]) == 3 and res["null"]["n_permutations"] == 1  # quick: 3 outer folds
    side = res["examples_by_side"]
    assert side["positive"]["documents"] == res["counts"]["positive_documents"] > 5
    assert set(res["baselines"]) == {"target_prob", "neg_entropy", "top_prob"}
    assert (tmp_path / "probe_nested_lab_quick.png").read_bytes()[:4] == b"\x89PNG"
    # a run dir without a finished fine-tune is refused in full mode, with the fix named
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "probe_nested.py"), "--corpus", "lab",
         "--run-dir", str(tmp_path / "empty"), "--cache", str(tmp_path / "c2"), "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "has not finished" in proc.stderr and "lab_smollm2.py" in proc.stderr
