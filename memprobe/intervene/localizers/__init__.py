"""Neuron localization methods after Chang et al. (NAACL 2024): which MLP neurons carry a sequence.

One file per method, one shape for all: `LOCALIZERS[name](model, **hyperparameters)
.localize(targets, background)` returns a `LocalizationResult` of (n_layers, d_mlp) scores (higher =
dropping the neuron hurts the memorized continuation more); `result.top(fraction)` is the edit.
"""

from __future__ import annotations

from memprobe.errors import MemprobeError
from memprobe.intervene.localizers.activations import Activations
from memprobe.intervene.localizers.attribution import Attribution
from memprobe.intervene.localizers.base import LocalizationResult, Localizer
from memprobe.intervene.localizers.hard_concrete import HardConcrete
from memprobe.intervene.localizers.integrated_gradients import IntegratedGradients
from memprobe.intervene.localizers.probe_neurons import ProbeNeurons
from memprobe.intervene.localizers.random import RandomScores
from memprobe.intervene.localizers.slimming import Slimming
from memprobe.intervene.localizers.targets import (
    Target,
    mean_activations,
    mlp_intercept,
    mlp_shape,
    target_logprob,
    top_neurons,
)
from memprobe.intervene.localizers.zero_out import ZeroOut

LOCALIZERS: dict[str, type[Localizer]] = {
    cls.name: cls
    for cls in (Activations, Attribution, IntegratedGradients, Slimming, HardConcrete, ZeroOut,
                ProbeNeurons, RandomScores)
}


def localizer(name: str) -> type[Localizer]:
    """The localizer class registered as `name` (a clear error listing the known ones)."""
    if name not in LOCALIZERS:
        raise MemprobeError(f"unknown localizer {name!r}: choose one of {', '.join(LOCALIZERS)}")
    return LOCALIZERS[name]


__all__ = [
    "LOCALIZERS", "Activations", "Attribution", "HardConcrete", "IntegratedGradients",
    "LocalizationResult", "Localizer", "ProbeNeurons", "RandomScores", "Slimming", "Target",
    "ZeroOut", "localizer", "mean_activations", "mlp_intercept", "mlp_shape", "target_logprob",
    "top_neurons",
]
