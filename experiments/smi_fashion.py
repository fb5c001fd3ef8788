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
from memprobe.studies.smi import add_label_noise, run_mlp_study, study_parser, write_study
from memprobe.train.classifier import TrainConfig


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
    results, arrays = run_mlp_study(args, x=x, y=y, noisy=noisy, n_classes=len(data.classes), config=config,
                                    frozen_features={"pixels": x.flatten(1).numpy()})
    results["scale"].update(dataset=data.name, model="MLP 784-256-256-10 (ReLU), Adam",
                            representations="head:act0/act1 = the MLP's hidden ReLU outputs at the early "
                            "checkpoint; frozen:pixels = raw inputs (training-independent reference)")
    write_study(results, arrays, args, "smi_fashion", f"Fashion-MNIST MLP, {args.noise:.0%} noise")


if __name__ == "__main__":
    main()
