"""Canary exposure (Carlini et al. 2019): how far the inserted secret ranks above every alternative.

exposure = log2|space| - log2 rank, rank = 1 + #candidates whose log-perplexity given the canary's
prefix is STRICTLY lower than the true secret's. Spaces are `digits:N` (secrets of N digits, written
in the text separated by single spaces, "7 3 9", or without separator, "739").

Exact when the space is small enough (`exact_limit`, default 10^6 candidates): the digit tree is
walked level by level with a KV cache, so each internal node costs one forward of its one or two new
tokens, batched; all 10 children of a node come from that node's single next-token distribution.
That is (10^N - 1)/9 rows of forward (111,111 for digits:6), never 10^N whole candidates.
The tree needs each digit to add its own tokens, independent of its neighbours; that is checked
with the tokenizer (on every digit at every level and a sample of whole candidates) and a tokenizer
that merges digits is refused. Above the limit, the rank comes from a skew-normal fit
(`scipy.stats.skewnorm`) to the log-perplexities of uniformly sampled candidates; `method` in the
result says which was used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

from memprobe.errors import MemprobeError
from memprobe.models import LoadedModel

EXACT_LIMIT = 10**6


@dataclass(frozen=True)
class DigitPlan:
    """Token layout of prefix + secret: prefix ids, then per digit level shared tokens + one digit token."""

    prefix_ids: list[int]
    shared: list[list[int]]  # level i: tokens every candidate has before its digit token
    digit_ids: list[list[int]]  # level i: token id of digit 0..9

    def candidate_ids(self, digits: str) -> list[int]:
        ids = list(self.prefix_ids)
        for level, d in enumerate(digits):
            ids += self.shared[level] + [self.digit_ids[level][int(d)]]
        return ids


def parse_space(space: str) -> int:
    """Number of digits of a `digits:N` space."""
    kind, _, n = str(space).partition(":")
    if kind != "digits" or not n.isdigit() or int(n) < 1:
        raise MemprobeError(f"canary space {space!r} is not supported: use 'digits:N' (N digits, e.g. digits:6)")
    return int(n)


def _layout(text: str, canary: dict[str, Any]) -> tuple[str, str, int]:
    """(prefix text, digit separator, number of digits), checked against the text."""
    secret, start = str(canary.get("secret", "")), canary.get("prefix_chars")
    n = parse_space(canary.get("space", ""))
    if len(secret) != n or not secret.isdigit():
        raise MemprobeError(f"canary secret {secret!r} is not {n} digits as its space {canary.get('space')!r} says")
    if not isinstance(start, int) or not 0 <= start <= len(text):
        raise MemprobeError(f"canary prefix_chars {start!r} is not a character index into the text")
    for sep in (" ", ""):
        if text[start : start + len(sep.join(secret))] == sep.join(secret):
            return text[:start], sep, n
    raise MemprobeError(f"the text at prefix_chars={start} is not the secret {secret!r} (spaced or not): "
                        "fix the canary's prefix_chars")


def digit_plan(loaded: LoadedModel, prefix: str, sep: str, n: int, *, seed: int = 0) -> DigitPlan:
    """Derive and verify how the tokenizer writes prefix + digits; refuse layouts the tree cannot walk."""

    def enc(digits: str) -> list[int]:
        return loaded.encode(prefix + sep.join(digits))

    whole = [enc(str(d) * n) for d in range(10)]
    prefix_ids = whole[0]
    for ids in whole[1:]:
        common = 0
        while common < min(len(ids), len(prefix_ids)) and ids[common] == prefix_ids[common]:
            common += 1
        prefix_ids = prefix_ids[:common]
    merged = MemprobeError(
        f"{loaded.name}'s tokenizer does not give each digit of the canary its own token(s) independent of "
        "its neighbours (it merges digits or the separator): the exact digit tree cannot be walked; "
        "use method='skewnorm' or a secret format the tokenizer splits per digit"
    )
    shared, digit_ids = [], []
    before = prefix_ids
    for level in range(n):
        segments = []
        for d in range(10):
            ids = enc("0" * level + str(d))
            if ids[: len(before)] != before:
                raise merged
            segments.append(ids[len(before) :])
        lengths = {len(s) for s in segments}
        heads = {tuple(s[:-1]) for s in segments}
        lasts = [s[-1] for s in segments if s]
        if len(lengths) != 1 or 0 in lengths or len(heads) != 1 or len(set(lasts)) != 10:
            raise merged
        shared.append(list(segments[0][:-1]))
        digit_ids.append(lasts)
        before = enc("0" * (level + 1))
    plan = DigitPlan(prefix_ids, shared, digit_ids)
    rng = np.random.default_rng(seed)
    sample = [str(d) * n for d in range(10)] + ["".join(map(str, rng.integers(0, 10, n))) for _ in range(64)]
    if any(enc(c) != plan.candidate_ids(c) for c in sample):
        raise merged
    return plan


def _select(cache: DynamicCache, config: Any, rows: torch.Tensor, repeats: int) -> DynamicCache:
    """A new cache holding `rows` of `cache`, each repeated `repeats` times (children of a node)."""
    new = DynamicCache(config=config)
    for i, layer in enumerate(cache.layers):
        new.update(layer.keys[rows].repeat_interleave(repeats, 0),
                   layer.values[rows].repeat_interleave(repeats, 0), i)
    return new


def _step(model: torch.nn.Module, inputs: torch.Tensor, cache: DynamicCache | None, shared: list[int],
          digit_ids: list[int]) -> tuple[torch.Tensor, DynamicCache]:
    """One forward: log p(shared tokens) summed + log p(each digit) -> (B, 10), and the grown cache."""
    out = model(input_ids=inputs, cache=cache if cache is not None else DynamicCache(config=model.config),
                use_cache=True)
    logits = out.logits[:, -(len(shared) + 1) :]
    norm = torch.logsumexp(logits, dim=-1).double()  # no (B, L, V) float64 copy: only what is read
    shared_lp = torch.zeros(inputs.shape[0], dtype=torch.float64, device=logits.device)
    for j, tok in enumerate(shared):
        shared_lp += logits[:, j, tok].double() - norm[:, j]
    digits = logits[:, -1, digit_ids].double() - norm[:, -1:]
    return (shared_lp[:, None] + digits).cpu(), out.cache


@torch.inference_mode()
def candidate_loglik_exact(loaded: LoadedModel, plan: DigitPlan, *, batch_size: int = 1024) -> torch.Tensor:
    """log p(candidate | prefix) of every candidate, indexed by its integer value (10^N, float64)."""
    model, config = loaded.model, loaded.model.config
    device = loaded.device
    n = len(plan.digit_ids)
    leaves = torch.empty(10**n, dtype=torch.float64)
    per_chunk = max(1, batch_size // 10)

    def expand(level: int, first: int, inputs: torch.Tensor, cache: DynamicCache | None,
               scores: torch.Tensor) -> None:
        child, cache = _step(model, inputs, cache, plan.shared[level], plan.digit_ids[level])
        child = (scores[:, None] + child).reshape(-1)
        if level == n - 1:
            leaves[first * 10 : first * 10 + child.numel()] = child
            return
        digit_tok = torch.tensor(plan.digit_ids[level], device=device)
        tail = torch.tensor(plan.shared[level + 1], dtype=torch.long, device=device)
        for lo in range(0, scores.numel(), per_chunk):
            rows = torch.arange(lo, min(lo + per_chunk, scores.numel()), device=device)
            kids = rows.numel() * 10
            inputs_next = torch.cat([digit_tok.repeat(rows.numel())[:, None], tail.expand(kids, -1)], dim=1)
            expand(level + 1, (first + lo) * 10, inputs_next, _select(cache, config, rows, 10),
                   child[lo * 10 : lo * 10 + kids])

    root = torch.tensor([plan.prefix_ids + plan.shared[0]], dtype=torch.long, device=device)
    expand(0, 0, root, None, torch.zeros(1, dtype=torch.float64))
    return leaves


@torch.inference_mode()
def candidate_loglik(loaded: LoadedModel, plan: DigitPlan, candidates: list[str], *,
                     batch_size: int = 256) -> np.ndarray:
    """log p(candidate | prefix) of the given candidates: the prefix cached once, then batched."""
    model, device = loaded.model, loaded.device
    head = plan.prefix_ids[:-1]
    cache = None
    if head:
        cache = model(input_ids=torch.tensor([head], device=device), use_cache=True).cache
    out = np.empty(len(candidates))
    for lo in range(0, len(candidates), batch_size):
        chunk = candidates[lo : lo + batch_size]
        ids = torch.tensor([plan.candidate_ids(c)[len(head) :] for c in chunk], device=device)
        past = _select(cache, model.config, torch.zeros(len(chunk), dtype=torch.long, device=device), 1) \
            if cache is not None else DynamicCache(config=model.config)
        logits = model(input_ids=ids, cache=past, use_cache=True).logits[:, :-1]
        logp = logits.gather(-1, ids[:, 1:, None])[..., 0].double() - torch.logsumexp(logits, -1).double()
        out[lo : lo + len(chunk)] = logp.sum(-1).cpu().numpy()
    return out


def exposure(
    loaded: LoadedModel,
    text: str,
    canary: dict[str, Any],
    *,
    method: str = "auto",
    exact_limit: int = EXACT_LIMIT,
    n_samples: int = 5000,
    seed: int = 0,
    batch_size: int = 1024,
) -> dict[str, Any]:
    """Exposure of one canary in `text`; method 'auto' is exact up to `exact_limit` candidates."""
    if method not in ("auto", "exact", "skewnorm"):
        raise MemprobeError(f"method must be 'auto', 'exact' or 'skewnorm', not {method!r}")
    prefix, sep, n = _layout(text, canary)
    size = 10**n
    chosen = method if method != "auto" else ("exact" if size <= exact_limit else "skewnorm")
    plan = digit_plan(loaded, prefix, sep, n, seed=seed)
    secret = str(canary["secret"])
    result: dict[str, Any] = {"space": canary["space"], "space_size": size, "log2_space": math.log2(size),
                              "method": chosen}
    if chosen == "exact":
        ll = candidate_loglik_exact(loaded, plan, batch_size=batch_size)
        true_ll = float(ll[int(secret)])
        rank = 1 + int((ll > true_ll).sum())
        result.update(rank=rank, exposure=math.log2(size) - math.log2(rank))
    else:
        from scipy.stats import skewnorm

        rng = np.random.default_rng(seed)
        sample = [f"{v:0{n}d}" for v in rng.integers(0, size, n_samples)]
        ll = candidate_loglik(loaded, plan, [secret, *sample], batch_size=min(batch_size, 256))
        true_ll, perplexities = ll[0], -ll[1:]
        a, loc, scale = skewnorm.fit(perplexities)
        below = float(skewnorm.cdf(-true_ll, a, loc, scale))  # share of candidates with lower perplexity
        rank = min(float(size), max(1.0, 1.0 + size * below))
        result.update(rank=rank, exposure=math.log2(size) - math.log2(rank), n_samples=n_samples, seed=seed,
                      skewnorm={"a": float(a), "loc": float(loc), "scale": float(scale)})
        if method == "auto":
            result["note"] = (f"{size} candidates > exact limit {exact_limit}: rank from a skew-normal fit "
                              f"to {n_samples} sampled candidates")
    result["secret_log_perplexity_nats"] = -float(true_ll)
    return result


def exposure_report(loaded: LoadedModel, docs: list[dict[str, Any]], **settings: Any) -> dict[str, Any]:
    """Exposure of every document with a `canary`; mean exposure per `copies` (0 = non-member canaries).

    Non-member canaries come from the same space and were never trained on: their exposure is the
    baseline a member canary's is read against (about 1.44 bits on average for a model that knows
    nothing, since E[-log2 U] = 1/ln 2 for a uniform rank).
    """
    rows = []
    for doc in docs:
        if doc.get("canary"):
            result = exposure(loaded, doc["text"], doc["canary"], **settings)
            rows.append({"id": doc["id"], "member": doc.get("member"), "copies": doc.get("copies"), **result})
    if not rows:
        raise MemprobeError("no document has a 'canary' field {secret, prefix_chars, space}: nothing to measure")
    by: dict[str, list[float]] = {}
    for row in rows:
        by.setdefault(str(row["copies"] or 0), []).append(row["exposure"])
    table = {c: {"canaries": len(v), "mean_exposure": float(np.mean(v)), "max_exposure": float(np.max(v))}
             for c, v in sorted(by.items(), key=lambda kv: int(kv[0]))}
    return {"settings": settings, "canaries": rows, "by_copies": table}
