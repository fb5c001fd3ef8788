"""Phi-3: Llama-like blocks, but one fused `gate_up_proj` whose output is [gate | up], so
mlp.hook_pre (the gate pre-activation) is the first half of that output; `down_proj` as usual."""

from __future__ import annotations

from torch import nn

from memprobe.adapters.base import Adapter, find_prefix
from memprobe.hookpoint import HookPoint


def adapter(model: nn.Module, family: str = "phi3") -> Adapter:
    layers = find_prefix(model, ("model.layers", "layers"), family)
    base = layers.removesuffix("layers")
    return Adapter(
        family=family, n_layers=len(model.get_submodule(layers)), layers=layers,
        embed=f"{base}embed_tokens", unembed="lm_head", final_norm=f"{base}norm",
        attn="self_attn", attn_out_proj="self_attn.o_proj", attn_out="self_attn",
        mlp_in="mlp.gate_up_proj", fused_gate_up=True, mlp_out="mlp.down_proj", mlp_out_site="mlp",
        resid_mid=HookPoint("post_attention_layernorm", "input"),
    )
