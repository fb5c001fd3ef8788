"""Dataset-level membership test (MemHunter's question): was the model trained on this candidate set?

One MIA score per document, candidates against documents known to be unseen, and a one-sided test
that candidates score higher: Mann-Whitney U (scipy) and a permutation test of the mean difference
(documents are exchangeable under the null, so labels are shuffled at document level). `power`
estimates how often the test rejects at alpha when the candidates really are members, per number of
candidates; `false_positive_rate` how often it rejects between two disjoint non-member sets, which
must stay near alpha. Power draws documents from the pools, with replacement only when a pool is
smaller than the draw (the result says so: the pool then stands for the population, which overstates
power); the false-positive check never draws with replacement, since repeated documents would make
two samples of one distribution look different.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import mannwhitneyu

from memprobe.errors import MemprobeError

SIZES = (10, 20, 50, 100, 200)


def _check(candidates: np.ndarray, unseen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(candidates, dtype=float).ravel(), np.asarray(unseen, dtype=float).ravel()
    if a.size < 2 or b.size < 2:
        raise MemprobeError(f"need at least 2 candidate and 2 unseen scores, got {a.size} and {b.size}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise MemprobeError("scores hold NaN or infinite values: drop or fix those documents first")
    return a, b


def permutation_pvalue(candidates: np.ndarray, unseen: np.ndarray, *, n_permutations: int = 1000,
                       seed: int = 0) -> float:
    """One-sided p of mean(candidates) - mean(unseen) under document-level label shuffles."""
    a, b = _check(candidates, unseen)
    if n_permutations < 1000:
        raise MemprobeError(f"n_permutations must be at least 1000 for a usable p-value, not {n_permutations}")
    pooled = np.concatenate([a, b])
    observed = a.mean() - b.mean()
    rng = np.random.default_rng(seed)
    perms = rng.permuted(np.broadcast_to(pooled, (n_permutations, pooled.size)), axis=1)
    diffs = perms[:, : a.size].mean(1) - perms[:, a.size :].mean(1)
    return float((1 + np.sum(diffs >= observed - 1e-12)) / (1 + n_permutations))


def dataset_test(candidates: Sequence[float], unseen: Sequence[float], *, n_permutations: int = 1000,
                 seed: int = 0, alpha: float = 0.05) -> dict[str, Any]:
    """Both one-sided tests (higher score = member) and whether each rejects at `alpha`."""
    a, b = _check(np.asarray(candidates), np.asarray(unseen))
    p_mw = float(mannwhitneyu(a, b, alternative="greater").pvalue)
    p_perm = permutation_pvalue(a, b, n_permutations=n_permutations, seed=seed)
    return {"n_candidates": a.size, "n_unseen": b.size, "mean_difference": float(a.mean() - b.mean()),
            "mann_whitney_p": p_mw, "permutation_p": p_perm, "n_permutations": n_permutations,
            "alpha": alpha, "rejects_mann_whitney": p_mw < alpha, "rejects_permutation": p_perm < alpha,
            "seed": seed}


def _draw(rng: np.random.Generator, pool: np.ndarray, n: int) -> np.ndarray:
    return rng.choice(pool, n, replace=n > pool.size)


def _pvalue(test: str, a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> float:
    if test == "mann_whitney":
        return float(mannwhitneyu(a, b, alternative="greater").pvalue)
    if test == "permutation":
        return permutation_pvalue(a, b, seed=int(rng.integers(2**63)))
    raise MemprobeError(f"test must be 'mann_whitney' or 'permutation', not {test!r}")


def power(members: Sequence[float], nonmembers: Sequence[float], *, sizes: Sequence[int] = SIZES,
          n_resamples: int = 200, alpha: float = 0.05, seed: int = 0, test: str = "mann_whitney") -> dict[str, Any]:
    """Share of resamples (n members vs n non-members) where `test` rejects at alpha, per n."""
    m, u = _check(np.asarray(members), np.asarray(nonmembers))
    rng = np.random.default_rng(seed)
    rows = {}
    for n in sizes:
        rejects = [_pvalue(test, _draw(rng, m, n), _draw(rng, u, n), rng) < alpha for _ in range(n_resamples)]
        rows[str(n)] = {"power": float(np.mean(rejects)), "with_replacement": n > min(m.size, u.size)}
    return {"alpha": alpha, "n_resamples": n_resamples, "seed": seed, "test": test, "by_size": rows}


def false_positive_rate(nonmembers: Sequence[float], *, n: int = 20, n_resamples: int = 200,
                        alpha: float = 0.05, seed: int = 0, test: str = "mann_whitney") -> dict[str, Any]:
    """Share of resamples where `test` tells two disjoint non-member sets (drawn fresh) apart."""
    u = np.asarray(nonmembers, dtype=float)
    if u.size < 4:
        raise MemprobeError(f"need at least 4 non-member scores to split into two sets, got {u.size}")
    if n_resamples < 200:
        raise MemprobeError(f"n_resamples must be at least 200 to check the level, not {n_resamples}")
    if 2 * n > u.size:
        raise MemprobeError(f"two disjoint sets of {n} need {2 * n} non-members, only {u.size} given: lower n "
                            "(drawing with replacement from a small pool would inflate the false-positive rate)")
    rng = np.random.default_rng(seed)
    rejects = []
    for _ in range(n_resamples):
        shuffled = rng.permutation(u)
        rejects.append(_pvalue(test, shuffled[:n], shuffled[n : 2 * n], rng) < alpha)
    return {"alpha": alpha, "n": n, "n_resamples": n_resamples, "seed": seed, "test": test,
            "false_positive_rate": float(np.mean(rejects))}
