"""Site names: TransformerLens hook names are canonical; raw HF module paths are accepted too.

A site is a string. `blocks.3.hook_resid_post` means the same activation whichever backend reads it;
where each canonical site lives in a model is its family adapter's business (`memprobe.adapters`),
so this module only parses names, expands globs and lists a model's sites.
`blocks.*.hook_resid_post` selects every layer; unknown names fail with the closest valid ones.
"""

from __future__ import annotations

import difflib
import fnmatch
import re

from torch import nn

from memprobe.adapters import BLOCK_KINDS, Adapter, adapter_for
from memprobe.errors import MemprobeError
from memprobe.hookpoint import HookPoint

# Per-block sites, in the order they are computed inside a block (nnsight needs execution order).
BLOCK_SITES = BLOCK_KINDS
GLOBAL_SITES = ("hook_embed", "ln_final.hook_normalized")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def catalog(adapter: Adapter) -> list[str]:
    """Every canonical site of a model (those its family has), in execution order."""
    sites = ["hook_embed"]
    kinds = [k for k in BLOCK_SITES if adapter.has(k)]
    for i in range(adapter.n_layers):
        sites += [f"blocks.{i}.{s}" for s in kinds]
    return sites + (["ln_final.hook_normalized"] if adapter.has("ln_final.hook_normalized") else [])


def parse(site: str) -> tuple[int | None, str]:
    """(layer, kind) of a canonical site name; layer is None for embed/final sites."""
    m = _BLOCK_RE.match(site)
    return (int(m.group(1)), m.group(2)) if m else (None, site)


def hook_point(adapter: Adapter, site: str) -> HookPoint:
    """Where a canonical site is read in the HF module tree (module path + input/output)."""
    layer, kind = parse(site)
    if kind not in BLOCK_SITES + GLOBAL_SITES or (layer is None) != (kind in GLOBAL_SITES):
        raise MemprobeError(f"'{site}' is not a canonical site of this model")
    return adapter.point(layer, kind)


def layer_of(site: str) -> int | None:
    """Block index of a canonical site (None for embed/final sites)."""
    return parse(site)[0]


def site_kind(site: str) -> str:
    """'hook_resid_post', 'mlp.hook_post', ... : the site with its layer removed (for heatmap rows)."""
    return parse(site)[1]


def resolve(model: nn.Module, patterns: str | list[str]) -> list[str]:
    """Expand site patterns (canonical names, HF module paths, globs) to concrete sites.

    Canonical sites come back in execution order, HF module paths after them in module order.
    A model outside the supported families still takes raw module paths.
    """
    if isinstance(patterns, str):
        patterns = [p.strip() for p in patterns.split(",")]
    patterns = [p for p in patterns if p]
    if not patterns:
        raise MemprobeError("no sites given: pass e.g. --sites 'blocks.*.hook_resid_post'")
    modules = [n for n, _ in model.named_modules() if n]
    adapter: Adapter | None = None
    no_adapter = ""
    try:
        adapter = adapter_for(model)
    except MemprobeError as exc:
        no_adapter = str(exc)
    canonical = catalog(adapter) if adapter is not None else []
    chosen: set[str] = set()
    for pat in patterns:
        hits = [s for s in canonical if fnmatch.fnmatchcase(s, pat)]
        hits = hits or [n for n in modules if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise _unknown(pat, adapter, no_adapter, canonical, modules)
        chosen.update(hits)
    order = {s: i for i, s in enumerate(canonical + modules)}
    return sorted(chosen, key=order.__getitem__)


def _unknown(pat: str, adapter: Adapter | None, no_adapter: str, canonical: list[str],
             modules: list[str]) -> MemprobeError:
    if adapter is None and (pat in GLOBAL_SITES or _BLOCK_RE.match(pat)):
        return MemprobeError(f"canonical site '{pat}' needs a supported model family: {no_adapter}")
    kind = parse(pat)[1]
    if adapter is not None and not adapter.has(kind):
        return adapter.lacks(kind)
    close = difflib.get_close_matches(pat, canonical + modules, n=5, cutoff=0.5)
    hint = f" Closest valid names: {', '.join(close)}." if close else ""
    where = (f" (layers 0..{adapter.n_layers - 1}); raw module paths like {adapter.block(0)} are accepted too"
             if adapter is not None else "; raw module paths are accepted too")
    return MemprobeError(f"unknown site '{pat}'.{hint} Canonical sites look like blocks.<i>.<kind> with kind "
                         f"in {', '.join(BLOCK_SITES)}{where}.")


def hook_points(model: nn.Module, sites: list[str]) -> dict[str, HookPoint]:
    """HookPoints for resolved sites: canonical ones via the family adapter, module paths read as outputs."""
    adapter = None
    points = {}
    for s in sites:
        layer, kind = parse(s)
        if kind in BLOCK_SITES + GLOBAL_SITES and (layer is None) == (kind in GLOBAL_SITES):
            adapter = adapter or adapter_for(model)
            points[s] = adapter.point(layer, kind)
        else:
            points[s] = HookPoint(s, "output")
    return points
