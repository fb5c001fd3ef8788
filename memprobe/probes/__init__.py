"""Neuron-level memorization probes: estimators, per-site sweeps, the probe artefact.

Slonski (2024) finds that linear probes on activations separate memorized tokens from others far
better than output probabilities do; this package fits such probes (dense and top-k sparse), sweeps
every site of a store at once, and ships a trained probe that `memprobe probe score` applies.
"""

from memprobe.probes.artefact import (
    default_probe_dir,
    load_probe,
    memorization_direction,
    probe_capture_sites,
    probe_tokens,
    save_directions,
    save_probe,
    score_documents,
    train_probe,
)
from memprobe.probes.estimators import LogisticProbe, TopKProbe, fit_logistic_batch
from memprobe.probes.evaluate import detection, document_bootstrap
from memprobe.probes.features import read_rows, window_mean
from memprobe.probes.sweep import ProbeSweep

__all__ = ["LogisticProbe", "ProbeSweep", "TopKProbe", "default_probe_dir", "detection", "document_bootstrap",
           "fit_logistic_batch", "load_probe", "memorization_direction", "probe_capture_sites", "probe_tokens",
           "read_rows", "save_directions", "save_probe", "score_documents", "train_probe", "window_mean"]
