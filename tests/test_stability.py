"""Stability over lam in {1e-3, ..., 1e4}, float32 and float64: finite outputs, no NaN, no
empty cluster from underflow, converged or warned."""
import warnings

import numpy as np
import pytest

import sinkhorn_ot as so
from reference import log_softmax

LAMS = [1e-3, 1.0, 25.0, 1e3, 1e4]


def planted(N, K, scale, seed=0):
    """Well-spread, balanced problem: sample i prefers cluster i % K, so the exact LP solution
    (and every entropic one) gives each cluster N / K points."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((N, K))
    z[np.arange(N), np.arange(N) % K] += 2.0
    return log_softmax(scale * z)


def peaked(N, K, seed=0):
    """Random logits scaled by 30: nearly one-hot log-probabilities."""
    return log_softmax(30 * np.random.default_rng(seed).standard_normal((N, K)))


def _solve_recording(logP, lam, **kw):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = so.balanced_assign(logP, lam, n_threads=1, **kw)
    return res, [x for x in w if issubclass(x.category, UserWarning)]


def _check_finite(res, N, K):
    for name in ("f", "g"):
        arr = np.asarray(getattr(res, name))
        assert np.all(np.isfinite(arr)), f"{name} has non-finite entries"
    assert np.isfinite(res.err) and np.isfinite(res.cost)
    P = res.plan()
    assert np.all(np.isfinite(P)) and np.all(P >= 0)
    assert np.all((res.labels >= 0) & (res.labels < K))
    assert res.sizes.sum() == N
    return P


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("lam", LAMS)
@pytest.mark.parametrize("kind", ["planted", "planted_x30", "peaked"])
def test_finite_and_no_empty_cluster(kind, lam, dtype):
    N, K = 192, 12
    logP = {"planted": lambda: planted(N, K, 1.0), "planted_x30": lambda: planted(N, K, 30.0),
            "peaked": lambda: peaked(N, K)}[kind]().astype(dtype)
    res, warned = _solve_recording(logP, lam, max_iter=2000)
    P = _check_finite(res, N, K)
    # converged, or said so
    assert res.converged != bool(warned), (res.converged, [str(w.message) for w in warned])
    if not res.converged:
        assert "did not converge" in str(warned[0].message)
    # mass never vanishes: every column of the plan keeps its share, even when its entries
    # are far below the float32 range (lam = 1e4: S down to -1e6)
    col = P.astype(np.float64).sum(0)
    assert np.all(col > 0)
    np.testing.assert_allclose(P.astype(np.float64).sum(), 1.0, rtol=1e-3)
    if kind != "peaked" or lam >= 1.0:
        assert res.sizes.min() > 0, res.sizes  # no empty cluster


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("lam", [25.0, 1e3, 1e4])
def test_swav_scale_batch(lam, dtype):
    """Cosine scores / eps with fixed 3 iterations (SwAV), large K relative to N."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 16))
    c = rng.standard_normal((300, 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    scores = (x @ c.T).astype(dtype)
    res = so.balanced_assign(scores, lam, n_iter=3)
    assert res.n_iter == 3
    _check_finite(res, 64, 300)



@pytest.mark.parametrize("dtype,lam", [
    (np.float64, 1e-3), (np.float64, 1e4), (np.float32, 1e-3),
    (np.float32, 1e4),
], ids=["f64-1e-3", "f64-1e4", "f32-1e-3", "f32-1e4"])
def test_single_column_or_row_at_extreme_lam(dtype, lam):
    r = so.balanced_assign(np.linspace(-50, 0, 7)[None, :].astype(dtype), lam,
                           b=np.full(7, 1 / 7))
    np.testing.assert_allclose(r.plan().astype(np.float64).ravel(), np.full(7, 1 / 7),
                               rtol=1e-5)
    r = so.balanced_assign(np.full((5, 1), -1e3, dtype=dtype), lam)
    assert r.converged
    np.testing.assert_allclose(r.plan().astype(np.float64), np.full((5, 1), 0.2), rtol=1e-5)


@pytest.mark.parametrize("dtype", [
    np.float64,
    np.float32,
], ids=["f64", "f32"])
def test_underflowing_first_pass_column_recovers(dtype):
    """A cluster no sample likes (logP far below the rest, as a dead cluster late in
    training): at lam = 25 its column is exp(-25000) of the others, yet it must receive
    its 1/K share and points."""
    N, K = 120, 6
    logP = planted(N, K, 1.0, seed=3)
    logP[:, 0] -= 1000.0
    res, warned = _solve_recording(logP.astype(dtype), 25.0, max_iter=5000)
    P = _check_finite(res, N, K)
    assert res.converged and not warned
    assert res.sizes[0] > 0
    np.testing.assert_allclose(P.astype(np.float64).sum(0), 1 / K, rtol=0, atol=1e-5)


@pytest.mark.parametrize("seed,off,lam", [
    (0, 0.0, 1.0), (1, 10.0, 1.0),
    (1, 100.0, 100.0), (4, 1000.0, 1000.0),
])
def test_float32_converged_means_marginals_hold(seed, off, lam):
    """When float32 reports converged, the plan it returns meets the tolerance."""
    N, K = 120, 6
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((N, K))
    z[np.arange(N), np.arange(N) % K] += 3.0
    logP = log_softmax(z)
    logP[:, 0] -= off
    res, warned = _solve_recording(logP.astype(np.float32), lam, max_iter=3000)
    assert res.converged
    P = res.plan().astype(np.float64)
    viol = np.abs(P.sum(1) - 1 / N).sum() + np.abs(P.sum(0) - 1 / K).sum()
    assert viol <= 1e-5, (res.err, viol)
