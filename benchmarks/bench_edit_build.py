"""The defense study's learned-edit build: time against the fine-tune, and the Adam schedule it uses.

On the defense lab's undefended fine-tune (what `experiments/defenses_smollm2.py --full-ft` trains),
with the study's split: label the build split's memorized tokens once, then for each schedule
(steps @ lr, about the same steps x lr) train the edit on the build split and measure it on the
VALIDATION split: the fraction of validation members' memorized tokens it removes and the change of
perplexity on validation non-members, at strengths 0.5 and 1.0. Every time sits beside the 30-step
schedule's (the library default) and the fine-tune's own training time (its provenance), so the
issue's budget (build <= 10% of the fine-tune) is checked in the same run.

The schedule the study uses is chosen here by one rule, on validation only: the fewest steps whose
suppression at strength 1.0 is at least the 30-step schedule's and whose perplexity change is no
larger. The test split is not touched.

    .venv/bin/python benchmarks/bench_edit_build.py --lab RUN/lab --finetuned RUN/models/baseline
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SCHEDULES = ("30@3e-3", "15@6e-3", "12@8e-3", "10@1e-2", "8@1.25e-2")
STRENGTHS = (0.5, 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lab", type=Path, required=True, help="the defense lab directory the study made")
    ap.add_argument("--finetuned", type=Path, required=True, help="the study's undefended fine-tune")
    ap.add_argument("--schedules", nargs="+", default=list(SCHEDULES), help="STEPS@LR, the first is the reference")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_edit_build.json")
    args = ap.parse_args()
    import torch

    from memprobe.defend.evaluate import split_lab
    from memprobe.defend.posthoc import memorized_targets
    from memprobe.errors import MemprobeError
    from memprobe.intervene.ablation import hooked_edit
    from memprobe.intervene.suppress import targets_from_labels
    from memprobe.intervene.weight_edit import train_low_rank_edit
    from memprobe.lab.corpus import load_lab
    from memprobe.labels import token_labels
    from memprobe.models import load_model
    from memprobe.results import save_results

    schedules = []
    for text in args.schedules:
        steps, _, lr = text.partition("@")
        if not steps.isdigit() or not lr:
            raise MemprobeError(f"schedule {text!r}: write STEPS@LR, e.g. 12@8e-3")
        schedules.append((int(steps), float(lr)))
    provenance = args.finetuned / "memprobe-finetune.json"
    if not provenance.exists():
        raise MemprobeError(f"{provenance} is missing: give the directory a memprobe fine-tune wrote")
    finetune_seconds = json.loads(provenance.read_text())["train_seconds"]
    torch.set_num_threads(args.threads)
    loaded = load_model(str(args.finetuned))
    members, nonmembers, _ = load_lab(args.lab)
    splits = split_lab(members, nonmembers, seed=0)
    build, validation = splits["build"], splits["validation"]

    started = time.perf_counter()
    memorized, _ = memorized_targets(loaded, build["members"])
    controls = targets_from_labels([loaded.encode(d["text"])[:256] for d in build["nonmembers"]])
    label_seconds = time.perf_counter() - started

    val_members = [loaded.encode(d["text"])[:256] for d in validation["members"]]
    val_nonmembers = [loaded.encode(d["text"])[:256] for d in validation["nonmembers"]]

    def measure() -> tuple[int, float]:
        memorized_tokens = sum(int(lab.memorized[1:].sum()) for lab in token_labels(loaded.model, val_members))
        losses = np.concatenate([lab.loss[1:] for lab in token_labels(loaded.model, val_nonmembers)])
        return memorized_tokens, float(np.exp(losses.mean()))

    base_memorized, base_ppl = measure()
    rows = []
    for steps, lr in schedules:
        started = time.perf_counter()
        edit = train_low_rank_edit(loaded.model, memorized, controls, seed=0, steps=steps, lr=lr)
        train_seconds = time.perf_counter() - started
        row = {"steps": steps, "lr": lr, "train_seconds": round(train_seconds, 1),
               "build_seconds": round(label_seconds + train_seconds, 1), "final_loss": edit.meta["final"]}
        for strength in STRENGTHS:
            with hooked_edit(loaded.model, edit.with_strength(strength)):
                kept, ppl = measure()
            row[f"strength_{strength}"] = {"memorized_token_reduction": round(1 - kept / base_memorized, 4),
                                           "ppl_change": round(ppl / base_ppl - 1, 4)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    reference = rows[0]
    for row in rows:
        row["train_speedup_vs_reference"] = round(reference["train_seconds"] / row["train_seconds"], 2)
        row["build_share_of_finetune"] = round(row["build_seconds"] / finetune_seconds, 4)
    ref_at_1 = reference["strength_1.0"]
    keeps = [r for r in rows if r["strength_1.0"]["memorized_token_reduction"] >= ref_at_1["memorized_token_reduction"]
             and r["strength_1.0"]["ppl_change"] <= ref_at_1["ppl_change"]]
    chosen = min(keeps, key=lambda r: r["steps"])
    results = {
        "finetuned": str(args.finetuned), "finetune_train_seconds": finetune_seconds,
        "label_seconds": round(label_seconds, 1), "threads": args.threads,
        "build_split": {"memorized_texts": len(memorized), "memorized_tokens": int(sum(int(t.positions.sum()) for t in memorized)),
                        "controls": len(controls)},
        "validation": {"members": len(val_members), "nonmembers": len(val_nonmembers),
                       "memorized_tokens_unedited": base_memorized, "ppl_unedited": round(base_ppl, 4)},
        "schedules": rows,
        "chosen": {"steps": chosen["steps"], "lr": chosen["lr"],
                   "rule": "fewest steps with validation suppression at strength 1.0 >= the reference "
                           "schedule's and perplexity change <= its"},
    }
    save_results(args.out, results, seed=0)
    print(f"fine-tune {finetune_seconds:.0f} s; labels {label_seconds:.1f} s")
    for r in rows:
        s1 = r["strength_1.0"]
        print(f"{r['steps']:>3} steps @ {r['lr']:g}: train {r['train_seconds']:6.1f} s "
              f"({r['train_speedup_vs_reference']:.2f}x vs {reference['steps']} steps), build "
              f"{r['build_share_of_finetune']:.1%} of the fine-tune; validation at 1.0: "
              f"{s1['memorized_token_reduction']:.1%} fewer memorized tokens, perplexity {s1['ppl_change']:+.1%}")
    print(f"chosen: {chosen['steps']} steps @ {chosen['lr']:g} -> {args.out}")


if __name__ == "__main__":
    main()
