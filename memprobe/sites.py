"""Site names: TransformerLens hook names are canonical; raw HF module paths are accepted too.

A site is a string. `blocks.3.hook_resid_post` means the same activation whichever backend reads it;
this module knows where each canonical site lives in a Hugging Face decoder (Llama-style or Gemma-3
style, which adds norms after attention and MLP), so the plain-hook backend can read it directly.
`blocks.*.hook_resid_post` selects every layer; unknown names fail with the closest valid ones.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass

from torch import nn

from memprobe.backends.torch_hooks import HookPoint
from memprobe.errors import MemprobeError

# Per-block sites, in the order they are computed inside a block (nnsight needs execution order).
BLOCK_SITES = (
    "hook_resid_pre",
    "hook_attn_out",
    "hook_resid_mid",
    "mlp.hook_pre",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
)
GLOBAL_SITES = ("hook_embed", "ln_final.hook_normalized")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class DecoderLayout:
    """Where the pieces of a HF decoder-only model live (module paths)."""

    layers: str  # e.g. "model.layers"
    n_layers: int
    post_norms: bool  # Gemma-style: attention/MLP outputs pass through their own norm before the add
    embed: str
    final_norm: str

    @classmethod
    def of(cls, model: nn.Module) -> DecoderLayout:
        names = dict(model.named_modules())
        for layers in ("model.layers", "model.language_model.layers", "transformer.h"):
            if layers in names:
                break
        else:
            raise MemprobeError(
                f"{type(model).__name__} is not a supported decoder layout (no model.layers): "
                "use raw module paths as sites, or the torch-hook backend on any module"
            )
        base = layers.rsplit(".", 1)[0]
        n = len(names[layers])
        return cls(
            layers=layers,
            n_layers=n,
            post_norms=f"{layers}.0.pre_feedforward_layernorm" in names,
            embed=f"{base}.embed_tokens",
            final_norm=f"{base}.norm",
        )

    def block(self, i: int) -> str:
        return f"{self.layers}.{i}"


def catalog(layout: DecoderLayout) -> list[str]:
    """Every canonical site of a model, in execution order."""
    sites = ["hook_embed"]
    for i in range(layout.n_layers):
        sites += [f"blocks.{i}.{s}" for s in BLOCK_SITES]
    return sites + ["ln_final.hook_normalized"]


def hook_point(layout: DecoderLayout, site: str) -> HookPoint:
    """Where a canonical site is read in the HF module tree (module path + input/output)."""
    if site == "hook_embed":
        return HookPoint(layout.embed, "output")
    if site == "ln_final.hook_normalized":
        return HookPoint(layout.final_norm, "output")
    m = _BLOCK_RE.match(site)
    if not m or int(m.group(1)) >= layout.n_layers or m.group(2) not in BLOCK_SITES:
        raise MemprobeError(f"'{site}' is not a canonical site of this model")
    b, kind = layout.block(int(m.group(1))), m.group(2)
    post = layout.post_norms
    return {
        "hook_resid_pre": HookPoint(b, "input"),
        "hook_resid_post": HookPoint(b, "output"),
        "hook_attn_out": HookPoint(f"{b}.post_attention_layernorm" if post else f"{b}.self_attn", "output"),
        "hook_resid_mid": HookPoint(f"{b}.pre_feedforward_layernorm" if post else f"{b}.post_attention_layernorm", "input"),
        "mlp.hook_pre": HookPoint(f"{b}.mlp.gate_proj", "output"),
        "mlp.hook_post": HookPoint(f"{b}.mlp.down_proj", "input"),
        "hook_mlp_out": HookPoint(f"{b}.post_feedforward_layernorm" if post else f"{b}.mlp", "output"),
    }[kind]


def layer_of(site: str) -> int | None:
    """Block index of a canonical site (None for embed/final sites)."""
    m = _BLOCK_RE.match(site)
    return int(m.group(1)) if m else None


def site_kind(site: str) -> str:
    """'hook_resid_post', 'mlp.hook_post', ... : the site with its layer removed (for heatmap rows)."""
    m = _BLOCK_RE.match(site)
    return m.group(2) if m else site


def resolve(model: nn.Module, patterns: str | list[str]) -> list[str]:
    """Expand site patterns (canonical names, HF module paths, globs) to concrete sites.

    Canonical sites come back in execution order, HF module paths after them in module order.
    """
    if isinstance(patterns, str):
        patterns = [p.strip() for p in patterns.split(",")]
    patterns = [p for p in patterns if p]
    if not patterns:
        raise MemprobeError("no sites given: pass e.g. --sites 'blocks.*.hook_resid_post'")
    layout = DecoderLayout.of(model)
    canonical = catalog(layout)
    modules = [n for n, _ in model.named_modules() if n]
    chosen: set[str] = set()
    for pat in patterns:
        hits = [s for s in canonical if fnmatch.fnmatchcase(s, pat)]
        hits = hits or [n for n in modules if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            close = difflib.get_close_matches(pat, canonical + modules, n=5, cutoff=0.5)
            hint = f" Closest valid names: {', '.join(close)}." if close else ""
            raise MemprobeError(
                f"unknown site '{pat}'.{hint} Canonical sites look like blocks.<i>.<kind> with kind in "
                f"{', '.join(BLOCK_SITES)} (layers 0..{layout.n_layers - 1}); raw module paths like "
                f"{layout.block(0)}.mlp are accepted too."
            )
        chosen.update(hits)
    order = {s: i for i, s in enumerate(canonical + modules)}
    return sorted(chosen, key=order.__getitem__)


def hook_points(model: nn.Module, sites: list[str]) -> dict[str, HookPoint]:
    """HookPoints for resolved sites: canonical ones via the layout, module paths read as outputs."""
    layout = DecoderLayout.of(model)
    canonical = set(catalog(layout))
    return {s: hook_point(layout, s) if s in canonical else HookPoint(s, "output") for s in sites}
