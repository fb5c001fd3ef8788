"""Membership-inference scores per text, all from one forward pass per model per batch.

Why these five: they are MIMIR's reference-free attacks plus its reference attack, and every one of
them is a function of the same per-token statistics (`memprobe.token_stats.next_token_stats`), so a
batch costs one forward of the target (and one of the reference). Convention: a HIGHER score means
"more likely a member" (MIMIR reports the opposite sign for loss-like scores):

- `loss` = -(mean token NLL);
- `zlib` = -(mean token NLL) / (zlib-compressed length of the UTF-8 text in bytes): MIMIR's
  `loss / zlib_entropy` with our sign;
- `min_k` = mean of the lowest k% token log-probs (at least one token), Shi et al. 2024;
- `min_k_plus_plus` = mean of the lowest k% of (log p(x_t) - mu_t) / sigma_t, where mu_t and sigma_t
  are the mean and std of log p(z) for z ~ p(.|x_<t) (Zhang et al. 2024);
- `ref` = NLL_reference - NLL_target (mean token NLL each); the base model is the natural reference
  for a fine-tuned one.

MIMIR's neighbourhood attack is left out: it needs a mask-filling model, and none ships here.

A reference model must tokenize every text into the same ids as the target (same vocabulary size
and same ids for each text): the per-token comparison is only meaningful then, so another tokenizer
is refused rather than aligned approximately.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from memprobe.errors import MemprobeError
from memprobe.models import LoadedModel
from memprobe.token_stats import next_token_stats

ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus", "ref")
MIN_SCORED_TOKENS = 5
SIGMA_FLOOR = 1e-6  # a near-deterministic prediction has sigma ~ 0; min-k%++ divides by it


def _lowest_mean(values: torch.Tensor, k: float) -> float:
    n = max(1, int(values.numel() * k))
    return float(torch.topk(values.double(), n, largest=False).values.mean())


def scores_from_stats(
    target_logprob: torch.Tensor, entropy: torch.Tensor, logprob_std: torch.Tensor, text: str, k: float
) -> dict[str, float]:
    """The reference-free scores of one text from its per-token statistics (1-D, scored tokens only)."""
    nll = -float(target_logprob.double().mean())
    normalised = (target_logprob + entropy) / logprob_std.clamp_min(SIGMA_FLOOR)  # mu = -entropy
    return {
        "loss": -nll,
        "zlib": -nll / len(zlib.compress(text.encode("utf-8"))),
        "min_k": _lowest_mean(target_logprob, k),
        "min_k_plus_plus": _lowest_mean(normalised, k),
    }


def check_same_tokenizer(target: LoadedModel, reference: LoadedModel, encoded: Sequence[Sequence[int]],
                         texts: Sequence[str], ids: Sequence[str]) -> None:
    """Refuse a reference whose tokenizer differs from the target's on these texts."""
    if len(reference.tokenizer) != len(target.tokenizer):
        raise MemprobeError(
            f"reference model {reference.name!r} has a tokenizer of {len(reference.tokenizer)} tokens, the "
            f"target {target.name!r} one of {len(target.tokenizer)}: the ref attack compares per-token NLLs, "
            "so the reference must share the target's tokenizer (use the target's base model)"
        )
    for doc_id, text, ids_target in zip(ids, texts, encoded, strict=True):
        if reference.encode(text) != list(ids_target):
            raise MemprobeError(
                f"reference model {reference.name!r} tokenizes text {doc_id!r} differently from the target "
                f"{target.name!r}: the ref attack needs the same tokenizer (use the target's base model)"
            )


def _encode_all(loaded: LoadedModel, docs: Sequence[dict[str, Any]]) -> list[list[int]]:
    """memprobe's one tokenisation (memprobe.documents), plus the attacks' floor on scored tokens."""
    from memprobe.documents import encode_documents

    encoded = encode_documents(loaded, docs)
    for doc, ids in zip(docs, encoded, strict=True):
        if len(ids) - 1 < MIN_SCORED_TOKENS:
            raise MemprobeError(
                f"text {doc['id']!r} has {max(len(ids) - 1, 0)} scored tokens, fewer than {MIN_SCORED_TOKENS}: "
                "membership scores of so few tokens are noise; drop it or give a longer text"
            )
    return encoded


def _batch_stats(model: torch.nn.Module, batch: list[list[int]]) -> list[tuple[torch.Tensor, ...]]:
    """One forward of a right-padded batch; per text (target_logprob, entropy, logprob_std)."""
    device = next(model.parameters()).device
    width = max(len(ids) for ids in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, doc in enumerate(batch):
        ids[row, : len(doc)] = torch.as_tensor(doc)
        mask[row, : len(doc)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    stats = next_token_stats(logits[:, :-1], ids[:, 1:])
    return [(stats.target_logprob[r, : len(d) - 1].cpu(), stats.entropy[r, : len(d) - 1].cpu(),
             stats.logprob_std[r, : len(d) - 1].cpu()) for r, d in enumerate(batch)]


@torch.inference_mode()
def score_texts(
    target: LoadedModel,
    docs: Sequence[dict[str, Any]],
    *,
    reference: LoadedModel | None = None,
    reference_loss: Mapping[str, float] | None = None,
    k: float = 0.2,
    batch_size: int = 8,
) -> list[dict[str, Any]]:
    """`[{"id", "scores": {attack: value}}]` in input order; `ref` only with a reference model, or with
    `reference_loss` (id -> the reference's own `loss` score of that text, e.g. from an earlier
    `score_texts(reference, docs)`): a study that scores many targets against one reference reads the
    reference once, and `ref` comes out the same."""
    if not 0.0 < k <= 1.0:
        raise MemprobeError(f"k must be a fraction in (0, 1], not {k} (0.2 means the lowest 20% of tokens)")
    if batch_size < 1:
        raise MemprobeError(f"batch_size must be >= 1, not {batch_size}")
    encoded = _encode_all(target, docs)
    if reference is not None and reference_loss is not None:
        raise MemprobeError("give a reference model or its precomputed reference_loss, not both")
    missing = [d["id"] for d in docs if reference_loss is not None and d["id"] not in reference_loss]
    if missing:
        raise MemprobeError(f"reference_loss has no score for {missing[:3]}: score these texts with the reference")
    if reference is not None:
        check_same_tokenizer(target, reference, encoded, [d["text"] for d in docs], [d["id"] for d in docs])
    order = sorted(range(len(docs)), key=lambda i: -len(encoded[i]))
    results: list[dict[str, Any] | None] = [None] * len(docs)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = [encoded[i] for i in rows]
        target_stats = _batch_stats(target.model, batch)
        ref_stats = _batch_stats(reference.model, batch) if reference is not None else None
        for j, i in enumerate(rows):
            scores = scores_from_stats(*target_stats[j], docs[i]["text"], k)
            if ref_stats is not None:
                scores["ref"] = -float(ref_stats[j][0].double().mean()) + scores["loss"]
            elif reference_loss is not None:
                scores["ref"] = scores["loss"] - float(reference_loss[docs[i]["id"]])
            if not all(math.isfinite(v) for v in scores.values()):
                raise MemprobeError(f"text {docs[i]['id']!r} got a non-finite score: the model's logits overflow")
            results[i] = {"id": docs[i]["id"], "scores": scores}
    return results  # type: ignore[return-value]
