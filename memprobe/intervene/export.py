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

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memprobe.adapters import adapter_for
from memprobe.errors import MemprobeError
from memprobe.intervene.ablation import Edit, LowRankEdit, NeuronEdit, load_edit

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
