"""Membership inference, canary exposure, PII extraction and the dataset-level test.

One module per concept: `attacks` (scores per text from one forward per model per batch), `evaluate`
(AUC, low-FPR TPR, ROC figures), `exposure` (Carlini et al. 2019), `extraction` (PII TER/SER,
passage k-extractability), `dataset_test` (was the model trained on this set?); the command is
`memprobe.cli.mia`.
"""

from memprobe.mia.attacks import ATTACKS, score_texts
from memprobe.mia.dataset_test import dataset_test, false_positive_rate, power
from memprobe.mia.evaluate import evaluate_mia
from memprobe.mia.exposure import exposure
from memprobe.mia.extraction import extraction_rates, passage_extractability, pii_extraction

__all__ = ["ATTACKS", "dataset_test", "evaluate_mia", "exposure", "extraction_rates", "false_positive_rate",
           "passage_extractability", "pii_extraction", "power", "score_texts"]
