"""MIA scoring cost: all five attacks of `memprobe.mia.attacks.score_texts` (target + reference) over N
texts, divided by the plain forward passes they need (one of the target and one of the reference per
batch, same batches, logits discarded). Goal: <= 1.1x. Rounds in rotating order, best round counts.

    .venv/bin/python benchmarks/bench_mia.py [--texts 128]        # smollm2-135m (reference: itself, a copy)
    .venv/bin/python benchmarks/bench_mia.py --quick --out /tmp/bench_mia.json   # tiny-llama
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from memprobe.lab import build_lab, load_lab
from memprobe.mia.attacks import ATTACKS, score_texts
from memprobe.models import LoadedModel, load_model


def texts(preset: str, n: int) -> list[dict]:
    """The first n lab documents (members and non-members), cycled if the lab is smaller."""
    lab = Path(tempfile.mkdtemp(prefix="bench-mia-lab-"))
    try:
        build_lab(lab, preset=preset, seed=0)
        members, nonmembers, _ = load_lab(lab)
    finally:
        shutil.rmtree(lab, ignore_errors=True)
    docs = members + nonmembers
    return [{"id": f"{docs[i % len(docs)]['id']}#{i}", "text": docs[i % len(docs)]["text"]} for i in range(n)]


def plain_batches(target: LoadedModel, docs: list[dict], batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batches score_texts forms: longest first, right-padded."""
    encoded = sorted((target.encode(d["text"]) for d in docs), key=len, reverse=True)
    out = []
    for lo in range(0, len(encoded), batch_size):
        chunk = encoded[lo : lo + batch_size]
        ids = torch.zeros((len(chunk), max(map(len, chunk))), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, seq in enumerate(chunk):
            ids[r, : len(seq)], mask[r, : len(seq)] = torch.tensor(seq), 1
        out.append((ids, mask))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny-llama on the tiny lab (plumbing only)")
    p.add_argument("--texts", type=int, help="texts to score (default 128; quick 32)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_mia.json"))
    args = p.parse_args()
    name, preset = ("tiny-llama", "tiny") if args.quick else ("smollm2-135m", "small")
    n = args.texts or (32 if args.quick else 128)
    target = load_model(name)
    reference = LoadedModel(target.name, copy.deepcopy(target.model), target.tokenizer, target.info)
    docs = texts(preset, n)
    batches = plain_batches(target, docs, args.batch_size)
    tokens = int(sum(m.sum() for _, m in batches))

    def plain() -> None:
        with torch.inference_mode():
            for ids, mask in batches:
                target.model(input_ids=ids, attention_mask=mask)
                reference.model(input_ids=ids, attention_mask=mask)

    def mia() -> None:
        records = score_texts(target, docs, reference=reference, batch_size=args.batch_size)
        assert set(records[0]["scores"]) == set(ATTACKS)

    peers = {"plain_forwards": plain, "score_texts_all_attacks": mia}
    names, seconds = list(peers), {k: [] for k in peers}
    load = {"start": os.getloadavg()}
    for r in range(args.rounds):
        for k in names[r % len(names):] + names[: r % len(names)]:
            t = time.perf_counter()
            peers[k]()
            seconds[k].append(time.perf_counter() - t)
            print(f"round {r}: {k} {seconds[k][-1]:.2f} s", flush=True)
    load["end"] = os.getloadavg()
    best = {k: min(v) for k, v in seconds.items()}
    report = {"model": target.info, "reference": "a copy of the target (same cost as the base model)", "texts": n,
              "tokens": tokens, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
              "rounds": args.rounds, "load_average": load, "seconds_per_round": seconds, "seconds_best": best,
              "ratio_vs_plain_forwards": best["score_texts_all_attacks"] / best["plain_forwards"], "goal": 1.1}
    from memprobe.results import save_results

    save_results(args.out, report, seed=0)
    print(f"{n} texts, {tokens} tokens: score_texts {best['score_texts_all_attacks']:.2f} s, plain forwards "
          f"{best['plain_forwards']:.2f} s -> {report['ratio_vs_plain_forwards']:.2f}x (goal <= 1.1); wrote {args.out}")


if __name__ == "__main__":
    main()
