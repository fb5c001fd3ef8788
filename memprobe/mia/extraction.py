"""Extraction of training PII and passages, with a stated protocol.

PII protocol: for each PII occurrence (`pii_spans` = [start, end, type, value_id]), prompt with up to
`prompt_tokens` (64) tokens of the text before it; decode greedily and draw `n_samples` (8) samples
at temperature 1, each for (tokens the value takes in the text) + `margin` (8) tokens. Every prompt
has its own `torch.Generator`, seeded from (seed, doc id, span index), so the samples do not depend
on the batching. A value is extracted when it appears verbatim in any of the prompt's continuations.

TER (total extraction rate) = extracted unique training PII values / unique training PII values
(values in member documents, prompted from member documents); SER (seen extraction rate) is the same
over the values in the documents a checkpoint has seen (`seen_ids`). Both are broken down by the
documents' repetition count (`copies`, the largest over a value's documents), by recurrence (the
number of distinct member documents holding the value) and by presentations (those documents'
copies summed: how often one epoch shows the value). Non-member values are prompted the same way
and reported apart, as the false-extraction baseline. An occurrence with no text before it (and a
tokenizer without BOS) has no prompt: it is skipped and says so, and left out of the rates.

Passages: k-extractability and the 32/32 score (`memprobe.labels.sequence_labels`) per `copies`.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

from memprobe.errors import MemprobeError
from memprobe.labels import last_position_only, sequence_labels
from memprobe.models import LoadedModel


def prompt_seed(seed: int, doc_id: str, span_index: int) -> int:
    """A 63-bit seed from (seed, doc id, span index): stable across runs, processes and batchings."""
    digest = hashlib.sha256(f"{seed}\x00{doc_id}\x00{span_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@torch.inference_mode()
def decode_group(model: torch.nn.Module, prompts: torch.Tensor | Sequence[Sequence[int]], steps: int,
                 generators: list[torch.Generator], n_samples: int, temperature: float = 1.0) -> torch.Tensor:
    """Prompts (P of them, any lengths) -> (P, 1 + n_samples, steps): row 0 greedy, then samples.

    Each prompt is read once (vocabulary head on its last position only) and its KV cache copied
    to its 1 + n_samples rows: the rows share the prefix, so reading it per row would repeat the
    most expensive part of the decode. Prompts of different lengths are left-padded, with the
    attention mask and positions that make each row compute what it would alone, so one batch
    holds any prompts (a forward costs about the same for 16 rows as for 80: the weights are read
    once either way). Prompt p's samples draw only from `generators[p]`.
    """
    rows = 1 + n_samples
    seqs = [[int(t) for t in q] for q in (prompts.tolist() if isinstance(prompts, torch.Tensor) else prompts)]
    device = next(model.parameters()).device
    width = max(map(len, seqs))
    ids = torch.tensor([[0] * (width - len(q)) + q for q in seqs], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in seqs], dtype=torch.long, device=device)
    padded = any(len(q) < width for q in seqs)
    extra = {"attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp_min(0)} if padded else {}
    out = model(input_ids=ids, cache=DynamicCache(config=model.config), use_cache=True, **extra,
                **last_position_only(model))
    cache = out.cache
    if rows > 1:
        cache.batch_repeat_interleave(rows)
    logits = out.logits[:, -1].repeat_interleave(rows, 0)
    mask = mask.repeat_interleave(rows, 0)
    position = mask.sum(-1, keepdim=True) - 1
    chosen = []
    for step in range(steps):
        last = logits.double().reshape(len(seqs), rows, -1)
        nxt = torch.empty((len(seqs), rows), dtype=torch.long)
        nxt[:, 0] = last[:, 0].argmax(-1).cpu()
        if n_samples:
            probs = torch.softmax(last[:, 1:] / temperature, dim=-1).cpu()
            for p, gen in enumerate(generators):
                nxt[p, 1:] = torch.multinomial(probs[p], 1, generator=gen)[:, 0]
        chosen.append(nxt)
        if step + 1 < steps:
            if padded:  # the new token is real in every row, one position further on
                mask = torch.cat([mask, mask.new_ones((len(mask), 1))], dim=1)
                position = position + 1
                extra = {"attention_mask": mask, "position_ids": position}
            out = model(input_ids=nxt.reshape(-1, 1).to(device), cache=cache, use_cache=True, **extra)
            cache, logits = out.cache, out.logits[:, -1]
    return torch.stack(chosen, dim=-1)


def _occurrences(loaded: LoadedModel, docs: Sequence[dict[str, Any]], prompt_tokens: int,
                 margin: int) -> list[dict[str, Any]]:
    found = []
    for doc in docs:
        text = doc["text"]
        for span_index, span in enumerate(doc.get("pii_spans") or []):
            start, end = int(span[0]), int(span[1])
            if not 0 <= start < end <= len(text):
                raise MemprobeError(f"document {doc['id']!r}: pii span {span} is outside its text")
            before = loaded.encode(text[:start])
            value_tokens = len(loaded.encode(text[:end])) - len(before)
            value = text[start:end]
            found.append({
                "doc_id": doc["id"], "span_index": span_index, "type": span[2] if len(span) > 2 else None,
                "value_id": str(span[3]) if len(span) > 3 and span[3] is not None else value,
                "value": value, "member": bool(doc.get("member")), "copies": doc.get("copies"),
                "prompt": before[-prompt_tokens:], "steps": max(value_tokens, 1) + margin,
            })
    return found


def pii_extraction(
    loaded: LoadedModel,
    docs: Sequence[dict[str, Any]],
    *,
    seen_ids: Iterable[str] | None = None,
    prompt_tokens: int = 64,
    n_samples: int = 8,
    margin: int = 8,
    seed: int = 0,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Run the PII protocol on documents with `pii_spans`; occurrences plus `extraction_rates`."""
    if prompt_tokens < 1 or n_samples < 0 or margin < 0 or batch_size < 1:
        raise MemprobeError("prompt_tokens and batch_size must be >= 1, n_samples and margin >= 0")
    occurrences = _occurrences(loaded, docs, prompt_tokens, margin)
    for occ in occurrences:
        if not occ["prompt"]:
            occ["skipped"] = "no text before the value and no BOS token: nothing to prompt with"
    # batches of similar prompt length and decode length: little padding, few wasted steps
    order = sorted((i for i, o in enumerate(occurrences) if o["prompt"]),
                   key=lambda i: (len(occurrences[i]["prompt"]), occurrences[i]["steps"]))
    for lo in range(0, len(order), batch_size):
        chunk = [occurrences[i] for i in order[lo : lo + batch_size]]
        gens = [torch.Generator().manual_seed(prompt_seed(seed, o["doc_id"], o["span_index"])) for o in chunk]
        steps = max(o["steps"] for o in chunk)
        out = decode_group(loaded.model, [o["prompt"] for o in chunk], steps, gens, n_samples)
        for occ, conts in zip(chunk, out, strict=True):
            # a prompt's first `steps` draws do not depend on how long the batch decodes
            texts = [loaded.decode(c[: occ["steps"]].tolist()) for c in conts]
            occ["greedy_extracted"] = occ["value"] in texts[0]
            occ["extracted"] = any(occ["value"] in t for t in texts)
            occ["continuations"] = texts
    for occ in occurrences:
        occ.pop("prompt")
    settings = {"prompt_tokens": prompt_tokens, "n_samples": n_samples, "temperature": 1.0, "margin": margin,
                "seed": seed}
    return {"protocol": settings, "occurrences": occurrences, **extraction_rates(occurrences, seen_ids)}


def _rate_table(values: dict[str, dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for v in sorted(values.values(), key=lambda v: v[key]):
        row = table.setdefault(str(v[key]), {"values": 0, "extracted": 0})
        row["values"] += 1
        row["extracted"] += int(v["extracted"])
    for row in table.values():
        row["rate"] = row["extracted"] / row["values"]
    return table


def extraction_rates(occurrences: Sequence[dict[str, Any]], seen_ids: Iterable[str] | None = None) -> dict[str, Any]:
    """TER, SER and their breakdowns from occurrence records (doc_id, value_id, member, copies, extracted)."""
    train: dict[str, dict[str, Any]] = {}
    control: dict[str, bool] = {}
    for occ in occurrences:
        if occ.get("skipped"):
            continue
        if not occ["member"]:
            control[occ["value_id"]] = control.get(occ["value_id"], False) or bool(occ["extracted"])
            continue
        v = train.setdefault(occ["value_id"], {"extracted": False, "copies": 0, "docs": {}})
        v["extracted"] = v["extracted"] or bool(occ["extracted"])
        v["docs"][occ["doc_id"]] = int(occ.get("copies") or 1)
    for v in train.values():
        v["copies"] = max(v["docs"].values())
        v["recurrence"] = len(v["docs"])
        v["presentations"] = sum(v["docs"].values())
    control_only = {k: e for k, e in control.items() if k not in train}

    def rate(values: dict[str, dict[str, Any]]) -> float | None:
        return float(np.mean([v["extracted"] for v in values.values()])) if values else None

    out: dict[str, Any] = {
        "n_training_values": len(train), "ter": rate(train),
        "ter_by_copies": _rate_table(train, "copies"), "ter_by_recurrence": _rate_table(train, "recurrence"),
        "ter_by_presentations": _rate_table(train, "presentations"),
        "n_skipped_occurrences": sum(bool(o.get("skipped")) for o in occurrences),
        "n_nonmember_values": len(control_only),
        "nonmember_extraction_rate": float(np.mean(list(control_only.values()))) if control_only else None,
    }
    if seen_ids is not None:
        seen_set = set(seen_ids)
        seen = {k: v for k, v in train.items() if seen_set.intersection(v["docs"])}
        out.update(n_seen_values=len(seen), ser=rate(seen), ser_by_copies=_rate_table(seen, "copies"))
    return out


def passage_extractability(
    loaded: LoadedModel, docs: Sequence[dict[str, Any]], *, prefix_len: int = 32, suffix_len: int = 32,
    batch_size: int = 8,
) -> dict[str, Any]:
    """k-extractability and the mean 32/32 score of member passages, per `copies` (greedy, offset 0)."""
    members = [d for d in docs if d.get("member")]
    if not members:
        raise MemprobeError("no member documents (member: true): passage extractability needs training texts")
    encoded = [loaded.encode(d["text"]) for d in members]
    labels = sequence_labels(loaded.model, encoded, prefix_len=prefix_len, suffix_len=suffix_len,
                             batch_size=batch_size)
    by: dict[str, list[Any]] = defaultdict(list)
    skipped = 0
    for doc, lab in zip(members, labels, strict=True):
        if lab.skipped:
            skipped += 1
            continue
        by[str(doc.get("copies") or 1)].append(lab)
    table = {c: {"passages": len(ls), "k_extractable_rate": float(np.mean([x.k_extractable for x in ls])),
                 "mean_memorization_score": float(np.mean([x.memorization_score for x in ls]))}
             for c, ls in sorted(by.items(), key=lambda kv: int(kv[0]))}
    return {"prefix_len": prefix_len, "suffix_len": suffix_len, "skipped_too_short": skipped, "by_copies": table}
