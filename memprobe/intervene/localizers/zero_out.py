"""Zero-out: drop each neuron alone and measure the change in target log-likelihood.

Exact, but one forward per neuron (batched `batch` at a time), so only for small models: the
ground truth the cheaper methods approximate.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from memprobe.intervene.localizers.base import Localizer
from memprobe.intervene.localizers.targets import Target, mlp_intercept, mlp_shape, target_logprob


class ZeroOut(Localizer):
    """Score = target log-lik with all neurons minus that with the neuron zeroed."""

    name = "zero_out"

    def __init__(self, model: torch.nn.Module, batch: int = 64) -> None:
        super().__init__(model, batch=batch)
        self.batch = batch

    @torch.no_grad()
    def score(self, target: Target, background: Sequence[Target] = ()) -> torch.Tensor:
        n_layers, width = mlp_shape(self.model)
        base = float(target_logprob(self.model, target))
        scores = torch.zeros(n_layers, width)
        flat = n_layers * width
        for start in range(0, flat, self.batch):
            cols = list(range(start, min(start + self.batch, flat)))
            scales = torch.ones(len(cols), n_layers, 1, width)
            for row, c in enumerate(cols):
                scales[row, c // width, 0, c % width] = 0.0
            lps = self._batched_logprob(target, scales)
            for row, c in enumerate(cols):
                scores[c // width, c % width] = base - lps[row]
        return scores

    def _batched_logprob(self, target: Target, scales: torch.Tensor) -> torch.Tensor:
        """Target log-likelihood under each of B scale settings (B, L, 1, width), one forward."""
        ids = target.token_ids[None].expand(scales.shape[0], -1)
        with mlp_intercept(self.model, scales=scales.transpose(0, 1)):
            logits = self.model(input_ids=ids, use_cache=False).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        return logp[:, target.positions[1:]].sum(1)
