"""Memorization labels: hand-computed values on a model whose logits we set, and batched == unbatched."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from memprobe.errors import MemprobeError
from memprobe.labels import (
    continue_tokens,
    label_documents,
    sequence_labels,
    summarize,
    token_labels,
)
from memprobe.models import tiny_model

V = 10


class SuccessorLM(torch.nn.Module):
    """After token t it predicts (t + 1) % V with probability P[t]; the rest is spread evenly.

    Logits depend only on the current token, so every label can be computed by hand. A KV "cache"
    is returned (the tokens seen so far) to check that decoding feeds one new token per step.
    """

    def __init__(self, p: list[float]):
        super().__init__()
        self.p = torch.tensor(p, dtype=torch.float64)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=False):
        probs = ((1 - self.p) / (V - 1))[:, None].expand(V, V).clone()
        probs[torch.arange(V), (torch.arange(V) + 1) % V] = self.p
        logits = probs.log()[input_ids].float()
        seen = input_ids if cache is None else torch.cat([cache, input_ids], 1)
        return SimpleNamespace(logits=logits, cache=seen)


P = [0.9, 0.6, 0.3, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]


def test_token_labels_by_hand():
    model = SuccessorLM(P)
    (lab,) = token_labels(model, [[0, 1, 2, 3, 5]], min_prob=0.5)
    # position: 1 (0->1, p=.9)  2 (1->2, p=.6)  3 (2->3, p=.3 < 0.5)  4 (3->5: wrong, p=(1-.9)/9)
    assert math.isnan(lab.target_prob[0]) and not lab.correct[0] and not lab.memorized[0]
    np.testing.assert_allclose(lab.target_prob[1:], [0.9, 0.6, 0.3, 0.1 / 9], rtol=1e-6)
    assert lab.correct.tolist() == [False, True, True, True, False]
    assert lab.memorized.tolist() == [False, True, True, False, False]
    np.testing.assert_allclose(lab.loss[1:], -np.log([0.9, 0.6, 0.3, 0.1 / 9]), rtol=1e-6)
    np.testing.assert_allclose(lab.top_prob[1:], [0.9, 0.6, 0.3, 0.9], rtol=1e-6)
    rest = (1 - 0.6) / 9
    np.testing.assert_allclose(lab.entropy[2], -(0.6 * math.log(0.6) + 9 * rest * math.log(rest)), rtol=1e-6)
    assert lab.memorized_fraction == pytest.approx(0.5)
    (strict,) = token_labels(model, [[0, 1, 2, 3, 5]], min_prob=0.7)
    assert strict.memorized.tolist() == [False, True, False, False, False]


def test_sequence_labels_by_hand():
    model = SuccessorLM(P)  # greedy continuation of a prefix ending in t is t+1, t+2, ...
    docs = [
        [0, 1, 2, 3, 4, 5],  # suffix 3 4 5 matches the greedy continuation exactly
        [0, 1, 2, 3, 9, 5],  # one substitution in the middle
        [0, 1, 2, 7, 4, 5],  # first token wrong: exact match 0, but 2 of 3 positions right
        [4, 5, 6, 7, 8],  # too short for offset 0 + 3 + 3
    ]
    out = sequence_labels(model, docs, prefix_len=3, suffix_len=3, batch_size=2)
    assert [s.k_extractable for s in out[:3]] == [True, False, False]
    assert [s.memorization_score for s in out[:3]] == pytest.approx([1.0, 2 / 3, 2 / 3])
    assert [s.exact_match_len for s in out[:3]] == [3, 1, 0]
    assert [s.levenshtein for s in out[:3]] == [0, 1, 1]
    assert out[0].continuation.tolist() == [3, 4, 5]
    assert out[3].skipped and out[3].k_extractable is None and out[3].memorization_score is None


def test_levenshtein_counts_insertions_not_positions():
    model = SuccessorLM(P)
    # continuation of [0, 1] is 2 3 4 5; the suffix 9 2 3 4 is one insertion away but matches no position
    (s,) = sequence_labels(model, [[0, 1, 9, 2, 3, 4]], prefix_len=2, suffix_len=4)
    assert s.memorization_score == 0.0 and s.exact_match_len == 0 and s.levenshtein == 2


def test_offsets_and_stride():
    model = SuccessorLM(P)
    doc = [0, 1, 2, 3, 4, 5, 6, 7]
    by_stride = sequence_labels(model, [doc], prefix_len=2, suffix_len=2, stride=2)
    assert [s.offset for s in by_stride] == [0, 2, 4]
    assert all(s.k_extractable for s in by_stride)
    by_offsets = sequence_labels(model, [doc], prefix_len=2, suffix_len=2, offsets=[1, 6])
    assert by_offsets[0].k_extractable and by_offsets[1].skipped
    with pytest.raises(MemprobeError, match="either offsets or stride"):
        sequence_labels(model, [doc], offsets=[0], stride=1)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", seed=0)


def _docs(seed: int, lengths: list[int], vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def test_token_labels_batched_equals_unbatched(tiny):
    docs = _docs(0, [17, 5, 40, 23, 2, 31], 256)
    batched = token_labels(tiny.model, docs, batch_size=4)
    for doc, b in zip(docs, batched, strict=True):
        (single,) = token_labels(tiny.model, [doc], batch_size=1)
        assert b.token_ids.tolist() == doc
        np.testing.assert_allclose(b.target_prob, single.target_prob, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(b.entropy, single.entropy, rtol=1e-4, atol=1e-6)
        assert (b.correct == single.correct).all()


def test_greedy_decoding_with_cache_equals_full_recompute(tiny):
    prefixes = torch.tensor(_docs(1, [6, 6, 6], 256))
    with torch.inference_mode():
        ids = prefixes.clone()
        for _ in range(5):
            nxt = tiny.model(input_ids=ids).logits[:, -1].argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], 1)
    assert continue_tokens(tiny.model, prefixes, 5).tolist() == ids[:, 6:].tolist()
    batched = sequence_labels(tiny.model, _docs(2, [12, 12, 12], 256), prefix_len=6, suffix_len=5, batch_size=3)
    single = [sequence_labels(tiny.model, [d], prefix_len=6, suffix_len=5)[0] for d in _docs(2, [12, 12, 12], 256)]
    assert [b.continuation.tolist() for b in batched] == [s.continuation.tolist() for s in single]


def test_sampling_is_seeded(tiny):
    prefixes = torch.tensor(_docs(3, [4, 4], 256))
    a = continue_tokens(tiny.model, prefixes, 8, temperature=1.0, generator=torch.Generator().manual_seed(5))
    b = continue_tokens(tiny.model, prefixes, 8, temperature=1.0, generator=torch.Generator().manual_seed(5))
    c = continue_tokens(tiny.model, prefixes, 8, temperature=1.0, generator=torch.Generator().manual_seed(6))
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()


def test_label_documents_records_and_summary(tiny):
    docs = [
        {"id": "a", "text": "abcabcabcabc", "kind": "repetition", "span": [6, 12]},
        {"id": "b", "text": "hello", "kind": "novel"},
    ]
    records = label_documents(tiny, docs, prefix_len=4, suffix_len=4)
    a, b = records
    assert a["n_tokens"] == 13 and a["token_ids"][0] == tiny.tokenizer.bos_token_id  # BOS + 12 bytes
    assert a["target_prob"][0] is None and isinstance(a["target_prob"][1], float)
    assert a["span_tokens"] == [7, 13] and a["kind"] == "repetition"
    assert a["k_extractable"] is not None and len(a["continuation_ids"]) == 4
    assert b["sequence_skipped"] and b["k_extractable"] is None
    rows = {r["kind"]: r for r in summarize(records)}
    assert rows["all"]["docs"] == 2 and rows["all"]["tokens"] == 12 + 5
    assert rows["novel"]["k_extractable_rate"] is None
    expected = np.mean(a["memorized"][1:] + b["memorized"][1:])
    assert rows["all"]["memorized_token_rate"] == pytest.approx(expected)


def test_validation_errors(tiny):
    with pytest.raises(MemprobeError, match="'empty'"):
        label_documents(tiny, [{"id": "empty", "text": "  "}])
    with pytest.raises(MemprobeError, match=r"'long' is 2101 tokens.*refused.*split"):
        label_documents(tiny, [{"id": "long", "text": "x" * 2100}])
    with pytest.raises(MemprobeError, match="min_prob"):
        token_labels(tiny.model, [[1, 2]], min_prob=1.5)
    with pytest.raises(MemprobeError, match="twice"):
        label_documents(tiny, [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}])


@pytest.mark.real
def test_smollm2_memorizes_famous_texts_more_than_fake_pii():
    from memprobe.corpora import bundled_corpus
    from memprobe.models import load_model

    loaded = load_model("smollm2-135m")
    corpus = {d["id"]: d for d in bundled_corpus(seed=0, include_model_samples=False)}
    famous = [corpus[i] for i in ("licence/MIT/0", "licence/GPL-3/1", "boilerplate/Apache-2.0-notice",
                                  "python-text/zen-of-python")]
    pii = [d for d in corpus.values() if d["kind"] == "pii"][:4]
    records = label_documents(loaded, famous + pii)
    famous_rate = np.mean([r["memorized_fraction"] for r in records[:4]])
    pii_rate = np.mean([r["memorized_fraction"] for r in records[4:]])
    # measured (Q4_1 SmolLM2-135M-Instruct): famous 0.48, PII 0.13; none of these is 32/32 k-extractable
    assert famous_rate > pii_rate + 0.2 and famous_rate > 2 * pii_rate, (famous_rate, pii_rate)
