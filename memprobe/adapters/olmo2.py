"""OLMo 2: no pre-norms; attention and MLP outputs pass through `post_attention_layernorm` /
`post_feedforward_layernorm` before the add. So hook_attn_out / hook_mlp_out are those norms'
outputs and resid_mid is the MLP's own input (the MLP reads the residual stream directly)."""

from __future__ import annotations

from torch import nn

from memprobe.adapters.base import Adapter, find_prefix
from memprobe.hookpoint import HookPoint


def adapter(model: nn.Module, family: str = "olmo2") -> Adapter:
    layers = find_prefix(model, ("model.layers", "layers"), family)
    base = layers.removesuffix("layers")
    return Adapter(
        family=family, n_layers=len(model.get_submodule(layers)), layers=layers,
        embed=f"{base}embed_tokens", unembed="lm_head", final_norm=f"{base}norm",
        attn="self_attn", attn_out_proj="self_attn.o_proj", attn_out="post_attention_layernorm",
        mlp_in="mlp.gate_proj", mlp_out="mlp.down_proj", mlp_out_site="post_feedforward_layernorm",
        resid_mid=HookPoint("mlp", "input"), neuron_in=("mlp.gate_proj", "mlp.up_proj"), post_norms=True,
    )
