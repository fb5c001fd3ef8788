"""The probe-layers experiment runs end to end in --quick mode and writes its results and figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_probe_layers_quick(tmp_path):
    cmd = [sys.executable, str(ROOT / "experiments" / "probe_layers.py"), "--quick", "--out", str(tmp_path),
           "--figures", str(tmp_path), "--cache", str(tmp_path / "cache")]
    subprocess.run(cmd, check=True, capture_output=True, timeout=170)
    results = json.loads((tmp_path / "probe_layers_tiny_llama.json").read_text())["results"]
    assert results["quick"] and results["best_site"] in results["per_site"]
    best = results["best"]["probe"]
    assert best["roc_auc_ci95"][0] <= best["roc_auc"] <= best["roc_auc_ci95"][1]
    assert set(results["baselines"]) == {"target_prob", "neg_loss", "neg_entropy", "top_prob"}
    assert results["repetition"]["tokens"] > 0 and results["cross_genre"]["test_positive_genres"]
    for name in ("auc_heatmap", "repetition_heatmap", "roc", "sparse"):
        assert (tmp_path / f"probe_layers_tiny_llama_{name}.png").stat().st_size > 1000
