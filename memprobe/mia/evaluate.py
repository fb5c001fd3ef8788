"""How well each membership score separates members from non-members: AUC, low-FPR TPR, ROC figures.

Why document-level: each text is one sample, so the bootstrap resamples texts (documents), and a
member's repetition count (`copies`) is the natural breakdown (members with c copies against all
non-members). TPR at 0.1% FPR needs at least 1000 non-members to be measurable at all; below that it
is reported as None with the reason, never as a number.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from memprobe.errors import MemprobeError
from memprobe.metrics import bootstrap_ci, roc_auc, roc_curve, tpr_at_fpr

MIN_NONMEMBERS_FOR_0_1_PCT = 1000


def _block(scores: np.ndarray, labels: np.ndarray, n_boot: int, seed: int) -> dict[str, Any]:
    n_neg = int((~labels).sum())
    out: dict[str, Any] = {
        "n_members": int(labels.sum()), "n_nonmembers": n_neg,
        "roc_auc": roc_auc(scores, labels),
        "tpr_at_fpr_0.01": tpr_at_fpr(scores, labels, 0.01),
    }
    if n_neg >= MIN_NONMEMBERS_FOR_0_1_PCT:
        out["tpr_at_fpr_0.001"] = tpr_at_fpr(scores, labels, 0.001)
    else:
        out["tpr_at_fpr_0.001"] = None
        out["tpr_at_fpr_0.001_reason"] = f"not measurable: {n_neg} non-members < {MIN_NONMEMBERS_FOR_0_1_PCT}"
    if n_boot:
        out["roc_auc_ci95"] = list(bootstrap_ci(roc_auc, scores, labels, n_boot=n_boot, seed=seed))
        out["tpr_at_fpr_0.01_ci95"] = list(
            bootstrap_ci(lambda s, y: tpr_at_fpr(s, y, 0.01), scores, labels, n_boot=n_boot, seed=seed))
    return out


def evaluate_mia(
    scores: Sequence[dict[str, Any]],
    membership: Mapping[str, bool],
    *,
    copies: Mapping[str, int | None] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    figure: str | Path | None = None,
) -> dict[str, Any]:
    """Per attack: AUC, TPR at 1% (and 0.1%) FPR with document-bootstrap 95% intervals, per `copies`.

    `scores` are `score_texts` records; `membership` maps id -> member. A figure path writes linear and
    log-log ROC curves of every attack.
    """
    missing = [r["id"] for r in scores if r["id"] not in membership]
    if missing:
        raise MemprobeError(f"{len(missing)} scored ids have no membership label (first: {missing[0]!r}): "
                            "give the texts file with a 'member' field for every id")
    ids = [r["id"] for r in scores]
    labels = np.array([bool(membership[i]) for i in ids])
    attacks = sorted({a for r in scores for a in r["scores"]}, key=lambda a: (a != "loss", a))
    result: dict[str, Any] = {"n_boot": n_boot, "seed": seed, "attacks": {}}
    curves = {}
    for attack in attacks:
        values = np.array([r["scores"].get(attack, np.nan) for r in scores], dtype=float)
        if np.isnan(values).any():
            raise MemprobeError(f"attack {attack!r} is missing for some texts: score them all with one setting")
        block = _block(values, labels, n_boot, seed)
        if copies is not None:
            groups: dict[str, Any] = {}
            counts = sorted({copies.get(i) for i, m in zip(ids, labels, strict=True) if m and copies.get(i)})
            for c in counts:
                keep = ~labels | np.array([copies.get(i) == c for i in ids])
                groups[str(c)] = _block(values[keep], labels[keep], n_boot, seed)
            block["by_copies"] = groups
        result["attacks"][attack] = block
        fpr, tpr, _ = roc_curve(values, labels)
        curves[f"{attack} (AUC {block['roc_auc']:.3f})"] = (fpr, tpr)
    if figure is not None:
        from memprobe.plots import roc_curves, save_figure

        result["figure"] = str(save_figure(roc_curves(curves, title="membership inference"), figure))
    return result
