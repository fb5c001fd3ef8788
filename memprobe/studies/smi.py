"""The a priori memorization study shared by experiments/smi_fashion.py and experiments/smi_text.py.

One target model trains on a random half of the data, with per-sample loss snapshots. Its early checkpoint
(median training loss <= 5% of the initial one) gives the predictors: PSMI per layer (low = suspicious),
the early loss and the early logit margin. Shadow models on balanced 50% splits give the ground truth
(LiRA score of the final target, counterfactual and Feldman memorization); "memorized" = top fraction.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from memprobe.capture import capture_outputs
from memprobe.metrics import roc_curve
from memprobe.plots import roc_curves, save_figure
from memprobe.predict import (
    counterfactual_memorization,
    evaluate_predictors,
    feldman_memorization,
    lira_scores,
    logit_margin,
    psmi_per_layer,
    top_fraction,
    train_shadows,
)
from memprobe.train.classifier import TrainConfig, mlp, predict_logits, train_classifier

PAPER_FPR_AT_TPR75 = {"psmi": 0.073, "loss": 0.083, "logit_gap": 0.093}


def study_parser(doc: str | None, cache: str) -> argparse.ArgumentParser:
    """Options both SMI studies share (shadow count, training, PSMI directions, label noise, outputs)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--shadows", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=80)
    ap.add_argument("--directions", type=int, default=2000)
    ap.add_argument("--noise", type=float, default=0.03)
    ap.add_argument("--memorized-fraction", type=float, default=0.10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("experiments/results"))
    ap.add_argument("--figures", type=Path, default=Path("figures"))
    ap.add_argument("--cache", type=Path, default=Path(cache))
    return ap


def add_label_noise(labels: np.ndarray, fraction: float, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Replace `fraction` of labels by a uniformly drawn *different* class; returns (labels, noisy mask)."""
    rng = np.random.default_rng(seed)
    noisy = np.zeros(labels.size, dtype=bool)
    noisy[rng.choice(labels.size, int(round(fraction * labels.size)), replace=False)] = True
    out = labels.copy()
    out[noisy] = (labels[noisy] + rng.integers(1, n_classes, noisy.sum())) % n_classes
    return out, noisy


def run_study(
    *,
    x: torch.Tensor,
    y: np.ndarray,
    noisy: np.ndarray,
    make_model: Callable[[], nn.Module],
    hidden_modules: list[str],
    config: TrainConfig,
    n_shadows: int,
    n_directions: int,
    memorized_fraction: float,
    seed: int,
    cache_dir: Path,
    frozen_features: dict[str, np.ndarray] | None = None,
    n_boot: int = 200,
) -> tuple[dict, dict]:
    """Run the whole study; returns (results for the JSON, arrays for the figures)."""
    n = y.size
    timings: dict[str, float] = {}
    rng = np.random.default_rng(seed)
    members = np.sort(rng.permutation(n)[: n // 2])
    y_t = torch.from_numpy(y).long()

    cached = {"target_snapshots": len(list((cache_dir / "target").glob("step*.safetensors"))),
              "shadows": len(list((cache_dir / "shadows").glob("shadow*.safetensors")))}
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    target = make_model()
    history = train_classifier(target, x[members], y_t[members], config, checkpoint_dir=cache_dir / "target",
                               keep_weights=True)
    final_logits = predict_logits(target, x).numpy()
    early = history.early_index(0.05)
    timings["target_train_s"] = time.perf_counter() - t0
    fit = final_logits[members].argmax(1) == y[members]
    print(f"target: early step {history.steps[early]}/{history.steps[-1]}, train accuracy {fit.mean():.3f}, "
          f"flipped labels fitted {fit[noisy[members]].mean():.3f}", flush=True)

    early_model = make_model()
    early_model.load_state_dict(history.weights[early])
    features = {f"frozen:{k}": v[members] for k, v in (frozen_features or {}).items()}
    features.update({f"head:{k}": v for k, v in capture_outputs(early_model, x[members], hidden_modules).items()})
    final_model = make_model()
    final_model.load_state_dict(history.weights[-1])
    final_features = capture_outputs(final_model, x[members], hidden_modules)

    t0 = time.perf_counter()
    y_m = y[members]
    psmi = psmi_per_layer(features, y_m, n_directions=n_directions, seed=seed)
    psmi_final = psmi_per_layer({f"head:{k}": v for k, v in final_features.items()}, y_m,
                                n_directions=n_directions, seed=seed)
    timings["psmi_s"] = time.perf_counter() - t0

    def train_fn(idx: np.ndarray, s: int) -> np.ndarray:
        torch.manual_seed(s)
        model = make_model()
        train_classifier(model, x[idx], y_t[idx], TrainConfig(**{**asdict(config), "seed": s, "eval_every": 10**9}))
        return predict_logits(model, x).numpy()

    t0 = time.perf_counter()
    runs = train_shadows(train_fn, y, n_shadows, seed=seed + 1, cache_dir=cache_dir / "shadows",
                         progress=lambda i, k: print(f"  shadow {i}/{k}", flush=True))
    timings["shadows_train_s"] = time.perf_counter() - t0
    ground = {
        "lira": lira_scores(runs, final_logits)[members],
        "counterfactual": counterfactual_memorization(runs)[members],
        "feldman": feldman_memorization(runs)[members],
    }

    early_loss = history.losses[early]
    early_margin = logit_margin(history.logits[early], y_m)
    predictors = {f"psmi[{k}]": -v for k, v in psmi.items()}
    predictors.update({f"psmi_final[{k}]": -v for k, v in psmi_final.items()})
    predictors["early_loss"] = early_loss
    predictors["early_logit_gap"] = -early_margin

    evaluation, correlations = {}, {}
    for gname, score in ground.items():
        memorized = top_fraction(score, memorized_fraction)
        evaluation[gname] = evaluate_predictors(predictors, memorized, n_boot=n_boot, seed=seed)
        evaluation[gname]["_memorized_noisy_fraction"] = float(noisy[members][memorized].mean())
        correlations[gname] = {k: float(spearmanr(v, score).statistic) for k, v in predictors.items()}
    noisy_detection = evaluate_predictors(predictors, noisy[members]) if noisy[members].any() else {}

    fixed = f"psmi[head:{hidden_modules[-1]}]"  # chosen before looking: the head's last hidden layer
    verdict = {}
    for gname, ev in evaluation.items():
        base = min(("early_loss", "early_logit_gap"), key=lambda k: ev[k]["fpr_at_tpr_0.75"])
        verdict[gname] = {
            "psmi_layer": fixed, "strongest_baseline": base,
            "psmi_auc": ev[fixed]["roc_auc"], "baseline_auc": ev[base]["roc_auc"],
            "psmi_fpr_at_tpr_0.75": ev[fixed]["fpr_at_tpr_0.75"], "baseline_fpr_at_tpr_0.75": ev[base]["fpr_at_tpr_0.75"],
            "psmi_lower_fpr": ev[fixed]["fpr_at_tpr_0.75"] < ev[base]["fpr_at_tpr_0.75"],
            "auc_ci95_overlap": bool(ev[fixed]["roc_auc_ci95"][0] <= ev[base]["roc_auc_ci95"][1]
                                     and ev[base]["roc_auc_ci95"][0] <= ev[fixed]["roc_auc_ci95"][1]),
        }
    early_layers = [k for k in predictors if k.startswith("psmi[")]
    best = max(early_layers, key=lambda k: evaluation["lira"][k]["roc_auc"])
    train_acc = float((final_logits[members].argmax(1) == y_m).mean())
    out_idx = np.setdiff1d(np.arange(n), members)
    results = {
        "scale": {
            "n_samples": n, "n_target_members": int(members.size), "n_shadows": n_shadows,
            "shadow_train_size": int(runs.in_mask.sum(1).mean()), "label_noise_fraction": float(noisy.mean()),
            "n_directions": n_directions, "memorized_fraction": memorized_fraction, "train_config": asdict(config),
            "hidden_modules": hidden_modules, "feature_dims": {k: int(v.shape[1]) for k, v in features.items()},
        },
        "early_checkpoint": {
            "rule": "first snapshot with median training loss <= 5% of the initial median",
            "index": early, "step": history.steps[early], "final_step": history.steps[-1],
            "median_loss_initial": float(np.median(history.losses[0])),
            "median_loss_early": float(np.median(history.losses[early])),
            "train_accuracy_early": float((history.logits[early].argmax(1) == y_m).mean()),
            "noisy_accuracy_early": float((history.logits[early].argmax(1) == y_m)[noisy[members]].mean())
            if noisy[members].any() else None,
        },
        "target": {
            "train_accuracy_final": train_acc,
            "heldout_accuracy_final_vs_given_labels": float((final_logits[out_idx].argmax(1) == y[out_idx]).mean()),
            "noisy_members_fit_final": float((final_logits[members].argmax(1) == y_m)[noisy[members]].mean())
            if noisy[members].any() else None,
        },
        "shadows": {
            "mean_in_accuracy": float(runs.correct[runs.in_mask].mean()),
            "mean_out_accuracy": float(runs.correct[~runs.in_mask].mean()),
        },
        "evaluation_by_ground_truth": evaluation,
        "spearman_predictor_vs_memorization_score": correlations,
        "noisy_label_detection": noisy_detection,
        "best_early_psmi_layer_by_lira_auc": best,
        "psmi_vs_baselines": verdict,
        "paper_fpr_at_tpr_0.75": PAPER_FPR_AT_TPR75,
        "timings_s": timings,
        "found_in_cache_at_start": cached,
        "timings_note": "wall seconds of this invocation on a shared 2-core CPU; work found in the cache "
                        "(see found_in_cache_at_start) was loaded, not redone",
    }
    arrays = {"predictors": predictors, "ground": ground, "noisy": noisy[members], "best": best,
              "memorized_fraction": memorized_fraction, "median_loss": history.median_loss(),
              "steps": np.array(history.steps), "early": early}
    return results, arrays


def run_mlp_study(args: argparse.Namespace, *, x: torch.Tensor, y: np.ndarray, noisy: np.ndarray, n_classes: int,
                  config: TrainConfig, frozen_features: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """`run_study` with the MLP 256-256 head of the image and text studies (PSMI on its two ReLU layers),
    settings from `study_parser`'s options, cached under --cache by sample count and settings."""
    in_dim = int(np.prod(x.shape[1:]))
    tag = f"n{len(x)}_s{args.shadows}_e{args.epochs}_seed{args.seed}{'_quick' if args.quick else ''}"
    return run_study(
        x=x, y=y, noisy=noisy, make_model=lambda: mlp(in_dim, (256, 256), n_classes),
        hidden_modules=["act0", "act1"], config=config, n_shadows=args.shadows, n_directions=args.directions,
        memorized_fraction=args.memorized_fraction, seed=args.seed, cache_dir=args.cache / tag,
        frozen_features=frozen_features, n_boot=50 if args.quick else 200,
    )


def write_study(results: dict, arrays: dict, args: argparse.Namespace, name: str, title: str) -> list[Path]:
    """Save `<--out>/<name>.json` (with provenance) and the figures under --figures (name + "_quick"
    with --quick); print the LiRA summary of the best early PSMI layer and the two baselines. Returns
    the paths written."""
    from memprobe.results import save_results

    name += "_quick" if args.quick else ""
    path = save_results(args.out / f"{name}.json", results, seed=args.seed)
    figs = make_figures(arrays, results, args.figures, name, title)
    ev = results["evaluation_by_ground_truth"]["lira"]
    for k in (results["best_early_psmi_layer_by_lira_auc"], "early_loss", "early_logit_gap"):
        print(f"{k:28s} AUC {ev[k]['roc_auc']:.3f}  FPR@TPR75 {ev[k]['fpr_at_tpr_0.75']:.3f}  "
              f"TPR@1%FPR {ev[k]['tpr_at_fpr_0.01']:.3f}")
    print("wrote", path, *figs)
    return [path, *figs]


def make_figures(arrays: dict, results: dict, figures: Path, prefix: str, title: str) -> list[Path]:
    """ROC curves (linear + log), PSMI vs memorization score, per-layer AUC, training-loss curve."""
    import matplotlib.pyplot as plt

    preds, ground, best = arrays["predictors"], arrays["ground"], arrays["best"]
    memorized = top_fraction(ground["lira"], arrays["memorized_fraction"])
    paths = []
    curves = {}
    for name in (best, "early_loss", "early_logit_gap"):
        fpr, tpr, _ = roc_curve(preds[name], memorized)
        auc = results["evaluation_by_ground_truth"]["lira"][name]["roc_auc"]
        curves[f"{name} (AUC {auc:.3f})"] = (fpr, tpr)
    fig = roc_curves(curves, title=f"LiRA top {arrays['memorized_fraction']:.0%}")
    fig.suptitle(f"{title}: early predictors of end-of-training memorization", y=1.02)
    paths.append(save_figure(fig, figures / f"{prefix}_roc.png"))

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (gname, score) in zip(axes, ground.items(), strict=True):
        noisy = arrays["noisy"]
        ax.scatter(-preds[best][~noisy], score[~noisy], s=4, alpha=0.4, label="clean label")
        ax.scatter(-preds[best][noisy], score[noisy], s=10, c="C3", label="flipped label")
        rho = results["spearman_predictor_vs_memorization_score"][gname][best]
        ax.set_xlabel(f"early PSMI ({best[5:-1]}), nats")
        ax.set_ylabel(f"{gname} memorization score")
        ax.set_title(f"Spearman(-PSMI, score) = {rho:.2f}")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{title}: early PSMI vs end-of-training memorization")
    paths.append(save_figure(fig, figures / f"{prefix}_psmi_vs_mem.png"))

    layers = [k for k in preds if k.startswith("psmi[")]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(layers) + 3), 4))
    width = 0.8 / len(ground)
    for j, gname in enumerate(ground):
        ev = results["evaluation_by_ground_truth"][gname]
        ax.bar(np.arange(len(layers)) + j * width, [ev[k]["roc_auc"] for k in layers], width, label=gname)
        for b, base in enumerate(("early_loss", "early_logit_gap")):
            ax.axhline(ev[base]["roc_auc"], color=f"C{j}", ls=("--", ":")[b], lw=0.9)
    ax.set_xticks(np.arange(len(layers)) + 0.4 - width / 2, [k[5:-1] for k in layers], rotation=30, ha="right")
    ax.set_ylabel("ROC-AUC of -PSMI (bars); early loss --, early logit gap :")
    ax.set_ylim(0.4, 1.0)
    ax.set_title(f"{title}: per-layer AUC for predicting memorized samples")
    ax.legend(fontsize=7)
    paths.append(save_figure(fig, figures / f"{prefix}_layer_auc.png"))

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(arrays["steps"], arrays["median_loss"])
    ax.axvline(arrays["steps"][arrays["early"]], color="C3", ls="--", label="early checkpoint")
    ax.set_yscale("log")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("median training loss (target)")
    ax.legend()
    paths.append(save_figure(fig, figures / f"{prefix}_loss.png"))
    return paths
