"""GPT-2: `transformer.h` blocks, token (`wte`) plus learned position (`wpe`) embeddings, final
`ln_f`. Every projection is HF `Conv1D` (weight (in, out), the transpose of nn.Linear's) with a
bias. No module outputs resid_mid: it is the input of `ln_2`."""

from __future__ import annotations

from torch import nn

from memprobe.adapters.base import Adapter, find_prefix
from memprobe.hookpoint import HookPoint


def adapter(model: nn.Module, family: str = "gpt2") -> Adapter:
    layers = find_prefix(model, ("transformer.h", "h"), family)
    base = layers.removesuffix("h")
    return Adapter(
        family=family, n_layers=len(model.get_submodule(layers)), layers=layers,
        embed=f"{base}wte", pos_embed=f"{base}wpe", unembed="lm_head", final_norm=f"{base}ln_f",
        attn="attn", attn_out_proj="attn.c_proj", attn_out="attn",
        mlp_in="mlp.c_fc", mlp_out="mlp.c_proj", mlp_out_site="mlp",
        resid_mid=HookPoint("ln_2", "input"), neuron_in=("mlp.c_fc",), conv1d=True, out_bias="always",
    )
