"""One-pass labels + MIA statistics + capture vs one plain HF forward over the same batches.

The audit's per-token work (teacher-forced labels, the min-k%++ statistics, activations of every
residual and MLP site, bfloat16 store on disk) now comes from one forward per batch. This measures
it against a plain HF forward of the full model (logits included) over the same batches (goal:
<= 1.1x), beside the former two-pass path (`token_labels`, then a capture). It also times what the
label step still decodes on its own (greedy 32/32 extraction, batched, KV cache) and the
model-sample controls drawn prompt by prompt vs batched across prompts. Each peer runs --rounds
times in rotating order and its best round counts (see benchmarks/bench_capture.py for why).

    .venv/bin/python benchmarks/bench_onepass.py [--tokens 20000] [--rounds 3]
    .venv/bin/python benchmarks/bench_onepass.py --quick --out /tmp/q.json   # tiny model, seconds
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

SITES = "blocks.*.hook_resid_post,blocks.*.mlp.hook_post"  # the audit's default sites
DTYPE = "bfloat16"  # the audit's store dtype
BATCH_TOKENS = 2048  # memprobe.capture's default


def corpus_docs(loaded, n_tokens: int) -> list[dict]:
    """The bundled corpus (without model samples), cycled until it holds about n_tokens tokens."""
    from memprobe.corpora import bundled_corpus

    base = [d for d in bundled_corpus(None, include_model_samples=False)
            if len(loaded.encode(d["text"])) <= loaded.context_length]
    docs, total, k = [], 0, 0
    while total < n_tokens:
        d = base[k % len(base)]
        docs.append({"id": f"{d['id']}#{k // len(base)}", "text": d["text"], "kind": d["kind"]})
        total += len(loaded.encode(d["text"]))
        k += 1
    return docs


def run_peers(loaded, docs: list[dict], rounds: int, sample_tokens: int) -> dict:
    from memprobe import corpora
    from memprobe.capture import batches, capture, pad_batch, pad_id, tokenize_documents
    from memprobe.labels import sequence_labels, token_labels, token_labels_from_store

    tokenized = tokenize_documents(loaded, docs)
    lengths = [len(d.token_ids) for d in tokenized]
    data = [pad_batch([tokenized[i].token_ids for i in g], pad_id(loaded))
            for g in batches(lengths, range(len(tokenized)), BATCH_TOKENS)]
    encoded = [d.token_ids for d in tokenized]
    ids = [d["id"] for d in docs]
    n_tokens = sum(lengths)

    def hf_forward():
        with torch.no_grad():
            for x, mask in data:
                loaded.model(input_ids=x, attention_mask=mask, use_cache=False)

    def in_temp_dir(fn):
        out = Path(tempfile.mkdtemp(prefix="memprobe-bench-"))
        try:
            fn(out / "s")
        finally:
            shutil.rmtree(out, ignore_errors=True)

    def one_pass():  # what the audit's label step does before decoding
        def run(path):
            store = capture(loaded, docs, SITES, path, dtype=DTYPE, batch_tokens=BATCH_TOKENS, token_stats=True,
                            progress=False)
            token_labels_from_store(store, ids)
        in_temp_dir(run)

    def two_pass():  # the former label + capture steps: a labelling forward, then a capture forward
        def run(path):
            token_labels(loaded.model, encoded)
            capture(loaded, docs, SITES, path, dtype=DTYPE, batch_tokens=BATCH_TOKENS, progress=False)
        in_temp_dir(run)

    def greedy_extraction():  # the 32/32 windows the label step decodes, 32 windows a batch
        sequence_labels(loaded.model, encoded, batch_size=32)

    def samples(batch_size: int):
        def run():  # batch_size=SAMPLES_PER_PROMPT decodes prompt by prompt, as before batching
            corpora._model_samples(loaded, seed=0, batch_size=batch_size, n_tokens=sample_tokens)
        return run

    peers = {"hf_forward": hf_forward, "one_pass": one_pass, "two_pass": two_pass,
             "greedy_extraction": greedy_extraction,
             "samples_prompt_by_prompt": samples(corpora.SAMPLES_PER_PROMPT),
             "samples_batched": samples(corpora.SAMPLE_BATCH_SIZE)}
    names = list(peers)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t = time.perf_counter()
            peers[name]()
            seconds[name].append(time.perf_counter() - t)
            print(f"round {r}: {name} {seconds[name][-1]:.2f} s", flush=True)
    best = {name: min(v) for name, v in seconds.items()}
    label_step = best["one_pass"] + best["greedy_extraction"]
    return {
        "documents": len(docs), "tokens": n_tokens, "batches": len(data), "rounds": rounds,
        "seconds_per_round": seconds, "best_seconds": best,
        "one_pass_vs_hf_forward": best["one_pass"] / best["hf_forward"],
        "two_pass_vs_hf_forward": best["two_pass"] / best["hf_forward"],
        "greedy_extraction_share_of_label_step": best["greedy_extraction"] / label_step,
        "sample_tokens": sample_tokens,
        "samples_batched_speedup": best["samples_prompt_by_prompt"] / best["samples_batched"],
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=3, help="passes per peer, order rotated; the best counts")
    p.add_argument("--quick", action="store_true", help="tiny-llama, 2000 tokens, 2 rounds: checks the script")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_onepass.json"))
    args = p.parse_args()
    from memprobe.corpora import SAMPLE_TOKENS
    from memprobe.models import load_model
    from memprobe.results import save_results

    if args.quick:
        args.model, args.tokens, args.rounds = "tiny-llama", 2000, 2
    torch.manual_seed(0)
    loaded = load_model(args.model)
    docs = corpus_docs(loaded, args.tokens)
    report = {"model": loaded.info, "threads": torch.get_num_threads(), "batch_tokens": BATCH_TOKENS,
              "sites": SITES, "dtype": DTYPE, "quick": args.quick}
    report["timing"] = r = run_peers(loaded, docs, args.rounds, 16 if args.quick else SAMPLE_TOKENS)
    save_results(args.out, report, seed=0)
    print(f"{loaded.name}: {r['documents']} documents, {r['tokens']} tokens, {r['batches']} batches")
    for name, s in r["best_seconds"].items():
        print(f"  {name:26s} {s:8.2f} s")
    print(f"  one pass (labels + MIA stats + capture) {r['one_pass_vs_hf_forward']:.2f}x plain HF forward "
          f"(two passes: {r['two_pass_vs_hf_forward']:.2f}x)")
    print(f"  greedy extraction: {100 * r['greedy_extraction_share_of_label_step']:.0f}% of the label step")
    print(f"  model samples batched: {r['samples_batched_speedup']:.1f}x faster than prompt by prompt")
    print(f"  -> {args.out}")


if __name__ == "__main__":
    main()
