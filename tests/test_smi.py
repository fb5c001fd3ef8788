import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import integrate
from scipy.stats import norm
from sklearn.base import clone
from sklearn.feature_selection._mutual_info import _compute_mi_cd

from memprobe.errors import MemprobeError
from memprobe.metrics import roc_auc
from memprobe.predict import PointwiseSMI, pointwise_smi, random_directions, sliced_mi

ROOT = Path(__file__).resolve().parents[1]


def loop_psmi(x, y, directions):
    """The definition, one direction at a time with scipy densities (MLE variances)."""
    classes = np.unique(y)
    priors = np.array([np.mean(y == c) for c in classes])
    pos = np.searchsorted(classes, y)
    out = np.zeros(len(y))
    for t in directions / np.linalg.norm(directions, axis=1, keepdims=True):
        z = x @ t
        mu = np.array([z[y == c].mean() for c in classes])
        sd = np.array([z[y == c].std() for c in classes])
        logp = norm.logpdf(z[:, None], mu, sd)
        out += logp[np.arange(len(y)), pos] - np.log((priors * np.exp(logp)).sum(1))
    return out / len(directions)


def mixture_mi(delta, sigma=1.0):
    """I(Z; Y) for Y uniform on {0, 1}, Z | Y ~ N(+-delta/2, sigma^2), by quadrature."""
    def integrand(z):
        p0, p1 = norm.pdf(z, -delta / 2, sigma), norm.pdf(z, delta / 2, sigma)
        m = 0.5 * (p0 + p1)
        return 0.5 * (p0 * np.log(p0 / m) + p1 * np.log(p1 / m))
    return integrate.quad(integrand, -delta / 2 - 12 * sigma, delta / 2 + 12 * sigma, limit=200)[0]


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 400)
    x = rng.standard_normal((400, 16)) + np.eye(3, 16)[y] * 1.5 + 5.0  # offset tests numerical stability
    return x, y


def test_matches_direct_loop(data):
    x, y = data
    theta = random_directions(40, 16, seed=3)
    ref = loop_psmi(x, y, theta)
    np.testing.assert_allclose(pointwise_smi(x, y, directions=theta, dtype="float64"), ref, atol=1e-10)
    np.testing.assert_allclose(pointwise_smi(x, y, directions=theta), ref, atol=2e-4)  # float32 default


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
def test_native_kernel_matches_plain_ops(data):
    """The C kernel (used for float32 when it builds) gives the plain torch values, far points included."""
    from memprobe.predict import native

    x, y = data
    theta = random_directions(40, 16, seed=3)
    plain = PointwiseSMI(directions=theta, native=False)
    fast = PointwiseSMI(directions=theta, native=True)
    np.testing.assert_allclose(fast.fit_score_samples(x, y), plain.fit_score_samples(x, y), atol=2e-5)
    np.testing.assert_allclose(fast.fit(x, y).score_samples(x, y), plain.score_samples(x, y), atol=2e-5)
    np.testing.assert_allclose(fast.variances_, plain.variances_, rtol=1e-5)
    assert native.load() is not None  # the compiled kernel ran, not the fallback
    far = x.copy()
    far[0] += 300.0  # so far from every class that unshifted class densities underflow to 0
    expected = PointwiseSMI(directions=theta, native=False, dtype="float64").fit_score_samples(far, y)
    got = PointwiseSMI(directions=theta, native=True).fit_score_samples(far, y)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    with pytest.raises(MemprobeError, match="float32 only"):
        PointwiseSMI(directions=theta, native=True, dtype="float64").fit_score_samples(x, y)


def test_native_kernel_absent_falls_back(data, tmp_path, monkeypatch):
    """No compiler: load() gives None, PSMI still works (plain torch) and native=True says what to do."""
    from memprobe.predict import native

    monkeypatch.setattr(native, "_LOADED", [])
    monkeypatch.setattr(native, "CACHE_DIR", tmp_path)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert native.load() is None
    assert not list((tmp_path / "kernels").glob("*"))  # nothing half-built left behind
    x, y = data
    theta = random_directions(8, 16, seed=3)
    np.testing.assert_allclose(pointwise_smi(x, y, directions=theta),
                               pointwise_smi(x, y, directions=theta, native=False))
    with pytest.raises(MemprobeError, match="install a C compiler"):
        pointwise_smi(x, y, directions=theta, native=True)


def test_fit_then_score_equals_one_pass(data):
    """fit_score_samples (one projection) and fit + score_samples (two) are the same numbers."""
    x, y = data
    theta = random_directions(40, 16, seed=4)
    est = PointwiseSMI(directions=theta, dtype="float64")
    np.testing.assert_allclose(est.fit_score_samples(x, y), est.fit(x, y).score_samples(x, y), atol=1e-12)
    tiny = PointwiseSMI(directions=theta, dtype="float64", max_block_elements=1000)  # falls back to two passes
    np.testing.assert_allclose(tiny.fit_score_samples(x, y), est.score_samples(x, y), atol=1e-12)


def test_large_offsets_do_not_cost_float32_precision(data):
    x, y = data
    theta = random_directions(20, 16, seed=2)
    ref = pointwise_smi(x, y, directions=theta, dtype="float64")
    np.testing.assert_allclose(pointwise_smi(x + 1e3, y, directions=theta), ref, atol=1e-3)


def test_directions_used_as_given_and_blocks_do_not_matter(data):
    x, y = data
    theta = random_directions(30, 16, seed=1)
    a = pointwise_smi(x, y, directions=theta, dtype="float64")
    b = pointwise_smi(x, y, directions=theta * np.arange(1, 31)[:, None], dtype="float64")  # re-normalised
    c = pointwise_smi(x, y, directions=theta, dtype="float64", max_block_elements=3000)  # many small blocks
    np.testing.assert_allclose(a, b, atol=1e-12)
    np.testing.assert_allclose(a, c, atol=1e-12)
    assert not np.allclose(a, pointwise_smi(x, y, n_directions=30, seed=2, dtype="float64"))


def test_seeded_directions_reproducible(data):
    x, y = data
    np.testing.assert_array_equal(pointwise_smi(x, y, n_directions=50, seed=7),
                                  pointwise_smi(x, y, n_directions=50, seed=7))


@pytest.mark.parametrize("delta", [0.5, 2.0, 4.0])
def test_one_dimensional_mi_matches_quadrature(delta):
    rng = np.random.default_rng(1)
    n = 40_000
    y = np.repeat([0, 1], n // 2)
    x = (rng.standard_normal(n) + np.where(y == 1, delta / 2, -delta / 2))[:, None]
    truth = mixture_mi(delta)
    one = np.ones((1, 1))
    assert sliced_mi(x, y, directions=one) == pytest.approx(truth, abs=0.01)
    assert sliced_mi(x, y, directions=one, estimator="knn") == pytest.approx(truth, abs=0.02)


def test_sliced_mi_of_isotropic_classes_matches_closed_form_average():
    """Means +-(delta/2) e1, identity covariance: I(theta^T X; Y) = mixture_mi(delta |theta_1|)."""
    rng = np.random.default_rng(2)
    n, d, delta = 20_000, 5, 3.0
    y = np.repeat([0, 1], n // 2)
    x = rng.standard_normal((n, d))
    x[:, 0] += np.where(y == 1, delta / 2, -delta / 2)
    theta = random_directions(24, d, seed=5)
    truth_per_dir = np.array([mixture_mi(delta * abs(t[0])) for t in theta])
    gauss = sliced_mi(x, y, directions=theta, per_direction=True)
    knn = sliced_mi(x, y, directions=theta, per_direction=True, estimator="knn")
    np.testing.assert_allclose(gauss, truth_per_dir, atol=0.015)
    np.testing.assert_allclose(knn, truth_per_dir, atol=0.03)
    assert sliced_mi(x, y, directions=theta) == pytest.approx(truth_per_dir.mean(), abs=0.01)


def test_limits_zero_and_label_entropy():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((20_000, 4))
    y = rng.integers(0, 2, 20_000)
    assert abs(sliced_mi(x, y, n_directions=50)) < 0.005  # independent: 0
    far = x + 100.0 * y[:, None]
    assert sliced_mi(far, y, n_directions=50) == pytest.approx(np.log(2), abs=0.01)  # separable: H(Y)


def test_mean_psmi_is_gaussian_smi(data):
    x, y = data
    theta = random_directions(25, 16, seed=0)
    assert pointwise_smi(x, y, directions=theta).mean() == pytest.approx(sliced_mi(x, y, directions=theta), abs=1e-5)


def test_knn_matches_sklearn_core(data):
    x, y = data
    theta = random_directions(20, 16, seed=4)
    ours = sliced_mi(x, y, directions=theta, estimator="knn", per_direction=True)
    ref = np.array([_compute_mi_cd(x @ t, y, 3) for t in theta])  # sklearn clips at 0; we do not
    np.testing.assert_allclose(np.maximum(ours, 0), ref, atol=1e-10)


def test_flipped_labels_get_lowest_psmi():
    rng = np.random.default_rng(4)
    y_true = rng.integers(0, 4, 1000)
    x = rng.standard_normal((1000, 32)) + 3.0 * np.eye(4, 32)[y_true]
    y = y_true.copy()
    flipped = rng.choice(1000, 20, replace=False)
    y[flipped] = (y[flipped] + 1) % 4
    psmi = pointwise_smi(x, y, n_directions=500)
    is_flipped = np.isin(np.arange(1000), flipped)
    assert roc_auc(-psmi, is_flipped) > 0.98
    assert psmi[is_flipped].max() < np.median(psmi[~is_flipped])


def test_estimator_contract(data):
    x, y = data
    est = PointwiseSMI(n_directions=20, seed=1)
    assert est.fit(x, y) is est
    assert est.means_.shape == (3, 20) and est.variances_.shape == (3, 20)
    assert clone(est).get_params() == est.get_params()
    assert not hasattr(clone(est), "means_")
    held = est.score_samples(x[:50] + 0.1, y[:50])  # fitted Gaussians, scored on other data
    assert held.shape == (50,) and np.isfinite(held).all()
    with pytest.raises(MemprobeError, match="not seen in fit"):
        est.score_samples(x[:3], np.array([0, 1, 7]))
    with pytest.raises(MemprobeError, match="not fitted"):
        PointwiseSMI().score_samples(x, y)


def test_guards_for_bad_input(data):
    x, y = data
    with pytest.raises(MemprobeError, match="fewer than 2 samples"):
        pointwise_smi(x[:11], np.r_[np.zeros(10), 1], n_directions=5)
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(MemprobeError, match="NaN"):
        pointwise_smi(bad, y, n_directions=5)
    with pytest.raises(MemprobeError, match="same length"):
        pointwise_smi(x, y[:-1], n_directions=5)
    with pytest.raises(MemprobeError, match="single class"):
        pointwise_smi(x, np.zeros(len(y)), n_directions=5)
    with pytest.raises(MemprobeError, match="shape"):
        pointwise_smi(x, y, directions=np.ones((3, 5)))
    with pytest.raises(MemprobeError, match="non-zero"):
        pointwise_smi(x, y, directions=np.zeros((2, 16)))
    with pytest.raises(MemprobeError, match="estimator"):
        sliced_mi(x, y, estimator="histogram")


def test_zero_variance_is_guarded_not_nan():
    rng = np.random.default_rng(5)
    y = np.repeat([0, 1], 50)
    x = rng.standard_normal((100, 3))
    x[y == 0] = 1.0  # class 0 is a single point: zero variance along every direction
    out = pointwise_smi(x, y, n_directions=10)
    assert np.isfinite(out).all()
    assert (out[y == 0] > 0).all()
    constant = np.ones((100, 3))  # no variance at all: no information, PSMI 0
    np.testing.assert_allclose(pointwise_smi(constant, y, n_directions=10), 0.0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["smi_fashion.py", "smi_text.py"])
def test_experiment_quick_mode(script, tmp_path):
    cmd = [sys.executable, str(ROOT / "experiments" / script), "--quick", "--out", str(tmp_path / "res"),
           "--figures", str(tmp_path / "fig"), "--cache", str(tmp_path / "cache")]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    import json
    name = script.replace(".py", "_quick")
    res = json.loads((tmp_path / "res" / f"{name}.json").read_text())["results"]
    ev = res["evaluation_by_ground_truth"]["lira"]
    assert {"early_loss", "early_logit_gap"} <= set(ev)
    assert all(0.0 <= v["roc_auc"] <= 1.0 for k, v in ev.items() if not k.startswith("_"))
    assert len(list((tmp_path / "fig").glob(f"{name}_*.png"))) == 4
