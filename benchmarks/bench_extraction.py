"""PII extraction cost (`memprobe.mia.extraction.pii_extraction`, greedy + samples per PII prompt): this
tree against a commit, each in a fresh process, rounds in rotating order, on one split of the
`defense` lab as the defenses study evaluates it. The outputs are compared occurrence by occurrence
(the same continuations, the same extracted values), so a speed-up that changes a finding shows.

    .venv/bin/python benchmarks/bench_extraction.py --before f31e640 [--model PATH] [--rounds 2]
    .venv/bin/python benchmarks/bench_extraction.py --quick --before HEAD --out /tmp/bench_ext.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_once(model: str, preset: str, split: str, samples: int, batch_size: int, out: Path) -> None:
    """Time pii_extraction on `split` of a freshly built lab; write timings and occurrences."""
    import torch

    from memprobe.defend.evaluate import split_lab
    from memprobe.lab.corpus import build_lab, load_lab
    from memprobe.mia.extraction import pii_extraction
    from memprobe.models import load_model

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    with tempfile.TemporaryDirectory(prefix="bench-ext-lab-") as lab:
        build_lab(lab, preset=preset, seed=0)
        members, nonmembers, _ = load_lab(lab)
    part = split_lab(members, nonmembers, seed=0)[split]
    docs = [d for d in part["members"] + part["nonmembers"] if d.get("pii_spans")]
    loaded = load_model(model)
    t = time.perf_counter()
    ext = pii_extraction(loaded, docs, n_samples=samples, seed=0, batch_size=batch_size)
    seconds = time.perf_counter() - t
    out.write_text(json.dumps({"seconds": seconds, "documents": len(docs), "ter": ext["ter"],
                               "occurrences": [{k: o.get(k) for k in ("doc_id", "span_index", "extracted",
                                                                      "continuations")}
                                               for o in ext["occurrences"]]}))


def compare(before: str, model: str, preset: str, split: str, samples: int, batch_size: int, rounds: int,
            work: Path) -> dict:
    from bench_audit import commit_worktree  # benchmarks/ is the script's directory, on sys.path

    runs: dict[str, list[dict]] = {"before": [], "after": []}
    with commit_worktree(before, work / "before") as (tree, commit):
        for r in range(rounds):
            for version in (("before", "after") if r % 2 == 0 else ("after", "before")):
                out = work / f"{version}-{r}.json"
                code = tree if version == "before" else ROOT
                env = {**os.environ, "PYTHONPATH": str(code)}
                subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one", str(out), "--model", model,
                                "--preset", preset, "--split", split, "--samples", str(samples),
                                "--batch-size", str(batch_size)], check=True, env=env, cwd=code)
                runs[version].append(json.loads(out.read_text()))
                print(f"round {r} {version}: {runs[version][-1]['seconds']:.1f} s", flush=True)
    a, b = runs["before"][0]["occurrences"], runs["after"][0]["occurrences"]
    same_cont = sum(x["continuations"] == y["continuations"] for x, y in zip(a, b, strict=True))
    same_ext = sum(x["extracted"] == y["extracted"] for x, y in zip(a, b, strict=True))
    best = {v: min(r["seconds"] for r in rs) for v, rs in runs.items()}
    return {"model": model, "lab_preset": preset, "split": split, "documents": runs["after"][0]["documents"],
            "occurrences": len(b), "samples_per_prompt": samples, "batch_size": batch_size, "rounds": rounds,
            "before_commit": commit, "seconds_per_round": {v: [r["seconds"] for r in rs] for v, rs in runs.items()},
            "seconds_best": best, "speedup": best["before"] / best["after"],
            "ter": {v: rs[0]["ter"] for v, rs in runs.items()},
            "same_continuations": f"{same_cont}/{len(b)}", "same_extracted": f"{same_ext}/{len(b)}",
            "load_average_end": list(os.getloadavg())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", help="the commit to compare against")
    ap.add_argument("--model", default=None, help="model name or fine-tune directory (default smollm2-135m)")
    ap.add_argument("--quick", action="store_true", help="tiny-llama on the tiny lab")
    ap.add_argument("--preset", default=None)
    ap.add_argument("--split", default="test")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_extraction.json"))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one timed run into this file
    args = ap.parse_args()
    model = args.model or ("tiny-llama" if args.quick else "smollm2-135m")
    preset = args.preset or ("tiny" if args.quick else "defense")
    if args.one:
        run_once(model, preset, args.split, args.samples, args.batch_size, Path(args.one))
        return
    if not args.before:
        ap.error("give --before COMMIT")
    from memprobe.results import save_results

    with tempfile.TemporaryDirectory(prefix="bench-ext-") as work:
        results = compare(args.before, model, preset, args.split, args.samples, args.batch_size, args.rounds,
                          Path(work))
    save_results(args.out, results, seed=0)
    print(json.dumps({k: results[k] for k in ("seconds_best", "speedup", "same_continuations", "same_extracted")}))


if __name__ == "__main__":
    main()
