"""Pointwise SMI speed and memory: 50k samples x 576 dims x 2000 directions (smollm2-135m's width).

Peers measured in the same run, each in a fresh subprocess (so peak RSS is its own):
- matmul: the bare projection X @ theta^T (one float32 matmul, result materialised) = 1x.
- psmi: memprobe.predict.pointwise_smi, blocked (bounded memory): each block of directions is projected
  once for all samples (class variances and scores both read it), and the per-element work (10 class
  log-densities, their logsumexp) runs in memprobe's C kernel (predict/native.py). The first call, which
  may build that kernel when it is not in the cache yet, is timed apart (first_call_seconds) from the
  steady state (seconds, best of --repeats).
- loop: the straightforward per-direction loop (numpy matvec + scipy.stats.norm.logpdf per direction),
  timed on --loop-directions directions and scaled linearly to all of them; its PSMI on those directions is
  checked against pointwise_smi's.

    python benchmarks/bench_smi.py              # writes benchmarks/results/bench_smi.json
    python benchmarks/bench_smi.py --quick      # small sizes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def make_data(n: int, d: int, n_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    means = rng.standard_normal((n_classes, d)).astype(np.float32)
    return (rng.standard_normal((n, d), dtype=np.float32) + means[y]), y


def loop_psmi(x: np.ndarray, y: np.ndarray, theta: np.ndarray) -> np.ndarray:
    from scipy.special import logsumexp
    from scipy.stats import norm

    classes = np.unique(y)
    log_priors = np.log(np.bincount(y) / y.size)
    out = np.zeros(y.size)
    for t in theta:
        z = x @ t
        mu = np.array([z[y == c].mean() for c in classes])
        sd = np.array([z[y == c].std() for c in classes])
        logp = norm.logpdf(z[:, None], mu, sd)
        out += logp[np.arange(y.size), y] - logsumexp(logp + log_priors, axis=1)
    return out / len(theta)


def worker(args: argparse.Namespace) -> None:
    """Run one peer and print a JSON line: seconds and peak RSS above the data."""
    import torch

    from memprobe.predict import pointwise_smi, random_directions
    from memprobe.resource_use import peak_rss_mb, reset_peak_rss

    torch.set_num_threads(args.threads)
    x, y = make_data(args.n, args.d, args.classes)
    theta = random_directions(args.directions, args.d, seed=0).astype(np.float32)
    xt, tt = torch.from_numpy(x), torch.from_numpy(theta)
    (xt[:256] @ tt.T).sum()  # warm up the BLAS
    base = reset_peak_rss()
    out: dict = {}
    if args.mode == "matmul":
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            z = xt @ tt.T
            times.append(time.perf_counter() - t0)
            del z
        out["seconds"] = min(times)
    elif args.mode == "psmi":
        times = []
        for _ in range(args.repeats + 1):
            t0 = time.perf_counter()
            p = pointwise_smi(x, y, directions=theta)
            times.append(time.perf_counter() - t0)
        out["first_call_seconds"] = times[0]  # includes building the C kernel if not cached on disk
        out["seconds"] = min(times[1:])
        out["finite"] = bool(np.isfinite(p).all())
        from memprobe.predict import native

        out["native_kernel"] = native.load() is not None
    else:  # loop, on a subset of directions, checked against the vectorised result
        sub = theta[: args.loop_directions]
        t0 = time.perf_counter()
        ref = loop_psmi(x.astype(np.float64), y, sub.astype(np.float64))
        measured = time.perf_counter() - t0
        out["seconds_measured"] = measured
        out["directions_measured"] = len(sub)
        out["seconds"] = measured * args.directions / len(sub)
        out["max_abs_diff_vs_pointwise_smi"] = float(np.abs(pointwise_smi(x, y, directions=sub) - ref).max())
    out["peak_rss_above_data_mb"] = peak_rss_mb() - base
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--directions", type=int, default=2000)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--loop-directions", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--mode", choices=["matmul", "psmi", "loop"], help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_smi.json"))
    args = ap.parse_args()
    if args.quick:
        args.n, args.directions, args.loop_directions, args.repeats = 5000, 200, 20, 1
    if args.mode:
        worker(args)
        return
    peers = {}
    for mode in ("matmul", "psmi", "loop"):
        cmd = [sys.executable, __file__, "--mode", mode, *[f"--{k.replace('_', '-')}={v}" for k, v in (
            ("n", args.n), ("d", args.d), ("directions", args.directions), ("classes", args.classes),
            ("loop_directions", args.loop_directions), ("repeats", args.repeats), ("threads", args.threads))]]
        run = subprocess.run(cmd, capture_output=True, text=True, check=True)
        peers[mode] = json.loads(run.stdout.strip().splitlines()[-1])
        print(mode, peers[mode], flush=True)
    base = peers["matmul"]["seconds"]
    result = {
        "shape": {"n": args.n, "d": args.d, "directions": args.directions, "classes": args.classes},
        "threads": args.threads, "load_average_1min_at_end": os.getloadavg()[0],
        "peers": peers,
        "time_ratio_to_projection_matmul": {k: v["seconds"] / base for k, v in peers.items()},
        "psmi_speedup_over_loop": peers["loop"]["seconds"] / peers["psmi"]["seconds"],
        "projection_result_mb": args.n * args.directions * 4 / 2**20,
        "note": "ratios use the fastest of --repeats runs of each peer, measured in the same invocation; "
                "the loop is timed on loop-directions directions and scaled linearly",
    }
    from memprobe.results import save_results

    save_results(args.out, result, seed=0)
    print(json.dumps({k: result[k] for k in ("time_ratio_to_projection_matmul", "psmi_speedup_over_loop")}))


if __name__ == "__main__":
    main()
