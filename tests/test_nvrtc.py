"""CUDA kernels without a GPU: every template instantiation compiles with NVRTC, and a NumPy
mirror of the kernels' block / tile / partial-sum decomposition and of the device loop's state
machine reproduces the CPU core's solve."""
import math

import numpy as np
import pytest

from sinkhorn_ot import _cuda

DTYPES = ["float32", "float64", "float16", "bfloat16"]


def _nvrtc():
    try:
        from cupy.cuda import nvrtc

        nvrtc.getVersion()
        return nvrtc
    except Exception as exc:  # noqa: BLE001 - ImportError, missing libnvrtc
        pytest.skip(f"CuPy / NVRTC not importable: {exc}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_instance_compiles_with_nvrtc(dtype):
    _nvrtc()
    names = _cuda.instances(dtype)
    assert any("pass_kernel" in n for n in names)
    log = _cuda.compile_offline(names, arch="sm_90")
    assert "error" not in log.lower()


def test_sources_found_and_line_directives():
    src = _cuda.kernel_source()
    assert '#line 1 "sinkhorn_cuda.cu"' in src and "next_g" in src
    assert '#include "sinkhorn_math.h"' not in src


# ---------------------------------------------------------------------------------------------
# NumPy mirror of the device algorithm (float32 compute for a float32 input).
def _emulate_pass(X, alpha, g, loga, rho_a, nrb, width):
    N, K = X.shape
    f32 = np.float32
    t = (f32(alpha) * X.astype(f32) + g.astype(f32)[None, :]).astype(f32)
    ntiles = -(-K // width)
    # per-(tile, row) statistics, combined as MODE_APPLY does (single tile: same result)
    ms, ss = [], []
    for k in range(ntiles):
        tk = t[:, k * width:(k + 1) * width]
        m = tk.max(axis=1)
        msafe = np.where(np.isneginf(m), f32(0), m)
        ms.append(m)
        ss.append(np.exp(tk - msafe[:, None]).astype(f32).sum(axis=1, dtype=f32))
    ms, ss = np.array(ms), np.array(ss)
    M = ms.max(axis=0)
    S = np.where(np.isneginf(ms), 0.0, ss.astype(np.float64) *
                 np.exp(ms.astype(np.float64) - M[None, :].astype(np.float64))).sum(axis=0)
    labels = np.argmax(t, axis=1)
    f = rho_a * (loga - M.astype(np.float64) - np.log(S))
    logr = (rho_a * (loga - np.log(S)) + (1 - rho_a) * M).astype(f32)
    e = np.exp(t - M[:, None]).astype(f32)
    q = e * np.exp(logr)[:, None].astype(f32)
    d = (t - M[:, None] + logr[:, None]).astype(f32)
    colpart = np.zeros((nrb, K), f32)
    cmpart = np.full((nrb, K), -np.inf, f32)
    qx = 0.0
    for b in range(nrb):
        lo, hi = N * b // nrb, N * (b + 1) // nrb
        acc = np.zeros(K, f32)
        for i in range(lo, hi):  # sequential float32 accumulation per column, as a thread does
            acc += q[i]
        colpart[b] = acc
        cmpart[b] = d[lo:hi].max(axis=0) if hi > lo else -np.inf
        xb = np.clip(X[lo:hi].astype(f32), -np.finfo(f32).max, np.finfo(f32).max)
        qx += float((q[lo:hi] * xb).sum(dtype=np.float64))
    return f, labels, colpart, cmpart, qx


def _emulate_solve(X, alpha, loga, logb, *, tol, max_iter, n_iter, nrb, width):
    N, K = X.shape
    log_n = math.log(N)
    L = np.log(np.exp(alpha * X.astype(np.float64)).sum(axis=0))
    gslots = np.empty((3, K))
    gslots[0] = logb - L
    fslots = np.empty((2, N))
    labslots = np.empty((2, N), np.int64)
    st = dict(done=0, it=0, f_best=1, g_cur=0, g_best=0, best_err=0.0, best_qx=0.0)
    fixed = n_iter is not None
    iters = n_iter if fixed else max_iter
    for _ in range(iters):
        if st["done"]:
            continue  # launches after the stop return at once
        fw = 1 - st["f_best"]
        gc, gb = st["g_cur"], st["g_best"]
        gn = 0 if (gc != 0 and gb != 0) else (1 if (gc != 1 and gb != 1) else 2)
        f, lab, colpart, cmpart, qx = _emulate_pass(X, alpha, gslots[gc], loga, 1.0, nrb, width)
        fslots[fw], labslots[fw] = f, lab
        col = colpart.astype(np.float64).sum(axis=0)
        cmx = cmpart.astype(np.float64).max(axis=0)
        g = gslots[gc]
        err = float(np.abs(col - np.exp(logb)).sum())
        lse = np.where(col > 1e-25, np.log(np.maximum(col, 1e-300)) - g, cmx - g + log_n)
        gslots[gn] = logb - lse
        if st["it"] == 0 or err <= st["best_err"] or fixed:
            st.update(best_err=err, best_qx=qx, f_best=fw, g_best=gc)
        stop = (not fixed and err <= tol) or not math.isfinite(err)
        if not stop:
            st["g_cur"] = gn
        st["it"] += 1
        if stop:
            st["done"] = 1
    fb = st["f_best"]
    return fslots[fb], gslots[st["g_best"]], labslots[fb], st["it"], st["best_err"], \
        st["best_qx"]


@pytest.mark.parametrize("N,K,nrb,width,n_iter", [
    (300, 37, 7, 64, None),     # single tile, padding columns, uneven row blocks
    (64, 200, 5, 64, None),     # column-tiled (4 tiles), few rows
    (256, 120, 16, 128, 3),     # fixed iterations
])
def test_emulated_device_loop_matches_cpu(N, K, nrb, width, n_iter):
    from sinkhorn_ot._cpu import CPUBackend

    rng = np.random.default_rng(0)
    logits = 3 * rng.standard_normal((N, K))
    logP = (logits - np.log(np.exp(logits).sum(1, keepdims=True))).astype(np.float32)
    logP[1, 3] = -np.inf  # a forbidden pair
    loga, logb = np.full(N, -math.log(N)), np.full(K, -math.log(K))
    kw = dict(tol=1e-4, max_iter=500, n_iter=n_iter)
    ref = CPUBackend(1).solve(logP, 10.0, loga, logb, want_labels=True, **kw)
    f, g, lab, it, err, qx = _emulate_solve(logP, 10.0, loga, logb, nrb=nrb, width=width, **kw)
    assert it == ref.n_iter or abs(it - ref.n_iter) <= 2  # float32 rounding may shift the stop
    np.testing.assert_allclose(g - g.mean(), ref.g - ref.g.mean(), atol=2e-3)
    np.testing.assert_allclose(f + g.mean(), ref.f + ref.g.mean(), atol=2e-3)
    # labels: the same argmax up to near-ties (balanced plans with K > N make exact ties)
    t = 10.0 * logP.astype(np.float64) + ref.g
    rows = np.arange(N)
    np.testing.assert_array_less(t[rows, ref.labels] - t[rows, lab], 1e-4)
    np.testing.assert_allclose(qx, ref.qx, rtol=1e-3)
    if n_iter is None:
        assert err <= 1e-4


# ---------------------------------------------------------------------------------------------
# The pipelined pass (pass_pipe_kernel): the cp.async ring's slot / wait_group bookkeeping,
# replayed in Python.  A thread commits one group per step (empty past the end); before reading
# group grp it waits until at most S - 2 groups are pending, reads slot grp % S, then refills
# slot (grp + S - 1) % S, the one it read in the previous step.
def _emulate_ring(n_groups, S):
    slots = [None] * S
    pending = []                         # committed, not yet landed: (group, slot)
    for st in range(S - 1):              # prologue
        pending.append((st, st))
    read = []
    for grp in range(n_groups):
        while len(pending) > S - 2:      # cp.async.wait_group S - 2: oldest groups land
            g, sl = pending.pop(0)
            if g < n_groups:
                slots[sl] = g
        assert slots[grp % S] == grp     # the group read is the group landed in its slot
        read.append(slots[grp % S])
        ws = (grp + S - 1) % S
        assert ws != grp % S and all(sl != grp % S for _, sl in pending)
        pending.append((grp + S - 1, ws))
    return read


@pytest.mark.parametrize("S", [2, 3, 4, 5])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 20])
def test_pipe_ring_protocol(S, n):
    assert _emulate_ring(n, S) == list(range(n))


def test_pipe_instances_listed_and_layout(monkeypatch):
    for dtype in DTYPES:
        names = _cuda.instances(dtype)
        for cfg in _cuda.PIPE_CONFIGS[dtype]:
            assert _cuda._pipe_name(dtype, cfg) in names
            assert cfg[3] <= 512 and cfg[0] % _cuda._VEC[dtype] == 0
    # layout arithmetic without a device: register counts given, no smem opt-in call
    monkeypatch.setattr(_cuda, "_set_smem", lambda name, n: None)
    for dtype in DTYPES:
        for cfg in _cuda.PIPE_CONFIGS[dtype]:
            monkeypatch.setitem(_cuda._NUM_REGS, _cuda._pipe_name(dtype, cfg), 128)
    L = _cuda._Layout("float32", 1_281_167, 3000, 16, 132, ("pipe", 8, 1, 4, 384, 2))
    assert (L.pipe, L.bt, L.cpt, L.R, L.v, L.tiled) == ((8, 1, 4, 384, 2), 384, 8, 1, 4, False)
    assert L.smem == 4 * 384 * 8 * 4 and L.bps == 1 and L.nrb % 132 == 0
    assert L.bt * L.cpt >= 3000
    L = _cuda._Layout("bfloat16", 4096, 3000, 16, 132, ("pipe", 16, 1, 4, 192, 2))
    assert L.bt == 192 and L.smem == 4 * 192 * 16 * 2
    # misaligned or too wide: falls back to the direct pass (regs needed for its instance)
    for name in ("pass_kernel<float, 8, 2, 4, 0>", "pass_kernel<float, 8, 2, 1, 0>"):
        monkeypatch.setitem(_cuda._NUM_REGS, _cuda._NS + name, 126)
    L = _cuda._Layout("float32", 1000, 3000, 1, 132, ("pipe", 8, 1, 4, 384, 2))
    assert L.pipe is None and L.v == 1
    monkeypatch.setattr(_cuda, "DEFAULT_PASS", "pipe")
    L = _cuda._Layout("float32", 1000, 3000, 16, 132, None)
    assert L.pipe == _cuda.PIPE_CONFIGS["float32"][0]
    monkeypatch.setattr(_cuda, "DEFAULT_PASS", "direct")
    L = _cuda._Layout("float32", 1000, 3000, 16, 132, None)
    assert L.pipe is None and (L.cpt, L.bt) == (8, 384)
