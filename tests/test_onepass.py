"""One forward pass feeds labels, MIA statistics and capture; batched decoding is reproducible."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from memprobe.capture import capture
from memprobe.corpora import SAMPLE_PROMPTS, SAMPLES_PER_PROMPT, _model_samples
from memprobe.errors import MemprobeError
from memprobe.labels import (
    continue_tokens,
    label_documents,
    sample_generators,
    token_labels,
    token_labels_from_store,
)
from memprobe.models import LoadedModel, load_model, tiny_model
from memprobe.token_stats import STAT_COLUMNS, next_token_stats

TRAINED = ["The owl and the pussy-cat went to sea in a beautiful pea-green boat.",
           "Seven silver swans swam swiftly south across the silent lake at dawn."]
FRESH = ["Tomorrow the committee will review the budget.", "Bring a coat.",
         "The museum opens at ten and closes early on public holidays, except in summer.", "Ok"]
DOCS = [{"id": f"doc-{i}", "text": t, "kind": "test"} for i, t in enumerate(TRAINED + FRESH)]
SITES = "blocks.*.hook_resid_post,blocks.0.mlp.hook_post"


@pytest.fixture(scope="module")
def trained() -> LoadedModel:
    """tiny-llama trained briefly on TRAINED: some tokens memorized (greedy-correct, confident), most not."""
    torch.manual_seed(0)
    loaded = load_model("tiny-llama")
    ids = [torch.tensor(loaded.encode(t)) for t in TRAINED]
    x = torch.stack([i[: min(map(len, ids))] for i in ids])
    model = loaded.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return loaded


def test_one_pass_labels_equal_two_pass_labels(trained, tmp_path):
    store = capture(trained, DOCS, SITES, tmp_path / "s", token_stats=True, batch_tokens=150, progress=False)
    assert len(store.manifest["shards"]) > 1 and set(STAT_COLUMNS) <= set(store.columns)
    encoded = [trained.encode(d["text"]) for d in DOCS]
    for min_prob in (0.5, 0.2):
        one = token_labels_from_store(store, [d["id"] for d in DOCS], min_prob=min_prob)
        two = token_labels(trained.model, encoded, min_prob=min_prob, batch_size=3)
        for a, b in zip(one, two, strict=True):
            assert a.token_ids.tolist() == b.token_ids.tolist()
            for field in ("target_prob", "loss", "entropy", "top_prob"):
                np.testing.assert_allclose(getattr(a, field), getattr(b, field), rtol=0, atol=1e-6)
            assert a.correct.tolist() == b.correct.tolist() and a.memorized.tolist() == b.memorized.tolist()
        flags = np.concatenate([lab.memorized[1:] for lab in one])
        assert 0 < flags.mean() < 1  # a real mix, so equal flags mean something
    # the min-k%++ spread is the one of the model's own distribution at each position
    rows = store.doc_rows("doc-2")
    with torch.no_grad():
        logits = trained.model(input_ids=torch.tensor([encoded[2]])).logits[0]
    ref = next_token_stats(logits[:-1], torch.tensor(encoded[2][1:]))
    column = store.column("logprob_std")[rows]
    assert torch.isnan(column[0])
    torch.testing.assert_close(column[1:], ref.logprob_std, rtol=0, atol=1e-5)
    # and the activations are those of a capture without statistics
    plain = capture(trained, DOCS, SITES, tmp_path / "plain", batch_tokens=150, progress=False)
    for site in plain.sites:
        torch.testing.assert_close(store.read(site), plain.read(site))


def test_label_documents_from_the_store_equal_a_fresh_labelling(trained, tmp_path):
    store = capture(trained, DOCS, SITES, tmp_path / "s", token_stats=True, progress=False)
    fresh = label_documents(trained, DOCS, prefix_len=4, suffix_len=4)
    reused = label_documents(trained, DOCS, prefix_len=4, suffix_len=4, store=store)
    for a, b in zip(reused, fresh, strict=True):
        for key in a:
            if key in ("target_prob", "loss", "entropy", "top_prob"):
                np.testing.assert_allclose(np.array(a[key], dtype=float), np.array(b[key], dtype=float), atol=1e-6)
            elif key == "memorized_fraction":
                assert a[key] == pytest.approx(b[key], abs=1e-9)
            else:
                assert a[key] == b[key], key
    other = [{**d, "text": d["text"] + "!"} if d["id"] == "doc-3" else d for d in DOCS]
    with pytest.raises(MemprobeError, match="other tokens for document 'doc-3'"):
        label_documents(trained, other, store=store)


def _count_forwards(model: torch.nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    calls = [0]

    def count(_module, _args):
        calls[0] += 1

    return calls, model.register_forward_pre_hook(count)


def test_capture_with_stats_runs_one_forward_per_batch(trained, tmp_path):
    calls, handle = _count_forwards(trained.model)
    try:
        store = capture(trained, DOCS, SITES, tmp_path / "s", token_stats=True, batch_tokens=150, progress=False)
        n_batches = len(store.manifest["shards"])  # one shard per batch
        assert calls[0] == n_batches + 1  # + the one-token forward that measures the sites' widths
        calls[0] = 0
        token_labels_from_store(store, [d["id"] for d in DOCS])
        assert calls[0] == 0  # labels need no forward of their own
        token_labels(trained.model, [trained.encode(d["text"]) for d in DOCS], batch_size=2)
        assert calls[0] == 3  # what the second pass would have cost
    finally:
        handle.remove()
    assert n_batches >= 3


def test_token_stats_refusals(trained, tmp_path):
    with pytest.raises(MemprobeError, match="logits of the capture's own forward.*backend='hooks'"):
        capture(trained, DOCS, SITES, tmp_path / "a", backend="lens", token_stats=True, progress=False)
    clash = {"entropy": {d["id"]: [0.0] * len(trained.encode(d["text"])) for d in DOCS}}
    with pytest.raises(MemprobeError, match=r"token_columns \['entropy'\].*rename"):
        capture(trained, DOCS, SITES, tmp_path / "b", token_columns=clash, token_stats=True, progress=False)
    plain = capture(trained, DOCS[:2], SITES, tmp_path / "c", progress=False)
    with pytest.raises(MemprobeError, match="no token-stat columns.*token_stats=True"):
        token_labels_from_store(plain, ["doc-0"])


def _model(name: str) -> LoadedModel:
    """A tiny model; "gpt2-loud-positions" has absolute position embeddings scaled up so that its
    greedy choices depend on them (rotary models are blind to a uniform shift of positions, so
    only this one can catch left-padded rows decoded at the wrong positions)."""
    if name != "gpt2-loud-positions":
        return load_model(name)
    loaded = tiny_model("gpt2", seed=0)
    with torch.no_grad():
        loaded.model.transformer.wpe.weight.mul_(30)
    return loaded


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3", "gpt2-loud-positions"])
def test_cached_left_padded_decoding_equals_no_cache_reference(name):
    loaded = _model(name)
    g = torch.Generator().manual_seed(0)
    prefixes = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (1, 5, 2, 7, 3)]
    references = []
    with torch.no_grad():
        for p in prefixes:  # full recompute, one prefix at a time, no cache, no padding
            ids = torch.tensor([p])
            for _ in range(10):
                ids = torch.cat([ids, loaded.model(input_ids=ids).logits[:, -1].argmax(-1)[:, None]], 1)
            references.append(ids[0, len(p):].tolist())
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the deprecated past_key_values argument warns
        assert continue_tokens(loaded.model, prefixes, 10).tolist() == references


@pytest.mark.parametrize("name", ["tiny-llama", "gpt2-loud-positions"])
def test_samples_do_not_depend_on_the_batch(name):
    loaded = _model(name)
    prefixes = [loaded.encode(p) for p in ("The", "One of the", "It was", "We", "In")]
    alone = [continue_tokens(loaded.model, [p], 12, temperature=0.9, generator=[g]).tolist()[0]
             for p, g in zip(prefixes, sample_generators(7, range(5)), strict=True)]
    together = continue_tokens(loaded.model, prefixes, 12, temperature=0.9, generator=sample_generators(7, range(5)))
    assert together.tolist() == alone
    other_seed = continue_tokens(loaded.model, prefixes, 12, temperature=0.9, generator=sample_generators(8, range(5)))
    assert other_seed.tolist() != alone
    with pytest.raises(MemprobeError, match="2 generators for 5 prefixes"):
        continue_tokens(loaded.model, prefixes, 2, temperature=0.9, generator=sample_generators(7, range(2)))


def test_model_samples_are_the_same_at_batch_size_1_and_5():
    loaded = load_model("tiny-llama")
    one = _model_samples(loaded, seed=3, n_prompts=4, batch_size=1)
    five = _model_samples(loaded, seed=3, n_prompts=4, batch_size=5)
    assert len(one) == 4 * SAMPLES_PER_PROMPT and [d["text"] for d in one] == [d["text"] for d in five]
    assert [d["id"] for d in one] == [d["id"] for d in five]
    assert len({d["text"] for d in one}) == len(one)  # each row its own stream, even for one prompt
    full = _model_samples(loaded, seed=3, batch_size=16)  # a short corpus is a prefix of the full one
    assert len(full) == len(SAMPLE_PROMPTS) * SAMPLES_PER_PROMPT
    assert [d["text"] for d in full[: len(one)]] == [d["text"] for d in one]


def test_token_stats_with_masked_vocabulary_match_float64():
    """Logits of -inf (a masked vocabulary entry) have p = 0: finite stats, equal to float64 ones."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(40, 3000, generator=g) * 4
    logits[:, :100] = float("-inf")
    targets = torch.randint(100, 3000, (40,), generator=g)
    s = next_token_stats(logits, targets)
    logp = torch.log_softmax(logits.double(), -1)
    p = logp.exp()
    plogp = torch.where(p > 0, p * logp, 0)
    mu = plogp.sum(-1)
    sigma = torch.where(p > 0, p * (logp - mu[:, None]) ** 2, 0).sum(-1).sqrt()
    torch.testing.assert_close(s.entropy.double(), -mu, rtol=0, atol=1e-5)
    torch.testing.assert_close(s.logprob_std.double(), sigma, rtol=0, atol=1e-5)
    torch.testing.assert_close(s.target_logprob.double(), logp.gather(-1, targets[:, None])[:, 0], rtol=0, atol=1e-5)
