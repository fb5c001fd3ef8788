"""Probe transfer across the two models' corpora: does a model's memorization probe stay quiet on
fluent text that the *other* model wrote, and do the two models memorize the same texts?

Each model's corpus differs only in its model-sample controls (text it sampled itself) and in which
candidate texts its own labels call memorized. So for model A: the probe at A's best site is trained
on all of A's corpus, then scores B's samples (labelled and captured with A; never seen by the
probe), compared against A's memorized tokens scored out-of-fold (also never seen). Needs the caches
of experiments/probe_layers.py for both models (it runs the missing steps itself, slowly).

    .venv/bin/python experiments/probe_transfer.py            # smollm2-135m <-> gemma3-270m
    .venv/bin/python experiments/probe_transfer.py --quick    # tiny-llama <-> tiny-gemma3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from memprobe.capture import capture
from memprobe.labels import label_documents
from memprobe.memdata import CONTROL, build_token_set, group_folds, is_memorized_document
from memprobe.probes import ProbeSweep, detection, read_rows
from memprobe.probes.artefact import FEATURE_OFFSET
from memprobe.results import save_results
from memprobe.studies.cache import value_digest
from memprobe.studies.probe_data import prepare_probe_data

ROOT = Path(__file__).resolve().parent.parent
ALPHA, MAX_ITER, N_FOLDS = 1e-2, 150, 5  # as experiments/probe_layers.py


def transfer(a: str, b: str, args: argparse.Namespace, best_site: str, window: int) -> dict:
    """A's probe at `best_site` (features over `window` positions, as probe_layers used) on B's model samples
    vs A's memorized tokens (both held out)."""

    def cache(model: str) -> Path:
        return args.cache_root / (model + ("-quick" if args.quick else ""))

    data = prepare_probe_data(a, cache(a), quick=args.quick, seed=args.seed, max_words=args.max_words[a])
    loaded, records, tokens, store = data.loaded, data.records, data.tokens, data.store
    main = tokens.category != "repetition"
    tokens = tokens.subset(main)
    rows, y, starts = tokens.store_rows(store, FEATURE_OFFSET), tokens.label, tokens.store_doc_starts(store)
    sweep = ProbeSweep(alpha=ALPHA, max_iter=MAX_ITER, progress=False, window=window)
    folds = group_folds(tokens.group, y, n_folds=N_FOLDS, seed=args.seed)
    oof = sweep.cross_validate(store, rows, y, folds, sites=[best_site], n_shuffled=0, seed=args.seed,
                               doc_start=starts).oof
    probe = sweep.fit(store, rows, y, sites=[best_site], doc_start=starts)[best_site]

    other = prepare_probe_data(b, cache(b), quick=args.quick, seed=args.seed, max_words=args.max_words[b])
    other_records = other.records
    samples = [d for d in other.docs if d["kind"] == "model-sample"]
    sample_records = label_documents(loaded, samples)
    if args.quick:  # as in probe_layers --quick: a random model is confident about nothing
        sample_records = [{**r, "memorized": [False] + [True] * (r["n_tokens"] - 1)} for r in sample_records]
    sample_tokens = build_token_set(sample_records)
    # keyed by content (the samples' ids and texts, the site), not by name: other samples get another store
    key = value_digest([best_site, [(d["id"], d["text"]) for d in samples]])[:16]
    sample_store = capture(loaded, samples, [best_site], cache(a) / f"samples-of-{b}-{key}", progress=False)
    X = read_rows(sample_store, best_site, sample_tokens.store_rows(sample_store, FEATURE_OFFSET), window=window,
                  doc_start=sample_tokens.store_doc_starts(sample_store)).numpy()
    foreign = probe.decision_function(X)

    pos = y == 1
    own_ctrl = (tokens.category == CONTROL) & (tokens.kind == "model-sample")
    scores = np.concatenate([oof[best_site][pos], foreign])
    labels = np.r_[np.ones(pos.sum()), np.zeros(len(foreign))]
    docs = np.concatenate([tokens.doc_id[pos], sample_tokens.doc_id])
    own = np.r_[pos.nonzero()[0], own_ctrl.nonzero()[0]]
    conf = np.concatenate([tokens.target_prob[pos], sample_tokens.target_prob])
    n_boot = 50 if args.quick else 200
    mem_a = {r["id"] for r in records if is_memorized_document(r)}
    mem_b = {r["id"] for r in other_records if is_memorized_document(r)}
    return {
        "probe_model": a, "samples_from": b, "site": best_site, "window": window,
        "memorized_tokens": int(pos.sum()), "foreign_sample_tokens": len(foreign),
        "probe_memorized_vs_foreign_samples": detection(scores, labels, docs, n_boot=n_boot, seed=args.seed),
        "target_prob_memorized_vs_foreign_samples": detection(conf, labels, docs, n_boot=n_boot, seed=args.seed),
        "probe_memorized_vs_own_samples": detection(oof[best_site][own], y[own], tokens.doc_id[own], n_boot=n_boot,
                                                    seed=args.seed),
        "foreign_samples_flagged_at_own_1pct_fpr": float(
            (foreign > np.quantile(oof[best_site][tokens.category == CONTROL], 0.99)).mean()),
        "memorized_documents": {a: len(mem_a), b: len(mem_b), "both": len(mem_a & mem_b),
                                "jaccard": len(mem_a & mem_b) / max(len(mem_a | mem_b), 1)},
        "memorized_by_this_model_only": sorted(mem_a - mem_b)[:30],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "results")
    p.add_argument("--cache-root", type=Path, default=ROOT / "cache" / "probe_layers",
                   help="where probe_layers.py keeps its per-model caches")
    args = p.parse_args()
    torch.set_num_threads(1)
    a, b = ("tiny-llama", "tiny-gemma3") if args.quick else ("smollm2-135m", "gemma3-270m")
    args.max_words = {a: 40, b: 40} if args.quick else {a: 80, b: 40}  # as the probe_layers runs used
    best, window = {}, {}
    for m in (a, b):
        name = "probe_layers" if m == "smollm2-135m" else f"probe_layers_{m.replace('-', '_')}"
        path = args.out / f"{name}.json"
        if not path.exists():
            raise SystemExit(f"run experiments/probe_layers.py --model {m}{' --quick' if args.quick else ''} "
                             f"--out {args.out} first: {path} is missing")
        layers = json.loads(path.read_text())["results"]
        best[m], window[m] = layers["best_site"], layers.get("window", 1)
    results = {"pairs": [transfer(a, b, args, best[a], window[a]), transfer(b, a, args, best[b], window[b])]}
    path = save_results(args.out / ("probe_transfer_quick.json" if args.quick else "probe_transfer.json"), results,
                        seed=args.seed)
    for r in results["pairs"]:
        print(f"{r['probe_model']} probe: memorized vs {r['samples_from']} samples AUC "
              f"{r['probe_memorized_vs_foreign_samples']['roc_auc']:.3f} (own samples "
              f"{r['probe_memorized_vs_own_samples']['roc_auc']:.3f}; target_prob "
              f"{r['target_prob_memorized_vs_foreign_samples']['roc_auc']:.3f})")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
