"""General memorization suppression on smollm2-135m: one edit, held-out memorized texts, Pareto figure.

Builds each edit from half the memorized texts (split by `split_group`, so a held-out text never has
a passage of its own source in the build half) and measures, with `memprobe.labels.token_labels`,
the memorized-token rate on the other half and perplexity / top-1 accuracy on held-out non-memorized
text, as the edit's strength (neuron share or direction strength) varies. Random-neuron and
random-direction edits of the same size sit beside it. The best edit within the +5% perplexity budget
is saved, exported as a HF directory, and re-measured through plain transformers.

    .venv/bin/python experiments/suppress.py            # full (smollm2-135m), ~20 min on a busy 2-core CPU
    .venv/bin/python experiments/suppress.py --quick    # tiny trained LM, < 60 s
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from memprobe.corpora import bundled_corpus
from memprobe.errors import MemprobeError
from memprobe.intervene.ablation import save_edit
from memprobe.intervene.export import export_patched
from memprobe.intervene.localizers import RandomScores, mean_activations, top_neurons
from memprobe.intervene.suppress import (
    contrast_scores,
    evaluate,
    guarded_top_neurons,
    make_edit,
    split_memorized,
    targets_from_labels,
)
from memprobe.intervene.weight_edit import random_low_rank_like
from memprobe.models import load_model
from memprobe.plots import save_figure
from memprobe.results import experiment_parser, save_results
from memprobe.studies.cache import StepCache
from memprobe.studies.suppression import (
    SuppressionConfig,
    label_records,
    run_suppression,
    suppression_documents,
)

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "cache" / "intervene"
DIRECTION_STRENGTHS = (0.1, 0.25, 1.0)
LOW_RANK_STRENGTHS = (0.25, 0.5, 1.0, 1.5)
PPL_BUDGET = 0.05


def _quick_setup(seed: int):
    from memprobe.train.tiny_lm import train_tiny_lm

    famous = [d for d in bundled_corpus(None, seed=seed, include_model_samples=False) if d["kind"] == "shakespeare"][:6]
    controls = [d for d in bundled_corpus(None, seed=seed, include_model_samples=False) if d["kind"] == "novel"][:4]
    docs = [{**d, "role": "candidate", "text": d["text"][:200]} for d in famous]
    docs += [{**d, "role": "control", "text": d["text"][:200]} for d in controls]
    loaded = train_tiny_lm([d["text"] for d in docs[:6]], steps=150, seq_len=64, batch=8, lr=1e-2, seed=seed)
    return loaded, docs, 300


def _full_setup(seed: int):
    return load_model("smollm2-135m"), suppression_documents(seed), 64


def main(argv: list[str] | None = None) -> int:
    ap = experiment_parser(__doc__, ROOT)
    ap.add_argument("--max-docs", type=int, default=8, help="documents per split part (CPU budget)")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # a shared 2-core CPU: more threads only spin
    t0 = time.time()
    loaded, docs, max_tokens = _quick_setup(args.seed) if args.quick else _full_setup(args.seed)
    tag = "quick" if args.quick else "smollm2"
    cache = None if args.quick else StepCache(CACHE / tag)
    records = label_records(loaded, docs, max_tokens, cache)
    # The quick model is trained on its candidates and never sees its controls: looser thresholds.
    parts = split_memorized(records, seed=args.seed, threshold=0.12 if args.quick else 0.3,
                            control_max=1.0 if args.quick else 0.25)
    rng = np.random.default_rng(args.seed)
    for name in parts:
        if len(parts[name]) > args.max_docs:
            keep = sorted(rng.choice(len(parts[name]), args.max_docs, replace=False))
            parts[name] = [parts[name][i] for i in keep]
    if not parts["heldout_memorized"] or not parts["build_memorized"]:
        raise SystemExit(f"too few memorized documents to split: {[len(v) for v in parts.values()]}")
    ids = {k: [r["token_ids"] for r in v] for k, v in parts.items()}
    mem_targets = targets_from_labels(ids["build_memorized"], [r["memorized"] for r in parts["build_memorized"]])
    ctrl_targets = targets_from_labels(ids["build_control"])

    points: dict[str, dict] = {}

    def measure(key: str, edit) -> dict:
        if key not in points:
            t = time.time()
            heldout = evaluate(loaded.model, ids["heldout_memorized"], ids["heldout_control"], edit)
            points[key] = {**heldout, "size": 0 if edit is None else edit.size, "seconds": time.time() - t}
        return points[key]

    base = measure("none", None)
    def score(path: Path) -> None:
        means = mean_activations(loaded.model, ctrl_targets)
        save_file({"scores": contrast_scores(loaded.model, mem_targets, ctrl_targets, means), "means": means},
                  str(path))

    build_key = {"inputs": {"model": {k: loaded.info.get(k) for k in ("name", "sha256", "seed")}, "labels": records, "parts": {k: [r["id"] for r in v] for k, v in parts.items()}},
                 "code": [score, mean_activations, contrast_scores]}
    scratch = cache or StepCache(tempfile.mkdtemp(prefix="suppress-quick-"))
    scratch.run("contrast scores", ["contrast_scores_mean.safetensors"], score, **build_key)
    stored = load_file(str(scratch.root / "contrast_scores_mean.safetensors"))
    scores, means = stored["scores"], stored["means"]

    def random_neurons(frac: float):
        return top_neurons(RandomScores(loaded.model, args.seed).localize().scores, frac, means=means,
                           meta={"method": "random-neurons", "fraction": frac, "seed": args.seed})

    curves: dict[str, list[dict]] = {"contrast-neurons": [], "random-neurons": [], "mean-diff-direction": [],
                                     "random-direction": []}
    edits = {}
    grid = ((0.0001, 1.0), (0.00025, 0.5), (0.00025, 1.0), (0.00035, 1.0), (0.0004, 1.0), (0.0005, 0.5), (0.0005, 1.0)) if not args.quick else \
        ((0.01, 1.0), (0.05, 0.5), (0.05, 1.0))
    for frac, strength in grid:
        key = f"contrast-neurons:{frac}:{strength}"
        edits[key] = top_neurons(scores, frac, means=means, strength=strength,
                                 meta={"method": "contrast-neurons", "fraction": frac, "seed": args.seed, "ablation": "mean"})
        curves["contrast-neurons"].append({"fraction": frac, "strength": strength, **measure(key, edits[key])})
        if strength == 1.0:
            rnd = random_neurons(frac)
            curves["random-neurons"].append({"fraction": frac, "strength": 1.0, **measure(f"random-neurons:{frac}:1.0", rnd)})
    # Guarded: the same ranking, skipping neurons whose mean ablation alone costs > 0.01 nats on the
    # build controls (never the held-out ones).
    ks, max_k = ((12, 16, 20, 24), 24) if not args.quick else ((2, 4), 4)

    def guarded() -> dict:
        g = guarded_top_neurons(loaded.model, scores, means, ctrl_targets, max_k, max_candidates=max_k + 12)
        return {"kept": g.meta["kept_neurons"], "skipped": g.meta["skipped_neurons"]}

    guard = scratch.json("guarded neurons", guarded, settings={"max_k": max_k}, inputs=build_key["inputs"],
                         code=[guarded, guarded_top_neurons])
    curves["guarded-contrast-neurons"] = []
    for k in ks:
        if k > len(guard["kept"]):
            break
        chosen = torch.zeros(scores.numel())
        chosen[guard["kept"][:k]] = 1.0
        key = f"guarded-contrast-neurons:{k}"
        edits[key] = top_neurons(chosen.view_as(scores), k=k, means=means,
                                 meta={"method": "guarded-contrast-neurons", "fraction": k / scores.numel(),
                                       "seed": args.seed, "ablation": "mean", "skipped_neurons": guard["skipped"]})
        curves["guarded-contrast-neurons"].append({"k": k, **measure(key, edits[key])})
    direction = make_edit(loaded.model, "mean-diff-direction", mem_targets, ctrl_targets, seed=args.seed)
    for s in DIRECTION_STRENGTHS:
        edit = direction.with_strength(s)
        edits[f"mean-diff-direction:{s}"] = edit
        curves["mean-diff-direction"].append({"strength": s, **measure(f"mean-diff-direction:{s}", edit)})
        rnd = make_edit(loaded.model, "random-direction", [], [], strength=s, seed=args.seed)
        curves["random-direction"].append({"strength": s, **measure(f"random-direction:{s}", rnd)})
    # A learned low-rank edit of MLP output weights (memprobe.studies.suppression, as the audit runs it),
    # built from the same build texts; its random baseline has the same layers, rank and per-layer norm.
    study = run_suppression(loaded.model, parts["build_memorized"], parts["build_control"],
                            parts["heldout_memorized"], parts["heldout_control"],
                            SuppressionConfig(seed=args.seed, max_tokens=max_tokens, strengths=LOW_RANK_STRENGTHS,
                                              ppl_budget=PPL_BUDGET))
    learned = study.edit
    learned.meta["build_seconds"] = study.build_seconds
    curves["low-rank-edit"], curves["random-low-rank"] = [], []
    for name, rows, edit in (("low-rank-edit", study.curve, learned), ("random-low-rank", study.random_curve,
                                                                        study.random_edit)):
        for row in rows:
            s = row["strength"]
            points[f"{name}:{s}"] = {k: v for k, v in row.items() if k != "strength"} | {"size": edit.size}
            if name == "low-rank-edit":
                edits[f"{name}:{s}"] = learned.with_strength(s)
            curves[name].append(dict(row) | {"size": edit.size})
    probe_status = "not tried in quick mode"
    if not args.quick:  # the issue-3 probe's direction, when its artefact exists for this model
        try:
            probe = make_edit(loaded.model, "probe-direction", [], [], loaded=loaded, seed=args.seed)
            curves["probe-direction"] = []
            for s in DIRECTION_STRENGTHS:
                edits[f"probe-direction:{s}"] = probe.with_strength(s)
                curves["probe-direction"].append({"strength": s, **measure(f"probe-direction:{s}", edits[f"probe-direction:{s}"])})
            probe_status = "used"
        except MemprobeError as exc:
            probe_status = f"unavailable: {exc}"

    def rel(p: dict) -> dict:
        return {"suppression": 1 - p["memorized_token_rate"] / base["memorized_token_rate"],
                "ppl_change": p["perplexity"] / base["perplexity"] - 1,
                "top1_change": p["top1_accuracy"] - base["top1_accuracy"]}

    for curve in curves.values():
        for p in curve:
            p.update(rel(p))
    # The learned edit as trained (strength 1), fixed before looking at held-out numbers
    preset = {"edit": "low-rank-edit:1.0", **points["low-rank-edit:1.0"], **rel(points["low-rank-edit:1.0"]),
              "random_baseline": {**points["random-low-rank:1.0"], **rel(points["random-low-rank:1.0"])},
              "training": learned.meta}
    preset["floor_met"] = preset["suppression"] >= 0.5 and preset["ppl_change"] <= PPL_BUDGET
    ok = [(k, points[k]) for k in edits if rel(points[k])["ppl_change"] <= PPL_BUDGET]
    best_key = max(ok, key=lambda kv: rel(kv[1])["suppression"])[0] if ok else None
    best = None
    if best_key is not None:
        best_edit = edits[best_key]
        method = best_key.split(":")[0]
        if method == "low-rank-edit":
            size_match = random_low_rank_like(best_edit, seed=args.seed)
        elif "neurons" in method:
            size_match = random_neurons(best_edit.meta["fraction"]).with_strength(best_edit.strength)
        else:
            size_match = make_edit(loaded.model, "random-direction", [], [], strength=best_edit.strength, seed=args.seed)
        random_point = measure(f"random-{best_key}", size_match)
        best = {"edit": best_key, **points[best_key], **rel(points[best_key]),
                "random_baseline": {**random_point, **rel(random_point)},
                "floor_met": rel(points[best_key])["suppression"] >= 0.5}
        edit_file = args.out / f"suppress_edit_{tag}.safetensors"
        save_edit(best_edit, edit_file)
        best["edit_file"] = str(edit_file)
        if not args.quick:
            best["exported_check"] = _check_export(loaded, best_edit, ids)

    results = {"model": loaded.info, "base": base, "curves": curves, "low_rank_edit_as_trained": preset,
               "best_within_budget": best,
               "best_within_budget_note": "picked among every edit by its held-out numbers (optimistic); "
                                          "low_rank_edit_as_trained is fixed in advance",
               "ppl_budget": PPL_BUDGET, "split_sizes": {k: len(v) for k, v in parts.items()},
               "heldout_ids": [r["id"] for r in parts["heldout_memorized"]],
               "build_ids": [r["id"] for r in parts["build_memorized"]], "max_tokens": max_tokens,
               "contrast_method": "attribution (activation x gradient) on memorized tokens minus on control tokens",
               "probe_direction": probe_status, "wall_seconds": time.time() - t0}
    out = args.out / f"suppress{'_quick' if args.quick else ''}.json"
    save_results(out, results, seed=args.seed)
    _figure(curves, base, args.figures / f"intervene_suppress_pareto{'_quick' if args.quick else ''}.png", loaded.name)
    print(json.dumps({"base": base, "low_rank_edit_as_trained": preset, "best": best}, indent=1, default=str))
    return 0


def _check_export(loaded, edit, ids) -> dict:
    """Export the edit, reload it with plain transformers, and re-measure the held-out numbers."""
    import shutil

    from transformers import AutoModelForCausalLM

    out = CACHE / "patched_smollm2"
    if out.exists():
        shutil.rmtree(out)
    export_patched(loaded, edit, out)
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    res = evaluate(plain, ids["heldout_memorized"], ids["heldout_control"])
    return {"dir": str(out.relative_to(ROOT)), **res}


def _figure(curves: dict, base: dict, path: Path, model_name: str) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    styles = {"contrast-neurons": "o-", "random-neurons": "o--", "mean-diff-direction": "s-", "random-direction": "s--",
              "probe-direction": "^-", "guarded-contrast-neurons": "D-", "low-rank-edit": "P-",
              "random-low-rank": "P--"}
    for name, curve in curves.items():
        curve = sorted(curve, key=lambda p: p["ppl_change"])
        xs = [100 * p["ppl_change"] for p in curve]
        ys = [100 * p["suppression"] for p in curve]
        axes[0].plot(xs, ys, styles[name], label=name)
        axes[1].plot([-100 * p["top1_change"] for p in curve], ys, styles[name], label=name)
    for ax in axes:
        ax.axhline(50, c="0.6", ls=":", lw=0.8)
        ax.set_ylabel("memorized-token rate drop, held-out (%)")
        ax.set_xscale("symlog", linthresh=1)
    axes[0].axvline(100 * PPL_BUDGET, c="0.6", ls=":", lw=0.8)
    axes[0].set_xlabel("perplexity change on non-memorized text (%)")
    axes[1].set_xlabel("top-1 accuracy drop on non-memorized text (points)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{model_name}: suppression vs cost (base mem rate {base['memorized_token_rate']:.3f}, "
                 f"ppl {base['perplexity']:.2f})")
    save_figure(fig, path, script="experiments/suppress.py")


if __name__ == "__main__":
    raise SystemExit(main())
