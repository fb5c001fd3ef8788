"""The learned edit's training shortcuts (replayed frozen blocks, head only where scored) change no result.

The reference below is the training loop as it was before the shortcuts: every step runs the whole
model on the memorized and the control texts separately and scores every position.
"""

from __future__ import annotations

import math

import pytest
import torch

from memprobe.adapters import adapter_for
from memprobe.intervene.suppress import targets_from_labels
from memprobe.intervene.weight_edit import EditForward, _batch, train_low_rank_edit
from memprobe.models import tiny_model


def _reference_edit(model, memorized, controls, layers, rank, kl_weight, steps, lr, seed):
    """The pre-shortcut loop (full forwards, all positions), kept here as the slow ground truth."""
    adapter = adapter_for(model)
    d_mlp, d_model = adapter.mlp_width(model), adapter.d_model(model)
    g = torch.Generator().manual_seed(seed)
    factors = {i: ((torch.randn(rank, d_mlp, generator=g) / math.sqrt(d_mlp)).requires_grad_(),
                   torch.zeros(d_model, rank, requires_grad=True)) for i in layers}

    def log_probs(ids, mask):
        return torch.log_softmax(model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float(), -1)

    mem_ids, mem_mask, mem_pos = _batch(memorized)
    ctl_ids, ctl_mask, _ = _batch(controls)
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        reference = log_probs(ctl_ids, ctl_mask)
    handles = [model.get_submodule(adapter.at(i, adapter.mlp_out)).register_forward_hook(
        lambda _m, args, out, i=i: out + (args[0] @ factors[i][0].T) @ factors[i][1].T) for i in layers]
    opt = torch.optim.Adam([t for pair in factors.values() for t in pair], lr=lr)
    history = []
    for _ in range(steps):
        lp = log_probs(mem_ids, mem_mask)
        p_target = lp.gather(-1, mem_ids[:, 1:, None])[..., 0].exp()
        unlikelihood = -torch.log1p(-p_target.clamp(max=1 - 1e-6))[mem_pos[:, 1:]].mean()
        kl = (reference.exp() * (reference - log_probs(ctl_ids, ctl_mask))).sum(-1)[ctl_mask[:, 1:].bool()].mean()
        loss = unlikelihood + kl_weight * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append((unlikelihood.item(), kl.item()))
    for h in handles:
        h.remove()
    for p in model.parameters():
        p.requires_grad_(True)
    return {i: (b @ a).detach() for i, (a, b) in factors.items()}, history


def _problem(loaded):
    texts = ["To be, or not to be, that is the question", "Shall I compare thee to a summer's day?",
             "a quiet yellow market by the river", "import numpy as np; x = np.zeros(3)",
             "the weather tomorrow will be mild", "Roses are red and violets are blue, sugar"]
    ids = [loaded.encode(t) for t in texts]
    mem = targets_from_labels(ids[:2], [[k % 3 != 0 for k in range(len(i))] for i in ids[:2]])  # some tokens
    return mem, targets_from_labels(ids[2:])


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_fast_training_gives_the_reference_edit(arch):
    loaded = tiny_model(arch, n_layers=4, seed=0)
    model = loaded.model
    mem, ctl = _problem(loaded)
    layers, settings = [1, 2], dict(rank=2, kl_weight=10.0, steps=8, lr=2e-2, seed=0)
    expected, history = _reference_edit(model, mem, ctl, layers, **settings)
    edit = train_low_rank_edit(model, mem, ctl, layers=layers, max_tokens=64, mixed_precision=False, **settings)
    for layer in layers:
        assert float(expected[layer].abs().max()) > 1e-2  # an edit far from zero, so the match means something
        torch.testing.assert_close(edit.weight_delta(layer), expected[layer], rtol=1e-3, atol=1e-5)
    assert edit.meta["final"]["unlikelihood"] == pytest.approx(history[-1][0], rel=1e-4)
    assert edit.meta["final"]["kl"] == pytest.approx(history[-1][1], rel=1e-2, abs=1e-7)
    assert all(p.requires_grad for p in model.parameters())


def test_mixed_precision_training_stays_close_to_float32():
    """bfloat16 autocast of the frozen model (the default where it is native) learns nearly the same
    edit as float32 (every layer's B A within 15% in norm after 8 large steps on a random tiny model;
    on smollm2 the audit's suppression figures are unchanged: benchmarks/bench_audit.py)."""
    loaded = tiny_model("llama", n_layers=4, seed=0)
    mem, ctl = _problem(loaded)
    settings = dict(layers=[1, 2], rank=2, kl_weight=10.0, steps=8, lr=2e-2, seed=0, max_tokens=64)
    full = train_low_rank_edit(loaded.model, mem, ctl, mixed_precision=False, **settings)
    mixed = train_low_rank_edit(loaded.model, mem, ctl, mixed_precision=True, **settings)
    assert mixed.meta["mixed_precision"] == "bfloat16" and full.meta["mixed_precision"] is None
    for layer in (1, 2):
        a, b = full.weight_delta(layer), mixed.weight_delta(layer)
        assert float(a.norm()) > 1e-2 and not torch.equal(a, b)  # a real edit, really computed in bf16
        assert float((a - b).norm() / a.norm()) < 0.15
    assert mixed.meta["final"]["unlikelihood"] == pytest.approx(full.meta["final"]["unlikelihood"], rel=0.05)


def test_shortcut_taken_where_valid_and_refused_where_the_head_does_more():
    for arch, fast in (("llama", True), ("gpt2", True), ("gemma2", False)):  # gemma2 soft-caps its logits
        loaded = tiny_model(arch, n_layers=4, seed=0)
        mem, ctl = _problem(loaded)
        ids, mask, pos = _batch([*mem, *ctl])
        scored = torch.cat([pos[:2, 1:], mask[2:, 1:].bool()])
        forward = EditForward(loaded.model, ids, mask, scored, start=2)
        assert forward.fast is fast, arch
        with torch.no_grad():
            torch.testing.assert_close(forward(), forward.reference, rtol=1e-4, atol=1e-4)
        assert [type(m).__name__ for m in loaded.model.modules()].count("_Replay") == 0  # blocks put back
