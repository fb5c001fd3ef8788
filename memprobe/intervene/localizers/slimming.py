"""Slimming (Chang et al.): a learned drop mask in [0, 1] with an L1 penalty.

The mask minimises the target likelihood; a penalty on background text keeps it from just breaking
the model (Chang et al.'s mask objectives keep other data's loss in check the same way).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from memprobe.intervene.localizers.base import Localizer
from memprobe.intervene.localizers.drop_mask import train_drop_mask
from memprobe.intervene.localizers.targets import Target


class Slimming(Localizer):
    """Minimise target log-lik + l1 * sum(d) - keep_weight * background log-lik over drops d."""

    name = "slimming"

    def __init__(self, model: torch.nn.Module, steps: int = 30, lr: float = 0.1, l1: float = 1e-3,
                 keep_weight: float = 1.0, seed: int = 0) -> None:
        super().__init__(model, steps=steps, lr=lr, l1=l1, keep_weight=keep_weight, seed=seed)
        self.steps, self.lr, self.l1, self.keep_weight, self.seed = steps, lr, l1, keep_weight, seed

    def score(self, target: Target, background: Sequence[Target]) -> torch.Tensor:
        torch.manual_seed(self.seed)
        logit = train_drop_mask(self.model, target, background, steps=self.steps, lr=self.lr,
                                keep_weight=self.keep_weight, drop=torch.sigmoid,
                                penalty=lambda _logit, drop: self.l1 * drop.sum())
        return torch.sigmoid(logit)
