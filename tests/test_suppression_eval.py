"""The suppression study's evaluation: strength chosen on validation, reported on test, every control
kind counted beside the easy subset, document-bootstrap intervals (memprobe.studies.suppression)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from memorize import CONTROLS, memorize
from memorize import MEMORIZED as SHARED_MEMORIZED

from memprobe.errors import MemprobeError
from memprobe.studies.suppression import (
    CORRECT,
    LOSS,
    MEM,
    TOKENS,
    SuppressionConfig,
    choose_strength,
    document_rows,
    edit_tables,
    label_records,
    measure_split,
    paired_interval,
    ppl_change_of,
    run_suppression,
    split_validation_test,
    suppression_of,
    top1_change_of,
)

MEMORIZED = [
    *SHARED_MEMORIZED,
    "Old lanterns hang from hooks above the harbour where the boats sleep.",
    "Every winter the baker gives the first loaf to the lighthouse keeper.",
]
# Predictable text the model was trained on too, filed as controls: the "hard" controls an easy
# subset (base memorized fraction <= 0.25) drops.
FORMULAIC = [
    "for i in range(10): print(i) for i in range(10): print(i) for i in range(10): print(i)",
    "Dear Sir or Madam, thank you for your letter. Yours faithfully, the office. Dear Sir or Madam,",
    "one two three four five six seven eight nine ten one two three four five six seven eight nine",
    "import os import sys import json import time import math import random import re import io",
]
FRESH = CONTROLS
CONFIG = SuppressionConfig(seed=0, strengths=(0.5, 1.0, 2.0), n_boot=200)


@pytest.fixture(scope="module")
def labelled():
    """tiny-llama trained on MEMORIZED and FORMULAIC (never on FRESH), and its labelled records."""
    from memprobe.models import load_model

    torch.manual_seed(0)
    loaded = load_model("tiny-llama")
    memorize(loaded, MEMORIZED + FORMULAIC, 150)
    docs = [{"id": f"mem-{i}", "text": t, "kind": "trained", "role": "candidate"} for i, t in enumerate(MEMORIZED)]
    docs += [{"id": f"form-{i}", "text": t, "kind": "formulaic", "role": "control"} for i, t in enumerate(FORMULAIC)]
    docs += [{"id": f"fresh-{i}", "text": t, "kind": "novel", "role": "control"} for i, t in enumerate(FRESH)]
    return loaded, label_records(loaded, docs, CONFIG.max_tokens)


def _parts(records):
    from memprobe.intervene.suppress import split_memorized

    return split_memorized(records, seed=0, control_max=1.0)


def _run(model, parts, config=CONFIG):
    return run_suppression(model, parts["build_memorized"], parts["build_control"],
                           parts["heldout_memorized"], parts["heldout_control"], config)


def test_hard_controls_are_in_the_reported_utility(labelled):
    loaded, records = labelled
    fractions = {r["id"]: r["memorized_fraction"] for r in records}
    assert min(fractions[f"mem-{i}"] for i in range(len(MEMORIZED))) > 0.5  # it memorized them
    assert min(fractions[f"form-{i}"] for i in range(len(FORMULAIC))) > 0.25  # hard: not "easy"
    result = _run(loaded.model, _parts(records))
    chosen = result.chosen
    test_controls = split_validation_test(_parts(records)["heldout_control"], CONFIG.validation_share, 0)[1]
    kinds = {r["kind"] for r in test_controls}
    assert kinds == {"formulaic", "novel"}  # stratified: both kinds reach the test split
    assert set(chosen["controls"]["by_kind"]) == kinds
    ctrl = chosen["controls"]
    assert ctrl["all"]["documents"] == len(test_controls) > ctrl["easy"]["documents"]
    assert ctrl["all"]["tokens"] == sum(b["tokens"] for b in ctrl["by_kind"].values())
    # the headline cost is the ALL-controls one, not the easy subset's
    assert chosen["ppl_change"] == ctrl["all"]["ppl_change"] != ctrl["easy"]["ppl_change"]
    assert chosen["suppression"] > chosen["random_baseline"]["suppression"]
    out = result.to_dict()
    assert out["curve"][0]["controls"]["by_kind"].keys() == kinds
    assert out["split_sizes"]["test_memorized"] and out["split_sizes"]["validation_memorized"]


def test_chosen_strength_depends_only_on_validation(labelled):
    loaded, records = labelled
    parts = _parts(records)
    first = _run(loaded.model, parts)
    val_mem, test_mem = split_validation_test(parts["heldout_memorized"], CONFIG.validation_share, 0)
    test_ctrl = split_validation_test(parts["heldout_control"], CONFIG.validation_share, 0)[1]
    assert set(first.test_ids) == {r["id"] for r in test_mem}
    # Other test texts (ids, kinds and groups kept, so the split is the same): every memorized one
    # replaced by the last, every control by a fresh sentence, which the edit barely touches.
    fresh = next(r["token_ids"] for r in test_ctrl if r["kind"] == "novel")
    new_ids = {r["id"]: (test_mem[-1]["token_ids"], test_mem[-1]["memorized"]) for r in test_mem}
    new_ids |= {r["id"]: (fresh, [False] * len(fresh)) for r in test_ctrl}
    other = {k: [{**r, **dict(zip(("token_ids", "memorized"), new_ids[r["id"]], strict=True))}
                 if r["id"] in new_ids else r for r in v] for k, v in parts.items()}
    second = _run(loaded.model, other)
    assert second.test["curve"] != first.test["curve"]  # the test numbers moved...
    # ...enough that the rule applied to test numbers would now pick another strength...
    on_test = [choose_strength(r.test["curve"], CONFIG.ppl_budget)["strength"] for r in (first, second)]
    assert on_test[0] != on_test[1]
    assert second.validation == first.validation  # ...but the validation numbers, and the choice, hold
    assert second.chosen["strength"] == first.chosen["strength"]
    assert second.chosen["validation"] == first.chosen["validation"]
    # and the rule reads validation: a validation curve whose cost rises picks a milder strength
    rows = [{"strength": s, "suppression": s, "ppl_change": 0.02 * s} for s in (0.5, 1.0, 2.0)]
    assert choose_strength(rows, 0.05) == {"strength": 2.0, "within_budget": True}
    assert choose_strength(rows, 0.03) == {"strength": 1.0, "within_budget": True}
    assert choose_strength(rows, 0.001) == {"strength": 0.5, "within_budget": False}


def test_split_keeps_groups_whole_and_kinds_in_both():
    records = [{"id": f"{k}{g}-{p}", "kind": k, "split_group": f"{k}{g}"}
               for k in ("code", "novel", "formulaic") for g in range(4) for p in range(2)]
    records.append({"id": "solo", "kind": "model-sample", "split_group": "solo"})
    val, test = split_validation_test(records, 0.5, seed=3)
    assert {r["split_group"] for r in val}.isdisjoint({r["split_group"] for r in test})
    assert len(val) + len(test) == len(records)
    for kind in ("code", "novel", "formulaic"):
        assert {r["kind"] for r in val} >= {kind} and {r["kind"] for r in test} >= {kind}
    assert split_validation_test(records, 0.5, seed=3) == (val, test)
    with pytest.raises(MemprobeError, match="validation_share"):
        split_validation_test(records, 1.0, seed=0)


def _rows(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    tokens = rng.integers(20, 60, n).astype(float)
    base = np.zeros((n, 4))
    base[:, TOKENS] = tokens
    base[:, MEM] = np.round(tokens * rng.uniform(0.3, 0.9, n))
    base[:, LOSS] = tokens * rng.uniform(1.0, 4.0, n)
    edited = base.copy()
    edited[:, MEM] = np.round(base[:, MEM] * rng.uniform(0.0, 0.8, n))
    edited[:, LOSS] = base[:, LOSS] * rng.uniform(0.95, 1.15, n)
    return base, edited


@pytest.mark.parametrize("statistic", [suppression_of, ppl_change_of])
def test_intervals_contain_the_estimate_and_shrink_with_more_documents(statistic):
    rng = np.random.default_rng(0)
    widths = []
    for n in (12, 192):
        base, edited = _rows(n, rng)
        lo, hi = paired_interval(statistic, base, edited, n_boot=400, seed=0)
        assert lo < statistic(base, edited) < hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2  # 16x the documents: about a quarter of the width


@pytest.mark.parametrize("statistic", [suppression_of, ppl_change_of, top1_change_of])
def test_vectorised_interval_equals_the_per_draw_bootstrap(statistic):
    from memprobe.defend.evaluate import doc_bootstrap

    base, edited = _rows(23, np.random.default_rng(5))
    edited[:, CORRECT] = np.round(base[:, TOKENS] * 0.4)
    slow = doc_bootstrap(list(range(23)), lambda idx: statistic(base[idx], edited[idx]), n_boot=300, seed=2)
    assert paired_interval(statistic, base, edited, n_boot=300, seed=2) == pytest.approx(slow, abs=1e-12)


def test_measure_split_intervals_per_kind():
    rng = np.random.default_rng(1)
    mem_base, mem_edit = _rows(10, rng)
    ctrl_base, ctrl_edit = _rows(9, rng)
    kinds = ["code"] * 3 + ["novel"] * 6
    easy = np.array([False] * 3 + [True] * 6)
    out = measure_split({"memorized": mem_base, "control": ctrl_base},
                        {"memorized": mem_edit, "control": ctrl_edit}, kinds, easy, n_boot=100, seed=0)
    assert out["suppression"] == suppression_of(mem_base, mem_edit)
    assert out["suppression_ci95"][0] < out["suppression"] < out["suppression_ci95"][1]
    assert out["ppl_change"] == ppl_change_of(ctrl_base, ctrl_edit)
    assert out["controls"]["easy"]["ppl_change"] == ppl_change_of(ctrl_base[easy], ctrl_edit[easy])
    assert out["controls"]["by_kind"]["code"]["documents"] == 3
    lo, hi = out["controls"]["by_kind"]["novel"]["top1_change_ci95"]
    assert lo <= out["controls"]["by_kind"]["novel"]["top1_change"] <= hi


def test_too_few_heldout_groups_is_refused(labelled):
    loaded, records = labelled
    parts = _parts(records)
    one = parts["heldout_memorized"][:1]
    with pytest.raises(MemprobeError, match="one for validation and one for test"):
        run_suppression(loaded.model, parts["build_memorized"], parts["build_control"], one,
                        parts["heldout_control"], dataclasses.replace(CONFIG, n_boot=0))


def test_edit_tables_replaying_the_lower_layers_equal_a_full_labelling_per_edit(labelled):
    """The evaluation's shortcut (layers below the edit run once per batch) gives the rows of a full
    `token_labels` pass under each edit: memorized, correct and token counts exactly, losses to 1e-4."""
    from memprobe.intervene.ablation import LowRankEdit
    from memprobe.intervene.weight_edit import random_low_rank_like

    loaded, records = labelled
    ids = [r["token_ids"] for r in records]
    n_layers = loaded.model.config.num_hidden_layers
    d_model, d_mlp = loaded.model.config.hidden_size, loaded.model.config.intermediate_size
    g = torch.Generator().manual_seed(1)
    upper = LowRankEdit({n_layers - 1: (torch.randn(2, d_mlp, generator=g), torch.randn(d_model, 2, generator=g))})
    edits = [upper.with_strength(0.5), random_low_rank_like(upper, seed=3).with_strength(4.0)]
    tables = edit_tables(loaded.model, ids, edits, batch_size=3)
    full = [document_rows(loaded.model, ids, None), *(document_rows(loaded.model, ids, e) for e in edits)]
    for fast, slow in zip(tables, full, strict=True):
        np.testing.assert_array_equal(fast[:, [MEM, 2, TOKENS]], slow[:, [MEM, 2, TOKENS]])
        np.testing.assert_allclose(fast[:, LOSS], slow[:, LOSS], rtol=1e-4, atol=1e-4)
    assert not np.array_equal(tables[0][:, LOSS], tables[2][:, LOSS])  # the edits did change something
