"""sinkhorn and balanced_assign against the independent float64 reference and against POT."""
import numpy as np
import pytest

import sinkhorn_ot as so
from reference import reference_assign, reference_sinkhorn, random_logP

SHAPES = [(1, 1), (1, 5), (7, 1), (13, 10), (50, 17), (64, 8), (33, 24)]

# float64 is solved to near machine precision; float32 to its floor (about 1e-6 in err).
SOLVE_TOL = {np.float64: 1e-12, np.float32: 2e-6}
# Potentials after removing a constant.  They are less well determined than the plan: a
# column on a slow mode of the iteration keeps an error of order err / (b_y * spectral gap)
# in g, so their tolerance is wider than the plan's (which carries the tight check).
POT_ATOL = {np.float64: 1e-7, np.float32: 1e-2}
PLAN_ATOL = {np.float64: 1e-12, np.float32: 2e-6}
COST_RTOL = {np.float64: 1e-9, np.float32: 1e-4}


def _marginal(n, rng, uniform):
    if uniform:
        return None
    w = rng.uniform(0.2, 1.0, n)
    return w / w.sum()


def _cost_matrix(n, m, rng):
    x = rng.standard_normal((n, 2))
    y = rng.standard_normal((m, 2)) + 0.3
    return ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)


def _assert_potentials(f, g, f_ref, g_ref, atol):
    """Potentials are defined up to (f + c, g - c): remove the constant, then compare."""
    f, g = np.asarray(f, np.float64), np.asarray(g, np.float64)
    assert f.shape == f_ref.shape and g.shape == g_ref.shape
    assert np.all(np.isfinite(f)) and np.all(np.isfinite(g))
    c = np.mean(g - g_ref)
    np.testing.assert_allclose(g - c, g_ref, rtol=0, atol=atol)
    np.testing.assert_allclose(f + c, f_ref, rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
@pytest.mark.parametrize("uniform", [True, False], ids=["uniform", "weighted"])
def test_balanced_assign_matches_reference(shape, dtype, uniform):
    N, K = shape
    rng = np.random.default_rng(N * 100 + K)
    lam = 3.0
    logP = random_logP(N, K, seed=N * 7 + K).astype(dtype)
    b = _marginal(K, rng, uniform)
    res = so.balanced_assign(logP, lam, b=b, tol=SOLVE_TOL[dtype], max_iter=100_000,
                             n_threads=1)
    ref = reference_assign(logP.astype(np.float64), lam, b=b)
    assert res.converged
    assert res.err <= SOLVE_TOL[dtype]
    _assert_potentials(res.f, res.g, ref["f"], ref["g"], POT_ATOL[dtype])
    P = res.plan()
    assert P.shape == (N, K) and P.dtype == dtype
    np.testing.assert_allclose(P.astype(np.float64), ref["plan"], rtol=1e-6,
                               atol=PLAN_ATOL[dtype])
    np.testing.assert_allclose(res.cost, ref["cost"], rtol=COST_RTOL[dtype], atol=1e-12)
    assert res.labels.dtype == np.int64 and res.labels.shape == (N,)
    # Labels are compared where the reference's argmax is not a near-tie (with N = 1 the
    # scores lam * logP + g are all equal: the plan's single row is b).
    scores = np.sort(lam * logP.astype(np.float64) + ref["g"][None, :], axis=1)
    clear = (scores[:, -1] - scores[:, -2] > 1e-3) if K > 1 else np.ones(N, bool)
    np.testing.assert_array_equal(res.labels[clear], ref["labels"][clear])
    np.testing.assert_array_equal(res.sizes, np.bincount(res.labels, minlength=K))
    assert np.all((res.labels >= 0) & (res.labels < K))


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
@pytest.mark.parametrize("reg", [0.1, 1.0])
def test_sinkhorn_matches_reference(shape, dtype, reg):
    n, m = shape
    rng = np.random.default_rng(n * 1000 + m)
    C = _cost_matrix(n, m, rng).astype(dtype)
    a, b = _marginal(n, rng, False), _marginal(m, rng, False)
    res = so.sinkhorn(C, a, b, reg=reg, tol=SOLVE_TOL[dtype], max_iter=100_000,
                      n_threads=1)
    ref = reference_sinkhorn(C.astype(np.float64), a, b, reg=reg)
    assert res.converged
    _assert_potentials(res.f, res.g, ref["f"], ref["g"], POT_ATOL[dtype])
    np.testing.assert_allclose(res.plan().astype(np.float64), ref["plan"], rtol=1e-6,
                               atol=PLAN_ATOL[dtype])
    np.testing.assert_allclose(res.cost, ref["cost"], rtol=COST_RTOL[dtype], atol=1e-12)


def test_balanced_assign_is_sinkhorn_of_negative_logP():
    """balanced_assign(logP, lam) is exactly sinkhorn(C=-logP, reg=1/lam)."""
    logP = random_logP(40, 9, seed=3)
    r1 = so.balanced_assign(logP, 8.0, tol=1e-12, max_iter=100_000)
    r2 = so.sinkhorn(-logP, reg=1 / 8.0, tol=1e-12, max_iter=100_000)
    np.testing.assert_allclose(r1.plan(), r2.plan(), rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(r1.cost, r2.cost, rtol=1e-10)
    c = np.mean(r1.g - r2.g)
    np.testing.assert_allclose(r1.g - c, r2.g, atol=1e-9)


def test_reported_err_is_the_plans_violation():
    logP = random_logP(30, 7, seed=9)
    res = so.balanced_assign(logP, 25.0, n_iter=4)
    P = np.exp(25.0 * logP + res.f[:, None] + res.g[None, :])
    err = np.abs(P.sum(1) - 1 / 30).sum() + np.abs(P.sum(0) - 1 / 7).sum()
    assert err > 1e-6  # four passes cannot have converged: the test can fail
    np.testing.assert_allclose(res.err, err, rtol=1e-8, atol=1e-15)


# --------------------------------------------------------------------------------- POT
ot = pytest.importorskip("ot")


@pytest.mark.parametrize("shape", [(1, 4), (6, 1), (20, 13), (45, 30)])
@pytest.mark.parametrize("reg", [0.05, 0.5])
def test_sinkhorn_matches_pot_sinkhorn_log(shape, reg):
    n, m = shape
    rng = np.random.default_rng(n + 31 * m)
    C = _cost_matrix(n, m, rng)
    a, b = _marginal(n, rng, False), _marginal(m, rng, False)
    P_pot, log = ot.sinkhorn(a, b, C, reg, method="sinkhorn_log", stopThr=1e-13,
                             numItermax=200_000, log=True)
    res = so.sinkhorn(C, a, b, reg=reg, tol=1e-12, max_iter=200_000, n_threads=1)
    assert res.converged
    np.testing.assert_allclose(res.plan(), P_pot, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(res.cost, float(np.sum(P_pot * C)), rtol=1e-8)
    # POT's plan is exp(log_u - C / reg + log_v): the same potentials up to a constant.
    _assert_potentials(res.f, res.g, np.asarray(log["log_u"]), np.asarray(log["log_v"]),
                       1e-7)


def test_balanced_assign_matches_pot():
    logP = random_logP(80, 12, seed=4)
    lam = 25.0
    N, K = logP.shape
    P_pot = ot.sinkhorn(np.full(N, 1 / N), np.full(K, 1 / K), -logP, 1 / lam,
                        method="sinkhorn_log", stopThr=1e-13, numItermax=200_000)
    res = so.balanced_assign(logP, lam, tol=1e-12, max_iter=200_000, n_threads=1)
    np.testing.assert_allclose(res.plan(), P_pot, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(res.cost, float(np.sum(P_pot * -logP)), rtol=1e-8)
    np.testing.assert_array_equal(res.labels, np.argmax(P_pot, axis=1))
