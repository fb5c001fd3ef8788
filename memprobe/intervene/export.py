"""Bake a suppression edit into the weights and write a standard Hugging Face model directory.

Why weights, not hooks: the user's deployment (vLLM, plain transformers, another lab's code) should
not need memprobe. Every edit here is folded exactly (up to float rounding), not approximated:

- zero ablation of neuron i at strength s  -> column i of the MLP out-projection weight scaled by (1 - s);
- mean ablation toward m_i                 -> the same, plus the constant s * m_i * W[:, i] added to the
  out-projection bias. GPT-2/Neo/NeoX/OPT have that bias; Llama has an `mlp_bias` switch, so the
  config gets `mlp_bias=True` and the new in-projection biases are zero (exact). Families with
  neither refuse mean ablation;
- a low-rank MLP output edit s B A       -> added to the out-projection weight (transposed for GPT-2's
  Conv1D; exact, any family);
- removing s x the component along d from residual writes -> P = I - s d d^T left-multiplies the
  attention and MLP out-projections (and their biases) and right-multiplies the embedding matrices
  (token, and learned positions where the family has them); when the token embedding is tied to the
  unembedding, the output head is untied first, keeping the original matrix, so only the input side
  changes (exact: these writes are linear in the weights; families with post-norms refuse).
The family adapter (`memprobe.adapters`) says where each of these weights lives.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memprobe.adapters import adapter_for
from memprobe.errors import MemprobeError
from memprobe.intervene.ablation import Edit, LowRankEdit, NeuronEdit

PATCH_FILE = "memprobe_patch.json"


def baked_state(model: nn.Module, edit: Edit) -> tuple[dict[str, torch.Tensor], Any]:
    """(state dict, config) of `model` with `edit` folded into the weights; `model` is left unchanged."""
    import copy

    adapter = adapter_for(model)
    config = copy.deepcopy(model.config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if isinstance(edit, NeuronEdit):
        adapter.fold_neurons(state, config, edit.neurons, edit.strength, edit.means)
    elif isinstance(edit, LowRankEdit):
        adapter.fold_low_rank(state, {layer: edit.weight_delta(layer) for layer in edit.factors})
    else:
        d = edit.direction.to(torch.float64)
        adapter.fold_direction(state, config, torch.eye(len(d), dtype=torch.float64) - edit.strength * torch.outer(d, d))
    return state, config


def patched_model(model: nn.Module, edit: Edit) -> nn.Module:
    """A fresh HF model (same class) holding the baked weights; serialisable with save_pretrained."""
    from transformers import AutoModelForCausalLM

    state, config = baked_state(model, edit)
    dtype = next(model.parameters()).dtype
    fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    head = f"{adapter_for(model).unembed}.weight"
    missing = [k for k in missing if not (k == head and getattr(config, "tie_word_embeddings", False))]
    if missing or unexpected:
        raise MemprobeError(f"baked weights do not fit the model: missing {missing}, unexpected {unexpected}")
    return fresh.eval()


def export_patched(loaded: Any, edit: Edit, out_dir: str | Path, *, provenance: dict[str, Any] | None = None) -> Path:
    """Write `loaded` with `edit` baked in as a HF directory (safetensors, config, tokenizer, patch record)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise MemprobeError(f"{out} exists and is not empty: choose a new --out directory")
    from memprobe.io.atomic import atomic_write, staged_directory

    fresh = patched_model(loaded.model, edit)
    record = {"source_model": loaded.info, "edit": {"kind": edit.kind, "strength": edit.strength,
                                                    "size": edit.size, **edit.meta},
              "provenance": provenance or {}}
    with staged_directory(out) as staged:  # a kill leaves `<out>.tmp-*`, never a half model at `out`
        fresh.save_pretrained(staged, safe_serialization=True)
        loaded.tokenizer.save_pretrained(staged)
        atomic_write(staged / PATCH_FILE, json.dumps(record, indent=2, default=str) + "\n")
    return out
