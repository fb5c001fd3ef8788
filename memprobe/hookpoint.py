"""`HookPoint`: where one site is read in a module tree. Its own module so that site naming
(`memprobe.sites`), the family adapters and the hook backend can all import it without a cycle."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch


@dataclass(frozen=True)
class HookPoint:
    """Where a site lives in a module tree: `module` path, and whether we read its input or output.

    `transform`, when given, maps the raw tensor to the site's value (for example a spatial mean, or
    the gate half of a fused gate/up projection). `flat`: the module sees (batch * seq, width), as
    OPT's fc1/fc2 do; `with_shape` turns such a point into one that reads (batch, seq, width).
    """

    module: str
    io: Literal["input", "output"] = "output"
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    flat: bool = False

    def with_shape(self, batch: int, seq: int) -> HookPoint:
        """This point reading (batch, seq, width) for inputs of that shape (itself unless `flat`)."""
        if not self.flat:
            return self
        inner = self.transform

        def unflatten(t: torch.Tensor) -> torch.Tensor:
            t = t.reshape(batch, seq, -1)
            return inner(t) if inner is not None else t

        return replace(self, transform=unflatten, flat=False)
