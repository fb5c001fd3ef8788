"""Attribution patching: activation x gradient of the target log-likelihood.

The first-order estimate of replacing each neuron by a baseline (zero, or the neurons' means for
mean ablation), summed over positions: one backward pass for every neuron at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from memprobe.intervene.localizers.base import Localizer
from memprobe.intervene.localizers.targets import Target, scaled_gradients


class Attribution(Localizer):
    """sum_pos (a - baseline) * dlogp/da, `baseline` (n_layers, d_mlp) or zero when None."""

    name = "attribution"

    def __init__(self, model: torch.nn.Module, baseline: torch.Tensor | None = None) -> None:
        super().__init__(model, baseline=baseline)
        self.baseline = baseline

    def score(self, target: Target, background: Sequence[Target] = ()) -> torch.Tensor:
        act_grad, grad = scaled_gradients(self.model, target)
        return act_grad if self.baseline is None else act_grad - self.baseline * grad
