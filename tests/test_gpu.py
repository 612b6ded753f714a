"""CUDA backend against the CPU core on the same inputs.  Skipped without CuPy or a CUDA
device (never run on the CPU instead), except under SINKHORN_OT_CUDA_EMU=1, where CuPy is the
kernel emulation of tests/cuda_emu (run by tests/test_cuda_emu.py, with smaller shapes)."""
import math
import os
import warnings

import numpy as np
import pytest

import sinkhorn_ot
from sinkhorn_ot._cpu import CPUBackend

cp = pytest.importorskip("cupy")
try:
    _N_DEV = cp.cuda.runtime.getDeviceCount()
except Exception:  # noqa: BLE001 - no driver
    _N_DEV = 0
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(_N_DEV < 1, reason="needs a CUDA device")]

from sinkhorn_ot._cuda import CUDABackend  # noqa: E402

DTYPES = ["float32", "float64", "float16", "bfloat16"]
# The emulation runs a block's threads as fibers on one CPU core: fewer rows, same columns.
EMU = os.environ.get("SINKHORN_OT_CUDA_EMU", "0") == "1"
skip_in_emulation = pytest.mark.skipif(EMU, reason="timing: meaningless in the emulation")


def rows(n, emu):
    """n (rows, iterations) on a GPU, emu in the emulation."""
    return emu if EMU else n


def random_logp(N, K, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    x = scale * rng.standard_normal((N, K))
    return x - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True)) - \
        x.max(1, keepdims=True)


def to_bf16_bits(a32):
    """float32 -> bfloat16 bits (round to nearest even), and the float32 values they hold."""
    b = np.ascontiguousarray(a32, dtype=np.float32).view(np.uint32).astype(np.uint64)
    r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
    r[np.isneginf(a32)] = 0xFF80
    back = (r.astype(np.uint32) << 16).view(np.float32)
    return r, back


def device_input(logp, dtype):
    """(device array for the backend, float32/float64 NumPy array holding the same values)."""
    if dtype == "bfloat16":
        bits, vals = to_bf16_bits(logp.astype(np.float32))
        return cp.asarray(bits), vals
    host = logp.astype(dtype)
    ref = host.astype(np.float32) if dtype == "float16" else host
    return cp.asarray(host), ref


def solve_both(logp, dtype, lam=25.0, n_iter=None, tol=1e-4, max_iter=2000, g0=None,
               layout=None, accurate=None):
    N, K = logp.shape
    Xd, Xh = device_input(logp, dtype)
    loga, logb = np.full(N, -math.log(N)), np.full(K, -math.log(K))
    kw = dict(tol=tol, max_iter=max_iter, n_iter=n_iter, want_labels=True)
    ref = CPUBackend().solve(Xh, lam, loga, logb, g0=g0, **kw)
    gpu = CUDABackend(dtype, layout_override=layout, accurate=accurate).solve(
        Xd, lam, cp.asarray(loga), cp.asarray(logb),
        g0=None if g0 is None else cp.asarray(g0), **kw)
    return ref, gpu, Xh


def assert_close_solution(ref, gpu, X, lam, atol, label_frac=0.999):
    g, f = cp.asnumpy(gpu.g), cp.asnumpy(gpu.f)
    assert np.isfinite(g).all() and np.isfinite(f).all()
    np.testing.assert_allclose(g - g.mean(), ref.g - ref.g.mean(), atol=atol, rtol=0)
    np.testing.assert_allclose(f + g.mean(), ref.f + ref.g.mean(), atol=atol, rtol=0)
    lab = cp.asnumpy(gpu.labels)
    t = lam * X.astype(np.float64) + ref.g
    rows = np.arange(X.shape[0])
    # same argmax up to near-ties
    near = t[rows, ref.labels] - t[rows, lab] <= 1e-3 * max(1.0, lam / 25)
    assert near.mean() >= label_frac


SHAPES = [(rows(3000, 200), rows(100, 20), None), (rows(4096 // 4, 64), 3000, 3),
          (rows(16, 8), 65536 // 4, 3), (rows(257, 33), 9000, 3), (1, 7, 3), (33, 1, 2)]


# (dtype, accurate): both ACC variants of the float kernels; float64 has one
DTYPE_ACC = [("float32", True), ("float32", False), ("float64", None), ("float16", True),
             ("float16", False), ("bfloat16", True), ("bfloat16", False)]


@pytest.mark.parametrize("dtype,accurate", DTYPE_ACC)
@pytest.mark.parametrize("N,K,n_iter", SHAPES)
def test_solve_matches_cpu(dtype, accurate, N, K, n_iter):
    logp = random_logp(N, K, seed=N + K)
    ref, gpu, Xh = solve_both(logp, dtype, n_iter=n_iter, accurate=accurate)
    assert gpu.n_iter == ref.n_iter or (n_iter is None and abs(gpu.n_iter - ref.n_iter) <= 10)
    atol = 1e-6 if dtype == "float64" else 5e-3
    assert_close_solution(ref, gpu, Xh, 25.0, atol)
    np.testing.assert_allclose(gpu.err, ref.err, rtol=0.05 if n_iter else 1.0,
                               atol=1e-9 if dtype == "float64" else 1e-4)
    # qx is 0 when K = 1 (logP = 0): an absolute floor for the rounding of either core
    np.testing.assert_allclose(gpu.qx, ref.qx, rtol=1e-3 if dtype != "float64" else 1e-9,
                               atol=1e-9)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiled_and_single_tile_layouts_agree(dtype):
    logp = random_logp(rows(300, 40), 3000, seed=3)
    _, a, _ = solve_both(logp, dtype, n_iter=5, layout=(8, 384, False))
    _, b, Xh = solve_both(logp, dtype, n_iter=5, layout=(8, 256, True))
    np.testing.assert_allclose(cp.asnumpy(a.g), cp.asnumpy(b.g), atol=1e-4, rtol=0)
    np.testing.assert_allclose(cp.asnumpy(a.f), cp.asnumpy(b.f), atol=1e-4, rtol=0)
    # tolerance mode: the tiled passes write labels every pass, the single-tile ones leave
    # them to labels_kernel at the best g; both must be the best pass's argmax
    for layout in ((8, 256, True), (8, 384, False)):
        ref, sol, Xh = solve_both(logp, dtype, tol=1e-3, layout=layout)
        assert_close_solution(ref, sol, Xh, 25.0, 5e-3)


def _pipe_cases():
    from sinkhorn_ot._cuda import PIPE_CONFIGS

    return [(d, c, rows(1001, 101), 3000) for d in ("float32", "bfloat16", "float64")
            for c in PIPE_CONFIGS[d]] + [("float32", c, 37, 1500) for c in PIPE_CONFIGS["float32"]]


@pytest.mark.parametrize("dtype,cfg,N,K", _pipe_cases())
def test_pipelined_pass_matches_direct(dtype, cfg, N, K):
    """The cp.async pass (fused_pass_pipe_kernel) against the run-1 direct pass: same layout of
    columns, so float32 results agree to rounding; uneven row blocks and tails of groups."""
    logp = random_logp(N, K, seed=13)
    logp[2, 5] = -np.inf
    ov = ("pipe",) + tuple(cfg)
    Xd, Xh = device_input(logp, dtype)
    be = CUDABackend(dtype, layout_override=ov)
    assert be.layout(Xd).pipe == tuple(cfg)
    ref, gpu, Xh = solve_both(logp, dtype, n_iter=4, layout=ov)
    atol = 1e-6 if dtype == "float64" else 5e-3
    assert_close_solution(ref, gpu, Xh, 25.0, atol)
    _, direct, _ = solve_both(logp, dtype, n_iter=4, layout=(cfg[0], cfg[3], False))
    np.testing.assert_allclose(cp.asnumpy(gpu.g), cp.asnumpy(direct.g), atol=2e-4, rtol=0)
    np.testing.assert_allclose(cp.asnumpy(gpu.f), cp.asnumpy(direct.f), atol=2e-4, rtol=0)
    np.testing.assert_allclose(gpu.qx, direct.qx, rtol=1e-4)
    # tolerance mode and the fused_pass primitive through the same layout
    if not EMU:  # (the emulation runs the tolerance-mode loop in test_solve_matches_cpu)
        ref2, gpu2, _ = solve_both(logp, dtype, tol=1e-4, layout=ov)
        assert abs(gpu2.n_iter - ref2.n_iter) <= 10
    f_d = cp.full(N, cp.nan)
    lab_d = cp.full(N, -1, dtype=cp.int64)
    g = np.random.default_rng(0).standard_normal(K)
    loga = np.full(N, -math.log(N))
    col, colmax, qx = be.fused_pass(Xd, 25.0, cp.asarray(g), cp.asarray(loga), 1.0, f_d, lab_d)
    f_h, lab_h = np.empty(N), np.empty(N, np.int64)
    col_h, _, qx_h = CPUBackend().fused_pass(Xh, 25.0, g, loga, 1.0, f_h, lab_h)
    tol = 1e-10 if dtype == "float64" else 2e-4
    np.testing.assert_allclose(cp.asnumpy(f_d), f_h, rtol=tol, atol=tol)
    np.testing.assert_allclose(cp.asnumpy(col), col_h, rtol=50 * tol, atol=1e-12)
    np.testing.assert_allclose(float(qx), qx_h, rtol=50 * tol)


def test_cached_buffers_do_not_alias_results():
    """Work buffers are cached across calls; returned f / g / labels must not be."""
    be = CUDABackend("float32")
    X1 = cp.asarray(random_logp(500, 1200, seed=1).astype(np.float32))
    X2 = cp.asarray(random_logp(500, 1200, seed=2).astype(np.float32))
    loga, logb = cp.full(500, -math.log(500)), cp.full(1200, -math.log(1200))
    kw = dict(tol=0.0, max_iter=3, n_iter=3, want_labels=True)
    a = be.solve(X1, 25.0, loga, logb, **kw)
    fa, ga, la = a.f.copy(), a.g.copy(), a.labels.copy()
    b = be.solve(X2, 25.0, loga, logb, **kw)
    cp.testing.assert_array_equal(a.f, fa)
    cp.testing.assert_array_equal(a.g, ga)
    cp.testing.assert_array_equal(a.labels, la)
    assert not bool((b.g == ga).all())
    c1 = be.fused_pass(X1, 25.0, ga, loga, 1.0, cp.empty(500), None)
    keep = c1[0].copy()
    be.fused_pass(X2, 25.0, ga, loga, 1.0, cp.empty(500), None)
    cp.testing.assert_array_equal(c1[0], keep)


def test_work_buffers_per_compute_type():
    """Run 2's illegal address: a float64 solve after a float32 one of the same shape reused
    the float32 work buffers (half the size).  Same shape, every dtype in turn."""
    logp = random_logp(rows(600, 64), 1200, seed=4)
    for dtype in ("float32", "float64", "bfloat16", "float64", "float32"):
        ref, gpu, Xh = solve_both(logp, dtype, n_iter=3)
        atol = 1e-6 if dtype == "float64" else 5e-3
        assert_close_solution(ref, gpu, Xh, 25.0, atol)


@pytest.mark.parametrize("lam", [1e3, 1e4])
def test_large_lambda_finite(lam):
    logp = random_logp(2000, 50, seed=5)
    ref, gpu, Xh = solve_both(logp, "float32", lam=lam, n_iter=30)
    g = cp.asnumpy(gpu.g)
    assert np.isfinite(g).all() and np.isfinite(cp.asnumpy(gpu.f)).all()
    assert math.isfinite(gpu.err)
    sizes = np.bincount(cp.asnumpy(gpu.labels), minlength=50)
    assert sizes.min() > 0
    lab = cp.asnumpy(gpu.labels)
    assert (lab == ref.labels).mean() >= 0.95


def test_forbidden_pairs_and_warm_start():
    N = rows(500, 200)
    logp = random_logp(N, 40, seed=7)
    rng = np.random.default_rng(1)
    mask = rng.random(logp.shape) < 0.3
    mask[np.arange(N), rng.integers(0, 40, N)] = False
    logp[mask] = -np.inf
    ref, gpu, Xh = solve_both(logp, "float32", tol=1e-4)
    assert_close_solution(ref, gpu, Xh, 25.0, 5e-3)
    lab = cp.asnumpy(gpu.labels)
    assert not mask[np.arange(N), lab].any()
    ref2, gpu2, _ = solve_both(logp, "float32", tol=1e-4, g0=ref.g)
    assert gpu2.n_iter <= 3 and ref2.n_iter <= 3


def _independent_err(logp, lam, f, g):
    """||Q 1 - 1/N||_1 + ||Q^T 1 - 1/K||_1 of exp(lam logP + f + g), in float64."""
    N, K = logp.shape
    Q = np.exp(lam * logp.astype(np.float64) + f[:, None] + g[None, :])
    return np.abs(Q.sum(1) - 1.0 / N).sum() + np.abs(Q.sum(0) - 1.0 / K).sum()


def test_public_api_noncontiguous_and_results():
    N = 800
    logp = random_logp(N, 60, seed=11).astype(np.float32)
    Xd = cp.asfortranarray(cp.asarray(logp))  # non-contiguous: copied once by validation
    # Plain iterations on both sides (the device loop on the GPU): the same iteration path,
    # so the potentials differ by float32 rounding only.
    plain = dict(lam=25.0, acceleration=None, eps_scaling=False)
    res = sinkhorn_ot.balanced_assign(Xd, **plain)
    ref = sinkhorn_ot.balanced_assign(logp, **plain)
    assert isinstance(res.g, cp.ndarray) and isinstance(res.labels, cp.ndarray)
    assert res.converged and ref.converged
    np.testing.assert_allclose(cp.asnumpy(res.g) - float(res.g.mean()), ref.g - ref.g.mean(),
                               atol=5e-3)
    np.testing.assert_array_equal(cp.asnumpy(res.sizes).sum(), N)
    np.testing.assert_allclose(res.cost, ref.cost, rtol=1e-3)
    P = res.plan()
    assert P.shape == (N, 60) and P.dtype == cp.float32
    np.testing.assert_allclose(cp.asnumpy(P), ref.plan(), rtol=2e-3, atol=1e-9)
    # Defaults (Anderson + epsilon scaling; on the GPU the Python loop over fused_pass /
    # column_update): the two sides take different paths to err <= tol, so compare what the
    # tolerance guarantees: each plan meets the marginals to about tol, measured
    # independently in float64, and the costs agree.
    res = sinkhorn_ot.balanced_assign(Xd, lam=25.0)
    ref = sinkhorn_ot.balanced_assign(logp, lam=25.0)
    assert res.converged and ref.converged
    tol = 1e-5  # the float32 default, total mass 1
    assert res.err <= tol and ref.err <= tol
    for r, f, g in ((res, cp.asnumpy(res.f), cp.asnumpy(res.g)), (ref, ref.f, ref.g)):
        assert _independent_err(logp, 25.0, f, g) <= 2 * tol + 2e-6
    np.testing.assert_allclose(res.cost, ref.cost, rtol=1e-3)
    assert (cp.asnumpy(res.labels) == ref.labels).mean() >= 0.99
    # transposed view (K x N problem) as a cost matrix, plain iterations
    C = cp.asarray(-logp).T
    r1 = sinkhorn_ot.sinkhorn(C, reg=0.1, acceleration=None, eps_scaling=False)
    r2 = sinkhorn_ot.sinkhorn(np.ascontiguousarray(-logp.T), reg=0.1, acceleration=None,
                              eps_scaling=False)
    np.testing.assert_allclose(cp.asnumpy(r1.f) - float(r1.f.mean()), r2.f - r2.f.mean(),
                               atol=5e-3)


def test_validation_errors_on_device():
    X = cp.asarray(random_logp(50, 20).astype(np.float32))
    X[3, 4] = cp.nan
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        sinkhorn_ot.balanced_assign(X)
    X[3, 4] = 0
    X[7, :] = -cp.inf
    with pytest.raises(ValueError, match="row 7"):
        sinkhorn_ot.balanced_assign(X)
    X[7, :] = 0
    X[:, 5] = -cp.inf
    with pytest.raises(ValueError, match="column 5"):
        sinkhorn_ot.balanced_assign(X)


@pytest.mark.parametrize("kw", [dict(), dict(acceleration=None, eps_scaling=False)],
                         ids=["generic-loop", "device-loop"])
def test_non_convergence_warning_points_at_the_caller(kw):
    X = cp.asarray(random_logp(rows(300, 64), 9, seed=3).astype(np.float32))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = sinkhorn_ot.balanced_assign(X, 50.0, max_iter=2, tol=1e-9, **kw)
    assert not res.converged
    hits = [x for x in w if "did not converge" in str(x.message)]
    assert len(hits) == 1 and hits[0].filename == __file__, [(str(x.message), x.filename)
                                                              for x in w]


@pytest.mark.parametrize("dtype,accurate", DTYPE_ACC)
@pytest.mark.parametrize("N,K", [(1000, 37), (20, 20000), (300, 3000)])
def test_primitives_poisoned_outputs(dtype, accurate, N, K):
    logp = random_logp(N, K, seed=2)
    logp[0, 1] = -np.inf
    Xd, Xh = device_input(logp, dtype)
    be, cpu = CUDABackend(dtype, accurate=accurate), CPUBackend()
    g = np.random.default_rng(0).standard_normal(K)
    loga = np.full(N, -math.log(N))
    f_d = cp.full(N, cp.nan)
    lab_d = cp.full(N, -1, dtype=cp.int64)
    col, colmax, qx = be.fused_pass(Xd, 25.0, cp.asarray(g), cp.asarray(loga), 1.0, f_d, lab_d)
    f_h = np.empty(N)
    lab_h = np.empty(N, np.int64)
    col_h, colmax_h, qx_h = cpu.fused_pass(Xh, 25.0, g, loga, 1.0, f_h, lab_h)
    tol = 1e-10 if dtype == "float64" else 2e-4
    np.testing.assert_allclose(cp.asnumpy(f_d), f_h, rtol=tol, atol=tol)
    np.testing.assert_allclose(cp.asnumpy(col), col_h, rtol=50 * tol, atol=1e-12)
    cm = cp.asnumpy(colmax)
    # max_i log Q_iy, from the CPU's f (the CPU reports an upper bound of it: log of the
    # column sum where no column underflows)
    exact = (25.0 * Xh.astype(np.float64) + f_h[:, None]).max(axis=0) + g
    assert (colmax_h >= exact - 20 * tol).all()
    if not be.layout(Xd).tiled:
        # the one-exponential pass reports an upper bound of max_i log Q_iy, looser by at most
        # max_i log s_i <= log K (sinkhorn_cuda.cu, lrmax)
        assert (cm >= exact - 20 * tol).all()
        assert (cm <= exact + math.log(K) + 20 * tol).all()
    else:
        np.testing.assert_allclose(cm, exact, rtol=tol, atol=20 * tol)
    np.testing.assert_allclose(float(qx), qx_h, rtol=50 * tol)
    assert (cp.asnumpy(lab_d) == lab_h).mean() >= 0.999
    L = be.column_lse(Xd, 25.0, cp.asarray(f_h))
    np.testing.assert_allclose(cp.asnumpy(L), cpu.column_lse(Xh, 25.0, f_h), rtol=tol,
                               atol=tol * 10)
    gn, err = be.column_update(cp.asarray(g), cp.zeros(K) - math.log(K), cp.asarray(col_h),
                               cp.asarray(colmax_h), math.log(N), 1.0)
    gn_h, err_h = cpu.column_update(g, np.zeros(K) - math.log(K), col_h, colmax_h,
                                    math.log(N), 1.0)
    np.testing.assert_allclose(cp.asnumpy(gn), gn_h, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(float(err), err_h, rtol=1e-12)
    chk = be.check(Xd, -math.inf)
    ref = cpu.check(Xh.astype(np.float32) if dtype != "float64" else Xh, -math.inf)
    assert chk["first_invalid"] == ref["first_invalid"] == -1
    assert chk["first_empty_row"] == -1 and chk["first_empty_col"] == -1
    np.testing.assert_allclose(chk["max_abs"], ref["max_abs"], rtol=1e-6)


def test_check_finds_first_problem():
    X = random_logp(500, 300).astype(np.float32)
    X[400, 7] = np.nan
    X[120, 250] = np.inf
    X[450, :] = -np.inf
    X[:, 299] = -np.inf
    be, cpu = CUDABackend("float32"), CPUBackend()
    a, b = be.check(cp.asarray(X), -math.inf), cpu.check(X, -math.inf)
    assert a["first_invalid"] == b["first_invalid"] == 120 * 300 + 250
    assert a["first_empty_row"] == b["first_empty_row"] == 450
    assert a["first_empty_col"] == b["first_empty_col"] == 299
    np.testing.assert_allclose(a["max_abs"], b["max_abs"])


def test_torch_tensors_in_and_out():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    logp = torch.log_softmax(3 * torch.randn(2048, 300, device="cuda"), dim=1)
    ref = sinkhorn_ot.balanced_assign(logp.cpu().numpy(), lam=25.0, n_iter=3)
    for t in (logp, logp.to(torch.bfloat16), logp.half()):
        res = sinkhorn_ot.balanced_assign(t, lam=25.0, n_iter=3)
        assert isinstance(res.labels, torch.Tensor) and res.labels.device.type == "cuda"
        assert isinstance(res.g, torch.Tensor) and res.g.dtype == torch.float64
        assert res.n_iter == 3
        agree = (res.labels.cpu().numpy() == ref.labels).mean()
        assert agree >= (0.999 if t.dtype == torch.float32 else 0.95)
    # a non-default stream
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        res = sinkhorn_ot.balanced_assign(logp, lam=25.0, n_iter=3)
        lab = res.labels.clone()
    torch.cuda.synchronize()
    np.testing.assert_array_equal(lab.cpu().numpy(), ref.labels)


# ---------------------------------------------------------------------------------------------
# Accurate shifted exponents (ACC kernels, the default for float32 / float16 / bfloat16): the
# plan the kernels measure (err, column sums) is the plan of the returned float64 potentials,
# also where |lam logP| reaches 1e7.  Mirrors tests/test_stability.py and test_invariants.py.
def _planted_dead(N, K, seed=3):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((N, K))
    z[np.arange(N), np.arange(N) % K] += 2.0
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    logp[:, 0] -= 1000.0
    return logp


def test_acc_single_column_lam_1e4():
    r = sinkhorn_ot.balanced_assign(cp.full((5, 1), -1e3, cp.float32), 1e4)
    assert r.converged
    np.testing.assert_allclose(cp.asnumpy(r.plan()).astype(np.float64), np.full((5, 1), 0.2),
                               rtol=1e-5)
    # the device loop (plain iterations) and the layouts of both ACC variants
    r = sinkhorn_ot.balanced_assign(cp.full((5, 1), -1e3, cp.float32), 1e4, acceleration=None,
                                    eps_scaling=False)
    assert r.converged
    np.testing.assert_allclose(cp.asnumpy(r.plan()).astype(np.float64), 0.2, rtol=1e-5)


@pytest.mark.parametrize("lam", [25.0, 100.0])
@pytest.mark.parametrize("plain", [False, True], ids=["default", "device_loop"])
def test_acc_reported_err_is_the_plans_violation(lam, plain):
    N, K = rows(300, 120), 11
    logp = random_logp(N, K, seed=5).astype(np.float32)
    b = np.random.default_rng(1).uniform(0.5, 1.5, K)
    b /= b.sum()
    kw = dict(acceleration=None, eps_scaling=False) if plain else {}
    res = sinkhorn_ot.balanced_assign(cp.asarray(logp), lam, b=cp.asarray(b), max_iter=50_000,
                                      **kw)
    assert res.converged
    a = np.full(N, 1 / N)
    P = cp.asnumpy(res.plan()).astype(np.float64)
    measured = np.abs(P.sum(1) - a).sum() + np.abs(P.sum(0) - b).sum()
    np.testing.assert_allclose(res.err, measured, rtol=0, atol=1e-6)
    f, g = cp.asnumpy(res.f), cp.asnumpy(res.g)
    Q = np.exp(lam * logp.astype(np.float64) + f[:, None] + g[None, :])
    exact = np.abs(Q.sum(1) - a).sum() + np.abs(Q.sum(0) - b).sum()
    np.testing.assert_allclose(res.err, exact, rtol=0, atol=1e-6)


@pytest.mark.parametrize("lam", [25.0, 1000.0])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_acc_dead_cluster_recovers(lam, dtype):
    N, K = 120, 6
    logp = _planted_dead(N, K)
    Xd, Xh = device_input(logp, dtype)
    if dtype == "bfloat16":  # raw bits: through the backend (plain iterations)
        loga, logb = np.full(N, -math.log(N)), np.full(K, -math.log(K))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # lam = 1000: slow without Anderson
            sol = CUDABackend("bfloat16").solve(Xd, lam, cp.asarray(loga), cp.asarray(logb),
                                                tol=1e-5, max_iter=rows(20_000, 2_000),
                                                want_labels=True)
        f, g, err = cp.asnumpy(sol.f), cp.asnumpy(sol.g), sol.err
    else:
        res = sinkhorn_ot.balanced_assign(Xd, lam, max_iter=5000)
        assert res.converged
        assert int(cp.asnumpy(res.sizes)[0]) > 0
        f, g, err = cp.asnumpy(res.f), cp.asnumpy(res.g), res.err
        np.testing.assert_allclose(cp.asnumpy(res.plan()).astype(np.float64).sum(0), 1 / K,
                                   rtol=0, atol=1e-5)
    Q = np.exp(lam * Xh.astype(np.float64) + f[:, None] + g[None, :])
    viol = np.abs(Q.sum(1) - 1 / N).sum() + np.abs(Q.sum(0) - 1 / K).sum()
    assert abs(err - viol) <= 1e-6, (err, viol)
    if dtype == "float32" or lam == 25.0:
        np.testing.assert_allclose(Q.sum(0), 1 / K, rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", [None, (8, 384, False), (8, 256, True),
                                    ("pipe", 8, 1, 4, 384, 2)])
def test_acc_large_lambda_primitives_match_float64(layout):
    """fused_pass and column_lse at |lam x| ~ 1e7 against float64 NumPy (direct, tiled and
    pipelined passes); the run-1 arithmetic (accurate=False) is off by O(1) there."""
    rng = np.random.default_rng(3)
    N, K, lam = 257, 3000, 1e4
    X = (-1e3 + rng.uniform(-5e-3, 5e-3, (N, K))).astype(np.float32)
    X[4, 7] = -np.inf
    S = lam * X.astype(np.float64)
    g = -S[np.isfinite(S).all(1)].mean(0) + rng.uniform(-3, 3, K)
    loga = np.full(N, -math.log(N))
    T = S + g[None, :]
    m = T.max(1, keepdims=True)
    f64 = loga - (m[:, 0] + np.log(np.exp(T - m).sum(1)))
    Q = np.exp(T + f64[:, None])
    col64, qx64 = Q.sum(0), float((Q * np.where(np.isfinite(X), X, 0)).sum())
    Xd = cp.asarray(X)
    out = {}
    for acc in (True, False):
        be = CUDABackend("float32", layout_override=layout, accurate=acc)
        f_d = cp.full(N, cp.nan)
        col, colmax, qx = be.fused_pass(Xd, lam, cp.asarray(g), cp.asarray(loga), 1.0, f_d, None)
        out[acc] = (cp.asnumpy(f_d), cp.asnumpy(col), float(qx))
        if acc:
            # f_i and the column sums of exp(lam x + f + g): float32 precision of the plan
            np.testing.assert_allclose(out[acc][0], f64, rtol=0, atol=5e-6)
            np.testing.assert_allclose(out[acc][1], col64, rtol=2e-5, atol=1e-12)
            np.testing.assert_allclose(out[acc][2], qx64, rtol=1e-5)
            fl = np.zeros(N)
            L = cp.asnumpy(be.column_lse(Xd, lam, cp.asarray(fl)))
            mm = S.max(0)
            L64 = mm + np.log(np.exp(S - mm).sum(0))
            np.testing.assert_allclose(L, L64, rtol=0, atol=2e-5)
    assert np.abs(out[False][1] - col64).max() > 10 * np.abs(out[True][1] - col64).max()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_acc_and_fast_paths_agree_at_lam_25(dtype):
    """Both ACC variants, every pass family, agree where float32 t is accurate enough."""
    logp = random_logp(300, 3000, seed=3)
    for layout in ((8, 384, False), (8, 256, True), ("pipe", 8, 1, 4, 384, 2)):
        _, a, _ = solve_both(logp, dtype, n_iter=5, layout=layout, accurate=True)
        _, b, _ = solve_both(logp, dtype, n_iter=5, layout=layout, accurate=False)
        np.testing.assert_allclose(cp.asnumpy(a.g), cp.asnumpy(b.g), atol=1e-4, rtol=0)
        np.testing.assert_allclose(cp.asnumpy(a.f), cp.asnumpy(b.f), atol=1e-4, rtol=0)
        np.testing.assert_allclose(a.qx, b.qx, rtol=1e-4)


@skip_in_emulation
def test_acc_pass_cost(capsys):
    """ms per fused pass, accurate vs run-1 arithmetic (direct and pipelined), printed for
    the choice of default; asserts only that both run and the ACC pass is not > 2.5x."""
    N, K = 262_144, 3000
    rs = cp.random.RandomState(0)
    res = {}
    for dtype in ("float32", "bfloat16"):
        X = rs.standard_normal((N, K), dtype=cp.float32) * 3
        X = X - cp.log(cp.exp(X).sum(1, keepdims=True))
        if dtype == "bfloat16":  # round to nearest even, on the device
            b = X.view(cp.uint32)
            Xd = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(cp.uint16)
        else:
            Xd = X
        del X
        loga = cp.full(N, -math.log(N))
        logb = cp.full(K, -math.log(K))
        for layout in (None, ("pipe", 8, 1, 4, 384, 2)):
            for acc in (True, False):
                be = CUDABackend(dtype, layout_override=layout, accurate=acc)
                be.solve(Xd, 25.0, loga, logb, tol=0.0, max_iter=2, n_iter=2)  # compile, warm
                cp.cuda.Device().synchronize()
                t0, t1 = cp.cuda.Event(), cp.cuda.Event()
                t0.record()
                be.solve(Xd, 25.0, loga, logb, tol=0.0, max_iter=20, n_iter=20)
                t1.record()
                t1.synchronize()
                res[(dtype, str(layout), acc)] = cp.cuda.get_elapsed_time(t0, t1) / 20
        del Xd
    with capsys.disabled():
        print("\nACC pass cost, ms/iter at 262144 x 3000 (accurate | run-1 arithmetic):")
        for dtype in ("float32", "bfloat16"):
            for layout in (None, ("pipe", 8, 1, 4, 384, 2)):
                a, b = res[(dtype, str(layout), True)], res[(dtype, str(layout), False)]
                print(f"  {dtype:9s} {str(layout):28s} {a:7.3f} | {b:7.3f}  ratio {a / b:.2f}")
    for dtype in ("float32", "bfloat16"):
        for layout in (None, ("pipe", 8, 1, 4, 384, 2)):
            assert res[(dtype, str(layout), True)] <= 2.5 * res[(dtype, str(layout), False)]


# ---------------------------------------------------------------------------------------------
# Issue 4's features on device arrays: the same code path as the CPU, answered on the device.
def _host(x):
    return cp.asnumpy(x) if isinstance(x, cp.ndarray) else np.asarray(x)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_tie_counts_kernel_against_the_host(dtype):
    """tie_count_kernel: per row, the columns within tau (and 1e-12 rounding) of the row's
    best score, against the same count formed on the host in float64."""
    rng = np.random.default_rng(5)
    N, K = rows(300, 37), 45
    logp = np.round(random_logp(N, K, seed=5), 1)   # rounded: many exact ties
    logp[3] = -1.0                                    # a constant row: every column ties
    logp[4, ::3] = -np.inf                            # forbidden pairs never tie
    Xd, Xh = device_input(logp, dtype)
    g = rng.standard_normal(K) * 1e-3 * (rng.random(K) < 0.5)
    for tau in (0.0, 1e-3, 0.3):
        got = cp.asnumpy(CUDABackend(dtype).tie_counts(Xd, 25.0, cp.asarray(g), tau))
        S = 25.0 * Xh.astype(np.float64) + g
        best = S.max(axis=1)
        want = (S >= (best - tau - 1e-12 * (1 + np.abs(best)))[:, None]).sum(axis=1)
        np.testing.assert_array_equal(got, want)
    assert got[3] >= 1 and (got >= 2).any()


@pytest.mark.parametrize("n_iter", [3, None])
def test_tied_labels_follow_the_plan_as_on_the_cpu(n_iter):
    """A constant logP (every row a tie), duplicated rows and tied pairs: the device spreads
    them as the CPU does (_hard.tie_break).  After a fixed n_iter (exact ties) the labels are
    the CPU's; solved to a tolerance, ties are within the plan's accuracy and the order of
    clusters of equal mass to rounding may differ: the sizes are the CPU's."""
    rng = np.random.default_rng(6)
    K = 7
    const = np.zeros((rows(70, 28), K))
    dup = np.repeat(random_logp(3, K, seed=6), rows(30, 10), axis=0)
    pair = random_logp(rows(60, 21), K, seed=7)
    pair[:, 1] = pair[:, 0]                           # clusters 0 and 1 tie on every row
    for logp in (const, dup, pair):
        logp = logp[rng.permutation(logp.shape[0])]
        kw = dict(n_iter=n_iter) if n_iter else dict(tol=1e-8, max_iter=5000)
        ref = sinkhorn_ot.balanced_assign(logp, 25.0, **kw)
        gpu = sinkhorn_ot.balanced_assign(cp.asarray(logp), 25.0, **kw)
        lab = cp.asnumpy(gpu.labels)
        np.testing.assert_array_equal(cp.asnumpy(gpu.sizes), ref.sizes)
        if n_iter:
            np.testing.assert_array_equal(lab, ref.labels)
        assert (cp.asnumpy(gpu.sizes) > 0).all()  # the first argmax would leave them empty


def test_priors_unbalanced_hard_labels_and_rounding_on_the_device():
    N, K = rows(600, 120), 12
    logp = random_logp(N, K, seed=21).astype(np.float32)
    Xd = cp.asarray(logp)
    prior = np.random.default_rng(2).uniform(0.5, 1.5, K)
    prior /= prior.sum()
    # a non-uniform prior on the cluster sizes
    r, ref = (sinkhorn_ot.balanced_assign(X, 25.0, b=p, tol=1e-5)
              for X, p in ((Xd, cp.asarray(prior)), (logp, prior)))
    assert isinstance(r.labels, cp.ndarray) and r.converged and ref.converged
    np.testing.assert_allclose(_host(r.plan()).astype(np.float64).sum(0), prior, rtol=0,
                               atol=2e-5)
    np.testing.assert_allclose(r.cost, ref.cost, rtol=1e-3)
    # exact and greedy hard labels: sizes equal the targets
    targets = sinkhorn_ot.target_sizes(N, prior)
    for hard in ("exact", "greedy"):
        h = sinkhorn_ot.balanced_assign(Xd, 25.0, b=cp.asarray(prior), hard=hard)
        hr = sinkhorn_ot.balanced_assign(logp, 25.0, b=prior, hard=hard)
        assert isinstance(h.labels, cp.ndarray)
        np.testing.assert_array_equal(np.bincount(_host(h.labels), minlength=K), targets)
        rows_ = np.arange(N)
        got = float(logp[rows_, _host(h.labels)].sum())
        want = float(logp[rows_, hr.labels].sum())
        assert got >= want - 1e-3 * abs(want)  # as good an assignment as the CPU's
    # a size penalty (KL-relaxed column side)
    s, sr = (sinkhorn_ot.balanced_assign(X, 25.0, size_penalty=0.05, tol=1e-6)
             for X in (Xd, logp))
    assert s.converged and sr.converged
    np.testing.assert_allclose(_host(s.sizes), sr.sizes, atol=max(2, N // 200))
    # unbalanced sinkhorn on a cost matrix
    C = -logp.astype(np.float64)
    u, ur = (sinkhorn_ot.sinkhorn_unbalanced(M, reg=0.1, reg_m=(1.0, 0.5), tol=1e-8,
                                             max_iter=5000)
             for M in (cp.asarray(C), C))
    assert u.converged and ur.converged
    np.testing.assert_allclose(_host(u.f), ur.f, atol=1e-6)
    np.testing.assert_allclose(_host(u.g), ur.g, atol=1e-6)
    np.testing.assert_allclose(u.objective, ur.objective, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose([u.err_a, u.err_b], [ur.err_a, ur.err_b], atol=1e-9)
    # rounding a device plan onto the polytope
    Fd = sinkhorn_ot.round_to_marginals(r.plan(), b=cp.asarray(prior))
    assert isinstance(Fd, cp.ndarray)
    F = _host(Fd)
    np.testing.assert_allclose(F.sum(1), 1.0 / N, rtol=0, atol=1e-12)
    np.testing.assert_allclose(F.sum(0), prior, rtol=0, atol=1e-12)
    assert (F >= 0).all()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_codes_on_device_arrays(dtype):
    """codes() on CuPy arrays: the CPU's codes of the same values, with rows, probabilities
    and the dtype kept.  (bfloat16 reaches the device as a torch tensor only.)"""
    N, K = rows(300, 48), 40
    rng = np.random.default_rng(7)
    S = rng.standard_normal((N, K)) * 0.3
    Xd, ref = device_input(S, dtype)
    q = sinkhorn_ot.codes(Xd, eps=0.05, rows=cp.asarray([0, N - 1, 5]))
    assert isinstance(q, cp.ndarray) and q.dtype == np.dtype(dtype)
    want = sinkhorn_ot.codes(ref, eps=0.05, rows=[0, N - 1, 5])
    tol = 2e-6 if dtype == "float32" else 2e-3
    np.testing.assert_allclose(_host(q).astype(np.float64), want, rtol=0, atol=tol)
    P = np.exp(S) / np.exp(S).sum(1, keepdims=True)
    qp = sinkhorn_ot.codes(cp.asarray(P.astype(dtype)), eps=1.0, probabilities=True,
                           rows=slice(-8, None))
    wantp = sinkhorn_ot.codes(P.astype(dtype).astype(np.float64), eps=1.0,
                              probabilities=True, rows=slice(-8, None))
    np.testing.assert_allclose(_host(qp).astype(np.float64), wantp, rtol=0, atol=tol)
