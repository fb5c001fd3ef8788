"""General memorization suppression: one edit built from some memorized texts, judged on others.

Why a contrast: neurons (or a direction) that support memorized tokens also support ordinary text;
removing those costs perplexity. So a neuron's score is its attribution to memorized tokens minus its
attribution to ordinary tokens (both per token), and the edit takes the top of that difference. The
effect is measured with the same labeller that defines memorization (`memprobe.labels.token_labels`):
memorized-token rate on memorized texts the edit was not built from, and perplexity / top-1 accuracy
on non-memorized text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from memprobe.adapters import adapter_for
from memprobe.documents import encode_documents
from memprobe.errors import MemprobeError
from memprobe.intervene.ablation import DirectionEdit, Edit, NeuronEdit, hooked_edit
from memprobe.intervene.localizers import (
    Attribution,
    RandomScores,
    Target,
    mean_activations,
    mlp_shape,
    target_logprob,
    top_neurons,
)
from memprobe.labels import token_labels

METHODS = ("low-rank-edit", "contrast-neurons", "guarded-contrast-neurons", "random-neurons", "mean-diff-direction",
           "probe-direction", "random-direction")


def targets_from_labels(ids_list: Sequence[Sequence[int]], memorized: Sequence[Sequence[bool]] | None = None) -> list[Target]:
    """Targets whose positions are the memorized tokens (or every predicted token when `memorized` is None)."""
    out = []
    for n, ids in enumerate(ids_list):
        pos = torch.ones(len(ids), dtype=torch.bool) if memorized is None else torch.as_tensor(list(memorized[n]), dtype=torch.bool)
        pos[0] = False
        out.append(Target(torch.as_tensor(list(ids), dtype=torch.long), pos))
    return out


def mean_attribution(model: nn.Module, targets: Sequence[Target], baseline: torch.Tensor | None = None) -> torch.Tensor:
    """Attribution of each neuron (replaced by `baseline`) to the targets' log-likelihood, per target token."""
    total = torch.zeros(mlp_shape(model))
    tokens = 0
    for t in targets:
        n = int(t.positions[1:].sum())
        if n:
            total += Attribution(model, baseline).localize(t).scores
            tokens += n
    if not tokens:
        raise MemprobeError("no target tokens to attribute: the memorized texts have no memorized tokens")
    return total / tokens


def contrast_scores(model: nn.Module, memorized: Sequence[Target], controls: Sequence[Target],
                    means: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token attribution to memorized tokens minus per-token attribution to ordinary text, for
    replacing each neuron by `means` (mean ablation; zero ablation when None)."""
    return mean_attribution(model, memorized, means) - mean_attribution(model, controls, means)


@torch.no_grad()
def control_loss(model: nn.Module, controls: Sequence[Target], edit: Edit | None = None) -> float:
    """Mean next-token loss (nats) over every predicted token of the control targets."""
    total, count = 0.0, 0
    with hooked_edit(model, edit) if edit is not None else torch.no_grad():
        for t in controls:
            total -= float(target_logprob(model, t))
            count += int(t.positions[1:].sum())
    return total / max(count, 1)


def guarded_top_neurons(model: nn.Module, scores: torch.Tensor, means: torch.Tensor, controls: Sequence[Target],
                        k: int, *, max_loss_increase: float = 0.01, max_candidates: int | None = None,
                        meta: dict | None = None) -> NeuronEdit:
    """Top-scoring neurons, skipping any whose mean ablation alone raises control loss by more than
    `max_loss_increase` nats: a first-order score misses the few neurons whose removal breaks the
    model, and one such neuron costs more than all the others together."""
    base = control_loss(model, controls)
    width = scores.shape[1]
    kept: list[int] = []
    skipped: list[int] = []
    for flat in torch.argsort(scores.flatten(), descending=True)[: max_candidates or 3 * k].tolist():
        layer, unit = divmod(flat, width)
        single = NeuronEdit({layer: torch.tensor([unit])}, 1.0, {layer: means[layer, [unit]]})
        if control_loss(model, controls, single) - base <= max_loss_increase:
            kept.append(flat)
        else:
            skipped.append(flat)
        if len(kept) == k:
            break
    chosen = torch.zeros_like(scores.flatten())
    chosen[kept] = 1.0
    return top_neurons(chosen.view_as(scores), k=len(kept), means=means,
                       meta={**(meta or {}), "kept_neurons": kept, "skipped_neurons": skipped,
                             "max_loss_increase": max_loss_increase})


@torch.no_grad()
def _resid(model: nn.Module, target: Target, layer: int) -> torch.Tensor:
    out: list[torch.Tensor] = []
    h = model.get_submodule(adapter_for(model).block(layer)).register_forward_hook(
        lambda _m, _a, o: out.append((o[0] if isinstance(o, tuple) else o)[0]))
    try:
        model(input_ids=target.token_ids[None], use_cache=False)
    finally:
        h.remove()
    feed = target.positions.roll(-1)
    feed[-1] = False
    return out[0][feed]


def mean_diff_direction(model: nn.Module, memorized: Sequence[Target], controls: Sequence[Target], layer: int) -> torch.Tensor:
    """Mean residual (after `layer`) where memorized tokens are predicted minus where ordinary ones are."""
    mem = torch.cat([_resid(model, t, layer) for t in memorized])
    ctrl = torch.cat([_resid(model, t, layer) for t in controls])
    return mem.mean(0) - ctrl.mean(0)


def probe_direction(loaded: Any, layer: int) -> torch.Tensor:
    """The memorization probe's direction at `layer` (from memprobe.probes, issue 3), when it exists."""
    try:
        from memprobe import probes
    except ImportError as exc:
        raise MemprobeError("probe-direction needs memprobe.probes (the probe module is not installed yet); "
                            "use mean-diff-direction") from exc
    getter = getattr(probes, "memorization_direction", None)
    if getter is None:
        raise MemprobeError("memprobe.probes has no memorization_direction(loaded, layer): use mean-diff-direction")
    return torch.as_tensor(getter(loaded, layer), dtype=torch.float32)


def make_edit(model: nn.Module, method: str, memorized: Sequence[Target], controls: Sequence[Target], *,
              fraction: float = 0.005, strength: float = 1.0, seed: int = 0, layer: int | None = None,
              loaded: Any = None, means: torch.Tensor | None = None, steps: int = 30, lr: float = 3e-3) -> Edit:
    """Build one suppression edit by `method` from memorized and control targets.

    steps, lr: the learned edit's Adam schedule (`train_low_rank_edit`); other methods ignore them.

    `means`: the neurons' mean activations on the controls, when the caller already has them (neuron
    methods ablate toward them; computing them is a forward pass over every control text).
    """
    n_layers, width = mlp_shape(model)
    layer = layer if layer is not None else (2 * n_layers) // 3
    meta = {"method": method, "seed": seed, "built_from": len(memorized), "controls": len(controls)}
    if method in ("contrast-neurons", "guarded-contrast-neurons", "random-neurons"):
        # Mean ablation toward the neurons' mean on ordinary text: zeroing keeps no neuron's constant
        # contribution, and a few neurons with large constant outputs then break the model.
        means = mean_activations(model, controls) if means is None else means
        meta = {**meta, "fraction": fraction, "ablation": "mean"}
        if method == "random-neurons":
            return top_neurons(RandomScores(model, seed).localize().scores, fraction, strength=strength, means=means, meta=meta)
        scores = contrast_scores(model, memorized, controls, means)
        if method == "contrast-neurons":
            return top_neurons(scores, fraction, strength=strength, means=means, meta=meta)
        k = max(1, round(fraction * n_layers * width))
        return guarded_top_neurons(model, scores, means, controls, k, max_candidates=k + 12, meta=meta).with_strength(strength)
    if method == "low-rank-edit":
        from memprobe.intervene.weight_edit import train_low_rank_edit

        edit = train_low_rank_edit(model, memorized, controls, seed=seed, steps=steps, lr=lr)
        return edit.with_strength(strength)
    if method == "mean-diff-direction":
        return DirectionEdit(mean_diff_direction(model, memorized, controls, layer), strength, {**meta, "layer": layer})
    if method == "probe-direction":
        return DirectionEdit(probe_direction(loaded, layer), strength, {**meta, "layer": layer})
    if method == "random-direction":
        d_model = adapter_for(model).d_model(model)
        d = torch.randn(d_model, generator=torch.Generator().manual_seed(seed))
        return DirectionEdit(d, strength, meta)
    raise MemprobeError(f"unknown suppression method {method!r}: choose one of {', '.join(METHODS)}")


def evaluate(model: nn.Module, memorized_ids: Sequence[Sequence[int]], control_ids: Sequence[Sequence[int]],
             edit: Edit | None = None, *, min_prob: float = 0.5, batch_size: int = 8) -> dict[str, float]:
    """Memorized-token rate on memorized texts; perplexity and top-1 accuracy on control texts."""
    def run() -> tuple[list, list]:
        return (token_labels(model, memorized_ids, min_prob=min_prob, batch_size=batch_size),
                token_labels(model, control_ids, min_prob=min_prob, batch_size=batch_size))

    if edit is None:
        mem, ctrl = run()
    else:
        with hooked_edit(model, edit):
            mem, ctrl = run()
    mem_flags = np.concatenate([t.memorized[1:] for t in mem])
    losses = np.concatenate([t.loss[1:] for t in ctrl])
    correct = np.concatenate([t.correct[1:] for t in ctrl])
    return {"memorized_token_rate": float(mem_flags.mean()), "perplexity": float(math.exp(losses.mean())),
            "top1_accuracy": float(correct.mean()), "memorized_tokens": int(mem_flags.sum()),
            "mem_tokens_total": int(mem_flags.size), "control_tokens": int(losses.size)}


def split_memorized(records: Sequence[dict[str, Any]], *, threshold: float = 0.5, control_max: float = 0.25,
                    seed: int = 0, build_share: float = 0.5) -> dict[str, list[dict[str, Any]]]:
    """Split labelled records by `split_group` into build/held-out memorized and build/held-out control.

    Memorized: real candidate texts with memorized fraction >= threshold. Control: made-up texts
    (role "control") with memorized fraction <= control_max. Groups never straddle the split.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, list] = {"build_memorized": [], "heldout_memorized": [], "build_control": [], "heldout_control": []}
    pools = {
        "memorized": [r for r in records if r.get("role") == "candidate" and (r["memorized_fraction"] or 0) >= threshold],
        "control": [r for r in records if r.get("role") == "control" and (r["memorized_fraction"] or 0) <= control_max],
    }
    for name, pool in pools.items():
        groups = sorted({str(r["split_group"]) for r in pool})
        rng.shuffle(groups)
        build = set(groups[: max(1, round(build_share * len(groups)))])
        for r in pool:
            out[("build_" if str(r["split_group"]) in build else "heldout_") + name].append(r)
    return out


def build_edit(loaded: Any, method: str, *, fraction: float = 0.005, strength: float = 1.0, seed: int = 0,
               memorized_jsonl: str | None = None, control_jsonl: str | None = None, progress: bool = False) -> Edit:
    """The CLI path: label texts (bundled corpus unless JSONL files are given), then build an edit."""
    from memprobe.corpora import bundled_corpus
    from memprobe.jsonl import read_jsonl

    if memorized_jsonl or control_jsonl:
        if not (memorized_jsonl and control_jsonl):
            raise MemprobeError("give both --memorized and --controls JSONL files, or neither")
        mem_docs = [{**d, "role": "candidate"} for d in read_jsonl(memorized_jsonl)]
        ctrl_docs = [{**d, "role": "control"} for d in read_jsonl(control_jsonl)]
        docs = mem_docs + ctrl_docs
    else:
        docs = bundled_corpus(None, seed=seed, include_model_samples=False)
    ids = encode_documents(loaded, docs)  # over-long texts are refused by id, as capture refuses them
    labels = token_labels(loaded.model, ids, progress=progress)
    records = [{**d, "split_group": d.get("split_group", d["id"]), "token_ids": i, "memorized": lab.memorized,
                "memorized_fraction": lab.memorized_fraction} for d, i, lab in zip(docs, ids, labels, strict=True)]
    parts = split_memorized(records, seed=seed, build_share=1.0)
    if not parts["build_memorized"]:
        raise MemprobeError("none of the texts is memorized by this model (memorized fraction >= 0.5): nothing to suppress")
    mem = targets_from_labels([r["token_ids"] for r in parts["build_memorized"]], [r["memorized"] for r in parts["build_memorized"]])
    ctrl = targets_from_labels([r["token_ids"] for r in parts["build_control"]])
    return make_edit(loaded.model, method, mem, ctrl, fraction=fraction, strength=strength, seed=seed, loaded=loaded)

