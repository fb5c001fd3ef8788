"""Hard Concrete (Chang et al., after Louizos et al. 2018): stochastic drop gates, expected-L0 penalty.

Gates are sampled, stretched and clipped; the score is each gate's expected open probability. A
penalty on background text keeps the gates from just breaking the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from memprobe.intervene.localizers.base import Localizer
from memprobe.intervene.localizers.drop_mask import train_drop_mask
from memprobe.intervene.localizers.targets import Target, mlp_shape


class HardConcrete(Localizer):
    """Learn hard-concrete drop gates minimising target log-lik + l0 * E[L0] - keep * background."""

    name = "hard_concrete"

    def __init__(self, model: torch.nn.Module, steps: int = 30, lr: float = 0.1, l0: float = 1e-3,
                 keep_weight: float = 1.0, seed: int = 0, beta: float = 2 / 3,
                 limits: tuple[float, float] = (-0.1, 1.1)) -> None:
        super().__init__(model, steps=steps, lr=lr, l0=l0, keep_weight=keep_weight, seed=seed,
                         beta=beta, limits=list(limits))
        self.steps, self.lr, self.l0, self.keep_weight = steps, lr, l0, keep_weight
        self.seed, self.beta, self.limits = seed, beta, limits

    def score(self, target: Target, background: Sequence[Target]) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        shape = mlp_shape(self.model)
        lo, hi = self.limits
        shift = self.beta * math.log(-lo / hi)

        def sampled_drop(log_alpha: torch.Tensor) -> torch.Tensor:  # a fresh gate sample every step
            u = torch.rand(shape, generator=gen).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((u.log() - (1 - u).log() + log_alpha) / self.beta)
            return (s * (hi - lo) + lo).clamp(0, 1)

        def expected_l0(log_alpha: torch.Tensor, _drop: torch.Tensor) -> torch.Tensor:
            return self.l0 * torch.sigmoid(log_alpha - shift).sum()

        log_alpha = train_drop_mask(self.model, target, background, steps=self.steps, lr=self.lr,
                                    keep_weight=self.keep_weight, drop=sampled_drop, penalty=expected_l0)
        return torch.sigmoid(log_alpha - shift)
