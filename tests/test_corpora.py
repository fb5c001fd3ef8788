"""Bundled corpus (determinism, kinds, ids, split groups) and JSONL reading/writing."""

from __future__ import annotations

import json
import random
import warnings

import numpy as np
import pytest

from memprobe.corpora import bundled_corpus, passages, perturb
from memprobe.errors import MemprobeError
from memprobe.jsonl import read_jsonl, write_jsonl
from memprobe.models import tiny_model

MACHINE_KINDS = {"licence", "boilerplate", "python-text", "shakespeare", "speech", "literature", "scripture",
                 "perturbed", "novel", "formulaic", "code", "pii", "repetition"}


@pytest.fixture(scope="module")
def corpus():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        docs = bundled_corpus(seed=0)
    return docs, [str(w.message) for w in caught]


def test_corpus_kinds_ids_and_texts(corpus):
    docs, caught = corpus
    assert {d["kind"] for d in docs} == MACHINE_KINDS
    assert any("model-sample controls are left out" in m for m in caught)
    ids = [d["id"] for d in docs]
    assert len(ids) == len(set(ids))
    for d in docs:
        assert d["text"].strip(), d["id"]
        for key in ("kind", "genre", "source", "licence", "role", "split_group"):
            assert d[key], (d["id"], key)


def test_famous_openings_present(corpus):
    by_id = {d["id"]: d["text"] for d in corpus[0]}
    assert by_id["shakespeare/hamlet-to-be-or-not-to-be"].startswith("To be, or not to be: that is the question:")
    assert "Preamble" in by_id["licence/GPL-3/0"]
    assert "Permission is hereby granted, free of charge" in by_id["licence/MIT/0"]
    assert by_id["python-text/zen-of-python"].startswith("The Zen of Python, by Tim Peters")
    assert by_id["licence/Apache-2.0/0"].startswith("Apache License")


def test_corpus_is_deterministic_per_seed(corpus):
    again = bundled_corpus(seed=0, include_model_samples=False)
    assert json.dumps(again) == json.dumps(corpus[0])
    other = bundled_corpus(seed=1, include_model_samples=False)
    assert [d["text"] for d in other if d["kind"] == "pii"] != [d["text"] for d in corpus[0] if d["kind"] == "pii"]


def test_perturbed_copies_share_split_group_and_differ(corpus):
    by_id = {d["id"]: d for d in corpus[0]}
    perturbed = [d for d in corpus[0] if d["kind"] == "perturbed"]
    assert len(perturbed) >= 20
    for d in perturbed:
        orig = by_id[d["perturbed_from"]]
        assert d["split_group"] == orig["split_group"] and d["text"] != orig["text"]
        assert len(d["text"].split()) == len(orig["text"].split())


def test_repetition_span_is_second_copy(corpus):
    for d in (d for d in corpus[0] if d["kind"] == "repetition"):
        start, end = d["span"]
        first = d["text"][: start - 2]
        assert d["text"][start:end] == first and end == len(d["text"])


def test_pii_spans_point_at_values(corpus):
    for d in (d for d in corpus[0] if d["kind"] == "pii"):
        for start, end, kind in d["pii_spans"]:
            value = d["text"][start:end]
            assert value.strip() == value and value, (d["id"], kind)
            if kind == "email":
                assert "@" in value


def test_model_samples_with_a_model_are_seeded():
    loaded = tiny_model("llama", seed=0)
    a = [d for d in bundled_corpus(loaded, seed=3) if d["kind"] == "model-sample"]
    b = [d for d in bundled_corpus(loaded, seed=3) if d["kind"] == "model-sample"]
    assert len(a) == 16 and [d["text"] for d in a] == [d["text"] for d in b]
    assert len({d["text"] for d in a}) == len(a)


def test_passages_split_at_paragraphs():
    paras = [" ".join(f"w{i}_{j}" for j in range(30)) for i in range(6)]
    out = passages("\n\n".join(paras), min_words=50, max_words=70)
    assert out == ["\n\n".join(paras[i : i + 2]) for i in (0, 2, 4)]
    long_para = "\n".join(" ".join(["x"] * 10) for _ in range(20))
    assert all(len(p.split()) <= 70 for p in passages(long_para, min_words=50, max_words=70))


def test_perturb_rate_and_seed():
    text = " ".join(["alpha", "beta", "gamma"] + ["delta"] * 97)
    a, n = perturb(text, random.Random(0), rate=0.1)
    assert n == 10 and sum(x != y for x, y in zip(a.split(), text.split(), strict=True)) == 10
    assert perturb(text, random.Random(0), rate=0.1)[0] == a


def test_jsonl_roundtrip(tmp_path):
    rows = [{"id": "a", "text": "x", "score": float("nan")}, {"id": "b", "text": "y", "arr": np.arange(2)}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    assert read_jsonl(path) == [{"id": "a", "text": "x", "score": None}, {"id": "b", "text": "y", "arr": [0, 1]}]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"id": "a", "text": "x"}', "{not json"], r"d\.jsonl:2: not valid JSON"),
        (['{"id": "a", "text": "x"}', "", '{"text": "y"}'], r":3: missing string field 'id'"),
        (['{"id": "a", "text": "x"}', '{"id": "a", "text": "y"}'], r":2: duplicate id 'a' \(first on line 1\)"),
        (['{"id": "a", "text": "   "}'], r":1: document 'a' has empty text"),
        (['["a", "b"]'], r":1: expected a JSON object"),
    ],
)
def test_read_jsonl_errors_name_the_line(tmp_path, lines, message):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(MemprobeError, match=message):
        read_jsonl(path)
