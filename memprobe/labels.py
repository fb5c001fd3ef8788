"""Memorization ground truth: which tokens and sequences a causal LM reproduces from its training data.

Why several labels: papers disagree on what "memorized" means, and detectors are judged against
whichever definition the user picks. Token level (teacher-forced): is the model's greedy choice the
true next token, and with what probability. Sequence level (free-running greedy decoding from a
k-token prefix): k-extractability (Carlini et al. 2022), the fraction of the m suffix tokens matched
position-wise (the "32/32" score, Biderman et al. 2023), tokens matched before the first mismatch
(Stoehr et al. 2024), and the token-level edit distance of the continuation.

Token ids come from `LoadedModel.encode` (BOS included iff the tokenizer adds one); position 0 has no
prediction, so its per-token values are NaN / False.
"""

from __future__ import annotations

import hashlib
import inspect
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import Levenshtein
import numpy as np
import torch
from tqdm.auto import tqdm

from memprobe.documents import encode_documents  # noqa: F401  (the labeller's validator, re-exported)
from memprobe.errors import MemprobeError
from memprobe.token_stats import STAT_COLUMNS, NextTokenStats, next_token_stats


@dataclass(frozen=True)
class TokenLabels:
    """Teacher-forced per-token values for one document; arrays have the document's length T.

    Index t describes token t as predicted from tokens < t, so index 0 is undefined (NaN / False).
    """

    token_ids: np.ndarray  # int64 (T,)
    target_prob: np.ndarray  # float64: p(token t | tokens < t)
    correct: np.ndarray  # bool: greedy argmax == token t
    loss: np.ndarray  # float64: -log target_prob
    entropy: np.ndarray  # float64: entropy (nats) of the predictive distribution for t
    top_prob: np.ndarray  # float64: probability of the argmax (the model's confidence)
    memorized: np.ndarray  # bool: correct and target_prob >= min_prob

    @property
    def memorized_fraction(self) -> float:
        """Share of predicted positions (1..T-1) that are memorized; NaN for a one-token document."""
        return float(self.memorized[1:].mean()) if len(self.memorized) > 1 else math.nan


@dataclass(frozen=True)
class SequenceLabels:
    """Greedy continuation of tokens[offset : offset+k] compared with tokens[offset+k : offset+k+m].

    A document with fewer than offset+k+m tokens is not scored (it would make "32/32" mean something
    else): `skipped` then says why and every score is None.
    """

    doc_index: int
    offset: int
    prefix_len: int
    suffix_len: int
    continuation: np.ndarray | None = None  # int64 (m,) greedy token ids
    k_extractable: bool | None = None  # the whole suffix reproduced exactly
    memorization_score: float | None = None  # fraction of suffix positions matched
    exact_match_len: int | None = None  # suffix tokens matched before the first mismatch
    levenshtein: int | None = None  # token-level edit distance, continuation vs suffix
    skipped: str | None = None


def _device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _check_docs(docs_token_ids: Sequence[Sequence[int]]) -> None:
    for i, ids in enumerate(docs_token_ids):
        if len(ids) == 0:
            raise MemprobeError(f"document {i} has no tokens: drop empty documents before labelling")


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise MemprobeError(f"batch_size must be >= 1, not {batch_size}")


@torch.inference_mode()
def token_labels(
    model: torch.nn.Module,
    docs_token_ids: Sequence[Sequence[int]],
    *,
    min_prob: float = 0.5,
    batch_size: int = 8,
    progress: bool = False,
) -> list[TokenLabels]:
    """Teacher-forced labels: one forward per batch (right-padded, sorted by length to pad little)."""
    if not 0.0 < min_prob <= 1.0:
        raise MemprobeError(f"min_prob must be in (0, 1], not {min_prob}: it is a probability threshold")
    _check_batch_size(batch_size)
    _check_docs(docs_token_ids)
    device = _device(model)
    order = sorted(range(len(docs_token_ids)), key=lambda i: -len(docs_token_ids[i]))
    results: list[TokenLabels | None] = [None] * len(docs_token_ids)
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="token labels", disable=not progress):
        width = len(docs_token_ids[batch[0]])
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            doc = docs_token_ids[i]
            ids[row, : len(doc)] = torch.as_tensor(doc, dtype=torch.long)
            mask[row, : len(doc)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for row, i in enumerate(batch):
            results[i] = _labels_from_logits(logits[row, : len(docs_token_ids[i])], ids[row], min_prob)
    return results  # type: ignore[return-value]


def _labels_from_logits(logits: torch.Tensor, ids: torch.Tensor, min_prob: float) -> TokenLabels:
    n = logits.shape[0]
    stats = next_token_stats(logits[:-1], ids[1:n])  # row t predicts token t+1
    return labels_from_stats(ids[:n], stats, min_prob)


def labels_from_stats(token_ids: torch.Tensor | np.ndarray, stats: NextTokenStats, min_prob: float) -> TokenLabels:
    """Token labels of one document from its next-token statistics (index t predicts token t+1).

    The one definition both paths share: labels computed from a forward's logits here, and labels
    read back from the token-stat columns a capture stored from the same forward (`token_labels_from_store`).
    """
    def padded(values: torch.Tensor, fill: float | bool) -> np.ndarray:
        head = np.array([fill], dtype=np.bool_ if isinstance(fill, bool) else np.float64)
        return np.concatenate([head, values.cpu().numpy()])

    target_prob = padded(stats.target_logprob.exp(), math.nan)
    correct = padded(stats.correct, False)
    return TokenLabels(
        token_ids=np.asarray(token_ids, dtype=np.int64),
        target_prob=target_prob,
        correct=correct,
        loss=padded(-stats.target_logprob, math.nan),
        entropy=padded(stats.entropy, math.nan),
        top_prob=padded(stats.top_logprob.exp(), math.nan),
        memorized=correct & (np.nan_to_num(target_prob, nan=0.0) >= min_prob),
    )


def token_labels_from_store(store: Any, doc_ids: Sequence[str], *, min_prob: float = 0.5) -> list[TokenLabels]:
    """Token labels of `doc_ids` from a store captured with `token_stats=True` (memprobe.capture).

    Why: the capture's forward already produced the logits, so labels, MIA statistics and
    activations come from one pass; recomputing them would be a second forward over the same texts.
    """
    if not 0.0 < min_prob <= 1.0:
        raise MemprobeError(f"min_prob must be in (0, 1], not {min_prob}: it is a probability threshold")
    missing = [c for c in STAT_COLUMNS if c not in store.columns]
    if missing:
        raise MemprobeError(
            f"store {store.path} has no token-stat columns {missing}: capture it with token_stats=True "
            "(memprobe.capture.capture), or label the texts with memprobe.labels.token_labels"
        )
    columns = {c: store.column(c) for c in STAT_COLUMNS}
    token_id = store.rows.token_id
    out = []
    for doc_id in doc_ids:
        rows = store.doc_rows(doc_id)
        pred = slice(rows.start + 1, rows.stop)  # row 0 of a document predicts nothing
        values = {c: columns[c][pred] for c in STAT_COLUMNS}
        stats = NextTokenStats(**{**values, "correct": values["correct"] == 1})
        out.append(labels_from_stats(token_id[rows].numpy(), stats, min_prob))
    return out


@torch.inference_mode()
def continue_tokens(
    model: torch.nn.Module,
    prefixes: torch.Tensor | Sequence[Sequence[int]],
    steps: int,
    *,
    temperature: float = 0.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Extend prefixes by `steps` tokens each with a KV cache, all rows in one batch; no EOS stopping.

    Prefixes of different lengths are left-padded, with an attention mask and position ids that
    make every row compute what it would alone. temperature 0 is greedy (ties go to the lowest id);
    above 0, row i samples with `generator[i]` (one seeded generator per row: its samples do not
    depend on which other rows share the batch), or all rows draw from one shared `generator`.
    """
    if temperature < 0:
        raise MemprobeError(f"temperature must be >= 0, not {temperature}")
    rows = [[int(t) for t in p] for p in (prefixes.tolist() if isinstance(prefixes, torch.Tensor) else prefixes)]
    if any(not r for r in rows):
        raise MemprobeError("continue_tokens: every prefix needs at least one token")
    generators = _row_generators(generator, len(rows))
    if not rows or steps == 0:
        return torch.zeros((len(rows), 0), dtype=torch.long)
    device = _device(model)
    width = max(map(len, rows))
    inputs = torch.tensor([[0] * (width - len(r)) + r for r in rows], dtype=torch.long, device=device)
    padded = any(len(r) < width for r in rows)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long, device=device)
    position = (mask.cumsum(-1) - 1).clamp_min(0)
    cache, chosen, first = None, [], last_position_only(model)
    for _ in range(steps):
        extra = {"attention_mask": mask, "position_ids": position} if padded else {}
        out = model(input_ids=inputs, cache=cache, use_cache=True, **extra, **first)
        first = {}
        cache, last = out.cache, out.logits[:, -1].double()
        nxt = last.argmax(-1) if temperature == 0 else _sample(last / temperature, generators).to(device)
        chosen.append(nxt)
        inputs = nxt[:, None]
        if padded:  # the new token is real in every row, one position further on
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
            position = position[:, -1:] + 1
    return torch.stack(chosen, dim=1).cpu()


def last_position_only(model: torch.nn.Module) -> dict[str, int]:
    """Forward kwargs that apply the vocabulary head to the last position only, where the model
    supports it: reading a prompt to decode from it needs no other position's logits."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _row_generators(generator: torch.Generator | Sequence[torch.Generator] | None,
                    n_rows: int) -> torch.Generator | list[torch.Generator] | None:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    generators = list(generator)
    if len(generators) != n_rows:
        raise MemprobeError(f"continue_tokens got {len(generators)} generators for {n_rows} prefixes: give one per row")
    return generators


def _sample(logits: torch.Tensor, generators: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """One token per row by inverse-CDF sampling: row i uses the i-th uniform draw of its generator."""
    probs = torch.softmax(logits, dim=-1).cpu()
    if isinstance(generators, list):
        u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
    else:
        u = torch.rand(len(probs), generator=generators, dtype=torch.float64)
    cdf = probs.cumsum(-1)
    picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    return picked.clamp_max(probs.shape[-1] - 1)


def sample_generators(seed: int, keys: Sequence[str | int]) -> list[torch.Generator]:
    """One generator per key, seeded from (seed, key): a row's samples are the same in any batch."""
    out = []
    for key in keys:
        digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
        out.append(torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1)))
    return out


def _window_offsets(n_tokens: int, k: int, m: int, offsets: Sequence[int] | None, stride: int | None) -> list[int]:
    if stride is not None:
        return list(range(0, max(n_tokens - k - m, 0) + 1, stride))
    return list(offsets) if offsets is not None else [0]


def sequence_labels(
    model: torch.nn.Module,
    docs_token_ids: Sequence[Sequence[int]],
    *,
    prefix_len: int = 32,
    suffix_len: int = 32,
    offsets: Sequence[int] | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> list[SequenceLabels]:
    """Greedy-extraction labels for windows of each document, in document then offset order.

    Windows start at `offsets` (default [0]) or, with `stride`, at 0, stride, 2*stride, ... as long
    as prefix and suffix fit. Windows that do not fit come back with `skipped` set.
    """
    k, m = prefix_len, suffix_len
    if k < 1 or m < 1:
        raise MemprobeError(f"prefix_len and suffix_len must be >= 1, not {k} and {m}")
    if offsets is not None and stride is not None:
        raise MemprobeError("give either offsets or stride, not both")
    if stride is not None and stride < 1:
        raise MemprobeError(f"stride must be >= 1, not {stride}")
    if offsets is not None and any(o < 0 for o in offsets):
        raise MemprobeError(f"offsets must be >= 0, got {list(offsets)}")
    _check_batch_size(batch_size)
    _check_docs(docs_token_ids)
    results: list[SequenceLabels] = []
    runnable: list[int] = []  # indices into results of windows that fit
    for d, ids in enumerate(docs_token_ids):
        for off in _window_offsets(len(ids), k, m, offsets, stride):
            if off + k + m > len(ids):
                reason = f"document has {len(ids)} tokens; offset {off} + prefix {k} + suffix {m} needs {off + k + m}"
                results.append(SequenceLabels(d, off, k, m, skipped=reason))
            else:
                runnable.append(len(results))
                results.append(SequenceLabels(d, off, k, m))
    batches = [runnable[s : s + batch_size] for s in range(0, len(runnable), batch_size)]
    for batch in tqdm(batches, desc="greedy extraction", disable=not progress):
        windows = [np.asarray(docs_token_ids[results[j].doc_index], dtype=np.int64)[results[j].offset :] for j in batch]
        prefixes = torch.as_tensor(np.stack([w[:k] for w in windows]))
        conts = continue_tokens(model, prefixes, m).numpy()
        for j, w, cont in zip(batch, windows, conts, strict=True):
            results[j] = _score(results[j], cont, w[k : k + m])
    return results


def _score(window: SequenceLabels, continuation: np.ndarray, suffix: np.ndarray) -> SequenceLabels:
    match = continuation == suffix
    first_miss = int(np.argmin(match)) if not match.all() else len(match)
    return SequenceLabels(
        window.doc_index, window.offset, window.prefix_len, window.suffix_len,
        continuation=continuation.astype(np.int64),
        k_extractable=bool(match.all()),
        memorization_score=float(match.mean()),
        exact_match_len=first_miss,
        levenshtein=int(Levenshtein.distance(continuation.tolist(), suffix.tolist())),
    )


def _as_list(values: np.ndarray) -> list[Any]:
    """JSON-ready list: NaN becomes None (undefined), numpy scalars become Python ones."""
    if values.dtype == np.bool_:
        return [bool(v) for v in values]
    return [None if math.isnan(v) else float(v) for v in values]


def _span_tokens(loaded: Any, text: str, span: Sequence[int]) -> list[int]:
    """Character span -> token range, by counting the tokens of the text before each end."""
    return [len(loaded.encode(text[: int(span[0])])), len(loaded.encode(text[: int(span[1])]))]


def label_documents(
    loaded: Any,
    docs: Sequence[dict[str, Any]],
    *,
    min_prob: float = 0.5,
    prefix_len: int = 32,
    suffix_len: int = 32,
    batch_size: int = 8,
    generate_batch_size: int = 32,
    store: Any = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Label `{"id", "text", ...}` documents with `loaded` (a LoadedModel); JSONL-ready records.

    `generate_batch_size` windows are extended together by greedy decoding: each decoding step is
    dominated by per-call overhead and the LM head, so 32 at a time is 2.6x faster than 8 on a CPU.

    Each record keeps the document's fields and adds token ids, per-token arrays (null where
    undefined), the sequence labels of the window at offset 0, and the labeller's settings. A
    document with a character `span` (e.g. the second copy in a repetition document) also gets the
    span's token range and its memorized fraction.

    With `store` (an ActivationStore captured from these documents with `token_stats=True`), the
    teacher-forced labels are read from its columns, i.e. from the capture's own forward pass,
    instead of a second forward; only the greedy extraction decodes.
    """
    encoded = encode_documents(loaded, docs)
    if store is None:
        tokens = token_labels(loaded.model, encoded, min_prob=min_prob, batch_size=batch_size, progress=progress)
    else:
        tokens = token_labels_from_store(store, [d["id"] for d in docs], min_prob=min_prob)
        for doc, ids, tok in zip(docs, encoded, tokens, strict=True):
            if tok.token_ids.tolist() != ids:
                raise MemprobeError(
                    f"store {store.path} holds other tokens for document {doc['id']!r} than {loaded.name} "
                    "gives its text: capture these texts with this model, or label without the store"
                )
    seqs = sequence_labels(
        loaded.model, encoded, prefix_len=prefix_len, suffix_len=suffix_len, batch_size=generate_batch_size,
        progress=progress,
    )
    settings = {"model": loaded.name, "min_prob": min_prob, "prefix_len": prefix_len, "suffix_len": suffix_len}
    records = []
    for doc, tok, seq in zip(docs, tokens, seqs, strict=True):
        frac = tok.memorized_fraction
        record = {
            **doc,
            "n_tokens": len(tok.token_ids),
            "token_ids": tok.token_ids.tolist(),
            "target_prob": _as_list(tok.target_prob),
            "correct": _as_list(tok.correct),
            "memorized": _as_list(tok.memorized),
            "loss": _as_list(tok.loss),
            "entropy": _as_list(tok.entropy),
            "top_prob": _as_list(tok.top_prob),
            "memorized_fraction": None if math.isnan(frac) else frac,
            "k_extractable": seq.k_extractable,
            "memorization_score": seq.memorization_score,
            "exact_match_len": seq.exact_match_len,
            "levenshtein": seq.levenshtein,
            "continuation_ids": None if seq.continuation is None else seq.continuation.tolist(),
            "continuation_text": None if seq.continuation is None else loaded.decode(seq.continuation.tolist()),
            "sequence_skipped": seq.skipped,
            "labeler": settings,
        }
        if doc.get("span") is not None:
            lo, hi = _span_tokens(loaded, doc["text"], doc["span"])
            record["span_tokens"] = [lo, hi]
            inside = tok.memorized[max(lo, 1) : hi]
            record["span_memorized_fraction"] = float(inside.mean()) if len(inside) else None
        records.append(record)
    return records


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per kind (sorted), then "all": docs, predicted tokens, memorized-token rate,
    k-extractable rate and mean 32/32 score over the documents long enough to score."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[str(r.get("kind") or "unknown")].append(r)
        groups["all"].append(r)

    def row(kind: str, rs: list[dict[str, Any]]) -> dict[str, Any]:
        predicted = [m for r in rs for m in r["memorized"][1:]]
        scored = [r for r in rs if r["k_extractable"] is not None]
        return {
            "kind": kind,
            "docs": len(rs),
            "tokens": len(predicted),
            "memorized_token_rate": float(np.mean(predicted)) if predicted else None,
            "k_extractable_rate": float(np.mean([r["k_extractable"] for r in scored])) if scored else None,
            "mean_memorization_score": float(np.mean([r["memorization_score"] for r in scored])) if scored else None,
            "sequence_scored": len(scored),
        }

    kinds = sorted(k for k in groups if k != "all")
    return [row(k, groups[k]) for k in [*kinds, "all"]]
