"""Linear memorization probes: a batched logistic fit and two scikit-learn estimators built on it.

Why one batched core: a layer sweep fits hundreds of small, independent logistic regressions (every
site x every cross-validation fold x shuffled-label controls). Fitting a site's problems together
costs one skinny matrix product over its rows per pass instead of one per problem, and the fit is
built to make as few passes as possible (see fit_logistic_batch). Features are standardised inside
the fit (per problem, with that problem's own training rows), and the coefficients are returned in
raw feature space, so a fitted probe is just `x @ coef + intercept`.
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
_HISTORY = 20  # L-BFGS curvature pairs kept per problem
_HESSIAN_ROWS = 8192  # rows behind the curvature model that preconditions L-BFGS
_C1, _C2 = 1e-4, 0.1  # line-search sufficient decrease and curvature (strong Wolfe; near-exact: trials are cheap)
_CHUNK_BYTES = 8 * 2**20  # temporaries under glibc's mmap threshold are reused, not page-faulted anew


@dataclass(frozen=True)
class BatchFit:
    """Fitted parameters of S sites x P problems: logits = x @ coef[s, p] + intercept[s, p]."""

    coef: torch.Tensor  # (S, P, D), raw feature space
    intercept: torch.Tensor  # (S, P)
    standardized_coef: torch.Tensor  # (S, P, D): coefficient per standard deviation, the importance
    mean: torch.Tensor  # (S, P, D) training mean used for standardising
    scale: torch.Tensor  # (S, P, D) training standard deviation (1 where constant)
    n_iter: int  # L-BFGS iterations on all rows (the most any site or problem took)


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
    precondition: bool = True,
) -> BatchFit:
    """L2-penalised logistic regressions of every site in `X` for every problem in (`Y`, `W`).

    X: (S, N, D) features of S sites over the same N rows. Y: (P, N) 0/1 targets, W: (P, N) sample
    weights (0 leaves a row out, e.g. a held-out fold). Problem p minimises the W-weighted mean
    log-loss plus alpha[p] / 2 * ||coef||^2 on standardised features, until the largest gradient entry
    is <= tol (or the loss and the step change by < tol * 1e-3, or after max_iter iterations).

    Why this shape: an L-BFGS step reads all of X twice (the logits along the new direction, the
    gradient at the new point), and those two passes are the whole cost, so the fit spends nothing
    else on X and takes as few steps as it can: the line search runs on the logits alone
    (z + t * dz, exact and near-free); the P problems of a site share each pass as one skinny matrix
    product; each L-BFGS starts from a Hessian model of a row sample (_hessian_factor) instead of
    the identity; and when more than 2 * `warm_start_rows` rows train (and that many give >= 8 rows
    per feature) it first converges on nested seeded row samples (x4 each: same standardisation,
    renormalised weights), keeping the curvature pairs, so the full-data phase starts near the
    optimum. The optimum and the stopping test are those of a plain L-BFGS on all rows.
    precondition=False: plain L-BFGS (H0 = gamma I), whose path depends on the objective alone.
    """
    S, N, D = X.shape
    dtype = X.dtype
    Y, W = Y.to(dtype), W.to(dtype)
    active = (W > 0).any(0)
    if not bool(active.all()):  # rows no problem trains on cost every pass and change nothing
        X, Y, W = X[:, active], Y[:, active], W[:, active]
    P, N = Y.shape
    alpha = torch.as_tensor(alpha, dtype=torch.float64).expand(P)
    w = (W.double() / W.double().sum(1, keepdim=True).clamp_min(_EPS))  # (P, N), each row sums to 1
    levels = _sample_levels(N, D, warm_start_rows, seed)
    Y = Y.double()
    fits = [_fit_site(X[s], Y, w, alpha, levels, max_iter, tol, precondition) for s in range(S)]
    u, b, mean, scale = (torch.stack([f[i] for f in fits]) for i in range(4))
    raw = u / scale
    return BatchFit(raw.to(dtype), (b - (mean * raw).sum(-1)).to(dtype), u.to(dtype), mean.to(dtype),
                    scale.to(dtype), max(f[4] for f in fits))


def _sample_levels(n: int, d: int, warm_start_rows: int, seed: int) -> list[torch.Tensor | None]:
    """Nested row samples (sorted indices) of warm_start_rows * 4^k rows below n / 2, then all rows (None)."""
    if not warm_start_rows or n <= 2 * warm_start_rows or warm_start_rows < 8 * d:
        return [None]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    sizes = [warm_start_rows]
    while sizes[-1] * 4 * 2 <= n:
        sizes.append(sizes[-1] * 4)
    return [order[:m].sort().values for m in sizes] + [None]


def _standardization(X: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean and standard deviation (P, D) of X's columns under each problem's weights, in one
    pass over X; squares are taken around a shift (the first rows' mean) so float32 does not cancel."""
    shift = X[: min(len(X), 1024)].double().mean(0)
    step = max(1, _CHUNK_BYTES // (X.shape[1] * X.element_size()))
    first = torch.zeros(w.shape[0], X.shape[1], dtype=torch.float64)
    second = torch.zeros_like(first)
    for i in range(0, len(X), step):
        chunk = X[i : i + step] - shift.to(X.dtype)
        wc = w[:, i : i + step].to(X.dtype)
        first += (wc @ chunk).double()
        second += (wc @ (chunk * chunk)).double()
    var = (second - first * first).clamp_min(0)
    scale = torch.where(var > _EPS, var.sqrt(), torch.ones_like(var))
    return shift + first, scale


def _fit_site(X: torch.Tensor, Y: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor,
              levels: list[torch.Tensor | None], max_iter: int, tol: float, precondition: bool) -> tuple:
    """(u, b, mean, scale, iterations on all rows) of one site's P problems, float64 parameters."""
    mean, scale = _standardization(X, w)
    P, D = mean.shape
    state = _LBFGS(P, D + 1)
    theta = torch.zeros(P, D + 1, dtype=torch.float64)  # standardised coefficients, then the intercept
    n_iter = 0
    for rows in levels:
        if rows is None:
            problem = _Problem(X, Y, w, mean, scale, alpha)
        else:
            ws = w[:, rows]
            problem = _Problem(X[rows], Y[:, rows], ws / ws.sum(1, keepdim=True).clamp_min(_EPS), mean, scale, alpha)
        state.factor = _hessian_factor(problem, theta) if precondition else None
        n_iter = _minimize(problem, theta, state, max_iter, tol)
    return theta[:, :D], theta[:, D], mean, scale, n_iter


def _hessian_factor(problem: _Problem, theta: torch.Tensor) -> torch.Tensor | None:
    """Cholesky factor of the loss Hessian at theta (problems averaged), estimated on a seeded sample
    of _HESSIAN_ROWS rows with one bfloat16 product.

    Why: activations are strongly correlated, so plain L-BFGS needs many passes over X to learn
    their curvature; starting each L-BFGS from this model instead (H0 = gamma M^-1) halves the passes
    on the data measured. Its precision only shapes the path: the gradient test is exact. None (plain
    L-BFGS) where it cannot be factored.
    """
    X = problem.X
    rows = torch.randperm(len(X), generator=torch.Generator().manual_seed(1))[:_HESSIAN_ROWS].sort().values
    every = torch.arange(theta.shape[0])
    sample = _Problem(X[rows], problem.Y[:, rows], problem.w[:, rows], problem.mean, problem.scale, problem.alpha)
    z = sample.logits(theta, every)
    curvature = (torch.sigmoid(z) * torch.sigmoid(-z) * sample.w).mean(0) / sample.w.mean(0).sum().clamp_min(_EPS)
    root = curvature.sqrt().to(X.dtype)[:, None]
    features = (sample.X - problem.mean.mean(0).to(X.dtype)) / problem.scale.mean(0).to(X.dtype)
    A = torch.cat([features * root, root], 1).to(torch.bfloat16)
    M = (A.T @ A).double()
    M.diagonal()[:-1] += problem.alpha.mean()
    if not bool(torch.isfinite(M).all()):
        return None
    jitter = 1e-6 * float(M.diagonal().mean())
    for _ in range(6):  # bfloat16 rounding can leave M a little indefinite: lift it until it factors
        factor, info = torch.linalg.cholesky_ex(M + jitter * torch.eye(len(M), dtype=M.dtype))
        if int(info) == 0:
            return factor
        jitter *= 100
    return None


class _Problem:
    """One site's P logistic losses on its rows: the two passes over X, and everything along a line."""

    def __init__(self, X: torch.Tensor, Y: torch.Tensor, w: torch.Tensor, mean: torch.Tensor,
                 scale: torch.Tensor, alpha: torch.Tensor) -> None:
        self.X, self.Y, self.w, self.mean, self.scale, self.alpha = X, Y, w, mean, scale, alpha

    def logits(self, theta: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """(len(p), N) logits of parameters theta (standardised space) for problems p: one pass."""
        raw = theta[:, :-1] / self.scale[p]
        offset = theta[:, -1] - (self.mean[p] * raw).sum(1)
        return (raw.to(self.X.dtype) @ self.X.T).double() + offset[:, None]

    def loss(self, z: torch.Tensor, theta: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        y, w = self.Y[p], self.w[p]
        data = (w * (F.softplus(z) - y * z)).sum(1)
        return data + self.alpha[p] / 2 * (theta[:, :-1] ** 2).sum(1)

    def gradient(self, z: torch.Tensor, theta: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """(len(p), D + 1) gradient in standardised space at logits z: one pass."""
        r = (torch.sigmoid(z) - self.Y[p]) * self.w[p]  # d loss / d logit
        g_raw = (r.to(self.X.dtype) @ self.X).double()
        g_c = r.sum(1)
        g_u = (g_raw - g_c[:, None] * self.mean[p]) / self.scale[p] + self.alpha[p][:, None] * theta[:, :-1]
        return torch.cat([g_u, g_c[:, None]], 1)

    def line_search(self, z: torch.Tensor, dz: torch.Tensor, theta: torch.Tensor, d: torch.Tensor,
                    p: torch.Tensor, f0: torch.Tensor, slope0: torch.Tensor) -> torch.Tensor:
        """Step t per problem meeting the strong Wolfe conditions along d (safeguarded 1-D Newton on
        the convex line loss: every trial costs O(N), not a pass over X)."""
        y, w, alpha = self.Y[p], self.w[p], self.alpha[p]
        uu, ud, dd = ((theta[:, :-1] ** 2).sum(1), (theta[:, :-1] * d[:, :-1]).sum(1), (d[:, :-1] ** 2).sum(1))
        t = torch.ones_like(f0)
        lo, hi = torch.zeros_like(t), torch.full_like(t, float("inf"))
        open_ = torch.ones_like(t, dtype=torch.bool)
        for _ in range(40):
            zt = z + t[:, None] * dz
            s = torch.sigmoid(zt)
            f = (w * (F.softplus(zt) - y * zt)).sum(1) + alpha / 2 * (uu + 2 * t * ud + t * t * dd)
            slope = (w * (s - y) * dz).sum(1) + alpha * (ud + t * dd)
            good = (f <= f0 + _C1 * t * slope0) & (slope.abs() <= _C2 * slope0.abs())
            open_ &= ~good
            if not open_.any():
                break
            curv = (w * s * (1 - s) * dz * dz).sum(1) + alpha * dd
            past = (slope > 0) | (f > f0 + _C1 * t * slope0)
            hi = torch.where(open_ & past, t, hi)
            lo = torch.where(open_ & ~past, t, lo)
            newton = t - slope / curv.clamp_min(1e-300)
            inside = (newton > lo) & (newton < hi) & torch.isfinite(newton)
            fallback = torch.where(torch.isinf(hi), 2 * lo.clamp_min(t), (lo + hi) / 2)
            t = torch.where(open_, torch.where(inside, newton, fallback), t)
        return t


class _LBFGS:
    """Curvature pairs of P independent problems in one ring buffer (a rejected pair weighs 0)."""

    def __init__(self, P: int, n: int) -> None:
        self.factor: torch.Tensor | None = None  # Cholesky factor of a Hessian model M: H0 = gamma M^-1
        self.s = torch.zeros(_HISTORY, P, n, dtype=torch.float64)
        self.y = torch.zeros_like(self.s)
        self.rho = torch.zeros(_HISTORY, P, dtype=torch.float64)
        self.gamma = torch.ones(P, dtype=torch.float64)
        self.k = 0

    def direction(self, g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """-H g for problems p by the two-loop recursion."""
        order = [(self.k - 1 - i) % _HISTORY for i in range(min(self.k, _HISTORY))]
        q, a = g.clone(), {}
        for j in order:
            a[j] = self.rho[j, p] * (self.s[j, p] * q).sum(1)
            q -= a[j][:, None] * self.y[j, p]
        r = self.gamma[p][:, None] * self._h0(q)
        for j in reversed(order):
            beta = self.rho[j, p] * (self.y[j, p] * r).sum(1)
            r += self.s[j, p] * (a[j] - beta)[:, None]
        return -r

    def _h0(self, q: torch.Tensor) -> torch.Tensor:
        return q if self.factor is None else torch.cholesky_solve(q.T, self.factor).T

    def push(self, s: torch.Tensor, y: torch.Tensor, p: torch.Tensor) -> None:
        sy, yy = (s * y).sum(1), (y * self._h0(y)).sum(1)
        ok = sy > 1e-10 * yy.sqrt() * s.norm(dim=1)
        j = self.k % _HISTORY
        self.s[j, p], self.y[j, p] = s, y
        self.rho[j, p] = torch.where(ok, 1 / sy.clamp_min(1e-300), torch.zeros_like(sy))
        self.gamma[p] = torch.where(ok, sy / yy.clamp_min(1e-300), self.gamma[p])
        self.k += 1


def _minimize(problem: _Problem, theta: torch.Tensor, state: _LBFGS, max_iter: int, tol: float) -> int:
    """L-BFGS on every problem from theta (updated in place); returns the iterations taken."""
    P = theta.shape[0]
    every = torch.arange(P)
    z = problem.logits(theta, every)
    f = problem.loss(z, theta, every)
    g = problem.gradient(z, theta, every)
    live = g.abs().amax(1) > tol
    n_iter = 0
    while live.any() and n_iter < max_iter:
        p = live.nonzero().flatten()
        d = state.direction(g[p], p)
        slope0 = (g[p] * d).sum(1)
        uphill = slope0 >= 0  # a stale curvature model: steepest descent
        if uphill.any():
            d[uphill] = -g[p][uphill]
            slope0 = (g[p] * d).sum(1)
        dz = problem.logits(d, p)  # logits are linear in theta: z(theta + t d) = z + t dz
        t = problem.line_search(z[p], dz, theta[p], d, p, f[p], slope0)
        step = t[:, None] * d
        theta[p] += step
        z[p] += t[:, None] * dz
        f_new = problem.loss(z[p], theta[p], p)
        g_new = problem.gradient(z[p], theta[p], p)
        state.push(step, g_new - g[p], p)
        stalled = ((f[p] - f_new).abs() <= tol * 1e-3) | (step.abs().amax(1) <= tol * 1e-3)
        f[p], g[p] = f_new, g_new
        live[p] = (g_new.abs().amax(1) > tol) & ~stalled
        n_iter += 1
    return n_iter


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
        """Plain L-BFGS: scikit-learn requires weighted rows to fit exactly as repeated ones (to 1e-7),
        and a Hessian model estimated from the rows moves the path (so the stopping point) by ~tol."""
        weights = _class_weighted(weights, target, self.classes_, self.class_weight)
        return fit_logistic_batch(
            torch.tensor(np.asarray(X), dtype=torch.float64)[None],
            torch.as_tensor(target)[None],
            torch.as_tensor(weights)[None],
            alpha=self.alpha, max_iter=self.max_iter, tol=self.tol, precondition=False,
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
