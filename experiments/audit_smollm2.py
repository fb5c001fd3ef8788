"""The default audit (`memprobe audit` on smollm2-135m and the bundled corpus), recorded for the README:
its summary goes to experiments/results/audit_smollm2.json (with step timings and wall time) and a
screenshot of its report, checked in headless Chromium first, to figures/audit_report.png.

    .venv/bin/python experiments/audit_smollm2.py [--audit-dir DIR]
    .venv/bin/python experiments/audit_smollm2.py --quick --out /tmp/a.json --figure /tmp/a.png  # tiny-llama

An existing --audit-dir resumes (finished steps are reused, so their timings are the first run's).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from memprobe.audit import Audit, AuditConfig
from memprobe.browser import check_page, screenshot
from memprobe.errors import MemprobeError
from memprobe.results import save_results

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--audit-dir", type=Path, default=ROOT / "runs" / "audit-smollm2-default")
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "audit_smollm2.json")
    ap.add_argument("--figure", type=Path, default=ROOT / "figures" / "audit_report.png")
    ap.add_argument("--quick", action="store_true", help="the quick audit of a random tiny-llama (plumbing only)")
    args = ap.parse_args()
    config = AuditConfig(model="tiny-llama", quick=True) if args.quick else AuditConfig()
    if args.quick and args.audit_dir == ap.get_default("audit_dir"):
        args.audit_dir = ROOT / "runs" / "audit-tiny-llama-quick"
    t = time.perf_counter()
    Audit(config, args.audit_dir).run()
    wall = time.perf_counter() - t
    summary = json.loads((args.audit_dir / "results.json").read_text())
    page = check_page(args.audit_dir / "report.html")
    if not page.ok:
        raise MemprobeError(f"the report did not render cleanly: {page}")
    screenshot(args.audit_dir / "report.html", args.figure)
    summary["wall_seconds_this_invocation"] = wall
    summary["report_check"] = {"figures": page.figures, "console_errors": page.console_errors}
    save_results(args.out, summary, seed=0)
    steps = summary["timings_s"]
    print(f"audit step timings (as first run): {', '.join(f'{k} {v:.0f} s' for k, v in steps.items())}; "
          f"wall {wall:.0f} s (inner timings such as capture sit inside label); wrote {args.out} and {args.figure}")


if __name__ == "__main__":
    main()
