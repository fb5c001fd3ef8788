"""Activations (Chang et al.): mean |activation| on the target minus that on background text.

Cheap (no gradient): neurons that fire much harder on the memorized continuation than on ordinary
text are the candidates.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from memprobe.intervene.localizers.base import Localizer
from memprobe.intervene.localizers.targets import Target, mlp_activations


class Activations(Localizer):
    """Mean |activation| over the positions feeding the target tokens, minus the background mean."""

    name = "activations"

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)

    def score(self, target: Target, background: Sequence[Target]) -> torch.Tensor:
        score = mlp_activations(self.model, target)[:, target.feeding_positions()].abs().mean(1)
        if background:
            rest = [mlp_activations(self.model, b).abs().mean(1) for b in background]
            score = score - torch.stack(rest).mean(0)
        return score
