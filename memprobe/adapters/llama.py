"""Llama, Mistral, Qwen2 and Qwen3 (SmolLM2 is Llama): pre-norm blocks, gated MLP
(`gate_proj`, `up_proj` -> `down_proj`); the input of `post_attention_layernorm` is resid_mid."""

from __future__ import annotations

from torch import nn

from memprobe.adapters.base import Adapter, find_prefix
from memprobe.hookpoint import HookPoint


def adapter(model: nn.Module, family: str = "llama") -> Adapter:
    layers = find_prefix(model, ("model.layers", "layers"), family)
    base = layers.removesuffix("layers")
    has_bias_switch = hasattr(model.config, "mlp_bias")
    return Adapter(
        family=family, n_layers=len(model.get_submodule(layers)), layers=layers,
        embed=f"{base}embed_tokens", unembed="lm_head", final_norm=f"{base}norm",
        attn="self_attn", attn_out_proj="self_attn.o_proj", attn_out="self_attn",
        mlp_in="mlp.gate_proj", mlp_out="mlp.down_proj", mlp_out_site="mlp",
        resid_mid=HookPoint("post_attention_layernorm", "input"),
        neuron_in=("mlp.gate_proj", "mlp.up_proj"),
        out_bias="switch" if has_bias_switch else "none",
        bias_switch=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj") if has_bias_switch else (),
    )
