"""A priori memorization prediction: score samples from an early checkpoint, judge against final labels.

Dentan et al.'s protocol: capture hidden representations early in training (the first checkpoint where
the median training loss is <= 5% of its initial value), compute PSMI per layer, and see how well a low
PSMI flags the samples that end up memorized, next to two cheap baselines read at the same checkpoint:
the per-sample loss (high = suspicious) and the logit margin (low = suspicious).

The hidden representations come from `memprobe.capture.capture_outputs`: this module reads arrays.
"""

from __future__ import annotations

import numpy as np

from memprobe.metrics import bootstrap_ci, detection_summary
from memprobe.predict.smi import pointwise_smi


def psmi_per_layer(features: dict[str, np.ndarray], labels: np.ndarray, *, n_directions: int = 2000,
                   seed: int = 0) -> dict[str, np.ndarray]:
    """PSMI of every sample at every layer, the same seed (hence directions per width) for each layer."""
    return {name: pointwise_smi(x, labels, n_directions=n_directions, seed=seed) for name, x in features.items()}


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the precision-recall curve (sklearn's step-wise AP): chance level = the positive rate."""
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(np.asarray(labels).astype(bool), np.asarray(scores, dtype=np.float64)))


def evaluate_predictors(predictors: dict[str, np.ndarray], memorized: np.ndarray, *, n_boot: int = 0,
                        seed: int = 0) -> dict[str, dict]:
    """detection_summary of each predictor (higher = more likely memorized), plus average precision.

    AP beside AUC because memorized samples are few: AP weighs the top of the ranking, where a flagged
    sample would be acted on. Intervals resample samples (each sample is its own document here).
    """
    out = {}
    for name, s in predictors.items():
        out[name] = detection_summary(s, memorized, n_boot=n_boot, seed=seed)
        out[name]["average_precision"] = average_precision(s, memorized)
        if n_boot:
            out[name]["average_precision_ci95"] = list(bootstrap_ci(average_precision, s, memorized,
                                                                    n_boot=n_boot, seed=seed))
    return out
