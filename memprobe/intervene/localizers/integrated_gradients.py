"""Integrated gradients from the zero-activation baseline, all layers scaled together on the path.

A midpoint Riemann sum with `steps` points; attribution patching is its one-step version.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from memprobe.intervene.localizers.base import Localizer
from memprobe.intervene.localizers.targets import Target, mlp_shape, scaled_gradients


class IntegratedGradients(Localizer):
    """IG of the target log-likelihood w.r.t. every MLP neuron (`steps` backward passes)."""

    name = "integrated_gradients"

    def __init__(self, model: torch.nn.Module, steps: int = 8) -> None:
        super().__init__(model, steps=steps)
        self.steps = steps

    def score(self, target: Target, background: Sequence[Target] = ()) -> torch.Tensor:
        total = torch.zeros(mlp_shape(self.model))
        for k in range(self.steps):
            total += scaled_gradients(self.model, target, (k + 0.5) / self.steps)[0]
        return total / self.steps
