"""The one shape every localizer shares (as Captum's attribution methods do).

`Localizer(model, **hyperparameters)` holds the model and settings; `.localize(targets, background)`
runs the method and returns a `LocalizationResult` that can `to_dict()`, `save()` and `plot()`.
A method implements `score(target, background)` for one target; several targets are localized one
at a time and their scores averaged, so a single target gives exactly the method's own scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from memprobe.errors import MemprobeError
from memprobe.intervene.ablation import NeuronEdit
from memprobe.intervene.localizers.targets import Target, top_neurons
from memprobe.studies.result import Result


@dataclass
class LocalizationResult(Result):
    """Per-neuron scores (n_layers, d_mlp) from one method: higher = dropping it hurts the target more."""

    method: str
    scores: torch.Tensor
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    n_targets: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "hyperparameters": self.hyperparameters,
            "n_targets": self.n_targets,
            "shape": list(self.scores.shape),
            "scores": self.scores.tolist(),
        }

    def top(self, fraction: float | None = None, **kwargs: Any) -> NeuronEdit:
        """The edit that drops the top-scoring neurons (see `top_neurons`)."""
        return top_neurons(self.scores, fraction, **kwargs)

    def figure(self, **kwargs: Any) -> Any:
        from memprobe.plots import plt

        fig, ax = plt.subplots(figsize=(8, 0.3 * self.scores.shape[0] + 1.5))
        im = ax.imshow(self.scores.float().numpy(), aspect="auto", cmap="viridis",
                       interpolation="nearest")
        ax.set_xlabel("MLP neuron")
        ax.set_ylabel("layer")
        ax.set_title(f"{self.method} scores ({self.n_targets} target(s))")
        fig.colorbar(im, ax=ax)
        return fig


class Localizer:
    """Base: built on a model with the method's hyperparameters; `localize` is the one verb."""

    name: ClassVar[str] = ""
    needs_target: ClassVar[bool] = True

    def __init__(self, model: nn.Module, **hyperparameters: Any) -> None:
        self.model = model
        self.hyperparameters = hyperparameters

    def score(self, target: Target | None, background: Sequence[Target]) -> torch.Tensor:
        raise NotImplementedError

    def localize(
        self, targets: Target | Sequence[Target] = (), background: Sequence[Target] = ()
    ) -> LocalizationResult:
        """Score every MLP neuron for `targets` (one or several), against `background` text."""
        targets = [targets] if isinstance(targets, Target) else list(targets)
        background = list(background)
        if not targets:
            if self.needs_target:
                raise MemprobeError(f"{self.name} needs at least one target to localize")
            scores = self.score(None, background)
        else:
            scores = self.score(targets[0], background)
            for t in targets[1:]:
                scores = scores + self.score(t, background)
            if len(targets) > 1:
                scores = scores / len(targets)
        return LocalizationResult(self.name, scores, _jsonable(self.hyperparameters), len(targets))


def _jsonable(params: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in params.items()}
