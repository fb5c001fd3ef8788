"""Sliced mutual information (Goldfeld & Greenewald 2021) and its pointwise form (Dentan et al. 2024).

SMI(X; Y) is the mean over random unit directions theta of I(theta^T X; Y): each term is a 1-D problem, so
it stays estimable when X has hundreds of dimensions. Pointwise SMI (PSMI) of a sample (x, y) is the mean
over directions of  log N(theta^T x | class y) - log sum_c pi_c N(theta^T x | class c),  with per-class 1-D
Gaussians fitted on the projected features. A sample whose representation sits with another class (a
mislabelled or atypical one) gets a low PSMI: Dentan et al. use that, early in training, to flag the samples
a model will memorize.

Why it is fast: one matmul projects a block of samples on a block of directions; class means come from the
class means in feature space, class variances from the class-centred projections (numerically stable in
float32); the mixture log-density is one fused logsumexp over classes. Blocks bound the memory whatever
the number of samples and directions.

Guards (documented, never silent NaN): a class with fewer than 2 samples, NaN/inf features, labels and
features of different lengths raise MemprobeError. Zero variance of a class along a direction is floored at
`var_floor` times the overall variance of that projection (plus a tiny absolute floor), so a feature
constant within a class gives large finite values, not inf or NaN.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.base import BaseEstimator

from memprobe.errors import MemprobeError

_ABS_VAR_FLOOR = 1e-12


def random_directions(n_directions: int, dim: int, seed: int = 0) -> np.ndarray:
    """`n_directions` unit vectors drawn uniformly on the sphere in R^dim (float64, shape (k, dim))."""
    if n_directions < 1 or dim < 1:
        raise MemprobeError(f"need n_directions >= 1 and dim >= 1, got {n_directions} and {dim}")
    theta = np.random.default_rng(seed).standard_normal((n_directions, dim))
    return theta / np.linalg.norm(theta, axis=1, keepdims=True)


def _as_features(features: np.ndarray | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    x = torch.as_tensor(features)
    if x.ndim != 2:
        raise MemprobeError(f"features must be 2-D (samples, dims), got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise MemprobeError(f"features are empty (shape {tuple(x.shape)})")
    x = x.to(dtype)
    step = max(1, 2**20 // x.shape[1])  # in row blocks: isfinite on the whole array costs ~2x its size
    bad_rows = torch.cat([(~torch.isfinite(x[i:i + step])).sum(1) for i in range(0, x.shape[0], step)])
    if bad_rows.any():
        rows = torch.nonzero(bad_rows).ravel()[:5].tolist()
        raise MemprobeError(
            f"features hold {int(bad_rows.sum())} NaN/inf values (first rows: {rows}): drop those samples "
            "or fix the capture that produced them"
        )
    return x


def _as_labels(labels: np.ndarray | torch.Tensor, n: int) -> tuple[torch.Tensor, np.ndarray]:
    """Labels as class indices 0..C-1 plus the original class values (any hashable, sortable dtype)."""
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).ravel()
    if y.size != n:
        raise MemprobeError(f"labels ({y.size}) and features ({n} rows) must have the same length")
    classes, idx = np.unique(y, return_inverse=True)
    if classes.size < 2:
        raise MemprobeError("labels hold a single class: mutual information with one class is 0 by definition")
    counts = np.bincount(idx, minlength=classes.size)
    if counts.min() < 2:
        lonely = classes[counts < 2].tolist()
        raise MemprobeError(
            f"classes {lonely} have fewer than 2 samples: a class-conditional variance needs 2; "
            "drop those samples or merge their classes"
        )
    return torch.from_numpy(idx.astype(np.int64)), classes


def _as_directions(directions: np.ndarray | torch.Tensor | None, n_directions: int, dim: int, seed: int,
                   dtype: torch.dtype) -> torch.Tensor:
    if directions is None:
        directions = random_directions(n_directions, dim, seed)
    theta = torch.as_tensor(directions).to(torch.float64)
    if theta.ndim != 2 or theta.shape[1] != dim:
        raise MemprobeError(f"directions must have shape (k, {dim}), got {tuple(theta.shape)}")
    norms = theta.norm(dim=1, keepdim=True)
    if not torch.isfinite(theta).all() or (norms == 0).any():
        raise MemprobeError("directions must be finite and non-zero (each is normalised to unit length)")
    return (theta / norms).to(dtype)


def _block_sizes(n: int, k: int, n_classes: int, max_block_elements: int) -> tuple[int, int]:
    """Directions per block and rows per block so a (classes, rows, directions) tensor stays bounded."""
    k_block = min(k, 256)
    n_block = max(1, min(n, max_block_elements // (n_classes * k_block)))
    return n_block, k_block


class PointwiseSMI(BaseEstimator):
    """Per-class 1-D Gaussians along random directions; `score_samples` gives each sample's PSMI.

    scikit-learn contract: hyperparameters only in __init__, `fit(X, y)` returns self, fitted attributes
    end in `_`. PSMI is defined for a (features, label) pair, so `score_samples(X, y)` takes the labels.

    Parameters: n_directions, seed (used when `directions` is None); directions (k, d) used as given after
    normalising; var_floor (relative variance floor, see module doc); max_block_elements (memory bound:
    the largest temporary tensor holds about this many float32 values); dtype ("float32" or "float64").
    """

    def __init__(self, n_directions: int = 2000, seed: int = 0, directions: np.ndarray | None = None,
                 var_floor: float = 1e-6, max_block_elements: int = 2**21, dtype: str = "float32"):
        self.n_directions = n_directions
        self.seed = seed
        self.directions = directions
        self.var_floor = var_floor
        self.max_block_elements = max_block_elements
        self.dtype = dtype

    def _torch_dtype(self) -> torch.dtype:
        if self.dtype not in ("float32", "float64"):
            raise MemprobeError(f"dtype must be 'float32' or 'float64', not {self.dtype!r}")
        return getattr(torch, self.dtype)

    def fit(self, X: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> PointwiseSMI:
        """Fit class priors, and each class's mean and variance along every direction."""
        dtype = self._torch_dtype()
        x = _as_features(X, dtype)
        idx, classes = _as_labels(y, x.shape[0])
        theta = _as_directions(self.directions, self.n_directions, x.shape[1], self.seed, dtype)
        n_classes = classes.size
        counts = torch.bincount(idx, minlength=n_classes).to(dtype)
        onehot = torch.nn.functional.one_hot(idx, n_classes).to(dtype).T.contiguous()  # (C, n): sums by GEMM
        class_means = (onehot @ x) / counts[:, None]
        k = theta.shape[0]
        n_block, k_block = _block_sizes(x.shape[0], k, n_classes, self.max_block_elements)
        sq = torch.zeros(n_classes, k, dtype=dtype)
        for n0 in range(0, x.shape[0], n_block):
            rows = slice(n0, n0 + n_block)
            centred = x[rows] - class_means[idx[rows]]  # class-centred rows: no cancellation in float32
            for k0 in range(0, k, k_block):
                z = centred @ theta[k0:k0 + k_block].T
                sq[:, k0:k0 + k_block] += onehot[:, rows] @ z.square_()
        within = sq / counts[:, None]  # biased (MLE) class variances along each direction
        priors = counts / counts.sum()
        center = priors @ class_means  # projections are taken about the data mean (large offsets cancel)
        means = (class_means - center) @ theta.T  # (C, k)
        overall = (priors[:, None] * (within + (means - priors @ means) ** 2)).sum(0)  # law of total variance
        floor = torch.clamp(self.var_floor * overall, min=_ABS_VAR_FLOOR)
        self.classes_ = classes
        self.center_ = center
        self.directions_ = theta
        self.priors_ = priors
        self.means_ = means
        self.variances_ = torch.maximum(within, floor)
        self.n_features_in_ = x.shape[1]
        return self

    def _per_direction_terms(self, X: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor,
                             reduce: str) -> torch.Tensor:
        """PSMI terms; reduce="samples" -> mean over directions (n,), "directions" -> mean over samples (k,)."""
        if not hasattr(self, "means_"):
            raise MemprobeError("PointwiseSMI is not fitted: call fit(X, y) first")
        dtype = self.means_.dtype
        x = _as_features(X, dtype)
        if x.shape[1] != self.n_features_in_:
            raise MemprobeError(f"X has {x.shape[1]} features, the estimator was fitted on {self.n_features_in_}")
        y = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y).ravel()
        if y.size != x.shape[0]:
            raise MemprobeError(f"labels ({y.size}) and features ({x.shape[0]} rows) must have the same length")
        pos = np.searchsorted(self.classes_, y).clip(0, self.classes_.size - 1)
        if not np.array_equal(self.classes_[pos], y):
            raise MemprobeError(f"labels {sorted(set(y.tolist()) - set(self.classes_.tolist()))[:5]} were not seen in fit")
        idx = torch.from_numpy(pos.astype(np.int64))
        n, k, n_classes = x.shape[0], self.means_.shape[1], self.means_.shape[0]
        n_block, k_block = _block_sizes(n, k, n_classes, self.max_block_elements)
        # log pi_c N(z | mu_c, v_c) = a_c + (z - mu_c)^2 * b_c  (the -log(2 pi)/2 cancels in the ratio)
        inv = -0.5 / self.variances_
        log_priors = torch.log(self.priors_)
        a = log_priors[:, None] - 0.5 * torch.log(self.variances_)
        out = torch.zeros(n if reduce == "samples" else k, dtype=dtype)
        for n0 in range(0, n, n_block):
            rows = idx[n0:n0 + n_block]
            centred = x[n0:n0 + n_block] - self.center_
            for k0 in range(0, k, k_block):
                sl = slice(k0, k0 + k_block)
                mu, b, a_blk = self.means_[:, sl], inv[:, sl], a[:, sl]
                z = centred @ self.directions_[sl].T  # (rows, dirs)
                dev = (z[None] - mu[:, None, :]).square_()  # (C, rows, dirs)
                logp = dev.mul_(b[:, None, :]).add_(a_blk[:, None, :])
                own = logp.gather(0, rows[None, :, None].expand(1, -1, z.shape[1]))[0]
                own -= log_priors[rows][:, None]
                top = logp.amax(0)  # every term is finite (variances are floored): no inf handling needed
                terms = own.sub_(top).sub_(logp.sub_(top).exp_().sum(0).log_())
                if reduce == "samples":
                    out[n0:n0 + n_block] += terms.sum(1)
                else:
                    out[sl] += terms.sum(0)
        return out / (k if reduce == "samples" else n)

    def score_samples(self, X: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> np.ndarray:
        """PSMI of each (x, y) pair in nats: mean over directions of log p(z|y) - log p(z). Low = atypical."""
        return self._per_direction_terms(X, y, "samples").numpy()

    def sliced_mi_per_direction(self, X: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> np.ndarray:
        """Resubstitution estimate of I(theta^T X; Y) for each direction (mean of the pointwise terms)."""
        return self._per_direction_terms(X, y, "directions").numpy()


def pointwise_smi(features: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                  directions: np.ndarray | torch.Tensor | None = None, n_directions: int = 2000,
                  seed: int = 0, **kwargs) -> np.ndarray:
    """PSMI of every sample, with the Gaussians fitted on the same samples (Dentan et al.'s protocol).

    `directions` (k, d) are used as given after normalising to unit length; otherwise `n_directions`
    uniform directions are drawn with `seed`. Extra keyword arguments go to PointwiseSMI
    (var_floor, max_block_elements, dtype).
    """
    est = PointwiseSMI(n_directions=n_directions, seed=seed, directions=directions, **kwargs)
    return est.fit(features, labels).score_samples(features, labels)


def _knn_mi_1d(z: torch.Tensor, idx: torch.Tensor, n_classes: int, n_neighbors: int) -> torch.Tensor:
    """Ross (2014) kNN estimate of I(Z; Y) for each column of z (n, k): continuous Z, discrete Y.

    Matches sklearn's mutual_info_classif core (`_compute_mi_cd`): for each point, r = distance to its
    k-th neighbour within its class; m = points of any class strictly closer than r (itself included);
    I = psi(N) + psi(k) - <psi(N_y)> - <psi(m)>. Not clipped at 0, so averages over directions are unbiased.
    """
    from scipy.special import digamma

    n, k = z.shape
    radius = torch.empty_like(z)
    k_per_point = torch.empty(n, dtype=z.dtype)
    for c in range(n_classes):
        members = torch.nonzero(idx == c).ravel()
        m = members.numel()
        kk = min(n_neighbors, m - 1)
        a, order = torch.sort(z[members].T, dim=1)  # (k, m)
        inf = torch.full((k, kk), math.inf, dtype=z.dtype)
        padded = torch.cat([inf * -1, a, inf], dim=1)  # a[j] sits at column j + kk
        best = torch.full_like(a, math.inf)
        for o in range(kk + 1):  # window [j - o, j - o + kk] holds j and kk neighbours
            left = a - padded[:, kk - o: kk - o + m]
            right = padded[:, 2 * kk - o: 2 * kk - o + m] - a
            best = torch.minimum(best, torch.maximum(left, right))
        r = torch.empty_like(best).scatter_(1, order, best)
        radius[members] = r.T
        k_per_point[members] = kk
    s = torch.sort(z.T, dim=1).values.contiguous()  # (k, n)
    zt = z.T.contiguous()
    rt = radius.T.contiguous()
    hi = torch.searchsorted(s, zt + rt, side="left")  # first index not strictly closer above
    lo = torch.searchsorted(s, zt - rt, side="right")  # first index strictly closer below
    # z + r can round past a point at distance exactly r: move the bounds until the distances agree
    while True:
        over = (hi > 0) & (s.gather(1, (hi - 1).clamp(min=0)) - zt >= rt)
        under = (lo < n) & (zt - s.gather(1, lo.clamp(max=n - 1)) >= rt)
        if not (over.any() or under.any()):
            break
        hi -= over.long()
        lo += under.long()
    counts = (hi - lo).clamp(min=1).to(torch.float64)
    class_sizes = torch.bincount(idx, minlength=n_classes).to(torch.float64)[idx]
    psi = lambda t: torch.from_numpy(digamma(t.numpy()))  # noqa: E731
    return (digamma(n) + psi(k_per_point.double()).mean() - psi(class_sizes).mean()
            - psi(counts).mean(dim=1))


def sliced_mi(features: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
              directions: np.ndarray | torch.Tensor | None = None, n_directions: int = 1000, seed: int = 0,
              *, estimator: str = "gaussian", n_neighbors: int = 3, per_direction: bool = False,
              max_block_elements: int = 2**21) -> float | np.ndarray:
    """Sliced MI in nats: mean over unit directions theta of I(theta^T X; Y).

    estimator="gaussian": per-class 1-D Gaussians, I estimated as the sample mean of log p(z|y) - log p(z)
    (equals the mean PSMI). estimator="knn": Ross's kNN estimator (`n_neighbors`), no distributional
    assumption. `per_direction=True` returns the k per-direction values instead of their mean.
    """
    if estimator == "gaussian":
        est = PointwiseSMI(n_directions=n_directions, seed=seed, directions=directions,
                           max_block_elements=max_block_elements)
        values = est.fit(features, labels).sliced_mi_per_direction(features, labels)
    elif estimator == "knn":
        if n_neighbors < 1:
            raise MemprobeError(f"n_neighbors must be >= 1, not {n_neighbors}")
        x = _as_features(features, torch.float64)
        idx, classes = _as_labels(labels, x.shape[0])
        theta = _as_directions(directions, n_directions, x.shape[1], seed, torch.float64)
        k_block = max(1, max_block_elements // (4 * x.shape[0]))
        values = torch.cat([_knn_mi_1d(x @ theta[k0:k0 + k_block].T, idx, classes.size, n_neighbors)
                            for k0 in range(0, theta.shape[0], k_block)]).numpy()
    else:
        raise MemprobeError(f"estimator must be 'gaussian' or 'knn', not {estimator!r}")
    return values if per_direction else float(np.mean(values))
