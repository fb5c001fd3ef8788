"""A `memprobe audit` killed with SIGKILL mid-step resumes for real and ends as an uninterrupted run.

Inside capture: the test polls the store for its first shard and kills the process while the rest
are still being written. Inside export: writing a tiny model takes milliseconds, too fast to catch,
so the test sets MEMPROBE_TEST_PAUSE_IN=export, which (only) `memprobe.audit._pause_for_test` reads
to sleep after the patched model is written to its temp directory and before it is published.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from memorize import CONTROLS as ALL_CONTROLS
from memorize import MEMORIZED as ALL_MEMORIZED
from memorize import memorize, save

from memprobe.models import load_model

MEMORIZED = ALL_MEMORIZED[:4]
CONTROLS = [ALL_CONTROLS[i] for i in (0, 1, 2, 4)]


def _command(out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "memprobe", "audit", "--quick", "--out", str(out), *args]


def _run(out: Path, *args: str) -> subprocess.CompletedProcess:
    run = subprocess.run(_command(out, *args), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def _kill_when(out: Path, args: tuple[str, ...], ready, env: dict[str, str] | None = None) -> None:
    """Start an audit, SIGKILL it as soon as `ready()` holds; fail if it finished first."""
    proc = subprocess.Popen(_command(out, *args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 240
    while not ready():
        assert proc.poll() is None, f"audit ended (rc {proc.returncode}) before the kill: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "the audit never reached the kill point"
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()


def _results(out: Path) -> dict:
    """What an audit concluded: summary by kind, labels, probe AUCs, suppression, re-labels."""
    summary = json.loads((out / "results.json").read_text())
    labels = [json.loads(line) for line in (out / "labels.jsonl").read_text().splitlines()]
    found = {"by_kind": summary["by_kind"], "labels": labels,
             "probe_auc": {s: v["probe"]["roc_auc"] for s, v in summary["probes"].get("per_site", {}).items()},
             "probes": summary["probes"], "patching": summary["patching"], "relabel": summary["relabel"]}
    suppression = dict(summary["suppression"])
    suppression.pop("patched_model", None)  # the path of this audit's own directory
    found["suppression"] = suppression
    return found


def _committed(store: Path) -> list[dict]:
    """The shards the store's manifest names (replaced atomically, so safe to read mid-capture)."""
    try:
        return json.loads((store / "manifest.json").read_text())["shards"]
    except FileNotFoundError:
        return []


def _done(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "steps").glob("*.done.json"))]


def _stats(store: Path, files) -> dict[str, tuple[int, int]]:
    return {f: ((store / f).stat().st_ino, (store / f).stat().st_mtime_ns) for f in files}


def _leftovers(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if ".tmp" in p.name)


def test_kill_inside_capture_resumes_the_store(tmp_path):
    args = ("--model", "tiny-llama")
    reference = tmp_path / "reference"
    _run(reference, *args)

    out = tmp_path / "killed"
    _kill_when(out, args, lambda: len(_committed(out / "store")) >= 1)
    manifest = json.loads((out / "store" / "manifest.json").read_text())
    assert not manifest["complete"], "the kill came after the capture had finished: nothing was tested"
    kept = _stats(out / "store", [s["file"] for s in manifest["shards"]])
    assert kept
    assert not any("store" in record["outputs"] for record in _done(out))

    _run(out, *args)
    assert _results(out) == _results(reference)
    assert _stats(out / "store", kept) == kept  # committed shards were resumed from, not written again
    assert json.loads((out / "store" / "manifest.json").read_text())["complete"]
    assert any("store" in record["outputs"] for record in _done(out))
    assert _leftovers(out) == []
    third = _run(out, *args)  # now every step is done and verifies
    ran = [line for line in third.stdout.splitlines() if line.startswith("[audit]") and "reusing" not in line]
    assert ran == [] and third.stdout.count("reusing") == len(_done(out)) >= 8


@pytest.fixture(scope="module")
def memorizing_model(tmp_path_factory) -> tuple[Path, Path]:
    """tiny-llama trained to memorize MEMORIZED (never shown CONTROLS), so the audit builds a patch."""
    torch.manual_seed(0)
    loaded = load_model("tiny-llama")
    memorize(loaded, MEMORIZED, 200)
    root = tmp_path_factory.mktemp("memorizing")
    save(loaded, root / "model")
    texts = root / "texts.jsonl"
    # one kind per text, so --quick keeps them all
    docs = [{"id": f"mem-{i}", "text": t, "kind": f"trained-{i}", "role": "candidate"} for i, t in enumerate(MEMORIZED)]
    docs += [{"id": f"ctl-{i}", "text": t, "kind": f"fresh-{i}", "role": "control"} for i, t in enumerate(CONTROLS)]
    texts.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return root / "model", texts


@pytest.fixture(scope="module")
def memorizing_audit(memorizing_model, tmp_path_factory) -> tuple[tuple[str, ...], Path]:
    """The audit's arguments for the memorizing model, and an uninterrupted audit with them."""
    model, texts = memorizing_model
    args = ("--model", str(model), "--texts", str(texts))
    reference = tmp_path_factory.mktemp("reference") / "audit"
    _run(reference, *args)
    assert json.loads((reference / "suppression.json").read_text())["status"] == "ok"
    return args, reference


def test_kill_inside_export_leaves_no_half_model_and_finishes(memorizing_audit, tmp_path):
    args, reference = memorizing_audit

    out = tmp_path / "killed"
    _kill_when(out, args, lambda: any(out.glob("patched-model.tmp-*/model.safetensors")),
               env={"MEMPROBE_TEST_PAUSE_IN": "export"})
    assert not (out / "patched-model").exists()  # a kill never leaves a half patched model
    assert (out / "steps" / "suppression-patch.done.json").exists()

    again = _run(out, *args)
    assert "[audit] suppression patch: reusing" in again.stdout
    assert "[audit] export patched model ..." in again.stdout
    assert _results(out) == _results(reference)
    assert (out / "patched-model" / "config.json").exists()
    assert _leftovers(out) == []


def test_a_changed_or_damaged_output_is_made_again(memorizing_audit, tmp_path):
    """A done-record whose outputs no longer verify (a deleted figure, an edited result) is re-run."""
    args, reference = memorizing_audit
    out = tmp_path / "audit"
    shutil.copytree(reference, out)
    first, shards = _results(out), _stats(out / "store", [p.name for p in (out / "store").glob("shard-*")])
    probes = json.loads((out / "probes.json").read_text())
    (out / "probes.json").write_text(json.dumps({**probes, "best_site": "tampered"}))
    (out / "figures" / "patching.png").unlink()
    again = _run(out, *args)
    assert "[audit] probe sweep ..." in again.stdout and "[audit] activation patching ..." in again.stdout
    assert "[audit] suppression patch: reusing" in again.stdout
    assert _results(out) == first and _stats(out / "store", shards) == shards
