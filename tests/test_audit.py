"""`memprobe audit` end to end on a tiny model that really memorized some texts, report in a real browser."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from memorize import CONTROLS, MEMORIZED, memorize, save

from memprobe.browser import check_page, screenshot
from memprobe.models import load_model


@pytest.fixture(scope="module")
def memorizing_model(tmp_path_factory) -> tuple[Path, Path]:
    """tiny-llama trained to memorize MEMORIZED (and never shown CONTROLS), saved as an HF directory."""
    torch.manual_seed(0)
    loaded = load_model("tiny-llama")
    model = memorize(loaded, MEMORIZED, 250)
    with torch.no_grad():
        x = torch.tensor(loaded.encode(MEMORIZED[-1]))[None]
        assert model(x, labels=x).loss.item() < 0.3  # it has memorized them
    root = tmp_path_factory.mktemp("audit")
    save(loaded, root / "model")
    texts = root / "texts.jsonl"
    docs = [{"id": f"mem-{i}", "text": t, "kind": "trained", "role": "candidate"} for i, t in enumerate(MEMORIZED)]
    docs += [{"id": f"ctl-{i}", "text": t, "kind": "fresh", "role": "control"} for i, t in enumerate(CONTROLS)]
    texts.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return root / "model", texts


def _audit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memprobe.cli", "audit", *args], capture_output=True, text=True)


def test_audit_finds_localizes_and_suppresses(memorizing_model, tmp_path):
    model, texts = memorizing_model
    out = tmp_path / "audit"
    run = _audit("--model", str(model), "--texts", str(texts), "--out", str(out), "--quick")
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    by_kind = {r["kind"]: r for r in results["by_kind"]}
    assert by_kind["trained"]["memorized_token_rate"] > 0.8 > 0.3 > by_kind["fresh"]["memorized_token_rate"]
    assert results["probes"]["status"] == "ok"
    assert results["patching"]["status"] == "ok"
    assert results["suppression"]["status"] == "ok" and (out / "patched-model" / "config.json").exists()
    # a re-run reuses every finished step
    again = _audit("--model", str(model), "--texts", str(texts), "--out", str(out), "--quick")
    assert again.returncode == 0 and again.stdout.count("reusing") >= 7
    steps = json.loads((out / "results.json").read_text())["timings_s"]  # first run's timings survive the re-run
    assert {"label", "capture", "probe sweep", "suppression patch"} <= set(steps) and all(v > 0 for v in steps.values())

    page = check_page(out / "report.html")
    assert page.ok, page
    assert page.figures == 3  # probe heatmap, patching heatmap, suppression curve
    shot = screenshot(out / "report.html", tmp_path / "report.png")
    assert shot.stat().st_size > 20_000


def test_nothing_memorized_is_reported_not_failed(tmp_path):
    texts = tmp_path / "t.jsonl"
    texts.write_text("".join(json.dumps({"id": f"c{i}", "text": t, "role": "control"}) + "\n" for i, t in enumerate(CONTROLS)))
    run = _audit("--model", "tiny-llama", "--texts", str(texts), "--out", str(tmp_path / "a"), "--quick")
    assert run.returncode == 0, run.stderr[-2000:]
    page = (tmp_path / "a" / "report.html").read_text()
    assert "Nothing memorized" in page
    assert check_page(tmp_path / "a" / "report.html").ok


@pytest.mark.parametrize(("content", "message"), [
    ("", "no documents"),
    ('{"id": "a", "text": "fine"}\n{"id": "b" "text": "x"}\n', "t.jsonl:2"),
])
def test_bad_texts_file_names_the_problem(tmp_path, content, message):
    texts = tmp_path / "t.jsonl"
    texts.write_text(content)
    run = _audit("--model", "tiny-llama", "--texts", str(texts), "--out", str(tmp_path / "a"), "--quick")
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr


def test_out_dir_with_another_models_audit_is_refused(tmp_path):
    texts = tmp_path / "t.jsonl"
    texts.write_text(json.dumps({"id": "c", "text": CONTROLS[0], "role": "control"}) + "\n")
    assert _audit("--model", "tiny-llama", "--texts", str(texts), "--out", str(tmp_path / "a"), "--quick").returncode == 0
    run = _audit("--model", "tiny-gemma3", "--texts", str(texts), "--out", str(tmp_path / "a"), "--quick")
    assert run.returncode == 2 and "different settings" in run.stderr and "tiny-llama" in run.stderr
