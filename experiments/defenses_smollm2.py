"""Defenses on smollm2-135m, judged on one ground: dedup, RMFT, DP-SGD, pruning, neuron ablation and
the learned edit, privacy (TER/SER, exposure, MIA) against utility (perplexity, top-1) on the
`small` membership lab; knobs chosen on validation, reported on test; MaxTER and AURC.

    .venv/bin/python experiments/defenses_smollm2.py --quick    # tiny-llama, tiny lab: a few minutes
    .venv/bin/python experiments/defenses_smollm2.py            # smollm2-135m: 6 LoRA fine-tunes

Expected real cost on 2 shared CPU cores: ~15 min per LoRA fine-tune (baseline, dedup, 2 x RMFT,
2 x DP-SGD, the DP ones slower for per-sample gradients) plus ~2-4 min per evaluated model and
split (17 models x 2 splits): about 3-4 hours. Every stage is cached under --out and a rerun
resumes from the last complete one. Results: experiments/results/defenses_<name>.json, figures/defenses_<name>.png and the edits and DP
LoRA adapters in experiments/results/defenses_<name>_artifacts (models and caches stay under --out,
default runs/, never committed).

    .venv/bin/python experiments/defenses_smollm2.py --cpu      # the grid sized for 2 CPU cores
    .venv/bin/python experiments/defenses_smollm2.py --cpu --full-ft   # full fine-tunes: a baseline that memorizes PII
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from memprobe.studies.defenses import ALL_METHODS, DefenseConfig, run_defenses

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(Path(__file__).resolve().relative_to(ROOT))  # the figure's footer: the same from any checkout


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model and tiny lab (the tested path)")
    p.add_argument("--cpu", action="store_true", help="smollm2 sized for 2 CPU cores (DefenseConfig.cpu)")
    p.add_argument("--full-ft", action="store_true",
                   help="with --cpu: full fine-tunes (DefenseConfig.cpu_full), the baseline that memorizes PII")
    p.add_argument("--out", default=None, help="work directory: lab, models, evaluation cache (default runs/...)")
    p.add_argument("--results", default=None, help="results JSON (default experiments/results/defenses_<name>.json)")
    p.add_argument("--figure", default=None, help="Pareto figure (default figures/defenses_<name>.png)")
    p.add_argument("--methods", nargs="+", choices=ALL_METHODS, help="a subset of the defenses (default: all)")
    p.add_argument("--lab", help="an existing lab directory (default: build one under --out)")
    p.add_argument("--finetuned", help="an existing undefended fine-tune of the model (default: train one)")
    p.add_argument("--edit-strengths", type=float, nargs="+", help="the learned edit's knob values (default: the config's)")
    p.add_argument("--sparsities", type=float, nargs="+", help="the pruning methods' knob values (default: the config's)")
    p.add_argument("--rmft-fractions", type=float, nargs="+", help="RMFT's knob values (default: the config's)")
    p.add_argument("--artifacts", default=None, help="edits and DP LoRA adapters, small enough to commit "
                   "(default experiments/results/defenses_<name>_artifacts; --quick: under --out)")
    p.add_argument("--table", metavar="RESULTS", help="print the markdown table of a saved results JSON and stop")
    p.add_argument("--replot", metavar="RESULTS", help="redraw the Pareto figure (to --figure) of a saved results "
                   "JSON and stop")
    args = p.parse_args(argv)
    if args.table or args.replot:
        import json

        from memprobe.defend.evaluate import DefenseStudy

        saved = DefenseStudy.from_dict(json.loads(Path(args.table or args.replot).read_text(encoding="utf-8")))
        if args.table:
            print(saved.markdown_table())
        else:
            if not args.figure:
                p.error("--replot needs --figure")
            saved.plot(args.figure, script=SCRIPT)
        return
    if args.full_ft and not args.cpu:
        p.error("--full-ft goes with --cpu")
    cfg = (DefenseConfig.quick() if args.quick else DefenseConfig.cpu_full() if args.full_ft
           else DefenseConfig.cpu() if args.cpu else DefenseConfig())
    if args.methods:
        cfg = replace(cfg, methods=tuple(args.methods))
    for knob in ("edit_strengths", "sparsities", "rmft_fractions"):
        if getattr(args, knob):
            cfg = replace(cfg, **{knob: tuple(getattr(args, knob))})
    name = ("quick" if args.quick else "smollm2_full_ft" if args.full_ft else "smollm2_cpu" if args.cpu
            else "smollm2")
    out = Path(args.out or ROOT / "runs" / f"defenses_{name}")  # lab, models, evaluation cache: not committed
    artifacts = Path(args.artifacts or (out / "artifacts" if args.quick
                                        else ROOT / "experiments" / "results" / f"defenses_{name}_artifacts"))
    study = run_defenses(cfg, out, progress=not args.quick, lab=args.lab, finetuned=args.finetuned,
                         artifacts=artifacts)
    results = Path(args.results or ROOT / "experiments" / "results" / f"defenses_{name}.json")
    figure = Path(args.figure or ROOT / "figures" / f"defenses_{name}.png")
    study.save(results)
    study.plot(figure, script=SCRIPT)
    print(f"wrote {results}, {figure} and {artifacts}")
    print(study.markdown_table())
    for method, row in study.summary().items():
        print(f"{method:16s} knob={row['chosen_knob']!s:10s} MaxTER@6%={row['max_ter_at_6pct']:.3f} "
              f"AURC={row['aurc_0_10pct']:.4f}")


if __name__ == "__main__":
    main()
