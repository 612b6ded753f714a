"""Warm starts, fixed iteration counts (SwAV), concurrency from Python threads, memory over
repeated calls, and hypothesis property tests."""
import concurrent.futures as cf
import gc
import os
import warnings

import numpy as np
import pytest
from hypothesis import given, strategies as st

import sinkhorn_ot as so
from reference import plan_from_potentials, random_logP, swav_distributed_sinkhorn

T1 = dict(n_threads=1)


# ------------------------------------------------------------------- warm start
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_warm_start_needs_fewer_iterations(dtype):
    logP = random_logP(300, 10, seed=21)
    rng = np.random.default_rng(21)
    moved = logP + 0.01 * rng.standard_normal(logP.shape)  # next epoch's logits
    prev = so.balanced_assign(logP.astype(dtype), 25.0, **T1)
    cold = so.balanced_assign(moved.astype(dtype), 25.0, **T1)
    warm = so.balanced_assign(moved.astype(dtype), 25.0, init=prev, **T1)
    warm_g = so.balanced_assign(moved.astype(dtype), 25.0, init=prev.g, **T1)
    assert prev.converged and cold.converged and warm.converged
    assert warm.n_iter < 0.6 * cold.n_iter, (warm.n_iter, cold.n_iter)
    # a result and its g are the same warm start
    assert warm_g.n_iter == warm.n_iter
    np.testing.assert_array_equal(warm_g.g, warm.g)
    # same solution as the cold start, to the tolerance (each plan meets the marginals to
    # the default tol, 1e-6 in float64 and 1e-5 in float32, so their entries agree to that)
    atol = 1e-6 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(warm.plan().astype(np.float64),
                               cold.plan().astype(np.float64), rtol=0, atol=atol)


def test_warm_start_from_the_solution_stops_at_once():
    logP = random_logP(100, 7, seed=22)
    r = so.balanced_assign(logP, 25.0, tol=1e-10, max_iter=10_000, **T1)
    again = so.balanced_assign(logP, 25.0, tol=1e-9, init=r, **T1)
    assert again.n_iter == 1 and again.converged


def test_warm_start_for_sinkhorn():
    rng = np.random.default_rng(23)
    C = rng.uniform(0, 1, (80, 30))
    prev = so.sinkhorn(C, reg=0.02, **T1)
    C2 = C + 1e-3 * rng.uniform(0, 1, C.shape)
    cold = so.sinkhorn(C2, reg=0.02, **T1)
    warm = so.sinkhorn(C2, reg=0.02, init=prev, **T1)
    assert warm.converged and warm.n_iter < 0.6 * cold.n_iter


def test_warm_start_with_massless_cluster():
    logP = random_logP(20, 4, seed=1)
    b = [0.5, 0.0, 0.25, 0.25]
    prev = so.balanced_assign(logP, 5.0, b=b, **T1)
    again = so.balanced_assign(logP, 5.0, b=b, init=prev, **T1)
    assert again.converged and again.n_iter <= 2


# ------------------------------------------------------------- fixed iterations
@pytest.mark.parametrize("n_iter", [1, 2, 3, 7])
def test_n_iter_runs_exactly_n_passes(n_iter):
    logP = random_logP(50, 9, seed=24)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fixed budget never warns
        r = so.balanced_assign(logP, 25.0, n_iter=n_iter, tol=1e3, max_iter=1, **T1)
        s = so.sinkhorn(-logP, reg=0.04, n_iter=n_iter, tol=1e-15, **T1)
    assert r.n_iter == n_iter and s.n_iter == n_iter
    assert not s.converged  # tol 1e-15 is not reached in a few passes, and n_iter ignores it
    # n_iter passes equal n_iter - 1 passes plus one: the last iterate is returned
    r2 = so.balanced_assign(logP, 25.0, n_iter=n_iter + 1, **T1)
    assert r2.n_iter == n_iter + 1
    assert not np.array_equal(r2.g, r.g) or n_iter > 100


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("n_iter", [1, 3, 5])
@pytest.mark.parametrize("shape", [(64, 30), (17, 100), (1, 5), (40, 1)])
def test_n_iter_equals_swav_distributed_sinkhorn(shape, n_iter, dtype):
    B, K = shape
    rng = np.random.default_rng(25)
    x = rng.standard_normal((B, 8))
    c = rng.standard_normal((K, 8))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    scores = x @ c.T
    eps = 0.05
    Q_swav = swav_distributed_sinkhorn(scores, eps, n_iters=n_iter)  # rows sum to 1
    res = so.balanced_assign(scores.astype(dtype), 1 / eps, n_iter=n_iter)
    assert res.n_iter == n_iter
    Q = res.plan().astype(np.float64) * B
    if dtype == np.float64:
        np.testing.assert_allclose(Q, Q_swav, rtol=1e-9, atol=1e-14)
    else:
        np.testing.assert_allclose(Q, Q_swav, rtol=2e-4, atol=1e-6)
    np.testing.assert_array_equal(res.labels[Q_swav.max(1) - np.sort(Q_swav, 1)[:, -2] > 1e-3]
                                  if K > 1 else res.labels,
                                  np.argmax(Q_swav, 1)[Q_swav.max(1) - np.sort(Q_swav, 1)[:, -2]
                                                       > 1e-3] if K > 1 else 0)
    # err is the L1 violation of that plan: measured here from SwAV's own Q
    err = np.abs(Q_swav.sum(0) / B - 1 / K).sum() + np.abs(Q_swav.sum(1) / B - 1 / B).sum()
    np.testing.assert_allclose(res.err, err, rtol=1e-3 if dtype == np.float32 else 1e-8,
                               atol=1e-6 if dtype == np.float32 else 1e-14)


# -------------------------------------------------------------------- concurrency
def _problems():
    out = []
    for k in range(4):
        logP = random_logP(400 + 50 * k, 12 + k, seed=30 + k)
        out.append(logP.astype(np.float32 if k % 2 else np.float64))
    return out


def _solve(logP):
    r = so.balanced_assign(logP, 25.0, n_iter=60)
    s = so.sinkhorn(-logP, reg=0.1, n_iter=20)
    return r, s


def test_python_threads_give_serial_results():
    problems = _problems()
    serial = [_solve(p) for p in problems]
    with cf.ThreadPoolExecutor(max_workers=4) as ex:
        parallel = list(ex.map(_solve, problems + problems))
    for (r, s), (rp, sp) in zip(serial + serial, parallel):
        for x, y in ((r, rp), (s, sp)):
            np.testing.assert_array_equal(y.f, x.f)
            np.testing.assert_array_equal(y.g, x.g)
            assert y.err == x.err and y.cost == x.cost and y.n_iter == x.n_iter
        np.testing.assert_array_equal(rp.labels, r.labels)


def test_the_gil_is_released_during_a_solve():
    """Two threads each running a solve overlap in time (they would serialise under the GIL):
    checked by counting how often a pure-Python thread runs while a solve is in flight."""
    import threading
    import time

    logP = random_logP(8000, 64, seed=40).astype(np.float32)
    ticks = []
    done = threading.Event()

    def ticker():
        while not done.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    so.balanced_assign(logP, 25.0, n_iter=2, **T1)  # warm up
    t = threading.Thread(target=ticker)
    t.start()
    t0 = time.perf_counter()
    so.balanced_assign(logP, 25.0, n_iter=300, **T1)
    t1 = time.perf_counter()
    done.set()
    t.join()
    inside = [x for x in ticks if t0 < x < t1]
    if t1 - t0 < 0.05:
        pytest.skip("solve too fast to observe")
    assert len(inside) >= 5, (len(inside), t1 - t0)


# ------------------------------------------------------------------------ memory
def _rss_bytes():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_repeated_calls_do_not_grow_memory():
    logP = random_logP(64, 10, seed=41)
    logP32 = logP.astype(np.float32)
    C = -logP

    def once(i):
        r = so.balanced_assign(logP if i % 2 else logP32, 25.0, n_iter=3,
                               n_threads=None if i % 4 < 2 else 1)
        r.plan()
        s = so.sinkhorn(C, reg=0.1, n_iter=2, **T1)
        s.plan()
        try:
            so.balanced_assign(logP, -1.0)
        except ValueError:
            pass

    for i in range(100):
        once(i)
    gc.collect()
    before = _rss_bytes()
    for i in range(1000):
        once(i)
    gc.collect()
    grown = _rss_bytes() - before
    assert grown < 20 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 1000 calls"


# --------------------------------------------------------------------- hypothesis
@st.composite
def problems(draw, max_n=9, max_k=9):
    n = draw(st.integers(1, max_n))
    k = draw(st.integers(1, max_k))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    scale = draw(st.sampled_from([0.5, 2.0, 5.0]))
    logP = scale * rng.standard_normal((n, k))
    b = rng.uniform(0.2, 1.0, k)
    b /= b.sum()
    return logP, b, rng


@given(problems(), st.sampled_from([0.5, 2.0, 8.0]))
def test_property_marginals(prob, lam):
    logP, b, _ = prob
    N, K = logP.shape
    res = so.balanced_assign(logP, lam, b=b, tol=1e-10, max_iter=200_000, **T1)
    assert res.converged
    P = plan_from_potentials(lam * logP, res.f, res.g)
    np.testing.assert_allclose(res.plan(), P, rtol=1e-12, atol=1e-300)
    viol = np.abs(P.sum(1) - 1 / N).sum() + np.abs(P.sum(0) - b).sum()
    assert viol <= 1e-10 * 1.01
    np.testing.assert_allclose(res.err, viol, rtol=1e-3, atol=1e-14)
    np.testing.assert_allclose(res.cost, np.sum(P * -logP), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(res.sizes, np.bincount(res.labels, minlength=K))


@given(problems(), st.sampled_from([1.0, 5.0]))
def test_property_row_shift_invariance(prob, lam):
    logP, b, rng = prob
    shift = rng.uniform(-20, 20, logP.shape[0])
    r1 = so.balanced_assign(logP, lam, b=b, tol=1e-11, max_iter=200_000, **T1)
    r2 = so.balanced_assign(logP + shift[:, None], lam, b=b, tol=1e-11, max_iter=200_000,
                            **T1)
    np.testing.assert_allclose(r2.plan(), r1.plan(), rtol=1e-6, atol=1e-11)
    np.testing.assert_allclose(r2.cost, r1.cost - shift.mean(), rtol=1e-8, atol=1e-8)


@given(problems(), st.sampled_from([0.2, 1.0]))
def test_property_transposition(prob, reg):
    C, b, rng = prob
    C = np.abs(C)
    a = rng.uniform(0.2, 1.0, C.shape[0])
    a /= a.sum()
    r1 = so.sinkhorn(C, a, b, reg=reg, tol=1e-11, max_iter=200_000, **T1)
    r2 = so.sinkhorn(C.T, b, a, reg=reg, tol=1e-11, max_iter=200_000, **T1)
    np.testing.assert_allclose(r2.plan(), r1.plan().T, rtol=1e-6, atol=1e-11)
    np.testing.assert_allclose(r2.cost, r1.cost, rtol=1e-8, atol=1e-12)


@given(st.integers(2, 10), st.integers(0, 2**31 - 1))
def test_property_planted_permutation(n, seed):
    """A planted permutation with a clear margin is recovered exactly by the labels."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    logP = rng.uniform(-1, 0, (n, n))
    logP[np.arange(n), perm] += 3.0
    res = so.balanced_assign(logP, 25.0, **T1)
    np.testing.assert_array_equal(res.labels, perm)
    np.testing.assert_array_equal(res.sizes, np.ones(n, np.int64))
