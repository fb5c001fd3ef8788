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
# Floor for z = logit - max: exp(Z_FLOOR) is 0 and Z_FLOOR^2 is finite in float32.
Z_FLOOR = -1e15


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
    """Stats of `targets` (..., T) under `logits` (..., T, V), in position chunks of CHUNK.

    Why not log_softmax: with z = logits - max, log p = z - log sum(exp z), so every statistic
    follows from z and exp(z) held in two buffers reused across chunks (no fresh (chunk, vocab)
    temporaries per step); the spread is summed around its mean, so nothing cancels. Measured on
    (2048, 49152) float32 logits, 2 threads: 1.7x faster than the log_softmax form and 20x closer
    to a float64 reference.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}")
    lead = targets.shape
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1).to(logits.device)
    n, vocab = flat_logits.shape
    if n == 0:
        empty = torch.zeros(lead, dtype=torch.float32)
        return NextTokenStats(empty, empty.bool(), empty, empty, empty)
    rows = min(CHUNK, n)
    z_buf = torch.empty((rows, vocab), dtype=torch.float32, device=logits.device)
    e_buf = torch.empty_like(z_buf)
    parts: list[tuple[torch.Tensor, ...]] = []
    for s in range(0, n, CHUNK):
        x = flat_logits[s : s + CHUNK].float()
        z, e = z_buf[: len(x)], e_buf[: len(x)]
        top, argmax = x.max(-1)
        torch.sub(x, top[:, None], out=z)  # z = log p + log_norm
        torch.exp(z, out=e)
        total = e.sum(-1)
        log_norm = total.log()
        z.clamp_min_(Z_FLOOR)  # a -inf logit has p = 0: keep 0 * z (and 0 * z^2) at 0, not NaN
        mean_z = torch.mul(e, z).sum(-1) / total  # E_p[log p] + log_norm
        variance = z.sub_(mean_z[:, None]).square_().mul_(e).sum(-1) / total  # Var_p(log p)
        tgt = flat_targets[s : s + CHUNK]
        target_logprob = x.gather(-1, tgt[:, None])[:, 0] - top - log_norm
        parts.append((target_logprob, argmax == tgt, -log_norm, log_norm - mean_z, variance.sqrt()))
    cols = [torch.cat(c).reshape(lead) for c in zip(*parts, strict=True)]
    return NextTokenStats(*cols)
