"""Does early pointwise SMI flag the samples an MLP will memorize on Fashion-MNIST with 3% label noise?

Scale (2-core CPU): a random subset of the Fashion-MNIST training set, an MLP 784-256-256-10 (PSMI on its
two hidden ReLU layers, and on the raw pixels as a training-independent reference), one target on a random
half and >= 32 shadows on balanced halves. Everything about the scale goes into the results JSON.

    python experiments/smi_fashion.py            # full run (~10-15 min), resumes from --cache
    python experiments/smi_fashion.py --quick    # tiny sizes, < 1 min
"""

from __future__ import annotations

import numpy as np
import torch

from memprobe.datasets import load_images
from memprobe.results import save_results
from memprobe.studies.smi import add_label_noise, make_figures, run_study, study_parser
from memprobe.train.classifier import TrainConfig, mlp


def main() -> None:
    ap = study_parser(__doc__, "cache/smi_fashion")
    ap.add_argument("--n-samples", type=int, default=4000)
    args = ap.parse_args()
    if args.quick:
        args.n_samples, args.shadows, args.epochs, args.directions = 600, 4, 8, 200
    torch.set_num_threads(1)  # the 2 cores are shared: one thread avoids OpenMP spin-waits

    data = load_images("fashion-mnist", "train")
    pick = np.sort(np.random.default_rng(args.seed).permutation(len(data.labels))[: args.n_samples])
    x = data.images[pick]
    clean = data.labels[pick].numpy()
    y, noisy = add_label_noise(clean, args.noise, len(data.classes), args.seed)
    config = TrainConfig(epochs=args.epochs, batch_size=128, lr=1e-3, eval_every=10, seed=args.seed)
    in_dim = int(np.prod(x.shape[1:]))
    tag = f"n{args.n_samples}_s{args.shadows}_e{args.epochs}_seed{args.seed}{'_quick' if args.quick else ''}"
    results, arrays = run_study(
        x=x, y=y, noisy=noisy, make_model=lambda: mlp(in_dim, (256, 256), len(data.classes)),
        hidden_modules=["act0", "act1"], config=config, n_shadows=args.shadows, n_directions=args.directions,
        memorized_fraction=args.memorized_fraction, seed=args.seed, cache_dir=args.cache / tag,
        frozen_features={"pixels": x.flatten(1).numpy()}, n_boot=50 if args.quick else 200,
    )
    results["scale"].update(dataset=data.name, model="MLP 784-256-256-10 (ReLU), Adam",
                            representations="head:act0/act1 = the MLP's hidden ReLU outputs at the early "
                            "checkpoint; frozen:pixels = raw inputs (training-independent reference)")
    name = "smi_fashion_quick" if args.quick else "smi_fashion"
    path = save_results(args.out / f"{name}.json", results, seed=args.seed)
    figs = make_figures(arrays, results, args.figures, name, f"Fashion-MNIST MLP, {args.noise:.0%} noise")
    ev = results["evaluation_by_ground_truth"]["lira"]
    for k in (results["best_early_psmi_layer_by_lira_auc"], "early_loss", "early_logit_gap"):
        print(f"{k:28s} AUC {ev[k]['roc_auc']:.3f}  FPR@TPR75 {ev[k]['fpr_at_tpr_0.75']:.3f}  "
              f"TPR@1%FPR {ev[k]['tpr_at_fpr_0.01']:.3f}")
    print("wrote", path, *figs)


if __name__ == "__main__":
    main()
