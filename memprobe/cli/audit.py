"""`memprobe audit`: a thin layer over memprobe.audit.Audit; its options are AuditConfig's fields
(generated, so a new field is a new flag) plus --out."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from memprobe.cli.options import add_config_options, config_from_args
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
    config = config_from_args(AuditConfig, args)
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
    from memprobe.audit import AuditConfig

    add_config_options(p, AuditConfig)
    p.add_argument("--out", help="audit directory (default: runs/audit-<model>-<hash>); re-running resumes")
    p.set_defaults(handler=_audit)
