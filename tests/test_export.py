"""Patched-model export: baked weights reproduce the runtime hooks, and plain transformers loads them."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from memprobe.errors import MemprobeError
from memprobe.intervene.ablation import DirectionEdit, LowRankEdit, NeuronEdit, hooked_edit
from memprobe.intervene.export import PATCH_FILE, export_patched, patched_model
from memprobe.models import LoadedModel, load_model

TEXT = "Redistribution and use in source and binary forms, with or without modification"


def _tied_tiny() -> LoadedModel:
    """tiny-llama with tied input/output embeddings, like SmolLM2."""
    base = load_model("tiny-llama")
    config = base.model.config
    config.tie_word_embeddings = True
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return LoadedModel("tiny-llama-tied", model, base.tokenizer, {"name": "tiny-llama-tied"})


EDITS = {
    "zero": NeuronEdit({0: torch.tensor([1, 5, 9]), 1: torch.tensor([3, 100])}, strength=1.0),
    "partial": NeuronEdit({1: torch.tensor([0, 7])}, strength=0.4),
    "mean": NeuronEdit({0: torch.tensor([2, 4])}, 0.9, means={0: torch.tensor([0.5, -0.25])}),
    "direction": DirectionEdit(torch.randn(64, generator=torch.Generator().manual_seed(3)), 1.0),
    "half-direction": DirectionEdit(torch.randn(64, generator=torch.Generator().manual_seed(4)), 0.5),
    "low-rank": LowRankEdit({0: (torch.randn(3, 128, generator=torch.Generator().manual_seed(5)),
                                 torch.randn(64, 3, generator=torch.Generator().manual_seed(6)) * 0.1)}, 0.7),
}


def _logits(model, ids, edit=None):
    with torch.no_grad():
        if edit is None:
            return model(input_ids=ids).logits
        with hooked_edit(model, edit):
            return model(input_ids=ids).logits


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("name", list(EDITS))
def test_baked_weights_equal_runtime_hooks(name, tied):
    loaded = _tied_tiny() if tied else load_model("tiny-llama")
    ids = torch.tensor([loaded.encode(TEXT)])
    edit = EDITS[name]
    before = _logits(loaded.model, ids)
    hooked = _logits(loaded.model, ids, edit)
    baked = _logits(patched_model(loaded.model, edit), ids)
    assert (hooked - before).abs().max() > 1e-4
    torch.testing.assert_close(baked, hooked, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(loaded.model, ids), before)  # the source model is untouched


PLAIN_LOADER = textwrap.dedent("""
    import sys, json
    import numpy as np, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, text, out = sys.argv[1:4]
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        np.save(out, model(input_ids=ids).logits.numpy())
    json.dump({"ids": ids[0].tolist(), "memprobe_imported": any(m.startswith("memprobe") for m in sys.modules)},
              open(out + ".json", "w"))
""")


@pytest.mark.parametrize("name", ["mean", "direction", "low-rank"])
def test_exported_dir_loads_with_plain_transformers(tmp_path, name):
    loaded = _tied_tiny()
    edit = EDITS[name]
    out = export_patched(loaded, edit, tmp_path / "patched")
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    assert json.loads((out / PATCH_FILE).read_text())["edit"]["kind"] == edit.kind
    res = tmp_path / "logits.npy"
    subprocess.run([sys.executable, "-c", PLAIN_LOADER, str(out), TEXT, str(res)], check=True, cwd=tmp_path,
                   env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    meta = json.loads((tmp_path / "logits.npy.json").read_text())
    assert meta["memprobe_imported"] is False
    assert meta["ids"] == loaded.encode(TEXT)  # the saved tokenizer is the same tokenisation
    ids = torch.tensor([meta["ids"]])
    np.testing.assert_allclose(np.load(res), _logits(loaded.model, ids, edit).numpy(), atol=2e-5, rtol=1e-5)


def test_export_refuses_non_empty_dir_and_unbakeable_edits(tmp_path):
    loaded = load_model("tiny-llama")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("keep")
    with pytest.raises(MemprobeError, match="not empty"):
        export_patched(loaded, EDITS["zero"], tmp_path / "x")
    gemma = load_model("tiny-gemma3")
    with pytest.raises(MemprobeError):
        patched_model(gemma.model, DirectionEdit(torch.ones(64)))


def test_zero_ablation_on_gemma_bakes_exactly():
    loaded = load_model("tiny-gemma3")
    ids = torch.tensor([loaded.encode(TEXT)])
    edit = EDITS["zero"]
    torch.testing.assert_close(_logits(patched_model(loaded.model, edit), ids), _logits(loaded.model, ids, edit),
                               atol=2e-5, rtol=1e-5)


def test_patch_cli_writes_a_loadable_dir_from_a_saved_edit(tmp_path, capsys):
    from memprobe.cli import main
    from memprobe.intervene.ablation import save_edit

    edit_file = save_edit(EDITS["zero"], tmp_path / "edit.safetensors")
    out = tmp_path / "patched"
    assert main(["patch", "--model", "tiny-llama", "--out", str(out), "--edit", str(edit_file), "--strength", "0.5"]) == 0
    record = json.loads((out / PATCH_FILE).read_text())
    assert record["edit"]["strength"] == 0.5 and record["edit"]["size"] == 5
    loaded = load_model("tiny-llama")
    ids = torch.tensor([loaded.encode(TEXT)])
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(reloaded, ids), _logits(loaded.model, ids, EDITS["zero"].with_strength(0.5)),
                               atol=2e-5, rtol=1e-5)
    assert main(["patch", "--model", "tiny-llama", "--out", str(tmp_path / "p2"), "--method", "nope"]) != 0


@pytest.mark.real
def test_exported_smollm2_matches_runtime_hooks(tmp_path, smollm):
    edit = NeuronEdit({3: torch.tensor([5, 17]), 20: torch.tensor([100])}, 1.0,
                      means={3: torch.tensor([0.1, -0.2]), 20: torch.tensor([0.05])})
    ids = torch.tensor([smollm.encode(TEXT)])
    out = export_patched(smollm, edit, tmp_path / "smol")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(reloaded, ids), _logits(smollm.model, ids, edit), atol=1e-4, rtol=1e-4)
