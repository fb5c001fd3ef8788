"""`memprobe patch`: build (or load) a suppression edit and bake it into a HF model directory,
through memprobe.intervene.suppress and memprobe.intervene.export."""

from __future__ import annotations

import argparse

from memprobe.errors import MemprobeError


def _patch(args: argparse.Namespace) -> int:
    from memprobe.intervene.ablation import load_edit
    from memprobe.intervene.export import export_patched
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


def add_patch(p: argparse.ArgumentParser) -> None:
    from memprobe.intervene.suppress import METHODS

    p.add_argument("--model", default="smollm2-135m", help="registered name or local HF/GGUF path")
    p.add_argument("--out", required=True, help="new directory for the patched model")
    p.add_argument("--method", default="low-rank-edit", help=f"how to build the edit: {', '.join(METHODS)}")
    p.add_argument("--strength", type=float, default=None,
                   help="scale of the edit: fraction of the neurons/direction removed, or of the learned "
                        "weight change (default 1)")
    p.add_argument("--fraction", type=float, default=0.00025,
                   help="share of all MLP neurons a neuron method edits (default: 12 of smollm2's 46,080)")
    p.add_argument("--edit", help="a saved edit (.safetensors from save_edit / experiments/suppress.py) "
                   "instead of --method")
    p.add_argument("--memorized", help="JSONL of memorized texts to build from (default: the bundled corpus, "
                   "labelled)")
    p.add_argument("--controls", help="JSONL of non-memorized texts to protect (default: bundled controls)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_patch)
