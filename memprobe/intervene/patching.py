"""Activation patching: where a memorized continuation is carried, layer by layer and position by position.

Why clean -> corrupted: the memorized prefix (clean) makes the model predict the memorized next
token; a perturbed prefix of the same length (corrupted) does not. Copying one clean activation
(site, layer, position) into the corrupted run and measuring how much of the memorized token's logit
difference comes back says how much of the memory passes through that spot. The score is
(LD_patched - LD_corrupt) / (LD_clean - LD_corrupt), with LD = logit(memorized token) - logit(the
corrupted run's own top token): 1 = fully restored, 0 = no effect.

The same computation runs through plain torch hooks, TransformerLens (`TransformerBridge` hooks) and
nnsight (`trace` with envoy assignment); tests check the three agree. Each forward patches a batch of
positions at once (row j patches position j), so one site costs one batched forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from memprobe.adapters import adapter_for
from memprobe.backends.torch_hooks import HookPoint, resolve_module
from memprobe.errors import MemprobeError
from memprobe.models import LoadedModel
from memprobe.sites import hook_point
from memprobe.studies.result import Result

SITE_KINDS = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out")


@dataclass
class PatchingResult(Result):
    """Restored fraction of the memorized logit difference, per site kind: (n_layers, n_positions).

    A study result (memprobe.studies.result): `to_dict`, `save(path)`, `plot(path, title=...)`."""

    effects: dict[str, np.ndarray]
    clean_ld: float
    corrupt_ld: float
    target_token: int
    foil_token: int
    tokens: list[str] = field(default_factory=list)
    backend: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"effects": {k: v.tolist() for k, v in self.effects.items()}, "clean_ld": self.clean_ld,
                "corrupt_ld": self.corrupt_ld, "target_token": self.target_token, "foil_token": self.foil_token,
                "tokens": self.tokens, "backend": self.backend}

    def figure(self, title: str = "") -> Any:
        import matplotlib.pyplot as plt

        kinds = list(self.effects)
        fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 5), squeeze=False)
        for ax, kind in zip(axes[0], kinds, strict=True):
            im = ax.imshow(self.effects[kind], aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, origin="lower")
            ax.set_title(kind)
            ax.set_xlabel("position")
            ax.set_ylabel("layer")
            ax.set_xticks(range(len(self.tokens)), [t[:8] for t in self.tokens], rotation=90, fontsize=6)
        fig.colorbar(im, ax=axes[0].tolist(), label="restored logit difference")
        fig.suptitle(title or "activation patching: clean (memorized) into corrupted prefix")
        return fig


def corrupt_prefix(ids: Sequence[int], n_swaps: int, vocab: Sequence[int], seed: int = 0) -> list[int]:
    """The prefix with `n_swaps` tokens (never the first, nor the last) replaced by others from `vocab`."""
    rng = np.random.default_rng(seed)
    out = list(ids)
    if len(out) < 3:
        raise MemprobeError("a prefix needs at least 3 tokens to be perturbed")
    for p in rng.choice(np.arange(1, len(out) - 1), size=min(n_swaps, len(out) - 2), replace=False):
        choices = [v for v in vocab if v != out[p]]
        out[int(p)] = int(rng.choice(choices))
    return out


def _patched(value: torch.Tensor, clean: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
    """Row j of `value` with position positions[j] replaced by the clean activation there."""
    out = value.clone()
    for row, pos in enumerate(positions):
        out[row, pos] = clean[0, pos].to(out.dtype)
    return out


class _Runner:
    """One backend's two operations: read a site's clean activation, and run with a site patched."""

    def __init__(self, kind: str, loaded: LoadedModel) -> None:
        from memprobe.backends import make_backend

        self.kind = kind
        self.loaded = loaded
        self.adapter = adapter_for(loaded.model)
        self.backend = make_backend(kind, loaded)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.kind == "lens":
                return self.backend.bridge(ids)
            if self.kind == "nnsight":
                with self.backend.wrapped.trace(ids):
                    out = self.backend.wrapped.output.save()
                return out.logits
            return self.loaded.model(input_ids=ids, use_cache=False).logits

    def clean(self, ids: torch.Tensor, sites: list[str]) -> dict[str, torch.Tensor]:
        return self.backend.run(ids, None, sites)

    def patched_logits(self, ids: torch.Tensor, site: str, clean: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
        batch = ids.expand(len(positions), -1)
        point = hook_point(self.adapter, site)
        if point.transform is not None:
            raise MemprobeError(f"{site} is part of a module's output ({point.module}); patch a whole module's site")
        with torch.no_grad():
            if self.kind == "lens":
                fn = lambda act, hook: _patched(act, clean, positions)  # noqa: E731
                with self.backend.bridge.hooks(fwd_hooks=[(site, fn)]):
                    return self.backend.bridge(batch)
            if self.kind == "nnsight":
                return self._sight(batch, point, clean, positions)
            return self._hooks(batch, point, clean, positions)

    @staticmethod
    def _patcher(point: HookPoint, batch: torch.Tensor, clean, positions):
        """value -> patched value; a module that sees (batch * seq, width) (OPT's MLP) is patched
        on its (batch, seq, width) view."""
        if not point.flat:
            return lambda value: _patched(value, clean, positions)
        return lambda value: _patched(value.reshape(*batch.shape, -1), clean, positions).reshape(value.shape)

    def _hooks(self, batch, point: HookPoint, clean, positions) -> torch.Tensor:
        module = resolve_module(self.loaded.model, point.module)
        patch = self._patcher(point, batch, clean, positions)
        if point.io == "input":
            def pre(_m, args, kwargs):
                if args:
                    return (patch(args[0]), *args[1:]), kwargs
                first = next(iter(kwargs))
                return args, {**kwargs, first: patch(kwargs[first])}
            handle = module.register_forward_pre_hook(pre, with_kwargs=True)
        else:
            def post(_m, _a, out):
                return (patch(out[0]), *out[1:]) if isinstance(out, tuple) else patch(out)
            handle = module.register_forward_hook(post)
        try:
            return self.loaded.model(input_ids=batch, use_cache=False).logits
        finally:
            handle.remove()

    def _sight(self, batch, point: HookPoint, clean, positions) -> torch.Tensor:
        wrapped = self.backend.wrapped
        env = wrapped
        for part in point.module.split("."):
            env = env[int(part)] if part.isdigit() else getattr(env, part)
        patch = self._patcher(point, batch, clean, positions)
        with wrapped.trace(batch):
            if point.io == "input":
                env.input = patch(env.input)
            else:
                out = env.output
                env.output = (patch(out[0]), *out[1:]) if isinstance(out, tuple) else patch(out)
            logits = wrapped.output.save()
        return logits.logits


def activation_patching(loaded: LoadedModel, clean_ids: Sequence[int], corrupt_ids: Sequence[int], target_token: int,
                        *, backend: str = "hooks", kinds: Sequence[str] = SITE_KINDS,
                        layers: Sequence[int] | None = None) -> PatchingResult:
    """Patch every (kind, layer, position) from the clean run into the corrupted run.

    `clean_ids` and `corrupt_ids` are equal-length prefixes; `target_token` is the memorized token
    that follows the clean prefix. `loaded` must be a fresh model for the lens/nnsight backends.
    """
    if len(clean_ids) != len(corrupt_ids):
        raise MemprobeError("clean and corrupted prefixes must have the same number of tokens (positions align)")
    runner = _Runner(backend, loaded)
    n_layers = runner.adapter.n_layers
    layers = list(range(n_layers)) if layers is None else list(layers)
    clean = torch.tensor([list(clean_ids)])
    corrupt = torch.tensor([list(corrupt_ids)])
    clean_logits = runner.logits(clean)[0, -1]
    corrupt_logits = runner.logits(corrupt)[0, -1]
    ranked = corrupt_logits.argsort(descending=True).tolist()
    foil = ranked[0] if ranked[0] != target_token else ranked[1]

    def ld(logits: torch.Tensor) -> torch.Tensor:
        return logits[..., target_token] - logits[..., foil]

    clean_ld, corrupt_ld = float(ld(clean_logits)), float(ld(corrupt_logits))
    if abs(clean_ld - corrupt_ld) < 1e-6:
        raise MemprobeError("the corrupted prefix does not change the memorized token's logit difference: "
                            "perturb more tokens")
    sites = [f"blocks.{i}.{k}" for k in kinds for i in layers]
    cache = runner.clean(clean, sites)
    positions = list(range(len(clean_ids)))
    effects = {k: np.full((n_layers, len(positions)), np.nan) for k in kinds}
    for site in sites:
        kind = site.split(".", 2)[2]
        layer = int(site.split(".")[1])
        out = runner.patched_logits(corrupt, site, cache[site], positions)[:, -1]
        effects[kind][layer] = ((ld(out) - corrupt_ld) / (clean_ld - corrupt_ld)).detach().cpu().numpy()
    tokens = [loaded.decode([t]) for t in clean_ids]
    return PatchingResult(effects, clean_ld, corrupt_ld, int(target_token), int(foil), tokens, backend)
