"""GPT-NeoX / Pythia: `gpt_neox.layers`, `embed_in`, `final_layer_norm`, MLP `dense_h_to_4h` ->
`dense_4h_to_h` (with biases).

With `use_parallel_residual` (Pythia, HF's default) a block computes
x + attn(ln1(x)) + mlp(ln2(x)): attention and MLP both read resid_pre, so no residual exists
between them and, as in TransformerLens's `ParallelBlockBridge`, there is no hook_resid_mid;
resid_post = resid_pre + attn_out + mlp_out. Sequential NeoX checkpoints have the usual resid_mid
(the input of `post_attention_layernorm`).
"""

from __future__ import annotations

from torch import nn

from memprobe.adapters.base import Adapter, find_prefix
from memprobe.hookpoint import HookPoint

PARALLEL_NO_MID = ("parallel attention/MLP block (use_parallel_residual=True): both read resid_pre, so "
                   "no residual exists between them (TransformerLens omits it too); use hook_resid_pre, "
                   "hook_attn_out, hook_mlp_out or hook_resid_post")


def adapter(model: nn.Module, family: str = "gpt_neox") -> Adapter:
    layers = find_prefix(model, ("gpt_neox.layers", "layers"), family)
    base = layers.removesuffix("layers")
    parallel = bool(getattr(model.config, "use_parallel_residual", True))
    return Adapter(
        family=family, n_layers=len(model.get_submodule(layers)), layers=layers,
        embed=f"{base}embed_in", unembed="lm_head" if hasattr(model, "lm_head") else "embed_out",
        final_norm=f"{base}final_layer_norm",
        attn="attention", attn_out_proj="attention.dense", attn_out="attention",
        mlp_in="mlp.dense_h_to_4h", mlp_out="mlp.dense_4h_to_h", mlp_out_site="mlp",
        resid_mid=None if parallel else HookPoint("post_attention_layernorm", "input"),
        neuron_in=("mlp.dense_h_to_4h",), parallel=parallel, out_bias="always",
        missing={"hook_resid_mid": PARALLEL_NO_MID} if parallel else {},
    )
