"""The memorization token dataset: which tokens are kept, how they map to store rows, how splits group."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from memprobe.errors import MemprobeError
from memprobe.memdata import (
    CONTROL,
    MEMORIZED,
    REPETITION,
    build_token_set,
    genre_split,
    group_folds,
)


def record(doc_id: str, role: str, memorized: list[bool], *, kind: str = "x", genre: str = "g",
           group: str | None = None, span_tokens: list[int] | None = None) -> dict:
    n = len(memorized)
    probs = [None] + [0.9 if m else 0.1 for m in memorized[1:]]
    rec = {"id": doc_id, "role": role, "kind": kind, "genre": genre, "split_group": group or doc_id,
           "token_ids": list(range(100, 100 + n)), "memorized": memorized, "target_prob": probs,
           "loss": [None] + [1.0] * (n - 1), "entropy": [None] + [2.0] * (n - 1), "top_prob": probs,
           "memorized_fraction": float(np.mean(memorized[1:]))}
    if span_tokens is not None:
        rec["span_tokens"] = span_tokens
    return rec


def test_selects_positives_hard_negatives_and_repetition():
    records = [
        record("famous", "candidate", [True, True, True, False, True]),  # fraction 0.75: memorized doc
        record("obscure", "candidate", [False, True, False, False, False]),  # 0.25: left out
        record("sample", "control", [False, True, False, True, True]),
        record("rep", "control", [False, True, True, True, True, True], kind="repetition", span_tokens=[3, 6]),
    ]
    tokens = build_token_set(records, min_doc_fraction=0.5)
    got = {(d, int(p), c) for d, p, c in zip(tokens.doc_id, tokens.position, tokens.category, strict=True)}
    assert got == {("famous", 1, MEMORIZED), ("famous", 2, MEMORIZED), ("famous", 4, MEMORIZED),
                   ("sample", 1, CONTROL), ("sample", 3, CONTROL), ("sample", 4, CONTROL),
                   ("rep", 3, REPETITION), ("rep", 4, REPETITION), ("rep", 5, REPETITION)}
    assert tokens.label.tolist() == [1 if c == MEMORIZED else 0 for c in tokens.category]
    assert tokens.token_id[tokens.doc_id == "famous"].tolist() == [101, 102, 104]  # position 0 never kept
    assert np.allclose(tokens.baselines()["neg_loss"], -1.0)
    counts = tokens.counts()
    assert counts[MEMORIZED] == {"tokens": 3, "documents": 1, "by_kind": {"x": 3}}


def test_threshold_and_missing_role_and_span():
    records = [record("a", "candidate", [False, True, False])]  # fraction 0.5
    assert len(build_token_set(records, min_doc_fraction=0.5)) == 1
    assert len(build_token_set(records, min_doc_fraction=0.6)) == 0
    with pytest.raises(MemprobeError, match="role"):
        build_token_set([record("b", "unknown", [False, True])])
    with pytest.raises(MemprobeError, match="span_tokens"):
        build_token_set([record("c", "control", [False, True], kind="repetition")])


def test_store_rows_reads_the_predicting_position():
    tokens = build_token_set([record("a", "control", [False, True, True]), record("b", "control", [False, False, True])])
    store = SimpleNamespace(doc_rows=lambda d: {"a": slice(10, 13), "b": slice(0, 3)}[d])
    assert tokens.store_rows(store).tolist() == [10, 11, 1]  # token t of a -> row 10 + t - 1
    assert tokens.store_rows(store, offset=0).tolist() == [11, 12, 2]


def test_group_folds_keep_groups_whole_and_spread_positives():
    groups = np.array([f"g{i % 23}" for i in range(400)])
    labels = np.array([1 if int(g[1:]) < 8 else 0 for g in groups])
    folds = group_folds(groups, labels, n_folds=4, seed=3)
    for g in set(groups):
        assert len(set(folds[groups == g])) == 1
    for f in range(4):
        assert labels[folds == f].any() and (labels[folds == f] == 0).any()
    assert np.array_equal(folds, group_folds(groups, labels, n_folds=4, seed=3))
    assert not np.array_equal(folds, group_folds(groups, labels, n_folds=4, seed=4))
    with pytest.raises(MemprobeError, match="fewer than"):
        group_folds(groups, labels, n_folds=9)


def test_genre_split_separates_positive_genres_and_negative_groups():
    records = [record(f"lic{i}", "candidate", [True] * 4, genre="legal", group=f"lic{i}") for i in range(3)]
    records += [record(f"lit{i}", "candidate", [True] * 4, genre="literature", group=f"lit{i}") for i in range(2)]
    records += [record(f"c{i}", "control", [True] * 4, group=f"c{i}") for i in range(6)]
    records.append(record("perturbed-lit0", "control", [True] * 4, genre="literature", group="lit0"))
    tokens = build_token_set(records)
    train, test = genre_split(tokens, ["legal"], seed=0)
    assert not (train & test).any() and (train | test).all()
    assert set(tokens.genre[train & (tokens.label == 1)]) == {"legal"}
    assert set(tokens.genre[test & (tokens.label == 1)]) == {"literature"}
    assert set(tokens.group[train]).isdisjoint(tokens.group[test])
    assert (tokens.label[train] == 0).any() and (tokens.label[test] == 0).any()
    assert test[tokens.doc_id == "perturbed-lit0"].all()  # a family's control follows its memorized text
