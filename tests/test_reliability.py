"""Regression tests of issue 16's defects, one named input class each (the fuzzers of
tests/test_fuzz.py search the classes at large)."""
import math
import warnings

import numpy as np
import pytest

import sinkhorn_ot
from reference import plan_from_potentials

PLAIN = dict(acceleration=None, eps_scaling=False)


def _err(S, f, g, a, b):
    P = plan_from_potentials(S, f, g)
    return float(np.abs(P.sum(1) - a).sum() + np.abs(P.sum(0) - b).sum())


def test_a_column_of_tiny_mass_does_not_send_the_potentials_away():
    # b = [0, 5.7e-10, 1] at lam 5673: Anderson used to push g to +-4e12 and report 1e-9
    # where the plan of the returned potentials was off by 4e-5.
    logP = np.array([[-5.2983, -0.3002, 2.5831], [1.4387, -0.8509, 0.9764],
                     [5.2702, -3.388, 0.7859]])
    b = np.array([0.0, 5.6978e-10, 1.0])
    b /= b.sum()
    for dtype in (np.float64, np.float32):
        X = logP.astype(dtype)
        res = sinkhorn_ot.balanced_assign(X, 5672.7, b=b)
        assert res.converged
        S = 5672.7 * X.astype(np.float64)
        assert np.abs(res.g[1:]).max() < 1e6
        ref = _err(S, res.f, res.g, np.full(3, 1 / 3), b)
        assert abs(res.err - ref) <= max(0.05 * ref, 1e-6)


def test_max_iter_is_a_budget_for_every_stage():
    logP = np.log(np.random.default_rng(0).dirichlet(np.ones(8) * 0.05, size=400) + 1e-300)
    for max_iter in (50, 120):
        with pytest.warns(UserWarning, match=r"did not converge in (\d+) iterations") as rec:
            res = sinkhorn_ot.balanced_assign(logP, 1e4, tol=1e-300, max_iter=max_iter)
        assert res.n_iter == max_iter
        assert f"in {max_iter} iterations" in str(rec[0].message)


def test_torch_marginals_that_require_grad_and_no_aliasing():
    torch = pytest.importorskip("torch")
    X = torch.randn(6, 3, dtype=torch.float64)
    a = torch.full((6,), 1 / 6, dtype=torch.float64, requires_grad=True)
    b = torch.full((3,), 1 / 3, dtype=torch.float64, requires_grad=True)
    r = sinkhorn_ot.sinkhorn(X, a, b, reg=1.0)
    ref = sinkhorn_ot.sinkhorn(X.numpy(), a.detach().numpy(), b.detach().numpy(), reg=1.0)
    np.testing.assert_array_equal(r.g.numpy(), ref.g)
    assert sinkhorn_ot.balanced_assign(X, 5.0, b=b, init=r.g.requires_grad_()).converged
    assert sinkhorn_ot.emd(X, a, b).cost == sinkhorn_ot.emd(X.numpy(), a.detach().numpy(),
                                                            b.detach().numpy()).cost
    res = sinkhorn_ot.balanced_assign(X, 5.0)
    P0 = res.plan().clone()
    with torch.no_grad():
        res.g[0] += 5.0
        res.f[1] -= 3.0
    torch.testing.assert_close(res.plan(), P0, rtol=0, atol=0)


def _with_forbidden(rng, n, K):
    X = rng.standard_normal((n, K))
    X[np.arange(n), np.arange(n) % K] = -np.inf
    return X


@pytest.mark.parametrize("kw", [dict(), dict(n_iter=3), dict(**PLAIN)])
def test_ties_do_not_empty_clusters(kw):
    # constant logP: every row a tie; duplicated rows: one argmax per group
    rng = np.random.default_rng(1)
    for logP, b in [(np.zeros((12, 3)), None),
                    (np.zeros((12, 3)), np.array([0.25, 0.25, 0.5])),
                    (np.repeat(rng.standard_normal((3, 4)), 5, axis=0), None),
                    (np.repeat(_with_forbidden(rng, 4, 7), 6, axis=0)[rng.permutation(24)]
                     .astype(np.float32), None)]:  # K = 7: equal rows at every alignment
        res = sinkhorn_ot.balanced_assign(logP, 25.0, b=b, **kw)
        mass = res.plan().sum(0) * logP.shape[0]
        if res.err < 1e-3:  # labels follow the (converged) plan: no empty cluster
            np.testing.assert_allclose(res.sizes, mass, atol=1.0)
        assert res.sizes.sum() == logP.shape[0]
    # untied problems keep the plain argmax
    logP = np.log(rng.dirichlet(np.ones(5), size=50))
    res = sinkhorn_ot.balanced_assign(logP, 25.0)
    np.testing.assert_array_equal(res.labels,
                                  np.argmax(25.0 * logP + res.g[None, :], axis=1))


def test_massless_and_relaxed_rows_may_forbid_every_pair():
    C = np.array([[0.0, 1.0, 2.0], [np.inf] * 3, [1.0, 0.0, 3.0]])
    a, b = np.array([0.5, 0.0, 0.5]), np.array([0.3, 0.3, 0.4])
    res = sinkhorn_ot.sinkhorn(C, a, b, reg=0.1)
    assert res.converged and res.f[1] == -np.inf
    P = res.plan()
    np.testing.assert_allclose(P.sum(1), a, atol=1e-6)
    np.testing.assert_allclose(res.cost, sinkhorn_ot.sinkhorn(C[[0, 2]], a[[0, 2]], b,
                                                              reg=0.1).cost, rtol=1e-9)
    lp = sinkhorn_ot.emd(C, a, b)
    assert lp.plan().toarray()[1].sum() == 0
    np.testing.assert_allclose(lp.cost, sinkhorn_ot.emd(C[[0, 2]], a[[0, 2]], b).cost,
                               rtol=1e-14)
    # a KL-relaxed side needs no pair at all; an exact one still does
    u = sinkhorn_ot.sinkhorn_unbalanced(C, b, b, reg=0.1, reg_m=(1.0, math.inf))
    assert u.converged and u.row_sums[1] == 0 and np.isfinite(u.err)
    u = sinkhorn_ot.sinkhorn_unbalanced(C.T, b, b, reg=0.1, reg_m=(math.inf, 1.0))
    assert u.converged and u.col_sums[1] == 0
    with pytest.raises(ValueError, match="row 1"):
        sinkhorn_ot.sinkhorn_unbalanced(C, b, b, reg=0.1, reg_m=(math.inf, 1.0))
    with pytest.raises(ValueError, match="row 1"):
        sinkhorn_ot.sinkhorn(C, reg=0.1)
    with pytest.raises(ValueError, match="row 1"):
        sinkhorn_ot.emd(C)


def test_infeasible_support_raises_naming_the_rows():
    # every row and column keeps a pair, but rows 0..2 (mass 1/2) reach only cluster 0 (1/3)
    logP = np.zeros((6, 3))
    logP[:3, 1:] = -np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(ValueError, match=r"rows 0, 1, 2 of logP"):
            sinkhorn_ot.balanced_assign(logP, 25.0)
        with pytest.raises(ValueError, match="infeasible"):
            sinkhorn_ot.emd(-logP)
    # feasible with the right prior: solved
    res = sinkhorn_ot.balanced_assign(logP, 25.0, b=[0.5, 0.25, 0.25])
    assert res.converged


@pytest.mark.parametrize("reg", [3e-4, 1e-4])
def test_anderson_never_much_slower_than_plain_on_ott_like_data(reg):
    # OTT-JAX's test geometry: 17 x 29 points in 4-d, squared Euclidean, random weights
    rng = np.random.default_rng(0)
    x, y = rng.random((17, 4)), rng.random((29, 4))
    C = ((x[:, None] - y[None]) ** 2).sum(-1)
    a, b = rng.random(17) + 0.1, rng.random(29) + 0.1
    a, b = a / a.sum(), b / b.sum()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        plain = sinkhorn_ot.sinkhorn(C, a, b, reg=reg, max_iter=20_000, **PLAIN)
        fast = sinkhorn_ot.sinkhorn(C, a, b, reg=reg, max_iter=20_000)
    assert plain.converged and fast.converged
    assert fast.n_iter <= 1.1 * plain.n_iter


def test_translation_invariant_relaxed_solves_near_the_balanced_limit():
    """KL-relaxed solves near the balanced limit: reg_m / reg = 1000 used to take ~10^4
    plain passes.  Reference: POT's ot.unbalanced.sinkhorn_unbalanced (log domain, run to
    1e-13), same plan."""
    ot = pytest.importorskip("ot")
    rng = np.random.default_rng(0)
    x, y = rng.random((60, 2)), rng.random((40, 2))
    C = ((x[:, None] - y[None]) ** 2).sum(-1)
    a = rng.random(60) + 0.1
    a /= a.sum()
    b = 1.5 * (rng.random(40) + 0.1) / 40
    for reg_m in (100.0, (math.inf, 10.0)):
        res = sinkhorn_ot.sinkhorn_unbalanced(C, a, b, reg=0.1, reg_m=reg_m, tol=1e-10)
        assert res.converged and res.n_iter <= 300, res.n_iter
        if isinstance(reg_m, tuple):
            continue
        P = ot.sinkhorn_unbalanced(a, b, C, 0.1, reg_m, method="sinkhorn_translation_invariant",
                                   numItermax=200_000, stopThr=1e-15)
        np.testing.assert_allclose(res.plan(), P, atol=1e-9)
