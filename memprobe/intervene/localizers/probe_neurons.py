"""Probe neurons: the k neurons a sparse (top-k) logistic probe picks to tell the target's
positions from background text (memprobe.probes.TopKProbe)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from memprobe.errors import MemprobeError
from memprobe.intervene.localizers.base import Localizer
from memprobe.intervene.localizers.targets import Target, mlp_activations, mlp_shape


class ProbeNeurons(Localizer):
    """Chosen neurons score by rank (k for the best ... 1), every other neuron 0."""

    name = "probe_neurons"

    def __init__(self, model: torch.nn.Module, k: int) -> None:
        super().__init__(model, k=k)
        self.k = k

    def score(self, target: Target, background: Sequence[Target]) -> torch.Tensor:
        from memprobe.probes import TopKProbe

        if not background:
            raise MemprobeError("probe_neurons needs background text (the probe's negative class)")
        pos = mlp_activations(self.model, target)[:, target.feeding_positions()]  # (L, n, d_mlp)
        neg = torch.cat([mlp_activations(self.model, b) for b in background], dim=1)

        def flat(a: torch.Tensor) -> np.ndarray:
            return a.permute(1, 0, 2).reshape(a.shape[1], -1).double().numpy()

        x = np.concatenate([flat(pos), flat(neg)])
        y = np.r_[np.ones(pos.shape[1]), np.zeros(neg.shape[1])]
        probe = TopKProbe(k=self.k).fit(x, y)
        scores = torch.zeros(mlp_shape(self.model))
        for rank, n in enumerate(probe.neurons_):
            scores.view(-1)[int(n)] = float(self.k - rank)
        return scores
