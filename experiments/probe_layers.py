"""Neuron-level memorization probes on a real LM, every layer: which sites separate memorized tokens
from equally confident non-memorized ones, how few neurons it takes, whether it transfers across
genres, and whether in-context repetition looks like memorization (after Slonski 2024).

Pipeline (each step cached under --cache, so a rerun resumes): bundled corpus -> labels (the model's
own greedy/confidence labels) -> token set (memorized vs confident controls vs repetition,
memprobe.memdata) -> capture of resid_post and mlp.hook_post at all layers (bfloat16) -> one batched
probe sweep with document-grouped cross-validation -> metrics with document-bootstrap intervals and
output-only baselines beside every number.

    .venv/bin/python experiments/probe_layers.py                  # smollm2-135m, full
    .venv/bin/python experiments/probe_layers.py --model gemma3-270m
    .venv/bin/python experiments/probe_layers.py --quick --out /tmp/q --figures /tmp/q

--quick runs the pipeline on a random tiny model; a random model is confident about nothing, so quick
mode counts every token as confident-correct: it checks the plumbing, not the science.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memprobe.io import atomic_write
from memprobe.memdata import CONTROL, MEMORIZED, REPETITION, TokenSet, genre_split
from memprobe.metrics import roc_auc, roc_curve
from memprobe.plots import heatmap, roc_curves, save_figure
from memprobe.probes import LogisticProbe, ProbeSweep, detection, read_rows
from memprobe.probes.artefact import DEFAULT_WINDOW
from memprobe.probes.sweep import balanced_weights
from memprobe.results import save_results
from memprobe.sites import layer_of, site_kind
from memprobe.studies.cache import StepCache
from memprobe.studies.probe_data import SITES, prepare_probe_data
from memprobe.studies.probe_sweep import ProbeSweepConfig, cached_cross_validation, run_probe_sweep

ROOT = Path(__file__).resolve().parent.parent
TRAIN_GENRES = ("legal", "technical", "filler")  # licences, notices, Python's texts, lorem ipsum: cross-genre train side
K_GRID = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
N_FOLDS, ALPHA, MAX_ITER = 5, 1e-2, 150


def site_table(sites: list[str], values: dict[str, float]) -> tuple[list[str], list[int], np.ndarray]:
    kinds = sorted({site_kind(s) for s in sites}, reverse=True)
    layers = sorted({layer_of(s) for s in sites})
    grid = np.full((len(kinds), len(layers)), np.nan)
    for s in sites:
        grid[kinds.index(site_kind(s)), layers.index(layer_of(s))] = values[s]
    return kinds, layers, grid


def baselines_block(tokens: TokenSet, mask: np.ndarray, labels: np.ndarray, n_boot: int, seed: int) -> dict:
    return {name: detection(score[mask], labels[mask], tokens.doc_id[mask], n_boot=n_boot, seed=seed)
            for name, score in tokens.baselines().items()}


def sparse_curve(store: Any, site: str, rows: np.ndarray, y: np.ndarray, folds: np.ndarray, train_ok: np.ndarray,
                 eval_mask: np.ndarray, fold_coef: np.ndarray, window: int, doc_start: np.ndarray) -> dict[int, float]:
    """Out-of-fold AUC of top-k probes: each fold ranks neurons by its own dense probe, then refits."""
    X = read_rows(store, site, rows, window=window, doc_start=doc_start).double().numpy()
    out = {}
    for k in (k for k in K_GRID if k <= X.shape[1]):
        scores = np.empty(len(y))
        for i, f in enumerate(np.unique(folds)):
            top = np.argsort(-np.abs(fold_coef[i]))[:k]
            train = (folds != f) & train_ok
            probe = LogisticProbe(alpha=ALPHA, max_iter=MAX_ITER, class_weight="balanced").fit(X[train][:, top], y[train])
            scores[folds == f] = probe.decision_function(X[folds == f][:, top])
        out[k] = roc_auc(scores[eval_mask], y[eval_mask])
    return out


def study_config(args: argparse.Namespace) -> ProbeSweepConfig:
    """The full evaluation: 5 folds, document-bootstrap intervals, top neurons at the best site."""
    return ProbeSweepConfig(window=args.window, n_folds=N_FOLDS, seed=args.seed, alpha=ALPHA, max_iter=MAX_ITER,
                            n_shuffled=1, n_boot=50 if args.quick else args.n_boot, top_neurons=20)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    t0 = time.time()
    data = prepare_probe_data(args.model, args.cache, quick=args.quick, seed=args.seed, max_words=args.max_words)
    loaded, tokens, store = data.loaded, data.tokens, data.store
    cache = StepCache(args.cache)
    config = study_config(args)
    study = run_probe_sweep(store, tokens, config, cache=cache)
    if study.status != "ok":
        raise SystemExit(f"probe sweep skipped: {study.reason}")
    n_boot = config.n_boot
    rows, doc_start, y, folds = study.rows, study.doc_start, tokens.label, study.cv.folds
    is_rep = tokens.category == REPETITION
    main_mask = study.main  # memorized vs confident controls
    sweep = config.sweep()
    oof = study.cv.oof
    sites = list(study.per_site)
    per_site, best = study.per_site, study.best_site
    baselines = study.baselines

    # Slonski's per-token probe (one position, window 1) beside the windowed one, same folds and tokens
    per_token = {}
    if args.window != 1:
        single = ProbeSweep(alpha=ALPHA, max_iter=MAX_ITER, progress=True)
        oof1 = cached_cross_validation(cache, "per-token probe sweep", single, store, rows, y, folds, n_shuffled=1,
                                       seed=args.seed, trainable=main_mask).oof
        auc1 = {s: roc_auc(oof1[s][main_mask], y[main_mask]) for s in sites}
        best1 = max(sites, key=auc1.__getitem__)
        per_token = {"best_site": best1, "auc_per_site": auc1, "at_best_site": detection(
            oof1[best1][main_mask], y[main_mask], tokens.doc_id[main_mask], n_boot=n_boot, seed=args.seed)}

    # negatives by kind at the best site: which controls look memorized?
    by_kind = {}
    for kind in sorted(set(tokens.kind[tokens.category == CONTROL].tolist())):
        m = (tokens.category == MEMORIZED) | ((tokens.category == CONTROL) & (tokens.kind == kind))
        by_kind[kind] = {"probe_auc": roc_auc(oof[best][m], y[m]), "target_prob_auc": roc_auc(tokens.target_prob[m], y[m]),
                         "control_tokens": int(((tokens.category == CONTROL) & (tokens.kind == kind)).sum())}

    # lexical baseline: the same probe on the first block's residual stream, where a window is little more
    # than a bag of the recent tokens; perturbed famous texts share nearly all their words with the originals
    lexical_site = min((s for s in sites if site_kind(s) == "hook_resid_post"), key=layer_of)
    lexical = {"site": lexical_site, **per_site[lexical_site]["probe"], "by_kind": {
        kind: roc_auc(oof[lexical_site][m], y[m]) for kind in by_kind
        for m in [(tokens.category == MEMORIZED) | ((tokens.category == CONTROL) & (tokens.kind == kind))]}}

    # in-context repetition, scored by probes that never saw it
    repetition = {}
    if is_rep.any():
        rep_mask = (tokens.category == MEMORIZED) | is_rep
        ctrl = tokens.category == CONTROL
        threshold = {s: np.quantile(oof[s][ctrl], 0.99) for s in sites}
        repetition = {
            "tokens": int(is_rep.sum()),
            "memorized_vs_repetition_auc": {s: roc_auc(oof[s][rep_mask], y[rep_mask]) for s in sites},
            "repetition_flagged_at_1pct_control_fpr": {s: float((oof[s][is_rep] > threshold[s]).mean()) for s in sites},
            "baselines_memorized_vs_repetition_auc": {n: roc_auc(v[rep_mask], y[rep_mask]) for n, v in tokens.baselines().items()},
        }
        # can a probe tell them apart when trained to? memorized (1) vs repetition (0), same folds
        rep_oof = cached_cross_validation(cache, "repetition probe sweep", sweep, store, rows, y, folds,
                                          n_shuffled=0, seed=args.seed, trainable=rep_mask, doc_start=doc_start).oof
        repetition["trained_memorized_vs_repetition_auc"] = {s: roc_auc(rep_oof[s][rep_mask], y[rep_mask]) for s in sites}

    # cross-genre: train on legal/technical/filler memorized texts, test on literature/speech/scripture
    train_g, test_g = genre_split(tokens.subset(main_mask), TRAIN_GENRES, seed=args.seed)
    cross_genre = {}
    if (y[main_mask][train_g] == 1).any() and (y[main_mask][test_g] == 1).any():
        sub_rows, sub_y, sub_docs = rows[main_mask], y[main_mask], tokens.doc_id[main_mask]
        cg_sites = [s for s in sites if site_kind(s) == "hook_resid_post" or s == best]  # CPU budget
        cg = sweep.run(store, sub_rows, sub_y[None].astype(float), balanced_weights(sub_y, train_g)[None], cg_sites,
                       doc_start[main_mask])
        cg_oof = {s: cg.scores[s][0] for s in cg_sites}
        cg_auc = {s: roc_auc(cg_oof[s][test_g], sub_y[test_g]) for s in cg_sites}
        best_cg = max(cg_sites, key=cg_auc.__getitem__)
        test_tokens = tokens.subset(main_mask)
        cross_genre = {
            "train_genres": list(TRAIN_GENRES),
            "test_positive_genres": sorted(set(test_tokens.genre[test_g & (sub_y == 1)].tolist())),
            "train_tokens": {"memorized": int((sub_y[train_g] == 1).sum()), "control": int((sub_y[train_g] == 0).sum())},
            "test_tokens": {"memorized": int((sub_y[test_g] == 1).sum()), "control": int((sub_y[test_g] == 0).sum())},
            "auc_per_site": cg_auc,
            "at_best_cv_site": {"site": best, **detection(cg_oof[best][test_g], sub_y[test_g], sub_docs[test_g],
                                                          n_boot=n_boot, seed=args.seed)},
            "at_best_cross_genre_site_oracle": {"site": best_cg, **detection(cg_oof[best_cg][test_g], sub_y[test_g],
                                                                     sub_docs[test_g], n_boot=n_boot, seed=args.seed)},
            "baselines": baselines_block(test_tokens, test_g, sub_y, n_boot, args.seed),
        }

    # sparse probes at the best site
    curve = sparse_curve(store, best, rows, y, folds, main_mask, main_mask, study.cv.fold_coef(best), args.window,
                         doc_start)
    dense = per_site[best]["probe"]["roc_auc"]
    target = 0.95 * dense
    needed = next((k for k, v in curve.items() if v >= target), None)

    # top neurons of the final probe at the best site (all non-repetition tokens); the shipped default
    # probe is built by `memprobe probe train --site auto` (see README), not here
    top_neurons = study.top_neurons

    results = {
        "model": loaded.info, "sites": SITES, "study": study.to_dict()["config"], "n_folds": N_FOLDS, "alpha": ALPHA, "max_iter": MAX_ITER,
        "feature_position": "activation at t-1 scores token t", "window": args.window,
        "window_meaning": "feature = mean activation over positions max(start, t-window) .. t-1 of the text",
        "per_token_probe_window_1": per_token, "n_boot": n_boot, "quick": args.quick,
        "max_words": args.max_words,
        "token_counts": tokens.counts(), "documents": len(set(tokens.doc_id.tolist())),
        "best_site": best, "best": per_site[best], "baselines": baselines, "per_site": per_site,
        "lexical_baseline_probe": lexical,
        "negatives_by_kind_at_best_site": by_kind, "repetition": repetition, "cross_genre": cross_genre,
        "sparse": {"site": best, "dense_auc": dense, "auc_by_k": curve, "neurons_for_95pct_of_dense": needed},
        "top_neurons": top_neurons, "seconds": time.time() - t0,
    }
    figures(args, results, sites, oof, tokens, main_mask, y)
    return results


def figures(args: argparse.Namespace, results: dict, sites: list[str], oof: dict, tokens: TokenSet,
            main_mask: np.ndarray, y: np.ndarray) -> None:
    name, fig_dir = args.name, args.figures
    auc = {s: results["per_site"][s]["probe"]["roc_auc"] for s in sites}
    kinds, layers, grid = site_table(sites, auc)
    base = results["baselines"]["target_prob"]["roc_auc"]
    fig = heatmap(grid, row_labels=kinds, col_labels=[str(i) for i in layers], vmin=0.5, vmax=1.0,
                  title=f"{results['model']['name']}: probe ROC-AUC, memorized vs confident controls "
                        f"(target-prob baseline {base:.3f})", cbar_label="held-out ROC-AUC")
    save_figure(fig, fig_dir / f"{name}_auc_heatmap.png")
    if results["repetition"]:
        _, _, grid = site_table(sites, results["repetition"]["memorized_vs_repetition_auc"])
        fig = heatmap(grid, row_labels=kinds, col_labels=[str(i) for i in layers], vmin=0.0, vmax=1.0, cmap="coolwarm",
                      title="memorization probe: memorized vs in-context repetition (0.5 = cannot tell)",
                      cbar_label="ROC-AUC")
        save_figure(fig, fig_dir / f"{name}_repetition_heatmap.png")
    best = results["best_site"]
    curves = {f"probe {best}": roc_curve(oof[best][main_mask], y[main_mask])[:2]}
    for n, v in tokens.baselines().items():
        curves[n] = roc_curve(v[main_mask], y[main_mask])[:2]
    save_figure(roc_curves(curves, title="memorized vs confident controls"), fig_dir / f"{name}_roc.png")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ks = list(results["sparse"]["auc_by_k"])
    ax.plot(ks, list(results["sparse"]["auc_by_k"].values()), marker="o", label="top-k probe")
    ax.axhline(results["sparse"]["dense_auc"], ls="--", c="k", lw=1, label="dense probe")
    ax.axhline(0.95 * results["sparse"]["dense_auc"], ls=":", c="0.5", lw=1, label="95% of dense")
    ax.axhline(base, ls="-.", c="C3", lw=1, label="target probability")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("neurons used (k)")
    ax.set_ylabel("held-out ROC-AUC")
    ax.set_title(f"sparse probes at {best}")
    ax.legend(fontsize=7)
    save_figure(fig, fig_dir / f"{name}_sparse.png")


def _fmt(block: dict, key: str) -> str:
    ci = block.get(f"{key}_ci95")
    return f"{block[key]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def markdown_table(results: dict) -> str:
    """The README table: best site, every baseline on the same held-out tokens, cross-genre, sparse."""
    best, base = results["best"], results["baselines"]
    lines = [f"Model {results['model']['name']} ({results['model'].get('quantization')}); "
             f"{results['token_counts']['memorized']['tokens']} memorized vs "
             f"{results['token_counts']['control']['tokens']} confident control tokens in {results['documents']} "
             f"documents; {results['n_folds']}-fold document-grouped CV; 95% document-bootstrap CIs; probe features "
             f"average the activations of the {results.get('window', 1)} positions before each token.", "",
             "| score (held-out documents) | ROC-AUC | TPR at 1% FPR |", "|---|---|---|",
             f"| probe at best site `{results['best_site']}` | {_fmt(best['probe'], 'roc_auc')} | "
             f"{_fmt(best['probe'], 'tpr_at_fpr_0.01')} |",
             f"| same site, shuffled-label probe | {best['shuffled_labels_auc']:.3f} | "
             f"{best['shuffled_labels_tpr_at_fpr_0.01']:.3f} |"]
    lex = results.get("lexical_baseline_probe")
    if lex:
        lines.append(f"| lexical baseline: same probe at `{lex['site']}` | {_fmt(lex, 'roc_auc')} | "
                     f"{_fmt(lex, 'tpr_at_fpr_0.01')} |")
    one = results.get("per_token_probe_window_1")
    if one:
        lines.append(f"| per-token probe (window 1) at its best site `{one['best_site']}` | "
                     f"{_fmt(one['at_best_site'], 'roc_auc')} | {_fmt(one['at_best_site'], 'tpr_at_fpr_0.01')} |")
    for name, block in base.items():
        lines.append(f"| baseline: {name} | {_fmt(block, 'roc_auc')} | {_fmt(block, 'tpr_at_fpr_0.01')} |")
    cg = results["cross_genre"]
    if cg:
        for key in ("at_best_cv_site", "at_best_cross_genre_site_oracle"):
            lines.append(f"| cross-genre probe ({key.replace('_', ' ')}, `{cg[key]['site']}`) | "
                         f"{_fmt(cg[key], 'roc_auc')} | {_fmt(cg[key], 'tpr_at_fpr_0.01')} |")
        lines.append(f"| cross-genre baseline: target_prob | {_fmt(cg['baselines']['target_prob'], 'roc_auc')} | "
                     f"{_fmt(cg['baselines']['target_prob'], 'tpr_at_fpr_0.01')} |")
    rep = results["repetition"]
    if rep:
        b = results["best_site"]
        lines += ["", f"In-context repetition ({rep['tokens']} tokens), at `{b}`: memorized vs repetition AUC "
                  f"{rep['memorized_vs_repetition_auc'][b]:.3f} for the memorization probe "
                  f"(target_prob: {rep['baselines_memorized_vs_repetition_auc']['target_prob']:.3f}); "
                  f"{100 * rep['repetition_flagged_at_1pct_control_fpr'][b]:.1f}% of repetition tokens flagged at the "
                  f"1%-control-FPR threshold; a probe trained to separate them reaches "
                  f"{rep['trained_memorized_vs_repetition_auc'][b]:.3f} "
                  f"(best site {max(rep['trained_memorized_vs_repetition_auc'].values()):.3f})."]
    by_kind = results["negatives_by_kind_at_best_site"]
    lines += ["", "AUC against each kind of control (memorized tokens vs that kind only): " + "; ".join(
        f"{kind} {v['probe_auc']:.3f} (target prob {v['target_prob_auc']:.3f}"
        + (f", lexical baseline {lex['by_kind'][kind]:.3f}" if lex else "") + ")" for kind, v in by_kind.items()) + "."]
    sp = results["sparse"]
    lines += ["", f"Sparse probes at `{sp['site']}`: {sp['neurons_for_95pct_of_dense']} neurons reach 95% of the "
              f"dense AUC ({sp['dense_auc']:.3f}); AUC by k: "
              + ", ".join(f"{k}: {v:.3f}" for k, v in sp["auc_by_k"].items()) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--quick", action="store_true", help="tiny random model, plumbing only (< 60 s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-boot", type=int, default=200, help="document-bootstrap draws per interval")
    p.add_argument("--max-words", type=int, default=80, help="cut corpus texts to this many words (CPU budget)")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                   help="probe features average this many positions before each token (1: Slonski's per-token probe)")
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "results")
    p.add_argument("--figures", type=Path, default=ROOT / "figures")
    p.add_argument("--cache", type=Path, help="default: cache/probe_layers/<model> (<model>-quick with --quick)")
    args = p.parse_args()
    if args.quick:  # the tiny random stand-in of the same architecture
        args.model = {"smollm2-135m": "tiny-llama", "gemma3-270m": "tiny-gemma3"}.get(args.model, args.model)
        args.max_words = 40
    args.cache = args.cache or ROOT / "cache" / "probe_layers" / (args.model + ("-quick" if args.quick else ""))
    args.name = "probe_layers" if args.model == "smollm2-135m" else f"probe_layers_{args.model.replace('-', '_')}"
    torch.set_num_threads(1)
    results = run(args)
    path = save_results(args.out / f"{args.name}.json", results, seed=args.seed)
    atomic_write(args.out / f"{args.name}.md", markdown_table(results))
    best = results["best"]["probe"]
    print(f"best site {results['best_site']}: AUC {best['roc_auc']:.3f} {best.get('roc_auc_ci95')}, "
          f"TPR@1%FPR {best['tpr_at_fpr_0.01']:.3f}; target-prob AUC {results['baselines']['target_prob']['roc_auc']:.3f}; "
          f"wrote {path} in {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
