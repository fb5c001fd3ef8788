"""GPT-Neo: GPT-2's layout (`transformer.h`, `wte` + `wpe`, `ln_1`/`ln_2`, `ln_f`) with nn.Linear
projections; the attention's projections sit one level down, in `attn.attention`."""

from __future__ import annotations

from torch import nn

from memprobe.adapters.base import Adapter, find_prefix
from memprobe.hookpoint import HookPoint


def adapter(model: nn.Module, family: str = "gpt_neo") -> Adapter:
    layers = find_prefix(model, ("transformer.h", "h"), family)
    base = layers.removesuffix("h")
    return Adapter(
        family=family, n_layers=len(model.get_submodule(layers)), layers=layers,
        embed=f"{base}wte", pos_embed=f"{base}wpe", unembed="lm_head", final_norm=f"{base}ln_f",
        attn="attn", attn_out_proj="attn.attention.out_proj", attn_out="attn",
        mlp_in="mlp.c_fc", mlp_out="mlp.c_proj", mlp_out_site="mlp",
        resid_mid=HookPoint("ln_2", "input"), neuron_in=("mlp.c_fc",), out_bias="always",
    )
