"""`memprobe defend`: one defense (all its knobs, or the given ones) against an undefended fine-tune,
on the lab's validation and test splits, through `memprobe.studies.defenses.run_defenses`."""

from __future__ import annotations

import argparse
from dataclasses import replace

KNOB_FIELD = {"rmft": "rmft_fractions", "dp": "dp_epsilons", "prune": "sparsities",
              "ablate": "ablate_fractions", "edit": "edit_strengths"}


def _defend(args: argparse.Namespace) -> int:
    from memprobe.errors import MemprobeError
    from memprobe.studies.defenses import DefenseConfig, run_defenses

    methods = ("prune-magnitude", "prune-wanda") if args.method == "prune" else (args.method,)
    cfg = replace(DefenseConfig(), model=args.model, methods=methods)
    if args.knob:
        if args.method not in KNOB_FIELD:
            raise MemprobeError(f"--knob: {args.method} has no knob (it runs one setting)")
        cfg = replace(cfg, **{KNOB_FIELD[args.method]: tuple(args.knob)})
    if args.fast_eval:
        cfg = replace(cfg, evaluation=DefenseConfig.quick().evaluation)
    study = run_defenses(cfg, args.out, lab=args.lab, finetuned=args.finetuned, progress=True,
                         artifacts=f"{args.out}/artifacts")
    study.plot(f"{args.out}/defenses.png")
    for method, row in study.summary().items():
        print(f"{method}: chosen knob {row['chosen_knob']} (validation), MaxTER@6% {row['max_ter_at_6pct']:.3f}, "
              f"AURC {row['aurc_0_10pct']:.4f} (test); {args.out}/defenses.json")
    return 0


def add_defend(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lab", required=True, help="membership lab directory (memprobe lab build)")
    p.add_argument("--model", required=True, help="the base model the fine-tune started from")
    p.add_argument("--finetuned", required=True, help="the undefended fine-tune (memprobe finetune --out)")
    p.add_argument("--method", required=True, choices=["dedup", "rmft", "dp", "prune", "ablate", "edit"])
    p.add_argument("--knob", type=float, nargs="+", help="settings to try (default: the study's)")
    p.add_argument("--fast-eval", action="store_true", help="fewer samples and bootstrap draws")
    p.add_argument("--out", required=True, help="work and result directory (a rerun resumes); the edits "
                   "and DP LoRA adapters also go to OUT/artifacts")
    p.set_defaults(handler=_defend)
