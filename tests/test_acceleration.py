"""Accelerated paths (Anderson, epsilon scaling, warm starts) reach the plain solution."""
import math
import warnings

import numpy as np
import pytest

import sinkhorn_ot
from sinkhorn_ot._solver import Anderson, eps_stages

PLAIN = dict(acceleration=None, eps_scaling=False)


def log_softmax(z):
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def random_logp(N, K, seed=0, scale=3.0):
    return log_softmax(scale * np.random.default_rng(seed).standard_normal((N, K)))


def centred(v):
    return v - v.mean()


@pytest.mark.slow
@pytest.mark.parametrize("kw", [dict(acceleration="anderson", eps_scaling=False),
                                dict(acceleration=None, eps_scaling=True),
                                dict(acceleration="anderson", eps_scaling=True),
                                dict(acceleration="anderson", eps_scaling=4)])
@pytest.mark.parametrize("scale", [3.0, 30.0])  # random, and peaked (confident) outputs
def test_accelerated_paths_reach_the_plain_solution(kw, scale):
    logP = random_logp(600, 12, seed=1, scale=scale)
    ref = sinkhorn_ot.balanced_assign(logP, 25.0, tol=1e-10, max_iter=200_000, **PLAIN)
    res = sinkhorn_ot.balanced_assign(logP, 25.0, tol=1e-10, max_iter=200_000, **kw)
    assert ref.converged and res.converged
    # err <= 1e-10: potentials agree closely after the gauge (peaked problems are the least
    # well conditioned, hence 1e-5 rather than err / min(b))
    np.testing.assert_allclose(centred(res.g), centred(ref.g), atol=1e-5)
    np.testing.assert_allclose(res.f + res.g.mean(), ref.f + ref.g.mean(), atol=1e-5)
    np.testing.assert_array_equal(res.labels, ref.labels)
    np.testing.assert_allclose(res.cost, ref.cost, rtol=1e-8)


def test_acceleration_cuts_iterations_on_random_and_peaked():
    for scale, factor in [(3.0, 5), (30.0, 5)]:
        logP = random_logp(2000, 10, seed=2, scale=scale)
        plain = sinkhorn_ot.balanced_assign(logP, 25.0, tol=1e-6, max_iter=100_000, **PLAIN)
        fast = sinkhorn_ot.balanced_assign(logP, 25.0, tol=1e-6, max_iter=100_000)
        assert plain.converged and fast.converged
        assert fast.n_iter * factor <= plain.n_iter, (scale, fast.n_iter, plain.n_iter)


def test_guard_rejects_steps_that_lower_the_dual():
    xp = np
    acc = Anderson(xp, memory=3)
    g = np.zeros(4)
    # an accepted point, then a candidate whose dual is lower: the plain step from the
    # accepted point comes back and the history is cleared
    t1 = np.array([1.0, 0.0, -1.0, 0.0])
    out1 = acc.step(g, t1, dual=1.0, scale=1.0)
    np.testing.assert_array_equal(out1, t1)
    out2 = acc.step(out1, out1 + 0.5, dual=0.5, scale=1.0)
    np.testing.assert_array_equal(out2, t1)
    assert acc.rejections == 1 and acc.dg == [] and acc.prev is None


def test_guard_engages_on_a_hard_problem_and_still_converges():
    # Peaked outputs make unguarded extrapolation overshoot: count the rejections by running
    # the loop on the backend directly.
    from sinkhorn_ot._cpu import CPUBackend
    from sinkhorn_ot import _solver

    logP = random_logp(1500, 10, seed=3, scale=30.0)
    N, K = logP.shape
    loga, logb = np.full(N, -math.log(N)), np.full(K, -math.log(K))
    made = []
    real = _solver.Anderson

    class Spy(real):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    _solver.Anderson = Spy
    try:
        sol = _solver.sinkhorn_loop(CPUBackend(1), logP, 25.0, loga, logb, tol=1e-8,
                                    max_iter=50_000)
    finally:
        _solver.Anderson = real
    assert sol.converged
    assert made and made[0].rejections > 0


def test_eps_stages():
    assert eps_stages(True, 25.0, 20.0) == [25.0 / 16, 25.0 / 4]
    assert eps_stages(False, 25.0, 20.0) == []
    assert eps_stages(3, -40.0, 1.0) == [-10.0]  # stages with |alpha| max|X| < 4 dropped
    assert eps_stages(True, 1.0, 1.0) == []


@pytest.mark.slow
def test_warm_start_saves_iterations_on_a_drifting_problem():
    rng = np.random.default_rng(4)
    logits = 3 * rng.standard_normal((3000, 40))
    prev = sinkhorn_ot.balanced_assign(log_softmax(logits), 25.0, **PLAIN)
    logP = log_softmax(logits + 0.02 * rng.standard_normal(logits.shape))
    cold = sinkhorn_ot.balanced_assign(logP, 25.0, **PLAIN)
    warm = sinkhorn_ot.balanced_assign(logP, 25.0, init=prev, **PLAIN)
    warm_g = sinkhorn_ot.balanced_assign(logP, 25.0, init=prev.g, **PLAIN)
    assert warm.converged and cold.converged
    assert warm.n_iter < 0.9 * cold.n_iter
    assert warm_g.n_iter == warm.n_iter
    np.testing.assert_allclose(centred(warm.g), centred(cold.g), atol=1e-3)


def test_fixed_n_iter_ignores_acceleration():
    logP = random_logp(300, 7, seed=5)
    a = sinkhorn_ot.balanced_assign(logP, 25.0, n_iter=3)
    b = sinkhorn_ot.balanced_assign(logP, 25.0, n_iter=3, **PLAIN)
    assert a.n_iter == b.n_iter == 3
    np.testing.assert_array_equal(a.g, b.g)
    np.testing.assert_array_equal(a.f, b.f)


def test_bad_acceleration_name():
    with pytest.raises(ValueError, match="acceleration"):
        sinkhorn_ot.balanced_assign(random_logp(10, 3), 25.0, acceleration="momentum")


def test_float32_near_its_floor_does_not_stall():
    # OTT-JAX's momentum ran to its cap at tol 1e-6; ours must stop or warn, never hang
    logP = random_logp(5000, 50, seed=6).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        res = sinkhorn_ot.balanced_assign(logP, 25.0, tol=2e-6, max_iter=2000)
    plain = sinkhorn_ot.balanced_assign(logP, 25.0, tol=1e-5, **PLAIN)
    assert res.err <= 1e-5
    assert res.n_iter <= 2000 and np.isfinite(res.g).all()
    assert plain.converged
