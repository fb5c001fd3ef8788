"""Distributed capture: one process vs Ray Data with 1 and 2 local workers on the same plan.

Every run captures the same plan (whole documents cut from the bundled corpus) and its store is
checked byte-identical to the one-process job's. Reported: wall times, the 2-vs-1 worker ratio (on a
2-core machine it measures the engine's overhead, not a speed-up: both workers share two cores), the
engine's start-up (plan, actors, model load) and overhead per plan entry (Ray wall time with 1 worker
not spent inside the shard function, per entry), and a
PROJECTION of the wall time for 1e9 tokens on --project-workers workers from the per-worker token
rate measured here. The projection assumes each worker runs at the rate measured on this machine;
a GPU worker's rate is not measured here.

    .venv/bin/python benchmarks/bench_distributed.py [--tokens 20000] [--project-workers 8]
    .venv/bin/python benchmarks/bench_distributed.py --quick --out /tmp/bench_distributed.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITES = "blocks.*.hook_resid_post"
DOC_TOKENS = 256


def corpus(loaded, n_tokens: int, path: Path) -> Path:
    """Documents of DOC_TOKENS tokens cut from the bundled corpus, cycled up to n_tokens, as JSONL."""
    from memprobe.corpora import bundled_corpus
    from memprobe.jsonl import write_jsonl

    stream: list[int] = []
    for d in bundled_corpus(None, include_model_samples=False):
        stream += loaded.encode(d["text"] + "\n\n")
    n_docs = -(-n_tokens // DOC_TOKENS)
    docs = [{"id": f"bench-{k:05d}", "text": loaded.decode([stream[(k * DOC_TOKENS + j) % len(stream)]
                                                           for j in range(DOC_TOKENS)])} for k in range(n_docs)]
    return write_jsonl(path, docs)


def store_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())
            if p.name == "manifest.json" or p.name.startswith("shard-")}


def entry_records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("entry-*.json"))]


def timed_job(model_ref: str, inputs: Path, out: Path, args, **kwargs) -> dict:
    from memprobe.distributed.job import capture_job

    started, started_unix = time.perf_counter(), time.time()
    _, report = capture_job(model_ref, inputs, SITES, out, batch_tokens=args.batch_tokens,
                            entry_tokens=args.entry_tokens, **kwargs)
    wall = time.perf_counter() - started
    records = entry_records(out)
    first = min(r["started_unix"] for r in records) - started_unix  # planning, actor start-up
    workers = len({(r["host"], r["pid"]) for r in records})
    busy = sum(r["seconds"] + r["load_seconds"] for r in records) / workers
    return {"wall_s": wall, "entries": len(records), "workers_seen": workers,
            "until_first_entry_s": first,
            "model_load_s_mean": statistics.mean(r["load_seconds"] for r in records if r["load_seconds"] > 0.01)
            if any(r["load_seconds"] > 0.01 for r in records) else 0.0,
            "entry_seconds_mean": statistics.mean(r["seconds"] for r in records),
            "overhead_per_entry_s": (wall - first - busy) / len(records),
            "tokens": sum(r["n_tokens"] for r in records), "computed": len(report.computed)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny random model and corpus (a smoke test)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--entry-tokens", type=int, default=4096)
    ap.add_argument("--project-workers", type=int, default=8, help="workers of the 1e9-token projection")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_distributed.json")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import ray
    import torch

    from memprobe.distributed.job import EngineOptions
    from memprobe.models import load_model, tiny_model
    from memprobe.results import save_results

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    if args.quick:
        tiny = tiny_model("llama")
        tiny.model.save_pretrained(work / "model")
        tiny.tokenizer.save_pretrained(work / "model")
        model_ref, args.tokens, args.batch_tokens, args.entry_tokens = str(work / "model"), 3000, 512, 1024
    else:
        model_ref = args.model
    loaded = load_model(model_ref)
    inputs = corpus(loaded, args.tokens, work / "input.jsonl")

    runs = {"process": timed_job(model_ref, inputs, work / "process", args, loaded=loaded)}
    reference = store_bytes(work / "process")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for n in (1, 2):
            out = work / f"ray-{n}"
            runs[f"ray_{n}_workers"] = timed_job(model_ref, inputs, out, args,
                                                 options=EngineOptions(engine="ray", workers=n))
            runs[f"ray_{n}_workers"]["identical_to_process"] = store_bytes(out) == reference
    finally:
        ray.shutdown()
    assert all(r.get("identical_to_process", True) for r in runs.values()), "a distributed store differs"

    one, two, local = runs["ray_1_workers"], runs["ray_2_workers"], runs["process"]
    tokens = local["tokens"]
    rate = tokens / (local["entries"] * local["entry_seconds_mean"])  # per worker, inside the shard function
    overhead = one["overhead_per_entry_s"]  # scheduling, result transfer and merge, per entry
    startup = one["until_first_entry_s"] + one["model_load_s_mean"]
    n_entries_1e9 = 1e9 / args.entry_tokens
    projected = startup + (1e9 / rate + n_entries_1e9 * max(overhead, 0.0)) / args.project_workers
    results = {
        "model": loaded.info, "sites": SITES, "tokens": tokens, "entries": local["entries"],
        "batch_tokens": args.batch_tokens, "entry_tokens": args.entry_tokens, "cpu_count": os.cpu_count(),
        "runs": runs,
        "ray_2_vs_1_worker_speedup": one["wall_s"] / two["wall_s"],
        "speedup_note": f"{os.cpu_count()} cores: two workers share them, so this ratio shows engine "
                        "overhead, not the speed-up of a cluster",
        "engine_overhead_per_entry_s": overhead,
        "engine_startup_s": startup,
        "per_worker_tokens_per_s": rate,
        "projection_1e9_tokens": {
            "LABEL": "PROJECTION, not a measurement",
            "workers": args.project_workers,
            "wall_hours": projected / 3600,
            "assumes": "each worker runs at the per-worker token rate measured here "
                       f"({rate:,.0f} tokens/s, {loaded.info.get('name')}, CPU, torch threads 1) plus the "
                       "measured engine start-up and overhead per entry; a GPU worker's rate is not "
                       "measured here",
        },
    }
    save_results(args.out, results, seed=0, quick=args.quick)
    print(f"tokens {tokens} in {local['entries']} entries; process {local['wall_s']:.1f} s, "
          f"ray x1 {one['wall_s']:.1f} s, ray x2 {two['wall_s']:.1f} s (x2/x1 speed-up "
          f"{results['ray_2_vs_1_worker_speedup']:.2f}: {results['speedup_note']})")
    print(f"Ray start-up (plan, actors, model load) {startup:.1f} s; overhead per entry {overhead:.3f} s; "
          f"per-worker rate {rate:,.0f} tokens/s")
    print(f"PROJECTION (not measured): 1e9 tokens on {args.project_workers} workers at this rate: "
          f"{projected / 3600:,.1f} h")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
