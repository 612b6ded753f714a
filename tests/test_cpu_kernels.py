"""The CPU core's kernels against float64 NumPy: every instruction-set copy (AVX-512, AVX2,
baseline, chosen with SINKHORN_OT_CPU_ISA in a subprocess), the plan written by a pass and
by plan(), the float32 rows of mixed precision and the honesty of the err they report, the
validation folded into the first column log-sum-exp."""
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

import sinkhorn_ot
from sinkhorn_ot import _core
from sinkhorn_ot._cpu import CPUBackend


def _problem(N, K, dtype, seed=0, lam=25.0, forbid=0.0):
    rng = np.random.default_rng(seed)
    x = 3 * rng.standard_normal((N, K))
    logP = x - np.log(np.exp(x).sum(1, keepdims=True))
    if forbid:
        mask = rng.random((N, K)) < forbid
        mask[np.arange(N), rng.integers(0, K, N)] = False    # every row keeps a pair
        mask[rng.integers(0, N, K), np.arange(K)] = False    # every column too
        logP[mask] = -np.inf
    return logP.astype(dtype), lam


def _ref_pass(X, alpha, g, loga):
    """One fused pass in float64 NumPy: (f, column sums, cost, labels)."""
    t = alpha * X.astype(np.float64) + g
    m = t.max(axis=1, keepdims=True)
    s = np.exp(t - m).sum(axis=1, keepdims=True)
    f = loga[:, None] - m - np.log(s)
    Q = np.exp(t + f)
    xs = np.where(Q > 0, X.astype(np.float64), 0.0)
    return f[:, 0], Q.sum(axis=0), float((Q * xs).sum()), np.argmax(t, axis=1), Q


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (50, 17), (200, 64), (33, 1000), (130, 509)])
def test_pass_against_float64(dtype, shape):
    X, lam = _problem(*shape, dtype, forbid=0.2 if shape[1] > 1 else 0.0)
    N, K = X.shape
    g = np.random.default_rng(1).standard_normal(K)
    loga = np.full(N, -np.log(N))
    f_ref, col_ref, cost_ref, lab_ref, Q_ref = _ref_pass(X, lam, g, loga)
    for nt in (1, 2):  # threads only from 32k entries: (130, 509) runs two
        f, lab = np.empty(N), np.empty(N, dtype=np.int64)
        P = np.empty((N, K), dtype=dtype)
        col, colmax, cost, slack = _core.fused_pass(X, lam, g, loga, 1.0, f, lab, nt, plan=P)
        # float32: exp(d) in float32 is within a few ulps relative while |d| is small; an
        # entry far down (|d| ~ 80) carries |d| ulps, and below exp(-87) the clamp's value
        # (1.6e-38) stands in for it: absolute tolerances at that scale
        rtol = 1e-12 if dtype == np.float64 else 2e-6
        atol = 1e-300 if dtype == np.float64 else 1e-9 * Q_ref.max()
        np.testing.assert_allclose(f, f_ref, rtol=0, atol=rtol * np.abs(f_ref).max())
        np.testing.assert_allclose(col, col_ref, rtol=rtol, atol=max(atol, 1e-34))
        np.testing.assert_allclose(cost, cost_ref, rtol=10 * rtol, atol=1e-12)
        np.testing.assert_array_equal(lab, lab_ref)
        np.testing.assert_allclose(P, Q_ref, rtol=rtol, atol=atol)
        assert np.all(P[~np.isfinite(X)] == 0)                  # forbidden pairs: exactly 0
        assert np.all(colmax >= np.log(Q_ref.max(axis=0)) - 1e-6)   # an upper bound
        assert slack == 0.0                                     # fast rows not allowed


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_plan_kernel_rows_and_scale(dtype):
    X, lam = _problem(40, 23, dtype, seed=2, forbid=0.1)
    res = sinkhorn_ot.balanced_assign(X, lam, n_iter=4)
    Q = np.exp(lam * X.astype(np.float64) + np.asarray(res.f)[:, None] + np.asarray(res.g))
    rtol = 1e-12 if dtype == np.float64 else 2e-6
    atol = 1e-300 if dtype == np.float64 else 1e-9
    np.testing.assert_allclose(res.plan(), Q, rtol=rtol, atol=atol)
    be = CPUBackend()
    rows = np.array([0, 5, 6, 39])
    np.testing.assert_allclose(be.plan(X, lam, res.f, res.g, scale=40.0, rows=rows),
                               40 * Q[rows], rtol=rtol, atol=40 * atol)
    np.testing.assert_allclose(be.plan(X, lam, res.f, res.g, rows=slice(10, 20)), Q[10:20],
                               rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_plan_exponential_over_its_whole_range(dtype):
    """The kernels' exponential against np.exp from the underflow clamp to the largest
    finite result (exp(88.7) in float32, exp(709.7) in float64, whose 2^n alone overflows):
    finite where np.exp is, 0 below the clamp, inf above."""
    top = 88.7 if dtype == np.float32 else 709.7
    bottom = -87.0 if dtype == np.float32 else -708.0
    x = np.concatenate([np.linspace(bottom, top, 100_001), [top, -2 * top]]).astype(dtype)
    P = CPUBackend().plan(x[None, :], 1.0, np.zeros(1), np.zeros(x.size))[0]
    ref = np.exp(x.astype(np.float64))
    assert np.isfinite(P[:-1]).all() and P[-1] == 0
    rtol = 8e-16 if dtype == np.float64 else 2.5e-7           # the polynomial and rounding
    np.testing.assert_allclose(P[:-1], ref[:-1], rtol=rtol, atol=0)
    hi = CPUBackend().plan(np.array([[top * 1.001]], dtype), 1.0, np.zeros(1), np.zeros(1))
    assert np.isinf(hi).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("K", [1, 7, 16, 37])
def test_labels_read_after_the_loop(dtype, K):
    """_core.labels: the first argmax of alpha X + g in float64 (forbidden pairs never win,
    a row with none allowed gets 0, exact ties go to the smallest index), as the pass's own
    argmax gives it, at every tail length."""
    rng = np.random.default_rng(K)
    X = rng.standard_normal((203, K)).astype(dtype)
    X[rng.random(X.shape) < 0.2] = -np.inf
    X[5] = -np.inf                                              # no allowed entry
    X[6] = 0.5                                                  # every entry tied
    g = rng.standard_normal(K)
    g[-1] = 0.0
    X[7, :] = -np.inf
    X[7, [K // 2, K - 1]] = 1.0                                 # a tie between two entries
    g[K // 2] = 0.0
    t = 3.0 * X.astype(np.float64) + g
    ref = np.argmax(t, axis=1)
    ref[np.isneginf(t).all(axis=1)] = 0
    for nt in (1, 2):
        out = np.full(X.shape[0], -1, np.int64)
        _core.labels(X, 3.0, g, out, nt)
        np.testing.assert_array_equal(out, ref)
    lab = np.empty(X.shape[0], np.int64)
    _core.fused_pass(X, 3.0, g, np.zeros(X.shape[0]), 1.0, np.empty(X.shape[0]), lab, 1)
    np.testing.assert_array_equal(lab, ref)


def test_pass_written_plan_is_the_plan_of_the_returned_potentials():
    S = np.random.default_rng(3).uniform(-1, 1, (300, 50)).astype(np.float32)
    q = sinkhorn_ot.codes(S, eps=0.05, n_iter=3)               # written by the last pass
    res = sinkhorn_ot.balanced_assign(S, 20.0, n_iter=3)
    # float32 both ways (the pass may form its rows in float32 within its checked bound)
    np.testing.assert_allclose(q, 300 * np.asarray(res.plan()), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("lam", [1.0, 25.0, 1e3])
def test_mixed_precision_err_is_honest(lam):
    """float32 input: passes may form rows in float32; the reported err stays within 5% of
    the independent float64 err of the returned plan, fixed and tolerance solves alike."""
    X, _ = _problem(2000, 60, np.float32, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for kw in (dict(n_iter=1), dict(n_iter=3), dict(n_iter=20), dict(tol=1e-5),
                   dict(tol=1e-5, acceleration=None, eps_scaling=False)):
            res = sinkhorn_ot.sinkhorn(-X.astype(np.float32), reg=1 / lam, **kw)
            Q = np.exp(lam * X.astype(np.float64) + np.asarray(res.f)[:, None] +
                       np.asarray(res.g))
            err = np.abs(Q.sum(1) - 1 / 2000).sum() + np.abs(Q.sum(0) - 1 / 60).sum()
            assert abs(res.err - err) <= max(0.05 * err, 1e-7), (kw, res.err, err)


def _extreme_float32_problem(seed, n=24, m=17):
    """Squared costs of a few thousand reg at small reg: |S| ~ 7500 and g spanning ~800,
    where float32 rounding of S or g alone moves exponents by ~5e-4; some pairs forbidden."""
    rng = np.random.default_rng(seed)
    C = 3 * rng.random((n, m)) ** 2
    if seed % 2:
        C[rng.random((n, m)) < 0.2] = np.inf
        C[np.arange(n), rng.integers(0, m, n)] = 3 * rng.random(n) ** 2  # a pair per row
        C[rng.integers(0, n, m), np.arange(m)] = 3 * rng.random(m) ** 2  # and per column
    a, b = rng.random(n) + 0.05, rng.random(m) + 0.05
    return C.astype(np.float32), a / a.sum(), b / b.sum()


@pytest.mark.parametrize("reg", [0.0004, 0.001, 0.01])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mixed_precision_err_is_honest_down_to_tiny_err(reg, seed):
    """float32 input solved to err ~1e-9: the err reported is the float64 column violation
    of the returned potentials' plan (within HONEST_SHARE), and its rows hold to float64
    rounding relative to err, at every stopping point (the float32 exponentials and row
    sums of a pass count in its bound: passes they would make dishonest run in float64)."""
    from reference import plan_from_potentials
    C, a, b = _extreme_float32_problem(seed)
    S = -C.astype(np.float64) / reg
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kw in (dict(), dict(acceleration=None)):
            for mi in (30, 300, 3000):
                r = sinkhorn_ot.sinkhorn(C, a, b, reg=reg, tol=1e-9, max_iter=mi, **kw)
                P = plan_from_potentials(S, r.f, r.g)
                err = np.abs(P.sum(0) - b).sum()
                rows = np.abs(P.sum(1) - a).sum()
                assert abs(r.err - err) <= 0.05 * err + 1e-13, (kw, mi, r.err, err)
                assert rows <= 0.05 * err + 1e-12, (kw, mi, rows, err)


def test_mixed_precision_err_is_honest_issue13_reproduction():
    """The reported case: reported 4.9e-9 where the returned plan's columns were off by
    1.7e-8 and its rows by 1.8e-8 (float32 exponentials in a pass reported exact)."""
    from reference import plan_from_potentials
    reg, rng = 0.0004, np.random.default_rng(4)
    C = 3 * rng.random((8, 24, 17)) ** 2
    C[3][rng.random((24, 17)) < 0.2] = np.inf  # (problem 3's; the draw moves a and b)
    a, b = rng.random((8, 24)) + 0.05, rng.random((8, 17)) + 0.05
    a, b = a[0] / a[0].sum(), b[0] / b[0].sum()
    S = -C[0].astype(np.float32).astype(np.float64) / reg
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kw in (dict(), dict(acceleration=None)):
            r = sinkhorn_ot.sinkhorn(C[0].astype(np.float32), a, b, reg=reg, tol=1e-9,
                                     max_iter=3000, **kw)
            P = plan_from_potentials(S, r.f, r.g)
            err, rows = np.abs(P.sum(0) - b).sum(), np.abs(P.sum(1) - a).sum()
            assert abs(r.err - err) <= 0.05 * err + 1e-13, (kw, r.err, err)
            assert rows <= 0.05 * err + 1e-12, (kw, rows, err)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pass_rows_full_precision_unless_allowed(dtype):
    """fast=0: float64 rows, exponentials included (slack 0, column sums and f to float64
    rounding); a pass allowed an error (float32 rows or exponentials, short float64
    exponentials) reports a bound it keeps: on each row's sum, and on the L1 error of the
    column sums relative to their mass (the bound weighs each entry's |t - m| by its share
    of the row, so a small entry alone may be off by more)."""
    X, lam = _problem(40, 700, dtype, seed=7, forbid=0.1)
    N, K = X.shape
    g = 5 * np.random.default_rng(8).standard_normal(K)
    loga = np.full(N, -np.log(N))
    f_ref, col_ref, *_ = _ref_pass(X, lam, g, loga)
    for fast in (0.0, 1e-6, 1e-4, 1e-2):
        for lab in (None, np.empty(N, dtype=np.int64)):
            f = np.empty(N)
            col, _, _, slack = _core.fused_pass(X, lam, g, loga, 1.0, f, lab, 1, fast=fast)
            assert slack <= fast
            assert fast < 1e-4 or slack > 1e-7  # float32 exponentials are used
            tol = max(slack, 1e-12)  # float64 rounding of t (|t| ~ 1e3) and of the sums
            assert np.abs(col - col_ref).sum() <= tol * col_ref.sum()
            if slack == 0:
                np.testing.assert_allclose(col, col_ref, rtol=tol, atol=1e-30)
            np.testing.assert_allclose(np.exp(f - f_ref), 1.0, rtol=tol, atol=0)


def test_mixed_precision_rows_are_used_and_bounded():
    S = np.random.default_rng(5).uniform(-1, 1, (500, 80)).astype(np.float32)
    N, K = S.shape
    g, loga = np.zeros(K), np.full(N, -np.log(N))
    f_ref, col_ref, *_ = _ref_pass(S, 20.0, g, loga)
    f = np.empty(N)
    col, _, _, slack = _core.fused_pass(S, 20.0, g, loga, 1.0, f, None, 1, fast=1e-3)
    assert 0 < slack <= 1e-3
    np.testing.assert_allclose(col, col_ref, rtol=slack + 1e-6)
    np.testing.assert_allclose(f, f_ref, rtol=0, atol=slack + 1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_short_exponentials_within_their_bound(dtype):
    """A pass allowed the short float64 exponential's error (3e-10) but not float32's forms
    float64 rows with it and reports that bound, which its column sums and f keep; allowed
    less, its rows are at full precision (slack 0)."""
    X, lam = _problem(40, 700, dtype, seed=9, forbid=0.1)
    N, K = X.shape
    g = 5 * np.random.default_rng(10).standard_normal(K)
    loga = np.full(N, -np.log(N))
    f_ref, col_ref, *_ = _ref_pass(X, lam, g, loga)
    for fast in (1e-10, 1e-9, 1e-7):
        f = np.empty(N)
        col, _, _, slack = _core.fused_pass(X, lam, g, loga, 1.0, f, None, 1, fast=fast)
        if fast < 3e-10:
            assert slack == 0
            np.testing.assert_allclose(f, f_ref, rtol=0, atol=1e-12 * np.abs(f_ref).max())
            continue
        assert 1e-10 <= slack <= fast  # the short exponential, not float32 arithmetic
        assert np.abs(col - col_ref).sum() <= (slack + 1e-12) * col_ref.sum()
        np.testing.assert_allclose(np.exp(f - f_ref), 1.0, rtol=slack + 1e-12, atol=0)
        assert np.abs(f - f_ref).max() > 1e-14  # (it is not the full-precision pass)


@pytest.mark.parametrize("tol", [1e-4, 1e-6, 1e-9])
def test_float64_solve_returns_a_full_precision_pass(tol):
    """float64 to a tolerance: the passes before the last run with the short exponentials,
    the pass returned at full precision (its rows hold to float64 rounding) and its err the
    independent float64 err; a fixed n_iter runs every pass at full precision."""
    X, lam = _problem(3000, 80, np.float64, seed=11)
    N, K = X.shape
    slacks = []
    orig = CPUBackend.fused_pass

    def recorded(self, *a, **kw):
        out = orig(self, *a, **kw)
        slacks.append(self.slack)
        return out

    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        mp.setattr(CPUBackend, "fused_pass", recorded)
        for kw in (dict(tol=tol), dict(tol=tol, acceleration=None, eps_scaling=False,
                                       max_iter=20_000), dict(n_iter=20)):
            slacks.clear()
            r = sinkhorn_ot.sinkhorn(-X, reg=1 / lam, **kw)
            Q = np.exp(lam * X + np.asarray(r.f)[:, None] + np.asarray(r.g))
            err = np.abs(Q.sum(0) - 1 / K).sum()
            assert np.abs(Q.sum(1) - 1 / N).sum() <= 1e-14, kw
            assert abs(r.err - err) <= 1e-4 * err + 1e-15, (kw, r.err, err)
            if "n_iter" in kw:
                assert max(slacks) == 0
            else:
                assert r.converged and err <= tol, (kw, err)
                assert slacks[-1] == 0 and max(slacks) > 0, (kw, slacks)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_validation_folded_into_the_column_lse(dtype):
    X, lam = _problem(120, 30, dtype, seed=6, forbid=0.3)
    for forbidden, alpha in ((-np.inf, lam), (np.inf, -lam)):
        Y = X if forbidden < 0 else -X
        L, facts = _core.column_lse(Y, alpha, None, 0, forbidden)
        assert facts == _core.check_matrix(Y, forbidden, 0)
        t = alpha * Y.astype(np.float64)
        with np.errstate(divide="ignore"):
            L_ref = np.log(np.exp(t - t.max(0)).sum(0)) + t.max(0)
        np.testing.assert_allclose(L, L_ref, rtol=1e-12 if dtype == np.float64 else 1e-6)
    bad = X.copy()
    bad[7, 3], bad[9, :] = np.nan, -np.inf
    bad[:, 11] = -np.inf
    L, facts = _core.column_lse(bad, lam, None, 2, -np.inf)
    assert facts == _core.check_matrix(bad, -np.inf, 2)
    assert (facts["first_invalid"], facts["first_empty_row"], facts["first_empty_col"]) == \
        (7 * 30 + 3, 9, 11)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("step", [1e-3, 0.5, 40.0])
def test_pass_with_the_previous_row_shifts(dtype, step):
    """A pass shifted by the previous pass's row log-sum-exps (a small change of g), or at
    the exact maxima (a change too wide for that bound, or a column that closes), gives the
    pass of the float64 reference."""
    X, lam = _problem(120, 300, dtype, seed=3, forbid=0.2)
    N, K = X.shape
    rng = np.random.default_rng(4)
    loga = np.full(N, -np.log(N))
    g0 = rng.standard_normal(K)
    lse0 = np.empty(N)
    _core.fused_pass(X, lam, g0, loga, 1.0, np.empty(N), None, 1, lse=lse0)
    t0 = lam * X.astype(np.float64) + g0
    np.testing.assert_allclose(lse0, np.log(np.exp(t0 - t0.max(1, keepdims=True)).sum(1))
                               + t0.max(1), rtol=1e-6 if dtype == np.float32 else 1e-13)
    for g1 in (g0 + step * rng.standard_normal(K), np.where(np.arange(K) == 5, -np.inf, g0)):
        f = np.empty(N)
        lse1 = np.empty(N)
        col, _, cost, _ = _core.fused_pass(X, lam, g1, loga, 1.0, f, None, 1, lse=lse1,
                                           lse_prev=lse0, g_prev=g0)
        rf, rcol, rcost, _, _ = _ref_pass(X, lam, g1, loga)
        tol = 2e-5 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(f, rf, rtol=tol, atol=tol)
        np.testing.assert_allclose(col, rcol, rtol=tol, atol=tol / K)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_near_ties_against_numpy(dtype, rng):
    X = np.round(rng.standard_normal((500, 77)), 1).astype(dtype)  # many exact ties
    X[7, :] = -np.inf
    X[7, 3] = X[7, 70] = 0.5
    g = np.round(rng.standard_normal(77), 1)
    rows = np.array([0, 7, 499, 7, 250])
    for tau in (0.0, 0.05, 0.3):
        S = 3.0 * X[rows].astype(np.float64) + g
        best = S.max(axis=1, keepdims=True)
        ref = (S >= best - tau - 1e-12 * (1 + np.abs(best))).sum(axis=1)
        np.testing.assert_array_equal(_core.near_ties(X, 3.0, g, rows, tau), ref)


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_every_instruction_set_copy(isa):
    """The narrower copies of the kernels give the same answers as the widest one this CPU
    has (which it runs by default)."""
    widest = _core.isa()
    order = ["baseline", "avx2", "avx512"]
    if order.index(widest) <= order.index(isa):
        pytest.skip(f"this CPU has no instruction set wider than {isa} to compare with")
    code = (
        "import sys, numpy as np, sinkhorn_ot\n"
        "from sinkhorn_ot import _core\n"
        "assert _core.isa() == sys.argv[2], _core.isa()\n"
        "rng = np.random.default_rng(0)\n"
        "for dt in (np.float32, np.float64):\n"
        "    X = rng.standard_normal((301, 37)).astype(dt); X[3, 4] = -np.inf\n"
        "    r = sinkhorn_ot.balanced_assign(X, 5.0, n_iter=7)\n"
        "    q = sinkhorn_ot.codes(X, eps=0.2, n_iter=3)\n"
        "    t = _core.near_ties(np.round(X, 1), 5.0, np.zeros(37), np.arange(301), 0.0)\n"
        "    f = np.empty(301)\n"  # a pass allowed the short exponentials
        "    c = _core.fused_pass(X, 5.0, r.g, np.zeros(301), 1.0, f, None, 1, fast=1e-7)[0]\n"
        "    np.save(sys.argv[1] + dt.__name__ + '.npy', np.concatenate([r.f, r.g, q.ravel(),"
        " r.labels.astype(float), [r.err, r.cost], t, f, c]))\n")
    tmp = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"sk_isa_{os.getpid()}_")
    outs = {}
    for which in (isa, widest):
        env = dict(os.environ, SINKHORN_OT_CPU_ISA=which)
        r = subprocess.run([sys.executable, "-c", code, tmp + which, which], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        outs[which] = {dt: np.load(tmp + which + dt + ".npy") for dt in ("float32", "float64")}
    # float32: rounding that differs with the vector width, over 7 iterations
    for dt, rtol, atol in (("float32", 2e-5, 5e-6), ("float64", 1e-12, 1e-12)):
        np.testing.assert_allclose(outs[isa][dt], outs[widest][dt], rtol=rtol, atol=atol)
