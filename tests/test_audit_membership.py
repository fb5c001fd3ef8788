"""`memprobe audit --lab --reference-model`: memorization beyond a reference, and the lab's measures.

The fixture is a small lab cut from the `tiny` preset (canaries with 1/2/4 copies, PII mails, a
passage, as members and non-members) plus one member both models know: a base tiny-llama is first
trained on a repeated-character string, then fine-tuned (memprobe.lab.finetune) on the members,
that string included. So the teacher-forced labels call the string "memorized", and only the
reference (the base) can say it is not memorized by the fine-tune.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from memprobe.audit import Audit, AuditConfig, lab_settings
from memprobe.errors import MemprobeError
from memprobe.lab import build_lab, load_lab
from memprobe.lab.finetune import finetune
from memprobe.models import load_model

REPEAT = {"id": "repetition/ab", "text": "ab" * 60, "kind": "repeated-string", "member": True, "copies": 1}


def _shortest(docs: list[dict], kind: str, n: int) -> list[dict]:
    return sorted((d for d in docs if d["kind"] == kind), key=lambda d: len(d["text"]))[:n]


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("membership")
    build_lab(root / "tiny", preset="tiny", seed=0)
    members, nonmembers, _ = load_lab(root / "tiny")
    picked = {}
    for name, docs in (("members", members), ("nonmembers", nonmembers)):
        picked[name] = [*_shortest(docs, "canary", 3), *_shortest(docs, "email", 2),
                        *_shortest(docs, "passage-shakespeare", 1)]
    picked["members"].append(REPEAT)
    (root / "lab").mkdir()
    for name, docs in picked.items():
        (root / "lab" / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "lab" / "manifest.json").write_text(json.dumps({"subset_of": "tiny preset, seed 0"}))

    torch.manual_seed(0)  # the base: tiny-llama that knows the repeated string
    base = load_model("tiny-llama")
    ids = torch.tensor([base.encode(REPEAT["text"])])
    opt = torch.optim.AdamW(base.model.train().parameters(), lr=3e-3)
    for _ in range(30):
        base.model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    base.model.eval().save_pretrained(root / "base")
    base.tokenizer.save_pretrained(root / "base")
    finetune(str(root / "base"), picked["members"], root / "ft", epochs=30, lr=3e-3, batch_size=4,
             progress=False)
    return {"lab": root / "lab", "base": root / "base", "ft": root / "ft", "root": root}


def _command(lab: dict[str, Path], out: Path) -> list[str]:
    return [sys.executable, "-m", "memprobe", "audit", "--quick", "--out", str(out), "--model", str(lab["ft"]),
            "--reference-model", str(lab["base"]), "--lab", str(lab["lab"]),
            "--precision", "float32"]  # its sections must equal memprobe.mia's float32 scores to 1e-3


@pytest.fixture(scope="module")
def audit(lab, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("audit") / "run"
    run = subprocess.run(_command(lab, out), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def _records(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, (out / "labels.jsonl").read_text().splitlines())}


def test_reference_unmarks_what_both_models_know(audit):
    records = _records(audit)
    repeat = records[REPEAT["id"]]
    assert repeat["memorized_fraction_uncalibrated"] > 0.9  # teacher-forced: "memorized"
    assert repeat["memorized_fraction"] < 0.05  # beyond the reference: not
    canary = next(r for r in records.values() if r["kind"] == "canary" and r["member"] and r["copies"] == 4)
    assert canary["memorized_fraction"] > 0.05
    uncalibrated = sorted(records.values(), key=lambda r: -r["memorized_fraction_uncalibrated"])
    assert uncalibrated[0]["id"] == REPEAT["id"]
    membership = json.loads((audit / "membership.json").read_text())
    assert membership["calibration"]["score"] == "ref"
    rank = {row["id"]: row["rank"] for row in membership["ranking"]}
    assert rank[canary["id"]] < rank[REPEAT["id"]]
    # per token: the log-prob gain is log p_target - log p_ref, token by token
    t = 5
    assert repeat["logprob_gain"][t] == pytest.approx(
        torch.tensor(repeat["reference_target_prob"][t]).log().item() * -1 - repeat["loss"][t], abs=1e-4)
    assert "Most memorized texts, calibrated" in (audit / "report.html").read_text()


def test_lab_sections_equal_memprobe_mia(audit, lab):
    from memprobe.mia import evaluate_mia, pii_extraction, score_texts
    from memprobe.mia.exposure import exposure_report

    membership = json.loads((audit / "membership.json").read_text())
    measured = membership["lab"]
    settings = lab_settings(AuditConfig(quick=True))
    members, nonmembers, _ = load_lab(lab["lab"])
    docs = members + nonmembers
    target, base = load_model(str(lab["ft"])), load_model(str(lab["base"]))
    scores = score_texts(target, docs, reference=base)
    direct = evaluate_mia(scores, {d["id"]: d["member"] for d in docs}, copies={d["id"]: d.get("copies") for d in docs},
                          n_boot=settings["n_boot"], seed=settings["seed"])
    ours = {s["id"]: s["scores"] for s in membership["scores"]}
    for s in scores:
        assert ours[s["id"]] == pytest.approx(s["scores"], rel=1e-3, abs=1e-4)
    for attack, block in direct["attacks"].items():
        got = measured["mia"]["attacks"][attack]
        assert got["roc_auc"] == pytest.approx(block["roc_auc"])
        assert got["roc_auc_ci95"] == pytest.approx(block["roc_auc_ci95"])
        assert {c: g["roc_auc"] for c, g in got["by_copies"].items()} == pytest.approx(
            {c: g["roc_auc"] for c, g in block["by_copies"].items()})
    assert set(measured["mia"]["attacks"]["ref"]["by_copies"]) == {"1", "2", "4"}
    exposure = exposure_report(target, docs, **settings["exposure"])
    for copies, row in exposure["by_copies"].items():
        assert measured["exposure"]["by_copies"][copies] == pytest.approx(row, abs=1e-3)
    assert set(exposure["by_copies"]) == {"0", "1", "2", "4"}
    pii = pii_extraction(target, [d for d in docs if d.get("pii_spans")], **settings["extraction"])
    assert measured["pii_extraction"]["ter"] == pii["ter"]
    assert measured["pii_extraction"]["ter_by_recurrence"] == pii["ter_by_recurrence"]
    assert set(measured["pii_extraction"]["by_type"]) == {o["type"] for o in pii["occurrences"]}
    page = (audit / "report.html").read_text()
    for heading in ("Membership inference on the lab", "Canary exposure", "PII extraction"):
        assert heading in page
    assert (audit / "figures" / "mia_roc.png").stat().st_size > 0


def test_reference_with_another_tokenizer_is_refused(lab, tmp_path):
    other = load_model("tiny-llama")
    other.tokenizer.add_tokens(["<extra-token>"])
    other.model.resize_token_embeddings(len(other.tokenizer))
    other.model.save_pretrained(tmp_path / "other")
    other.tokenizer.save_pretrained(tmp_path / "other")
    config = AuditConfig(model=str(lab["ft"]), lab=str(lab["lab"]), reference_model=str(tmp_path / "other"),
                         quick=True)
    with pytest.raises(MemprobeError, match="same tokenizer|share the target's tokenizer"):
        Audit(config, tmp_path / "audit").run()
    assert not (tmp_path / "audit" / "store").exists()  # refused before any forward


def test_killed_membership_step_resumes_to_the_same_result(audit, lab, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "MEMPROBE_TEST_PAUSE_IN": "membership", "MEMPROBE_TEST_PAUSE_S": "120"}
    proc = subprocess.Popen(_command(lab, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 400
    while not (out / "figures" / "mia_roc.png").exists():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "the audit never reached the membership step"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not (out / "membership.json").exists() and not (out / "steps" / "membership.done.json").exists()
    run = subprocess.run(_command(lab, out), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "[audit] label: reusing" in run.stdout and "[audit] membership ..." in run.stdout
    assert json.loads((out / "membership.json").read_text()) == json.loads((audit / "membership.json").read_text())
    assert _records(out) == _records(audit)


def test_calibration_is_chosen_on_the_lab(lab):
    from memprobe.calibration import CALIBRATIONS, choose_calibration, default_calibration
    from memprobe.mia import evaluate_mia, score_texts

    members, nonmembers, _ = load_lab(lab["lab"])
    docs = members + nonmembers
    scores = score_texts(load_model(str(lab["ft"])), docs)
    mia = evaluate_mia(scores, {d["id"]: d["member"] for d in docs}, n_boot=50)
    choice = choose_calibration(mia, source="test lab")
    aucs = {c: mia["attacks"][c]["roc_auc"] for c in CALIBRATIONS}
    assert choice["score"] == max(CALIBRATIONS, key=lambda c: (aucs[c], -CALIBRATIONS.index(c)))
    assert choice["roc_auc"] == aucs[choice["score"]] and len(choice["roc_auc_ci95"]) == 2
    with pytest.raises(MemprobeError, match="no \\['ref'\\] scores"):
        choose_calibration(mia, candidates=("ref",))
    committed = default_calibration()  # what an audit without a reference ranks by
    assert committed["score"] in CALIBRATIONS and committed["roc_auc"] > 0.5 and committed["source"]
