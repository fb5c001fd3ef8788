"""Capture module inputs/outputs of any `nn.Module` with plain forward hooks.

Why plain hooks: they cost almost nothing on top of a forward pass, work on any module (ResNets,
MLPs, HF transformers), and let us stop the forward as soon as the last requested site has fired.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

from memprobe.backends import Backend
from memprobe.errors import MemprobeError
from memprobe.hookpoint import HookPoint
from memprobe.sites import hook_points

__all__ = ["HookPoint", "HooksBackend", "capture_modules", "hooked", "resolve_module", "run_with_hooks"]


class _StopForward(Exception):
    """Raised inside a hook once every requested site is captured, to skip the rest of the model."""


def _first_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    if hasattr(value, "last_hidden_state"):
        return value.last_hidden_state
    raise MemprobeError(f"cannot read a tensor from a module value of type {type(value).__name__}")


def resolve_module(root: nn.Module, path: str) -> nn.Module:
    """Return `root`'s submodule at dotted `path`, or fail naming the closest valid paths."""
    try:
        return root.get_submodule(path) if path else root
    except AttributeError:
        import difflib

        names = [n for n, _ in root.named_modules() if n]
        close = difflib.get_close_matches(path, names, n=5, cutoff=0.5)
        hint = f" Closest: {', '.join(close)}." if close else ""
        raise MemprobeError(f"no module '{path}' in {type(root).__name__}.{hint}") from None


@contextmanager
def hooked(
    root: nn.Module,
    points: dict[str, HookPoint],
    store: dict[str, torch.Tensor],
    *,
    stop_early: bool = True,
    detach: bool = True,
):
    """Register hooks that write each site's value into `store`; stop the forward when all fired.

    Used as a context manager around one forward call; hooks are always removed on exit.
    """
    pending = set(points)
    handles = []

    def make(site: str, point: HookPoint):
        def record(value: Any) -> None:
            t = _first_tensor(value)
            if point.transform is not None:
                t = point.transform(t)
            store[site] = t.detach() if detach else t
            pending.discard(site)
            if stop_early and not pending:
                raise _StopForward

        if point.io == "input":
            return lambda _m, args, kwargs: record(args[0] if args else next(iter(kwargs.values())))
        return lambda _m, _args, _kwargs, out: record(out)

    try:
        for site, point in points.items():
            module = resolve_module(root, point.module)
            hook = make(site, point)
            if point.io == "input":
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(hook, with_kwargs=True))
        yield store
    finally:
        for h in handles:
            h.remove()


def run_with_hooks(
    root: nn.Module,
    points: dict[str, HookPoint],
    *args: Any,
    stop_early: bool = True,
    **kwargs: Any,
) -> dict[str, torch.Tensor]:
    """Run `root(*args, **kwargs)` and return {site: tensor} for the requested hook points.

    With `stop_early`, the forward ends right after the last site fires (later layers never run).
    """
    if not points:
        raise MemprobeError("no sites requested: name at least one module or site to capture")
    out: dict[str, torch.Tensor] = {}
    with hooked(root, points, out, stop_early=stop_early), torch.no_grad():
        try:
            root(*args, **kwargs)
        except _StopForward:
            pass
    missing = set(points) - set(out)
    if missing:
        raise MemprobeError(
            f"sites {sorted(missing)} never fired during the forward pass: the modules exist but "
            "were not called (check the model's forward path)"
        )
    return out


def capture_modules(
    root: nn.Module,
    inputs: Any,
    modules: Sequence[str],
    *,
    io: Literal["input", "output"] = "output",
    spatial_mean: bool = False,
) -> dict[str, torch.Tensor]:
    """Capture the outputs (or inputs) of named submodules of any model for one batch.

    `spatial_mean=True` averages conv feature maps over their spatial axes, giving one value per
    channel (the unit definition of UnitMem for convolutions).
    """
    transform = (lambda t: t.mean(dim=tuple(range(2, t.ndim))) if t.ndim > 2 else t) if spatial_mean else None
    points = {m: HookPoint(m, io, transform) for m in modules}
    return run_with_hooks(root, points, inputs)


class HooksBackend(Backend):
    """Plain forward hooks on the HF model: no wrapper, no copies, the forward stops after the last site."""

    name = "hooks"

    def run(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, sites: list[str]
    ) -> dict[str, torch.Tensor]:
        points = {s: p.with_shape(*input_ids.shape) for s, p in hook_points(self.loaded.model, sites).items()}
        return run_with_hooks(
            self.loaded.model, points, input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        )
