"""Bake a suppression edit into the weights and write a standard Hugging Face model directory.

Why weights, not hooks: the user's deployment (vLLM, plain transformers, another lab's code) should
not need memprobe. Every edit here is folded exactly (up to float rounding), not approximated:

- zero ablation of neuron i at strength s  -> column i of `down_proj.weight` scaled by (1 - s);
- mean ablation toward m_i                 -> the same, plus the constant s * m_i * W[:, i] added to a
  `down_proj` bias. Llama has no MLP bias by default, so the config gets `mlp_bias=True` and the new
  gate/up biases are zero (exact). Architectures without an `mlp_bias` switch refuse mean ablation;
- a low-rank MLP output edit s B A       -> added to `down_proj.weight` (exact, any architecture);
- removing s x the component along d from residual writes -> P = I - s d d^T left-multiplies
  `o_proj.weight` and `down_proj.weight` (and their biases) and right-multiplies the embedding
  matrix; when the embedding is tied to the unembedding, the output head is untied first, keeping
  the original matrix, so only the input side changes (exact: these writes are linear in the weights).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memprobe.errors import MemprobeError
from memprobe.intervene.ablation import Edit, LowRankEdit, NeuronEdit, load_edit
from memprobe.sites import DecoderLayout

PATCH_FILE = "memprobe_patch.json"


def baked_state(model: nn.Module, edit: Edit) -> tuple[dict[str, torch.Tensor], Any]:
    """(state dict, config) of `model` with `edit` folded into the weights; `model` is left unchanged."""
    import copy

    layout = DecoderLayout.of(model)
    config = copy.deepcopy(model.config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if isinstance(edit, NeuronEdit):
        needs_bias = edit.means is not None and edit.strength != 0
        if needs_bias and not hasattr(config, "mlp_bias"):
            raise MemprobeError(f"{type(model).__name__} has no mlp_bias option: mean ablation cannot be baked "
                                "into its weights exactly; use zero ablation (no --mean)")
        if needs_bias and not config.mlp_bias:
            config.mlp_bias = True
            for i in range(layout.n_layers):
                b = f"{layout.block(i)}.mlp"
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    rows = state[f"{b}.{proj}.weight"].shape[0]
                    state[f"{b}.{proj}.bias"] = torch.zeros(rows, dtype=state[f"{b}.{proj}.weight"].dtype)
        for layer, idx in edit.neurons.items():
            key = f"{layout.block(layer)}.mlp.down_proj"
            w = state[f"{key}.weight"]
            if needs_bias:
                state[f"{key}.bias"] += edit.strength * (w[:, idx] @ edit.means[layer].to(w.dtype))
            w[:, idx] *= 1.0 - edit.strength
        return state, config
    if isinstance(edit, LowRankEdit):
        for layer in edit.factors:
            w = state[f"{layout.block(layer)}.mlp.down_proj.weight"]
            w += edit.weight_delta(layer).to(w.dtype)
        return state, config
    if layout.post_norms:
        raise MemprobeError("direction edits cannot be baked into models with post-norms (Gemma-style)")
    d = edit.direction.to(torch.float64)
    proj = torch.eye(len(d), dtype=torch.float64) - edit.strength * torch.outer(d, d)
    for i in range(layout.n_layers):
        for key in (f"{layout.block(i)}.self_attn.o_proj", f"{layout.block(i)}.mlp.down_proj"):
            w = state[f"{key}.weight"]
            state[f"{key}.weight"] = (proj @ w.double()).to(w.dtype)
            if f"{key}.bias" in state:
                state[f"{key}.bias"] = (proj @ state[f"{key}.bias"].double()).to(w.dtype)
    embed_key = f"{layout.embed}.weight"
    emb = state[embed_key]
    if getattr(config, "tie_word_embeddings", False):
        state["lm_head.weight"] = emb.clone()
        config.tie_word_embeddings = False
    state[embed_key] = (emb.double() @ proj).to(emb.dtype)
    return state, config


def patched_model(model: nn.Module, edit: Edit) -> nn.Module:
    """A fresh HF model (same class) holding the baked weights; serialisable with save_pretrained."""
    from transformers import AutoModelForCausalLM

    state, config = baked_state(model, edit)
    dtype = next(model.parameters()).dtype
    fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise MemprobeError(f"baked weights do not fit the model: missing {missing}, unexpected {unexpected}")
    return fresh.eval()


def export_patched(loaded: Any, edit: Edit, out_dir: str | Path, *, provenance: dict[str, Any] | None = None) -> Path:
    """Write `loaded` with `edit` baked in as a HF directory (safetensors, config, tokenizer, patch record)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise MemprobeError(f"{out} exists and is not empty: choose a new --out directory")
    out.mkdir(parents=True, exist_ok=True)
    fresh = patched_model(loaded.model, edit)
    fresh.save_pretrained(out, safe_serialization=True)
    loaded.tokenizer.save_pretrained(out)
    record = {"source_model": loaded.info, "edit": {"kind": edit.kind, "strength": edit.strength,
                                                    "size": edit.size, **edit.meta},
              "provenance": provenance or {}}
    (out / PATCH_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return out


def _patch_command(args: argparse.Namespace) -> int:
    from memprobe.intervene.suppress import METHODS, build_edit
    from memprobe.models import load_model
    from memprobe.results import provenance

    loaded = load_model(args.model)
    if args.edit:
        edit = load_edit(args.edit)
        if args.strength is not None:
            edit = edit.with_strength(args.strength)
    else:
        if args.method not in METHODS:
            raise MemprobeError(f"unknown --method {args.method!r}: choose one of {', '.join(METHODS)}")
        edit = build_edit(loaded, args.method, fraction=args.fraction,
                          strength=1.0 if args.strength is None else args.strength, seed=args.seed,
                          memorized_jsonl=args.memorized, control_jsonl=args.controls, progress=True)
    out = export_patched(loaded, edit, args.out, provenance=provenance(args.seed))
    print(f"wrote {out} ({edit.kind} edit, size {edit.size}, strength {edit.strength}); load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained('{out}')")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add `memprobe patch`."""
    from memprobe.intervene.suppress import METHODS

    p = subparsers.add_parser("patch", help="write a HF model directory with memorization suppression baked in")
    p.add_argument("--model", default="smollm2-135m", help="registered name or local HF/GGUF path")
    p.add_argument("--out", required=True, help="new directory for the patched model")
    p.add_argument("--method", default="low-rank-edit", help=f"how to build the edit: {', '.join(METHODS)}")
    p.add_argument("--strength", type=float, default=None,
                   help="scale of the edit: fraction of the neurons/direction removed, or of the learned "
                        "weight change (default 1)")
    p.add_argument("--fraction", type=float, default=0.00025,
                   help="share of all MLP neurons a neuron method edits (default: 12 of smollm2's 46,080)")
    p.add_argument("--edit", help="a saved edit (.safetensors from save_edit / experiments/suppress.py) instead of --method")
    p.add_argument("--memorized", help="JSONL of memorized texts to build from (default: the bundled corpus, labelled)")
    p.add_argument("--controls", help="JSONL of non-memorized texts to protect (default: bundled controls)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_patch_command)
