"""Activation patching: the hooks, TransformerLens and nnsight paths give the same heatmap."""

from __future__ import annotations

import numpy as np
import pytest

from memprobe.errors import MemprobeError
from memprobe.intervene.patching import activation_patching, corrupt_prefix
from memprobe.models import load_model

TEXT = "To be, or not to be, that is"


def _setup():
    loaded = load_model("tiny-llama")
    ids = loaded.encode(TEXT)
    clean, target = ids[:-1], ids[-1]
    corrupt = corrupt_prefix(clean, 4, vocab=sorted(set(ids)), seed=0)
    return clean, corrupt, target


def test_three_backends_agree_and_endpoints_are_exact():
    clean, corrupt, target = _setup()
    results = {b: activation_patching(load_model("tiny-llama"), clean, corrupt, target, backend=b)
               for b in ("hooks", "lens", "nnsight")}
    ref = results["hooks"]
    assert ref.effects["hook_resid_pre"].shape == (2, len(clean))
    for b in ("lens", "nnsight"):
        for kind, values in ref.effects.items():
            np.testing.assert_allclose(results[b].effects[kind], values, atol=1e-3)
    resid = ref.effects["hook_resid_pre"]
    # Patching the whole residual stream at the last position of layer 0 restores everything at once
    # except what earlier positions contribute via attention; positions that were not corrupted and
    # precede every corruption change nothing.
    same = [p for p in range(len(clean)) if clean[p] == corrupt[p] and all(clean[q] == corrupt[q] for q in range(p))]
    np.testing.assert_allclose(resid[0, same], 0.0, atol=1e-5)
    assert np.isfinite(resid).all()


def test_patching_refuses_misaligned_or_identical_prefixes():
    clean, corrupt, target = _setup()
    with pytest.raises(MemprobeError, match="same number"):
        activation_patching(load_model("tiny-llama"), clean, corrupt[:-1], target)
    with pytest.raises(MemprobeError, match="does not change"):
        activation_patching(load_model("tiny-llama"), clean, clean, target)


def test_corrupt_prefix_keeps_length_and_ends():
    ids = list(range(10, 30))
    out = corrupt_prefix(ids, 5, vocab=list(range(100)), seed=1)
    assert len(out) == len(ids) and out[0] == ids[0] and out[-1] == ids[-1]
    assert sum(a != b for a, b in zip(out, ids, strict=True)) == 5


@pytest.mark.slow
@pytest.mark.parametrize("script", ["patching.py", "suppress.py", "localize_inj.py", "localize_del.py"])
def test_experiment_quick_mode(script, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "experiments" / script), "--quick", "--out", str(tmp_path / "res"),
           "--figures", str(tmp_path / "fig")]
    run = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-2000:]
    results = list((tmp_path / "res").glob("*_quick.json"))
    assert results and json.loads(results[0].read_text())["results"]
    assert list((tmp_path / "fig").glob("intervene_*_quick.png"))
