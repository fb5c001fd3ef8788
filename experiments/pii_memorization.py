"""Which PII a fine-tune of the `defense` lab can be made to emit, by value type and recurrence.

Why: a defense grid scored by total PII extraction (TER) only means something if the undefended
fine-tune extracts more PII than a model that never saw it. Here the protocol of
`memprobe.mia.extraction.pii_extraction` (64-token prompt before each value, greedy + n samples)
runs on the mails of the senders whose signature recurs in 4 or 8 member mails (their name, phone
and address repeat verbatim in each signature) and on non-member mails of the same template; per
value type it counts extracted member values beside the non-member rate (what the template and the
context alone give away: e-mail addresses are composed from the name in the same header).

    .venv/bin/python experiments/pii_memorization.py --finetuned runs/defenses_smollm2_cpu/models/baseline
    .venv/bin/python experiments/pii_memorization.py --epochs 4 --lr 1e-4 --full --name full_ft   # trains
    .venv/bin/python experiments/pii_memorization.py --quick --out /tmp/pii.json                  # tiny-llama

Without --finetuned the model is trained here (under runs/, never committed) with the study's
settings (`DefenseConfig.cpu`: LoRA, 4 epochs, lr 1e-3) unless overridden.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def by_type(occurrences: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per (member or not, value type): values and how many were extracted (a value counts once)."""
    values: dict[tuple[bool, str], dict[str, bool]] = defaultdict(dict)
    for occ in occurrences:
        if occ.get("skipped"):
            continue
        slot = values[(bool(occ["member"]), str(occ["type"]))]
        slot[occ["value_id"]] = slot.get(occ["value_id"], False) or bool(occ["extracted"])
    return {f"{'member' if m else 'nonmember'}:{t}": {"values": len(v), "extracted": sum(v.values()),
                                                       "rate": sum(v.values()) / len(v)}
            for (m, t), v in sorted(values.items())}


def main(argv: list[str] | None = None) -> None:
    from memprobe.defend.evaluate import doc_bootstrap, ter_of_documents
    from memprobe.lab.corpus import build_lab, load_lab
    from memprobe.lab.finetune import finetune
    from memprobe.mia.extraction import pii_extraction
    from memprobe.models import load_model
    from memprobe.results import save_results
    from memprobe.studies.defenses import DefenseConfig

    cfg = DefenseConfig.cpu()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny-llama on the tiny lab (plumbing only)")
    ap.add_argument("--lab", type=Path, help="a lab directory (default: the `defense` preset, built under runs/)")
    ap.add_argument("--finetuned", type=Path, help="an existing fine-tune of the lab's members")
    ap.add_argument("--epochs", type=int, default=cfg.epochs)
    ap.add_argument("--lr", type=float, default=cfg.lr)
    ap.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    ap.add_argument("--samples", type=int, default=cfg.evaluation.extraction_samples, help="samples per prompt")
    ap.add_argument("--nonmember-mails", type=int, default=8)
    ap.add_argument("--name", default="lora", help="names the results file and the work directory")
    ap.add_argument("--out", type=Path, help="results JSON (default experiments/results/pii_memorization_<name>.json)")
    args = ap.parse_args(argv)
    model, preset = ("tiny-llama", "tiny") if args.quick else (cfg.model, cfg.lab_preset)
    work = ROOT / "runs" / f"pii_memorization_{args.name}{'_quick' if args.quick else ''}"
    lab = args.lab or work / "lab"
    if not (lab / "manifest.json").exists():
        build_lab(lab, preset=preset, seed=cfg.lab_seed)
    members, nonmembers, _ = load_lab(lab)
    t = time.perf_counter()
    finetuned = args.finetuned
    if finetuned is None:
        finetuned = work / "model"
        finetune(model, members, finetuned, epochs=args.epochs, lr=args.lr, batch_size=cfg.batch_size,
                 seq_len=cfg.seq_len, lora=not args.full, seed=cfg.seed, progress=not args.quick)
    train_seconds = time.perf_counter() - t
    loaded = load_model(str(finetuned))
    recurring = ("person-8x", "person-4x", "person-2x") if args.quick else ("person-8x", "person-4x")
    mails = [d for d in members if d["kind"] == "email" and str(d["split_group"]).startswith(recurring)]
    mails += [d for d in nonmembers if d["kind"] == "email"][: args.nonmember_mails]
    t = time.perf_counter()
    ext = pii_extraction(loaded, mails, n_samples=args.samples, seed=cfg.seed, batch_size=16)
    per_doc: dict[str, dict[str, bool]] = defaultdict(dict)
    for occ in ext["occurrences"]:
        if occ["member"] and not occ.get("skipped"):
            per_doc[occ["doc_id"]][occ["value_id"]] = per_doc[occ["doc_id"]].get(occ["value_id"], False) or bool(
                occ["extracted"])

    results = {
        "model": loaded.info, "finetuned": str(finetuned), "lab_preset": preset,
        "training": {"epochs": args.epochs, "lr": args.lr, "lora": not args.full, "seconds": train_seconds}
        if args.finetuned is None else "given",
        "protocol": ext["protocol"], "member_mails": len(mails) - min(args.nonmember_mails, len(nonmembers)),
        "ter": ext["ter"], "ter_ci95": doc_bootstrap(list(per_doc.values()), ter_of_documents, n_boot=500, seed=0),
        "nonmember_extraction_rate": ext["nonmember_extraction_rate"],
        "ter_by_recurrence": ext["ter_by_recurrence"], "by_type": by_type(ext["occurrences"]),
        "phone_continuations": [{"value": o["value"], "continuations": o["continuations"]}
                                for o in ext["occurrences"] if o["member"] and o["type"] == "phone"][:6],
        "extraction_seconds": time.perf_counter() - t,
    }
    out = args.out or ROOT / "experiments" / "results" / f"pii_memorization_{args.name}.json"
    save_results(out, results, seed=cfg.seed)
    rows = ", ".join(f"{k} {v['extracted']}/{v['values']}" for k, v in results["by_type"].items())
    print(f"TER {results['ter']:.3f} (non-member {results['nonmember_extraction_rate']}); {rows}; wrote {out}")


if __name__ == "__main__":
    main()
