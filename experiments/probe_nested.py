"""Probe AUCs under nested cross-validation, on the membership lab or the bundled corpus.

On real membership ground truth (the lab) and on the bundled famous-text corpus: (site, window)
chosen inside each outer training set, never on the documents it is scored on, beside the old best-of-grid figure, a document-level shuffled null and
output-only baselines (memprobe.probes.nested).

--corpus lab: the model experiments/lab_smollm2.py fine-tuned on the lab's members (its --run-dir),
base smollm2 as reference. Positives: tokens of member documents the fine-tuned model predicts
greedily with p >= 0.5 and the base model does not; negatives: tokens of non-member documents the
fine-tuned model predicts greedily with p >= 0.5. Fine-tuned labels and activations come from one
capture (token_stats=True); the base model's labels from one forward of the same token ids. When the
two sides' confidence (fine-tuned target probability) differs a lot, tokens are matched by bin.
--corpus bundled: base smollm2 on the bundled corpus, memorized vs confident control tokens
(memprobe.memdata, as experiments/probe_layers.py).

Grid: hook_resid_post and mlp.hook_post at 5 spread layers (10 sites, bfloat16), windows {1, 16};
5 outer and 4 inner document-family folds. Every step is cached by content under --cache.

    .venv/bin/python experiments/probe_nested.py --corpus lab [--run-dir runs/lab_smollm2]
    .venv/bin/python experiments/probe_nested.py --corpus bundled
    .venv/bin/python experiments/probe_nested.py --corpus lab --quick --out /tmp/q --figures /tmp/q

--quick: tiny random models (lab: fine-tuned by `lab_smollm2.py --quick --stop-after finetune` into
the run dir when it holds no finished fine-tune); it checks the plumbing, not the science.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memprobe.errors import MemprobeError
from memprobe.probes.artefact import FEATURE_OFFSET
from memprobe.probes.nested import NestedConfig, NestedCV, nested_cross_validate
from memprobe.results import experiment_parser, save_results
from memprobe.sites import resolve
from memprobe.studies.cache import StepCache

ROOT = Path(__file__).resolve().parent.parent
LAYER_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)  # 30 layers: 3, 9, 14, 20, 26
KINDS = ("hook_resid_post", "mlp.hook_post")
CONF_BINS = np.linspace(0.5, 1.0, 11)
MATCH_IF_TV_ABOVE = 0.1  # total-variation distance between the sides' confidence histograms


def grid_sites(model: torch.nn.Module) -> list[str]:
    """The reduced grid: both site kinds at LAYER_FRACTIONS of the depth."""
    n = len(resolve(model, "blocks.*.hook_resid_post"))
    layers = sorted({round(f * (n - 1)) for f in LAYER_FRACTIONS})
    return [f"blocks.{i}.{k}" for k in KINDS for i in layers]


def confidence(p: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Histogram of each side's confidence, and the total-variation distance between them."""
    h = {side: np.histogram(p[y == v], CONF_BINS)[0] for side, v in (("positive", 1), ("negative", 0))}
    tv = 0.5 * np.abs(h["positive"] / max(1, h["positive"].sum())
                      - h["negative"] / max(1, h["negative"].sum())).sum()
    return {"bins": CONF_BINS.round(3), "counts": h, "total_variation": float(tv),
            "median": {side: float(np.median(p[y == v])) for side, v in (("positive", 1), ("negative", 0))}}


def match_confidence(p: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """Rows kept so that both sides have the same count in every confidence bin (seeded draw)."""
    rng = np.random.default_rng(seed)
    which = np.clip(np.digitize(p, CONF_BINS) - 1, 0, len(CONF_BINS) - 2)
    keep = np.zeros(len(p), dtype=bool)
    for b in range(len(CONF_BINS) - 1):
        pos, neg = np.flatnonzero((which == b) & (y == 1)), np.flatnonzero((which == b) & (y == 0))
        n = min(len(pos), len(neg))
        keep[rng.choice(pos, n, replace=False)] = True
        keep[rng.choice(neg, n, replace=False)] = True
    return keep


def finished_finetune(run: Path, quick: bool) -> dict[str, Any]:
    """The lab fine-tune's provenance; quick mode trains it (lab_smollm2.py --quick), full mode refuses."""
    done = run / "finetune" / "memprobe-finetune.json"
    if not done.exists() and quick:
        subprocess.run([sys.executable, str(ROOT / "experiments" / "lab_smollm2.py"), "--quick",
                        "--stop-after", "finetune", "--run-dir", str(run), "--out", str(run / "lab_out"),
                        "--figures", str(run / "lab_out")], check=True)
    if not done.exists() or not json.loads(done.read_text()).get("complete"):
        raise MemprobeError(
            f"the lab fine-tune in {run / 'finetune'} has not finished (no complete {done.name}): run "
            f"`.venv/bin/python experiments/lab_smollm2.py --run-dir {run} --stop-after finetune` first, "
            "or pass --run-dir of a finished run")
    return json.loads(done.read_text())


def lab_examples(args: argparse.Namespace, cache: StepCache) -> dict[str, Any]:
    """Lab store (fine-tuned model, one capture with token stats), base labels, the token set."""
    from memprobe.capture import capture
    from memprobe.lab import load_lab
    from memprobe.lab.finetune import weights_sha256
    from memprobe.labels import token_labels, token_labels_from_store
    from memprobe.models import file_sha256, load_model
    from memprobe.store import ActivationStore

    prov = finished_finetune(args.run_dir, args.quick)
    members, nonmembers, _ = load_lab(args.run_dir / "lab")
    docs = members + nonmembers
    ft_dir = args.run_dir / "finetune"
    tuned, base = load_model(str(ft_dir)), load_model(prov["base_model"]["name"])
    if weights_sha256(base.model) != prov["base_model"]["weights_sha256"]:
        raise MemprobeError(f"{prov['base_model']['name']} here is not the model the lab fine-tune "
                            "started from (weights hash differs): point --run-dir at a run of this model")
    sites = grid_sites(tuned.model)
    ft_sha = file_sha256(ft_dir / "model.safetensors")
    cache.run("capture finetuned", ["store"],
              lambda path: capture(tuned, docs, sites, path, dtype="bfloat16", token_stats=True,
                                   batch_tokens=1024),
              inputs={"model": ft_sha, "docs": [[d["id"], d["text"]] for d in docs]},
              settings={"sites": sites, "dtype": "bfloat16"}, code=[capture], resumable=["store"])
    store = ActivationStore.open(cache.root / "store")
    ids = [d["id"] for d in docs]
    token_ids = [store.rows.token_id[store.doc_rows(i)].tolist() for i in ids]
    base_memorized = cache.json(
        "base labels", lambda: [t.memorized.tolist() for t in token_labels(base.model, token_ids)],
        inputs={"model": prov["base_model"]["weights_sha256"], "token_ids": token_ids}, code=[token_labels])
    tuned_labels = token_labels_from_store(store, ids)
    cols: dict[str, list] = {k: [] for k in ("doc", "group", "kind", "position", "y", "target_prob",
                                              "top_prob", "entropy")}
    for d, ft, bm in zip(docs, tuned_labels, base_memorized, strict=True):
        keep = ft.memorized.copy()
        keep[0] = False
        if d["member"]:
            keep &= ~np.asarray(bm, dtype=bool)  # memorized by the fine-tune, not already by the base
        pos = np.flatnonzero(keep)
        cols["doc"] += [d["id"]] * len(pos)
        cols["group"] += [d.get("split_group") or d["id"]] * len(pos)
        cols["kind"] += [d["kind"]] * len(pos)
        cols["position"] += pos.tolist()
        cols["y"] += [int(d["member"])] * len(pos)
        for name in ("target_prob", "top_prob", "entropy"):
            cols[name] += getattr(ft, name)[pos].tolist()
    ex = {k: np.array(v) for k, v in cols.items()}
    before = confidence(ex["target_prob"], ex["y"])
    matched = before["total_variation"] > MATCH_IF_TV_ABOVE
    if matched:
        keep = match_confidence(ex["target_prob"], ex["y"], args.seed)
        ex = {k: v[keep] for k, v in ex.items()}
    starts = np.array([store.doc_rows(d).start for d in ex["doc"].tolist()], dtype=np.int64)
    return {"store": store, "sites": sites, "model": tuned.info, "base_model": base.info,
            "rows": starts + ex["position"] + FEATURE_OFFSET, "doc_start": starts, "y": ex["y"],
            "groups": ex["group"], "docs": ex["doc"], "kind": ex["kind"],
            "baselines": {"target_prob": ex["target_prob"], "neg_entropy": -ex["entropy"],
                          "top_prob": ex["top_prob"]},
            "confidence": {"before_matching": before, "matched_by_bin": matched,
                           "after_matching": confidence(ex["target_prob"], ex["y"]) if matched else None,
                           "rule": f"match by bin when total variation > {MATCH_IF_TV_ABOVE}"},
            "definition": {"positive": "member-document token: fine-tuned greedy-correct with p >= 0.5, "
                                       "base model not", "negative": "non-member-document token: "
                                       "fine-tuned greedy-correct with p >= 0.5"},
            "lab": {"members": len(members), "nonmembers": len(nonmembers), "run_dir": args.run_dir}}


def bundled_examples(args: argparse.Namespace, cache: StepCache) -> dict[str, Any]:
    """The bundled corpus token set of experiments/probe_layers.py, captured at the reduced grid."""
    from memprobe.memdata import REPETITION
    from memprobe.models import load_model
    from memprobe.studies.probe_data import prepare_probe_data

    sites = grid_sites(load_model(args.model).model)
    data = prepare_probe_data(args.model, cache.root, quick=args.quick, seed=args.seed,
                              max_words=args.max_words, sites=",".join(sites))
    tokens = data.tokens.subset(data.tokens.category != REPETITION)
    old = ROOT / "experiments" / "results" / "probe_layers.json"
    old_headline = None
    if old.exists() and args.model == "smollm2-135m":
        res = json.loads(old.read_text())["results"]
        old_headline = {"file": str(old.relative_to(ROOT)), "best_site": res["best_site"],
                        "roc_auc": res["best"]["probe"]["roc_auc"], "sites_compared": len(res["per_site"]),
                        "note": "best of all sites by 5-fold CV on the same documents, window chosen "
                                "on them too: optimistic"}
    return {"store": data.store, "sites": sites, "model": data.loaded.info,
            "rows": tokens.store_rows(data.store, FEATURE_OFFSET), "doc_start": tokens.store_doc_starts(data.store),
            "y": tokens.label, "groups": tokens.group, "docs": tokens.doc_id, "kind": tokens.kind,
            "baselines": tokens.baselines(), "token_counts": tokens.counts(),
            "readme_best_of_60_headline": old_headline,
            "definition": {"positive": "confident-correct token of a memorized candidate text "
                                       "(memorized fraction >= 0.5)", "negative": "confident-correct "
                                       "token of a control text (memprobe.memdata)"}}


def counts_by_kind(ex: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for side, v in (("positive", 1), ("negative", 0)):
        sel = ex["y"] == v
        kinds = sorted(set(ex["kind"][sel].tolist()))
        out[side] = {"tokens": int(sel.sum()), "documents": len(set(ex["docs"][sel].tolist())),
                     "by_kind": {k: {"tokens": int((sel & (ex["kind"] == k)).sum()),
                                     "documents": len(set(ex["docs"][sel & (ex["kind"] == k)].tolist()))}
                                 for k in kinds}}
    return out


def run(args: argparse.Namespace) -> tuple[dict[str, Any], NestedCV]:
    t0 = time.time()
    cache = StepCache(args.cache)
    ex = (lab_examples if args.corpus == "lab" else bundled_examples)(args, cache)
    folds = (3, 3) if args.quick else (5, 4)  # (outer, inner); quick: plumbing only
    config = NestedConfig(sites=tuple(ex["sites"]), windows=(1, 16), n_outer=folds[0], n_inner=folds[1],
                          n_null=args.n_null, alpha=1e-2, max_iter=50 if args.quick else 150,
                          n_boot=50 if args.quick else args.n_boot, seed=args.seed)
    result = nested_cross_validate(ex["store"], ex["rows"], ex["y"], ex["groups"], ex["docs"],
                                   doc_start=ex["doc_start"], baselines=ex["baselines"], config=config,
                                   cache=cache)  # each run (real, each null) a resumable step
    nested = result.to_dict()
    keep = {k: v for k, v in ex.items() if k not in ("store", "rows", "doc_start", "y", "groups", "docs",
                                                      "kind", "baselines", "sites")}
    out = {"corpus": args.corpus, "quick": args.quick, **keep, "config": asdict(config),
           "feature_position": "activation at t-1 scores token t; window w averages positions t-w .. t-1",
           "examples_by_side": counts_by_kind(ex), **nested, "seconds": time.time() - t0}
    return out, result


def main() -> None:
    ap = experiment_parser(__doc__, ROOT)
    ap.add_argument("--corpus", choices=("lab", "bundled"), required=True)
    ap.add_argument("--run-dir", type=Path, help="lab_smollm2.py's run dir (default runs/lab_smollm2; "
                    "quick: <cache>/lab_run)")
    ap.add_argument("--model", default="smollm2-135m", help="bundled corpus: the model probed")
    ap.add_argument("--max-words", type=int, default=80, help="bundled corpus: texts cut to this many words")
    ap.add_argument("--n-null", type=int, default=2, help="label permutations, each a full nested rerun")
    ap.add_argument("--n-boot", type=int, default=200, help="document-bootstrap draws per interval")
    ap.add_argument("--cache", type=Path, help="default cache/probe_nested/<corpus>[-quick]")
    args = ap.parse_args()
    tag = f"{args.corpus}_quick" if args.quick else args.corpus
    if args.quick:
        args.model, args.max_words, args.n_null = "tiny-llama", 40, min(args.n_null, 1)
    args.cache = args.cache or ROOT / "cache" / "probe_nested" / tag
    args.run_dir = args.run_dir or (args.cache / "lab_run" if args.quick else ROOT / "runs" / "lab_smollm2")
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    try:
        results, nested = run(args)
    except MemprobeError as e:
        raise SystemExit(f"error: {e}") from None
    path = save_results(args.out / f"probe_nested_{tag}.json", results, seed=args.seed)
    nested.plot(args.figures / f"probe_nested_{tag}.png",
                title=f"{results['model']['name']}, {args.corpus}: nested CV, outer folds")
    n = results["nested"]
    side = results["examples_by_side"]
    print(f"{args.corpus}: {side['positive']['documents']} positive documents ({side['positive']['tokens']} "
          f"tokens) vs {side['negative']['documents']} ({side['negative']['tokens']}); nested AUC {n['roc_auc']:.3f} {n.get('roc_auc_ci95')}, "
          f"best of grid (optimistic) {results['best_of_grid_optimistic']['roc_auc']:.3f}, null "
          f"{results['null']['nested_auc']}, target_prob {results['baselines']['target_prob']['roc_auc']:.3f}; "
          f"wrote {path}")


if __name__ == "__main__":
    main()
