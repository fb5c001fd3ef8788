"""Where the default `memprobe audit` spends its time: every step timed, over rounds.

Round 0 is the audit from scratch in a fresh directory (what a user waits for; the model load falls
into the first step that needs it, and is also timed alone). Each later round re-times every step
once more on the same audit directory, in an order rotated by one step per round (so drift of the
machine's load spreads over steps): a step's done-record is removed, the audit re-runs, and only that
step (plus any step whose inputs it changed) recomputes; the steps depend on each other's outputs, so
a step cannot be timed without its predecessors' outputs. Per step: every round's seconds, the median
and the minimum; the sub-timings the audit records inside a step (capture, greedy extraction, ...)
are kept per round too. Run it on an idle machine: the load average at start and end is recorded.

    .venv/bin/python benchmarks/bench_audit.py                  # smollm2-135m, bundled corpus, 3 rounds
    .venv/bin/python benchmarks/bench_audit.py --before 3c30fc5 --rounds 2   # before/after, from scratch

With --before COMMIT, each round runs the whole audit from scratch twice, in fresh processes: once
with the code of COMMIT (a temporary git worktree) and once with this tree's, in an order that
alternates by round; per step, both versions' seconds (the audit's own `timings_s`) in one table.
    .venv/bin/python benchmarks/bench_audit.py --quick --out /tmp/a.json   # tiny model, --quick audit
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _records(out: Path) -> dict[str, Path]:
    """Step name -> its done-record (memprobe.studies.cache writes `steps/<slug>.done.json`)."""
    found = {}
    for record in sorted((out / "steps").glob("*.done.json")):
        found[json.loads(record.read_text())["step"]] = record
    return found


def _run(audit, quiet: bool) -> None:
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        audit.run()


def bench(model: str, quick: bool, rounds: int, work: Path, quiet: bool) -> dict:
    from memprobe.audit import Audit, AuditConfig
    from memprobe.models import load_model

    t = time.perf_counter()
    load_model(model)
    load_seconds = time.perf_counter() - t  # alone, for reference; the audit loads its own copy
    config = AuditConfig(model=model, quick=quick)
    out = work / "audit"
    audit = Audit(config, out)
    t = time.perf_counter()
    _run(audit, quiet)
    total = time.perf_counter() - t
    steps = list(_records(out))
    per_step = {s: [audit.cache.seconds(s)] for s in steps}
    inner = {k: [v] for k, v in audit.timings.items() if k not in per_step}
    for r in range(1, rounds):
        order = steps[r % len(steps):] + steps[: r % len(steps)]
        for step in order:
            record = _records(out)[step]
            record.unlink()
            record.with_name(record.name.replace(".done.json", ".started.json")).unlink(missing_ok=True)
            _run(audit, quiet)
            per_step[step].append(audit.cache.seconds(step))
            for k in inner:
                if audit.timings.get(k) is not None and len(inner[k]) < r + 1 and step in _owner(k):
                    inner[k].append(audit.timings[k])
    medians = {s: float(np.median(v)) for s, v in per_step.items()}
    return {
        "model": model, "quick": quick, "rounds": rounds, "model_load_seconds": load_seconds,
        "from_scratch_seconds": total, "step_order": steps,
        "seconds_per_round": per_step, "median_seconds": medians,
        "min_seconds": {s: float(min(v)) for s, v in per_step.items()},
        "sum_of_medians_seconds": float(sum(medians.values())),
        "inside_steps_seconds_per_round": inner,
    }


def _owner(inner_key: str) -> tuple[str, ...]:
    """The steps whose run records an inner timing (the label step times its capture and its decode)."""
    return ("label",) if inner_key in ("capture", "greedy extraction", "reference forward") else ()


_AUDIT = """
import json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(int(sys.argv[4]))
from memprobe.audit import Audit, AuditConfig
t = time.perf_counter()
audit = Audit(AuditConfig(model=sys.argv[1], quick=sys.argv[2] == "1"), Path(sys.argv[3]))
audit.run()
seconds = time.perf_counter() - t
out = Path(sys.argv[3])
summary = json.loads((out / "results.json").read_text())
labels = [json.loads(line) for line in (out / "labels.jsonl").read_text().splitlines() if line.strip()]
probes, supp = summary.get("probes", {}), summary.get("suppression", {})
best = probes.get("per_site", {}).get(probes.get("best_site"), {}).get("probe", {})
chosen = supp.get("chosen", {})
findings = {
    "memorized_texts": sorted(r["id"] for r in labels
                              if r.get("role") == "candidate" and (r.get("memorized_fraction") or 0) >= 0.5),
    "probe_best_site": probes.get("best_site"), "probe_auc": best.get("roc_auc"),
    "probe_auc_ci95": best.get("roc_auc_ci95"),
    "suppression_strength": chosen.get("strength"), "suppression": chosen.get("suppression"),
    "suppression_ci95": chosen.get("suppression_ci95"), "ppl_change": chosen.get("ppl_change"),
    "ppl_change_ci95": chosen.get("ppl_change_ci95"),
}
print(json.dumps({"seconds": seconds, "steps": audit.timings, "findings": findings}))
"""


def _from_scratch(tree: Path, model: str, quick: bool, work: Path, threads: int) -> dict:
    """One whole audit in a fresh process with the code in `tree`: its wall time, step timings and
    findings (memorized texts, best probe AUC, chosen suppression), so that a speed-up that changed a
    finding shows beside its timings."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(tree)}
    run = subprocess.run([sys.executable, "-c", _AUDIT, model, "1" if quick else "0", str(work), str(threads)],
                         cwd=tree, env=env, capture_output=True, text=True, check=False)
    if run.returncode:
        raise RuntimeError(f"the audit at {tree} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def commit_worktree(before: str, tree: Path):  # noqa: ANN201 - yields (tree, full commit hash)
    """A temporary git worktree of `before` at `tree` (the code a before/after benchmark runs)."""
    import subprocess

    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), before], check=True,
                   capture_output=True)
    try:
        yield tree, subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True,
                                   check=True).stdout.strip()
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)


def compare(before: str, model: str, quick: bool, rounds: int, work: Path, threads: int) -> dict:
    """Before (COMMIT) and after (this tree), each from scratch once per round, order alternating."""
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    with commit_worktree(before, work / "before") as (tree, commit):
        for r in range(rounds):
            for version in (("before", "after") if r % 2 == 0 else ("after", "before")):
                code = tree if version == "before" else ROOT
                runs[version].append(_from_scratch(code, model, quick, work / f"{version}-{r}", threads))
    steps = list(dict.fromkeys([*runs["before"][0]["steps"], *runs["after"][0]["steps"]]))
    table = {s: {v: (float(np.median([x["steps"][s] for x in runs[v]]))
                     if all(s in x["steps"] for x in runs[v]) else None) for v in runs} for s in steps}
    total = {v: float(np.median([x["seconds"] for x in runs[v]])) for v in runs}
    return {"model": model, "quick": quick, "rounds": rounds, "before_commit": commit,
            "runs": runs, "median_step_seconds": table, "median_from_scratch_seconds": total,
            "speedup_from_scratch": total["before"] / total["after"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny-llama and `audit --quick` (for tests)")
    ap.add_argument("--model", help="default smollm2-135m (--quick: tiny-llama)")
    ap.add_argument("--rounds", type=int, help="default 3 (--quick: 2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_audit.json")
    ap.add_argument("--verbose", action="store_true", help="show the audit's own output")
    ap.add_argument("--before", help="a commit to compare against (each round: both, from scratch)")
    args = ap.parse_args()
    import torch

    from memprobe.results import save_results

    torch.set_num_threads(args.threads)
    model = args.model or ("tiny-llama" if args.quick else "smollm2-135m")
    rounds = args.rounds or (2 if args.quick else 3)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as work:
        if args.before:
            results = compare(args.before, model, args.quick, rounds, Path(work), args.threads)
            shown = ("median_from_scratch_seconds", "speedup_from_scratch", "median_step_seconds")
        else:
            results = bench(model, args.quick, rounds, Path(work), quiet=not args.verbose)
            shown = ("from_scratch_seconds", "median_seconds", "sum_of_medians_seconds")
    results.update({"threads": args.threads, "load_average_at_start": load_start,
                    "load_average_at_end": os.getloadavg()})
    save_results(args.out, results, seed=0)
    print(json.dumps({k: results[k] for k in shown}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
