"""Slimming (Chang et al.): a learned drop mask in [0, 1] with an L1 penalty.

The mask minimises the target likelihood; a penalty on background text keeps it from just breaking
the model (Chang et al.'s mask objectives keep other data's loss in check the same way).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from memprobe.intervene.localizers.base import Localizer
from memprobe.intervene.localizers.targets import (
    Target,
    background_logprob,
    mlp_intercept,
    mlp_shape,
    target_logprob,
)


class Slimming(Localizer):
    """Minimise target log-lik + l1 * sum(d) - keep_weight * background log-lik over drops d."""

    name = "slimming"

    def __init__(self, model: torch.nn.Module, steps: int = 30, lr: float = 0.1, l1: float = 1e-3,
                 keep_weight: float = 1.0, seed: int = 0) -> None:
        super().__init__(model, steps=steps, lr=lr, l1=l1, keep_weight=keep_weight, seed=seed)
        self.steps, self.lr, self.l1, self.keep_weight, self.seed = steps, lr, l1, keep_weight, seed

    def score(self, target: Target, background: Sequence[Target]) -> torch.Tensor:
        torch.manual_seed(self.seed)
        logit = torch.full(mlp_shape(self.model), -3.0, requires_grad=True)
        opt = torch.optim.Adam([logit], lr=self.lr)
        n_tok = max(target.n_scored, 1)
        for _ in range(self.steps):
            drop = torch.sigmoid(logit)
            with mlp_intercept(self.model, scales=1 - drop):
                loss = (target_logprob(self.model, target) / n_tok
                        - self.keep_weight * background_logprob(self.model, background))
            loss = loss + self.l1 * drop.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return torch.sigmoid(logit).detach()
