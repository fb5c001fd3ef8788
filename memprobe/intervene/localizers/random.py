"""Random scores: the same-size uniform baseline any localization method must beat."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from memprobe.intervene.localizers.base import Localizer
from memprobe.intervene.localizers.targets import Target, mlp_shape


class RandomScores(Localizer):
    """Uniform random scores from `seed` (the same for every target)."""

    name = "random"
    needs_target = False

    def __init__(self, model: torch.nn.Module, seed: int = 0) -> None:
        super().__init__(model, seed=seed)
        self.seed = seed

    def score(self, target: Target | None = None, background: Sequence[Target] = ()) -> torch.Tensor:
        return torch.rand(mlp_shape(self.model), generator=torch.Generator().manual_seed(self.seed))
