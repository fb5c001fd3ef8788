"""Activation patching on a memorized text: (layer x position) heatmaps of the restored logit difference.

Clean run: the first tokens of a text smollm2-135m has memorized (from the labels cache of
experiments/suppress.py, or the GPL-3 preamble); corrupted run: the same prefix with a few tokens
swapped. Full mode patches every layer and position for the residual stream (resid_pre) and the
attention and MLP outputs through plain hooks, then repeats three layers through TransformerLens and
nnsight and records the largest disagreement between backends.

    .venv/bin/python experiments/patching.py           # smollm2-135m
    .venv/bin/python experiments/patching.py --quick   # tiny trained LM, < 60 s
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from memprobe.corpora import bundled_corpus
from memprobe.intervene.patching import SITE_KINDS, activation_patching, corrupt_prefix
from memprobe.models import load_model
from memprobe.results import experiment_parser, save_results

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = experiment_parser(__doc__, ROOT)
    ap.add_argument("--prefix", type=int, default=14, help="prefix tokens (positions patched)")
    ap.add_argument("--swaps", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    docs = bundled_corpus(None, seed=args.seed, include_model_samples=False)
    text = next(d["text"] for d in docs if d["kind"] == "licence")
    if args.quick:
        from memprobe.train.tiny_lm import train_tiny_lm

        text = text[:200]
        make = lambda: train_tiny_lm([text], steps=80, seq_len=48, batch=4, seed=args.seed)  # noqa: E731
    else:
        make = lambda: load_model("smollm2-135m")  # noqa: E731
    first = make()
    ids = first.encode(text)
    end = args.prefix
    labels_file = ROOT / "cache" / "intervene" / "labels_smollm2.json"
    if not args.quick and labels_file.exists():  # a memorized token of the most memorized text (experiments/suppress.py)
        records = [r for r in json.loads(labels_file.read_text()) if r["role"] == "candidate"]
        best = max(records, key=lambda r: r["memorized_fraction"] or 0)
        ids = best["token_ids"]
        end = next(p for p in range(args.prefix, len(ids)) if best["memorized"][p])
    clean, target = ids[end - args.prefix : end], ids[end]
    corrupt = corrupt_prefix(clean, args.swaps, vocab=sorted(set(ids)), seed=args.seed)
    result = activation_patching(first, clean, corrupt, target, backend="hooks")
    n_layers = result.effects[SITE_KINDS[0]].shape[0]
    check_layers = sorted({0, n_layers // 2, n_layers - 1})
    agreement = {}
    for backend in ("lens", "nnsight"):
        loaded = make()  # a fresh object: TL and nnsight each mutate the model they wrap
        other = activation_patching(loaded, clean, corrupt, target, backend=backend, layers=check_layers)
        agreement[backend] = max(float(np.nanmax(np.abs(other.effects[k][check_layers] - result.effects[k][check_layers])))
                                 for k in SITE_KINDS)
    tag = "_quick" if args.quick else ""
    result.plot(args.figures / f"intervene_patching{tag}.png", script="experiments/patching.py",
                title=f"{first.name}: patching clean '{first.decode(clean)[:40]}...' -> memorized "
                      f"{first.decode([target])!r}")
    save_results(args.out / f"patching{tag}.json",
                 {"model": first.info, **result.to_dict(), "corrupt_tokens": [first.decode([t]) for t in corrupt],
                  "backend_max_abs_diff": agreement, "checked_layers": check_layers,
                  "wall_seconds": time.time() - t0}, seed=args.seed)
    print(json.dumps({"clean_ld": result.clean_ld, "corrupt_ld": result.corrupt_ld, "agreement": agreement}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
