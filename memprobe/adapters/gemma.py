"""Gemma 1, 2 and 3 (text-only `model.layers` or multimodal `model.language_model.layers`).

Gemma 1 is laid out like Llama. Gemma 2/3 normalise the attention and MLP outputs before adding
them (`post_attention_layernorm`, `post_feedforward_layernorm`) and normalise the MLP input with
`pre_feedforward_layernorm`, so hook_attn_out / hook_mlp_out are those post-norms' outputs (as in
TransformerLens) and resid_mid is the input of `pre_feedforward_layernorm`. The embedding module
multiplies by sqrt(d_model) itself, so its output is what enters the residual stream.
"""

from __future__ import annotations

from torch import nn

from memprobe.adapters.base import Adapter, find_prefix
from memprobe.hookpoint import HookPoint


def adapter(model: nn.Module, family: str = "gemma") -> Adapter:
    layers = find_prefix(model, ("model.layers", "model.language_model.layers", "language_model.layers",
                                 "layers"), family)
    base = layers.removesuffix("layers")
    post = f"{layers}.0.pre_feedforward_layernorm" in dict(model.named_modules())
    return Adapter(
        family=family, n_layers=len(model.get_submodule(layers)), layers=layers,
        embed=f"{base}embed_tokens", unembed="lm_head", final_norm=f"{base}norm",
        attn="self_attn", attn_out_proj="self_attn.o_proj",
        attn_out="post_attention_layernorm" if post else "self_attn",
        mlp_in="mlp.gate_proj", mlp_out="mlp.down_proj",
        mlp_out_site="post_feedforward_layernorm" if post else "mlp",
        resid_mid=HookPoint("pre_feedforward_layernorm" if post else "post_attention_layernorm", "input"),
        neuron_in=("mlp.gate_proj", "mlp.up_proj"), post_norms=post,
    )
