"""All backends give the activations of a plain HF forward (output_hidden_states) on the same ids."""

from __future__ import annotations

import pytest
import torch

from memprobe.backends import make_backend
from memprobe.capture import pad_batch, pad_id
from memprobe.errors import MemprobeError
from memprobe.models import load_model
from memprobe.sites import resolve

TEXTS = ["Permission is hereby granted, free of charge,", "To be, or not to be", "x"]
ALL_KINDS = ",".join(f"blocks.*.{k}" for k in (
    "hook_resid_pre", "hook_attn_out", "hook_resid_mid", "mlp.hook_pre", "mlp.hook_post",
    "hook_mlp_out", "hook_resid_post"))


def _batch(loaded):
    return pad_batch([loaded.encode(t) for t in TEXTS], pad_id(loaded))


def _reference(loaded, ids, mask):
    with torch.no_grad():
        return loaded.model(ids, attention_mask=mask, output_hidden_states=True).hidden_states


def _check_against_hf(name_or_loader, backend, tol):
    ref = name_or_loader()
    ids, mask = _batch(ref)
    hidden = _reference(ref, ids, mask)
    n = ref.model.config.num_hidden_layers
    sites = resolve(ref.model, ALL_KINDS)
    out = make_backend(backend, name_or_loader()).run(ids, mask, sites)  # a fresh model object
    keep = mask.bool()
    for i in range(n):
        torch.testing.assert_close(out[f"blocks.{i}.hook_resid_pre"][keep], hidden[i][keep], atol=tol, rtol=tol)
        if i < n - 1:  # HF's last hidden state has the final norm applied
            torch.testing.assert_close(out[f"blocks.{i}.hook_resid_post"][keep], hidden[i + 1][keep], atol=tol, rtol=tol)
        # resid_mid = resid_pre + attn_out ; resid_post = resid_mid + mlp_out (the residual stream adds up)
        pre, mid, post = (out[f"blocks.{i}.{k}"] for k in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post"))
        torch.testing.assert_close(mid, pre + out[f"blocks.{i}.hook_attn_out"], atol=tol, rtol=tol)
        torch.testing.assert_close(post, mid + out[f"blocks.{i}.hook_mlp_out"], atol=tol, rtol=tol)
    return out


@pytest.mark.parametrize("backend", ["hooks", "nnsight", "lens"])
def test_backend_matches_hf_forward(tiny_name, backend):
    out = _check_against_hf(lambda: load_model(tiny_name), backend, tol=1e-4)
    assert out["blocks.0.mlp.hook_post"].shape[-1] == 128  # MLP neurons, not the residual width


def test_backends_agree_on_every_site_kind(tiny_name):
    ref = load_model(tiny_name)
    ids, mask = _batch(ref)
    sites = resolve(ref.model, ALL_KINDS)
    outs = {b: make_backend(b, load_model(tiny_name)).run(ids, mask, sites) for b in ("hooks", "nnsight", "lens")}
    keep = mask.bool()
    for site in sites:
        for b in ("nnsight", "lens"):
            torch.testing.assert_close(outs[b][site][keep], outs["hooks"][site][keep], atol=1e-4, rtol=1e-4)


def test_hooks_stop_after_last_needed_layer(tiny):
    ids, mask = _batch(tiny)
    called = []
    tiny.model.model.layers[1].register_forward_hook(lambda *a: called.append(1))
    make_backend("hooks", tiny).run(ids, mask, ["blocks.0.hook_resid_post"])
    assert called == []  # layer 1 never ran


def test_raw_module_paths_and_globs(tiny):
    sites = resolve(tiny.model, "model.layers.*.mlp,blocks.1.hook_resid_post")
    assert sites == ["blocks.1.hook_resid_post", "model.layers.0.mlp", "model.layers.1.mlp"]
    ids, mask = _batch(tiny)
    out = make_backend("hooks", tiny).run(ids, mask, sites)
    assert out["model.layers.0.mlp"].shape == (len(TEXTS), ids.shape[1], 64)


def test_unknown_site_lists_closest(tiny):
    with pytest.raises(MemprobeError, match="blocks.0.hook_resid_post"):
        resolve(tiny.model, "blocks.0.hook_resid_pots")
    with pytest.raises(MemprobeError, match="layers 0..1"):
        resolve(tiny.model, "blocks.7.hook_resid_post")


def test_one_model_object_is_never_wrapped_twice(tiny):
    make_backend("lens", tiny)
    with pytest.raises(MemprobeError, match="already wrapped"):
        make_backend("nnsight", tiny)


@pytest.mark.real
@pytest.mark.parametrize("backend", ["hooks", "nnsight", "lens"])
def test_real_model_backends_match_hf(backend):
    _check_against_hf(lambda: load_model("smollm2-135m"), backend, tol=1e-3)
