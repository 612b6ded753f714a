"""Unbalanced OT and relaxed cluster sizes: against POT's ot.sinkhorn_unbalanced (float64,
reg_type="kl", the KL(Q | a b^T) reference) and against balanced Sinkhorn."""
import math

import numpy as np
import pytest

import sinkhorn_ot

ot = pytest.importorskip("ot")

INF = math.inf


def _problem(n=9, m=6, seed=0, mass_b=1.7):
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal((n, 2)), rng.standard_normal((m, 2))
    C = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    C /= C.max()
    a = rng.random(n) + 0.1
    a /= a.sum()
    b = rng.random(m) + 0.1
    b *= mass_b / b.sum()
    return C, a, b


def _gkl(p, q):
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(p > 0, p * np.log(p / q), 0.0)
    return t.sum() - p.sum() + q.sum()


def _objective(P, C, a, b, reg, reg_m):
    ra, rb = reg_m if isinstance(reg_m, tuple) else (reg_m, reg_m)
    obj = np.sum(P * C) + reg * _gkl(P, a[:, None] * b[None, :])
    if math.isfinite(ra):
        obj += ra * _gkl(P.sum(1), a)
    if math.isfinite(rb):
        obj += rb * _gkl(P.sum(0), b)
    return obj


@pytest.mark.parametrize("reg_m", [1.0, 0.05, 10.0, (INF, 0.5), (0.3, INF), (0.2, 2.0)])
@pytest.mark.parametrize("method", ["sinkhorn", "sinkhorn_stabilized"])
def test_matches_pot(reg_m, method):
    C, a, b = _problem()
    reg = 0.1
    C0, a0, b0 = C.copy(), a.copy(), b.copy()
    res = sinkhorn_ot.sinkhorn_unbalanced(C, a, b, reg=reg, reg_m=reg_m, tol=1e-13,
                                          max_iter=100_000)
    P, log = ot.sinkhorn_unbalanced(a, b, C, reg, list(reg_m) if isinstance(reg_m, tuple)
                                    else reg_m, method=method, stopThr=1e-15,
                                    numItermax=100_000, log=True)
    assert res.converged
    Q = res.plan()
    np.testing.assert_allclose(Q, P, rtol=1e-9, atol=1e-13)
    if method == "sinkhorn":  # POT's log u: f = log a + log u, g = log b + log v
        np.testing.assert_allclose(res.f, np.log(a) + log["logu"], rtol=0, atol=1e-9)
        np.testing.assert_allclose(res.g, np.log(b) + log["logv"], rtol=0, atol=1e-9)
    # The objective with the mass terms of the generalised KL (POT's total_cost drops them).
    np.testing.assert_allclose(res.objective, _objective(P, C, a, b, reg, reg_m),
                               rtol=1e-10)
    np.testing.assert_allclose(res.cost, np.sum(P * C), rtol=1e-10)
    np.testing.assert_allclose(res.row_sums, P.sum(1), rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(res.col_sums, P.sum(0), rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(res.dev_a, np.abs(P.sum(1) - a).sum(), rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(res.dev_b, np.abs(P.sum(0) - b).sum(), rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(res.mass, P.sum(), rtol=1e-10)
    assert res.err_a <= 1e-12 and res.err_b <= 1e-12
    # Inputs are never modified.
    np.testing.assert_array_equal(C, C0)
    np.testing.assert_array_equal(a, a0)
    np.testing.assert_array_equal(b, b0)


def test_semi_relaxed_exact_side():
    C, a, b = _problem(mass_b=2.5)
    res = sinkhorn_ot.sinkhorn_unbalanced(C, a, b, reg=0.05, reg_m=(INF, 0.5), tol=1e-12,
                                          max_iter=100_000)
    np.testing.assert_allclose(res.row_sums, a, rtol=1e-12, atol=0)
    assert res.dev_a <= 1e-12 and res.dev_b > 0.1  # b's surplus mass is not transported
    res = sinkhorn_ot.sinkhorn_unbalanced(C, a, b, reg=0.05, reg_m=(0.5, INF), tol=1e-12,
                                          max_iter=100_000)
    np.testing.assert_allclose(res.col_sums, b, rtol=1e-10, atol=0)


def test_large_reg_m_tends_to_balanced():
    C, a, b = _problem(mass_b=1.0)
    bal = sinkhorn_ot.sinkhorn(C, a, b, reg=0.1, tol=1e-13, max_iter=100_000)
    gaps = []
    # Iterations grow like reg_m / reg near the balanced limit (the total-mass mode
    # contracts at rate rho): 1e3 needs about 60,000 here.
    for reg_m in (1e1, 1e2, 1e3):
        res = sinkhorn_ot.sinkhorn_unbalanced(C, a, b, reg=0.1, reg_m=reg_m, tol=1e-9,
                                              max_iter=200_000)
        assert res.converged
        gaps.append(np.abs(res.plan() - bal.plan()).sum())
    # The plan approaches the balanced one like 1 / reg_m.
    np.testing.assert_allclose(np.array(gaps[:2]) / np.array(gaps[1:]), 10.0, rtol=0.1)
    assert gaps[2] < 5e-4
    res = sinkhorn_ot.sinkhorn_unbalanced(C, a, b, reg=0.1, reg_m=INF, tol=1e-13,
                                          max_iter=100_000)
    np.testing.assert_allclose(res.plan(), bal.plan(), rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(res.objective, bal.cost + 0.1 * _gkl(
        bal.plan(), a[:, None] * b[None, :]), rtol=1e-9)


def test_objective_is_minimal_among_perturbations():
    C, a, b = _problem()
    res = sinkhorn_ot.sinkhorn_unbalanced(C, a, b, reg=0.1, reg_m=0.7, tol=1e-13,
                                          max_iter=100_000)
    Q = res.plan()
    rng = np.random.default_rng(1)
    for _ in range(5):
        Qp = Q * np.exp(1e-3 * rng.standard_normal(Q.shape))
        assert _objective(Qp, C, a, b, 0.1, 0.7) > res.objective


def test_float32_and_zero_mass():
    C, a, b = _problem()
    b[2] = 0.0
    a[0] = 0.0
    r64 = sinkhorn_ot.sinkhorn_unbalanced(C, a, b, reg=0.1, reg_m=0.5, tol=1e-12)
    r32 = sinkhorn_ot.sinkhorn_unbalanced(C.astype(np.float32), a, b, reg=0.1, reg_m=0.5)
    assert r64.col_sums[2] == 0 and r64.row_sums[0] == 0
    # POT returns NaN with a zero in a: compare on the problem without the massless row and
    # column (they carry no plan).
    P = np.zeros_like(C)
    P[1:, [0, 1, 3, 4, 5]] = ot.sinkhorn_unbalanced(
        a[1:], b[[0, 1, 3, 4, 5]], C[1:][:, [0, 1, 3, 4, 5]], 0.1, 0.5, stopThr=1e-15,
        numItermax=100_000)
    np.testing.assert_allclose(r64.plan(), P, rtol=1e-8, atol=1e-14)
    np.testing.assert_allclose(r32.plan(), P, rtol=0, atol=1e-5)
    assert math.isfinite(r64.objective) and math.isfinite(r32.objective)


@pytest.mark.parametrize("bad, exc", [(0.0, ValueError), (-1.0, ValueError),
                                      (math.nan, ValueError), ((1.0, 2.0, 3.0), ValueError),
                                      ("1", TypeError), ((1.0, -2.0), ValueError)])
def test_bad_reg_m(bad, exc):
    C, a, b = _problem()
    with pytest.raises(exc, match="reg_m"):
        sinkhorn_ot.sinkhorn_unbalanced(C, a, b, reg=0.1, reg_m=bad)


# ---- cluster-size priors and the relaxed mode of balanced_assign -------------------------

def _logp(N, K, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    logits = scale * rng.standard_normal((N, K))
    return logits - np.log(np.exp(logits).sum(1, keepdims=True))


def _gaussian_prior(K):
    x = np.arange(K)
    p = np.exp(-0.5 * ((x - K / 2) / (K / 4)) ** 2)
    return p / p.sum()


def _zipf_prior(K, s=1.0):
    p = 1.0 / np.arange(1, K + 1) ** s
    return p / p.sum()


@pytest.mark.parametrize("prior", [_gaussian_prior, _zipf_prior])
def test_priors_give_sizes_near_N_b(prior):
    N, K = 2000, 20
    b = prior(K)
    res = sinkhorn_ot.balanced_assign(_logp(N, K), 25.0, b=b)
    assert res.converged
    np.testing.assert_allclose(res.sizes, N * b, rtol=0.1, atol=5)
    for hard in ("greedy", "exact"):
        r = sinkhorn_ot.balanced_assign(_logp(N, K), 25.0, b=b, hard=hard)
        np.testing.assert_array_equal(r.sizes, sinkhorn_ot.target_sizes(N, b))


def _imbalanced(N=3000, props=(0.6, 0.25, 0.1, 0.05), seed=0, margin=2.5):
    rng = np.random.default_rng(seed)
    K = len(props)
    y = rng.choice(K, size=N, p=props)
    logits = rng.standard_normal((N, K))
    logits[np.arange(N), y] += margin
    return logits - np.log(np.exp(logits).sum(1, keepdims=True)), y


def test_relaxed_mode_recovers_imbalanced_sizes():
    logP, y = _imbalanced()
    N, K = logP.shape
    true = np.bincount(y, minlength=K)               # [1821, 734, 302, 143]
    bal = sinkhorn_ot.balanced_assign(logP, 25.0)
    np.testing.assert_allclose(bal.sizes, N / K, rtol=0.05)  # forced equal: wrong here
    l1 = {}
    for sp in (1.0, 0.1):
        rel = sinkhorn_ot.balanced_assign(logP, 25.0, size_penalty=sp)
        assert rel.converged
        assert np.all(np.diff(rel.sizes) < 0)        # the imbalance is kept, in order
        l1[sp] = np.abs(rel.sizes - true).sum()
        assert (rel.labels == y).mean() > (bal.labels == y).mean() + 0.15
    # Measured: L1 size error 2144 (balanced), 996 (penalty 1), 336 (penalty 0.1), the
    # rest being the classifier's own confusion (plain argmax: 276).
    assert l1[0.1] < l1[1.0] < 0.5 * np.abs(bal.sizes - true).sum()
    np.testing.assert_allclose(rel.sizes, true, rtol=0.7)


def test_relaxed_mode_is_semi_relaxed_unbalanced():
    logP, _ = _imbalanced(N=400)
    lam, sp = 25.0, 0.3
    rel = sinkhorn_ot.balanced_assign(logP, lam, size_penalty=sp, tol=1e-12, max_iter=10_000)
    ub = sinkhorn_ot.sinkhorn_unbalanced(-logP, reg=1 / lam, reg_m=(INF, sp), tol=1e-12,
                                         max_iter=10_000)
    np.testing.assert_allclose(rel.plan(), ub.plan(), rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(rel.plan().sum(1), 1 / 400, rtol=1e-12)


def test_size_penalty_errors():
    logP = _logp(50, 5)
    with pytest.raises(ValueError, match="size_penalty"):
        sinkhorn_ot.balanced_assign(logP, size_penalty=-1.0)
    with pytest.raises(ValueError, match="size_penalty"):
        sinkhorn_ot.balanced_assign(logP, size_penalty=1.0, hard="greedy")
