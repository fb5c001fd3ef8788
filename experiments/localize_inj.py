"""INJ benchmark (after Chang et al. 2024): recall of known injected neurons by each localization method.

A small byte-level Llama is trained from scratch on bundled texts (memprobe.train.tiny_lm), then new
random-word sequences are injected, each by fine-tuning only its own random subset of MLP neurons.
Each method scores all neurons for each injected sequence; Recall@k% is the share of the sequence's
injected neurons found in the method's top k% of all neurons. Time per sequence is measured.

    .venv/bin/python experiments/localize_inj.py           # 4 layers x 512 neurons, 6 sequences
    .venv/bin/python experiments/localize_inj.py --quick   # smaller, < 60 s
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from memprobe.corpora import bundled_corpus
from memprobe.intervene import localizers as L
from memprobe.labels import token_labels
from memprobe.plots import save_figure
from memprobe.results import experiment_parser, save_results
from memprobe.train.tiny_lm import inject, train_tiny_lm

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("amber", "basalt", "cobalt", "dune", "ember", "fjord", "granite", "harbor", "indigo", "juniper", "kelp",
         "lagoon", "marble", "nectar", "onyx", "pewter", "quartz", "russet", "saffron", "tundra", "umber", "velvet")
INJECTED_FRACTION = 0.05  # 51 of 1,024 neurons; 1% (10 neurons) could not store a sequence at all
KS = (0.05, 0.1)


def main(argv: list[str] | None = None) -> int:
    ap = experiment_parser(__doc__, ROOT)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    t0 = time.time()
    cfg = (dict(n_layers=2, d_model=64, steps=60, n_seq=3, inj_steps=40, opt_steps=10, ig_steps=4) if args.quick else
           dict(n_layers=4, d_model=128, steps=300, n_seq=6, inj_steps=120, opt_steps=30, ig_steps=8))
    texts = [d["text"] for d in bundled_corpus(None, seed=args.seed, include_model_samples=False)
             if d["role"] == "candidate"][:40]
    ckpt = None if args.quick else ROOT / "cache" / "intervene" / f"tiny_lm_{cfg['n_layers']}x{cfg['d_model']}_s{args.seed}"
    loaded = train_tiny_lm(texts, n_layers=cfg["n_layers"], d_model=cfg["d_model"], steps=cfg["steps"], seq_len=96,
                           batch=8, lr=3e-3, seed=args.seed, checkpoint=ckpt)
    model = loaded.model
    n_layers, width = L.mlp_shape(model)
    total = n_layers * width
    per_seq = max(2, round(INJECTED_FRACTION * total))  # each sequence lives in its own neurons
    rng = random.Random(args.seed)
    seqs = [loaded.encode(" ".join(rng.choice(WORDS) for _ in range(8))) for _ in range(cfg["n_seq"])]
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(args.seed))
    neurons = [perm[j * per_seq : (j + 1) * per_seq] for j in range(len(seqs))]
    before = [lab.memorized_fraction for lab in token_labels(model, seqs)]
    losses = inject(loaded, seqs, neurons, steps=cfg["inj_steps"], lr=1e-2)
    after = [lab.memorized_fraction for lab in token_labels(model, seqs)]
    background = [L.Target.suffix(loaded.encode(t[:200]), 1) for t in texts[:1]]
    prefix = 3  # the suppressed positions: everything after the first word's bytes
    methods = {
        "activations": lambda t: L.Activations(model).localize(t, background).scores,
        "attribution": lambda t: L.Attribution(model).localize(t).scores,
        "integrated_gradients": lambda t: L.IntegratedGradients(model, steps=cfg["ig_steps"]).localize(t).scores,
        "slimming": lambda t: L.Slimming(model, steps=cfg["opt_steps"], seed=args.seed).localize(t, background).scores,
        "hard_concrete": lambda t: L.HardConcrete(model, steps=cfg["opt_steps"], seed=args.seed).localize(t, background).scores,
        "zero_out": lambda t: L.ZeroOut(model).localize(t).scores,
        "probe_neurons": lambda t: L.ProbeNeurons(model, per_seq).localize(t, background).scores,
        "random": lambda t: L.RandomScores(model, args.seed + len(t.token_ids)).localize().scores,
    }
    recall: dict[str, dict[str, list[float]]] = {m: {str(k): [] for k in KS} for m in methods}
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    for j, ids in enumerate(seqs):
        target = L.Target.suffix(ids, prefix)
        truth = set(neurons[j].tolist())
        for name, fn in methods.items():
            t = time.time()
            scores = fn(target)
            seconds[name].append(time.time() - t)
            for k in KS:
                top = set(torch.topk(scores.flatten(), max(1, round(k * total))).indices.tolist())
                recall[name][str(k)].append(len(top & truth) / len(truth))
    summary = {m: {f"recall@{100 * float(k):g}%": float(np.mean(v)) for k, v in r.items()} for m, r in recall.items()}
    for m in methods:
        summary[m]["seconds_per_sequence"] = float(np.mean(seconds[m]))
    results = {"model": {**loaded.info, "n_layers": n_layers, "d_mlp": width, "neurons": total},
               "injected_per_sequence": per_seq, "injected_fraction": per_seq / total,
               "memorized_fraction_before": before, "memorized_fraction_after": after, "final_losses": losses,
               "summary": summary, "recall_per_sequence": recall, "config": cfg,
               "chang_et_al_anchor": "INJ Recall@0.5% 93.7 (Hard Concrete, GPT-2)", "wall_seconds": time.time() - t0}
    tag = "_quick" if args.quick else ""
    save_results(args.out / f"localize_inj{tag}.json", results, seed=args.seed)
    _figure(summary, args.figures / f"intervene_inj_recall{tag}.png", per_seq / total)
    print(json.dumps(summary, indent=1))
    return 0


def _figure(summary: dict, path: Path, frac: float) -> None:
    import matplotlib.pyplot as plt

    names = list(summary)
    keys = [k for k in summary[names[0]] if k.startswith("recall")]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    w = 0.8 / len(keys)
    for i, k in enumerate(keys):
        ax.bar(np.arange(len(names)) + i * w, [summary[n][k] for n in names], w, label=k)
    ax.set_xticks(np.arange(len(names)) + w, names, rotation=20)
    ax.set_ylabel("recall of injected neurons")
    ax.set_title(f"INJ: each sequence injected into {100 * frac:.1f}% of MLP neurons")
    ax.legend(fontsize=7)
    save_figure(fig, path, script="experiments/localize_inj.py")


if __name__ == "__main__":
    raise SystemExit(main())
