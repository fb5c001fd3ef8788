import numpy as np
import pytest
import torch
from scipy.special import softmax
from scipy.stats import norm

from memprobe.errors import MemprobeError
from memprobe.predict import (
    confidence_gap,
    counterfactual_memorization,
    feldman_memorization,
    lira_scores,
    logit_margin,
    shadow_splits,
    top_fraction,
    train_shadows,
)
from memprobe.train.classifier import TrainConfig, mlp, predict_logits, train_classifier


def test_splits_are_balanced_and_seeded():
    s = shadow_splits(101, 16, seed=3)
    assert s.shape == (16, 101)
    assert (s.sum(0) == 8).all()  # every sample IN exactly half the models
    assert abs(s.mean() - 0.5) < 1e-12
    np.testing.assert_array_equal(s, shadow_splits(101, 16, seed=3))
    with pytest.raises(MemprobeError, match="even"):
        shadow_splits(10, 5)


def test_gaps_by_hand_and_stable():
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 3.0, 1.0]])
    labels = np.array([0, 0])
    np.testing.assert_allclose(logit_margin(logits, labels), [2.0, -3.0])
    p = softmax(logits, axis=1)[[0, 1], labels]
    np.testing.assert_allclose(confidence_gap(logits, labels), np.log(p / (1 - p)))
    big = np.array([[1000.0, 0.0, 0.0]])
    assert confidence_gap(big, np.array([0]))[0] == pytest.approx(1000.0 - np.log(2))
    with pytest.raises(MemprobeError, match="NaN"):
        confidence_gap(np.array([[np.nan, 0.0]]), np.array([0]))
    with pytest.raises(MemprobeError, match="class indices"):
        logit_margin(logits, np.array([0, 3]))


def toy_train_fn(n, boost):
    """Logits where sample i's true class gets +boost[i] when trained on: memorization by construction."""
    def train_fn(idx, seed):
        logits = np.zeros((n, 2))
        logits[:, 0] = 1.0
        logits[idx, 0] += boost[idx]
        return logits
    return train_fn


def test_scores_on_a_constructed_case(tmp_path):
    n = 6
    boost = np.array([0.0, 0.0, 0.0, 5.0, 5.0, 10.0])
    labels = np.zeros(n, dtype=int)
    runs = train_shadows(toy_train_fn(n, boost), labels, 8, seed=1, cache_dir=tmp_path)
    base = confidence_gap(np.array([[1.0, 0.0]]), np.array([0]))[0]
    gap_in = confidence_gap(np.c_[1.0 + boost, np.zeros(n)], labels)
    np.testing.assert_allclose(counterfactual_memorization(runs), gap_in - base)
    np.testing.assert_allclose(feldman_memorization(runs), 0.0)  # always correct, IN or OUT
    flipped = np.ones(n, dtype=int)  # label 1: correct only if never... always wrong: 0 as well
    assert feldman_memorization(type(runs)(runs.in_mask, runs.logits, flipped)).max() == 0.0
    # resume: cached shadows are read back, the training function is never called again
    def boom(idx, seed):
        raise AssertionError("should not retrain")
    again = train_shadows(boom, labels, 8, seed=1, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.logits, runs.logits)
    with pytest.raises(MemprobeError, match="another split"):
        train_shadows(boom, labels, 8, seed=2, cache_dir=tmp_path)


def test_feldman_counts_correctness():
    in_mask = shadow_splits(3, 4, seed=0)
    logits = np.zeros((4, 3, 2))
    logits[..., 1] = np.where(in_mask, 1.0, -1.0)  # class 1 wins only when IN
    labels = np.array([1, 1, 0])
    runs = type(train_shadows(toy_train_fn(3, np.zeros(3)), labels, 4))(in_mask, logits, labels)
    np.testing.assert_allclose(feldman_memorization(runs), [1.0, 1.0, -1.0])


def test_lira_by_hand():
    rng = np.random.default_rng(0)
    n, s = 4, 16
    in_mask = shadow_splits(n, s, seed=0)
    gaps = np.where(in_mask, 3.0, -1.0) + rng.normal(0, 0.5, (s, n))
    logits = np.stack([np.c_[g, np.zeros(n)] for g in gaps])  # confidence gap of [g, 0] for class 0 is g
    runs = type(train_shadows(toy_train_fn(n, np.zeros(n)), np.zeros(n, int), s))(in_mask, logits, np.zeros(n, int))
    target = np.c_[np.array([3.0, -1.0, 1.0, 3.0]), np.zeros(n)]
    scores = lira_scores(runs, target)
    g_in = [gaps[in_mask[:, i], i] for i in range(n)]
    g_out = [gaps[~in_mask[:, i], i] for i in range(n)]
    ref = [norm.logpdf(target[i, 0], g_in[i].mean(), g_in[i].std()) - norm.logpdf(target[i, 0], g_out[i].mean(), g_out[i].std())
           for i in range(n)]
    np.testing.assert_allclose(scores, ref)
    assert scores[0] > 0 > scores[1]
    assert np.isfinite(lira_scores(runs, target, global_variance=True)).all()


def test_top_fraction():
    scores = np.array([0.1, 0.9, 0.5, 0.7, 0.3, 0.2, 0.8, 0.4, 0.6, 0.0])
    np.testing.assert_array_equal(np.flatnonzero(top_fraction(scores, 0.2)), [1, 6])
    assert top_fraction(scores).sum() == 1
    with pytest.raises(MemprobeError):
        top_fraction(scores, 1.5)
    with pytest.raises(MemprobeError, match="NaN"):
        top_fraction(np.array([np.nan, 1.0]))


def test_real_shadows_find_a_flipped_label():
    """Tiny MLPs on two noisy blobs: a flipped label deep inside the other blob is memorized (Feldman ~1)."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    n = 60
    y = np.repeat([0, 1], n // 2)
    x = rng.normal(0, 1.0, (n, 5))
    x[:, 0] += np.where(y == 1, 1.5, -1.5)
    x[0, 0] = -4.0
    y[0] = 1  # flipped: a class-0 point labelled 1
    x, yt = torch.from_numpy(x).float(), torch.from_numpy(y)

    def train_fn(idx, seed):
        torch.manual_seed(seed)
        model = mlp(5, (64,), 2)
        train_classifier(model, x[idx], yt[idx], TrainConfig(epochs=100, batch_size=64, lr=1e-2, eval_every=10**9))
        return predict_logits(model, x).numpy()

    runs = train_shadows(train_fn, y, 8, seed=0)
    feldman = feldman_memorization(runs)
    assert feldman[0] >= 0.75
    assert feldman[0] - np.median(feldman[1:]) >= 0.5
    assert runs.correct[runs.in_mask].mean() > 0.95  # the shadows fit their training sets
