"""experiments/lab_smollm2.py --quick end to end on tiny-llama and the tiny lab: the fine-tuned model's
members separate from non-members, memorized canaries are exposed beyond the base model's, every stage
writes its result, and a re-run resumes every step (same results, no model work)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "lab_smollm2.py"

pytestmark = pytest.mark.slow


def _run(tmp: Path, *extra: str) -> dict:
    subprocess.run([sys.executable, str(SCRIPT), "--quick", "--run-dir", str(tmp / "run"), "--out", str(tmp),
                    "--figures", str(tmp), *extra], check=True, cwd=ROOT, timeout=900)
    return json.loads((tmp / "lab_smollm2_quick.json").read_text())


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("lab_experiment")
    return tmp, _run(tmp)


def test_every_stage_finishes_and_members_separate(quick):
    tmp, out = quick
    res = out["results"]
    assert res["complete"] is True
    assert res["stages_done"][-1] == "all"
    assert {"start", "end"} <= set(res["machine_load"])
    mia = res["mia"]["overall"]["attacks"]
    assert set(mia) == {"loss", "zlib", "min_k", "min_k_plus_plus", "ref"}
    # a tiny model trained 30 epochs on the members: the loss and reference attacks separate them
    # (0.79 overall measured, with 8 epochs only 0.60-0.68), canaries and mails within their kind fully
    assert mia["loss"]["roc_auc"] > 0.7 and mia["ref"]["roc_auc"] > 0.7
    assert res["mia"]["canary"]["attacks"]["loss"]["roc_auc"] > 0.9
    lo, hi = mia["loss"]["roc_auc_ci95"]
    assert lo <= mia["loss"]["roc_auc"] <= hi
    assert mia["loss"]["tpr_at_fpr_0.001"] is None and "not measurable" in mia["loss"]["tpr_at_fpr_0.001_reason"]
    assert set(res["mia"]["canary"]["attacks"]["loss"]["by_copies"]) == {"1", "2", "4"}
    for name in ("lab_smollm2_quick_roc.png", "lab_smollm2_quick_roc_loglog.png"):
        assert (tmp / name).read_bytes()[:4] == b"\x89PNG"
    # the fine-tuned weights are recorded by hash, the checkpoint too
    shas = res["finetune"]["model_safetensors_sha256"]
    assert len(shas["final"]) == 64 and shas["final"] != shas["checkpoint-8"]


def test_dataset_test_chooses_on_one_half_and_reports_on_the_other(quick):
    dt = quick[1]["results"]["dataset_test"]
    sel, rep = dt["selection_half"], dt["report_half"]
    assert dt["chosen_attack"] == max(sel["roc_auc"], key=sel["roc_auc"].get)
    assert sel["n_members"] + rep["n_members"] == quick[1]["results"]["lab"]["counts"]["members"]
    power = dt["mann_whitney"]["power"]["by_size"]
    assert list(power) == [str(n) for n in dt["sizes_measured"]] and dt["sizes_measured"]
    assert max(n for n in dt["sizes_measured"]) <= min(rep["n_members"], rep["n_nonmembers"])
    assert all(0.0 <= row["power"] <= 1.0 and not row["with_replacement"] for row in power.values())
    for block in dt["mann_whitney"]["fpr"].values():
        assert block["n_resamples"] >= 200 and block["false_positive_rate"] <= 0.2


def test_exposure_and_extraction_against_the_base_model(quick):
    res = quick[1]["results"]
    final, base = res["exposure"]["final"]["by_copies"], res["exposure"]["base"]["by_copies"]
    assert set(final) == set(base) == {"0", "1", "2", "4"}  # 0: the non-member canaries
    bits = res["exposure"]["saturation_bits"]
    for row in res["exposure"]["final"]["canaries"] + res["exposure"]["base"]["canaries"]:
        assert row["final"]["space_size"] == 10**6 and row["final"]["method"] in ("exact", "skewnorm")
        assert 0.0 <= row["final"]["exposure"] <= bits + 1e-9
        if "exact" in row:  # the skew-normal estimate that chose the exact walk agrees with it
            assert abs(row["exact"]["exposure"] - row["skewnorm"]["exposure"]) < 2.0
    ex = res["extraction"]
    assert ex["final"]["n_training_values"] > 0 and ex["final"]["ser"] == ex["final"]["ter"]
    assert set(ex["final"]["by_type"]) <= {"name", "email", "phone", "address", "ssn", "credit_card", "dob"}
    assert ex["checkpoint-8"]["n_seen_values"] <= ex["final"]["n_training_values"]
    assert ex["base"]["ter"] <= ex["final"]["ter"]
    assert set(res["passages"]["final"]) == {"canary", "email", "passage-docstring", "passage-licence",
                                             "passage-shakespeare"}


def test_rerun_resumes_every_step_with_the_same_results(quick, tmp_path):
    tmp, first = quick
    again = _run(tmp)["results"]
    for key in ("mia", "dataset_test", "exposure", "passages", "extraction"):
        assert again[key] == first["results"][key]
    assert again["step_seconds"] == first["results"]["step_seconds"]  # every step reused, none re-run
