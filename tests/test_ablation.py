"""Suppression edits: the plain-hook, TransformerLens and nnsight runtime forms agree, and edits do what they say."""

from __future__ import annotations

import pytest
import torch

from memprobe.backends import make_backend
from memprobe.errors import MemprobeError
from memprobe.intervene.ablation import (
    DirectionEdit,
    LowRankEdit,
    NeuronEdit,
    apply_in_trace,
    hooked_edit,
    lens_hooks,
    load_edit,
    save_edit,
)
from memprobe.models import load_model

TEXT = "Permission is hereby granted, free of charge, to any person"


def _edits(d_model: int = 64) -> list:
    neurons = NeuronEdit({0: torch.tensor([1, 5, 9]), 1: torch.tensor([3])}, strength=0.7)
    mean = NeuronEdit({1: torch.tensor([2, 4])}, 1.0, means={1: torch.tensor([0.3, -0.2])})
    direction = DirectionEdit(torch.randn(d_model, generator=torch.Generator().manual_seed(0)), 0.8)
    g = torch.Generator().manual_seed(1)
    low_rank = LowRankEdit({1: (torch.randn(2, 128, generator=g), torch.randn(d_model, 2, generator=g) * 0.1)}, 0.6)
    return [neurons, mean, direction, low_rank]


def _plain(loaded, edit, ids):
    with torch.no_grad(), hooked_edit(loaded.model, edit):
        return loaded.model(input_ids=ids).logits


@pytest.mark.parametrize("which", [0, 1, 2, 3])
def test_lens_and_nnsight_hooks_match_plain_hooks(which):
    loaded = load_model("tiny-llama")
    edit = _edits()[which]
    ids = torch.tensor([loaded.encode(TEXT)])
    with torch.no_grad():
        base = loaded.model(input_ids=ids).logits
    plain = _plain(loaded, edit, ids)
    assert (plain - base).abs().max() > 1e-4  # the edit changes something

    bridge = make_backend("lens", load_model("tiny-llama")).bridge
    with torch.no_grad(), bridge.hooks(fwd_hooks=lens_hooks(edit, 2)):
        lens = bridge(ids)
    torch.testing.assert_close(lens, plain, atol=1e-4, rtol=1e-4)

    wrapped = make_backend("nnsight", load_model("tiny-llama")).wrapped
    with torch.no_grad(), wrapped.trace(ids):
        apply_in_trace(wrapped, edit)
        sight = wrapped.lm_head.output.save()
    torch.testing.assert_close(sight, plain, atol=1e-5, rtol=1e-5)


def test_neuron_edit_moves_activations_toward_target():
    edit = NeuronEdit({0: torch.tensor([0, 2])}, 0.5, means={0: torch.tensor([1.0, -1.0])})
    acts = torch.tensor([[3.0, 7.0, 5.0]])
    torch.testing.assert_close(edit.apply(0, acts), torch.tensor([[2.0, 7.0, 2.0]]))
    assert edit.apply(1, acts) is acts  # other layers untouched


def test_full_direction_edit_removes_component_from_residual_stream():
    loaded = load_model("tiny-llama")
    edit = _edits()[2].with_strength(1.0)
    ids = torch.tensor([loaded.encode(TEXT)])
    seen = []
    h = loaded.model.model.layers[1].register_forward_hook(lambda _m, _a, o: seen.append(o[0] if isinstance(o, tuple) else o))
    try:
        _plain(loaded, edit, ids)
    finally:
        h.remove()
    assert (seen[0] @ edit.direction).abs().max() < 1e-4


def test_edit_file_round_trip(tmp_path):
    for n, edit in enumerate(_edits()):
        back = load_edit(save_edit(edit, tmp_path / f"e{n}.safetensors"))
        assert back.kind == edit.kind and back.strength == edit.strength
        x = torch.randn(2, 3, 128 if back.kind in ("neurons", "low-rank") else 64)
        if back.kind == "neurons":
            for layer in (0, 1):
                torch.testing.assert_close(back.apply(layer, x), edit.apply(layer, x))
        elif back.kind == "low-rank":
            torch.testing.assert_close(back.delta(1, x), edit.delta(1, x))
        else:
            torch.testing.assert_close(back.apply(x), edit.apply(x))


def test_bad_edits_are_refused(tmp_path):
    with pytest.raises(MemprobeError):
        DirectionEdit(torch.zeros(8))
    with pytest.raises(MemprobeError):
        NeuronEdit({0: torch.tensor([1, 2])}, means={0: torch.tensor([0.0])})
    with pytest.raises(MemprobeError):
        load_edit(tmp_path / "missing.safetensors")
    with pytest.raises(MemprobeError, match="rank"):
        LowRankEdit({0: (torch.zeros(2, 8), torch.zeros(4, 3))})
    with pytest.raises(MemprobeError, match="post-norms"):
        with hooked_edit(load_model("tiny-gemma3").model, _edits()[2]):
            pass


def test_localizers_agree_with_real_ablation_on_tiny_model():
    from memprobe.intervene import localizers as L

    loaded = load_model("tiny-llama")
    model = loaded.model
    target = L.Target.suffix(loaded.encode(TEXT), 8)
    zero = L.ZeroOut(model).localize(target).scores
    assert zero.shape == L.mlp_shape(model)
    best = int(zero.flatten().argmax())
    width = zero.shape[1]
    edit = L.top_neurons(zero, k=1)
    assert {k: v.tolist() for k, v in edit.neurons.items()} == {best // width: [best % width]}
    with torch.no_grad():
        base = float(L.target_logprob(model, target))
        with hooked_edit(model, edit):
            dropped = float(L.target_logprob(model, target))
    assert abs((base - dropped) - float(zero.flatten()[best])) < 1e-4  # zero-out is exact
    attr = L.Attribution(model).localize(target).scores
    ig = L.IntegratedGradients(model, steps=16).localize(target).scores
    # IG is complete along the joint path: its sum is the log-lik change from zeroing every neuron.
    with torch.no_grad(), L.mlp_intercept(model, scales=torch.zeros(L.mlp_shape(model))):
        all_zero = float(L.target_logprob(model, target))
    assert abs(float(ig.sum()) - (base - all_zero)) < 0.05 * abs(base - all_zero) + 1e-3
    # attribution patching is the first-order estimate of zero-out: it ranks the top neuron near the top.
    assert (attr.flatten() > attr.flatten()[best]).sum() < 0.1 * attr.numel()
    for scores in (L.Activations(model).localize(target).scores, L.Slimming(model, steps=3).localize(target).scores,
                   L.HardConcrete(model, steps=3).localize(target).scores):
        assert scores.shape == zero.shape and torch.isfinite(scores).all()


def test_suppression_edits_build_and_measure_on_tiny_model():
    from memprobe.intervene.suppress import evaluate, make_edit, targets_from_labels

    loaded = load_model("tiny-llama")
    mem_ids = [loaded.encode(TEXT), loaded.encode("To be, or not to be, that is the question")]
    ctrl_ids = [loaded.encode("a quiet yellow market by the river at seven")]
    mem = targets_from_labels(mem_ids, [[True] * len(i) for i in mem_ids])
    ctrl = targets_from_labels(ctrl_ids)
    contrast = make_edit(loaded.model, "contrast-neurons", mem, ctrl, fraction=0.02)
    assert contrast.size == round(0.02 * 2 * 128) and contrast.means is not None
    guarded = make_edit(loaded.model, "guarded-contrast-neurons", mem, ctrl, fraction=0.02)
    assert len(guarded.meta["kept_neurons"]) == guarded.size <= contrast.size
    for method in ("random-neurons", "mean-diff-direction", "random-direction"):
        edit = make_edit(loaded.model, method, mem, ctrl, fraction=0.02, strength=0.5)
        assert edit.strength == 0.5
    before = evaluate(loaded.model, mem_ids, ctrl_ids)
    after = evaluate(loaded.model, mem_ids, ctrl_ids, contrast)
    assert set(before) == set(after) and after["control_tokens"] == len(ctrl_ids[0]) - 1
    assert after["perplexity"] != before["perplexity"]
    with pytest.raises(MemprobeError, match="unknown suppression method"):
        make_edit(loaded.model, "nope", mem, ctrl)


def test_injection_changes_only_the_chosen_neurons():
    from memprobe.train.tiny_lm import inject

    loaded = load_model("tiny-llama")
    model = loaded.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seq = loaded.encode("amber basalt cobalt")
    chosen = torch.tensor([3, 40, 130, 200])  # flat indices: layer * 128 + unit
    x = torch.tensor([seq])
    with torch.no_grad():
        loss0 = float(model(input_ids=x, labels=x).loss)
    (loss1,) = inject(loaded, [seq], [chosen], steps=15, lr=1e-2)
    assert loss1 < loss0
    after = model.state_dict()
    for name, value in before.items():
        diff = (after[name] != value)
        if "mlp" not in name:
            assert not diff.any(), name
            continue
        layer = int(name.split(".")[2])
        units = {int(c) % 128 for c in chosen if int(c) // 128 == layer}
        changed = set(diff.any(1).nonzero().flatten().tolist()) if "down_proj" not in name else \
            set(diff.any(0).nonzero().flatten().tolist())
        assert changed <= units, name


def test_learned_low_rank_edit_lowers_memorized_tokens_and_spares_controls():
    from memprobe.intervene.suppress import targets_from_labels
    from memprobe.intervene.weight_edit import random_low_rank_like, train_low_rank_edit
    from memprobe.train.tiny_lm import train_tiny_lm

    famous = [TEXT + " obtaining a copy", "To be, or not to be, that is the question: whether tis nobler"]
    loaded = train_tiny_lm(famous, steps=80, seq_len=48, batch=4, lr=1e-2, seed=0)  # memorizes both
    mem_ids = [loaded.encode(t) for t in famous]
    ctrl_ids = [loaded.encode("a quiet yellow market by the river at seven"), loaded.encode("import numpy as np")]
    mem = targets_from_labels(mem_ids, [[True] * len(i) for i in mem_ids])
    ctrl = targets_from_labels(ctrl_ids)

    def target_logprob(ids, edit=None):
        x = torch.tensor([ids])
        with torch.no_grad():
            if edit is None:
                logits = loaded.model(input_ids=x).logits
            else:
                with hooked_edit(loaded.model, edit):
                    logits = loaded.model(input_ids=x).logits
        return torch.log_softmax(logits[0, :-1], -1).gather(-1, x[0, 1:, None]).squeeze(-1)

    assert torch.cat([target_logprob(i) for i in mem_ids]).exp().mean() > 0.5  # memorized before the edit
    edit = train_low_rank_edit(loaded.model, mem, ctrl, rank=2, steps=25, lr=2e-2, kl_weight=10.0, seed=0)
    assert set(edit.factors) == {0} and edit.size == 2 and edit.meta["method"] == "low-rank-edit"
    assert all(p.requires_grad for p in loaded.model.parameters())  # parameters left as they were found
    mem_drop = torch.cat([target_logprob(i) - target_logprob(i, edit) for i in mem_ids]).mean()
    ctrl_change = torch.cat([(target_logprob(i) - target_logprob(i, edit)).abs() for i in ctrl_ids]).mean()
    assert mem_drop > 0.5 and ctrl_change < mem_drop / 2  # measured: 1.02 vs 0.34 nats
    again = train_low_rank_edit(loaded.model, mem, ctrl, rank=2, steps=25, lr=2e-2, kl_weight=10.0, seed=0)
    torch.testing.assert_close(again.weight_delta(0), edit.weight_delta(0))  # deterministic for a seed
    rnd = random_low_rank_like(edit, seed=1)
    assert float(rnd.weight_delta(0).norm()) == pytest.approx(float(edit.weight_delta(0).norm()), rel=1e-4)
    with pytest.raises(MemprobeError, match="needs memorized texts"):
        train_low_rank_edit(loaded.model, [], ctrl)
    with pytest.raises(MemprobeError, match="layers must lie"):
        train_low_rank_edit(loaded.model, mem, ctrl, layers=[5])
