"""Choose the audit's reference-free calibration on a lab, and check it on the bundled corpus.

1. choice (default): the candidate of `memprobe.calibration.CALIBRATIONS` with the highest member vs
   non-member ROC-AUC, read from the smollm2 lab experiment (`experiments/results/lab_smollm2.json`,
   `results.mia.overall`). Without that file (or with --tiny-lab) it is measured here on the tiny lab
   and a tiny-llama fine-tuned on its members (the setting of `lab_smollm2.py --quick`), and the
   choice file says so. Written to memprobe/data/calibration_choice.json, which `memprobe audit`
   reads when no reference model is given.
2. --check-corpus: smollm2-135m on the bundled corpus (model samples left out: they need sampling):
   where each score ranks the famous candidates (licences, speeches, Shakespeare, literature) and
   the hand-written code / formulaic controls. A check only: nothing is chosen on this corpus.

    .venv/bin/python experiments/calibration_choice.py                  # choice from the lab results
    .venv/bin/python experiments/calibration_choice.py --tiny-lab       # choice on the tiny lab
    .venv/bin/python experiments/calibration_choice.py --check-corpus   # ranks on the bundled corpus
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from memprobe.calibration import CALIBRATIONS, DEFAULT_CHOICE, choose_calibration
from memprobe.results import experiment_parser, provenance, save_results, write_json

ROOT = Path(__file__).resolve().parents[1]
LAB_RESULTS = ROOT / "experiments" / "results" / "lab_smollm2.json"
FAMOUS = ("licence", "speech", "shakespeare", "literature")
IDIOMS = ("code", "formulaic")
TINY_FINETUNE = {"epochs": 20, "lr": 4e-3, "batch_size": 4, "seq_len": 256}  # lab_smollm2.py --quick


def tiny_lab_mia(seed: int, n_boot: int) -> dict[str, Any]:
    """evaluate_mia of every attack on the tiny lab, target = tiny-llama fine-tuned on its members."""
    from memprobe.lab import build_lab, load_lab
    from memprobe.lab.finetune import finetune
    from memprobe.mia import evaluate_mia, score_texts
    from memprobe.models import load_model

    with tempfile.TemporaryDirectory() as tmp:
        build_lab(Path(tmp) / "lab", preset="tiny", seed=seed)
        members, nonmembers, _ = load_lab(Path(tmp) / "lab")
        finetune("tiny-llama", members, Path(tmp) / "ft", seed=seed, progress=False, **TINY_FINETUNE)
        docs = members + nonmembers
        scores = score_texts(load_model(str(Path(tmp) / "ft")), docs, reference=load_model("tiny-llama"))
    return evaluate_mia(scores, {d["id"]: d["member"] for d in docs},
                        copies={d["id"]: d.get("copies") for d in docs}, n_boot=n_boot, seed=seed)


def choose(args: Any) -> None:
    if LAB_RESULTS.is_file() and not args.tiny_lab:
        lab = json.loads(LAB_RESULTS.read_text(encoding="utf-8"))
        mia = lab["results"]["mia"]["overall"]
        source = (f"{LAB_RESULTS.relative_to(ROOT)}: smollm2-135m fine-tuned on the small lab's members, "
                  "all members vs all non-members")
    else:
        mia = tiny_lab_mia(args.seed, n_boot=1000)
        settings = ", ".join(f"{k}={v}" for k, v in TINY_FINETUNE.items())
        source = (f"tiny lab (memprobe.lab preset 'tiny', seed {args.seed}), tiny-llama fine-tuned on its "
                  f"members ({settings}); provisional until experiments/results/lab_smollm2.json exists")
    choice = choose_calibration(mia, candidates=CALIBRATIONS, source=source)
    choice["provenance"] = provenance(args.seed)
    write_json(DEFAULT_CHOICE, choice)
    print(json.dumps({k: v for k, v in choice.items() if k != "provenance"}, indent=2))


def check_corpus(args: Any) -> None:
    from memprobe.calibration import default_calibration, ranking
    from memprobe.corpora import bundled_corpus
    from memprobe.mia import score_texts
    from memprobe.models import load_model

    loaded = load_model("smollm2-135m")
    docs = bundled_corpus(loaded, seed=args.seed, include_model_samples=False)
    scores = score_texts(loaded, docs, batch_size=4)
    chosen = default_calibration()["score"]
    out: dict[str, Any] = {"model": loaded.info, "n_texts": len(docs), "chosen": chosen, "by_score": {}}
    for score in ("loss", "min_k", *CALIBRATIONS):
        rows = ranking(scores, docs, score)
        famous = [r["rank"] for r in rows if r["kind"] in FAMOUS]
        idioms = [r["rank"] for r in rows if r["kind"] in IDIOMS]
        # share of (famous, idiom) pairs the score orders famous-first: 1 = every famous text above every idiom
        above = float(np.mean([f < i for f in famous for i in idioms]))
        out["by_score"][score] = {
            "famous_above_idiom_pairs": above, "median_rank_famous": float(np.median(famous)),
            "median_rank_idioms": float(np.median(idioms)), "idioms_in_top_10": sum(i <= 10 for i in idioms),
            "idiom_ranks": {r["id"]: r["rank"] for r in rows if r["kind"] in IDIOMS},
            "top_10": [{"rank": r["rank"], "id": r["id"], "kind": r["kind"], "score": r["score"]} for r in rows[:10]],
        }
    save_results(args.out / "calibration_check.json", out, seed=args.seed)
    for score, block in out["by_score"].items():
        print(f"{score:16s} famous-above-idiom pairs {block['famous_above_idiom_pairs']:.3f}  median rank famous "
              f"{block['median_rank_famous']:.0f} idioms {block['median_rank_idioms']:.0f}  idioms in top 10 "
              f"{block['idioms_in_top_10']}")


def main() -> None:
    ap = experiment_parser(__doc__, ROOT)
    ap.add_argument("--tiny-lab", action="store_true", help="choose on the tiny lab even if the smollm2 lab ran")
    ap.add_argument("--check-corpus", action="store_true", help="ranks of the bundled corpus with smollm2-135m")
    args = ap.parse_args()
    check_corpus(args) if args.check_corpus else choose(args)


if __name__ == "__main__":
    main()
