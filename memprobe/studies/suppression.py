"""The suppression study: learn a low-rank edit on some memorized texts, choose its strength on others,
report it on others still.

Why a study: the audit's suppress step and experiments/suppress.py both call `run_suppression`.
Method: the edit (memprobe.intervene.weight_edit) is trained on the build records (memorized tokens of
build texts vs build controls). The held-out records are split by `split_group` into VALIDATION and
TEST (controls stratified by kind, so every kind with two groups is in both). At each strength the
edit is measured on both, and a random edit of the same layers, rank and per-layer norm on test (the
baseline beside the reported numbers; validation only chooses): the memorized-token rate on memorized texts, perplexity and top-1 accuracy on ALL controls (code,
formulaic, model samples, ... included), on the easy subset (base memorized fraction <=
`easy_control_max`, the old filter) and per control kind. One rule picks the strength on validation
only: the largest validation suppression whose validation ALL-controls perplexity increase is <=
`ppl_budget` (none: the mildest, flagged). The test numbers of every strength carry percentile 95%
intervals from a document bootstrap (edited and unedited numbers of the same resampled documents).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from memprobe.errors import MemprobeError
from memprobe.studies.cache import StepCache
from memprobe.studies.result import Result

METHOD = "low-rank-edit"  # memprobe.intervene.weight_edit; see README for why not neuron ablation
SELECTION_RULE = (
    "largest validation suppression among strengths whose validation perplexity increase on ALL "
    "controls is <= ppl_budget; none within it: the mildest strength, flagged"
)
# Columns of a per-document row (the first token is never scored: nothing predicts it).
MEM, LOSS, CORRECT, TOKENS = range(4)


@dataclass(frozen=True)
class SuppressionConfig:
    """Settings of a suppression study."""

    seed: int = 0
    max_tokens: int = 64  # each text's first tokens used for training and measuring
    max_controls: int | None = 16  # control texts the edit is trained against (a seeded sample)
    strengths: tuple[float, ...] = (0.25, 0.5, 1.0, 1.5)
    ppl_budget: float = 0.05  # largest validation ALL-controls perplexity increase a chosen edit may cost
    validation_share: float = 0.5  # of the held-out groups; the rest are the test split
    easy_control_max: float = 0.25  # the easy subset: controls with base memorized fraction <= this
    n_boot: int = 1000  # document-bootstrap resamples per test interval (0: none)


def split_validation_test(
    records: Sequence[dict[str, Any]], share: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Held-out records into validation and test by `split_group`, stratified by `kind`: groups of
    each kind (seeded shuffle, kinds in sorted order) are dealt in one running sequence in which a
    share `share` goes to validation, so a kind with two groups lands in both splits."""
    if not 0.0 < share < 1.0:
        raise MemprobeError(f"validation_share={share}: give a fraction strictly between 0 and 1")
    rng = np.random.default_rng(seed)
    by_kind: dict[str, list[str]] = {}
    for r in records:
        groups = by_kind.setdefault(str(r.get("kind")), [])
        if str(r["split_group"]) not in groups:
            groups.append(str(r["split_group"]))
    validation: set[str] = set()
    i = 0
    for kind in sorted(by_kind):
        groups = sorted(by_kind[kind])
        rng.shuffle(groups)
        for g in groups:
            if math.floor((i + 1) * share) > math.floor(i * share):
                validation.add(g)
            i += 1
    val = [r for r in records if str(r["split_group"]) in validation]
    test = [r for r in records if str(r["split_group"]) not in validation]
    return val, test


def document_rows(
    model: nn.Module, ids: Sequence[Sequence[int]], edit: Any = None, *, batch_size: int = 8
) -> np.ndarray:
    """Per document (memprobe.labels.token_labels, under `edit` when given): memorized tokens, summed
    next-token loss (nats), greedy-correct tokens, scored tokens."""
    from memprobe.intervene.ablation import hooked_edit
    from memprobe.labels import token_labels

    with hooked_edit(model, edit) if edit is not None else nullcontext():
        labels = token_labels(model, ids, batch_size=batch_size)
    return np.array([_row(t) for t in labels], dtype=np.float64)


def _row(t: Any) -> list[float]:
    return [t.memorized[1:].sum(), t.loss[1:].astype(np.float64).sum(), t.correct[1:].sum(), len(t.loss) - 1]


def _lowest_layer(edit: Any) -> int:
    """The lowest layer an edit changes: a low-rank edit changes only its layers' MLP outputs, any
    other kind is treated as changing everything."""
    from memprobe.intervene.ablation import LowRankEdit

    return min(edit.factors) if isinstance(edit, LowRankEdit) and edit.factors else 0


def edit_tables(
    model: nn.Module, ids: Sequence[Sequence[int]], edits: Sequence[Any], *, batch_size: int = 8,
    min_prob: float = 0.5,
) -> list[np.ndarray]:
    """`document_rows` of `ids` unedited (first table), then under each of `edits`.

    Why not one `document_rows` per edit: the layers below the lowest edited one give the same output
    under every edit, so per batch they run once and are replayed for each edit
    (memprobe.intervene.weight_edit.EditForward, checked against the full forward per batch); the
    labels come from `labels_from_stats`, the one definition `token_labels` uses.
    """
    from memprobe.intervene.ablation import hooked_edit
    from memprobe.intervene.weight_edit import EditForward

    start = min([_lowest_layer(e) for e in edits], default=0)
    tables = np.zeros((1 + len(edits), len(ids), 4), dtype=np.float64)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    device = next(model.parameters()).device
    for lo in range(0, len(order), batch_size):
        batch = order[lo : lo + batch_size]
        width = len(ids[batch[0]])
        tokens = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            tokens[row, : len(ids[i])] = torch.as_tensor(ids[i], dtype=torch.long)
            mask[row, : len(ids[i])] = 1
        tokens, mask = tokens.to(device), mask.to(device)
        with torch.no_grad():  # each pass's (positions, vocab) log-probs become rows before the next
            forward = EditForward(model, tokens, mask, mask[:, 1:].bool(), start=start)
            lengths = [len(ids[i]) for i in batch]
            _fill_rows(tables[0], batch, lengths, tokens, forward.reference, min_prob)
            for k, e in enumerate(edits, start=1):
                with hooked_edit(model, e):
                    _fill_rows(tables[k], batch, lengths, tokens, forward(), min_prob)
    return list(tables)


def _fill_rows(table: np.ndarray, batch: Sequence[int], lengths: Sequence[int], tokens: torch.Tensor,
               logprobs: torch.Tensor, min_prob: float) -> None:
    """`table[i]` for each document i of the batch (row `row`, `lengths[row]` tokens), from the
    log-probs at the scored positions, row-major over the batch's real tokens after the first."""
    from memprobe.labels import labels_from_stats
    from memprobe.token_stats import next_token_stats

    at = 0
    for row, (i, length) in enumerate(zip(batch, lengths, strict=True)):
        doc, n = tokens[row, :length], length - 1
        stats = next_token_stats(logprobs[at : at + n], doc[1:])
        table[i] = _row(labels_from_stats(doc.cpu(), stats, min_prob))
        at += n


def _sums(rows: np.ndarray) -> np.ndarray:
    return rows.sum(-2)


def suppression_of(base: np.ndarray, edited: np.ndarray) -> float:
    """Relative drop of the memorized-token rate (documents pooled by token)."""
    return float(_suppression(_sums(base), _sums(edited)))


def ppl_change_of(base: np.ndarray, edited: np.ndarray) -> float:
    """Relative perplexity change, token-weighted over the documents."""
    return float(_ppl_change(_sums(base), _sums(edited)))


def top1_change_of(base: np.ndarray, edited: np.ndarray) -> float:
    """Top-1 accuracy change (absolute), token-weighted over the documents."""
    return float(_top1_change(_sums(base), _sums(edited)))


# The statistics as functions of column sums (..., 4): a bootstrap draw is a weighted sum of rows.
def _suppression(b: np.ndarray, e: np.ndarray) -> np.ndarray:
    before = b[..., MEM]
    return np.where(before > 0, 1 - e[..., MEM] / np.where(before > 0, before, 1), 0.0)


def _ppl_change(b: np.ndarray, e: np.ndarray) -> np.ndarray:
    return np.expm1((e[..., LOSS] - b[..., LOSS]) / b[..., TOKENS])


def _top1_change(b: np.ndarray, e: np.ndarray) -> np.ndarray:
    return (e[..., CORRECT] - b[..., CORRECT]) / b[..., TOKENS]


_OF_SUMS = {suppression_of: _suppression, ppl_change_of: _ppl_change, top1_change_of: _top1_change}


def paired_interval(
    statistic: Any, base: np.ndarray, edited: np.ndarray, *, n_boot: int, seed: int
) -> list[float] | None:
    """Percentile 95% document-bootstrap interval of `statistic(base, edited)` (one of the three
    above): each draw resamples documents with replacement and keeps each one's unedited and edited
    rows together. The draws are `doc_bootstrap`'s; every draw at once, as resample counts times
    the rows (the statistics are ratios of sums), since thousands of per-draw calls cost seconds."""
    n = len(base)
    if not n or n_boot < 2:
        return None
    draws = np.random.default_rng(seed).integers(0, n, (n_boot, n))
    counts = np.zeros((n_boot, n))
    np.add.at(counts, (np.repeat(np.arange(n_boot), n), draws.ravel()), 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        values = _OF_SUMS[statistic](counts @ base, counts @ edited)
    values = values[np.isfinite(values)]
    return [float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))] if len(values) else None


def _control_block(base: np.ndarray, edited: np.ndarray | None, n_boot: int, seed: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "documents": len(base),
        "tokens": int(base[:, TOKENS].sum()),
        "base_perplexity": math.exp(base[:, LOSS].sum() / base[:, TOKENS].sum()),
        "base_top1_accuracy": float(base[:, CORRECT].sum() / base[:, TOKENS].sum()),
    }
    if edited is not None:
        out["perplexity"] = math.exp(edited[:, LOSS].sum() / edited[:, TOKENS].sum())
        for name, stat in (("ppl_change", ppl_change_of), ("top1_change", top1_change_of)):
            out[name] = stat(base, edited)
            if n_boot:
                out[f"{name}_ci95"] = paired_interval(stat, base, edited, n_boot=n_boot, seed=seed)
    return out


def measure_split(
    base: dict[str, np.ndarray],
    edited: dict[str, np.ndarray] | None,
    control_kinds: Sequence[str],
    easy: np.ndarray,
    *,
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    """One split's numbers from per-document rows (`memorized`, `control`): suppression on the
    memorized documents; perplexity and top-1 changes on ALL controls, on the easy subset (`easy`, a
    mask over the controls) and per control kind; intervals when `n_boot`."""
    kinds = np.asarray(control_kinds, dtype=object)
    groups = {"all": np.ones(len(kinds), dtype=bool), "easy": np.asarray(easy, dtype=bool)}
    groups |= {f"kind:{k}": kinds == k for k in sorted(set(control_kinds))}
    mem = base["memorized"]
    out: dict[str, Any] = {
        "memorized_documents": len(mem),
        "mem_tokens_total": int(mem[:, TOKENS].sum()),
        "base_memorized_token_rate": float(mem[:, MEM].sum() / mem[:, TOKENS].sum()),
    }
    if edited is not None:
        out["memorized_token_rate"] = float(edited["memorized"][:, MEM].sum() / mem[:, TOKENS].sum())
        out["suppression"] = suppression_of(mem, edited["memorized"])
        if n_boot:
            out["suppression_ci95"] = paired_interval(
                suppression_of, mem, edited["memorized"], n_boot=n_boot, seed=seed
            )
    controls: dict[str, Any] = {"by_kind": {}}
    for name, mask in groups.items():
        block = None
        if mask.any():
            ctrl_edit = None if edited is None else edited["control"][mask]
            block = _control_block(base["control"][mask], ctrl_edit, n_boot, seed)
        if name.startswith("kind:"):
            controls["by_kind"][name[5:]] = block
        else:
            controls[name] = block
    out["controls"] = controls
    # The headline cost is ALL controls, never the easy subset alone.
    for key in ("ppl_change", "ppl_change_ci95", "top1_change", "top1_change_ci95", "perplexity"):
        if key in controls["all"]:
            out[key] = controls["all"][key]
    return out


def choose_strength(validation_curve: Sequence[dict[str, Any]], ppl_budget: float) -> dict[str, Any]:
    """SELECTION_RULE, on validation rows only (`strength`, `suppression`, `ppl_change`)."""
    within = [r for r in validation_curve if r["ppl_change"] <= ppl_budget]
    if within:
        best = max(within, key=lambda r: (r["suppression"], -r["strength"]))
        return {"strength": best["strength"], "within_budget": True}
    return {"strength": min(r["strength"] for r in validation_curve), "within_budget": False}


@dataclass
class SuppressionResult(Result):
    """The edit; its validation and test curves beside the random edit's; the strength chosen on
    validation, reported on test."""

    config: SuppressionConfig
    split_sizes: dict[str, int]
    validation: dict[str, Any]  # {"base", "curve"}: validation only chooses the strength
    test: dict[str, Any]
    chosen: dict[str, Any]
    edit: Any = field(repr=False)  # LowRankEdit at strength 1 (as trained)
    random_edit: Any = field(repr=False)
    test_ids: list[str] = field(default_factory=list)
    build_seconds: float = 0.0  # not in to_dict: results stay identical across reruns

    @property
    def chosen_edit(self) -> Any:
        return self.edit.with_strength(self.chosen["strength"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": METHOD,
            "size": self.edit.size,
            "training": self.edit.meta,
            "selection": {"rule": SELECTION_RULE, "on": "validation", "reported_on": "test"},
            "chosen": self.chosen,
            # The test split: what is reported. Curve rows carry ALL-controls costs at top level.
            "base": self.test["base"],
            "curve": self.test["curve"],
            "random_baseline": self.test["random_curve"],
            "validation": self.validation,
            "split_sizes": self.split_sizes,
            "test_ids": self.test_ids,
            "config": asdict(self.config),
        }

    def figure(self, title: str = "suppression vs cost (test split)") -> Any:
        import matplotlib.pyplot as plt

        fig, (ax, kinds_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
        for rows, label, style in (
            (self.test["curve"], METHOD, "o-"),
            (self.test["random_curve"], "random edit (same size)", "s--"),
        ):
            xs = np.array([100 * r["ppl_change"] for r in rows])
            ys = np.array([100 * r["suppression"] for r in rows])
            err = None
            if all(r.get("suppression_ci95") and r.get("ppl_change_ci95") for r in rows):
                err = (
                    np.abs(np.array([[100 * v for v in r["ppl_change_ci95"]] for r in rows]).T - xs),
                    np.abs(np.array([[100 * v for v in r["suppression_ci95"]] for r in rows]).T - ys),
                )
            ax.errorbar(xs, ys, xerr=None if err is None else err[0], yerr=None if err is None else err[1],
                        fmt=style, capsize=2, lw=1, label=f"{label}, all controls")
            easy = [r["controls"].get("easy") for r in rows]
            if all(easy):
                ax.plot([100 * e["ppl_change"] for e in easy], ys, style[0], mfc="none", color="0.5",
                        label=f"{label}, easy controls only")
            for x, y, r in zip(xs, ys, rows, strict=True):
                ax.annotate(f"x{r['strength']}", (x, y), fontsize=7)
        ax.axvline(100 * self.config.ppl_budget, color="0.6", lw=0.8, ls=":")
        ax.set_xscale("symlog", linthresh=1)  # costs span 0.1% to several hundred %
        ax.set_xlabel("perplexity change on control texts (%)")
        ax.set_ylabel("memorized-token rate reduction, test texts (%)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
        chosen = next(r for r in self.test["curve"] if r["strength"] == self.chosen["strength"])
        by_kind = {k: v for k, v in chosen["controls"]["by_kind"].items() if v}
        names = sorted(by_kind)
        values = [100 * by_kind[k]["ppl_change"] for k in names]
        cis = [by_kind[k].get("ppl_change_ci95") for k in names]
        err = None
        if names and all(cis):
            err = np.abs(np.array([[100 * v for v in c] for c in cis]).T - np.array(values))
        kinds_ax.barh([f"{k} ({by_kind[k]['documents']})" for k in names], values, xerr=err, color="tab:blue",
                      capsize=2)
        kinds_ax.axvline(0, color="0.3", lw=0.8)
        kinds_ax.set_xlabel(f"perplexity change at strength x{self.chosen['strength']} (%), test")
        kinds_ax.set_title("cost per control kind (texts), strength chosen on validation", fontsize=9)
        fig.tight_layout()
        return fig


def suppression_documents(
    seed: int = 0, loaded: Any = None, sample_prompts: int | None = None
) -> list[dict[str, Any]]:
    """The texts the suppression and localization experiments label on smollm2: the bundled corpus's
    candidates and its made-up controls (novel, PII, formulaic, code). With `loaded`: the whole
    corpus, every control kind (perturbed, repetition, the model's own samples from the first
    `sample_prompts` prompts) included."""
    from memprobe.corpora import bundled_corpus

    if loaded is not None:
        return bundled_corpus(loaded, seed=seed, include_model_samples=True, sample_prompts=sample_prompts)
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
    *,
    precision: str = "float32",
) -> SuppressionResult:
    """Train the edit on the build records; choose its strength on the validation half of the
    held-out records and report every strength on the test half (records: `token_ids`, `kind`,
    `split_group`, `memorized_fraction`, and `memorized` for memorized texts; e.g. from
    memprobe.intervene.suppress.split_memorized with control_max=1.0, so that hard controls count).
    `precision`: of the evaluation's forward passes (memprobe.precision); the edit trains in its own
    (`train_low_rank_edit`'s mixed precision)."""
    from memprobe.intervene.suppress import targets_from_labels
    from memprobe.intervene.weight_edit import random_low_rank_like, train_low_rank_edit
    from memprobe.precision import compute_precision

    if not build_memorized or not heldout_memorized or not build_control:
        raise MemprobeError(
            "suppression needs memorized texts to build from, others to test on, and control "
            f"texts (got {len(build_memorized)}, {len(heldout_memorized)}, {len(build_control)})"
        )
    cut = config.max_tokens
    _validation_test(heldout_memorized, heldout_control, config)  # refuses before training
    mem = targets_from_labels(
        [r["token_ids"][:cut] for r in build_memorized],
        [r["memorized"][:cut] for r in build_memorized],
    )
    ctrl = targets_from_labels([r["token_ids"][:cut] for r in build_control])
    t = time.perf_counter()
    edit = train_low_rank_edit(
        model, mem, ctrl, seed=config.seed, max_tokens=cut, max_controls=config.max_controls
    )
    build_seconds = time.perf_counter() - t
    with compute_precision(precision, model):
        result = evaluate_suppression(
            model, edit, random_low_rank_like(edit, seed=config.seed), heldout_memorized, heldout_control,
            config, build_sizes={"build_memorized": len(build_memorized), "build_control": len(build_control)},
        )
    result.build_seconds = build_seconds
    return result


def _validation_test(
    heldout_memorized: Sequence[dict[str, Any]],
    heldout_control: Sequence[dict[str, Any]],
    config: SuppressionConfig,
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    parts: dict[str, dict[str, list[dict[str, Any]]]] = {"validation": {}, "test": {}}
    for name, records in (("memorized", heldout_memorized), ("control", heldout_control)):
        val, test = split_validation_test(records, config.validation_share, config.seed)
        parts["validation"][name], parts["test"][name] = val, test
    sizes = {f"{s}_{n}": len(v) for s, p in parts.items() for n, v in p.items()}
    if not all(sizes.values()):
        raise MemprobeError(
            "suppression needs held-out memorized and control texts of at least two `split_group`s "
            f"each, one for validation and one for test (got {sizes}): add texts"
        )
    return parts


def evaluate_suppression(
    model: nn.Module,
    edit: Any,
    random_edit: Any,
    heldout_memorized: Sequence[dict[str, Any]],
    heldout_control: Sequence[dict[str, Any]],
    config: SuppressionConfig,
    build_sizes: dict[str, int] | None = None,
) -> SuppressionResult:
    """Measure a built edit at every strength on the validation and test halves of the held-out
    records, and its random baseline on test (validation only chooses the strength: SELECTION_RULE)."""
    cut = config.max_tokens
    parts = _validation_test(heldout_memorized, heldout_control, config)
    sizes = dict(build_sizes or {}) | {f"{s}_{n}": len(v) for s, p in parts.items() for n, v in p.items()}

    def split_info(s: str) -> tuple[list[str], np.ndarray]:
        ctrl_records = parts[s]["control"]
        easy = [(r.get("memorized_fraction") or 0.0) <= config.easy_control_max for r in ctrl_records]
        return [str(r.get("kind")) for r in ctrl_records], np.array(easy)

    splits: dict[str, dict[str, Any]] = {}
    for s, p in parts.items():
        # one edit_tables call per split: the unedited rows, then every edited pass, with the layers
        # below the edit run once per batch
        ids = [r["token_ids"][:cut] for n in ("memorized", "control") for r in p[n]]
        keys = ["curve"] if s == "validation" else ["curve", "random_curve"]
        edits = [(key, strength, e.with_strength(strength)) for strength in config.strengths
                 for e, key in ((edit, "curve"), (random_edit, "random_curve")) if key in keys]
        tables = edit_tables(model, ids, [e for _, _, e in edits])
        n_mem = len(p["memorized"])
        base = {"memorized": tables[0][:n_mem], "control": tables[0][n_mem:]}
        info = split_info(s)
        n_boot = config.n_boot if s == "test" else 0  # validation only chooses
        splits[s] = {"base": measure_split(base, None, *info, n_boot=0, seed=config.seed),
                     **{key: [] for key in keys}}
        for (key, strength, _), table in zip(edits, tables[1:], strict=True):
            edited = {"memorized": table[:n_mem], "control": table[n_mem:]}
            row = measure_split(base, edited, *info, n_boot=n_boot, seed=config.seed)
            splits[s][key].append({"strength": strength, **row})
    pick = choose_strength(splits["validation"]["curve"], config.ppl_budget)
    test_row = next(r for r in splits["test"]["curve"] if r["strength"] == pick["strength"])
    random_row = next(r for r in splits["test"]["random_curve"] if r["strength"] == pick["strength"])
    validation_row = next(r for r in splits["validation"]["curve"] if r["strength"] == pick["strength"])
    chosen = {
        **pick,
        **{k: v for k, v in test_row.items() if k != "strength"},
        "validation": {k: validation_row[k] for k in ("suppression", "ppl_change", "top1_change")},
        "random_baseline": {k: v for k, v in random_row.items() if k != "strength"},
    }
    return SuppressionResult(
        config,
        sizes,
        splits["validation"],
        splits["test"],
        chosen,
        edit,
        random_edit,
        [r["id"] for r in parts["test"]["memorized"]],
    )
