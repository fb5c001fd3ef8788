"""Linear memorization probes: a batched logistic fit and two scikit-learn estimators built on it.

Why one batched core: a layer sweep fits hundreds of small, independent logistic regressions (every
site x every cross-validation fold x shuffled-label controls). Summing their losses and running one
full-batch L-BFGS over all parameters at once costs a few large matrix products per step instead of
hundreds of small solver runs. Features are standardised inside the fit (per problem, with that
problem's own training rows), and the coefficients are returned in raw feature space, so a fitted
probe is just `x @ coef + intercept`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data

_EPS = 1e-8


@dataclass(frozen=True)
class BatchFit:
    """Fitted parameters of S sites x P problems: logits = x @ coef[s, p] + intercept[s, p]."""

    coef: torch.Tensor  # (S, P, D), raw feature space
    intercept: torch.Tensor  # (S, P)
    standardized_coef: torch.Tensor  # (S, P, D): coefficient per standard deviation, the importance
    mean: torch.Tensor  # (S, P, D) training mean used for standardising
    scale: torch.Tensor  # (S, P, D) training standard deviation (1 where constant)
    n_iter: int  # L-BFGS iterations on all rows (the most any site took)


def fit_logistic_batch(
    X: torch.Tensor,
    Y: torch.Tensor,
    W: torch.Tensor,
    *,
    alpha: float | torch.Tensor = 1e-2,
    max_iter: int = 200,
    tol: float = 1e-6,
    warm_start_rows: int = 16384,
    seed: int = 0,
) -> BatchFit:
    """L2-penalised logistic regressions of every site in `X` for every problem in (`Y`, `W`).

    X: (S, N, D) features of S sites over the same N rows. Y: (P, N) 0/1 targets, W: (P, N) sample
    weights (0 leaves a row out, e.g. a held-out fold). Problem p minimises the W-weighted mean
    log-loss plus alpha[p] / 2 * ||coef||^2 on standardised features.

    Why two phases: each L-BFGS step reads all of X (memory-bound), so when more than
    2 * `warm_start_rows` rows train (and that many give >= 8 rows per feature), the fit first
    converges on a seeded sample of that many rows (same standardisation, renormalised weights) and
    starts the full fit from there, which then needs fewer steps. Optimum and tolerance are unchanged.
    Why one L-BFGS per site: a joint run steps every site by the slowest one's needs.
    """
    S, N, D = X.shape
    dtype = X.dtype
    Y, W = Y.to(dtype), W.to(dtype)
    active = (W > 0).any(0)
    if not bool(active.all()):  # rows no problem trains on cost every step and change nothing
        X, Y, W = X[:, active], Y[:, active], W[:, active]
    P, N = Y.shape
    alpha = torch.as_tensor(alpha, dtype=dtype).expand(P)
    w = W / W.sum(1, keepdim=True).clamp_min(_EPS)  # (P, N), each row sums to 1
    mean = torch.einsum("pn,snd->spd", w, X)
    var = (torch.einsum("pn,snd->spd", w, X * X) - mean * mean).clamp_min(0)
    scale = torch.where(var > _EPS, var.sqrt(), torch.ones_like(var))
    sample = None
    if warm_start_rows and N > 2 * warm_start_rows and warm_start_rows >= 8 * D:  # a sample that pins the optimum
        sample = torch.randperm(N, generator=torch.Generator().manual_seed(seed))[:warm_start_rows].sort().values
        ws = w[:, sample]
        ws = ws / ws.sum(1, keepdim=True).clamp_min(_EPS)
    us, bs, n_iter = [], [], 0
    for s in range(S):
        u = torch.zeros((1, P, D), dtype=dtype, requires_grad=True)
        b = torch.zeros((1, P), dtype=dtype, requires_grad=True)
        m, sc = mean[s : s + 1], scale[s : s + 1]
        if sample is not None:
            _lbfgs(u, b, X[s : s + 1, sample], Y[:, sample], ws, m, sc, alpha, max_iter, tol)
        n_iter = max(n_iter, _lbfgs(u, b, X[s : s + 1], Y, w, m, sc, alpha, max_iter, tol))
        us.append(u.detach())
        bs.append(b.detach())
    u, b = torch.cat(us), torch.cat(bs)
    with torch.no_grad():
        raw = u / scale
        return BatchFit(raw.detach(), (b - (mean * raw).sum(-1)).detach(), u.detach().clone(), mean, scale, n_iter)


def _lbfgs(u: torch.Tensor, b: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, w: torch.Tensor, mean: torch.Tensor,
           scale: torch.Tensor, alpha: torch.Tensor, max_iter: int, tol: float) -> int:
    """Full-batch L-BFGS on (u, b) in place, from their current values; returns the iterations taken."""
    S, N, _ = X.shape
    P = Y.shape[0]
    XT = X.transpose(1, 2).contiguous()  # (S, D, N): both products below are plain contiguous GEMMs
    opt = torch.optim.LBFGS([u, b], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=tol * 1e-3,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        # Closed-form gradient instead of autograd: autograd's bmm backward took 12x the forward here
        # (a slow CPU path for the transposed batched product), and this is the probes' inner loop.
        with torch.no_grad():
            raw = u / scale
            z = torch.bmm(raw, XT) + (b - (mean * raw).sum(-1))[..., None]  # (S, P, N) logits
            target = Y.expand(S, P, N)
            loss = (F.binary_cross_entropy_with_logits(z, target, reduction="none") * w).sum()
            loss = loss + (alpha[None, :, None] / 2 * u * u).sum()
            r = (torch.sigmoid(z) - target) * w  # d loss / d logit
            g_c = r.sum(-1)
            g_raw = torch.bmm(r, X)
            u.grad = (g_raw - g_c[..., None] * mean) / scale + alpha[None, :, None] * u
            b.grad = g_c
        return loss

    opt.step(closure)
    return int(opt.state[opt._params[0]].get("n_iter", 0))


def _binary_target(estimator: BaseEstimator, y: np.ndarray) -> np.ndarray:
    check_classification_targets(y)
    estimator.classes_ = np.unique(y)
    if len(estimator.classes_) != 2:
        raise ValueError(
            f"Only binary classification is supported: {type(estimator).__name__} needs exactly 2 classes in y, got "
            f"{len(estimator.classes_)} class(es): label memorized (1) and control (0) tokens"
        )
    return (y == estimator.classes_[1]).astype(np.float64)


def _class_weighted(weights: np.ndarray, target: np.ndarray, classes: np.ndarray,
                    class_weight: str | dict | None) -> np.ndarray:
    """Sample weights times class weights: None, "balanced" (equal total weight) or {class: weight}."""
    if class_weight is None:
        return weights
    out = weights.copy()
    for value, cls in enumerate(classes):
        rows = target == value
        if class_weight == "balanced":
            out[rows] *= weights.sum() / (2 * max(weights[rows].sum(), _EPS))
        elif isinstance(class_weight, dict):
            out[rows] *= class_weight.get(cls, 1.0)
        else:
            raise ValueError(f"class_weight must be None, 'balanced' or a dict, not {class_weight!r}")
    return out


class _LinearProbe(ClassifierMixin, BaseEstimator):
    """Shared prediction side: a probe is a direction (coef_) and an offset (intercept_)."""

    def __sklearn_tags__(self):  # noqa: ANN204 - sklearn's Tags type
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = False
        return tags

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Memorization score per row: the logit of the positive class (higher = more memorized)."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        return X @ self.coef_[0] + self.intercept_[0]

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        p = 1 / (1 + np.exp(-np.clip(self.decision_function(X), -500, 500)))
        return np.column_stack([1 - p, p])

    def predict(self, X: np.ndarray) -> np.ndarray:
        scores = self.decision_function(X)
        return self.classes_[(scores > 0).astype(int)]

    def _fit_dense(self, X: np.ndarray, target: np.ndarray, weights: np.ndarray) -> BatchFit:
        weights = _class_weighted(weights, target, self.classes_, self.class_weight)
        return fit_logistic_batch(
            torch.tensor(np.asarray(X), dtype=torch.float64)[None],
            torch.as_tensor(target)[None],
            torch.as_tensor(weights)[None],
            alpha=self.alpha, max_iter=self.max_iter, tol=self.tol,
        )


class LogisticProbe(_LinearProbe):
    """Dense L2 logistic probe on standardised activations (Slonski 2024's linear probe).

    `standardized_coef_` is each feature's weight per standard deviation: the ranking used to name
    the neurons a probe relies on.
    """

    def __init__(self, alpha: float = 1e-2, max_iter: int = 200, tol: float = 1e-6, class_weight: str | dict | None = None):
        self.alpha = alpha
        self.max_iter = max_iter
        self.tol = tol
        self.class_weight = class_weight

    def fit(self, X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None) -> LogisticProbe:
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
        target = _binary_target(self, y)
        weights = _check_sample_weight(sample_weight, X, dtype=np.float64)
        fit = self._fit_dense(X, target, weights)
        self.coef_ = fit.coef[0, 0].numpy()[None].astype(X.dtype)
        self.intercept_ = fit.intercept[0].numpy().astype(X.dtype)
        self.standardized_coef_ = fit.standardized_coef[0, 0].numpy()
        self.mean_, self.scale_ = fit.mean[0, 0].numpy(), fit.scale[0, 0].numpy()
        self.n_iter_ = np.array([fit.n_iter])
        return self


class TopKProbe(_LinearProbe):
    """Sparse probe that uses only `k` neurons: rank by a dense probe's standardised weights, refit on the top k.

    Why top-k rather than L1: "how many neurons does it take" is then a direct knob, and the names
    of the neurons (`neurons_`, best first) are an output.
    """

    def __init__(self, k: int = 16, alpha: float = 1e-2, max_iter: int = 200, tol: float = 1e-6,
                 class_weight: str | dict | None = None):
        self.k = k
        self.alpha = alpha
        self.max_iter = max_iter
        self.tol = tol
        self.class_weight = class_weight

    def fit(self, X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None) -> TopKProbe:
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
        if not isinstance(self.k, (int, np.integer)) or self.k < 1:
            raise ValueError(f"k must be a positive integer, not {self.k!r}")
        target = _binary_target(self, y)
        weights = _check_sample_weight(sample_weight, X, dtype=np.float64)
        ranking = np.abs(self._fit_dense(X, target, weights).standardized_coef[0, 0].numpy())
        self.neurons_ = np.argsort(-ranking, kind="stable")[: min(self.k, X.shape[1])]
        sparse = self._fit_dense(X[:, self.neurons_], target, weights)
        self.n_iter_ = np.array([sparse.n_iter])
        self.coef_ = np.zeros((1, X.shape[1]), dtype=X.dtype)
        self.coef_[0, self.neurons_] = sparse.coef[0, 0].numpy()
        self.intercept_ = sparse.intercept[0].numpy().astype(X.dtype)
        self.neuron_weights_ = sparse.standardized_coef[0, 0].numpy()
        return self
