"""nnsight 0.8 backend: `TransformersModel` over the loaded HF model (or `NNsight` for any module).

nnsight needs module accesses in execution order inside a trace, so sites are read in the order
`memprobe.sites.resolve` returns (execution order), and the trace stops after the last one.
"""

from __future__ import annotations

import torch

from memprobe.backends import Backend
from memprobe.backends.torch_hooks import HookPoint, hooked
from memprobe.models import LoadedModel
from memprobe.sites import hook_points


class SightBackend(Backend):
    """Reads each site's module input/output through nnsight envoys and `.save()`."""

    name = "nnsight"

    def __init__(self, loaded: LoadedModel) -> None:
        super().__init__(loaded)
        self._claim("nnsight")
        from nnsight.modeling.transformers import TransformersModel

        self.wrapped = TransformersModel(loaded.model, tokenizer=loaded.tokenizer)
        self._orders: dict[tuple[str, ...], list[str]] = {}

    def _envoy(self, path: str):
        env = self.wrapped
        for part in path.split("."):
            env = env[int(part)] if part.isdigit() else getattr(env, part)
        return env

    def _in_execution_order(self, points: dict[str, HookPoint]) -> dict[str, HookPoint]:
        """Order sites as they fire in a real forward (one token), which nnsight requires."""
        key = tuple(points)
        if key not in self._orders:
            fired: dict[str, torch.Tensor] = {}
            one = torch.zeros(1, 1, dtype=torch.long, device=self.loaded.device)
            with hooked(self.loaded.model, points, fired, stop_early=False), torch.no_grad():
                self.loaded.model(input_ids=one, use_cache=False)
            self._orders[key] = list(fired)
        return {s: points[s] for s in self._orders[key]}

    def run(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, sites: list[str]
    ) -> dict[str, torch.Tensor]:
        ordered = self._in_execution_order(hook_points(self.loaded.model, sites))
        points = {s: p.with_shape(*input_ids.shape) for s, p in ordered.items()}
        envoys = [(site, self._envoy(p.module), p.io) for site, p in points.items()]
        transforms = {site: p.transform for site, p in points.items() if p.transform is not None}
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        saved = {}
        with torch.no_grad(), self.wrapped.trace({"input_ids": input_ids, "attention_mask": mask}) as tracer:
            for site, env, io in envoys:
                saved[site] = (env.input if io == "input" else env.output).save()
            tracer.stop()
        out = {s: v[0] if isinstance(v, tuple) else v for s, v in saved.items()}
        return {s: transforms[s](v) if s in transforms else v for s, v in out.items()}
