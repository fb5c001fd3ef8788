"""Teacher-forced labels in float32 against bfloat16 autocast, on the audit's texts: is a faster
compute precision for the audit's forward passes worth it, and does it change its findings?

Three ways of running the same `memprobe.labels.token_labels` pass over the bundled corpus (the
audit's texts without the model's samples, first 256 tokens each): float32; bfloat16 autocast of the
whole forward; bfloat16 autocast of the blocks with the vocabulary head in float32 (the head's logits
decide the labels and the membership scores). Reported per way: best-of-rounds seconds, the share of
tokens whose memorized label differs from float32's, the memorized texts (memorized fraction >= 0.5)
against float32's, and the largest change of a target probability. Rounds in rotating order.

    .venv/bin/python benchmarks/bench_precision.py [--rounds 2]
    .venv/bin/python benchmarks/bench_precision.py --quick --out /tmp/bench_precision.json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
WAYS = ("float32", "bf16-autocast", "bf16-autocast-fp32-head")


@contextlib.contextmanager
def precision(model: torch.nn.Module, way: str) -> Iterator[None]:
    """Run the model's forward passes inside this block in `way`."""
    if way == "float32":
        yield
        return
    head = model.get_output_embeddings()
    original = head.forward
    if way == "bf16-autocast-fp32-head":
        head.forward = torch.autocast("cpu", enabled=False)(lambda x: original(x.float()))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    finally:
        head.forward = original


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny-llama, a few texts")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_precision.json"))
    args = ap.parse_args()

    from memprobe.corpora import bundled_corpus
    from memprobe.labels import token_labels
    from memprobe.models import load_model
    from memprobe.results import save_results

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    loaded = load_model("tiny-llama" if args.quick else "smollm2-135m")
    docs = bundled_corpus(None, seed=0, include_model_samples=False)
    docs = docs[:12] if args.quick else docs
    ids = [loaded.encode(d["text"])[: args.max_tokens] for d in docs]
    ids, docs = [i for i in ids if len(i) >= 2], [d for d, i in zip(docs, ids, strict=True) if len(i) >= 2]
    seconds: dict[str, list[float]] = {w: [] for w in WAYS}
    labels: dict[str, list] = {}
    for r in range(args.rounds):
        for way in WAYS[r % len(WAYS):] + WAYS[: r % len(WAYS)]:
            with torch.inference_mode(), precision(loaded.model, way):
                t = time.perf_counter()
                labels[way] = token_labels(loaded.model, ids, batch_size=8)
                seconds[way].append(time.perf_counter() - t)
            print(f"round {r} {way}: {seconds[way][-1]:.1f} s", flush=True)

    def memorized_texts(way: str) -> list[str]:
        return sorted(d["id"] for d, lab in zip(docs, labels[way], strict=True) if lab.memorized_fraction >= 0.5)

    ref = labels["float32"]
    out = {"model": loaded.info, "texts": len(docs), "tokens": sum(len(i) - 1 for i in ids), "rounds": args.rounds,
           "threads": torch.get_num_threads(), "seconds_per_round": seconds,
           "seconds_best": {w: min(v) for w, v in seconds.items()}, "load_average_end": list(os.getloadavg()),
           "memorized_texts_float32": memorized_texts("float32"), "ways": {}}
    for way in WAYS:
        flips = sum(int((a.memorized != b.memorized).sum()) for a, b in zip(ref, labels[way], strict=True))
        prob = max(float(np.nanmax(np.abs(np.asarray(a.target_prob) - np.asarray(b.target_prob))))
                   for a, b in zip(ref, labels[way], strict=True))
        texts = memorized_texts(way)
        out["ways"][way] = {"speedup_vs_float32": out["seconds_best"]["float32"] / out["seconds_best"][way],
                            "memorized_label_flips": flips, "flip_share": flips / out["tokens"],
                            "max_abs_target_prob_change": prob,
                            "same_memorized_texts": texts == out["memorized_texts_float32"],
                            "memorized_texts_changed": sorted(set(texts) ^ set(out["memorized_texts_float32"]))}
    save_results(args.out, out, seed=0)
    for way, row in out["ways"].items():
        print(f"{way:26s} {out['seconds_best'][way]:6.1f} s  x{row['speedup_vs_float32']:.2f}  "
              f"flips {row['memorized_label_flips']}  max dp {row['max_abs_target_prob_change']:.3g}  "
              f"same texts {row['same_memorized_texts']}")


if __name__ == "__main__":
    main()
