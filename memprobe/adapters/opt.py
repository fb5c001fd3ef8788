"""OPT: `model.decoder.layers`, no MLP container (the block's own `fc1` -> activation -> `fc2`),
`self_attn_layer_norm` before attention and the block's `final_layer_norm` before `fc1` (from
that norm on, the block runs on (batch * seq, width): those sites are reshaped back), learned
positions (`embed_positions`) and a final `model.decoder.final_layer_norm`.

When word_embed_proj_dim != hidden_size (OPT-350m) the embedding is projected up by `project_in`
(whose output is then hook_embed) and down again by `project_out` before `lm_head`. With
do_layer_norm_before=False (also OPT-350m) the norms come after each add: resid_mid is then the
output of `self_attn_layer_norm`, the residual stream is not a sum of writes, and the model may have
no final norm.
"""

from __future__ import annotations

from torch import nn

from memprobe.adapters.base import Adapter, find_prefix
from memprobe.hookpoint import HookPoint


def adapter(model: nn.Module, family: str = "opt") -> Adapter:
    layers = find_prefix(model, ("model.decoder.layers", "decoder.layers"), family)
    base = layers.removesuffix("layers")
    names = dict(model.named_modules())
    project_in = names.get(f"{base}project_in") is not None
    pre_ln = bool(getattr(model.config, "do_layer_norm_before", True))
    has_final = names.get(f"{base}final_layer_norm") is not None
    missing = {} if has_final else {"ln_final.hook_normalized": "this OPT checkpoint has no final layer norm "
                                    "(do_layer_norm_before=False)"}
    return Adapter(
        family=family, n_layers=len(model.get_submodule(layers)), layers=layers,
        embed=f"{base}project_in" if project_in else f"{base}embed_tokens", embed_matrix=not project_in,
        pos_embed=f"{base}embed_positions", unembed="lm_head",
        final_norm=f"{base}final_layer_norm" if has_final else None,
        attn="self_attn", attn_out_proj="self_attn.out_proj", attn_out="self_attn",
        mlp_in="fc1", mlp_out="fc2", mlp_out_site="fc2",
        resid_mid=HookPoint("final_layer_norm" if pre_ln else "self_attn_layer_norm", "input" if pre_ln else "output",
                            flat=True),
        neuron_in=("fc1",), post_ln=not pre_ln, flat_mlp=True,
        out_bias="always" if getattr(model.config, "enable_bias", True) else "none", missing=missing,
    )
