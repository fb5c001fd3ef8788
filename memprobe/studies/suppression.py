"""The suppression study: learn a low-rank edit on some memorized texts, measure it on others.

Why a study: the audit's suppress step and experiments/suppress.py each trained and measured the
learned edit (memprobe.intervene.weight_edit) with their own loop. Both call `run_suppression` now.
Method (unchanged): the edit is trained on the build half (memorized tokens of build texts vs build
controls); at each strength it and a random edit of the same layers, rank and per-layer norm are
measured on held-out memorized texts (memorized-token rate) and held-out controls (perplexity, top-1
accuracy); the strongest strength within the perplexity budget is chosen (else the mildest, flagged).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from memprobe.errors import MemprobeError
from memprobe.studies.cache import StepCache
from memprobe.studies.result import Result

METHOD = "low-rank-edit"  # memprobe.intervene.weight_edit; see README for why not neuron ablation


@dataclass(frozen=True)
class SuppressionConfig:
    """Settings of a suppression study."""

    seed: int = 0
    max_tokens: int = 64  # each text's first tokens used for training and measuring
    max_controls: int | None = 16  # control texts the edit is trained against (a seeded sample)
    strengths: tuple[float, ...] = (0.25, 0.5, 1.0, 1.5)
    ppl_budget: float = 0.05  # largest perplexity increase on control texts a chosen edit may cost


def changes(row: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    """An edited measurement relative to the unedited one."""
    rate = base["memorized_token_rate"]
    return {
        "suppression": (rate - row["memorized_token_rate"]) / rate if rate else 0.0,
        "ppl_change": row["perplexity"] / base["perplexity"] - 1,
        "top1_change": row["top1_accuracy"] - base["top1_accuracy"],
    }


@dataclass
class SuppressionResult(Result):
    """The edit, its strength curve beside the random edit's, and the chosen strength."""

    config: SuppressionConfig
    base: dict[str, float]
    curve: list[dict[str, Any]]
    random_curve: list[dict[str, Any]]
    chosen: dict[str, Any]
    edit: Any = field(repr=False)  # LowRankEdit at strength 1 (as trained)
    random_edit: Any = field(repr=False)
    build_seconds: float = 0.0  # not in to_dict: results stay identical across reruns

    @property
    def chosen_edit(self) -> Any:
        return self.edit.with_strength(self.chosen["strength"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": METHOD,
            "size": self.edit.size,
            "base": self.base,
            "training": self.edit.meta,
            "curve": self.curve,
            "random_baseline": self.random_curve,
            "chosen": self.chosen,
            "config": asdict(self.config),
        }

    def figure(self, title: str = "suppression vs cost") -> Any:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 4))
        for rows, label, style in (
            (self.curve, METHOD, "o-"),
            (self.random_curve, "random edit (same size)", "s--"),
        ):
            ax.plot(
                [100 * r["ppl_change"] for r in rows],
                [100 * r["suppression"] for r in rows],
                style,
                label=label,
            )
            for r in rows:
                ax.annotate(
                    f"x{r['strength']}", (100 * r["ppl_change"], 100 * r["suppression"]), fontsize=7
                )
        ax.axvline(100 * self.config.ppl_budget, color="0.6", lw=0.8, ls=":")
        ax.set_xlabel("perplexity change on control texts (%)")
        ax.set_ylabel("memorized-token rate reduction, held-out texts (%)")
        ax.set_title(title)
        ax.legend(fontsize=8)
        return fig


def suppression_documents(seed: int = 0) -> list[dict[str, Any]]:
    """The texts the suppression and localization experiments label on smollm2: the bundled corpus's
    candidates and its made-up controls (novel, PII, formulaic, code), no model samples."""
    from memprobe.corpora import bundled_corpus

    return [
        d
        for d in bundled_corpus(None, seed=seed, include_model_samples=False)
        if d["role"] == "candidate" or d["kind"] in ("novel", "pii", "formulaic", "code")
    ]


def label_records(
    loaded: Any,
    docs: Sequence[dict[str, Any]],
    max_tokens: int,
    cache: StepCache | None = None,
) -> list[dict[str, Any]]:
    """Token labels (memprobe.labels.token_labels) of each document's first `max_tokens` tokens, in `cache`
    when given (keyed by the model, the documents' ids and tokens, and the code)."""
    from memprobe.labels import token_labels

    ids = [loaded.encode(d["text"])[:max_tokens] for d in docs]

    def label() -> list[dict[str, Any]]:
        labels = token_labels(loaded.model, ids, batch_size=8)
        return [
            {
                "id": d["id"],
                "kind": d.get("kind"),
                "role": d.get("role"),
                "split_group": d.get("split_group", d["id"]),
                "token_ids": i,
                "memorized": lab.memorized.tolist(),
                "memorized_fraction": lab.memorized_fraction,
            }
            for d, i, lab in zip(docs, ids, labels, strict=True)
        ]

    if cache is None:
        return label()
    model = {k: loaded.info.get(k) for k in ("name", "sha256")}
    return cache.json(
        "labels",
        label,
        inputs={
            "model": model,
            "docs": [
                (d["id"], d.get("kind"), d.get("role"), d.get("split_group"), i)
                for d, i in zip(docs, ids, strict=True)
            ],
        },
        code=[label, token_labels],
    )


def run_suppression(
    model: nn.Module,
    build_memorized: Sequence[dict[str, Any]],
    build_control: Sequence[dict[str, Any]],
    heldout_memorized: Sequence[dict[str, Any]],
    heldout_control: Sequence[dict[str, Any]],
    config: SuppressionConfig,
) -> SuppressionResult:
    """Train the edit on the build records, measure it on the held-out ones (records: `token_ids`, and
    `memorized` for memorized texts; e.g. from memprobe.intervene.suppress.split_memorized). With no
    held-out controls the build controls measure the cost."""
    from memprobe.intervene.suppress import evaluate, targets_from_labels
    from memprobe.intervene.weight_edit import random_low_rank_like, train_low_rank_edit

    if not build_memorized or not heldout_memorized or not build_control:
        raise MemprobeError(
            "suppression needs memorized texts to build from, others to test on, and control "
            f"texts (got {len(build_memorized)}, {len(heldout_memorized)}, {len(build_control)})"
        )
    cut = config.max_tokens
    mem = targets_from_labels(
        [r["token_ids"][:cut] for r in build_memorized],
        [r["memorized"][:cut] for r in build_memorized],
    )
    ctrl = targets_from_labels([r["token_ids"][:cut] for r in build_control])
    held_mem = [r["token_ids"][:cut] for r in heldout_memorized]
    held_ctrl = [r["token_ids"][:cut] for r in (heldout_control or build_control)]
    base = evaluate(model, held_mem, held_ctrl)
    t = time.perf_counter()
    edit = train_low_rank_edit(
        model, mem, ctrl, seed=config.seed, max_tokens=cut, max_controls=config.max_controls
    )
    build_seconds = time.perf_counter() - t
    random_edit = random_low_rank_like(edit, seed=config.seed)
    curve, random_curve = [], []
    for strength in config.strengths:
        for e, into in ((edit, curve), (random_edit, random_curve)):
            row = evaluate(model, held_mem, held_ctrl, e.with_strength(strength))
            into.append({"strength": strength, **row, **changes(row, base)})
    within = [r for r in curve if r["ppl_change"] <= config.ppl_budget]
    chosen = {
        **(max(within, key=lambda r: r["suppression"]) if within else curve[0]),
        "within_budget": bool(within),
    }
    return SuppressionResult(
        config, base, curve, random_curve, chosen, edit, random_edit, build_seconds
    )
