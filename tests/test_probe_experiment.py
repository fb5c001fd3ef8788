"""The probe experiments run end to end in --quick mode (tiny random models) and write results and figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(script: str, *args: str) -> None:
    subprocess.run([sys.executable, str(ROOT / "experiments" / script), "--quick", *args], check=True,
                   capture_output=True, timeout=170)


@pytest.mark.slow
def test_probe_layers_and_transfer_quick(tmp_path):
    out = ["--out", str(tmp_path), "--figures", str(tmp_path)]
    run("probe_layers.py", *out, "--cache", str(tmp_path / "cache" / "tiny-llama-quick"))
    results = json.loads((tmp_path / "probe_layers_tiny_llama.json").read_text())["results"]
    assert results["quick"] and results["best_site"] in results["per_site"]
    # the keys of memprobe.studies.probe_sweep, the same as the audit's probes.json
    assert set(results["per_site"][results["best_site"]]) == {"probe", "shuffled_labels_auc",
                                                              "shuffled_labels_tpr_at_fpr_0.01"}
    best = results["best"]["probe"]
    assert best["roc_auc_ci95"][0] <= best["roc_auc"] <= best["roc_auc_ci95"][1]
    assert set(results["baselines"]) == {"target_prob", "neg_loss", "neg_entropy", "top_prob"}
    assert results["repetition"]["tokens"] > 0 and results["cross_genre"]["test_positive_genres"]
    for name in ("auc_heatmap", "repetition_heatmap", "roc", "sparse"):
        assert (tmp_path / f"probe_layers_tiny_llama_{name}.png").stat().st_size > 1000
    assert "| probe at best site" in (tmp_path / "probe_layers_tiny_llama.md").read_text()

    run("probe_layers.py", "--model", "gemma3-270m", *out, "--cache", str(tmp_path / "cache" / "tiny-gemma3-quick"))
    run("probe_transfer.py", "--out", str(tmp_path), "--cache-root", str(tmp_path / "cache"))
    pairs = json.loads((tmp_path / "probe_transfer_quick.json").read_text())["results"]["pairs"]
    assert [(p["probe_model"], p["samples_from"]) for p in pairs] == [("tiny-llama", "tiny-gemma3"),
                                                                      ("tiny-gemma3", "tiny-llama")]
    assert all(p["foreign_sample_tokens"] > 0 for p in pairs)
