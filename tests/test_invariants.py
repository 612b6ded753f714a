"""Invariants of the solution: marginals, row shifts, permutations, transposition, the LP
limit, precision, threads, memory layout, no mutation of inputs, forbidden pairs."""
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

import sinkhorn_ot as so
from reference import plan_from_potentials, random_logP

T1 = dict(n_threads=1)  # small problems: one thread is fastest on the shared machine


def _plan64(S, res):
    """The plan recomputed independently in float64 from the returned potentials."""
    return plan_from_potentials(np.asarray(S, np.float64), res.f, res.g)


def _violation(P, a, b):
    P = np.asarray(P, np.float64)
    return np.abs(P.sum(1) - a).sum() + np.abs(P.sum(0) - b).sum()


# ------------------------------------------------------------------------- marginals

@pytest.mark.parametrize("dtype,lam", [
    (np.float64, 1.0), (np.float64, 25.0), (np.float64, 100.0), (np.float32, 1.0),
    (np.float32, 25.0), (np.float32, 100.0),
], ids=["f64-1", "f64-25", "f64-100", "f32-1", "f32-25", "f32-100"])
def test_reported_err_is_the_violation_of_the_returned_plan(dtype, lam):
    N, K = 120, 11
    logP = random_logP(N, K, seed=5).astype(dtype)
    b = np.random.default_rng(1).uniform(0.5, 1.5, K)
    b /= b.sum()
    res = so.balanced_assign(logP, lam, b=b, max_iter=50_000, **T1)
    measured = _violation(res.plan(), np.full(N, 1 / N), b)
    # float32 output rounding moves the measured sums by about 6e-8 at most
    atol = 1e-13 if dtype == np.float64 else 3e-7
    np.testing.assert_allclose(res.err, measured, rtol=0, atol=atol)


@pytest.mark.parametrize("dtype,lam", [
    (np.float64, 1.0), (np.float64, 25.0), (np.float64, 100.0), (np.float32, 1.0),
], ids=["f64-1", "f64-25", "f64-100", "f32-1"])
def test_marginals_within_tol(dtype, lam):
    N, K = 120, 11
    logP = random_logP(N, K, seed=5).astype(dtype)
    b = np.random.default_rng(1).uniform(0.5, 1.5, K)
    b /= b.sum()
    res = so.balanced_assign(logP, lam, b=b, max_iter=50_000, **T1)
    assert res.converged
    tol = 1e-6 if dtype == np.float64 else 1e-5  # the documented defaults, total mass 1
    a = np.full(N, 1 / N)
    assert res.err <= tol
    # measured here, in float64, from plan() and from the potentials
    assert _violation(res.plan(), a, b) <= tol
    assert _violation(_plan64(lam * logP.astype(np.float64), res), a, b) <= tol
    # rows are exact by construction
    np.testing.assert_allclose(res.plan().astype(np.float64).sum(1), a, rtol=1e-5 if
                               dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("tol", [1e-3, 1e-8])
def test_sinkhorn_marginals_with_explicit_tol(tol):
    rng = np.random.default_rng(2)
    C = rng.uniform(0, 1, (30, 40))
    a = rng.uniform(0.1, 1, 30)
    b = rng.uniform(0.1, 1, 40)
    a *= 3.0 / a.sum()  # total mass 3: err is absolute
    b *= 3.0 / b.sum()
    res = so.sinkhorn(C, a, b, reg=0.02, tol=tol, max_iter=50_000, **T1)
    assert res.converged and res.err <= tol
    assert _violation(res.plan(), a, b) <= tol * 1.01
    np.testing.assert_allclose(res.plan().sum(), 3.0, rtol=1e-6)


# ----------------------------------------------------------------------- row shifts
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_invariant_to_per_row_shifts(dtype):
    N, K, lam = 60, 9, 10.0
    logP = random_logP(N, K, seed=8)
    shift = np.random.default_rng(3).uniform(-5, 5, N)
    tol = 1e-12 if dtype == np.float64 else 1e-6
    r1 = so.balanced_assign(logP.astype(dtype), lam, tol=tol, max_iter=50_000, **T1)
    r2 = so.balanced_assign((logP + shift[:, None]).astype(dtype), lam, tol=tol,
                            max_iter=50_000, **T1)
    atol = 1e-13 if dtype == np.float64 else 3e-6
    np.testing.assert_allclose(r2.plan().astype(np.float64), r1.plan(), rtol=1e-6,
                               atol=atol)
    np.testing.assert_array_equal(r2.labels, r1.labels)
    np.testing.assert_array_equal(r2.sizes, r1.sizes)
    # f absorbs the shift: f2 = f1 - lam * shift (up to the common constant)
    c = np.mean(r2.g - r1.g)
    pot_atol = 1e-8 if dtype == np.float64 else 1e-2
    np.testing.assert_allclose(r2.g - c, r1.g, atol=pot_atol)
    np.testing.assert_allclose(r2.f + c, r1.f - lam * shift, atol=pot_atol)
    # cost = <Q, -logP> moves by -sum_i a_i shift_i
    np.testing.assert_allclose(r2.cost, r1.cost - shift.mean(),
                               rtol=1e-9 if dtype == np.float64 else 1e-4, atol=1e-9)


# --------------------------------------------------------------------- permutations
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_permutation_equivariance(dtype):
    N, K, lam = 50, 13, 25.0
    rng = np.random.default_rng(4)
    logP = random_logP(N, K, seed=11).astype(dtype)
    b = rng.uniform(0.5, 1.5, K)
    b /= b.sum()
    pr, pc = rng.permutation(N), rng.permutation(K)
    tol = 1e-12 if dtype == np.float64 else 1e-6
    r1 = so.balanced_assign(logP, lam, b=b, tol=tol, max_iter=50_000, **T1)
    r2 = so.balanced_assign(logP[pr][:, pc], lam, b=b[pc], tol=tol, max_iter=50_000, **T1)
    atol = 1e-13 if dtype == np.float64 else 3e-6
    np.testing.assert_allclose(r2.plan().astype(np.float64),
                               r1.plan().astype(np.float64)[pr][:, pc], rtol=1e-6, atol=atol)
    inv_c = np.argsort(pc)
    np.testing.assert_array_equal(r2.labels, inv_c[r1.labels[pr]])
    np.testing.assert_array_equal(r2.sizes, r1.sizes[pc])
    c = np.mean(r2.g - r1.g[pc])
    pot_atol = 1e-8 if dtype == np.float64 else 1e-2
    np.testing.assert_allclose(r2.g - c, r1.g[pc], atol=pot_atol)
    np.testing.assert_allclose(r2.f + c, r1.f[pr], atol=pot_atol)
    np.testing.assert_allclose(r2.cost, r1.cost, rtol=1e-9 if dtype == np.float64 else 1e-4)


def test_transposition_symmetry():
    rng = np.random.default_rng(5)
    n, m = 23, 17
    C = rng.uniform(0, 2, (n, m))
    a = rng.uniform(0.2, 1, n)
    b = rng.uniform(0.2, 1, m)
    a /= a.sum()
    b /= b.sum()
    r1 = so.sinkhorn(C, a, b, reg=0.1, tol=1e-12, max_iter=50_000, **T1)
    r2 = so.sinkhorn(C.T, b, a, reg=0.1, tol=1e-12, max_iter=50_000, **T1)
    np.testing.assert_allclose(r2.plan(), r1.plan().T, rtol=1e-7, atol=1e-13)
    np.testing.assert_allclose(r2.cost, r1.cost, rtol=1e-10)
    c = np.mean(r2.g - r1.f)
    np.testing.assert_allclose(r2.g - c, r1.f, atol=1e-8)
    np.testing.assert_allclose(r2.f + c, r1.g, atol=1e-8)


# ---------------------------------------------------------------------- LP limit
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_large_lam_labels_match_linear_sum_assignment(seed):
    N = 12
    logP = random_logP(N, N, seed=100 + seed)
    rows, cols = linear_sum_assignment(-logP)
    # A unique LP optimum with a clear gap: the entropic solution at large lam tends to it.
    # Plain Sinkhorn is slow at large lam: a loose tol is enough for hard labels.
    res = so.balanced_assign(logP, 1000.0, tol=1e-4, max_iter=100_000, **T1)
    assert res.converged
    np.testing.assert_array_equal(res.labels[rows], cols)
    np.testing.assert_array_equal(res.sizes, np.ones(N, dtype=np.int64))
    lp_cost = -logP[rows, cols].sum() / N
    np.testing.assert_allclose(res.cost, lp_cost, rtol=1e-3)
    # and the plan is close to the permutation matrix / N
    Pi = np.zeros((N, N))
    Pi[rows, cols] = 1 / N
    np.testing.assert_allclose(res.plan(), Pi, rtol=0, atol=1e-3 / N)


# ----------------------------------------------------------------------- precision
@pytest.mark.parametrize("lam", [1.0, 25.0])
def test_float32_agrees_with_float64(lam):
    logP = random_logP(200, 16, seed=6)
    r64 = so.balanced_assign(logP, lam, max_iter=10_000, **T1)
    r32 = so.balanced_assign(logP.astype(np.float32), lam, max_iter=10_000, **T1)
    assert r64.converged and r32.converged
    assert r32.f.dtype == np.float64 or r32.f.dtype == np.float32
    np.testing.assert_allclose(r32.plan().astype(np.float64), r64.plan(), rtol=0, atol=2e-5)
    np.testing.assert_allclose(r32.cost, r64.cost, rtol=2e-4)
    assert np.mean(r32.labels == r64.labels) >= 0.97
    np.testing.assert_allclose(r32.sizes, r64.sizes, atol=max(2, 200 // 50))


# ------------------------------------------------------------------------ threads
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_one_thread_equals_two_threads(dtype):
    logP = random_logP(301, 19, seed=7).astype(dtype)
    r1 = so.balanced_assign(logP, 25.0, n_iter=40, n_threads=1)
    r2 = so.balanced_assign(logP, 25.0, n_iter=40, n_threads=2)
    assert r1.n_iter == r2.n_iter == 40
    rtol = 1e-11 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(r2.f, r1.f, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(r2.g, r1.g, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(r2.err, r1.err, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(r2.cost, r1.cost, rtol=rtol)
    np.testing.assert_array_equal(r2.labels, r1.labels)


def test_threads_give_same_converged_solution():
    rng = np.random.default_rng(8)
    C = rng.uniform(0, 1, (97, 33))
    r1 = so.sinkhorn(C, reg=0.05, tol=1e-10, n_threads=1)
    r2 = so.sinkhorn(C, reg=0.05, tol=1e-10, n_threads=2)
    np.testing.assert_allclose(r2.plan(), r1.plan(), rtol=1e-8, atol=1e-15)
    assert abs(r1.n_iter - r2.n_iter) <= 1


# ----------------------------------------------------------------- memory layouts
def _same_result(r, ref):
    np.testing.assert_array_equal(r.f, ref.f)
    np.testing.assert_array_equal(r.g, ref.g)
    assert r.n_iter == ref.n_iter and r.err == ref.err and r.cost == ref.cost
    np.testing.assert_array_equal(r.plan(), ref.plan())


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("layout", ["transposed", "fortran", "strided", "negative_stride"])
def test_non_contiguous_inputs(layout, dtype):
    N, K = 41, 10
    logP = random_logP(N, K, seed=12).astype(dtype)
    if layout == "transposed":
        X = np.ascontiguousarray(logP.T).T
    elif layout == "fortran":
        X = np.asfortranarray(logP)
    elif layout == "strided":
        big = np.zeros((2 * N, 3 * K), dtype=dtype)
        big[::2, ::3] = logP
        X = big[::2, ::3]
    else:
        X = np.ascontiguousarray(logP[::-1, ::-1])[::-1, ::-1]
    assert not X.flags.c_contiguous
    np.testing.assert_array_equal(X, logP)
    b = np.linspace(1, 2, 2 * K)[::2]  # a strided marginal, too
    b = b / b.sum()
    ref = so.balanced_assign(logP, 10.0, b=np.ascontiguousarray(b), **T1)
    r = so.balanced_assign(X, 10.0, b=b, **T1)
    _same_result(r, ref)
    np.testing.assert_array_equal(r.labels, ref.labels)
    rs = so.sinkhorn(-X, reg=0.1, **T1)
    _same_result(rs, so.sinkhorn(-logP, reg=0.1, **T1))


def test_list_input_is_accepted_like_an_array():
    C = [[0.0, 1.0], [1.0, 0.0]]
    r = so.sinkhorn(C, reg=0.1)
    np.testing.assert_allclose(r.plan(), [[0.5, 0.0], [0.0, 0.5]], atol=1e-4)


# -------------------------------------------------------------- inputs untouched
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_inputs_are_never_modified(dtype):
    rng = np.random.default_rng(13)
    logP = random_logP(30, 7, seed=13).astype(dtype)
    logP[3, 2] = -np.inf
    b = rng.uniform(0.5, 1, 7)
    b /= b.sum()
    a = rng.uniform(0.5, 1, 30)
    a /= a.sum()
    C = rng.uniform(0, 1, (30, 7)).astype(dtype)
    C[4, 4] = np.inf
    copies = [x.copy() for x in (logP, b, a, C)]
    r = so.balanced_assign(logP, 25.0, b=b, **T1)
    r.plan()
    r2 = so.balanced_assign(logP, 25.0, b=b, init=r, **T1)
    r2.plan()
    s = so.sinkhorn(C, a, b, reg=0.1, **T1)
    s.plan()
    s2 = so.sinkhorn(C, a, b, reg=0.1, n_iter=3, init=s.g)
    s2.plan()
    for x, x0 in zip((logP, b, a, C), copies):
        np.testing.assert_array_equal(x, x0)
    # a warm start must not modify the previous result either
    g_before = r.g.copy()
    so.balanced_assign(logP + 0.01, 25.0, b=b, init=r, **T1)
    np.testing.assert_array_equal(r.g, g_before)


def test_results_are_immutable():
    r = so.balanced_assign(random_logP(10, 3), 5.0, **T1)
    with pytest.raises(Exception):
        r.n_iter = 3  # frozen dataclass
    for arr in (r.f, r.g, r.labels, r.sizes):
        with pytest.raises(ValueError):
            arr[0] = 0


# ---------------------------------------------------------------- forbidden pairs
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_forbidden_pairs_get_zero_mass(dtype):
    rng = np.random.default_rng(14)
    N, K = 40, 6
    logP = random_logP(N, K, seed=14)
    mask = rng.uniform(size=(N, K)) < 0.3
    mask[np.arange(N), rng.integers(0, K, N)] = False  # every row keeps an allowed pair
    mask[rng.integers(0, N, K), np.arange(K)] = False  # every column too
    logP[mask] = -np.inf
    logP = logP.astype(dtype)
    # float32 solves to half its default tol, leaving room for float32 rounding of the plan
    res = so.balanced_assign(logP, 25.0, max_iter=20_000,
                             tol=None if dtype == np.float64 else 5e-6, **T1)
    assert res.converged
    P = res.plan()
    assert np.all(np.isfinite(P))
    np.testing.assert_array_equal(P[mask], 0)
    assert np.all(~mask[np.arange(N), res.labels])  # no sample labelled into a forbidden pair
    tol = 1e-6 if dtype == np.float64 else 1e-5
    assert _violation(P, np.full(N, 1 / N), np.full(K, 1 / K)) <= tol
    assert np.isfinite(res.cost)
    # cost excludes the forbidden pairs
    Pd = P.astype(np.float64)
    cost = np.sum(np.where(mask, 0.0, Pd * -np.where(mask, 0, logP.astype(np.float64))))
    np.testing.assert_allclose(res.cost, cost, rtol=1e-4 if dtype == np.float32 else 1e-9)


def test_forbidden_pairs_in_sinkhorn_cost():
    rng = np.random.default_rng(15)
    C = rng.uniform(0, 1, (8, 8))
    C[np.eye(8, dtype=bool)] = np.inf  # e.g. no self-transport
    res = so.sinkhorn(C, reg=0.05, tol=1e-10, **T1)
    P = res.plan()
    np.testing.assert_array_equal(np.diag(P), 0)
    np.testing.assert_allclose(P.sum(0), 1 / 8, atol=1e-10)
    np.testing.assert_allclose(P.sum(1), 1 / 8, atol=1e-10)
    finite = np.where(np.isinf(C), 0, C)
    np.testing.assert_allclose(res.cost, np.sum(P * finite), rtol=1e-10)


def test_forced_assignment_by_forbidden_pairs():
    """A permutation forced by -inf everywhere else: the plan is that permutation."""
    N = 9
    perm = np.random.default_rng(16).permutation(N)
    logP = np.full((N, N), -np.inf)
    logP[np.arange(N), perm] = -3.0
    res = so.balanced_assign(logP, 25.0)
    np.testing.assert_array_equal(res.labels, perm)
    expected = np.zeros((N, N))
    expected[np.arange(N), perm] = 1 / N
    np.testing.assert_allclose(res.plan(), expected, rtol=1e-12, atol=0)
    np.testing.assert_allclose(res.cost, 3.0, rtol=1e-12)


def test_zero_mass_columns_and_rows():
    """A zero entry of b is a cluster that receives nothing; a zero entry of a a row."""
    rng = np.random.default_rng(17)
    C = rng.uniform(0, 1, (10, 5))
    a = np.full(10, 0.1)
    a[3] = 0
    a /= a.sum()
    b = np.array([0.3, 0.0, 0.3, 0.2, 0.2])
    res = so.sinkhorn(C, a, b, reg=0.1, tol=1e-10, **T1)
    P = res.plan()
    assert np.all(np.isfinite(P))
    np.testing.assert_array_equal(P[:, 1], 0)
    np.testing.assert_array_equal(P[3], 0)
    np.testing.assert_allclose(P.sum(0), b, atol=1e-10)
    np.testing.assert_allclose(P.sum(1), a, atol=1e-10)
    logP = random_logP(20, 4, seed=17)
    r = so.balanced_assign(logP, 5.0, b=[0.5, 0.0, 0.25, 0.25], **T1)
    assert r.converged
    assert r.sizes[1] == 0 and np.all(r.labels != 1)
