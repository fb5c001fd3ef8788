"""`Adapter`: everything memprobe knows about one Hugging Face decoder family's module tree.

Why one place: capture, patching, neuron/low-rank/direction edits and their export into weights all
need the same facts (where the blocks are, which module's input is the MLP hidden activation, who
writes the residual stream, whether a projection is `nn.Linear` or GPT-2's transposed `Conv1D`).
Spelled out once per family, a new family is one file, and a fact the family lacks is refused with
its reason instead of being guessed.

Paths in an adapter are absolute (`layers`, `embed`, ...) or relative to block i (`attn`, `mlp_in`,
...). Canonical sites follow TransformerLens 4: `hook_attn_out` / `hook_mlp_out` are what is added
to the residual stream (after a post-norm where the family has one); `mlp.hook_pre` is the
pre-activation (the gate projection's output in gated MLPs), `mlp.hook_post` the input of the MLP
out-projection; parallel blocks (attention and MLP both read resid_pre, TransformerLens's
`ParallelBlockBridge`) have no `hook_resid_mid`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn

from memprobe.errors import MemprobeError
from memprobe.hookpoint import HookPoint

BLOCK_KINDS = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "mlp.hook_pre", "mlp.hook_post",
               "hook_mlp_out", "hook_resid_post")


def first_half(t: torch.Tensor) -> torch.Tensor:
    """The gate half of a fused [gate | up] projection output (Phi-3's `gate_up_proj`)."""
    return t.chunk(2, dim=-1)[0]


def find_prefix(model: nn.Module, candidates: Sequence[str], family: str) -> str:
    """The first candidate layer-list path present in `model` (CausalLM wrappers, bare base models)."""
    names = {n for n, _ in model.named_modules()}
    for path in candidates:
        if path in names:
            return path
    raise MemprobeError(f"{type(model).__name__} looks like {family} but has none of the layer lists "
                        f"{', '.join(candidates)}: use raw module paths as sites (--backend hooks or nnsight)")


@dataclass(frozen=True)
class Adapter:
    """One family's module paths and how edits fold into its weights (see the module docstring)."""

    family: str
    n_layers: int
    layers: str  # the ModuleList of blocks
    embed: str  # module whose output is hook_embed (token embedding; OPT's project_in when present)
    unembed: str  # the output head (lm_head)
    final_norm: str | None  # output is ln_final.hook_normalized; None where the family has none
    attn: str  # attention module (its output, first element, is the attention write)
    attn_out_proj: str  # attention's last linear layer (direction edits fold into it)
    attn_out: str  # module whose output is hook_attn_out (attention, or its post-norm)
    mlp_in: str  # module whose output is mlp.hook_pre
    mlp_out: str  # MLP out-projection: its input is mlp.hook_post, its weight takes the edits
    mlp_out_site: str  # module whose output is hook_mlp_out (the MLP, or its post-norm)
    resid_mid: HookPoint | None  # relative; None for parallel blocks
    neuron_in: tuple[str, ...] = ()  # projections whose output features are the MLP neurons (INJ)
    parallel: bool = False
    conv1d: bool = False  # HF Conv1D (GPT-2): weight is (in, out), the transpose of nn.Linear's
    post_norms: bool = False  # attention/MLP outputs are normalised before the residual add
    post_ln: bool = False  # the residual stream itself is normalised after each add (OPT-350m style)
    fused_gate_up: bool = False  # mlp_in computes [gate | up]; hook_pre is its first half
    flat_mlp: bool = False  # the MLP runs on (batch * seq, width) (OPT flattens before fc1)
    embed_matrix: bool = True  # `embed` is an embedding matrix (else a Linear, OPT's project_in)
    pos_embed: str | None = None  # learned absolute position embedding (also writes the residual)
    out_bias: Literal["always", "switch", "none"] = "none"  # bias of the out-projection
    bias_switch: tuple[str, ...] = ()  # with out_bias "switch": modules given zero biases (mlp_bias)
    missing: dict[str, str] = field(default_factory=dict)  # site kind -> why the family lacks it

    # -- paths ----------------------------------------------------------------------------------
    def block(self, i: int) -> str:
        return f"{self.layers}.{i}"

    def at(self, i: int, rel: str) -> str:
        """Absolute path of block i's submodule `rel`."""
        return f"{self.block(i)}.{rel}"

    def mlp_width(self, model: nn.Module) -> int:
        """d_mlp: the number of MLP neurons per layer (in-features of the out-projection)."""
        w = model.get_submodule(self.at(0, self.mlp_out)).weight
        return int(w.shape[0] if self.conv1d else w.shape[1])

    def d_model(self, model: nn.Module) -> int:
        """Width of the residual stream (out-features of the MLP out-projection)."""
        w = model.get_submodule(self.at(0, self.mlp_out)).weight
        return int(w.shape[1] if self.conv1d else w.shape[0])

    # -- sites ----------------------------------------------------------------------------------
    def has(self, kind: str) -> bool:
        return kind not in self.missing

    def lacks(self, kind: str) -> MemprobeError:
        return MemprobeError(f"{self.family} models have no '{kind}': {self.missing[kind]}")

    def point(self, layer: int | None, kind: str) -> HookPoint:
        """Where the canonical site (`layer`, `kind`) is read: module path + input/output."""
        if kind in self.missing:
            raise self.lacks(kind)
        if layer is None:
            if kind == "hook_embed":
                return HookPoint(self.embed, "output")
            if kind == "ln_final.hook_normalized" and self.final_norm is not None:
                return HookPoint(self.final_norm, "output")
            raise MemprobeError(f"'{kind}' is not a canonical site of {self.family} models")
        if not 0 <= layer < self.n_layers:
            raise MemprobeError(f"layer {layer} out of range: {self.family} model has layers 0..{self.n_layers - 1}")
        if kind == "hook_resid_pre":
            return HookPoint(self.block(layer), "input")
        if kind == "hook_resid_post":
            return HookPoint(self.block(layer), "output")
        if kind == "hook_attn_out":
            return HookPoint(self.at(layer, self.attn_out), "output")
        if kind == "hook_resid_mid" and self.resid_mid is not None:
            return replace(self.resid_mid, module=self.at(layer, self.resid_mid.module))
        if kind == "mlp.hook_pre":
            return HookPoint(self.at(layer, self.mlp_in), "output", first_half if self.fused_gate_up else None,
                             flat=self.flat_mlp)
        if kind == "mlp.hook_post":
            return HookPoint(self.at(layer, self.mlp_out), "input", flat=self.flat_mlp)
        if kind == "hook_mlp_out":
            return HookPoint(self.at(layer, self.mlp_out_site), "output", flat=self.flat_mlp)
        raise MemprobeError(f"'{kind}' is not a canonical block site; kinds: {', '.join(BLOCK_KINDS)}")

    # -- residual writes (direction edits) ------------------------------------------------------
    def _check_linear_residual(self) -> None:
        if self.post_norms or self.post_ln:
            why = ("normalises attention/MLP outputs before adding them (post-norms)" if self.post_norms
                   else "normalises the residual stream after every add (do_layer_norm_before=False)")
            raise MemprobeError(f"direction edits need residual writes that are linear in the weights; this "
                                f"{self.family} model {why}, so projecting them out would not be exact. "
                                "Use a neuron or low-rank edit instead.")

    def residual_writers(self) -> list[str]:
        """Modules whose outputs are added to the residual stream, in execution order."""
        self._check_linear_residual()
        writers = [self.embed] + ([self.pos_embed] if self.pos_embed else [])
        for i in range(self.n_layers):
            writers += [self.at(i, self.attn_out), self.at(i, self.mlp_out_site)]
        return writers

    def lens_residual_writes(self) -> list[str]:
        """The same writes as TransformerLens hook names."""
        self._check_linear_residual()
        names = ["hook_embed"] + (["hook_pos_embed"] if self.pos_embed else [])
        for i in range(self.n_layers):
            names += [f"blocks.{i}.hook_attn_out", f"blocks.{i}.hook_mlp_out"]
        return names

    # -- folding edits into a state dict --------------------------------------------------------
    def out_weight(self, state: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
        """Layer's out-projection weight as a (d_model, d_mlp) view of the state tensor (in-place edits
        write through; Conv1D's (d_mlp, d_model) weight is transposed)."""
        w = state[f"{self.at(layer, self.mlp_out)}.weight"]
        return w.T if self.conv1d else w

    def fold_neurons(self, state: dict[str, torch.Tensor], config: Any, neurons: dict[int, torch.Tensor],
                     strength: float, means: dict[int, torch.Tensor] | None) -> None:
        """Zero/mean ablation: scale the neurons' out-projection columns by (1 - s); a mean ablation
        also adds s * W[:, idx] @ means to the out-projection bias (created where the family can)."""
        needs_bias = means is not None and strength != 0
        if needs_bias and self.out_bias == "none":
            raise MemprobeError(f"{self.family} models have no bias on the MLP out-projection (and no "
                                "mlp_bias option): mean ablation cannot be baked into the weights exactly; "
                                "use zero ablation (no --mean)")
        if needs_bias and self.out_bias == "switch" and not config.mlp_bias:
            config.mlp_bias = True
            for i in range(self.n_layers):
                for rel in self.bias_switch:
                    w = state[f"{self.at(i, rel)}.weight"]
                    state[f"{self.at(i, rel)}.bias"] = torch.zeros(w.shape[0], dtype=w.dtype)
        for layer, idx in neurons.items():
            w = self.out_weight(state, layer)
            if needs_bias:
                bias = f"{self.at(layer, self.mlp_out)}.bias"
                state[bias] += strength * (w[:, idx] @ means[layer].to(w.dtype))
            w[:, idx] *= 1.0 - strength

    def fold_low_rank(self, state: dict[str, torch.Tensor], deltas: dict[int, torch.Tensor]) -> None:
        """Add each (d_model, d_mlp) delta to the layer's out-projection weight."""
        for layer, delta in deltas.items():
            w = self.out_weight(state, layer)
            w += delta.to(w.dtype)

    def fold_direction(self, state: dict[str, torch.Tensor], config: Any, proj: torch.Tensor) -> None:
        """Left-multiply every residual write by P = I - s d d^T: the attention and MLP out-projections
        (weights and biases), the embedding matrices (right-multiplied; the output head is untied first
        so only the input side changes) or OPT's project_in."""
        self._check_linear_residual()
        outs = [self.at(i, rel) for i in range(self.n_layers) for rel in (self.attn_out_proj, self.mlp_out)]
        if not self.embed_matrix:
            outs.insert(0, self.embed)
        for key in outs:
            w = state[f"{key}.weight"]
            state[f"{key}.weight"] = ((w.double() @ proj) if self.conv1d else (proj @ w.double())).to(w.dtype)
            if f"{key}.bias" in state:
                state[f"{key}.bias"] = (proj @ state[f"{key}.bias"].double()).to(w.dtype)
        matrices = ([self.embed] if self.embed_matrix else []) + ([self.pos_embed] if self.pos_embed else [])
        for key in matrices:
            emb = state[f"{key}.weight"]
            if key == self.embed and getattr(config, "tie_word_embeddings", False):
                state[f"{self.unembed}.weight"] = emb.clone()
                config.tie_word_embeddings = False
            state[f"{key}.weight"] = (emb.double() @ proj).to(emb.dtype)


AdapterBuilder = Callable[[nn.Module], Adapter]
