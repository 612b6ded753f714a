"""Exact LP (emd) against POT's network simplex, and Sinkhorn's cost as reg -> 0."""
import math

import numpy as np
import pytest

import sinkhorn_ot

ot = pytest.importorskip("ot")


def _problem(n, m, seed=0, total=1.0):
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal((n, 2)), rng.standard_normal((m, 2))
    C = np.sqrt(((x[:, None, :] - y[None, :, :]) ** 2).sum(-1))
    a = rng.random(n) + 0.05
    b = rng.random(m) + 0.05
    return C, total * a / a.sum(), total * b / b.sum()


@pytest.mark.parametrize("n, m, total", [(3, 2, 1.0), (30, 20, 1.0), (60, 45, 3.5),
                                         (40, 40, 1.0)])
def test_matches_pot_emd(n, m, total):
    C, a, b = _problem(n, m, total=total)
    C0, a0, b0 = C.copy(), a.copy(), b.copy()
    res = sinkhorn_ot.emd(C, a, b)
    P_ref = ot.emd(a, b, C)
    cost_ref = float(np.sum(P_ref * C))
    np.testing.assert_allclose(res.cost, cost_ref, rtol=1e-9)
    P = res.plan()
    assert P.shape == (n, m) and P.nnz <= n + m - 1  # a basic solution
    np.testing.assert_allclose(P.sum(axis=1), a, rtol=1e-9, atol=0)
    np.testing.assert_allclose(P.sum(axis=0), b, rtol=1e-9, atol=0)
    np.testing.assert_allclose((P.toarray() * C).sum(), res.cost, rtol=1e-12)
    assert P.min() >= 0
    # Duals: feasible and tight (strong duality).
    assert res.method == "simplex"
    assert (res.f[:, None] + res.g[None, :] - C).max() <= 1e-9
    np.testing.assert_allclose(res.f @ a + res.g @ b, res.cost, rtol=1e-9)
    for arr, ref in ((C, C0), (a, a0), (b, b0)):
        np.testing.assert_array_equal(arr, ref)


def test_assignment_path():
    C, _, _ = _problem(50, 50, seed=3)
    res = sinkhorn_ot.emd(C)
    assert res.method == "assignment"
    # duals on this path too: feasible and tight (strong duality)
    assert (res.f[:, None] + res.g[None, :] - C).max() <= 1e-12
    np.testing.assert_allclose(res.f.sum() / 50 + res.g.sum() / 50, res.cost, rtol=1e-12)
    np.testing.assert_allclose(res.cost, ot.emd2([], [], C), rtol=1e-9)
    P = res.plan().toarray()
    np.testing.assert_allclose(P.sum(0), 1 / 50, rtol=1e-14)
    np.testing.assert_allclose(P.sum(1), 1 / 50, rtol=1e-14)
    # Same answer through the LP (non-uniform marginals force it).
    lp = sinkhorn_ot.emd(C, np.full(50, 1 / 50), np.full(50, 1 / 50) * (1 + 1e-12))
    np.testing.assert_allclose(lp.cost, res.cost, rtol=1e-9)


def test_forbidden_pairs():
    C, a, b = _problem(20, 15, seed=1)
    C[C > np.quantile(C, 0.7)] = np.inf
    C[np.arange(20), np.argmin(C, axis=1)] = 0.5   # keep an allowed pair in every row
    C[np.argmin(C, axis=0), np.arange(15)] = 0.5   # and column
    res = sinkhorn_ot.emd(C, a, b)
    P = res.plan().toarray()
    assert P[np.isinf(C)].sum() == 0
    M = np.where(np.isinf(C), 1e6, C)  # POT does not take inf: a huge cost instead
    np.testing.assert_allclose(res.cost, np.sum(ot.emd(a, b, M) * M), rtol=1e-9)


def test_infeasible_and_too_large():
    C = np.array([[0.0, np.inf], [0.0, np.inf]])
    with pytest.raises(ValueError, match="column 1"):
        sinkhorn_ot.emd(C)
    # Every row and column has an allowed pair, yet the marginals cannot be met.
    C = np.array([[0.0, np.inf, np.inf], [0.0, np.inf, np.inf], [0.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match="infeasible"):
        sinkhorn_ot.emd(C, a=[1 / 3] * 3, b=[0.1, 0.45, 0.45])
    with pytest.raises(ValueError, match="infeasible"):
        sinkhorn_ot.emd(C)
    big = np.lib.stride_tricks.as_strided(np.zeros(1), shape=(3000, 1000), strides=(0, 0))
    with pytest.raises(ValueError, match="EMD_MAX_ENTRIES"):
        sinkhorn_ot.emd(big)
    with pytest.raises(ValueError, match="max_entries = 10"):
        sinkhorn_ot.emd(np.zeros((4, 3)), max_entries=10)
    with pytest.raises(ValueError, match="equal totals"):
        sinkhorn_ot.emd(np.zeros((2, 2)), a=[0.5, 0.5], b=[0.5, 0.6])
    with pytest.raises(ValueError, match="NaN"):
        sinkhorn_ot.emd(np.array([[0.0, np.nan], [1.0, 0.0]]))


def test_sinkhorn_cost_tends_to_lp_cost():
    C, a, b = _problem(25, 20, seed=2)
    C = C / C.max()
    lp = sinkhorn_ot.emd(C, a, b).cost
    gaps = []
    for reg in (0.1, 0.03, 0.01):
        res = sinkhorn_ot.sinkhorn(C, a, b, reg=reg, tol=1e-10, max_iter=200_000)
        assert res.converged
        gap = res.cost - lp
        # 0 <= <Q_reg, C> - OT <= reg * (KL(P* | a b^T) - KL(Q_reg | a b^T)) <= reg log(n m)
        assert -1e-9 <= gap <= reg * math.log(25 * 20)
        gaps.append(gap)
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 0.02 * lp
