"""Canary exposure (Carlini et al. 2019): how far the inserted secret ranks above every alternative.

exposure = log2|space| - log2 rank, rank = 1 + #candidates whose log-perplexity given the canary's
prefix is STRICTLY lower than the true secret's. Spaces are `digits:N` (secrets of N digits, written
in the text separated by single spaces, "7 3 9", or without separator, "739").

Exact when the space is small enough (`exact_limit`, default 10^6 candidates): the digit tree is
walked with a KV cache in batches of up to `batch_size` nodes (depth first over those batches, so
memory stays bounded); each internal node costs one forward row of its one or two new tokens, and all
10 children of a node come from that row's next-token distribution.
That is at most (10^N - 1)/9 rows of forward (111,111 for digits:6), never 10^N whole candidates,
and far fewer with exact pruning: a subtree whose log-prob is already below the secret's cannot
hold a candidate that outranks it, so it is never expanded (the better the secret is memorized, the
less is walked).
The tree needs each digit to add its own tokens, independent of its neighbours; that is checked
with the tokenizer (on every digit at every level and a sample of whole candidates) and a tokenizer
that merges digits is refused. Above the limit, the rank comes from a skew-normal fit
(`scipy.stats.skewnorm`) to the log-perplexities of uniformly sampled candidates; `method` in the
result says which was used.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

from memprobe.errors import MemprobeError
from memprobe.models import LoadedModel

EXACT_LIMIT = 10**6
PRUNE_MARGIN = 1e-3  # nats


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


def _select(cache: DynamicCache, config: Any, rows: torch.Tensor) -> DynamicCache:
    """A new cache holding `rows` of `cache` (an index may repeat: the children of one node)."""
    new = DynamicCache(config=config)
    for i, layer in enumerate(cache.layers):
        new.update(layer.keys[rows], layer.values[rows], i)
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


Keep = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.inference_mode()
def walk_tree(loaded: LoadedModel, plan: DigitPlan, keep: Keep, *,
              batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(values, log-probs, forward rows) of the leaves reached when only nodes `keep` allows expand.

    `keep(level, child_values, child_logprobs)` gives a boolean mask of the children to go on with
    (at the last level: the leaves to return). Values are the candidates' integers.
    """
    model, config, device = loaded.model, loaded.model.config, loaded.device
    n = len(plan.digit_ids)
    leaf_values: list[torch.Tensor] = []
    leaf_ll: list[torch.Tensor] = []
    rows = [0]

    def expand(level: int, inputs: torch.Tensor, cache: DynamicCache | None, scores: torch.Tensor,
               values: torch.Tensor) -> None:
        rows[0] += inputs.shape[0]
        child, cache = _step(model, inputs, cache, plan.shared[level], plan.digit_ids[level])
        child = (scores[:, None] + child).reshape(-1)
        child_values = (values[:, None] * 10 + torch.arange(10)).reshape(-1)
        kept = torch.nonzero(keep(level, child_values, child))[:, 0]
        if level == n - 1:
            leaf_values.append(child_values[kept])
            leaf_ll.append(child[kept])
            return
        digit_tok = torch.tensor(plan.digit_ids[level])
        tail = torch.tensor(plan.shared[level + 1], dtype=torch.long)
        for lo in range(0, kept.numel(), batch_size):
            idx = kept[lo : lo + batch_size]
            inputs_next = torch.cat([digit_tok[idx % 10][:, None], tail.expand(idx.numel(), -1)], dim=1)
            expand(level + 1, inputs_next.to(device), _select(cache, config, (idx // 10).to(device)),
                   child[idx], child_values[idx])

    root = torch.tensor([plan.prefix_ids + plan.shared[0]], dtype=torch.long, device=device)
    expand(0, root, None, torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.long))
    return torch.cat(leaf_values), torch.cat(leaf_ll), rows[0]


def candidate_loglik(loaded: LoadedModel, plan: DigitPlan, candidates: list[str], *,
                     batch_size: int = 1024) -> tuple[np.ndarray, int]:
    """(log p(candidate | prefix) per candidate, forward rows): the walk restricted to their prefixes,
    so candidates that share leading digits share those forwards."""
    n = len(plan.digit_ids)
    wanted = torch.tensor([int(c) for c in candidates], dtype=torch.long)
    prefixes = [torch.unique(wanted // 10 ** (n - 1 - level)) for level in range(n)]
    values, ll, rows = walk_tree(loaded, plan, lambda level, v, _: torch.isin(v, prefixes[level]),
                                 batch_size=batch_size)
    order = torch.argsort(values)
    at = torch.searchsorted(values[order], wanted)
    return ll[order][at].numpy(), rows


def exact_rank(loaded: LoadedModel, plan: DigitPlan, secret: str, *, prune: bool = True,
               batch_size: int = 1024) -> dict[str, Any]:
    """Rank of `secret` among all 10^N candidates, walking the digit tree.

    Pruning is exact: a node's log-prob bounds every descendant's from above (log-probs are <= 0),
    so a subtree whose node is already below the secret's log-prob (minus PRUNE_MARGIN, which
    absorbs float32 differences between batch compositions) cannot hold a candidate that beats it.
    The secret's own value is read from the same walk, so it never outranks itself.
    """
    threshold, rows = -math.inf, 0
    if prune:
        secret_ll, rows = candidate_loglik(loaded, plan, [secret], batch_size=batch_size)
        threshold = float(secret_ll[0]) - PRUNE_MARGIN
    values, ll, walked = walk_tree(loaded, plan, lambda level, v, lp: lp > threshold, batch_size=batch_size)
    where = torch.nonzero(values == int(secret))[:, 0]
    if where.numel() == 0:  # only if batch compositions changed a log-prob by more than the margin
        return exact_rank(loaded, plan, secret, prune=False, batch_size=batch_size)
    true_ll = float(ll[where[0]])
    return {"rank": 1 + int((ll > true_ll).sum()), "true_ll": true_ll, "rows_forwarded": rows + walked,
            "pruned": prune}


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
    prune: bool = True,
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
        walk = exact_rank(loaded, plan, secret, prune=prune, batch_size=batch_size)
        true_ll, rank = walk["true_ll"], walk["rank"]
        result.update(rank=rank, exposure=math.log2(size) - math.log2(rank), rows_forwarded=walk["rows_forwarded"],
                      pruned=prune)
    else:
        from scipy.stats import skewnorm

        rng = np.random.default_rng(seed)
        sample = [f"{v:0{n}d}" for v in rng.integers(0, size, n_samples)]
        ll, rows = candidate_loglik(loaded, plan, [secret, *sample], batch_size=batch_size)
        true_ll, perplexities = ll[0], -ll[1:]
        result["rows_forwarded"] = rows
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
