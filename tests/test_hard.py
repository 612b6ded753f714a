"""Exactly balanced hard labels (hard="exact" / "greedy") and rounding to the polytope."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

import sinkhorn_ot
from sinkhorn_ot._hard import greedy_labels


def _logp(N, K, scale=3.0, seed=0):
    rng = np.random.default_rng(seed)
    logits = scale * rng.standard_normal((N, K))
    return logits - np.log(np.exp(logits).sum(1, keepdims=True))


def _cost(logP, labels):
    return -logP[np.arange(logP.shape[0]), labels].sum()


def test_target_sizes():
    np.testing.assert_array_equal(sinkhorn_ot.target_sizes(10, np.ones(4)), [3, 3, 2, 2])
    np.testing.assert_array_equal(sinkhorn_ot.target_sizes(10, [0.5, 0.26, 0.24]), [5, 3, 2])
    s = sinkhorn_ot.target_sizes(1001, [0.0, 0.3, 0.7])
    assert s.sum() == 1001 and s[0] == 0


def test_diffuse_argmax_is_unbalanced_hard_modes_are_not():
    # Near-uniform logP with N = K: the argmax gives clusters of size 0 to several.
    N = K = 300
    logP = _logp(N, K, scale=0.05)
    soft = sinkhorn_ot.balanced_assign(logP, 25.0, n_iter=3)
    assert soft.sizes.max() >= 3 and soft.sizes.min() == 0
    for hard in ("exact", "greedy"):
        r = sinkhorn_ot.balanced_assign(logP, 25.0, n_iter=3, hard=hard)
        np.testing.assert_array_equal(r.sizes, np.ones(K))
    exact = sinkhorn_ot.balanced_assign(logP, 25.0, n_iter=3, hard="exact")
    rows, cols = linear_sum_assignment(-logP)
    np.testing.assert_allclose(_cost(logP, exact.labels), -logP[rows, cols].sum(), rtol=1e-12)


@pytest.mark.parametrize("N, K, scale", [(1000, 10, 0.3), (2000, 50, 3.0), (3000, 30, 1.0),
                                         (600, 7, 3.0)])
def test_exact_and_greedy_sizes_and_gap(N, K, scale):
    logP = _logp(N, K, scale)
    target = sinkhorn_ot.target_sizes(N, np.ones(K))
    ex = sinkhorn_ot.balanced_assign(logP, 25.0, hard="exact", max_iter=3000)
    gr = sinkhorn_ot.balanced_assign(logP, 25.0, hard="greedy", max_iter=3000)
    np.testing.assert_array_equal(ex.sizes, target)
    np.testing.assert_array_equal(gr.sizes, target)
    assert np.ptp(gr.sizes) <= 1
    ce, cg = _cost(logP, ex.labels), _cost(logP, gr.labels)
    assert ce <= cg + 1e-9 * abs(ce)          # exact is optimal
    assert (cg - ce) / abs(ce) < 0.02         # greedy stays close (measured 0.03% to 1.3%)


def test_forbidden_pairs_respected():
    logP = _logp(200, 8, 1.0, seed=4)
    rng = np.random.default_rng(5)
    logP[rng.random(logP.shape) < 0.3] = -np.inf
    logP[np.arange(200), rng.integers(0, 8, 200)] = -1.0  # every row keeps an allowed pair
    for hard in ("exact", "greedy"):
        r = sinkhorn_ot.balanced_assign(logP, 10.0, hard=hard)
        assert np.isfinite(logP[np.arange(200), r.labels]).all()
        np.testing.assert_array_equal(r.sizes, np.full(8, 25))


@settings(max_examples=25, deadline=None)
@given(N=st.integers(1, 120), K=st.integers(1, 12), scale=st.floats(0.0, 5.0),
       n_iter=st.integers(1, 30), seed=st.integers(0, 10_000))
def test_greedy_never_violates_a_size(N, K, scale, n_iter, seed):
    logP = _logp(N, K, scale, seed)
    rng = np.random.default_rng(seed)
    b = rng.random(K) + 0.01
    b /= b.sum()
    r = sinkhorn_ot.balanced_assign(logP, 25.0, b=b, n_iter=n_iter, hard="greedy")
    np.testing.assert_array_equal(r.sizes, sinkhorn_ot.target_sizes(N, b))


def test_greedy_float32_and_inputs_untouched():
    logP = _logp(500, 20).astype(np.float32)
    before = logP.copy()
    r = sinkhorn_ot.balanced_assign(logP, 25.0, hard="greedy")
    np.testing.assert_array_equal(logP, before)
    np.testing.assert_array_equal(r.sizes, np.full(20, 25))


def test_hard_errors():
    logP = _logp(50, 5)
    with pytest.raises(ValueError, match="hard must be"):
        sinkhorn_ot.balanced_assign(logP, hard="round")
    big = np.lib.stride_tricks.as_strided(np.zeros(1), shape=(400_000, 10), strides=(0, 0))
    with pytest.raises(ValueError, match="EMD_MAX_ENTRIES"):  # before any Sinkhorn work
        sinkhorn_ot.balanced_assign(big, hard="exact")


def test_greedy_unplaceable_sample_raises():
    logP = np.array([[0.0, -np.inf], [0.0, -np.inf], [-1.0, -1.0]])
    with pytest.raises(ValueError, match="forbidden"):
        greedy_labels(np, logP, 1.0, np.zeros(3), np.zeros(2), np.array([0, 0, 0]),
                      np.array([1, 2]))


# ---- rounding to the polytope ------------------------------------------------------------

@pytest.mark.parametrize("n_iter", [1, 3, 20])
def test_round_to_marginals(n_iter):
    rng = np.random.default_rng(0)
    n, m = 40, 25
    C = rng.random((n, m))
    a = rng.random(n) + 0.1
    a /= a.sum()
    b = rng.random(m) + 0.1
    b /= b.sum()
    res = sinkhorn_ot.sinkhorn(C, a, b, reg=0.05, n_iter=n_iter)
    Q = res.plan()
    Q0 = Q.copy()
    F = sinkhorn_ot.round_to_marginals(Q, a, b)
    np.testing.assert_array_equal(Q, Q0)  # not modified
    assert F.dtype == np.float64 and F.min() >= 0
    np.testing.assert_allclose(F.sum(1), a, rtol=0, atol=1e-12)
    np.testing.assert_allclose(F.sum(0), b, rtol=0, atol=1e-12)
    viol = np.abs(Q.sum(1) - a).sum() + np.abs(Q.sum(0) - b).sum()
    assert np.abs(F - Q).sum() <= 2 * viol + 1e-12  # Altschuler et al., Lemma 7
    if n_iter == 20:
        np.testing.assert_allclose(F, Q, rtol=0, atol=1e-4)


def test_round_to_marginals_float32_and_feasible_input():
    Q = np.full((3, 4), 1 / 12, dtype=np.float32)
    F = sinkhorn_ot.round_to_marginals(Q)
    np.testing.assert_allclose(F, 1 / 12, rtol=1e-7)
    np.testing.assert_allclose(F.sum(0), 0.25, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="nonnegative"):
        sinkhorn_ot.round_to_marginals(-Q)
    with pytest.raises(ValueError, match="equal totals"):
        sinkhorn_ot.round_to_marginals(Q, b=np.full(4, 0.3))
