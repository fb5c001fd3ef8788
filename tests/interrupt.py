"""Kill a training run mid-way in tests of resuming (tests import it)."""

from __future__ import annotations

from torch import nn


class Interrupted(Exception):
    pass


def stop_after(model: nn.Module, n: int) -> nn.Module:
    """Make `model` raise Interrupted after `n` training forwards, like a run killed mid-way."""
    left = [n]

    def hook(module: nn.Module, args: tuple) -> None:
        if module.training:
            left[0] -= 1
            if left[0] < 0:
                raise Interrupted

    model.register_forward_pre_hook(hook)
    return model
