"""The probe sweep's fast path (passes only for the logits along a direction and the gradient, a
line search on the logits, a preconditioned L-BFGS, warm starts on row samples, training rows read
first into one reused buffer) reaches the optimum of the reference: per site, sklearn's
StandardScaler + LogisticRegression on the same objective (balanced class weights, standardised
with the same weights, the same L2 penalty)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

import memprobe.probes.features as features
from memprobe.capture import capture
from memprobe.metrics import roc_auc
from memprobe.models import tiny_model
from memprobe.probes import ProbeSweep, fit_logistic_batch, read_rows
from memprobe.probes.sweep import balanced_weights
from memprobe.studies.probe_sweep import TensorStore

ALPHA = 1e-2


def _reference(X: np.ndarray, y: np.ndarray, train: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """The slow ground truth (float64, tight tolerance): raw-space coef, scores of every row, held-out AUC."""
    w = balanced_weights(y, train)[train]
    scaler = StandardScaler().fit(X[train], sample_weight=w)
    clf = LogisticRegression(C=1 / (ALPHA * train.sum()), class_weight="balanced", max_iter=5000, tol=1e-10)
    clf.fit(scaler.transform(X[train]), y[train])
    scores = clf.decision_function(scaler.transform(X))
    return clf.coef_[0] / scaler.scale_, scores, roc_auc(scores[~train], y[~train])


def _correlated(n: int, d: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Badly conditioned features (shared factors, wide scales, offsets), as activations are."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 8, generator=g)
    X = (z @ torch.randn(8, d, generator=g) + torch.randn(n, d, generator=g)) * torch.rand(d, generator=g) ** 2 * 5
    y = ((z[:, :3].sum(1) + torch.randn(n, generator=g)) > 0.8).numpy().astype(int)
    return X + torch.randn(d, generator=g), y


def test_batched_problems_reach_the_sklearn_optimum():
    """Two folds and a shuffled-label control in one fit, each converging on its own schedule."""
    X, y = _correlated(3000, 30, seed=3)
    X = X.double()
    fold = np.arange(len(y)) % 3
    shuffled = np.random.default_rng(0).permutation(y)
    problems = [(y, fold != 0), (y, fold != 1), (shuffled, fold != 2)]
    Y = torch.tensor(np.stack([t for t, _ in problems]), dtype=torch.float64)
    W = torch.tensor(np.stack([balanced_weights(t, train) for t, train in problems]))
    fit = fit_logistic_batch(X[None], Y, W, alpha=ALPHA, tol=1e-9, max_iter=500)
    for p, (target, train) in enumerate(problems):
        coef, scores, auc = _reference(X.numpy(), target, train)
        ours = (X @ fit.coef[0, p] + fit.intercept[0, p]).numpy()
        np.testing.assert_allclose(fit.coef[0, p].numpy(), coef, rtol=1e-4, atol=1e-6 * np.abs(coef).max())
        np.testing.assert_allclose(ours, scores, atol=1e-5 * np.abs(scores).max())
        assert roc_auc(ours[~train], target[~train]) == pytest.approx(auc, abs=1e-4)


def test_preconditioning_and_warm_start_cut_iterations_not_accuracy():
    X, y = _correlated(6000, 40, seed=0)
    train = np.arange(len(y)) % 5 != 0
    W = torch.as_tensor(balanced_weights(y, train))[None].float()
    Y = torch.as_tensor(y)[None].float()
    fits = {"warm": fit_logistic_batch(X[None], Y, W, alpha=ALPHA, tol=1e-6, warm_start_rows=1000),
            "cold": fit_logistic_batch(X[None], Y, W, alpha=ALPHA, tol=1e-6, warm_start_rows=0)}
    fits["plain"] = fit_logistic_batch(X[None], Y, W, alpha=ALPHA, tol=1e-6, warm_start_rows=0, precondition=False)
    scores = {name: (X @ f.coef[0, 0] + f.intercept[0, 0]).numpy() for name, f in fits.items()}
    spread = scores["plain"].std()
    for name in ("warm", "cold"):
        assert np.abs(scores[name] - scores["plain"]).max() < 1e-3 * spread, name  # one optimum, to tolerance
    assert fits["cold"].n_iter < fits["plain"].n_iter  # the curvature model saves steps
    assert fits["warm"].n_iter < fits["cold"].n_iter  # the full-data phase starts near the optimum
    _, _, auc = _reference(X.double().numpy(), y, train)
    for name, s in scores.items():
        assert roc_auc(s[~train], y[~train]) == pytest.approx(auc, abs=1e-4), name


def test_read_rows_in_any_order_into_a_reused_buffer(monkeypatch):
    """Chunked reads (tiny chunks here) in any row order equal plain indexing, for bfloat16 rows too."""
    monkeypatch.setattr(features, "_CHUNK_BYTES", 64)
    acts = torch.randn(50, 6).to(torch.bfloat16)
    store = TensorStore({"s": acts}, [f"d{i // 10}" for i in range(50)])
    rows = np.array([7, 3, 3, 40, 12, 13, 14, 49, 0])
    buffer = torch.full((len(rows), 6), float("nan"))
    assert read_rows(store, "s", rows, out=buffer) is buffer
    assert torch.equal(buffer, acts[torch.as_tensor(rows)].float())
    assert torch.equal(read_rows(store, "s", np.arange(10, 30)), acts[10:30].float())
    with pytest.raises(Exception, match="out must be a float32 tensor"):
        read_rows(store, "s", rows, out=torch.empty(len(rows), 5))


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
    train = doc % 4 != 0  # split by document: a quarter of the texts held out, interleaved with training
    sweep = ProbeSweep(alpha=ALPHA, tol=1e-6, max_iter=300, progress=False)
    fit = sweep.run(store, rows, y[None].astype(float), balanced_weights(y, train)[None])
    for site in store.sites:
        X = read_rows(store, site, rows).double().numpy()
        _, scores, expected = _reference(X, y, train)
        assert 0.6 < expected < 1.0  # a task neither trivial nor hopeless
        ours = fit.scores[site][0]
        assert roc_auc(ours[~train], y[~train]) == pytest.approx(expected, abs=1e-4), site
        assert np.corrcoef(ours, scores)[0, 1] > 0.9999, site  # held-out rows scored in their own places
