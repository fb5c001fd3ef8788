"""Probe sweep speed and memory: memprobe's ProbeSweep over every site vs sklearn LogisticRegression per site.

smollm2-135m, >= 100k tokens of the bundled corpus (256-token documents), all 30 residual-stream sites
(576 dims) and all 30 MLP-neuron sites (1536 neurons), captured once into a bfloat16 store (cached in
--cache). Target: whether the model predicts the token correctly and confidently (memprobe.labels'
teacher-forced label), read from the activation at t-1. Train on 80% of the documents, AUC on the rest.

Peers, each in a fresh subprocess (so peak RSS is its own), on the same rows, split and penalty:
- memprobe: ProbeSweep.run over all 60 sites, streamed from the store (one batched L-BFGS per site group).
- sklearn: StandardScaler + LogisticRegression(lbfgs, C = 1 / (alpha n), class_weight="balanced"), the
  same objective, one site at a time in a loop, on --sklearn-sites sites (layers 0, 15, 29 of each
  kind) and scaled to all 60 by the mean time per site of each kind. The AUCs of both are reported per
  measured site: the comparison is at equal AUC only if they agree.

    .venv/bin/python benchmarks/bench_probes.py               # writes benchmarks/results/bench_probes.json
    .venv/bin/python benchmarks/bench_probes.py --tokens 20000 --out /tmp/b.json   # smaller
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
SITES = "blocks.*.hook_resid_post,blocks.*.mlp.hook_post"
ALPHA, MAX_ITER = 1e-2, 150
SKLEARN_LAYERS = (0, 15, 29)


def prepare(cache: Path, n_tokens: int) -> None:
    """Store of all sites plus rows/labels/split, cached (a rerun with the same --tokens reuses them)."""
    from bench_capture import corpus_docs

    from memprobe.capture import capture
    from memprobe.labels import token_labels
    from memprobe.models import load_model

    meta = cache / f"rows-{n_tokens}.npz"
    if meta.exists():
        return
    loaded = load_model("smollm2-135m")
    docs = corpus_docs(loaded, n_tokens)
    store = capture(loaded, docs, SITES, cache / f"store-{n_tokens}", dtype="bfloat16", batch_tokens=2048,
                    truncate=True)
    rows, labels, doc_of = [], [], []
    ids = [store.rows.token_id[store.doc_rows(d["id"])].tolist() for d in docs]
    for k, (d, lab) in enumerate(zip(docs, token_labels(loaded.model, ids, batch_size=8), strict=True)):
        r = store.doc_rows(d["id"])
        rows.append(np.arange(r.start, r.stop - 1))  # activation at t-1 scores token t
        labels.append(np.asarray(lab.memorized[1:], dtype=np.int64))
        doc_of.append(np.full(r.stop - r.start - 1, k))
    doc_of = np.concatenate(doc_of)
    rng = np.random.default_rng(0)
    test_docs = rng.permutation(len(docs))[: len(docs) // 5]
    np.savez(meta, rows=np.concatenate(rows), y=np.concatenate(labels), test=np.isin(doc_of, test_docs))


def _peer(args: argparse.Namespace) -> dict:
    from memprobe.metrics import roc_auc
    from memprobe.probes import ProbeSweep, read_rows
    from memprobe.probes.sweep import balanced_weights
    from memprobe.store import ActivationStore

    torch.set_num_threads(args.threads)
    z = np.load(args.cache / f"rows-{args.tokens}.npz")
    rows, y, test = z["rows"], z["y"], z["test"]
    store = ActivationStore.open(args.cache / f"store-{args.tokens}")
    out: dict = {"rows": int(len(rows)), "train_rows": int((~test).sum()), "positive_share": float(y.mean())}
    t0 = time.perf_counter()
    if args.mode == "memprobe":
        sweep = ProbeSweep(alpha=ALPHA, max_iter=MAX_ITER, progress=False)
        fit = sweep.run(store, rows, y[None].astype(float), balanced_weights(y, ~test)[None])
        out["seconds"] = time.perf_counter() - t0
        out["sites"] = len(fit.sites)
        out["auc"] = {s: roc_auc(fit.scores[s][0][test], y[test]) for s in fit.sites}
    else:
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        out["seconds_per_site"], out["auc"] = {}, {}
        sites = [f"blocks.{i}.{kind}" for kind in ("hook_resid_post", "mlp.hook_post") for i in SKLEARN_LAYERS]
        for site in sites:
            t = time.perf_counter()
            X = read_rows(store, site, rows).numpy().astype(np.float64)
            scaler = StandardScaler().fit(X[~test])
            clf = LogisticRegression(C=1 / (ALPHA * (~test).sum()), class_weight="balanced", max_iter=1000)
            clf.fit(scaler.transform(X[~test]), y[~test])
            out["seconds_per_site"][site] = time.perf_counter() - t
            out["auc"][site] = roc_auc(clf.decision_function(scaler.transform(X[test])), y[test])
            out["n_iter"] = {**out.get("n_iter", {}), site: int(clf.n_iter_[0])}
        out["seconds"] = time.perf_counter() - t0
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=102_400)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/memprobe-bench-probes"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_probes.json")
    ap.add_argument("--mode", choices=["memprobe", "sklearn"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(_peer(args)))
        return
    args.cache.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    prepare(args.cache, args.tokens)
    prepare_seconds = time.perf_counter() - t
    peers = {}
    for mode in ("memprobe", "sklearn"):
        cmd = [sys.executable, __file__, "--mode", mode, "--tokens", str(args.tokens), "--threads", str(args.threads),
               "--cache", str(args.cache)]
        peers[mode] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        print(mode, {k: v for k, v in peers[mode].items() if k not in ("auc",)}, flush=True)
    sk = peers["sklearn"]["seconds_per_site"]
    per_kind = {kind: float(np.mean([v for s, v in sk.items() if s.endswith(kind)]))
                for kind in ("hook_resid_post", "mlp.hook_post")}
    sklearn_all = 30 * per_kind["hook_resid_post"] + 30 * per_kind["mlp.hook_post"]
    measured = list(sk)
    auc_gap = max(abs(peers["memprobe"]["auc"][s] - peers["sklearn"]["auc"][s]) for s in measured)
    from memprobe.results import save_results

    results = {
        "model": "smollm2-135m", "tokens_captured": args.tokens, "threads": args.threads, "alpha": ALPHA,
        "max_iter": MAX_ITER, "prepare_seconds_capture_and_labels": prepare_seconds, "peers": peers,
        "sklearn_seconds_per_site_by_kind": per_kind, "sklearn_all_60_sites_seconds_scaled": sklearn_all,
        "memprobe_all_60_sites_seconds": peers["memprobe"]["seconds"],
        "speedup_over_sklearn_loop": sklearn_all / peers["memprobe"]["seconds"],
        "auc_on_sklearn_sites": {s: {"memprobe": peers["memprobe"]["auc"][s], "sklearn": peers["sklearn"]["auc"][s]}
                                 for s in measured},
        "max_abs_auc_difference": auc_gap,
        "note": "sklearn timed on the listed sites and scaled to 60 by the mean per site of each kind; each peer in "
                "its own subprocess (peak_rss_mb is that process's peak)",
    }
    save_results(args.out, results, seed=0)
    print(json.dumps({k: results[k] for k in ("memprobe_all_60_sites_seconds", "sklearn_all_60_sites_seconds_scaled",
                                              "speedup_over_sklearn_loop", "max_abs_auc_difference")}))


if __name__ == "__main__":
    main()
