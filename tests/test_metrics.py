import numpy as np
import pytest
from sklearn import metrics as skm

from memprobe.errors import MemprobeError
from memprobe.metrics import (
    bootstrap_ci,
    detection_summary,
    fpr_at_tpr,
    roc_auc,
    roc_curve,
    tpr_at_fpr,
)


@pytest.fixture
def tied_scores():
    rng = np.random.default_rng(0)
    labels = rng.random(500) < 0.3
    scores = np.round(rng.normal(labels * 1.0, 1.0), 1)  # rounding creates many ties
    return scores, labels


def test_roc_curve_matches_sklearn_with_ties(tied_scores):
    scores, labels = tied_scores
    fpr, tpr, thr = roc_curve(scores, labels)
    ref_fpr, ref_tpr, ref_thr = skm.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)
    np.testing.assert_allclose(thr[1:], ref_thr[1:])


def test_auc_matches_sklearn_and_extremes(tied_scores):
    scores, labels = tied_scores
    assert roc_auc(scores, labels) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)
    y = np.array([0, 0, 1, 1])
    assert roc_auc(np.array([0.1, 0.2, 0.8, 0.9]), y) == 1.0
    assert roc_auc(np.array([0.9, 0.8, 0.2, 0.1]), y) == 0.0
    assert roc_auc(np.ones(4), y) == 0.5  # all tied: half credit


def test_fixed_points_by_hand():
    # sorted by score: P N P N P N N N N N  (3 positives, 7 negatives)
    scores = np.arange(10, 0, -1, dtype=float)
    labels = np.array([1, 0, 1, 0, 1, 0, 0, 0, 0, 0])
    assert tpr_at_fpr(scores, labels, 0.0) == pytest.approx(1 / 3)
    assert tpr_at_fpr(scores, labels, 1 / 7) == pytest.approx(2 / 3)
    assert tpr_at_fpr(scores, labels, 0.2) == pytest.approx(2 / 3)
    assert fpr_at_tpr(scores, labels, 0.75) == pytest.approx(2 / 7)  # needs all 3 positives
    assert fpr_at_tpr(scores, labels, 0.5) == pytest.approx(1 / 7)
    assert fpr_at_tpr(scores, labels, 0.0) == 0.0


def test_bootstrap_ci_covers_estimate_and_is_seeded(tied_scores):
    scores, labels = tied_scores
    lo, hi = bootstrap_ci(roc_auc, scores, labels, n_boot=200, seed=1)
    assert lo < roc_auc(scores, labels) < hi
    assert hi - lo < 0.2
    assert (lo, hi) == bootstrap_ci(roc_auc, scores, labels, n_boot=200, seed=1)
    small = bootstrap_ci(roc_auc, scores[:100], labels[:100], n_boot=200, seed=1)
    assert small[1] - small[0] > hi - lo  # fewer samples, wider interval


def test_detection_summary_keys(tied_scores):
    out = detection_summary(*tied_scores, n_boot=20)
    assert set(out) == {"roc_auc", "fpr_at_tpr_0.75", "tpr_at_fpr_0.01", "tpr_at_fpr_0.001",
                        "roc_auc_ci95", "fpr_at_tpr_0.75_ci95", "tpr_at_fpr_0.01_ci95", "tpr_at_fpr_0.001_ci95"}
    assert all(isinstance(v, float) for k, v in out.items() if not k.endswith("ci95"))


@pytest.mark.parametrize("scores, labels, match", [
    (np.array([0.1, np.nan, 0.3]), np.array([0, 1, 1]), "NaN"),
    (np.array([0.1, 0.2]), np.array([0, 1, 1]), "same length"),
    (np.array([0.1, 0.2]), np.array([1, 1]), "single class"),
    (np.array([0.1, 0.2]), np.array([0, 2]), "0/1"),
])
def test_bad_input_raises(scores, labels, match):
    with pytest.raises(MemprobeError, match=match):
        roc_auc(scores, labels)
    with pytest.raises(MemprobeError):
        tpr_at_fpr(scores, labels)
