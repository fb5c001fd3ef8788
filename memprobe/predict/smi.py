"""Sliced mutual information (Goldfeld & Greenewald 2021) and its pointwise form (Dentan et al. 2024).

SMI(X; Y) is the mean over random unit directions theta of I(theta^T X; Y): each term is a 1-D problem, so
it stays estimable when X has hundreds of dimensions. Pointwise SMI (PSMI) of a sample (x, y) is the mean
over directions of  log N(theta^T x | class y) - log sum_c pi_c N(theta^T x | class c),  with per-class 1-D
Gaussians fitted on the projected features. A sample whose representation sits with another class (a
mislabelled or atypical one) gets a low PSMI: Dentan et al. use that, early in training, to flag the samples
a model will memorize.

Why it is fast: one matmul projects a block of samples on a block of directions; class means come from the
class means in feature space; the per-element work (C class log-densities, their logsumexp, the own-class
term) and the class variances run in a small C kernel (`native.py`, built with the system compiler on first
use; plain torch ops when there is none).
`pointwise_smi` fits and scores the same samples, so it projects them once: each block of directions is
projected for all samples, its class variances are taken from those projections, and the same projections
are scored. Blocks bound the memory whatever the number of samples and directions.

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
from memprobe.predict import native

_ABS_VAR_FLOOR = 1e-12
_LOG2E = 1 / math.log(2)


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
    if torch.isfinite(x.sum()):  # one cheap pass; any NaN or inf makes it non-finite (overflow: checked below)
        return x
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


def _log_ratio_sums(z: torch.Tensor, own: torch.Tensor, means: torch.Tensor, inv: torch.Tensor,
                    a: torch.Tensor, own_log_prior: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum over `dim` of log N(z | own class) - log sum_c pi_c N(z | c) for z (rows, dirs).

    means, inv = -1/(2 var), a = log pi - log(var)/2: (C, dirs); own: class index per row; own_log_prior:
    (rows, 1). The -log(2 pi)/2 cancels in the ratio. Every term is finite (variances are floored), so the
    logsumexp needs no inf handling. The plain-torch path; the C kernel computes the same in one pass.
    """
    logp = a[:, None, :] + inv[:, None, :] * (z[None] - means[:, None, :]).square()
    top = logp.amax(0)
    mixture = top + (logp - top).exp().sum(0).log()
    mine = a[own] - own_log_prior + inv[own] * (z - means[own]).square()
    return (mine - mixture).sum(dim)


def _native_kernel(use_native: bool | None, dtype: torch.dtype):
    """The C kernel (`native.py`) when asked for or available, else None (plain torch ops, same values)."""
    if use_native is False:
        return None
    if dtype != torch.float32:
        if use_native:
            raise MemprobeError("the native PSMI kernel is float32 only: pass dtype='float32' or native=None")
        return None
    lib = native.load()
    if lib is None and use_native:
        raise MemprobeError("native=True but the PSMI C kernel could not be built: install a C compiler "
                            "(cc, or set CC) or pass native=None to fall back to torch ops")
    return lib


def _native_log_ratio_sums(lib, z: torch.Tensor, own: torch.Tensor, means: torch.Tensor, var: torch.Tensor,
                           log_priors: torch.Tensor) -> torch.Tensor:
    """`_log_ratio_sums(..., dim=1)` in nats through the C kernel, which works in base 2."""
    inv2 = (-_LOG2E / 2) / var
    a2 = _LOG2E * (log_priors[:, None] - 0.5 * torch.log(var))
    sums = native.log_ratio_sums(lib, z.contiguous(), own, means.contiguous(), inv2, a2)
    return math.log(2) * sums - z.shape[1] * log_priors[own]


class PointwiseSMI(BaseEstimator):
    """Per-class 1-D Gaussians along random directions; `score_samples` gives each sample's PSMI.

    scikit-learn contract: hyperparameters only in __init__, `fit(X, y)` returns self, fitted attributes
    end in `_`. PSMI is defined for a (features, label) pair, so `score_samples(X, y)` takes the labels.

    Parameters: n_directions, seed (used when `directions` is None); directions (k, d) used as given after
    normalising; var_floor (relative variance floor, see module doc); max_block_elements (memory bound:
    the largest temporary tensor holds about this many values); dtype ("float32" or "float64");
    native (None: the C kernel of `native.py` for float32 when it builds, else plain torch ops; True: require
    it; False: plain torch ops).
    """

    def __init__(self, n_directions: int = 2000, seed: int = 0, directions: np.ndarray | None = None,
                 var_floor: float = 1e-6, max_block_elements: int = 2**24, dtype: str = "float32",
                 native: bool | None = None):
        self.n_directions = n_directions
        self.seed = seed
        self.directions = directions
        self.var_floor = var_floor
        self.max_block_elements = max_block_elements
        self.dtype = dtype
        self.native = native

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
        priors = counts / counts.sum()
        center = priors @ class_means  # projections are taken about the data mean (large offsets cancel)
        means = (class_means - center) @ theta.T  # (C, k)
        self.classes_, self.center_, self.directions_, self.priors_ = classes, center, theta, priors
        self.means_ = means
        self.variances_ = self._floored(sq / counts[:, None], means, priors)  # biased (MLE) variances
        self.n_features_in_ = x.shape[1]
        return self

    def _floored(self, within: torch.Tensor, means: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
        """Class variances floored at var_floor x the projection's overall variance (law of total variance)."""
        overall = (priors[:, None] * (within + (means - priors @ means) ** 2)).sum(0)
        return torch.maximum(within, torch.clamp(self.var_floor * overall, min=_ABS_VAR_FLOOR))

    def fit_score_samples(self, X: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> np.ndarray:
        """`fit(X, y).score_samples(X, y)`, projecting X once per block of directions instead of twice.

        All samples are projected on a block of directions (n x block values, within max_block_elements);
        the block's class variances and the scores both come from that one projection. When even 16
        directions for all samples exceed the memory bound, it falls back to fit then score.
        """
        dtype = self._torch_dtype()
        x = _as_features(X, dtype)
        n = x.shape[0]
        k_block = min(256, self.max_block_elements // n)
        if k_block < 16:
            return self.fit(x, y).score_samples(x, y)
        idx, classes = _as_labels(y, n)
        theta = _as_directions(self.directions, self.n_directions, x.shape[1], self.seed, dtype)
        n_classes, k = classes.size, theta.shape[0]
        counts = torch.bincount(idx, minlength=n_classes).to(dtype)
        onehot = torch.nn.functional.one_hot(idx, n_classes).to(dtype).T.contiguous()
        class_means = (onehot @ x) / counts[:, None]
        priors = counts / counts.sum()
        center = priors @ class_means
        centred = x - center
        means = (class_means - center) @ theta.T
        log_priors = torch.log(priors)
        own_log_prior = log_priors[idx][:, None]
        lib = _native_kernel(self.native, dtype)
        n_chunk = max(1, self.max_block_elements // (n_classes * k_block))  # rows per plain-torch call
        variances, total = torch.empty(n_classes, k, dtype=dtype), torch.zeros(n, dtype=dtype)
        buffer = torch.empty(n * k_block, dtype=dtype)  # reused: fresh pages for each block cost ~10%
        for k0 in range(0, k, k_block):
            sl = slice(k0, k0 + k_block)
            width = theta[sl].shape[0]
            z = torch.mm(centred, theta[sl].T, out=buffer[:n * width].view(n, width))  # the only projection
            mu = means[:, sl].contiguous()
            if lib is not None:
                sq = native.class_square_sums(lib, z, idx, mu)
            else:
                sq = onehot @ (z - mu[idx]).square()  # within-class sums of squares, (C, block)
            var = self._floored(sq / counts[:, None], mu, priors)
            variances[:, sl] = var
            if lib is not None:
                total += _native_log_ratio_sums(lib, z, idx, mu, var, log_priors)
                continue
            inv, a = -0.5 / var, log_priors[:, None] - 0.5 * torch.log(var)
            for n0 in range(0, n, n_chunk):
                rows = slice(n0, n0 + n_chunk)
                total[rows] += _log_ratio_sums(z[rows], idx[rows], mu, inv, a, own_log_prior[rows], 1)
        self.classes_, self.center_, self.directions_, self.priors_ = classes, center, theta, priors
        self.means_, self.variances_, self.n_features_in_ = means, variances, x.shape[1]
        return (total / k).numpy()

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
        inv = -0.5 / self.variances_
        log_priors = torch.log(self.priors_)
        a = log_priors[:, None] - 0.5 * torch.log(self.variances_)
        lib = _native_kernel(self.native, dtype) if reduce == "samples" else None
        out = torch.zeros(n if reduce == "samples" else k, dtype=dtype)
        for n0 in range(0, n, n_block):
            rows = idx[n0:n0 + n_block]
            centred = x[n0:n0 + n_block] - self.center_
            own_log_prior = log_priors[rows][:, None]
            for k0 in range(0, k, k_block):
                sl = slice(k0, k0 + k_block)
                z = centred @ self.directions_[sl].T  # (rows, dirs)
                if lib is not None:
                    out[n0:n0 + n_block] += _native_log_ratio_sums(lib, z, rows, self.means_[:, sl],
                                                                   self.variances_[:, sl], log_priors)
                elif reduce == "samples":
                    out[n0:n0 + n_block] += _log_ratio_sums(z, rows, self.means_[:, sl], inv[:, sl], a[:, sl],
                                                            own_log_prior, 1)
                else:
                    out[sl] += _log_ratio_sums(z, rows, self.means_[:, sl], inv[:, sl], a[:, sl],
                                               own_log_prior, 0)
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
    (var_floor, max_block_elements, dtype, native).
    """
    est = PointwiseSMI(n_directions=n_directions, seed=seed, directions=directions, **kwargs)
    return est.fit_score_samples(features, labels)


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
