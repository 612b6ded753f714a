"""Differential fuzzing of the solvers (hypothesis): every result honest on every input.

Run derandomised in CI (the ``sinkhorn`` profile of conftest.py); at length by hand with
``HYPOTHESIS_PROFILE=long python -m pytest tests/test_fuzz.py``.  Each property names the
reference it checks against:

- ``reference.plan_from_potentials``: the plan of the returned potentials evaluated
  independently in float64 on the input as given; its L1 marginal violation is the
  "independent err" every reported ``err`` must match (within 5%, or 1e-7 in float64 /
  1e-6 in float32, whose passes round exp(t - m) in float32).
- the library's own plain iterations (``acceleration=None, eps_scaling=False``): whatever
  converges plainly must converge with the defaults too.
- ``reference.reference_solve``: the float64 NumPy reference solve, for the potentials.
- the same call on a C-contiguous copy: layouts (Fortran order, views, negative strides)
  change nothing.
- ``clients.swav`` (tests/clients.py, SwAV's ``distributed_sinkhorn`` re-implemented in
  torch float64) for :func:`codes`, and codes' own definition (rows sum to 1, columns to
  ``B * b`` when solved to a tolerance, zero exactly on zero probabilities, ``rows=`` the
  same rows of the full codes).

Inputs are built feasible: the allowed pattern and the marginals come from a strictly
positive plan on it (so finite potentials exist), then columns/rows of zero mass are added.
"""
import math
import warnings

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import sinkhorn_ot
from reference import plan_from_potentials, reference_solve

N_EX = settings.default.max_examples


def _quiet():
    w = warnings.catch_warnings()
    w.__enter__()
    warnings.simplefilter("ignore", UserWarning)
    return w


@st.composite
def feasible(draw, n_max, m_max, n_min=1, m_min=1, assign=False):
    """(X, a, b, mask) with a strictly feasible allowed pattern: a random plan positive on a
    random pattern (every row and column keeps a pair) gives the marginals.  ``assign``:
    rows of equal mass (balanced_assign's a = 1/N).  Skewed: lognormal plan entries with
    sigma up to 6; zero-mass columns (and rows unless ``assign``) appended at random."""
    n = draw(st.integers(n_min, n_max))
    m = draw(st.integers(m_min, m_max))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    density = draw(st.sampled_from([1.0, 1.0, 0.7, 0.4]))
    mask = rng.random((n, m)) < density
    mask[np.arange(n), rng.integers(0, m, n)] = True
    mask[rng.integers(0, n, m), np.arange(m)] = True
    sigma = draw(st.sampled_from([0.0, 1.0, 3.0, 6.0]))
    Q = np.where(mask, np.exp(sigma * rng.standard_normal((n, m))), 0.0)
    if assign:
        Q /= Q.sum(axis=1, keepdims=True) * n
    Q /= Q.sum()
    a, b = Q.sum(axis=1), Q.sum(axis=0)
    scale = draw(st.sampled_from([0.1, 1.0, 3.0]))
    X = scale * rng.standard_normal((n, m))
    X[~mask] = np.inf
    zb = draw(st.integers(0, 2))
    if zb:  # zero-mass columns with any pattern that keeps an allowed entry
        Xz = scale * rng.standard_normal((n, zb))
        Xz[rng.random((n, zb)) < 0.5] = np.inf
        Xz[0] = 0.0
        X = np.concatenate([X, Xz], axis=1)
        b = np.concatenate([b, np.zeros(zb)])
    if not assign and draw(st.booleans()):  # a zero-mass row, every pair forbidden or not
        Xz = scale * rng.standard_normal((1, X.shape[1]))
        Xz[0, 0] = 0.0
        if draw(st.booleans()):
            Xz[:] = np.inf
        X = np.concatenate([X, Xz], axis=0)
        a = np.concatenate([a, [0.0]])
    return X, a, b


def _err_tol(err_ref, dtype):
    return max(0.05 * err_ref, 1e-7 if dtype == np.float64 else 1e-6)


def _independent_err(S, f, g, a, b):
    P = plan_from_potentials(S, f, g)
    return float(np.abs(P.sum(1) - a).sum() + np.abs(P.sum(0) - b).sum()), P


def _check_balanced(res, S, a, b, dtype):
    f, g = np.asarray(res.f, np.float64), np.asarray(res.g, np.float64)
    assert np.isfinite(f[a > 0]).all() and np.isfinite(g[b > 0]).all()
    # moderate: within a few times the spread of S of the gauge-free optimum
    s_max = np.abs(S[np.isfinite(S)]).max() + 1.0
    gc = g[b > 0] - g[b > 0].mean()
    assert np.abs(gc).max() <= 4 * min(S.shape) * (s_max + 1500), np.abs(gc).max()
    err_ref, P = _independent_err(S, f, g, a, b)
    assert abs(res.err - err_ref) <= _err_tol(err_ref, dtype), (res.err, err_ref)
    assert abs(P.sum() - a.sum()) <= err_ref + 1e-6
    Pr = np.asarray(res.plan(), np.float64)  # plan() itself: same plan, input's precision
    assert abs(Pr.sum() - a.sum()) <= err_ref + (1e-12 if dtype == np.float64 else 1e-5)
    return err_ref


# --- 1. tiny problems, large lam: the accelerated defaults stay honest ------------------

@settings(max_examples=3 * N_EX)
@given(prob=feasible(6, 6, 2, 2, assign=True), log_lam=st.floats(0.0, 4.0),
       dtype=st.sampled_from([np.float64, np.float32]))
def test_tiny_accelerated_assign_is_honest(prob, log_lam, dtype):
    """balanced_assign defaults on 2x2..6x6 (+ zero-mass columns), lam 1..1e4; references:
    the float64 evaluation of the plan of the returned potentials, and plain iterations."""
    X, _, b = prob
    logP = (-X).astype(dtype)
    lam = 10.0 ** log_lam
    N = logP.shape[0]
    a = np.full(N, 1.0 / N)
    w = _quiet()
    try:
        res = sinkhorn_ot.balanced_assign(logP, lam, b=b, max_iter=3000)
        plain = sinkhorn_ot.balanced_assign(logP, lam, b=b, acceleration=None,
                                            eps_scaling=False, max_iter=1000)
    finally:
        w.__exit__(None, None, None)
    S = lam * logP.astype(np.float64)
    _check_balanced(res, S, a, b, dtype)
    _check_balanced(plain, S, a, b, dtype)
    assert res.converged or not plain.converged
    assert res.n_iter <= 3000
    sizes = np.bincount(np.asarray(res.labels), minlength=logP.shape[1])
    np.testing.assert_array_equal(np.asarray(res.sizes), sizes)


@settings(max_examples=3 * N_EX)
@given(prob=feasible(6, 6, 2, 2), log_reg=st.floats(-4.0, 0.0),
       dtype=st.sampled_from([np.float64, np.float32]))
def test_tiny_accelerated_sinkhorn_is_honest(prob, log_reg, dtype):
    """sinkhorn defaults, skewed and zero-mass a and b, forbidden pairs, reg 1e-4..1;
    references as above."""
    X, a, b = prob
    C = X.astype(dtype)
    reg = 10.0 ** log_reg
    w = _quiet()
    try:
        res = sinkhorn_ot.sinkhorn(C, a, b, reg=reg, max_iter=3000)
        plain = sinkhorn_ot.sinkhorn(C, a, b, reg=reg, acceleration=None, eps_scaling=False,
                                     max_iter=1000)
    finally:
        w.__exit__(None, None, None)
    S = -C.astype(np.float64) / reg
    _check_balanced(res, S, a, b, dtype)
    assert res.converged or not plain.converged


# --- 2. shapes 1..300, every layout ------------------------------------------------------

def _layouts(A, which):
    """A (C-contiguous) as the layout ``which``: same values, different memory."""
    if which == "F":
        return np.asfortranarray(A)
    if which == "view":
        big = np.zeros((A.shape[0] + 1, A.shape[1] + 2), A.dtype)
        big[1:, 1:-1] = A
        return big[1:, 1:-1]
    if which == "neg":
        return np.ascontiguousarray(A[::-1, ::-1])[::-1, ::-1]
    return A


@settings(max_examples=N_EX)
@given(data=st.data(), log_reg=st.floats(-4.0, 4.0),
       dtype=st.sampled_from([np.float64, np.float32]),
       layout=st.sampled_from(["C", "F", "view", "neg"]),
       fn=st.sampled_from(["sinkhorn", "assign", "unbalanced"]))
def test_any_shape_layout_and_reg_is_honest(data, log_reg, dtype, layout, fn):
    """Shapes 1..300 (N = 1, K = 1, N < K included), reg / (1 / lam) 1e-4..1e4, float32 and
    float64, C / F order, views and negative strides.  References: the float64 evaluation
    of the returned potentials' plan (err honest), and the same call on a C-contiguous copy
    (identical results)."""
    X, a, b = data.draw(feasible(300, 300, assign=fn == "assign"))
    n, m = X.shape
    A = X.astype(dtype)
    Av = _layouts(A, layout)
    reg = 10.0 ** log_reg
    w = _quiet()
    try:
        if fn == "sinkhorn":
            call = lambda M: sinkhorn_ot.sinkhorn(M, a, b, reg=reg, max_iter=300)  # noqa: E731
        elif fn == "assign":  # log-probabilities -X, rows of mass 1/N
            call = lambda M: sinkhorn_ot.balanced_assign(-M, 1.0 / reg, b=b,  # noqa: E731
                                                         max_iter=300)
        else:
            call = lambda M: sinkhorn_ot.sinkhorn_unbalanced(  # noqa: E731
                M, a, b, reg=reg, reg_m=(math.inf, 1.0), max_iter=300)
        res, ref = call(Av), call(A)
    finally:
        w.__exit__(None, None, None)
    np.testing.assert_array_equal(res.g, ref.g)
    np.testing.assert_array_equal(res.f, ref.f)
    assert res.err == ref.err and res.n_iter == ref.n_iter
    S = -A.astype(np.float64) / reg
    f, g = np.asarray(res.f, np.float64), np.asarray(res.g, np.float64)
    if fn != "unbalanced":
        _check_balanced(res, S, a, b, dtype)
        return
    # semi-relaxed: exact rows, columns against b~ = b^(1/rho) exp(g (1 - 1/rho))
    rho = 1.0 / (1.0 + reg)
    P = plan_from_potentials(S, f, g)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        bt = np.where(b > 0, np.exp(np.log(b) / rho + g * (1 - 1 / rho)), 0.0)
    err_ref = float(np.abs(P.sum(0) - bt).sum())
    assert abs(res.err - err_ref) <= _err_tol(err_ref, dtype), (res.err, err_ref)
    np.testing.assert_allclose(P.sum(1), a, rtol=1e-5 if dtype == np.float32 else 1e-9,
                               atol=1e-12)


@settings(max_examples=N_EX)
@given(prob=feasible(12, 12), log_reg=st.floats(-0.5, 1.0))
def test_potentials_match_the_float64_reference(prob, log_reg):
    """Converged defaults against reference.reference_solve (float64 NumPy, log domain) at
    moderate reg: same plan."""
    X, a, b = prob
    reg = 10.0 ** log_reg
    res = sinkhorn_ot.sinkhorn(X, a, b, reg=reg, tol=1e-11, max_iter=20_000)
    assert res.converged
    _, _, P_ref, err_ref, _ = reference_solve(-X / reg, a, b, tol=1e-13)
    assume(err_ref <= 1e-10)  # the reference's own budget (200k plain passes) suffices
    np.testing.assert_allclose(res.plan(), P_ref, atol=1e-9)


@settings(max_examples=N_EX)
@given(data=st.data(), B=st.integers(1, 5), log_reg=st.floats(-3.5, 1.0),
       dtype=st.sampled_from([np.float64, np.float32]))
def test_ragged_batches_are_honest(data, B, log_reg, dtype):
    """A batch of feasible problems of different shapes padded to one (forbidden pairs,
    zero-mass rows and columns): the batched kernel's scaling-form and log-domain passes.
    References: the float64 evaluation of each returned plan (err and cost honest), and the
    single solve of each problem cropped to its own shape."""
    probs = [data.draw(feasible(20, 20)) for _ in range(B)]
    n = max(X.shape[0] for X, _, _ in probs)
    m = max(X.shape[1] for X, _, _ in probs)
    C = np.full((B, n, m), np.inf)
    a, b = np.zeros((B, n)), np.zeros((B, m))
    for p, (X, ap, bp) in enumerate(probs):
        C[p, :X.shape[0], :X.shape[1]], a[p, :len(ap)], b[p, :len(bp)] = X, ap, bp
    C = C.astype(dtype)
    reg = 10.0 ** log_reg
    w = _quiet()
    try:
        res = sinkhorn_ot.sinkhorn(C, a, b, reg=reg, tol=1e-8, max_iter=2000)
        singles = [sinkhorn_ot.sinkhorn(C[p, :X.shape[0], :X.shape[1]], ap, bp, reg=reg,
                                        tol=1e-8, max_iter=2000)
                   for p, (X, ap, bp) in enumerate(probs)]
    finally:
        w.__exit__(None, None, None)
    for p, (X, ap, bp) in enumerate(probs):
        S = -C[p].astype(np.float64) / reg
        f, g = res.f[p], res.g[p]
        err_ref, P = _independent_err(S, f, g, a[p], b[p])
        assert abs(res.err[p] - err_ref) <= _err_tol(err_ref, dtype), (p, res.err[p], err_ref)
        Cp = np.where(P > 0, C[p].astype(np.float64), 0.0)
        # float32: a problem the kernel stalls on is finished by the single solve, whose
        # float32 rows carry ~1e-6 relative error
        np.testing.assert_allclose(res.cost[p], (P * Cp).sum(), atol=1e-9,
                                   rtol=1e-9 if dtype == np.float64 else 1e-5)
        assert (P[X.shape[0]:] == 0).all() and (P[:, X.shape[1]:] == 0).all()
        s = singles[p]
        if res.converged[p] and s.converged:
            Ps = plan_from_potentials(S[:X.shape[0], :X.shape[1]], s.f, s.g)
            assert np.abs(P[:X.shape[0], :X.shape[1]] - Ps).sum() <= 4e-8 + 2 * (
                0 if dtype == np.float64 else 1e-6)


# --- 3. max_iter bounds every pass of a call ---------------------------------------------

@settings(max_examples=N_EX)
@given(prob=feasible(40, 40, 2, 2, assign=True), log_lam=st.floats(1.0, 4.0),
       max_iter=st.integers(1, 60))
def test_max_iter_bounds_all_passes(prob, log_lam, max_iter):
    """Reference: max_iter itself; the warning states the passes run."""
    X, _, b = prob
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = sinkhorn_ot.balanced_assign(-X, 10.0 ** log_lam, b=b, tol=1e-300,
                                          max_iter=max_iter)
    assert 1 <= res.n_iter <= max_iter
    msgs = [r for r in rec if "did not converge" in str(r.message)]
    if res.converged:  # err = 0 exactly (a 2 x 2 problem can get there)
        assert res.err == 0.0 and not msgs
        return
    assert len(msgs) == 1 and f"in {res.n_iter} iterations" in str(msgs[0].message)
    assert msgs[0].filename == __file__


# --- 4. the exact LP ----------------------------------------------------------------------

@settings(max_examples=N_EX)
@given(prob=feasible(300, 300))
def test_emd_matches_pot(prob):
    """emd against POT's network simplex (ot.emd, forbidden pairs at a huge cost): same
    cost to 1e-10 relative, plan exact on its marginals, duals feasible and tight."""
    ot = pytest.importorskip("ot")
    X, a, b = prob
    res = sinkhorn_ot.emd(X, a, b)
    allowed = np.isfinite(X)
    M = np.where(allowed, X, 1e3 * (np.abs(X[allowed]).max() + 1.0) * sum(X.shape))
    rtol = 1e-10
    if min(X.shape) == 1:  # POT's network simplex calls these infeasible; the plan is forced
        w = a[:, None] if X.shape[1] == 1 else b[None, :]
        ref = float(np.sum(np.where(w > 0, w * M, 0.0)))
    else:
        with warnings.catch_warnings(record=True) as doubts:
            warnings.simplefilter("always")
            ref = float(np.sum(ot.emd(a, b * (a.sum() / b.sum()), M, numItermax=10**7) * M))
        if doubts:  # POT doubts its answer: scipy's HiGHS instead, to its tolerance
            from scipy.optimize import linprog

            n, m = X.shape
            A = np.vstack([np.kron(np.eye(n), np.ones(m)), np.kron(np.ones(n), np.eye(m))])
            lp = linprog(M.ravel(), A_eq=A, b_eq=np.concatenate([a, b]), method="highs")
            ref, rtol = float(lp.fun), 1e-7
    P = res.plan()
    assert np.abs(P.sum(1) - a).sum() + np.abs(P.sum(0) - b).sum() <= 1e-12
    assert P.toarray()[~allowed].sum() == 0
    R = np.where(allowed, X, np.inf) - res.f[:, None] - res.g[None, :]
    cmax = np.abs(X[allowed]).max() + 1.0
    # weak duality: no plan costs less than the dual objective less the duals' infeasibility
    live_a, live_b = a > 0, b > 0
    lower = (res.f[live_a] @ a[live_a] + res.g[live_b] @ b[live_b]
             - max(0.0, -float(R[np.ix_(live_a, live_b)].min())) * a.sum())
    assert ref >= lower - 1e-12 * cmax, (ref, lower)  # POT's plan cannot beat the bound
    assert res.cost - lower <= 1e-12 * cmax, (res.cost, lower)  # ours meets it
    if res.cost < ref - rtol * abs(ref) - 1e-13:
        # below POT's cost: legitimate only because the bound proves POT's plan suboptimal
        # (ot.emd stops on reduced costs relative to the huge forbidden-pair cost)
        assert ref - lower > rtol * abs(ref), (res.cost, ref, lower)
    else:
        np.testing.assert_allclose(res.cost, ref, rtol=rtol, atol=1e-13)
    assert R.min() >= -1e-10 * cmax
    Pc = P.tocoo()
    np.testing.assert_allclose(R[Pc.row, Pc.col], 0.0, atol=1e-10 * cmax)


@st.composite
def degenerate(draw, n_max=40, m_max=40):
    """(C, a, b) of a highly degenerate transport LP: costs with few distinct integer values
    (many ties, many optimal vertices), small integer marginals of equal totals, or the
    assignment problem (a = b = 1): every basis has many zero flows."""
    n = draw(st.integers(1, n_max))
    m = n if draw(st.booleans()) else draw(st.integers(1, m_max))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    C = rng.integers(0, draw(st.sampled_from([1, 2, 4])) + 1, (n, m)).astype(np.float64)
    if n == m and draw(st.booleans()):
        a, b = np.ones(n), np.ones(m)
    else:
        a = rng.integers(1, 4, n).astype(np.float64)
        b = rng.integers(1, 4, m).astype(np.float64)
        d = a.sum() - b.sum()
        (b if d > 0 else a)[0] += abs(d)
    return C, a, b


@settings(max_examples=N_EX)
@given(prob=degenerate(), rule=st.sampled_from(["default", "bland", "cunningham"]),
       start=st.sampled_from(["northwest", "emd"]), perturb=st.sampled_from([False, True]))
def test_simplex_terminates_on_degenerate_problems(prob, rule, start, perturb):
    """Anti-cycling: the transport simplex ends (within its pivot limit: cycling would run
    into it and raise) on degenerate LPs under each pivot rule: Bland's throughout, block
    pricing with Cunningham's leaving rule and no Bland fallback, and the default (Bland's
    after n + m degenerate pivots in a row), from the degenerate northwest corner or emd's
    own start, on the marginals as given (degenerate pivots) or perturbed (none).
    Reference: POT's ot.emd cost (integral data: exact to round-off); the plan is integral,
    exact on its marginals, and the duals certify it."""
    ot = pytest.importorskip("ot")
    from sinkhorn_ot import _simplex

    C, a, b = prob
    n, m = C.shape
    limit = {"default": None, "bland": 0, "cunningham": 10**9}[rule]
    first = _simplex._northwest(a, b) if start == "northwest" else ()
    rows, cols, x, f, g = _simplex.finish(C, a, b, first, stall_limit=limit,
                                          perturb=perturb)
    P = np.zeros((n, m))
    np.add.at(P, (rows, cols), x)
    np.testing.assert_array_equal(P.sum(1), a)
    np.testing.assert_array_equal(P.sum(0), b)
    np.testing.assert_array_equal(P, np.round(P))
    ref = float(np.sum(ot.emd(a, b, C, numItermax=10**7) * C)) if min(n, m) > 1 else \
        float(np.sum(P * C))  # one row or column: the plan is forced
    np.testing.assert_allclose(float(np.sum(P * C)), ref, rtol=1e-12, atol=1e-12)
    R = C - f[:, None] - g[None, :]
    assert R.min() >= -1e-12 * (C.max() + 1.0)
    np.testing.assert_allclose(R[rows, cols], 0.0, atol=1e-12 * (C.max() + 1.0))


# --- 5. codes ------------------------------------------------------------------------------

@st.composite
def scores(draw, b_max=300, k_max=64):
    """Cosine-like scores in [-1, 1] (B x K, B = 1 and K = 1 included), as float64."""
    B = draw(st.integers(1, b_max))
    K = draw(st.integers(1, k_max))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    z = rng.standard_normal((B, 8))
    c = rng.standard_normal((K, 8))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    return z @ c.T


@settings(max_examples=N_EX)
@given(S=scores(), eps=st.floats(0.02, 2.0), n_iter=st.integers(1, 6),
       layout=st.sampled_from(["C", "F", "view", "neg"]))
def test_codes_match_swav_loop(S, eps, n_iter, layout):
    """codes(S, eps, n_iter) against clients.swav (SwAV's loop in torch float64; exp(1/eps)
    stays finite here): equal to 1e-12; rows sum to 1; any layout gives the same codes."""
    torch = pytest.importorskip("torch")
    import clients

    q = sinkhorn_ot.codes(_layouts(S, layout), eps=eps, n_iter=n_iter)
    ref = clients.swav(torch.from_numpy(S.copy()), eps, n_iter).numpy()
    assert q.dtype == np.float64 and q.shape == S.shape
    np.testing.assert_allclose(q, ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(q, sinkhorn_ot.codes(S, eps=eps, n_iter=n_iter))


@settings(max_examples=N_EX)
@given(S=scores(), log_eps=st.floats(-3.0, 0.5),
       dtype=st.sampled_from([np.float64, np.float32, np.float16]), tol=st.booleans())
def test_codes_keep_dtype_and_stay_finite(S, log_eps, dtype, tol):
    """The dtype of the scores comes back, codes are finite and in [0, 1] at any eps
    (1e-3: exp(S / eps) overflows every float), rows sum to 1 to the dtype's rounding; with
    ``tol`` the columns sum to B / K within it.  Reference: the definition."""
    B, K = S.shape
    eps = 10.0 ** log_eps
    X = S.astype(dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = sinkhorn_ot.codes(X, eps=eps, tol=1e-6 if tol else None, max_iter=5000)
    assert q.dtype == dtype and q.shape == (B, K)
    q64 = q.astype(np.float64)
    assert np.isfinite(q64).all() and q64.min() >= 0 and q64.max() <= 1 + 1e-3
    rtol = {np.float64: 1e-12, np.float32: 1e-5, np.float16: 5e-3}[dtype]
    np.testing.assert_allclose(q64.sum(axis=1), 1.0, rtol=0, atol=rtol * K)
    converged = not any("did not converge" in str(w.message) for w in caught)
    if tol and dtype == np.float64 and converged:
        # tol bounds the L1 column violation of the plan (mass 1): B times it for the codes
        assert np.abs(q64.sum(axis=0) - B / K).sum() <= 1e-6 * B * (1 + 1e-6)


@settings(max_examples=N_EX)
@given(S=scores(200, 40), zero=st.floats(0.0, 0.6), eps=st.floats(0.1, 2.0),
       seed=st.integers(0, 2**32 - 1))
def test_codes_of_probabilities_with_zeros(S, zero, eps, seed):
    """probabilities=True: codes of P equal the codes of log P, are exactly zero where P
    is, ignore a scale of P and, solved to a tolerance, a per-row scale.  Zeros at random
    off a staircase that keeps the problem feasible."""
    B, K = S.shape
    rng = np.random.default_rng(seed)
    P = np.exp(S / 0.3)
    # zeros anywhere but on the northwest-corner staircase of (1/B, 1/K): row i's share
    # [i/B, (i+1)/B) of the mass overlaps column j's [j/K, (j+1)/K), so a plan exists
    i, j = np.arange(B)[:, None], np.arange(K)[None, :]
    stair = (i * K < (j + 1) * B) & (j * B < (i + 1) * K)
    P[(rng.random((B, K)) < zero) & ~stair] = 0.0
    w = _quiet()
    try:
        q = sinkhorn_ot.codes(P, eps=eps, probabilities=True)
        with np.errstate(divide="ignore"):
            ql = sinkhorn_ot.codes(np.log(P), eps=eps)
        qs = sinkhorn_ot.codes(7.0 * P, eps=eps, probabilities=True)
        row_scale = np.linspace(0.5, 3.0, B)[:, None]
        qt = sinkhorn_ot.codes(P, eps=eps, probabilities=True, tol=1e-10, max_iter=20000)
        qr = sinkhorn_ot.codes(P * row_scale, eps=eps, probabilities=True, tol=1e-10,
                               max_iter=20000)
    finally:
        w.__exit__(None, None, None)
    np.testing.assert_array_equal(q[P == 0], 0.0)
    np.testing.assert_allclose(q, ql, rtol=0, atol=1e-13)
    np.testing.assert_allclose(qs, q, rtol=0, atol=1e-12)  # a total scale: absorbed
    # a per-row scale: absorbed by the solution (to its tolerance), not by n_iter passes
    np.testing.assert_allclose(qr, qt, rtol=0, atol=1e-8 * B)
    np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=0, atol=1e-12)


@settings(max_examples=N_EX)
@given(data=st.data(), S=scores(200, 30), n_iter=st.integers(1, 4), tol=st.booleans())
def test_codes_rows_are_the_rows_of_the_full_codes(data, S, n_iter, tol):
    """rows= (index arrays with negatives and repeats, slices of any step, boolean masks)
    returns exactly those rows of the full codes (the solve runs over every row)."""
    B, _ = S.shape
    kind = data.draw(st.sampled_from(["index", "slice", "mask"]))
    if kind == "index":
        rows = np.array(data.draw(st.lists(st.integers(-B, B - 1), max_size=2 * B)),
                        dtype=np.int64)
        pick = np.where(rows < 0, rows + B, rows)
    elif kind == "slice":
        lo = data.draw(st.one_of(st.none(), st.integers(-B, B)))
        hi = data.draw(st.one_of(st.none(), st.integers(-B, B)))
        step = data.draw(st.sampled_from([None, 1, 2, 3, -1, -2]))
        rows = slice(lo, hi, step)
        pick = np.arange(B)[rows]
    else:
        rows = np.array(data.draw(st.lists(st.booleans(), min_size=B, max_size=B)))
        pick = np.nonzero(rows)[0]
    kw = dict(eps=0.1, n_iter=n_iter, tol=1e-8 if tol else None)
    full = sinkhorn_ot.codes(S, **kw)
    part = sinkhorn_ot.codes(S, rows=rows, **kw)
    assert part.shape == (pick.size, S.shape[1])
    np.testing.assert_array_equal(part, full[pick])
