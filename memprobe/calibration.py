"""Memorized beyond predictable: per-text scores and token labels calibrated against a reference or
by a score chosen where membership is known.

Why: teacher-forced confidence cannot tell memorized from predictable (hand-written code idioms
score as "memorized" on it). Two calibrations, in order of preference:

- with a reference model (the audited model's base, same tokenizer): a text's score is `ref` =
  NLL_reference - NLL_target, a token's is its log-prob gain over the reference, and a token counts
  as memorized when the audited model predicts it greedily with p >= min_prob AND the reference does
  not (the definition the lab probes use);
- without one: a reference-free score that normalises confidence (`zlib`: by how compressible the
  text is; `min_k_plus_plus`: by the spread of the model's own next-token distribution), the one of
  `CALIBRATIONS` that best separates members from non-members ON A LAB (`choose_calibration`),
  never on the texts being audited. The bundled default is read from `DEFAULT_CHOICE`, written by
  `experiments/calibration_choice.py`.

Measured (experiments/results/calibration_check.json, smollm2-135m on the bundled corpus): neither
reference-free score puts the famous licences/speeches above the hand-written code and formulaic
controls (zlib orders 24% of such pairs famous-first, min-k%++ 9%, loss 5%): without a reference,
the ranking remains a ranking of predictability; give a reference model, or a lab.

All scores here come from per-token statistics already computed (the capture's token-stat columns,
one reference forward), through `memprobe.mia.attacks.scores_from_stats`, so they equal
`memprobe.mia.attacks.score_texts` on the same texts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from memprobe.errors import MemprobeError

CALIBRATIONS = ("zlib", "min_k_plus_plus")
DEFAULT_CHOICE = Path(__file__).parent / "data" / "calibration_choice.json"


def choose_calibration(mia: Mapping[str, Any], *, candidates: Sequence[str] = CALIBRATIONS,
                       source: str = "") -> dict[str, Any]:
    """The candidate with the highest member/non-member ROC-AUC in an `evaluate_mia` result.

    Ties go to the earlier candidate, so the choice is deterministic.
    """
    attacks = mia.get("attacks", {})
    missing = [c for c in candidates if c not in attacks]
    if missing:
        raise MemprobeError(f"the MIA result has no {missing} scores: score the lab with "
                            "memprobe.mia.score_texts (all reference-free attacks) before choosing")
    best = max(candidates, key=lambda c: (attacks[c]["roc_auc"], -candidates.index(c)))
    block = attacks[best]
    return {"score": best, "roc_auc": block["roc_auc"], "roc_auc_ci95": block.get("roc_auc_ci95"),
            "n_members": block["n_members"], "n_nonmembers": block["n_nonmembers"],
            "candidates": {c: {"roc_auc": attacks[c]["roc_auc"], "roc_auc_ci95": attacks[c].get("roc_auc_ci95")}
                           for c in candidates},
            "source": source}


def default_calibration(path: str | Path = DEFAULT_CHOICE) -> dict[str, Any]:
    """The committed choice (score name, its lab AUC and where that was measured)."""
    path = Path(path)
    if not path.is_file():
        raise MemprobeError(f"no calibration choice at {path}: write it with "
                            "`.venv/bin/python experiments/calibration_choice.py`")
    choice = json.loads(path.read_text(encoding="utf-8"))
    if choice.get("score") not in CALIBRATIONS:
        raise MemprobeError(f"{path} names calibration {choice.get('score')!r}, not one of {CALIBRATIONS}: "
                            "rewrite it with experiments/calibration_choice.py")
    return choice


def text_scores_from_store(store: Any, docs: Sequence[Mapping[str, Any]], *, k: float = 0.2) -> list[dict[str, Any]]:
    """`score_texts`-shaped records `{"id", "scores"}` of the reference-free attacks, read from a store
    captured with token_stats=True: the capture's forward already has them, so no second pass."""
    from memprobe.mia.attacks import scores_from_stats

    needed = ("target_logprob", "entropy", "logprob_std")
    if any(c not in store.columns for c in needed):
        raise MemprobeError(f"store {store.path} has no token-stat columns: capture it with token_stats=True")
    columns = {c: store.column(c) for c in needed}
    out = []
    for doc in docs:
        rows = store.doc_rows(doc["id"])
        pred = slice(rows.start + 1, rows.stop)  # row 0 predicts nothing
        scores = scores_from_stats(*(columns[c][pred] for c in needed), doc["text"], k)
        out.append({"id": doc["id"], "scores": scores})
    return out


def _mean_nll(loss: Sequence[float | None]) -> float:
    return float(np.mean([v for v in loss[1:] if v is not None]))


def reference_calibrate(records: list[dict[str, Any]], reference_labels: Sequence[Any], *,
                        reference_name: str) -> list[dict[str, Any]]:
    """Label records (memprobe.labels.label_documents) made reference-calibrated, in place.

    `reference_labels` are `memprobe.labels.token_labels` of the same token ids under the reference
    (same min_prob). The target-only labels stay as `memorized_uncalibrated` and
    `memorized_fraction_uncalibrated`; `memorized` and `memorized_fraction`, which later steps read,
    become "memorized by the target and not by the reference".
    """
    for record, ref in zip(records, reference_labels, strict=True):
        if ref.token_ids.tolist() != record["token_ids"]:
            raise MemprobeError(f"reference labels of {record['id']!r} are of other tokens than the target's")
        target_mem = np.array(record["memorized"], dtype=bool)
        calibrated = target_mem & ~ref.memorized
        target_loss = np.array([math.nan if v is None else v for v in record["loss"]], dtype=float)
        gain = ref.loss - target_loss  # log p_target(x_t) - log p_ref(x_t); NaN at position 0
        record.update(
            memorized_uncalibrated=record["memorized"],
            memorized_fraction_uncalibrated=record["memorized_fraction"],
            reference_memorized=[bool(v) for v in ref.memorized],
            reference_target_prob=[None if math.isnan(v) else float(v) for v in ref.target_prob],
            logprob_gain=[None if math.isnan(v) else float(v) for v in gain],
            memorized=[bool(v) for v in calibrated],
            memorized_fraction=float(calibrated[1:].mean()) if len(calibrated) > 1 else None,
            ref_score=_mean_nll([None if math.isnan(v) else v for v in ref.loss]) - _mean_nll(record["loss"]),
            reference_model=reference_name,
        )
        if record.get("span_tokens") is not None:
            lo, hi = record["span_tokens"]
            inside = calibrated[max(lo, 1) : hi]
            record["span_memorized_fraction"] = float(inside.mean()) if len(inside) else None
    return records


def add_reference_scores(scores: list[dict[str, Any]], records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The `ref` attack (NLL_ref - NLL_target) of reference-calibrated label records, beside the others."""
    by_id = {r["id"]: r for r in records}
    for s in scores:
        s["scores"]["ref"] = float(by_id[s["id"]]["ref_score"])
    return scores


def ranking(scores: Sequence[Mapping[str, Any]], records: Sequence[Mapping[str, Any]], score: str,
            top: int | None = None) -> list[dict[str, Any]]:
    """Texts ordered by `score` (higher = more memorized), with kind, role and rank (1 = most)."""
    meta = {r["id"]: r for r in records}
    ordered = sorted(scores, key=lambda s: (-s["scores"][score], s["id"]))
    rows = [{"rank": n + 1, "id": s["id"], "kind": meta[s["id"]].get("kind"), "role": meta[s["id"]].get("role"),
             "score": s["scores"][score], **({"member": meta[s["id"]]["member"]} if "member" in meta[s["id"]] else {})}
            for n, s in enumerate(ordered)]
    return rows[:top] if top else rows

