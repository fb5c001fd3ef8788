"""Predict which samples a model will memorize: sliced mutual information and shadow-model ground truth."""

from memprobe.predict.apriori import evaluate_predictors, psmi_per_layer
from memprobe.predict.shadow import (
    ShadowRuns,
    confidence_gap,
    counterfactual_memorization,
    feldman_memorization,
    lira_scores,
    logit_margin,
    shadow_splits,
    top_fraction,
    train_shadows,
)
from memprobe.predict.smi import PointwiseSMI, pointwise_smi, random_directions, sliced_mi

__all__ = [
    "PointwiseSMI",
    "ShadowRuns",
    "confidence_gap",
    "counterfactual_memorization",
    "evaluate_predictors",
    "feldman_memorization",
    "lira_scores",
    "logit_margin",
    "pointwise_smi",
    "psmi_per_layer",
    "random_directions",
    "shadow_splits",
    "sliced_mi",
    "top_fraction",
    "train_shadows",
]
