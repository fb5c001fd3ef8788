"""The probe and audit benchmarks run end to end in --quick mode and write results that hold together."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bench(script: str, *args: str) -> None:
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", *args],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]


def test_bench_probes_quick(tmp_path):
    out = tmp_path / "probes.json"
    _bench("bench_probes.py", "--tokens", "4000", "--cache", str(tmp_path / "cache"), "--out", str(out))
    r = json.loads(out.read_text())["results"]
    assert r["sites"] == 4 and set(r["auc_on_sklearn_sites"]) == set(r["peers"]["memprobe"]["auc"])
    assert r["max_abs_auc_difference"] < 2e-3  # same objective and tolerance: the same probes
    assert 0 < r["peers"]["memprobe"]["positive_share"] < 1
    assert 1 <= len(r["test_plays"]) < 30  # a held-out share of the plays
    assert r["speedup_over_sklearn_loop"] == r["sklearn_all_sites_seconds_scaled"] / r["memprobe_all_sites_seconds"]
    assert r["store_read_once_seconds"] > 0 and r["peers"]["read"]["rows"] == r["peers"]["memprobe"]["rows"]


def test_bench_probes_corpus_never_repeats_text():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_probes", ROOT / "benchmarks" / "bench_probes.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    docs, family = bench.play_docs(lambda t: t.encode(), 200_000, doc_chars=240)
    assert len({d["text"] for d in docs}) == len(docs)  # no document's text occurs twice
    assert len(set(family)) >= 30 and len(docs) == len(family)  # every play contributes


def test_bench_audit_quick(tmp_path):
    out = tmp_path / "audit.json"
    _bench("bench_audit.py", "--out", str(out))
    r = json.loads(out.read_text())["results"]
    assert {"texts", "label", "probe sweep", "suppression patch", "report"} <= set(r["step_order"])
    assert all(len(v) == 2 and all(s >= 0 for s in v) for v in r["seconds_per_round"].values())  # 2 rounds each
    assert r["sum_of_medians_seconds"] == sum(r["median_seconds"].values())
    assert len(r["inside_steps_seconds_per_round"]["capture"]) == 2  # the label step's capture, re-timed
