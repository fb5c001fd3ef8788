"""Capture speed and memory: memprobe capture vs plain HF forward, TransformerLens, nnsight.

Every residual-stream site (blocks.*.hook_resid_post) and every MLP-neuron site (blocks.*.mlp.hook_post)
of smollm2-135m over the same batches of the bundled corpus. Peers keep activations in memory (what
their users do); memprobe writes them to a checksummed store on disk, so its number includes the I/O.
Peak RSS of a whole capture is measured in fresh subprocesses at two corpus sizes. Each peer runs
--rounds times in rotating order and its best round counts (see run_peers).

    .venv/bin/python benchmarks/bench_capture.py [--tokens 20000] [--rss-tokens 20000 80000]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SITES = "blocks.*.hook_resid_post,blocks.*.mlp.hook_post"
DOC_TOKENS = 256
BATCH_TOKENS = 2048


def corpus_docs(loaded, n_tokens: int) -> list[dict]:
    """Documents of DOC_TOKENS tokens cut from the bundled corpus, cycled up to n_tokens."""
    from memprobe.corpora import bundled_corpus

    stream: list[int] = []
    for d in bundled_corpus(None, include_model_samples=False):
        stream += loaded.encode(d["text"] + "\n\n")
    n_docs = -(-n_tokens // DOC_TOKENS)
    return [{"id": f"bench-{k:05d}", "text": loaded.decode([stream[(k * DOC_TOKENS + j) % len(stream)]
                                                           for j in range(DOC_TOKENS)])} for k in range(n_docs)]


def batches(loaded, docs):
    from memprobe.capture import batches as group
    from memprobe.capture import pad_batch, pad_id, tokenize_documents

    tok = tokenize_documents(loaded, docs, truncate=True)
    lengths = [len(d.token_ids) for d in tok]
    return [pad_batch([tok[i].token_ids for i in g], pad_id(loaded)) for g in group(lengths, range(len(tok)), BATCH_TOKENS)]


def run_peers(n_tokens: int, rounds: int) -> dict:
    """Every peer over the same batches, `rounds` times in rotating order; the best round of each counts.

    Why rounds: on a small shared CPU the first pass of any peer pays allocator and page-fault warm-up
    (measured: the same HF forward ran 14.7 s then 11.6 s), and load drifts during a long run. Rotating
    the order and keeping each peer's best round compares peers at their steady state.
    """
    from memprobe.capture import capture
    from memprobe.models import load_model
    from memprobe.sites import hook_points, resolve

    loaded = load_model("smollm2-135m")
    docs = corpus_docs(loaded, n_tokens)
    data = batches(loaded, docs)
    real = sum(int(m.sum()) for _, m in data)
    sites = resolve(loaded.model, SITES)
    results: dict = {"tokens": real, "sites": len(sites), "rounds": rounds, "bytes_per_token_float32": 4 * sum(
        576 if s.endswith("resid_post") else 1536 for s in sites)}

    def hf_forward():
        with torch.no_grad():
            for ids, mask in data:
                loaded.model(ids, attention_mask=mask, use_cache=False)

    def memprobe_capture(dtype: str):
        def run():
            out = Path(tempfile.mkdtemp(prefix="memprobe-bench-"))
            try:
                capture(loaded, docs, SITES, out / "s", dtype=dtype, batch_tokens=BATCH_TOKENS, truncate=True,
                        progress=False)
            finally:
                shutil.rmtree(out, ignore_errors=True)
        return run

    lens = load_model("smollm2-135m")
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers("smollm2-135m", hf_model=lens.model, tokenizer=lens.tokenizer)

    def tl_cache():
        with torch.no_grad():
            for ids, mask in data:
                _, cache = bridge.run_with_cache(ids, names_filter=sites, attention_mask=mask)
                keep = mask.bool()
                _ = [cache[s][keep] for s in sites]

    sight = load_model("smollm2-135m")
    from nnsight.modeling.transformers import TransformersModel

    nn_model = TransformersModel(sight.model, tokenizer=sight.tokenizer)
    points = hook_points(sight.model, sites)
    results["nnsight_note"] = "tracer.cache(modules=[decoder layers, mlp.down_proj], include_inputs=True)"

    def nnsight_cache():
        for ids, mask in data:
            with torch.no_grad(), nn_model.trace({"input_ids": ids, "attention_mask": mask}) as tracer:
                cache = tracer.cache(modules=["model." + p.module for p in points.values()], include_inputs=True)
            keep = mask.bool()
            for p in points.values():
                entry = cache["model." + p.module]
                value = entry.input if p.io == "input" else entry.output
                _ = (value[0] if isinstance(value, tuple) else value)[keep]

    peers = {"hf_forward": hf_forward, "memprobe_capture_float32": memprobe_capture("float32"),
             "memprobe_capture_bfloat16": memprobe_capture("bfloat16"),
             "transformerlens_run_with_cache": tl_cache, "nnsight_cache": nnsight_cache}
    names = list(peers)
    per_round: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t = time.perf_counter()
            peers[name]()
            per_round[name].append(real / (time.perf_counter() - t))
            print(f"round {r}: {name} {per_round[name][-1]:.0f} tok/s", flush=True)
    results["tok_s_per_round"] = per_round
    for name in names:
        results[f"{name}_tok_s"] = max(per_round[name])
    base = results["hf_forward_tok_s"]
    for name in names[1:]:
        results[f"{name}_vs_hf_forward"] = results[f"{name}_tok_s"] / base
    return results


def rss_run(n_tokens: int) -> None:
    """Child process: one whole capture, then print peak RSS (MiB) as JSON."""
    from memprobe.capture import capture
    from memprobe.models import load_model

    loaded = load_model("smollm2-135m")
    docs = corpus_docs(loaded, n_tokens)
    out = Path(tempfile.mkdtemp(prefix="memprobe-rss-"))
    try:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t = time.perf_counter()
        store = capture(loaded, docs, SITES, out / "s", batch_tokens=BATCH_TOKENS, truncate=True, progress=False)
        seconds = time.perf_counter() - t
        size = sum(s["bytes"] for s in store.manifest["shards"]) / 2**20
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({"tokens": len(store), "peak_rss_mib": peak, "rss_after_load_mib": before,
                      "store_mib": size, "seconds": seconds}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=2, help="passes over the batches per peer, order rotated")
    p.add_argument("--rss-tokens", type=int, nargs="*", default=[20000, 80000])
    p.add_argument("--rss-run", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_capture.json"))
    args = p.parse_args()
    if args.rss_run:
        rss_run(args.rss_run)
        return
    torch.manual_seed(0)
    report = {"threads": torch.get_num_threads(), "batch_tokens": BATCH_TOKENS, "sites": SITES}
    report["throughput"] = run_peers(args.tokens, args.rounds)
    report["peak_rss"] = []
    for n in args.rss_tokens:
        child = subprocess.run([sys.executable, __file__, "--rss-run", str(n)], capture_output=True, text=True, check=True)
        report["peak_rss"].append(json.loads(child.stdout.strip().splitlines()[-1]))
    from memprobe.results import save_results

    save_results(args.out, report, seed=0)
    t = report["throughput"]
    print(f"smollm2-135m, {t['tokens']} tokens, {t['sites']} sites ({t['bytes_per_token_float32'] / 1024:.0f} KiB/token float32)")
    for k, v in t.items():
        if k.endswith("_tok_s"):
            ratio = t.get(k.replace("_tok_s", "_vs_hf_forward"), 1.0)
            print(f"  {k.removesuffix('_tok_s'):40s} {v:9.0f} tok/s   {ratio:5.2f}x plain HF forward")
    for r in report["peak_rss"]:
        print(f"  peak RSS capturing {r['tokens']:6d} tokens: {r['peak_rss_mib']:7.0f} MiB (store {r['store_mib']:.0f} MiB on disk)")


if __name__ == "__main__":
    main()
