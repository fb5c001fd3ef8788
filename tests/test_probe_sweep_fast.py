"""The probe sweep's shortcuts (a warm start on a row sample, fitting only rows that train) keep the
AUCs of the reference: per site, sklearn's StandardScaler + LogisticRegression on the same objective."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from memprobe.capture import capture
from memprobe.metrics import roc_auc
from memprobe.models import tiny_model
from memprobe.probes import ProbeSweep, fit_logistic_batch, read_rows
from memprobe.probes.sweep import balanced_weights

ALPHA = 1e-2


def _reference_auc(X: np.ndarray, y: np.ndarray, train: np.ndarray) -> float:
    """The slow ground truth: one sklearn fit (float64) per site."""
    scaler = StandardScaler().fit(X[train])
    clf = LogisticRegression(C=1 / (ALPHA * train.sum()), class_weight="balanced", max_iter=2000, tol=1e-8)
    clf.fit(scaler.transform(X[train]), y[train])
    return roc_auc(clf.decision_function(scaler.transform(X[~train])), y[~train])


def _correlated(n: int, d: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Badly conditioned features (shared factors, wide scales, offsets), as activations are."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 8, generator=g)
    X = (z @ torch.randn(8, d, generator=g) + torch.randn(n, d, generator=g)) * torch.rand(d, generator=g) ** 2 * 5
    y = ((z[:, :3].sum(1) + torch.randn(n, generator=g)) > 0.8).numpy().astype(int)
    return X + torch.randn(d, generator=g), y


def test_warm_started_fit_reaches_the_same_optimum():
    X, y = _correlated(6000, 40, seed=0)
    train = np.arange(len(y)) % 5 != 0
    W = torch.as_tensor(balanced_weights(y, train))[None].float()
    Y = torch.as_tensor(y)[None].float()
    cold = fit_logistic_batch(X[None], Y, W, alpha=ALPHA, tol=1e-6, warm_start_rows=0)
    warm = fit_logistic_batch(X[None], Y, W, alpha=ALPHA, tol=1e-6, warm_start_rows=1000)
    scores = {name: (X @ f.coef[0, 0] + f.intercept[0, 0]).numpy() for name, f in (("cold", cold), ("warm", warm))}
    spread = scores["cold"].std()
    assert np.abs(scores["warm"] - scores["cold"]).max() < 1e-2 * spread  # the same optimum, to tolerance
    assert warm.n_iter < cold.n_iter  # the full-data phase starts near the optimum
    auc = roc_auc(scores["warm"][~train], y[~train])
    assert auc == pytest.approx(roc_auc(scores["cold"][~train], y[~train]), abs=1e-4)
    assert auc == pytest.approx(_reference_auc(X.double().numpy(), y, train), abs=1e-3)


def test_sweep_aucs_match_the_sklearn_reference_per_site(tmp_path):
    loaded = tiny_model("llama", n_layers=2, d_model=32, seed=0)
    rng = np.random.default_rng(0)
    words = ["the", "a", "quiet", "river", "market", "yellow", "seven", "stone", "bread", "lamp", "open", "cold"]
    docs = [{"id": f"d{k}", "text": " ".join(rng.choice(words, size=40))} for k in range(60)]
    store = capture(loaded, docs, "blocks.*.hook_resid_post,blocks.*.mlp.hook_post", tmp_path / "store",
                    progress=False)
    doc = store.rows.doc_index.numpy()
    rows = np.flatnonzero(doc[:-1] == doc[1:])  # every row but its text's last: it predicts the next token
    vowels = [loaded.encode(c)[-1] for c in "aeiou"]
    y = np.isin(store.rows.token_id.numpy()[rows + 1], vowels).astype(int)  # is the next character a vowel
    doc = doc[rows]
    train = doc % 4 != 0  # split by document: a quarter of the texts held out
    sweep = ProbeSweep(alpha=ALPHA, tol=1e-6, max_iter=300, progress=False)
    fit = sweep.run(store, rows, y[None].astype(float), balanced_weights(y, train)[None])
    for site in store.sites:
        X = read_rows(store, site, rows).double().numpy()
        expected = _reference_auc(X, y, train)
        assert 0.6 < expected < 1.0  # a task neither trivial nor hopeless
        assert roc_auc(fit.scores[site][0][~train], y[~train]) == pytest.approx(expected, abs=1e-3), site
