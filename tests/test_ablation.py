"""Suppression edits: the plain-hook, TransformerLens and nnsight runtime forms agree, and edits do what they say."""

from __future__ import annotations

import pytest
import torch

from memprobe.backends import make_backend
from memprobe.errors import MemprobeError
from memprobe.intervene.ablation import (
    DirectionEdit,
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
    return [neurons, mean, direction]


def _plain(loaded, edit, ids):
    with torch.no_grad(), hooked_edit(loaded.model, edit):
        return loaded.model(input_ids=ids).logits


@pytest.mark.parametrize("which", [0, 1, 2])
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
        x = torch.randn(2, 3, 128 if back.kind == "neurons" else 64)
        if back.kind == "neurons":
            for layer in (0, 1):
                torch.testing.assert_close(back.apply(layer, x), edit.apply(layer, x))
        else:
            torch.testing.assert_close(back.apply(x), edit.apply(x))


def test_bad_edits_are_refused(tmp_path):
    with pytest.raises(MemprobeError):
        DirectionEdit(torch.zeros(8))
    with pytest.raises(MemprobeError):
        NeuronEdit({0: torch.tensor([1, 2])}, means={0: torch.tensor([0.0])})
    with pytest.raises(MemprobeError):
        load_edit(tmp_path / "missing.safetensors")
    with pytest.raises(MemprobeError, match="post-norms"):
        with hooked_edit(load_model("tiny-gemma3").model, _edits()[2]):
            pass
