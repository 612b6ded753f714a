"""Many problems in one call: a batch axis on C (B, n, m) and several targets b (m, k).

The batched kernel and the single solve run different loops (the single solve adds epsilon
scaling and float32 rows), so a batched problem matches its single solve to the tolerance
both reach, not bit for bit: plans within a few times ``tol`` in L1.  Shared and
broadcast marginals run the same arithmetic and agree exactly.
"""
from __future__ import annotations

import math
import platform
import shutil
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

import sinkhorn_ot as so
from sinkhorn_ot import _batched, _core

from clients import swav
from reference import plan_from_potentials, reference_solve


def _problems(B, n, m, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    C = rng.random((B, n, m)).astype(dtype)
    a = rng.random((B, n)) + 0.1
    b = rng.random((B, m)) + 0.1
    return C, a / a.sum(1, keepdims=True), b / b.sum(1, keepdims=True)


def _cloud_costs(B, n, m, seed=0):
    rng = np.random.default_rng(seed)
    x, y = rng.random((B, n, 2)), rng.random((B, m, 2))
    return ((x[:, :, None] - y[:, None]) ** 2).sum(-1)


@pytest.mark.parametrize("reg, acceleration", [(1.0, "anderson"), (0.1, "anderson"),
                                               (0.02, "anderson"), (1.0, None), (0.1, None)])
def test_batch_matches_single_solves(reg, acceleration):
    C, a, b = _problems(6, 12, 9)
    C[3] = _cloud_costs(1, 12, 9, seed=3)[0]
    tol = 1e-9
    r = so.sinkhorn(C, a, b, reg=reg, tol=tol, acceleration=acceleration)
    assert r.f.shape == (6, 12) and r.g.shape == (6, 9) and r.plan().shape == (6, 12, 9)
    assert r.n_iter.shape == r.err.shape == r.converged.shape == r.cost.shape == (6,)
    assert r.converged.all() and (r.err <= tol).all()
    P = r.plan()
    for p in range(6):
        s = so.sinkhorn(C[p], a[p], b[p], reg=reg, tol=tol, acceleration=acceleration)
        # both plans are within tol of the marginals: they agree to the same order
        assert np.abs(P[p] - s.plan()).sum() <= 10 * tol
        np.testing.assert_allclose(r.cost[p], s.cost, rtol=1e-7, atol=1e-12)
        # the reported err is that of the returned potentials' plan
        col = P[p].sum(0)
        np.testing.assert_allclose(np.abs(col - b[p]).sum(), r.err[p], atol=1e-13)
        np.testing.assert_allclose(P[p].sum(1), a[p], rtol=1e-12)
        # the same accelerations (epsilon scaling, Anderson mixing): about as many passes
        assert abs(int(r.n_iter[p]) - s.n_iter) <= max(0.25 * s.n_iter, 3)
        fr, gr, Pr, _, _ = reference_solve(-C[p] / reg, a[p], b[p])
        assert np.abs(P[p] - Pr).sum() <= 10 * tol


def test_float32_batch_against_reference():
    C = _cloud_costs(20, 16, 16).astype(np.float32)
    r = so.sinkhorn(C, reg=0.05, tol=1e-6)
    assert (r.err <= 1e-6).all() and r.f.dtype == np.float64
    P = r.plan()
    assert P.dtype == np.float32
    for p in (0, 7, 19):
        _, _, Pr, _, _ = reference_solve(-C[p].astype(np.float64) / 0.05)
        assert np.abs(P[p] - Pr).sum() <= 2e-5


def test_ragged_batch_equals_cropped_problems():
    rng = np.random.default_rng(1)
    sizes = [(5, 4), (9, 7), (2, 3), (9, 7)]
    n, m = 9, 7
    C = np.full((4, n, m), np.inf)
    a = np.zeros((4, n))
    b = np.zeros((4, m))
    crops = []
    for p, (ni, mi) in enumerate(sizes):
        Cp = rng.random((ni, mi))
        ap = rng.random(ni) + 0.1
        bp = rng.random(mi) + 0.1
        ap, bp = ap / ap.sum(), bp / bp.sum()
        C[p, :ni, :mi], a[p, :ni], b[p, :mi] = Cp, ap, bp
        crops.append((Cp, ap, bp))
    C[0, 5:, :] = 3.0  # padding rows of zero mass may hold any value
    r = so.sinkhorn(C, a, b, reg=0.1, tol=1e-10)
    assert r.converged.all()
    P = r.plan()
    for p, (Cp, ap, bp) in enumerate(crops):
        ni, mi = Cp.shape
        s = so.sinkhorn(Cp, ap, bp, reg=0.1, tol=1e-10)
        assert np.abs(P[p, :ni, :mi] - s.plan()).sum() <= 1e-9
        assert (P[p, ni:] == 0).all() and (P[p, :, mi:] == 0).all()
        assert np.isneginf(r.f[p, ni:]).all() and np.isneginf(r.g[p, mi:]).all()
        np.testing.assert_allclose(r.cost[p], s.cost, rtol=1e-9)


def test_forbidden_pairs_inside_problems():
    C, a, b = _problems(3, 8, 8, seed=2)
    C[1, 0, 1:] = np.inf  # row 0 of problem 1 may only go to column 0
    C[2][np.eye(8, dtype=bool)] = np.inf
    r = so.sinkhorn(C, a, b, reg=0.1, tol=1e-10)
    P = r.plan()
    assert (P[1, 0, 1:] == 0).all() and (P[2][np.eye(8, dtype=bool)] == 0).all()
    for p in range(3):
        _, _, Pr, _, _ = reference_solve(-C[p] / 0.1, a[p], b[p])
        assert np.abs(P[p] - Pr).sum() <= 1e-9


def test_shared_and_per_problem_marginals_agree_exactly():
    C, a, b = _problems(4, 10, 6, seed=4)
    r1 = so.sinkhorn(C, a[0], b[0], reg=0.1, tol=1e-9)
    r2 = so.sinkhorn(C, np.tile(a[0], (4, 1)), np.tile(b[0], (4, 1)), reg=0.1, tol=1e-9)
    np.testing.assert_array_equal(r1.f, r2.f)
    np.testing.assert_array_equal(r1.g, r2.g)
    np.testing.assert_array_equal(r1.n_iter, r2.n_iter)
    ru = so.sinkhorn(C, reg=0.1, tol=1e-9)
    rw = so.sinkhorn(C, np.full(10, 0.1), np.full(6, 1 / 6), reg=0.1, tol=1e-9)
    np.testing.assert_allclose(ru.f, rw.f, atol=1e-12)


def test_each_problem_stops_at_its_tolerance():
    C, _, _ = _problems(3, 16, 16, seed=5)
    C = C * np.array([0.01, 1.0, 4.0])[:, None, None]  # easy to hard
    r = so.sinkhorn(C, reg=0.05, tol=1e-8, acceleration=None, eps_scaling=False)
    assert (r.err <= 1e-8).all()
    assert r.n_iter[0] < r.n_iter[1] < r.n_iter[2]
    for p in range(3):  # plain passes from the same start: the single solve's count
        s = so.sinkhorn(C[p], reg=0.05, tol=1e-8, acceleration=None, eps_scaling=False)
        assert abs(int(r.n_iter[p]) - s.n_iter) <= 1


def test_fixed_n_iter_is_the_swav_alternation():
    rng = np.random.default_rng(6)
    S = rng.standard_normal((5, 32, 10))
    q = so.codes(S, eps=0.1, n_iter=3)
    assert q.shape == (5, 32, 10)
    for p in range(5):
        ref = swav(torch.tensor(S[p]), epsilon=0.1, sinkhorn_iterations=3).numpy()
        np.testing.assert_allclose(q[p], ref, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(q[p], so.codes(S[p], eps=0.1), rtol=1e-10, atol=1e-14)
    r = so.sinkhorn(S, reg=1.0, n_iter=3)
    np.testing.assert_array_equal(r.n_iter, 3)


def test_codes_batch_options():
    rng = np.random.default_rng(7)
    S = torch.tensor(rng.standard_normal((3, 40, 8)), dtype=torch.float32)
    q = so.codes(S, eps=0.05, rows=slice(-10, None))
    assert isinstance(q, torch.Tensor) and q.shape == (3, 10, 8) and q.dtype == torch.float32
    for p in range(3):
        one = so.codes(S[p], eps=0.05, rows=slice(-10, None)).numpy()
        np.testing.assert_allclose(q[p].numpy(), one, rtol=2e-5, atol=1e-7)
    qt = so.codes(S.double(), eps=0.05, tol=1e-9)
    for p in range(3):
        one = so.codes(S[p].double(), eps=0.05, tol=1e-9).numpy()
        np.testing.assert_allclose(qt[p].numpy(), one, atol=1e-7)
    P = np.exp(S.double().numpy())
    P[1, 2, 3] = -1.0
    with pytest.raises(ValueError, match=r"problem 1 of the batch: .*negative, NaN or infinite "
                                         r"probability at \(2, 3\)"):
        so.codes(P, eps=1.0, probabilities=True)


def test_bad_input_is_named_by_batch_index():
    C, a, b = _problems(5, 6, 4)
    bad = C.copy()
    bad[3, 2, 1] = np.nan
    with pytest.raises(ValueError, match=r"problem 3 of the batch: C has a NaN or -inf entry "
                                         r"at \(2, 1\)"):
        so.sinkhorn(bad, reg=0.1)
    bb = b.copy()
    bb[2, 1] = -0.5
    with pytest.raises(ValueError, match="problem 2 of the batch: b has a negative entry at 1"):
        so.sinkhorn(C, a, bb, reg=0.1)
    aa = a.copy()
    aa[1] *= 2
    with pytest.raises(ValueError, match="problem 1 of the batch: balanced marginals must have "
                                         "equal totals"):
        so.sinkhorn(C, aa, b, reg=0.1)
    Ce = C.copy()
    Ce[4, 3, :] = np.inf
    with pytest.raises(ValueError, match="problem 4 of the batch: infeasible problem: row 3"):
        so.sinkhorn(Ce, a, b, reg=0.1)
    Ce = C.copy()
    Ce[0, :, 2] = np.inf
    with pytest.raises(ValueError, match="problem 0 of the batch: infeasible problem: column 2"):
        so.sinkhorn(Ce, a, b, reg=0.1)
    with pytest.raises(ValueError, match=r"a must have shape \(6,\) or \(5, 6\)"):
        so.sinkhorn(C, a[:3], b, reg=0.1)
    L = np.log(np.full((3, 8, 4), 0.25))
    L[2, 5, :] = -np.inf
    with pytest.raises(ValueError, match="problem 2 of the batch: infeasible problem: row 5"):
        so.balanced_assign(L, lam=10.0)
    with pytest.raises(ValueError, match="problem 1 of the batch: C has a NaN"):
        so.sinkhorn_unbalanced(np.where(np.arange(2)[:, None, None] == 1, np.nan, C[:2]),
                               reg=0.1, reg_m=1.0)
    with pytest.raises(ValueError, match="cannot be split across processes"):
        so.sinkhorn(C, reg=0.1, comm=object())


def test_hall_infeasible_problem_is_named():
    C = np.zeros((3, 4, 4))
    C[1, :2, 1:] = np.inf  # rows 0 and 1 (mass 1/2) share column 0 (mass 1/4)
    with pytest.raises(ValueError, match="problem 1 of the batch: infeasible problem: rows 0, 1"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            so.sinkhorn(C, reg=0.5, max_iter=200)


def test_unconverged_problems_warn_once():
    C, _, _ = _problems(4, 16, 16, seed=8)
    with pytest.warns(UserWarning, match=r"did not converge for 4 of 4 problems") as rec:
        r = so.sinkhorn(C, reg=0.01, tol=1e-14, max_iter=3)
    assert len([w for w in rec if "converge" in str(w.message)]) == 1
    assert not r.converged.any() and (r.n_iter == 3).all()


def test_stalled_problems_fall_back_to_the_single_solve(monkeypatch):
    monkeypatch.setattr(_batched, "_STALL_WINDOW", 1)
    C = _cloud_costs(3, 20, 20, seed=9)
    r = so.sinkhorn(C, reg=0.01, tol=1e-9)
    assert r.converged.all() and (r.err <= 1e-9).all()
    for p in range(3):
        _, _, Pr, _, _ = reference_solve(-C[p] / 0.01)
        assert np.abs(r.plan()[p] - Pr).sum() <= 1e-8


def test_large_problems_loop_the_single_path(monkeypatch):
    C, a, b = _problems(3, 10, 8, seed=10)
    kernel = so.sinkhorn(C, a, b, reg=0.1, tol=1e-10)
    monkeypatch.setattr(_batched, "SMALL_ENTRIES", 0)
    loop = so.sinkhorn(C, a, b, reg=0.1, tol=1e-10)
    for p in range(3):
        s = so.sinkhorn(C[p], a[p], b[p], reg=0.1, tol=1e-10)
        np.testing.assert_array_equal(loop.f[p], s.f)
        assert loop.n_iter[p] == s.n_iter
    assert np.abs(kernel.plan() - loop.plan()).sum(axis=(1, 2)).max() <= 1e-9


def test_warm_start_batch():
    C, _, _ = _problems(4, 12, 12, seed=11)
    r = so.sinkhorn(C, reg=0.05, tol=1e-9)
    w = so.sinkhorn(C, reg=0.05, tol=1e-9, init=r)
    assert (w.n_iter <= 2).all() and w.converged.all()
    with pytest.raises(ValueError, match=r"init must be a result or a potential g of shape"):
        so.sinkhorn(C, reg=0.05, init=np.zeros((3, 12)))


def test_balanced_assign_batch():
    rng = np.random.default_rng(12)
    logits = 3 * rng.standard_normal((4, 200, 8))
    logP = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    r = so.balanced_assign(logP, lam=10.0)
    assert r.labels.shape == (4, 200) and r.sizes.shape == (4, 8)
    np.testing.assert_array_equal(r.sizes.sum(1), 200)
    for p in range(4):
        s = so.balanced_assign(logP[p], lam=10.0)
        assert (r.labels[p] == s.labels).mean() >= 0.98
        assert np.abs(r.plan()[p] - s.plan()).sum() <= 1e-4
        np.testing.assert_array_equal(r.labels[p], np.argmax(10.0 * logP[p] + r.g[p], axis=1))
    ex = so.balanced_assign(logP[:2, :20], lam=10.0, hard="exact")  # problem by problem
    for p in range(2):
        np.testing.assert_array_equal(ex.labels[p],
                                      so.balanced_assign(logP[p, :20], lam=10.0,
                                                         hard="exact").labels)


def test_unbalanced_batch_is_the_single_solves():
    C, a, b = _problems(3, 7, 5, seed=13)
    r = so.sinkhorn_unbalanced(C, a, b, reg=0.1, reg_m=(np.inf, 0.5))
    for p in range(3):
        s = so.sinkhorn_unbalanced(C[p], a[p], b[p], reg=0.1, reg_m=(np.inf, 0.5))
        np.testing.assert_array_equal(r.f[p], s.f)
        assert r.objective[p] == s.objective and r.n_iter[p] == s.n_iter
        np.testing.assert_array_equal(r.col_sums[p], s.col_sums)


def test_torch_batch_in_torch_out():
    C, _, _ = _problems(3, 6, 5)
    r = so.sinkhorn(torch.tensor(C), reg=0.1)
    assert isinstance(r.f, torch.Tensor) and r.f.shape == (3, 6)
    assert isinstance(r.plan(), torch.Tensor) and r.plan().shape == (3, 6, 5)
    assert "batch=3" in repr(r)


# ---------------------------------------------------------------------------------------
# several targets


def _targets(m, k, seed=0):
    rng = np.random.default_rng(seed)
    b = rng.random((m, k)) + 0.2
    return b / b.sum(0)


@pytest.mark.parametrize("large", [False, True])
def test_multi_target_matches_single_solves_and_pot(large, monkeypatch):
    ot = pytest.importorskip("ot")
    if large:  # the shared-read loop (multi_pass), as for a large C
        monkeypatch.setattr(_batched, "SMALL_ENTRIES", 0)
    rng = np.random.default_rng(14)
    M = rng.random((30, 20))
    a = np.full(30, 1 / 30)
    bk = _targets(20, 5)
    r = so.sinkhorn(M, a, bk, reg=0.1, tol=1e-11)
    assert r.f.shape == (5, 30) and r.g.shape == (5, 20) and r.cost.shape == (5,)
    assert r.converged.all() and (r.err <= 1e-11).all()
    P = r.plan()
    for t in range(5):
        s = so.sinkhorn(M, a, bk[:, t], reg=0.1, tol=1e-11)
        assert np.abs(P[t] - s.plan()).sum() <= 1e-10
        np.testing.assert_allclose(r.cost[t], s.cost, rtol=1e-9)
        np.testing.assert_allclose(np.abs(P[t].sum(0) - bk[:, t]).sum(), r.err[t], atol=1e-14)
    pot = ot.sinkhorn(a, bk, M, 0.1, stopThr=1e-13, numItermax=100_000)
    assert pot.shape == (5,)
    np.testing.assert_allclose(r.cost, pot, rtol=1e-9)


def test_multi_target_bad_target_is_named():
    M = np.random.default_rng(15).random((6, 4))
    bk = _targets(4, 3)
    bk[2, 1] = -0.1
    with pytest.raises(ValueError, match=r"target 1 \(b\[:, 1\]\): b has a negative entry at 2"):
        so.sinkhorn(M, None, bk, reg=0.1)
    bk = _targets(4, 3)
    bk[:, 2] *= 2
    with pytest.raises(ValueError, match=r"target 2 .*equal totals"):
        so.sinkhorn(M, None, bk, reg=0.1)
    with pytest.raises(ValueError, match=r"b must have shape \(4,\) or \(4, k\)"):
        so.sinkhorn(M, None, np.ones((5, 2)) / 5, reg=0.1)


def test_multi_target_with_massless_columns(monkeypatch):
    monkeypatch.setattr(_batched, "SMALL_ENTRIES", 0)
    M = np.random.default_rng(16).random((12, 6))
    bk = _targets(6, 3)
    bk[[1, 4], 2] = 0
    bk[:, 2] /= bk[:, 2].sum()
    r = so.sinkhorn(M, None, bk, reg=0.1, tol=1e-10)
    assert r.converged.all()
    assert np.isneginf(r.g[2, [1, 4]]).all() and (r.plan()[2][:, [1, 4]] == 0).all()
    s = so.sinkhorn(M, None, bk[:, 2], reg=0.1, tol=1e-10)
    assert np.abs(r.plan()[2] - s.plan()).sum() <= 1e-9


def test_multi_pass_underflowing_target_is_exact():
    rng = np.random.default_rng(17)
    X = rng.random((50, 40))
    G = rng.standard_normal((3, 40))
    G[1] -= 900.0  # far below the others: its factorised row sums underflow
    G[2, :20] -= 750.0  # half of its columns far below
    loga = np.full(50, -math.log(50))
    F, col, cost, under = _core.multi_pass(X, -5.0, G, loga, True, 1)
    for t in range(3):
        f = np.empty(50)
        c, _, qx, _ = _core.fused_pass(X, -5.0, G[t].copy(), loga, 1.0, f, None, 1)
        np.testing.assert_allclose(F[t], f, rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(col[t], c, rtol=1e-10, atol=1e-300)
        np.testing.assert_allclose(cost[t], qx, rtol=1e-10)
        Q = plan_from_potentials(-5.0 * X, F[t], G[t])
        np.testing.assert_allclose(col[t], Q.sum(0), rtol=1e-10, atol=1e-300)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64")
                    or shutil.which("g++") is None,
                    reason="the kernel emulation needs g++ on x86-64")
def test_cuda_batch_loops_the_single_solves():
    """CUDA arrays are solved problem by problem (on the kernel emulation of tests/cuda_emu):
    the results come back as CuPy arrays with the batch axis, each the single solve's."""
    import cuda_emu

    C = np.random.default_rng(18).random((3, 40, 30)).astype(np.float32)
    with cuda_emu.installed() as cp:
        r = so.sinkhorn(cp.asarray(C), reg=0.1, tol=1e-5)
        assert isinstance(r.f, cp.ndarray) and r.f.shape == (3, 40)
        assert r.plan().shape == (3, 40, 30) and r.converged.all()
        for p in range(3):
            s = so.sinkhorn(cp.asarray(C[p]), reg=0.1, tol=1e-5)
            np.testing.assert_array_equal(r.f[p].get(), s.f.get())
        q = so.codes(cp.asarray(C), eps=0.1)
        assert isinstance(q, cp.ndarray) and q.shape == (3, 40, 30)


def test_ctrl_c_stops_a_batched_solve():
    """The batched kernel polls for Ctrl-C between passes (in a subprocess, so that the
    signal cannot reach pytest)."""
    script = textwrap.dedent("""
        import os, signal, threading, time
        import numpy as np
        import sinkhorn_ot
        C = np.random.default_rng(0).random((64, 64, 64))
        threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        t0 = time.perf_counter()
        try:  # an unreachable tolerance: only the interrupt ends this solve
            sinkhorn_ot.sinkhorn(C, reg=0.01, tol=1e-300, max_iter=10**7,
                                 acceleration=None, eps_scaling=False)
        except KeyboardInterrupt:
            print("interrupted after %.2f s" % (time.perf_counter() - t0))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "interrupted after" in out.stdout, out.stdout
    assert float(out.stdout.split("after")[1].split()[0]) < 0.5 + 1.0, out.stdout


def _independent_err_and_cost(C, reg, a, b, f, g):
    """The L1 column and row violations and <Q, C> of the plan exp(-C/reg + f + g), in float64."""
    C = np.asarray(C, dtype=np.float64)
    P = plan_from_potentials(-C / reg, f, g)
    cost = float(np.sum(np.where(P > 0, P * np.where(np.isfinite(C), C, 0.0), 0.0)))
    return np.abs(P.sum(0) - b).sum(), np.abs(P.sum(1) - a).sum(), cost


@pytest.mark.parametrize("reg", [1.0, 0.05, 0.003])
def test_reported_err_and_cost_are_those_of_the_returned_potentials(reg):
    # Small problems run the scaling form of the pass while the potentials span <= 600 and the
    # log-domain pass beyond (at reg 0.003 problem 1's column 0, 2 / reg above the others):
    # in every regime, with forbidden pairs and massless rows and columns, the reported err
    # and cost must be the plan's of the returned float64 potentials.
    rng = np.random.default_rng(int(reg * 1e4))
    B, n, m = 8, 24, 17
    C = 3 * rng.random((B, n, m)) ** 2
    C[1, :, 0] += 2.0                     # a column far from every row: g_0 large
    C[2, 3, 4:] = np.inf                  # row 3 may only go to columns 0-3
    C[3][rng.random((n, m)) < 0.2] = np.inf
    a = rng.random((B, n)) + 0.05
    b = rng.random((B, m)) + 0.05
    a[4, 5:9] = 0
    b[4, 2] = 0
    a, b = a / a.sum(1, keepdims=True), b / b.sum(1, keepdims=True)
    C[3][np.arange(n), rng.integers(0, m, n)] = 0.5  # keeps every row of 3 feasible
    C[3][rng.integers(0, n, m), np.arange(m)] = 0.5
    for dtype in (np.float64, np.float32):
        Cd = C.astype(dtype)
        r = so.sinkhorn(Cd, a, b, reg=reg, tol=1e-9, max_iter=3000)
        for p in range(B):
            col_err, row_err, cost = _independent_err_and_cost(Cd[p], reg, a[p], b[p],
                                                               r.f[p], r.g[p])
            np.testing.assert_allclose(r.err[p], col_err, rtol=1e-9, atol=1e-13)
            assert row_err <= 1e-12
            np.testing.assert_allclose(r.cost[p], cost, rtol=1e-9, atol=1e-12)
        assert r.converged.all()
        assert np.ptp(r.g[1]) > 600 or reg > 0.01
        for p in (1, 3, 4) if dtype == np.float64 else ():
            S = -Cd[p] / reg
            _, _, Pr, _, _ = reference_solve(S, a[p], b[p], tol=1e-10)
            assert np.abs(plan_from_potentials(S, r.f[p], r.g[p]) - Pr).sum() <= 1e-7


def test_problems_beyond_the_scaling_form_size():
    # 400 x 400 entries exceed the cached scaling form (2^17 entries): log-domain passes
    C = _cloud_costs(2, 400, 400, seed=12)
    r = so.sinkhorn(C, reg=0.02, tol=1e-8)
    small = so.sinkhorn(C[:, :300, :300], reg=0.02, tol=1e-8)
    for res, Cp in ((r, C), (small, C[:, :300, :300])):
        assert res.converged.all()
        for p in range(2):
            n, m = Cp.shape[1:]
            s = so.sinkhorn(Cp[p], reg=0.02, tol=1e-8)
            assert np.abs(res.plan()[p] - s.plan()).sum() <= 1e-7
            col_err, _, cost = _independent_err_and_cost(Cp[p], 0.02, np.full(n, 1 / n),
                                                         np.full(m, 1 / m), res.f[p], res.g[p])
            np.testing.assert_allclose(res.err[p], col_err, rtol=1e-9, atol=1e-14)
            np.testing.assert_allclose(res.cost[p], cost, rtol=1e-9)


def test_row_whose_largest_entry_is_in_a_massless_column():
    # Row 0's cheapest column has no mass: its live entries lie 6000 below it in S, beyond
    # float64's range if the row were shifted by its overall largest entry.
    C = np.array([[[1.92, 0.0, 2.5], [0.3, 0.1, 1.0]]])
    a, b = np.array([0.5, 0.5]), np.array([0.6, 0.0, 0.4])
    for dtype in (np.float64, np.float32):
        r = so.sinkhorn(C.astype(dtype), a, b, reg=10**-3.5, tol=1e-12)
        P = plan_from_potentials(-C[0].astype(dtype).astype(np.float64) / 10**-3.5,
                                 r.f[0], r.g[0])
        assert r.converged.all()
        np.testing.assert_allclose(P.sum(1), a, rtol=1e-12)
        np.testing.assert_allclose(P.sum(0), b, atol=1e-12)
