"""`memprobe audit`: a thin layer over memprobe.audit.Audit."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from memprobe.cli.table import table
from memprobe.errors import MemprobeError


def _audit(args: argparse.Namespace) -> int:
    from memprobe.audit import Audit, AuditConfig, default_out

    if args.lab and args.texts:
        raise MemprobeError("--lab and --texts both give the texts: use one (a lab audits its members and "
                            "non-members)")
    if args.lab:  # a bad lab is refused before an audit directory is claimed for it
        from memprobe.lab import load_lab

        load_lab(args.lab)
    config = AuditConfig(model=args.model, texts=args.texts, quick=args.quick, seed=args.seed,
                         reference_model=args.reference_model, lab=args.lab)
    out = Path(args.out) if args.out else default_out(config)
    t = time.perf_counter()
    summary = Audit(config, out).run()
    print()
    print(table(summary["by_kind"], ["kind", "docs", "tokens", "memorized_token_rate", "k_extractable_rate",
                                     "mean_memorization_score"]))
    model = summary["model"] or {}
    print(f"\nmodel {model.get('name')} ({model.get('quantization')}); audit in {out} "
          f"({time.perf_counter() - t:.0f} s); results: {out / 'results.json'}")
    return 0


def add_audit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--texts", help="JSONL texts {id, text, ...} (default: the bundled corpus)")
    p.add_argument("--out", help="audit directory (default: runs/audit-<model>-<hash>); re-running resumes")
    p.add_argument("--quick", action="store_true", help="a few texts per kind (for tests, < 2 min)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference-model", help="report memorization beyond this model (the audited model's base; "
                   "same tokenizer): per-text ref score, per-token log-prob gain, calibrated labels")
    p.add_argument("--lab", help="a membership lab directory (memprobe lab build) the model was fine-tuned on: "
                   "MIA ROC/AUC, canary exposure and PII extraction against known membership")
    p.set_defaults(handler=_audit)
