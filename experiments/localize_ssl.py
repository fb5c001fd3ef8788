"""LayerMem, ΔLayerMem, UnitMem and ClassMem of SimCLR vs supervised encoders on Fashion-MNIST.

Reproduces (at CPU scale) the findings of Wang, Dziedzic, Backes, Boenisch, "Localizing
Memorization in SSL Vision Encoders" (NeurIPS 2024):
  F1 memorization (LayerMem) grows with depth, but ΔLayerMem is not concentrated in the last layer;
  F2 highly memorizing units (high UnitMem) are spread over the whole encoder;
  F3 SSL encoders have more units selective for single points than supervised ones (UnitMem),
     while supervised ones have more class-selective units (ClassMem);
  F4 atypical points are memorized more (SSLMem / LayerMem) and high-UnitMem units pick them;
  F5 (with --vit) in a ViT most of the memorization increase sits in the MLP (fully connected) halves.

Set-up: a seeded split of the Fashion-MNIST training set into shared / candidate / independent
points; f = trained on shared + candidates, g = shared + independent, with identical seeds and
hyperparameters (and the same batch composition: the k-th batch of f and g differ only where a
candidate stands in f and an independent point in g). The same for supervised encoders.

    python experiments/localize_ssl.py                 # train (resumes) + analyse; ~1 h CPU time
    python experiments/localize_ssl.py --train-only --only resnet_ssl_f   # one encoder (run several at once)
    python experiments/localize_ssl.py --vit           # also the ViT pair (attention vs MLP halves)
    python experiments/localize_ssl.py --quick --out /tmp/q.json --figures /tmp/qfig   # smoke test
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from memprobe.capture import capture_augmented
from memprobe.datasets import load_images
from memprobe.localize import (
    alignment_distances,
    layermem,
    residual_sites,
    select_points,
    sslmem,
    stream_unitmem,
    unit_points,
)
from memprobe.localize.unitmem import token_mean
from memprobe.results import save_results
from memprobe.train.augment import AugmentConfig, make_augment
from memprobe.train.simclr import (
    SmallResNet,
    TrainConfig,
    knn_accuracy,
    load_encoder,
    memorization_split,
    train_encoder,
)

ROOT = Path(__file__).resolve().parents[1]

SCALES = {
    # shared/candidates/independent: the split; epochs: per encoder (all four the same);
    # unit_extra: shared points added to the candidates for UnitMem; top/random: LayerMem point sets
    "full": dict(shared=1200, candidates=200, independent=200, epochs=25, vit_epochs=20, n_aug=10,
                 unit_extra=600, top=20, random=20, test=2000, batch_size=128),
    # few points, many epochs: the regime where SimCLR measurably memorizes its candidates
    "small": dict(shared=400, candidates=100, independent=100, epochs=50, vit_epochs=50, n_aug=10,
                  unit_extra=300, top=10, random=10, test=2000, batch_size=100),
    "quick": dict(shared=96, candidates=16, independent=16, epochs=1, vit_epochs=1, n_aug=2,
                  unit_extra=16, top=4, random=4, test=100, batch_size=56),
}
THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stats(v: np.ndarray) -> dict:
    v = np.asarray(v, dtype=float)
    q = np.quantile(v, [0.05, 0.25, 0.5, 0.75, 0.95, 0.99])
    return {"n": int(v.size), "mean": float(v.mean()), "std": float(v.std()), "q05": q[0], "q25": q[1],
            "median": q[2], "q75": q[3], "q95": q[4], "q99": q[5], "max": float(v.max())}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def perm_test_mean_diff(a: np.ndarray, b: np.ndarray, n: int = 5000, seed: int = 0) -> float:
    """Two-sided permutation p-value for mean(a) - mean(b)."""
    rng = np.random.default_rng(seed)
    both = np.concatenate([a, b])
    obs = abs(a.mean() - b.mean())
    hits = 0
    for _ in range(n):
        rng.shuffle(both)
        hits += abs(both[: len(a)].mean() - both[len(a) :].mean()) >= obs - 1e-15
    return (hits + 1) / (n + 1)


# ----------------------------------------------------------------------------------------- training
def train_all(ds, split, sc: dict, ckpt_dir: Path, seed: int, archs: list[str], only: list[str] | None = None) -> dict:
    """Train (or resume) every encoder pair (or just those in `only`); returns {name: checkpoint path}."""
    sets = {"f": torch.cat([split["shared"], split["candidates"]]),
            "g": torch.cat([split["shared"], split["independent"]])}
    paths = {}
    for arch in archs:
        for mode in ("simclr", "supervised"):
            if arch == "vit" and mode == "supervised":
                continue
            epochs = sc["vit_epochs"] if arch == "vit" else sc["epochs"]
            cfg = TrainConfig(mode=mode, arch=arch, epochs=epochs, batch_size=sc["batch_size"], seed=seed,
                              warmup_epochs=min(2, epochs - 1) if epochs > 1 else 0)
            for which, idx in sets.items():
                name = f"{arch}_{'ssl' if mode == 'simclr' else 'sl'}_{which}"
                path = ckpt_dir / f"{name}.safetensors"
                paths[name] = path
                if only and name not in only:
                    continue
                t0 = time.time()
                train_encoder(ds.images[idx], ds.labels[idx], cfg, path, log=lambda m, n=name: log(f"{n}: {m}"))
                log(f"{name} done in {time.time() - t0:.0f}s")
    return paths


# ----------------------------------------------------------------------------------------- analysis
def pixel_atypicality(x: torch.Tensor, ref: torch.Tensor, k: int = 10, exclude_self: bool = False) -> np.ndarray:
    """Mean L2 distance (raw pixels) to the k nearest reference images: large = atypical."""
    a = x.reshape(len(x), -1)
    b = ref.reshape(len(ref), -1)
    d = torch.cdist(a, b)
    if exclude_self:
        d[d < 1e-9] = float("inf")
    return d.topk(k, dim=1, largest=False).values.mean(dim=1).numpy()


def layer_analysis(models: dict, cand_x: torch.Tensor, sites, sc: dict, seed: int, augment,
                   atyp: np.ndarray) -> dict:
    """Alignment distances of the candidates under f and g, SSLMem, LayerMem/ΔLayerMem."""
    t0 = time.time()
    d = alignment_distances(capture_augmented(models, cand_x, sites, augment=augment, n_aug=sc["n_aug"], batch_size=100,
                                              seed=seed))
    t_dist = time.time() - t0
    site_names = list(d["f"])
    final = site_names[-1]
    final_scores = sslmem(d["f"][final], d["g"][final])
    ranking = final_scores.raw
    top = select_points(ranking, top=sc["top"])
    rand = select_points(ranking, random=sc["random"], seed=seed)
    n = len(cand_x)
    k = max(2, n // 10)
    order = np.argsort(atyp)
    atypical, typical = torch.as_tensor(order[-k:].copy()), torch.as_tensor(order[:k].copy())
    out: dict = {"sites": site_names, "seconds_distances": round(t_dist, 1)}
    for norm in ("range", "sum"):
        block = {}
        for label, pts in (("top", top), ("random", rand), ("all", None), ("atypical", atypical),
                           ("typical", typical)):
            block[label] = layermem(d["f"], d["g"], pts, norm=norm).as_dict()
        out[f"layermem_{norm}"] = block
    per_site = {s: sslmem(d["f"][s], d["g"][s]) for s in site_names}
    out["sslmem_final"] = {
        "site": final,
        "raw": stats(final_scores.raw.numpy()),
        "by_sum": stats(final_scores.by_sum.numpy()),
        "fraction_positive": float((final_scores.raw > 0).float().mean()),
        "mean_d_f": float(final_scores.d_f.mean()),
        "mean_d_g": float(final_scores.d_g.mean()),
    }
    out["atypical_vs_typical"] = {
        "k": k,
        "sslmem_by_sum_final": {"atypical": float(final_scores.by_sum[atypical].mean()),
                                "typical": float(final_scores.by_sum[typical].mean()),
                                "perm_p": perm_test_mean_diff(final_scores.by_sum[atypical].numpy(),
                                                              final_scores.by_sum[typical].numpy())},
        "spearman_atypicality_vs_sslmem": {s: spearman(atyp, per_site[s].by_sum.numpy()) for s in site_names},
    }
    out["_per_site_by_sum"] = {s: per_site[s].by_sum.numpy() for s in site_names}
    out["_top"] = top.numpy()
    return out


def unit_analysis(model, x: torch.Tensor, labels: torch.Tensor, sites: list, sc: dict, seed: int, augment,
                  negatives: str = "error") -> dict:
    """UnitMem (mean and median) and ClassMem per site, streamed over points x augmentations."""
    t0 = time.time()
    views = capture_augmented(model, x, unit_points(sites), augment=augment, n_aug=sc["n_aug"], include_original=False,
                              batch_size=100, seed=seed)
    accs, caccs = stream_unitmem(views, labels=labels, keep_means=True, negatives=negatives)
    out = {"seconds": round(time.time() - t0, 1), "sites": {}}
    for s in accs:
        um = accs[s].compute("mean").numpy()
        out["sites"][s] = {
            "units": int(um.size),
            "unitmem_mean": um,
            "unitmem_median": accs[s].compute("median").numpy(),
            "classmem": caccs[s].compute("mean").numpy(),
            "argmax_point": accs[s].argmax.numpy(),
            "dead_units": int((accs[s].max_mean <= 0).sum()),
        }
    return out


def summarize_units(u: dict) -> dict:
    res = {}
    for s, v in u["sites"].items():
        res[s] = {
            "units": v["units"],
            "dead_units": v["dead_units"],
            "unitmem_mean_variant": stats(v["unitmem_mean"]),
            "unitmem_median_variant": stats(v["unitmem_median"]),
            "classmem": stats(v["classmem"]),
            "fraction_above": {str(t): float((v["unitmem_mean"] > t).mean()) for t in THRESHOLDS},
            "fraction_above_median_variant": {str(t): float((v["unitmem_median"] > t).mean()) for t in THRESHOLDS},
        }
    return res


def where_high_units(u: dict, is_candidate: np.ndarray, atyp_pct: np.ndarray, q: float = 0.95) -> dict:
    """Where the top (1-q) UnitMem units of the whole encoder sit, and which points they pick."""
    sites = list(u["sites"])
    allv = np.concatenate([u["sites"][s]["unitmem_mean"] for s in sites])
    thr = float(np.quantile(allv, q))
    total_units = allv.size
    per_layer, cand_hits, atyp_hits, n_high = {}, 0, 0, 0
    for s in sites:
        v = u["sites"][s]["unitmem_mean"]
        hi = v > thr
        per_layer[s] = {"share_of_high_units": 0.0, "share_of_all_units": v.size / total_units,
                        "n_high": int(hi.sum())}
        arg = u["sites"][s]["argmax_point"][hi]
        cand_hits += int(is_candidate[arg].sum())
        atyp_hits += int((atyp_pct[arg] >= 0.9).sum())
        n_high += int(hi.sum())
    for s in sites:
        per_layer[s]["share_of_high_units"] = per_layer[s]["n_high"] / max(1, n_high)
    n_layers_with = sum(1 for s in sites if per_layer[s]["n_high"] > 0)
    # all units: does UnitMem rise with the atypicality of the unit's top point?
    um = np.concatenate([u["sites"][s]["unitmem_mean"] for s in sites])
    arg_all = np.concatenate([u["sites"][s]["argmax_point"] for s in sites])
    live = um > 0
    return {
        "threshold_unitmem": thr,
        "quantile": q,
        "n_high_units": n_high,
        "layers_with_high_units": n_layers_with,
        "n_layers": len(sites),
        "per_layer": per_layer,
        "top_point_is_candidate": cand_hits / max(1, n_high),
        "candidate_base_rate": float(is_candidate.mean()),
        "top_point_in_most_atypical_decile": atyp_hits / max(1, n_high),
        "spearman_unitmem_vs_top_point_atypicality": spearman(um[live], atyp_pct[arg_all[live]]) if live.sum() > 2 else None,
    }


# ------------------------------------------------------------------------------------------ figures
def make_figures(res: dict, fig_dir: Path, prefix: str = "localize_ssl") -> list[str]:
    import matplotlib.pyplot as plt

    from memprobe.plots import save_figure

    made = []
    lay = res["layers"]
    # F1: LayerMem + ΔLayerMem, SSL vs SL, top and random
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for paradigm, color in (("resnet_ssl", "C0"), ("resnet_sl", "C1")):
        block = lay[paradigm]["layermem_sum"]
        sites = lay[paradigm]["sites"]
        xs = np.arange(len(sites))
        for label, ls in (("top", "-"), ("random", "--")):
            axes[0].plot(xs, [block[label]["layermem"][s] for s in sites], ls, color=color, marker="o",
                         label=f"{paradigm} {label}")
        ctl = res["layers_null"][paradigm]["layermem_sum"]["top"]["layermem"]
        axes[0].plot(xs, [ctl[s] for s in sites], ":", color=color, marker="x",
                     label=f"{paradigm} top, unseen test points (null)")
        w = 0.4 if paradigm == "resnet_ssl" else -0.0
        axes[1].bar(xs + (w - 0.2), [block["top"]["delta_layermem"][s] for s in sites], 0.4, color=color,
                    label=f"{paradigm} top")
    for ax, title in zip(axes, ("LayerMem (SSLMem / (d_g + d_f))", "ΔLayerMem (top memorized)"), strict=True):
        ax.set_xticks(xs, sites, rotation=45, ha="right", fontsize=7)
        ax.axhline(0, color="0.6", lw=0.7)
        ax.set_title(title)
        ax.legend(fontsize=7)
    made.append(str(save_figure(fig, fig_dir / f"{prefix}_layermem_ssl_vs_sl.png")))
    # F2/F3: UnitMem distribution per layer
    units = res["_units"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, key, title in ((axes[0], "unitmem_mean", "UnitMem per layer (mean variant)"),
                           (axes[1], "classmem", "ClassMem per layer")):
        sites = list(units["resnet_ssl_f"]["sites"])
        pos = np.arange(len(sites))
        for off, name, color in ((-0.2, "resnet_ssl_f", "C0"), (0.2, "resnet_sl_f", "C1")):
            data = [units[name]["sites"][s][key] for s in sites]
            bp = ax.boxplot(data, positions=pos + off, widths=0.35, patch_artist=True, showfliers=True,
                            flierprops={"markersize": 2})
            for b in bp["boxes"]:
                b.set_facecolor(color)
                b.set_alpha(0.6)
            ax.plot([], [], color=color, lw=6, alpha=0.6, label=name.replace("_f", ""))
        ax.set_xticks(pos, sites, rotation=45, ha="right", fontsize=7)
        ax.set_title(title)
        ax.legend(fontsize=7)
    made.append(str(save_figure(fig, fig_dir / f"{prefix}_unitmem_per_layer.png")))
    # thresholds
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, color in (("resnet_ssl_f", "C0"), ("resnet_sl_f", "C1"), ("resnet_ssl_g", "C2"), ("resnet_sl_g", "C3")):
        allv = np.concatenate([units[name]["sites"][s]["unitmem_mean"] for s in units[name]["sites"]])
        ts = np.linspace(0, 1, 101)
        ax.plot(ts, [(allv > t).mean() for t in ts], color=color, label=name)
    ax.set_xlabel("UnitMem threshold")
    ax.set_ylabel("fraction of units above")
    ax.set_yscale("log")
    ax.set_title("Units above a UnitMem threshold (all layers)")
    ax.legend(fontsize=7)
    made.append(str(save_figure(fig, fig_dir / f"{prefix}_unitmem_thresholds.png")))
    # F4: atypical vs typical LayerMem
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for paradigm, color in (("resnet_ssl", "C0"), ("resnet_sl", "C1")):
        block = lay[paradigm]["layermem_sum"]
        sites = lay[paradigm]["sites"]
        ax.plot(sites, [block["atypical"]["layermem"][s] for s in sites], "-o", color=color, label=f"{paradigm} atypical")
        ax.plot(sites, [block["typical"]["layermem"][s] for s in sites], "--o", color=color, label=f"{paradigm} typical")
    ax.tick_params(axis="x", rotation=45, labelsize=7)
    ax.axhline(0, color="0.6", lw=0.7)
    ax.set_title("LayerMem (normalised by d_g + d_f): atypical vs typical candidates")
    ax.legend(fontsize=7)
    made.append(str(save_figure(fig, fig_dir / f"{prefix}_layermem_atypical_vs_typical.png")))
    # where high units sit
    fig, ax = plt.subplots(figsize=(6.5, 4))
    wh = res["where_high_units"]
    for off, name, color in ((-0.2, "resnet_ssl_f", "C0"), (0.2, "resnet_sl_f", "C1")):
        sites = list(wh[name]["per_layer"])
        ax.bar(np.arange(len(sites)) + off, [wh[name]["per_layer"][s]["share_of_high_units"] for s in sites], 0.4,
               color=color, label=f"{name}: share of top-5% UnitMem units")
    ax.plot(np.arange(len(sites)), [wh["resnet_ssl_f"]["per_layer"][s]["share_of_all_units"] for s in sites],
            "k_", ms=14, mew=2, label="share of all units")
    ax.set_xticks(np.arange(len(sites)), sites, rotation=45, ha="right", fontsize=7)
    ax.set_title("Where the most memorizing units sit")
    ax.legend(fontsize=7)
    made.append(str(save_figure(fig, fig_dir / f"{prefix}_unitmem_where.png")))
    if "vit_ssl" in lay:
        block = lay["vit_ssl"]["layermem_sum"]["top"]
        ctl = res["layers_null"]["vit_ssl"]["layermem_sum"]["top"]
        sites = lay["vit_ssl"]["sites"]
        fig, ax = plt.subplots(figsize=(6.5, 4))
        colors = ["C2" if ".attn" in s else "C4" if ".mlp" in s else "0.5" for s in sites]
        ax.bar(sites, [block["delta_layermem"][s] for s in sites], color=colors)
        ax.plot(sites, [ctl["delta_layermem"][s] for s in sites], "kx", label="null: unseen test points")
        ax.legend(fontsize=7)
        ax.tick_params(axis="x", rotation=45, labelsize=7)
        ax.axhline(0, color="0.6", lw=0.7)
        ax.set_title("TinyViT ΔLayerMem (top memorized): attention (green) vs MLP (purple) halves")
        made.append(str(save_figure(fig, fig_dir / f"{prefix}_vit_delta_layermem.png")))
    return made


# ------------------------------------------------------------------------------------------ findings
def findings(res: dict) -> dict:
    lay, us = res["layers"], res["units"]
    f = {}
    null = res["layers_null"]
    present = {}
    for paradigm in lay:
        cand = np.asarray(lay[paradigm]["_per_site_by_sum"][lay[paradigm]["sites"][-1]])
        ctrl = np.asarray(null[paradigm]["_per_site_by_sum"][null[paradigm]["sites"][-1]])
        present[paradigm] = {
            "mean_sslmem_by_sum_candidates": float(cand.mean()),
            "mean_sslmem_by_sum_unseen_test_points": float(ctrl.mean()),
            "fraction_positive_candidates": float((cand > 0).mean()),
            "perm_p_candidates_vs_unseen": perm_test_mean_diff(cand, ctrl),
        }
        present[paradigm]["memorization_detected"] = bool(
            present[paradigm]["mean_sslmem_by_sum_candidates"] > present[paradigm]["mean_sslmem_by_sum_unseen_test_points"]
            and present[paradigm]["perm_p_candidates_vs_unseen"] < 0.05)
    f["F0_memorization_present"] = {
        **present,
        "note": "SSLMem (normalised by d_g + d_f) at the representation of the candidates (seen by f only) "
                "vs the same number of test points (seen by neither): LayerMem only means memorization "
                "if the candidates score above the unseen points",
    }
    sites = lay["resnet_ssl"]["sites"]
    f1 = {}
    for paradigm in ("resnet_ssl", "resnet_sl"):
        top = lay[paradigm]["layermem_sum"]["top"]["layermem"]
        rnd = lay[paradigm]["layermem_sum"]["random"]["layermem"]
        ctl = null[paradigm]["layermem_sum"]["top"]["layermem"]
        lm = np.array([top[s] for s in sites])
        excess = np.array([top[s] - ctl[s] for s in sites])
        deltas = [lay[paradigm]["layermem_sum"]["top"]["delta_layermem"][s] for s in sites]
        f1[paradigm] = {
            "layermem_top_by_sum": top,
            "layermem_random_by_sum": rnd,
            "layermem_top_by_sum_null_control": ctl,
            "excess_over_null": dict(zip(sites, excess.tolist(), strict=True)),
            "spearman_depth_vs_layermem_top": spearman(np.arange(len(lm)), lm),
            "spearman_depth_vs_excess_over_null": spearman(np.arange(len(lm)), excess),
            "largest_delta_at": sites[int(np.argmax(deltas))],
            "reproduced": bool(spearman(np.arange(len(lm)), excess) > 0.5 and excess[-1] > 0
                               and present[paradigm]["memorization_detected"]),
        }
    f["F1_layermem_grows_with_depth"] = {
        **f1,
        "criterion": "memorization detected (F0), and LayerMem of the top memorized candidates in excess of "
                     "the same statistic on unseen test points rises with depth (Spearman > 0.5) and is > 0 "
                     "at the representation",
    }
    wh = res["where_high_units"]["resnet_ssl_f"]
    f["F2_high_unitmem_units_spread_over_encoder"] = {
        "layers_with_top5pct_units": wh["layers_with_high_units"], "n_layers": wh["n_layers"],
        "share_per_layer": {s: v["share_of_high_units"] for s, v in wh["per_layer"].items()},
        "reproduced": bool(wh["layers_with_high_units"] >= max(2, int(0.6 * wh["n_layers"]))),
    }
    def all_units(name, key="unitmem_mean"):
        return np.concatenate([res["_units"][name]["sites"][s][key] for s in res["_units"][name]["sites"]])
    ssl_u, sl_u = all_units("resnet_ssl_f"), all_units("resnet_sl_f")
    ssl_c, sl_c = all_units("resnet_ssl_f", "classmem"), all_units("resnet_sl_f", "classmem")
    thr = {str(t): {"ssl": float((ssl_u > t).mean()), "sl": float((sl_u > t).mean())} for t in THRESHOLDS}
    f["F3_ssl_more_point_selective_units_than_sl"] = {
        "mean_unitmem": {"ssl": float(ssl_u.mean()), "sl": float(sl_u.mean())},
        "fraction_above": thr,
        "mean_classmem": {"ssl": float(ssl_c.mean()), "sl": float(sl_c.mean())},
        "per_layer_mean_unitmem": {s: {"ssl": us["resnet_ssl_f"]["sites"][s]["unitmem_mean_variant"]["mean"],
                                       "sl": us["resnet_sl_f"]["sites"][s]["unitmem_mean_variant"]["mean"]}
                                   for s in us["resnet_ssl_f"]["sites"]},
        "reproduced_unitmem": bool(ssl_u.mean() > sl_u.mean()),
        "reproduced_classmem_sl_higher": bool(sl_c.mean() > ssl_c.mean()),
    }
    at = lay["resnet_ssl"]["atypical_vs_typical"]["sslmem_by_sum_final"]
    at_null = null["resnet_ssl"]["atypical_vs_typical"]["sslmem_by_sum_final"]
    f["F4_atypical_points_memorized_more"] = {
        "sslmem_by_sum_final": at,
        "same_on_unseen_test_points": at_null,
        "spearman_atypicality_vs_sslmem_final": lay["resnet_ssl"]["atypical_vs_typical"]["spearman_atypicality_vs_sslmem"][sites[-1]],
        "high_units_top_point_in_most_atypical_decile": wh["top_point_in_most_atypical_decile"],
        "expected_if_unrelated": 0.1,
        "reproduced": bool(at["atypical"] > at["typical"] and at["perm_p"] < 0.05
                           and at["atypical"] - at["typical"] > at_null["atypical"] - at_null["typical"]),
    }
    f["memorization_control_f_vs_g"] = {
        "top5pct_units_top_point_is_candidate": {
            "ssl_f": res["where_high_units"]["resnet_ssl_f"]["top_point_is_candidate"],
            "ssl_g": res["where_high_units"]["resnet_ssl_g"]["top_point_is_candidate"],
            "sl_f": res["where_high_units"]["resnet_sl_f"]["top_point_is_candidate"],
            "sl_g": res["where_high_units"]["resnet_sl_g"]["top_point_is_candidate"],
            "base_rate": res["where_high_units"]["resnet_ssl_f"]["candidate_base_rate"],
        },
        "note": "f trained on the candidates, g did not: a higher rate in f than in g means the most "
                "selective units of f single out points f memorized",
    }
    if "vit_ssl" in lay:
        v = lay["vit_ssl"]["layermem_sum"]["top"]["delta_layermem"]
        c = null["vit_ssl"]["layermem_sum"]["top"]["delta_layermem"]
        attn = sum(x for s, x in v.items() if s.endswith(".attn"))
        mlp = sum(x for s, x in v.items() if s.endswith(".mlp"))
        attn_c = sum(x for s, x in c.items() if s.endswith(".attn"))
        mlp_c = sum(x for s, x in c.items() if s.endswith(".mlp"))
        f["F5_vit_memorization_in_mlp_halves"] = {
            "sum_delta_layermem_attention": attn, "sum_delta_layermem_mlp": mlp,
            "null_control_attention": attn_c, "null_control_mlp": mlp_c,
            "delta_layermem_top_by_sum": v,
            "reproduced": bool(mlp - mlp_c > attn - attn_c and present["vit_ssl"]["memorization_detected"]),
        }
    return f


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=["full", "small"], default="full",
                    help="full: 1200 shared + 200 per side, 25 epochs; small: 400 + 100, 50 epochs")
    ap.add_argument("--quick", action="store_true", help="tiny scale, 1 epoch: a smoke test (results are noise)")
    ap.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "digits"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vit", action="store_true", help="also train and analyse a TinyViT SimCLR pair")
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--only", nargs="*", default=None,
                    help="train only these encoders (e.g. resnet_ssl_f), so several can train in parallel")
    ap.add_argument("--ckpt-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None,
                    help="results JSON (default experiments/results/localize_ssl[_<scale>].json)")
    ap.add_argument("--figures", type=Path, default=ROOT / "figures", help="directory for localize_ssl_*.png")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    scale = "quick" if args.quick else args.scale
    suffix = "" if scale == "full" else f"_{scale}"
    if args.out is None:
        args.out = ROOT / "experiments" / "results" / f"localize_ssl{suffix}.json"
    sc = dict(SCALES[scale])
    ds = load_images(args.dataset, "train")
    if ds.name != "fashion-mnist":
        log(f"using {ds.name} ({len(ds.images)} images) instead of Fashion-MNIST")
    if ds.images.shape[-1] != 28:  # sklearn digits are 16x16: pad to 28 so the same models apply
        pad = (28 - ds.images.shape[-1]) // 2
        ds = type(ds)(torch.nn.functional.pad(ds.images, (pad, 28 - ds.images.shape[-1] - pad) * 2),
                      ds.labels, ds.name, ds.classes)
    if sc["shared"] + sc["candidates"] + sc["independent"] > len(ds.images):
        total = len(ds.images) - 400
        sc.update(shared=int(total * 0.76), candidates=int(total * 0.12), independent=int(total * 0.12))
    split = memorization_split(len(ds.images), sc["shared"], sc["candidates"], sc["independent"], args.seed)
    ckpt_dir = args.ckpt_dir or ROOT / "runs" / "localize_ssl" / f"{ds.name}-{scale}-seed{args.seed}"
    archs = ["resnet"] + (["vit"] if args.vit else [])
    t_start = time.time()
    paths = train_all(ds, split, sc, ckpt_dir, args.seed, archs, args.only)
    t_train = time.time() - t_start
    if args.train_only:
        return {}
    models = {name: load_encoder(p)[0] for name, p in paths.items()}
    train_times = {name: sum(h["seconds"] for h in load_encoder(p)[2]["history"]) for name, p in paths.items()}
    test = load_images(args.dataset, "test") if ds.name == "fashion-mnist" else ds
    tgen = torch.Generator().manual_seed(args.seed + 1)
    tidx = torch.randperm(len(test.images), generator=tgen)[: sc["test"]]
    test_x, test_y = test.images[tidx], test.labels[tidx]
    if test.images.shape[-1] != 28:
        test_x = ds.images[tidx % len(ds.images)]
        test_y = ds.labels[tidx % len(ds.images)]
    quality = {}
    for name, m in models.items():
        tr = torch.cat([split["shared"], split["candidates"] if name.endswith("_f") else split["independent"]])
        quality[name] = {"knn20_test_accuracy": knn_accuracy(m, ds.images[tr], ds.labels[tr], test_x, test_y)}
        log(f"{name}: kNN test accuracy {quality[name]['knn20_test_accuracy']:.3f}")

    augment = make_augment(AugmentConfig())
    cand = split["candidates"]
    cand_x = ds.images[cand]
    atyp_cand = pixel_atypicality(cand_x, ds.images[split["shared"]])
    res: dict = {"layers": {}, "layers_null": {}, "units": {}, "where_high_units": {}, "_units": {}}
    null_x = test_x[: len(cand_x)]
    atyp_null = pixel_atypicality(null_x, ds.images[split["shared"]])
    resnet_sites = SmallResNet.layer_sites()
    for paradigm in ("resnet_ssl", "resnet_sl") + (("vit_ssl",) if args.vit else ()):
        f, g = models[f"{paradigm}_f"], models[f"{paradigm}_g"]
        sites = resnet_sites if paradigm.startswith("resnet") else {**residual_sites(f), "pool": None}
        if isinstance(sites, dict):
            from memprobe.backends.torch_hooks import HookPoint

            sites = {k: (v if v is not None else HookPoint("pool")) for k, v in sites.items()}
        log(f"{paradigm}: alignment distances of {len(cand_x)} candidates x {sc['n_aug']} augmentations")
        res["layers"][paradigm] = layer_analysis({"f": f, "g": g}, cand_x, sites, sc, args.seed, augment, atyp_cand)
        # null control: test points neither encoder trained on, same count and protocol (top-k by
        # final-layer SSLMem): what selection and f/g differences alone produce
        log(f"{paradigm}: null control on {len(null_x)} test points")
        res["layers_null"][paradigm] = layer_analysis({"f": f, "g": g}, null_x, sites, sc, args.seed, augment,
                                                      atyp_null)
    # residual dropped: what LayerMem would read from the residual branch alone (before the skip add)
    branch_sites = [f"layer{i}.bn2" for i in range(1, 5)]
    d = alignment_distances(capture_augmented({"f": models["resnet_ssl_f"], "g": models["resnet_ssl_g"]}, cand_x,
                                              branch_sites, augment=augment, n_aug=sc["n_aug"], batch_size=100,
                                              seed=args.seed))
    top = torch.as_tensor(res["layers"]["resnet_ssl"]["_top"])
    kept = res["layers"]["resnet_ssl"]["layermem_range"]["top"]["layermem"]
    dropped = layermem(d["f"], d["g"], top, norm="range").layermem
    res["residual_check"] = {
        f"layer{i}": {"with_skip (block output)": kept[f"layer{i}"], "residual_branch_only (bn2)": dropped[f"layer{i}.bn2"]}
        for i in range(1, 5)
    }

    # UnitMem: candidates + some shared points (all training points of f), same set for every model
    rng = torch.Generator().manual_seed(args.seed + 2)
    extra = split["shared"][torch.randperm(len(split["shared"]), generator=rng)[: sc["unit_extra"]]]
    unit_idx = torch.cat([cand, extra])
    unit_x, unit_y = ds.images[unit_idx], ds.labels[unit_idx]
    is_cand = np.r_[np.ones(len(cand), bool), np.zeros(len(extra), bool)]
    atyp_units = pixel_atypicality(unit_x, ds.images[split["shared"]], exclude_self=True)
    atyp_pct = np.argsort(np.argsort(atyp_units)) / max(1, len(atyp_units) - 1)
    for name in [n for n in models if n.startswith("resnet")] + (["vit_ssl_f", "vit_ssl_g"] if args.vit else []):
        m = models[name]
        if name.startswith("resnet"):
            sites = SmallResNet.unit_sites()
            neg = "error"
        else:
            from memprobe.backends.torch_hooks import HookPoint

            sites = {s: HookPoint(s, "output", token_mean) for s in m.unit_sites()}
            neg = "clip"  # GELU: keep the positive part (its negative lobe is >= -0.17)
        log(f"{name}: UnitMem over {len(unit_x)} points x {sc['n_aug']} augmentations")
        u = unit_analysis(m, unit_x, unit_y, sites, sc, args.seed, augment, negatives=neg)
        res["_units"][name] = u
        res["units"][name] = {"seconds": u["seconds"], "negatives": neg, "sites": summarize_units(u)}
        res["where_high_units"][name] = where_high_units(u, is_cand, atyp_pct)

    res["findings"] = findings(res)
    figs = make_figures(res, args.figures, f"localize_ssl{suffix}")
    out = {
        "scale": {
            "name": scale, "dataset": ds.name, **sc,
            "note": (f"scaled to a shared 2-core CPU: f and g each train on {sc['shared']} shared + "
                     f"{sc['candidates']} candidate/independent images for {sc['epochs']} epochs (batch "
                     f"{sc['batch_size']}); the paper uses "
                     "CIFAR-10/SVHN/STL-10 with 50k points and hundreds of epochs on GPUs")
            if scale != "quick" else "smoke test: numbers are noise",
            "architecture": "SmallResNet: stem 16ch@28x28, 4 BasicBlocks 16/32/64/128ch, "
                            "global-average representation (128-d), projection 128-128-64",
            "train_seconds_total": round(t_train, 1),
            "train_seconds_per_encoder": train_times,
            "augmentations": "random resized crop (area 0.5-1, aspect 3/4-4/3), horizontal flip, "
                             "brightness/contrast jitter 0.4 (p=0.8), on raw [0,1] images before normalisation",
            "unitmem_points": f"{len(cand)} candidates + {len(extra)} shared (training points of f)",
            "atypicality": "mean L2 pixel distance to the 10 nearest shared images",
        },
        "encoder_quality": quality,
        "findings": res["findings"],
        "layers": {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")} for k, v in res["layers"].items()},
        "layers_null_control_test_points": {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")}
                                            for k, v in res["layers_null"].items()},
        "residual_check": res["residual_check"],
        "units": res["units"],
        "where_high_units": res["where_high_units"],
        "figures": [str(Path(p).relative_to(ROOT)) if Path(p).is_relative_to(ROOT) else p for p in figs],
        "seconds_total": round(time.time() - t_start, 1),
    }
    save_results(args.out, out, seed=args.seed, checkpoints=str(ckpt_dir))
    log(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
