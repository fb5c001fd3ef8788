"""The token-level memorization dataset: which tokens are positives, hard negatives or repetition.

Why hard negatives: a memorized token is predicted correctly and confidently, but so is much ordinary
text ("Thank you for your ...", `if __name__ == ...`). A detector must separate memorization from
predictability, so every token kept here is correct and confident (`memorized` in memprobe.labels);
what differs is the document it sits in:

- positive ("memorized"): a confident-correct token in a *memorized document*, a candidate text
  (real text the model may have seen) whose teacher-forced memorized fraction is >= min_doc_fraction;
- hard negative ("control"): a confident-correct token in a control document (text the model sampled
  itself, newly written prose, formulaic phrasing, code idioms, perturbed famous texts, fake PII);
- "repetition": a confident-correct token in the second copy of a passage repeated within the
  context: predictable by copying, not from training. Kept apart so an analysis can report it.

Candidate documents below the threshold are left out: their confident tokens are neither clearly
memorized nor clearly not. Splits are by document family (`split_group`), never by token, so a text
and its perturbed copy always fall on the same side.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from memprobe.errors import MemprobeError

MEMORIZED, CONTROL, REPETITION = "memorized", "control", "repetition"
BASELINES = ("target_prob", "neg_loss", "neg_entropy", "top_prob")


@dataclass(frozen=True)
class TokenSet:
    """Selected tokens, one entry per token; every array has the same length."""

    doc_id: np.ndarray  # str
    position: np.ndarray  # int64: index of the token in its document (>= 1)
    token_id: np.ndarray  # int64
    category: np.ndarray  # str: MEMORIZED | CONTROL | REPETITION
    group: np.ndarray  # str: split_group (document family)
    kind: np.ndarray  # str: document kind (licence, model-sample, ...)
    genre: np.ndarray  # str
    target_prob: np.ndarray  # float64, from the labeller
    loss: np.ndarray
    entropy: np.ndarray
    top_prob: np.ndarray

    def __len__(self) -> int:
        return len(self.doc_id)

    @property
    def label(self) -> np.ndarray:
        """1 for memorized tokens, 0 for everything else (controls and repetition)."""
        return (self.category == MEMORIZED).astype(np.int64)

    def subset(self, mask: np.ndarray) -> TokenSet:
        return TokenSet(**{f.name: getattr(self, f.name)[mask] for f in fields(self)})

    def baselines(self) -> dict[str, np.ndarray]:
        """Output-only scores, oriented so that higher means "more likely memorized"."""
        return {"target_prob": self.target_prob, "neg_loss": -self.loss, "neg_entropy": -self.entropy,
                "top_prob": self.top_prob}

    def counts(self) -> dict[str, Any]:
        """Tokens and documents per category, and tokens per (category, kind): for result files."""
        out: dict[str, Any] = {}
        for cat in (MEMORIZED, CONTROL, REPETITION):
            sel = self.category == cat
            out[cat] = {"tokens": int(sel.sum()), "documents": len(set(self.doc_id[sel])),
                        "by_kind": dict(sorted(Counter(self.kind[sel].tolist()).items()))}
        return out

    def store_rows(self, store: Any, offset: int = -1) -> np.ndarray:
        """Row of each token's feature in an ActivationStore over the same documents.

        offset -1 (the default) reads the activation at the position that *predicts* the token, so
        a probe sees only what the model knew before the token; 0 reads the token's own position.
        """
        return self.store_doc_starts(store) + self.position + offset

    def store_doc_starts(self, store: Any) -> np.ndarray:
        """First store row of each token's document: where a windowed feature must stop looking back."""
        starts = {doc: store.doc_rows(doc).start for doc in dict.fromkeys(self.doc_id.tolist())}
        return np.array([starts[d] for d in self.doc_id.tolist()], dtype=np.int64)


def is_memorized_document(record: dict[str, Any], min_doc_fraction: float = 0.5) -> bool:
    """A candidate text whose teacher-forced memorized-token fraction reaches `min_doc_fraction`."""
    frac = record.get("memorized_fraction")
    return record.get("role") == "candidate" and frac is not None and frac >= min_doc_fraction


def _category(record: dict[str, Any], min_doc_fraction: float) -> str | None:
    if record.get("kind") == "repetition":
        return REPETITION
    if record.get("role") == "control":
        return CONTROL
    if record.get("role") == "candidate":
        return MEMORIZED if is_memorized_document(record, min_doc_fraction) else None
    raise MemprobeError(
        f"document {record.get('id')!r} has role {record.get('role')!r}: every document needs role "
        "'candidate' (real text the model may have seen) or 'control' (text it has not memorized)"
    )


def build_token_set(records: Sequence[dict[str, Any]], *, min_doc_fraction: float = 0.5) -> TokenSet:
    """Select positive, hard-negative and repetition tokens from `memprobe.labels.label_documents` records.

    Only confident-correct tokens (`memorized` in the records) are kept; in repetition documents only
    those inside the second copy (`span_tokens`).
    """
    cols: dict[str, list] = {f.name: [] for f in fields(TokenSet)}
    for r in records:
        category = _category(r, min_doc_fraction)
        if category is None:
            continue
        keep = np.asarray(r["memorized"], dtype=bool)
        keep[0] = False
        if category == REPETITION:
            if r.get("span_tokens") is None:
                raise MemprobeError(f"repetition document {r['id']!r} has no span_tokens: label it with "
                                    "memprobe.labels.label_documents, which adds them for documents with a span")
            lo, hi = r["span_tokens"]
            inside = np.zeros_like(keep)
            inside[lo:hi] = True
            keep &= inside
        positions = np.flatnonzero(keep)
        n = len(positions)
        cols["doc_id"] += [r["id"]] * n
        cols["position"] += positions.tolist()
        cols["token_id"] += np.asarray(r["token_ids"])[positions].tolist()
        cols["category"] += [category] * n
        cols["group"] += [str(r.get("split_group") or r["id"])] * n
        cols["kind"] += [str(r.get("kind") or "unknown")] * n
        cols["genre"] += [str(r.get("genre") or "unknown")] * n
        for name in ("target_prob", "loss", "entropy", "top_prob"):
            cols[name] += np.asarray(r[name], dtype=np.float64)[positions].tolist()
    dtypes = {"position": np.int64, "token_id": np.int64, "target_prob": np.float64, "loss": np.float64,
              "entropy": np.float64, "top_prob": np.float64}
    return TokenSet(**{k: np.array(v, dtype=dtypes.get(k, object)).astype(dtypes.get(k, str)) for k, v in cols.items()})


def group_folds(groups: np.ndarray, labels: np.ndarray, n_folds: int = 5, seed: int = 0) -> np.ndarray:
    """Fold index per row: whole groups go to one fold, groups with positives spread evenly first.

    Stratifying by "has any positive" keeps positives in every fold even when few documents are
    memorized; within each stratum groups are dealt round-robin in a seeded random order.
    """
    groups, labels = np.asarray(groups), np.asarray(labels)
    if groups.shape != labels.shape:
        raise MemprobeError(f"groups ({groups.size}) and labels ({labels.size}) must have the same length")
    unique = sorted(set(groups.tolist()))
    positive = {g for g in set(groups[labels == 1].tolist())}
    if len(positive) < n_folds:
        raise MemprobeError(f"only {len(positive)} document groups hold positives, fewer than {n_folds} folds: "
                            "use fewer folds or more memorized documents")
    rng = np.random.default_rng(seed)
    fold_of: dict[str, int] = {}
    start = 0
    for stratum in ([g for g in unique if g in positive], [g for g in unique if g not in positive]):
        for i, g in enumerate(rng.permutation(len(stratum))):
            fold_of[stratum[g]] = (start + i) % n_folds
        start = (start + len(stratum)) % n_folds
    return np.array([fold_of[g] for g in groups.tolist()], dtype=np.int64)


def genre_split(tokens: TokenSet, train_genres: Sequence[str], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) masks for cross-genre transfer: positives by genre, negatives by group.

    Positives of `train_genres` train, all other positives test; a family's controls (e.g. the
    perturbed copy of a memorized text) follow its positives, and families without positives are
    split in half at random, so both sides have hard negatives and no family is shared.
    """
    pos = tokens.category == MEMORIZED
    in_train_genre = np.isin(tokens.genre, list(train_genres))
    train_groups = set(tokens.group[pos & in_train_genre].tolist())
    test_groups = set(tokens.group[pos & ~in_train_genre].tolist())
    if train_groups & test_groups:
        raise MemprobeError(f"document families with memorized texts of both sides' genres: "
                            f"{sorted(train_groups & test_groups)[:5]}; pick train genres that keep families whole")
    free = sorted(set(tokens.group.tolist()) - train_groups - test_groups)  # families without positives
    rng = np.random.default_rng(seed)
    train_groups |= {free[i] for i in rng.permutation(len(free))[: len(free) // 2]}
    train = np.isin(tokens.group, list(train_groups))
    return train, ~train
