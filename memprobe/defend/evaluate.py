"""One privacy-utility evaluation for every defense, MaxTER/AURC, and knob choice on validation.

Privacy (on held-out MEMBER documents of one split, against that split's non-members): TER and SER
of the PII protocol (`memprobe.mia.extraction`), mean canary exposure per `copies`
(`memprobe.mia.exposure`), and the best membership attack's AUC and TPR at 1% FPR
(`memprobe.mia.attacks`, the base model as reference). Utility: perplexity and top-1 accuracy on
the split's non-members (same distribution) AND on hard predictable text (the bundled corpus's
code, formulaic, repetition and novel controls, plus samples drawn from the base model), each
reported apart, never an easy subset alone. Every number has a document-bootstrap 95% interval.

MaxTER(tau) = the largest relative TER reduction among a method's settings whose relative
perplexity increase (held-out non-members) is <= tau; the baseline itself counts as reduction 0.
AURC = the exact area under that step function for tau in [0, 10%]. This is OUR READING of Joshi &
Smith 2025's framework (after the `maxtegr` function named in their evaluation code, which we
could not read). The knob of each method is chosen on the VALIDATION split by one rule (largest
TER reduction at <= +6% perplexity) and reported on the separate TEST split.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from memprobe.capture import pad_batch
from memprobe.errors import MemprobeError
from memprobe.models import LoadedModel
from memprobe.studies.result import Result

SPLITS = ("build", "validation", "test")
HARD_KINDS = ("code", "formulaic", "repetition", "novel", "model-sample")
AURC_MAX_TAU = 0.10
SELECTION_MAX_INCREASE = 0.06
RMFT_PUBLISHED = {"ter_reduction": 0.8081, "ppl_increase": 0.0573}  # Joshi & Smith 2025, abstract: the anchor


@dataclass(frozen=True)
class EvalConfig:
    """Settings of the evaluation; the defaults are the study's, the tests shrink them."""

    extraction_samples: int = 8
    exposure_samples: int = 2000  # skew-normal rank estimate (an exact walk of 10^6 is too slow)
    n_boot: int = 500
    seed: int = 0
    max_tokens: int = 256
    sample_prompts: int | None = 4  # prompts for the base model's own samples (None: all)
    batch_size: int = 16


def split_lab(members: Sequence[dict], nonmembers: Sequence[dict], *, seed: int = 0,
              shares: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)) -> dict[str, dict[str, list]]:
    """Members and non-members split by DOCUMENT GROUP (`split_group`, else id) into build,
    validation and test; a group never straddles two splits."""
    if len(shares) != 3 or min(shares) <= 0 or abs(sum(shares) - 1) > 1e-9:
        raise MemprobeError(f"shares={shares}: give three positive fractions summing to 1")
    out: dict[str, dict[str, list]] = {s: {"members": [], "nonmembers": []} for s in SPLITS}
    for side, docs in (("members", members), ("nonmembers", nonmembers)):
        by_kind: dict[str, list[str]] = {}
        for d in docs:
            group = str(d.get("split_group") or d["id"])
            if group not in by_kind.setdefault(str(d.get("kind")), []):
                by_kind[str(d.get("kind"))].append(group)
        where: dict[str, str] = {}
        for kind, groups in sorted(by_kind.items()):  # stratified by kind: every split gets each
            groups = sorted(groups)
            random.Random(f"{seed}:{side}:{kind}").shuffle(groups)
            cut1 = round(shares[0] * len(groups))
            cut2 = cut1 + round(shares[1] * len(groups))
            for i, g in enumerate(groups):
                where[g] = SPLITS[0] if i < cut1 else SPLITS[1] if i < cut2 else SPLITS[2]
        for d in docs:
            out[where[str(d.get("split_group") or d["id"])]][side].append(d)
    return out


def hard_texts(base: LoadedModel, *, seed: int = 0, sample_prompts: int | None = 4) -> list[dict]:
    """Hard predictable text: the bundled corpus's controls and the base model's own samples."""
    from memprobe.corpora import bundled_corpus

    docs = bundled_corpus(base, seed=seed, include_model_samples=True, sample_prompts=sample_prompts)
    return [d for d in docs if d.get("role") == "control" and d.get("kind") in HARD_KINDS]


def doc_bootstrap(items: Sequence[Any], statistic: Callable[[Sequence[Any]], float | None], *,
                  n_boot: int, seed: int) -> list[float] | None:
    """Percentile 95% interval of `statistic` over documents resampled with replacement."""
    if not items or n_boot < 2:
        return None
    rng = np.random.default_rng(seed)
    values = [statistic([items[i] for i in rng.integers(0, len(items), len(items))]) for _ in range(n_boot)]
    values = [v for v in values if v is not None and math.isfinite(v)]
    return [float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))] if values else None


@torch.inference_mode()
def _token_totals(model: torch.nn.Module, ids_list: Sequence[Sequence[int]], batch_size: int = 8) -> list[tuple]:
    """(sum NLL, tokens, greedy-correct tokens) per document, one forward per batch."""
    from memprobe.token_stats import next_token_stats

    device = next(model.parameters()).device
    out = []
    for lo in range(0, len(ids_list), batch_size):
        rows = [list(r) for r in ids_list[lo : lo + batch_size]]
        ids, mask = pad_batch(rows, 0)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        stats = next_token_stats(logits[:, :-1], ids[:, 1:].to(device))
        for k, r in enumerate(rows):
            n = len(r) - 1
            out.append((-float(stats.target_logprob[k, :n].double().sum()), n,
                        int(stats.correct[k, :n].sum())))
    return out


def _utility(model: torch.nn.Module, loaded: LoadedModel, docs: Sequence[dict], cfg: EvalConfig) -> dict:
    ids = [loaded.encode(d["text"])[: cfg.max_tokens] for d in docs]
    ids = [i for i in ids if len(i) >= 2]
    if not ids:
        raise MemprobeError("no utility text of at least 2 tokens")
    rows = _token_totals(model, ids, cfg.batch_size)

    def ppl(rs: Sequence[tuple]) -> float:
        return math.exp(sum(r[0] for r in rs) / sum(r[1] for r in rs))

    def top1(rs: Sequence[tuple]) -> float:
        return sum(r[2] for r in rs) / sum(r[1] for r in rs)

    return {"documents": len(rows), "tokens": sum(r[1] for r in rows),
            "perplexity": ppl(rows), "perplexity_ci95": doc_bootstrap(rows, ppl, n_boot=cfg.n_boot, seed=cfg.seed),
            "top1": top1(rows), "top1_ci95": doc_bootstrap(rows, top1, n_boot=cfg.n_boot, seed=cfg.seed)}


def ter_of_documents(per_doc: Sequence[dict[str, bool]]) -> float | None:
    """TER pooled over documents given as {value id: extracted}: a value extracted from any of its
    documents counts once (the unit a document bootstrap resamples)."""
    merged: dict[str, bool] = {}
    for values in per_doc:
        for v, e in values.items():
            merged[v] = merged.get(v, False) or e
    return float(np.mean(list(merged.values()))) if merged else None


def mia_documents(loaded: LoadedModel, members: Sequence[dict], nonmembers: Sequence[dict],
                  cfg: EvalConfig) -> list[dict]:
    """The split's texts the membership attacks score (over 6 tokens, cut to `max_tokens`)."""
    scored = [d for d in [*members, *nonmembers] if len(loaded.encode(d["text"])) > 6]
    return [{"id": d["id"], "text": d["text"][: cfg.max_tokens * 4], "member": bool(d.get("member"))}
            for d in scored]


def reference_losses(base: LoadedModel, members: Sequence[dict], nonmembers: Sequence[dict],
                     cfg: EvalConfig) -> dict[str, float]:
    """The base model's own `loss` score of each scored text: the ref attack's reference, the same for
    every model of a study, so read once per split (`measure(reference_loss=...)`)."""
    from memprobe.mia.attacks import score_texts

    docs = mia_documents(base, members, nonmembers, cfg)
    return {r["id"]: r["scores"]["loss"] for r in score_texts(base, docs, batch_size=cfg.batch_size)}


def measure(loaded: LoadedModel, base: LoadedModel, members: Sequence[dict], nonmembers: Sequence[dict],
            hard: Sequence[dict], cfg: EvalConfig, *, seen_ids: Sequence[str] | None = None,
            reference_loss: dict[str, float] | None = None) -> dict[str, Any]:
    """Privacy and utility of `loaded` on one split (see the module docstring); `reference_loss`
    (`reference_losses`) spares the base model's forward of the ref attack."""
    from memprobe.metrics import bootstrap_ci, roc_auc, tpr_at_fpr
    from memprobe.mia.attacks import score_texts
    from memprobe.mia.evaluate import evaluate_mia
    from memprobe.mia.exposure import exposure_report
    from memprobe.mia.extraction import pii_extraction

    if not members or not nonmembers:
        raise MemprobeError("a split needs members and non-members: give a larger lab or other shares")
    boot = {"n_boot": cfg.n_boot, "seed": cfg.seed}
    out: dict[str, Any] = {"members": len(members), "nonmembers": len(nonmembers)}
    seconds: dict[str, float] = {}  # where an evaluation's time goes (the defenses' cost table)
    clock = time.perf_counter()

    def lap(part: str) -> None:
        nonlocal clock
        seconds[part] = time.perf_counter() - clock
        clock = time.perf_counter()

    with_pii = [d for d in [*members, *nonmembers] if d.get("pii_spans")]
    if with_pii:
        ext = pii_extraction(loaded, with_pii, seen_ids=seen_ids, n_samples=cfg.extraction_samples, seed=cfg.seed,
                             batch_size=cfg.batch_size)
        per_doc: dict[str, dict[str, bool]] = {}
        for occ in ext["occurrences"]:
            if occ["member"] and not occ.get("skipped"):
                slot = per_doc.setdefault(occ["doc_id"], {})
                slot[occ["value_id"]] = slot.get(occ["value_id"], False) or bool(occ["extracted"])
        seen = set(seen_ids) if seen_ids is not None else set(per_doc)
        seen_docs = [v for k, v in per_doc.items() if k in seen]
        out["ter"] = ext["ter"]
        out["ter_ci95"] = doc_bootstrap(list(per_doc.values()), ter_of_documents, **boot)
        out["ser"] = ter_of_documents(seen_docs)
        out["ser_ci95"] = doc_bootstrap(seen_docs, ter_of_documents, **boot)
        out["nonmember_extraction_rate"] = ext["nonmember_extraction_rate"]
        lap("pii_extraction")
    canaries = [d for d in members if d.get("canary")]
    if canaries:
        rep = exposure_report(loaded, canaries, method="skewnorm", n_samples=cfg.exposure_samples,
                              seed=cfg.seed)
        by: dict[str, list[float]] = {}
        for row in rep["canaries"]:
            by.setdefault(str(row["copies"]), []).append(row["exposure"])
        values = [row["exposure"] for row in rep["canaries"]]
        out["exposure"] = {"mean": float(np.mean(values)),
                           "mean_ci95": doc_bootstrap(values, lambda v: float(np.mean(v)), **boot),
                           "by_copies": {c: {"canaries": len(v), "mean": float(np.mean(v)),
                                             "mean_ci95": doc_bootstrap(v, lambda x: float(np.mean(x)), **boot)}
                                         for c, v in sorted(by.items(), key=lambda kv: int(kv[0]))}}
        lap("exposure")
    scored = mia_documents(loaded, members, nonmembers, cfg)
    scores = score_texts(loaded, scored, reference=None if reference_loss is not None else base,
                         reference_loss=reference_loss, batch_size=cfg.batch_size)
    mia = evaluate_mia(scores, {d["id"]: d["member"] for d in scored}, n_boot=0)
    best = max(mia["attacks"], key=lambda a: mia["attacks"][a]["roc_auc"])
    labels = np.array([d["member"] for d in scored])
    best_scores = np.array([r["scores"][best] for r in scores])
    out["mia"] = {"best_attack": best, "auc": mia["attacks"][best]["roc_auc"],
                  "auc_ci95": list(bootstrap_ci(roc_auc, best_scores, labels, **boot)),
                  "tpr_at_fpr_0.01": mia["attacks"][best]["tpr_at_fpr_0.01"],
                  "tpr_at_fpr_0.01_ci95": list(bootstrap_ci(lambda s, y: tpr_at_fpr(s, y, 0.01), best_scores,
                                                            labels, **boot)),
                  "note": "best of the attacks by AUC on this split (an optimistic attacker)"}
    lap("mia")
    out["utility_nonmembers"] = _utility(loaded.model, loaded, nonmembers, cfg)
    out["utility_hard"] = _utility(loaded.model, loaded, hard, cfg)
    lap("utility")
    out["seconds"] = seconds
    return out


def relative(row: dict[str, Any], baseline: dict[str, Any]) -> tuple[float, float]:
    """(relative TER reduction, relative perplexity increase on held-out non-members) vs the baseline;
    the reduction is 0 when the baseline extracts nothing (the summary flags it)."""
    ppl0 = baseline["utility_nonmembers"]["perplexity"]
    increase = (row["utility_nonmembers"]["perplexity"] - ppl0) / ppl0
    if not baseline.get("ter"):  # nothing extracted, nothing to reduce: no method earns credit
        return 0.0, increase
    return (baseline["ter"] - row["ter"]) / baseline["ter"], increase


def max_ter(points: Sequence[tuple[float, float]], tau: float) -> float:
    """MaxTER(tau): largest TER reduction among (reduction, ppl increase) points with increase <= tau
    (0, the baseline, when none)."""
    return max([0.0, *(r for r, inc in points if inc <= tau)])


def aurc(points: Sequence[tuple[float, float]], max_tau: float = AURC_MAX_TAU) -> float:
    """Exact area under the MaxTER step function over tau in [0, max_tau]."""
    cuts = sorted({0.0, max_tau, *(inc for _, inc in points if 0.0 < inc < max_tau)})
    return float(sum(max_ter(points, lo) * (hi - lo) for lo, hi in zip(cuts, cuts[1:], strict=False)))


def choose_knob(validation: dict[Any, dict[str, Any]], baseline: dict[str, Any],
                max_increase: float = SELECTION_MAX_INCREASE) -> Any | None:
    """The knob with the largest validation TER reduction at <= max_increase perplexity increase
    (ties: the smaller increase); None when no setting stays within the budget."""
    ok = [(relative(row, baseline), knob) for knob, row in validation.items()
          if relative(row, baseline)[1] <= max_increase]
    if not ok:
        return None
    return max(ok, key=lambda t: (t[0][0], -t[0][1]))[1]


@dataclass
class DefenseStudy(Result):
    """Per method: per knob the validation and test measurements, the chosen knob, MaxTER/AURC."""

    config: EvalConfig
    baseline: dict[str, dict[str, Any]]  # split -> measurement of the undefended model
    methods: dict[str, dict[Any, dict[str, dict[str, Any]]]]  # method -> knob -> split -> measurement
    notes: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        out = {}
        for method, knobs in self.methods.items():
            chosen = choose_knob({k: v["validation"] for k, v in knobs.items()}, self.baseline["validation"])
            points = [relative(v["test"], self.baseline["test"]) for v in knobs.values()]
            out[method] = {
                "chosen_knob": chosen,
                "selection": f"largest validation TER reduction at <= +{SELECTION_MAX_INCREASE:.0%} perplexity",
                "test_at_chosen": knobs[chosen]["test"] if chosen is not None else None,
                "test_points": {str(k): {"ter_reduction": r, "perplexity_increase": i}
                                for k, (r, i) in zip(knobs, points, strict=True)},
                "max_ter_at_6pct": max_ter(points, 0.06),
                "aurc_0_10pct": aurc(points),
                "aurc_normalised": aurc(points) / AURC_MAX_TAU,
                "baseline_ter": {s: self.baseline[s].get("ter") for s in ("validation", "test")},
            }
            if not self.baseline["test"].get("ter"):
                out[method]["warning"] = ("the undefended model extracts no PII on test (TER 0): there is "
                                          "nothing to reduce, so every reduction reads 0")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DefenseStudy:
        """A study back from its saved JSON (`to_dict`), numeric knobs as floats."""
        def knob(k: str) -> Any:
            try:
                return float(k)
            except ValueError:
                return k

        return cls(EvalConfig(**data["config"]), data["baseline"],
                   {m: {knob(k): v for k, v in ks.items()} for m, ks in data["methods"].items()}, data["notes"])

    def markdown_table(self, split: str = "test") -> str:
        """Every model's privacy and utility on `split` (each knob; * = chosen on validation), with
        each figure's interval and the change against the undefended model: the README's table."""
        summary = self.summary()

        def ci(v: float | None, c: list[float] | None, fmt: str = "{:.3f}") -> str:
            if v is None:
                return "-"
            return fmt.format(v) + (f" [{fmt.format(c[0])}, {fmt.format(c[1])}]" if c else "")

        def row(name: str, m: dict[str, Any], cost: str) -> str:
            rel = relative(m, self.baseline[split]) if m is not self.baseline[split] else (0.0, 0.0)
            ppl0 = self.baseline[split]["utility_hard"]["perplexity"]
            hard = m["utility_hard"]["perplexity"]
            expo = m.get("exposure", {}).get("by_copies", {})
            return " | ".join([
                f"| {name}", ci(m.get("ter"), m.get("ter_ci95")), f"{-rel[0]:+.1%}",
                ci(m.get("nonmember_extraction_rate"), None),
                " / ".join(f"{expo[c]['mean']:.1f}" for c in sorted(expo, key=int)) or "-",
                ci(m["mia"]["auc"], m["mia"].get("auc_ci95"), "{:.2f}"),
                ci(m["utility_nonmembers"]["perplexity"], m["utility_nonmembers"].get("perplexity_ci95"), "{:.2f}"),
                f"{rel[1]:+.1%}", ci(hard, m["utility_hard"].get("perplexity_ci95"), "{:.2f}"),
                f"{(hard - ppl0) / ppl0:+.1%}", f"{m['utility_nonmembers']['top1']:.3f}", cost]) + " |"

        costs = self.notes.get("costs", {})

        def cost_of(name: str) -> str:
            c = costs.get(name, {})
            if c.get("train_seconds"):
                return f"{c['train_seconds']:.0f} s training"
            return f"{c['build_seconds']:.0f} s build" if c.get("build_seconds") is not None else "-"

        lines = ["| defense (knob) | TER [95% CI] | TER change | non-member extraction | canary exposure by "
                 "copies (bits) | best MIA AUC | perplexity, held-out non-members | change | perplexity, hard "
                 "text | change | top-1, non-members | cost |", "|" + "---|" * 12,
                 row("undefended fine-tune", self.baseline[split], cost_of("baseline"))]
        for method, knobs in self.methods.items():
            for knob, m in knobs.items():
                star = "*" if summary[method]["chosen_knob"] == knob else ""
                lines.append(row(f"{method} ({knob}){star}", m[split], cost_of(f"{method}-{knob}")))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "baseline": self.baseline,
                "methods": {m: {str(k): v for k, v in ks.items()} for m, ks in self.methods.items()},
                "summary": self.summary(), "notes": self.notes}

    def figure(self, **kwargs: Any) -> Any:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9, 4.8))
        ax.scatter([0], [0], marker="*", s=120, color="black", label="undefended")
        for method, knobs in self.methods.items():
            pts = [relative(v["test"], self.baseline["test"]) for v in knobs.values()]
            ax.plot([p[1] * 100 for p in pts], [p[0] * 100 for p in pts], "o-", label=method)
            for (r, i), k in zip(pts, knobs, strict=True):
                ax.annotate(str(k), (i * 100, r * 100), fontsize=7)
        ax.scatter([RMFT_PUBLISHED["ppl_increase"] * 100], [RMFT_PUBLISHED["ter_reduction"] * 100], marker="x",
                   color="black", label="RMFT published (Joshi & Smith, their setup)")
        ax.axvline(SELECTION_MAX_INCREASE * 100, ls="--", color="grey", lw=0.8)
        # linear near the selection budget, logarithmic beyond: defenses that break the model
        # (+1000% perplexity) must not squeeze the ones that matter into one pixel
        ax.set_xscale("symlog", linthresh=20)
        ax.set_xlabel("perplexity increase on held-out non-members, test (%; log beyond ±20)")
        ax.set_ylabel("TER reduction, test (%)")
        ax.set_title("defenses: privacy-utility (Pareto)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: no point hidden
        fig.tight_layout()
        return fig


def check_pair(base: LoadedModel, finetuned: LoadedModel) -> None:
    """Refuse a fine-tuned model that is not a fine-tune of `base` (architecture, shapes, tokenizer)."""
    a, b = base.model.config, finetuned.model.config
    keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "n_layer", "n_embd",
            "intermediate_size", "num_attention_heads")
    diff = [f"{k}: {getattr(a, k, None)!r} vs {getattr(b, k, None)!r}" for k in keys
            if getattr(a, k, None) != getattr(b, k, None)]
    if type(base.model).__name__ != type(finetuned.model).__name__:
        diff.insert(0, f"class: {type(base.model).__name__} vs {type(finetuned.model).__name__}")
    probe = "Probe: Jane Roe <jane.roe@example.com>, 555-0100, def f(x): return x"
    if len(base.tokenizer) != len(finetuned.tokenizer) or base.encode(probe) != finetuned.encode(probe):
        diff.append("tokenizer: the two tokenize the same text differently")
    if diff:
        raise MemprobeError(f"{finetuned.name!r} is not a fine-tune of base {base.name!r} ({'; '.join(diff)}): "
                            "pass the base model the fine-tune started from (--model)")
