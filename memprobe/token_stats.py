"""Every per-token quantity read off the logits of one teacher-forced forward pass.

Why one module: labels (greedy match, target probability, loss, entropy), membership-inference
statistics (log-probability, and the mean and spread of log-probabilities under the model's own
next-token distribution, which min-k%++ needs) and capture all come from the same forward pass, so
they are computed here once, in one place, from the logits of that pass.

Row t of `logits` predicts token t+1. Results are per predicted token: index t describes
`targets[t]` (the caller pads index 0 of a document, which has no prediction).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

# Positions per log-softmax chunk: bounds the float32 (chunk, vocab) temporaries (49k vocab: ~100 MB).
CHUNK = 512


@dataclass(frozen=True)
class NextTokenStats:
    """Per predicted token; tensors of shape (..., T) in float32 (bool for `correct`)."""

    target_logprob: torch.Tensor  # log p(target)
    correct: torch.Tensor  # greedy argmax == target (ties: lowest id)
    top_logprob: torch.Tensor  # log p(argmax): the model's confidence
    entropy: torch.Tensor  # H(p) in nats; the mean log-prob under p is -entropy
    logprob_std: torch.Tensor  # std of log p(z) for z ~ p (min-k%++'s sigma)


# The field names, which are also the per-token columns of a capture with token_stats=True.
STAT_COLUMNS = tuple(f.name for f in fields(NextTokenStats))


def next_token_stats(logits: torch.Tensor, targets: torch.Tensor) -> NextTokenStats:
    """Stats of `targets` (..., T) under `logits` (..., T, V), in position chunks of CHUNK."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}")
    lead = targets.shape
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1).to(logits.device)
    parts: list[tuple[torch.Tensor, ...]] = []
    for s in range(0, flat_logits.shape[0], CHUNK):
        logp = torch.log_softmax(flat_logits[s : s + CHUNK].float(), dim=-1)
        p = logp.exp()
        plogp = p * logp
        entropy = -plogp.nansum(-1)
        second = (plogp * logp).nansum(-1)  # E_p[(log p)^2]
        std = (second - entropy.square()).clamp_min(0).sqrt()
        top, argmax = logp.max(-1)
        tgt = flat_targets[s : s + CHUNK]
        parts.append((logp.gather(-1, tgt[:, None])[:, 0], argmax == tgt, top, entropy, std))
    if not parts:
        empty = torch.zeros(lead, dtype=torch.float32)
        return NextTokenStats(empty, empty.bool(), empty, empty, empty)
    cols = [torch.cat(c).reshape(lead) for c in zip(*parts, strict=True)]
    return NextTokenStats(*cols)
