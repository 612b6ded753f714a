"""sinkhorn_ot.codes against re-implementations of the deep-clustering loops it replaces
(tests/clients.py), with the one-call mappings of docs/migration.rst: SwAV, DINOv2 (DINO head
and iBOT), MSN, solo-learn, lightly (SwaVLoss, MSNLoss), SeLa and SeLaVi, in float32 and
float64, with and without a queue, and under a 2-process torch.distributed (gloo) group;
then the API itself (dtypes, rows, comm="auto", gradients, errors)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import clients as C  # noqa: E402
import sinkhorn_ot  # noqa: E402
from reference import reference_solve  # noqa: E402

DTYPES = [torch.float64, torch.float32]
# Codes are at most 1: absolute tolerances.  The originals round every one of their ~6
# normalisations of a pass in the working precision; ours keep float64 potentials.
ATOL = {torch.float64: 1e-12, torch.float32: 2e-6}


def _close(ours, theirs, dt, name=""):
    assert ours.dtype == theirs.dtype, name
    np.testing.assert_allclose(np.asarray(ours, dtype=np.float64),
                               np.asarray(theirs, dtype=np.float64), rtol=0, atol=ATOL[dt],
                               err_msg=name)


# --------------------------------------------------------------------------- call sites
@pytest.mark.parametrize("dt", DTYPES)
def test_swav(dt):
    out = C.cosine_scores(300, 40, dtype=dt)
    _close(sinkhorn_ot.codes(out, eps=0.05), C.swav(out.clone(), 0.05, 3), dt)
    _close(sinkhorn_ot.codes(out, eps=0.1, n_iter=5), C.swav(out.clone(), 0.1, 5), dt)


@pytest.mark.parametrize("dt", DTYPES)
def test_swav_queue_keeps_last_rows(dt):
    bs = 64
    out = torch.cat((C.cosine_scores(200, 40, seed=1, dtype=dt),     # queue first
                     C.cosine_scores(bs, 40, seed=2, dtype=dt)))
    ref = C.swav(out.clone())[-bs:]
    _close(sinkhorn_ot.codes(out, eps=0.05, rows=slice(-bs, None)), ref, dt)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("queue", [False, True])
def test_solo_learn(dt, queue):
    bs = 64
    p = C.cosine_scores(bs, 40, seed=3, dtype=dt)
    if queue:  # solo-learn appends the queue's scores after the batch
        p = torch.cat((p, C.cosine_scores(150, 40, seed=4, dtype=dt)))
    sk = C.SoloSinkhornKnopp(num_iters=3, epsilon=0.05, world_size=1)
    _close(sinkhorn_ot.codes(p, eps=sk.epsilon, n_iter=sk.num_iters, rows=slice(0, bs)),
           sk(p.clone())[:bs], dt)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("queue", [False, True])
def test_lightly_swav_loss(dt, queue):
    bs = 64
    out = C.cosine_scores(bs, 40, seed=5, dtype=dt)
    if queue:  # SwaVLoss(queue_outputs=...) appends the queue after the batch
        out = torch.cat((out, C.cosine_scores(150, 40, seed=6, dtype=dt)))
    ref = C.lightly_swav(out.clone(), iterations=3, epsilon=0.05)[:bs]
    _close(sinkhorn_ot.codes(out, eps=0.05, n_iter=3, rows=slice(0, bs)), ref, dt)


@pytest.mark.parametrize("dt", DTYPES)
def test_dinov2_and_ibot(dt):
    t = C.teacher_logits(64, 200, seed=7, dtype=dt)
    ref = C.dinov2(t, teacher_temp=0.07, n_iterations=3)     # computed in float32 by DINOv2
    _close(sinkhorn_ot.codes(t.float(), eps=0.07, n_iter=3), ref, torch.float32)
    ref = C.ibot(t, 0.07, torch.tensor(t.shape[0]), n_iterations=3)
    _close(sinkhorn_ot.codes(t.float(), eps=0.07), ref, torch.float32)
    if dt == torch.float64:  # the same loop kept in float64 (no .float()) is ours in float64
        Q = torch.exp(t / 0.07).t()
        ref64 = C._alternate(Q, 3, 1, Q.shape[1])
        _close(sinkhorn_ot.codes(t, eps=0.07), ref64, dt)


@pytest.mark.parametrize("dt", DTYPES)
def test_msn_and_lightly_msn_loss(dt):
    p = C.msn_targets(64, 100, seed=8, dtype=dt)
    _close(sinkhorn_ot.codes(p, eps=1.0, probabilities=True), C.msn(p, num_itr=3), dt)
    _close(sinkhorn_ot.codes(p, eps=1.0, probabilities=True, n_iter=3),
           C.lightly_msn(p, iterations=3), dt)


@pytest.mark.parametrize("dt", [np.float64, np.float32])
def test_sela(dt):
    PS = C.softmax_probs(500, 10, seed=9).numpy().astype(dt)
    lamb, N = 10.0, PS.shape[0]
    # the alternation: SeLa's loop run a fixed number of times is n_iter
    plan, _, count = C.sela(PS, lamb, dtype=dt, threshold=-1.0, max_count=7)
    assert count == 7
    q = sinkhorn_ot.codes(PS, eps=1 / lamb, probabilities=True, n_iter=7)
    _close(q, (N * plan).astype(dt), torch.float64 if dt == np.float64 else torch.float32)
    # the mapping: SeLa's stop rule against tol, both converged
    tight = 1e-9 if dt == np.float64 else 1e-5
    plan, labels, _ = C.sela(PS, lamb, dtype=dt, threshold=tight)
    q = sinkhorn_ot.codes(PS, eps=1 / lamb, probabilities=True, tol=tight)
    np.testing.assert_allclose(q, N * plan, rtol=0, atol=10 * tight)
    np.testing.assert_array_equal(q.argmax(axis=1), labels)
    # SeLa's own loose rule (0.1) and tol=1e-3 give the same labels on this problem
    _, labels, _ = C.sela(PS, lamb, dtype=dt)
    q = sinkhorn_ot.codes(PS, eps=1 / lamb, probabilities=True, tol=1e-3)
    assert np.mean(q.argmax(axis=1) == labels) >= 0.99


@pytest.mark.parametrize("dt", DTYPES)
def test_selavi(dt):
    N, K, lamb = 400, 12, 20.0
    PS = C.softmax_probs(N, K, seed=10) * C.softmax_probs(N, K, seed=11)   # video x audio
    g = torch.Generator().manual_seed(12)
    r = C.selavi_prior(PS, torch.rand(K, generator=g, dtype=torch.float64) + 0.5)
    # SeLaVi works in float64 whatever the network's dtype: ours reads the given dtype
    ours_in = PS.to(dt)
    plan, _, _ = C.selavi(PS, lamb, r, threshold=-1.0, max_count=5)
    q = sinkhorn_ot.codes(ours_in, eps=2 / lamb, probabilities=True, b=r, n_iter=5)
    _close(q, (N * plan).to(dt), dt)
    tight = 1e-9 if dt == torch.float64 else 1e-5
    plan, labels, _ = C.selavi(PS, lamb, r, threshold=tight, max_count=10_000)
    q = sinkhorn_ot.codes(ours_in, eps=2 / lamb, probabilities=True, b=r, tol=tight)
    np.testing.assert_allclose(q.double(), N * plan, rtol=0, atol=10 * tight)
    np.testing.assert_array_equal(q.argmax(1), labels)
    cols = q.double().sum(0) / N                    # the prior is met
    np.testing.assert_allclose(cols, r, rtol=0, atol=2 * tight)


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_gloo(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch built without torch.distributed")
    import _codes_worker as W

    worker = os.path.join(os.path.dirname(__file__), "_codes_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, worker, str(tmp_path), str(port), str(r)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env) for r in range(2)]
    for p in procs:
        try:
            out, _ = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("distributed run timed out (deadlock?)")
        assert p.returncode == 0, out[-4000:]
    parts = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    for name, mats, _, ours, rows in W.cases():
        dt = torch.float32 if name.endswith("float32") or name.startswith(
            ("dinov2", "ibot")) else torch.float64
        # all ranks' rows in one process: what the sharded solve must equal
        both = torch.cat(mats)
        if name.startswith(("dinov2", "ibot")):
            both = both.float()
        kw = dict(probabilities=True, eps=1.0) if "msn" in name else dict(
            eps=0.07 if name.startswith(("dinov2", "ibot")) else 0.05)
        single = sinkhorn_ot.codes(both, comm=None, **kw).numpy()
        lo = 0
        for r in range(2):
            got, ref = parts[r][f"{name}.ours"], parts[r][f"{name}.original"]
            np.testing.assert_allclose(got, ref, rtol=0, atol=ATOL[dt], err_msg=name)
            n = mats[r].shape[0]
            whole = single[lo:lo + n]
            lo += n
            np.testing.assert_allclose(got, whole if rows is None else whole[rows], rtol=0,
                                       atol=1e-12 if dt == torch.float64 else 1e-6,
                                       err_msg=name)
            np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=0,
                                       atol=1e-12 if dt == torch.float64 else 1e-5)
    full = C.cosine_scores(2 * W.BS, 40, seed=50)
    assert parts[0]["empty_rank0.ours"].shape == (0, 40)
    np.testing.assert_allclose(parts[1]["empty_rank0.ours"],
                               sinkhorn_ot.codes(full, eps=0.05).numpy(), rtol=0, atol=1e-12)
    msgs = [str(parts[r]["error"]) for r in range(2)]
    assert msgs[0] == msgs[1], msgs
    assert "scores has a negative, NaN or infinite probability at (51, 7)" in msgs[0]


# --------------------------------------------------------------------------- the API
def test_rows_sum_to_one_and_columns_to_the_prior(rng):
    S = rng.standard_normal((500, 20))
    b = rng.random(20) + 0.2
    b /= b.sum()
    q = sinkhorn_ot.codes(S, eps=0.5, b=b, tol=1e-10)
    np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(q.sum(axis=0) / 500, b, rtol=0, atol=1e-10)
    # against the float64 reference solver: the plan times B
    _, _, P, _, _ = reference_solve(S / 0.5, None, b, tol=1e-12)
    np.testing.assert_allclose(q, 500 * P, rtol=0, atol=1e-9)


def test_tol_against_n_iter():
    S = C.cosine_scores(200, 30, seed=13).numpy()
    loose = sinkhorn_ot.codes(S, eps=0.05)
    tight = sinkhorn_ot.codes(S, eps=0.05, tol=1e-9, n_iter=3)   # tol wins
    col = np.abs(tight.sum(axis=0) - 200 / 30).max()
    assert col < 1e-6 < np.abs(loose.sum(axis=0) - 200 / 30).max()


def test_rows_forms():
    S = C.cosine_scores(120, 25, seed=14).numpy()
    full = sinkhorn_ot.codes(S, eps=0.05)
    idx = np.array([5, -1, 0, 5])
    np.testing.assert_array_equal(sinkhorn_ot.codes(S, eps=0.05, rows=idx), full[idx])
    np.testing.assert_array_equal(sinkhorn_ot.codes(S, eps=0.05, rows=[3, 7]), full[[3, 7]])
    np.testing.assert_array_equal(sinkhorn_ot.codes(S, eps=0.05, rows=slice(10, 40, 3)),
                                  full[10:40:3])
    mask = np.zeros(120, dtype=bool)
    mask[[1, 50, 119]] = True
    np.testing.assert_array_equal(sinkhorn_ot.codes(S, eps=0.05, rows=mask), full[mask])
    np.testing.assert_array_equal(sinkhorn_ot.codes(S, eps=0.05, rows=torch.tensor([2, 9])),
                                  full[[2, 9]])
    assert sinkhorn_ot.codes(S, eps=0.05, rows=[]).shape == (0, 25)
    # solved to a tolerance the codes are written after the solve: a strided slice too
    tight = sinkhorn_ot.codes(S, eps=0.05, tol=1e-9)
    np.testing.assert_array_equal(sinkhorn_ot.codes(S, eps=0.05, tol=1e-9,
                                                    rows=slice(1, None, 3)), tight[1::3])
    assert sinkhorn_ot.codes(S, eps=0.05, rows=slice(-64, None)).shape == (64, 25)


@pytest.mark.parametrize("bad, exc, match", [
    ([120], ValueError, "index 120 is out of range for 120 rows"),
    ([0, -121], ValueError, "index -121 is out of range"),
    (3, TypeError, "rows=\\[3\\]"),
    ([[0, 1]], ValueError, "rows must be 1-d"),
    ([0.5], TypeError, "integer indices or booleans"),
    (np.ones(7, dtype=bool), ValueError, "boolean mask must have length 120"),
])
def test_rows_errors(bad, exc, match):
    S = np.zeros((120, 4))
    with pytest.raises(exc, match=match):
        sinkhorn_ot.codes(S, eps=0.1, rows=bad)


def test_dtypes_and_families():
    S = C.cosine_scores(100, 16, seed=15)
    ref = sinkhorn_ot.codes(S, eps=0.1).numpy()
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        t = S.to(dt)
        q = sinkhorn_ot.codes(t, eps=0.1)
        assert isinstance(q, torch.Tensor) and q.dtype == dt and q.shape == (100, 16)
        # half inputs: the codes of the rounded scores, in float32 arithmetic, then rounded
        exact = sinkhorn_ot.codes(t.double(), eps=0.1).numpy()
        tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dt]
        np.testing.assert_allclose(q.double().numpy(), exact, rtol=tol, atol=tol)
    for dt in (np.float32, np.float16):
        q = sinkhorn_ot.codes(S.numpy().astype(dt), eps=0.1)
        assert isinstance(q, np.ndarray) and q.dtype == dt
    q = sinkhorn_ot.codes(S.numpy().tolist(), eps=0.1)      # a nested list: NumPy back
    np.testing.assert_allclose(q, ref, rtol=0, atol=1e-15)


def test_requires_grad_is_a_constant():
    S = C.cosine_scores(50, 8, seed=16, dtype=torch.float32).requires_grad_(True)
    q = sinkhorn_ot.codes(S, eps=0.05)
    assert not q.requires_grad
    P = torch.softmax(S, dim=1)
    assert not sinkhorn_ot.codes(P, eps=1.0, probabilities=True).requires_grad


def test_probabilities_are_logs_inside():
    P = C.msn_targets(80, 20, seed=17).numpy()
    P[3, 4] = 0.0                                            # a forbidden pair
    q = sinkhorn_ot.codes(P, eps=0.5, probabilities=True)
    with np.errstate(divide="ignore"):
        np.testing.assert_allclose(q, sinkhorn_ot.codes(np.log(P), eps=0.5), rtol=0,
                                   atol=1e-13)
    assert q[3, 4] == 0.0
    # unnormalised rows give the same codes (a per-row scale of P is absorbed)
    np.testing.assert_allclose(sinkhorn_ot.codes(P * 7.0, eps=0.5, probabilities=True), q,
                               rtol=0, atol=1e-13)


def test_stable_where_the_loop_is_not():
    S = C.cosine_scores(256, 64, seed=18, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        swav = C.swav(S.clone(), epsilon=0.005)              # exp(1 / 0.005) overflows float32
    assert torch.isnan(swav).any()
    q = sinkhorn_ot.codes(S, eps=0.005)
    ref = C.swav(S.double(), epsilon=0.005)                  # the loop in float64 is fine
    np.testing.assert_allclose(q.double().numpy(), ref.numpy(), rtol=0, atol=1e-5)


def test_comm_auto_without_a_group_is_one_process():
    S = C.cosine_scores(60, 10, seed=19).numpy()
    np.testing.assert_array_equal(sinkhorn_ot.codes(S, eps=0.1, comm="auto"),
                                  sinkhorn_ot.codes(S, eps=0.1, comm=None))


@pytest.mark.parametrize("kw, exc, match", [
    (dict(eps=0.0), ValueError, "eps must be positive"),
    (dict(eps="0.1"), TypeError, "eps must be a real number"),
    (dict(eps=0.1, n_iter=0), ValueError, "n_iter must be >= 1"),
    (dict(eps=0.1, probabilities=1), TypeError, "probabilities must be True or False"),
    (dict(eps=0.1, tol=-1.0), ValueError, "tol must be positive"),
    (dict(eps=0.1, b=np.ones(3) / 3), ValueError, "b must have shape"),
    (dict(eps=0.1, comm="nccl"), ValueError, "comm must be"),
])
def test_option_errors(kw, exc, match):
    with pytest.raises(exc, match=match):
        sinkhorn_ot.codes(np.zeros((10, 4)), **kw)


def test_matrix_errors():
    S = np.zeros((10, 4))
    S[2, 3] = np.nan
    with pytest.raises(ValueError, match=r"scores has a NaN .* at \(2, 3\)"):
        sinkhorn_ot.codes(S, eps=0.1)
    with pytest.raises(ValueError, match="must be 2-d"):
        sinkhorn_ot.codes(np.zeros(5), eps=0.1)
    with pytest.raises(TypeError, match="real floating"):
        sinkhorn_ot.codes(np.zeros((3, 3), dtype=np.int64), eps=0.1)
    P = np.full((6, 3), 1 / 3)
    P[4, 1] = -0.1
    with pytest.raises(ValueError, match=r"negative, NaN or infinite probability at \(4, 1\)"):
        sinkhorn_ot.codes(P, eps=1.0, probabilities=True)
    P[4, 1] = np.inf
    with pytest.raises(ValueError, match=r"probability at \(4, 1\)"):
        sinkhorn_ot.codes(torch.tensor(P), eps=1.0, probabilities=True)
    P[4] = 0.0
    with pytest.raises(ValueError, match="row 4 of scores has every entry forbidden"):
        sinkhorn_ot.codes(P, eps=1.0, probabilities=True)
    with pytest.raises(ValueError, match="overflows float32"):
        sinkhorn_ot.codes(np.full((4, 4), 1e30, dtype=np.float32), eps=1e-10)


# --------------------------------------------------------------------------- scaling passes
def _log_domain(S, eps, n_iter=3, b=None):
    """The same fixed-iteration solve by the log-domain passes (balanced_assign's plan)."""
    N = S.shape[0]
    return N * sinkhorn_ot.balanced_assign(S, 1.0 / eps, b=b, n_iter=n_iter).plan()


@pytest.mark.parametrize("n_iter", [1, 3, 7])
@pytest.mark.parametrize("dt", [np.float64, np.float32])
def test_scaling_passes_match_the_log_domain(dt, n_iter, rng):
    S = (C.cosine_scores(333, 47, seed=21).numpy() + 0.3 * rng.standard_normal((333, 47)))
    S = S.astype(dt)
    S[5, :40] = -np.inf                                     # forbidden pairs
    b = rng.dirichlet(np.ones(47))
    for kw in ({}, {"b": b}):
        q = sinkhorn_ot.codes(S, eps=0.1, n_iter=n_iter, **kw)
        assert q.dtype == dt and np.all(q[5, :40] == 0)
        ref = _log_domain(S.astype(np.float64), 0.1, n_iter, kw.get("b"))
        np.testing.assert_allclose(q, ref, rtol=0, atol=1e-13 if dt == np.float64 else 1e-6)


def test_scaling_passes_threads_and_rows(rng):
    S = rng.standard_normal((4000, 30))
    one = sinkhorn_ot.codes(S, eps=0.2, n_threads=1)
    two = sinkhorn_ot.codes(S, eps=0.2, n_threads=2)
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-14)  # another order of the sums
    idx = np.array([3999, 0, 17, 17])
    np.testing.assert_array_equal(sinkhorn_ot.codes(S, eps=0.2, n_threads=2, rows=idx),
                                  two[idx])


def test_scaling_passes_give_way_beyond_float64(rng):
    # a column nobody prefers, 2000 (in units of eps) below every row's best: its column sum
    # of the shifted kernel underflows float64, so the log-domain passes take over
    S = rng.standard_normal((50, 6)) * 0.01
    S[:, 2] -= 2.0
    for dt in (np.float64, np.float32):
        q = sinkhorn_ot.codes(S.astype(dt), eps=1e-3)
        assert np.isfinite(q).all()
        # float32 at |S / eps| ~ 2000: the kernels' float32 rounding moves codes by ~1e-4
        np.testing.assert_allclose(q, _log_domain(S.astype(dt).astype(np.float64), 1e-3),
                                   rtol=0, atol=1e-12 if dt == np.float64 else 3e-4)
        np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=0, atol=1e-5)


def test_scaling_passes_rows_of_a_large_matrix_use_the_log_domain(monkeypatch, rng):
    # with rows, the scaling passes need the whole kernel in memory: above the buffer limit
    # the log-domain passes write only those rows
    from sinkhorn_ot import _codes

    S = rng.standard_normal((300, 20))
    ref = sinkhorn_ot.codes(S, eps=0.3, rows=slice(-50, None))
    monkeypatch.setattr(_codes, "_SCALING_BUFFER_BYTES", 1000)
    q = sinkhorn_ot.codes(S, eps=0.3, rows=slice(-50, None))
    np.testing.assert_allclose(q, ref, rtol=0, atol=1e-14)


@pytest.mark.parametrize("dt", [np.float64, np.float32])
def test_scaling_passes_take_probabilities_at_any_eps(monkeypatch, dt):
    # SeLa's P ** lam (eps = 1 / lam) for a fixed n_iter: the log goes into the output, the
    # kernel is formed over it in place; the log-domain path is not run, the input is kept
    from sinkhorn_ot import _problem

    P = C.softmax_probs(300, 25, seed=23).numpy().astype(dt)
    P[7, 3] = 0.0                                            # a forbidden pair
    P_in = P.copy()
    with np.errstate(divide="ignore"):
        ref = _log_domain(np.log(P).astype(np.float64), 0.1, 4)
    real_run = _problem.run

    def no_log_domain(*a, **k):
        raise AssertionError("the log-domain passes ran")

    monkeypatch.setattr(_problem, "run", no_log_domain)
    for x in (P, torch.from_numpy(P)):
        q = sinkhorn_ot.codes(x, eps=0.1, probabilities=True, n_iter=4)
        assert q.dtype == x.dtype
        q = np.asarray(q)
        assert q[7, 3] == 0.0
        np.testing.assert_allclose(q, ref, rtol=0, atol=1e-12 if dt == np.float64 else 2e-5)
    np.testing.assert_array_equal(P, P_in)
    # an invalid probability: the scaling passes give way and the log-domain scan names it
    monkeypatch.setattr(_problem, "run", real_run)
    P[11, 2] = -0.5
    with pytest.raises(ValueError, match=r"negative, NaN or infinite probability at \(11, 2\)"):
        sinkhorn_ot.codes(P, eps=0.1, probabilities=True, n_iter=4)


@pytest.mark.parametrize("dt", [np.float64, np.float32])
def test_scaling_passes_differential(dt):
    """Random shapes, scales, temperatures, forbidden pairs and cluster priors: the scaling
    passes (or the log-domain passes they give way to) against the log-domain passes in
    float64 on the same values."""
    rng = np.random.default_rng(31)
    for _ in range(150):
        N, K = int(rng.integers(1, 40)), int(rng.integers(1, 30))
        scale = 10 ** rng.uniform(-2, 2.5)
        S = rng.standard_normal((N, K)) * scale
        if rng.random() < 0.3:
            S[rng.random((N, K)) < 0.3] = -np.inf
        S[np.arange(N), rng.integers(0, K, N)] = rng.standard_normal(N) * scale
        S[rng.integers(0, N, K), np.arange(K)] = rng.standard_normal(K) * scale
        S = S.astype(dt)
        eps = 10 ** rng.uniform(-2, 1)
        n_iter = int(rng.integers(1, 6))
        b = rng.dirichlet(np.ones(K)) if rng.random() < 0.3 else None
        q = sinkhorn_ot.codes(S, eps=eps, n_iter=n_iter, b=b)
        assert q.dtype == dt and np.isfinite(q).all()
        assert np.all(q[np.isneginf(S)] == 0)
        ref = _log_domain(S.astype(np.float64), eps, n_iter, b)
        # float32 rounds |S / eps| (up to ~3e4 here) to ~1e-7 relative: codes move by that
        atol = 1e-10 if dt == np.float64 else 2e-7 * max(1.0, float(np.abs(
            S[np.isfinite(S)]).max()) / eps)
        np.testing.assert_allclose(q, ref, rtol=0, atol=atol)
