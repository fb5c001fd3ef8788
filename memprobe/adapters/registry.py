"""`adapter_for(model)`: the family adapter of a Hugging Face model, by `config.model_type` (or,
for a model without a config, its class name)."""

from __future__ import annotations

import re

from torch import nn

from memprobe.adapters import gemma, gpt2, gpt_neo, gpt_neox, llama, olmo2, opt, phi3
from memprobe.adapters.base import Adapter, AdapterBuilder
from memprobe.errors import MemprobeError

# model_type -> (family file's builder, family name)
FAMILIES: dict[str, AdapterBuilder] = {
    "llama": llama.adapter, "mistral": llama.adapter, "qwen2": llama.adapter, "qwen3": llama.adapter,
    "gemma": gemma.adapter, "gemma2": gemma.adapter, "gemma3": gemma.adapter, "gemma3_text": gemma.adapter,
    "phi3": phi3.adapter, "olmo2": olmo2.adapter, "gpt2": gpt2.adapter, "gpt_neo": gpt_neo.adapter,
    "gpt_neox": gpt_neox.adapter, "opt": opt.adapter,
}
_CLASS_SUFFIX = re.compile(r"(ForCausalLM|LMHeadModel|ForConditionalGeneration|TextModel|Model)$")


def _squash(name: str) -> str:
    return name.replace("_", "").lower()


def family_of(model: nn.Module) -> str | None:
    """The model_type key of FAMILIES that `model` belongs to, or None."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in FAMILIES:
        return model_type
    stem = _squash(_CLASS_SUFFIX.sub("", type(model).__name__))
    return next((k for k in FAMILIES if _squash(k) == stem), None)


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter describing `model`'s module tree; an unknown family fails saying what still works."""
    family = family_of(model)
    if family is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise MemprobeError(
            f"no memprobe adapter for {type(model).__name__} (model_type {model_type!r}); supported families: "
            f"{', '.join(sorted(FAMILIES))}. Raw module paths (e.g. --sites model.layers.3.mlp) still work "
            "with --backend hooks or nnsight."
        )
    return FAMILIES[family](model, family)
