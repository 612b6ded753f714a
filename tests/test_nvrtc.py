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


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_instance_compiles_with_nvrtc(dtype):
    _nvrtc()
    names = _cuda.instances(dtype)
    assert any("fused_pass_kernel" in n for n in names)
    log = _cuda.compile_offline(names, arch="sm_90")
    assert "error" not in log.lower()


def test_sources_found_and_line_directives():
    src = _cuda.kernel_source()
    assert '#line 1 "sinkhorn_cuda.cu"' in src and "next_g" in src
    assert '#include "sinkhorn_math.h"' not in src


# ---------------------------------------------------------------------------------------------
# float32 emulation of acc_shift (the ACC path of the pass and LSE kernels): every operation
# rounds to float32 as the device does.  fmaf(a, b, c) is emulated as float64 a * b (exact:
# 24 + 24 bits) + c rounded to float64, then to float32: exact where the kernel relies on it
# (the product remainder fmaf(ahi, x, -p) is representable), a double rounding elsewhere.
def _fmaf(a, b, c):
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


def _split(v):
    v = np.asarray(v, np.float64)
    hi = v.astype(np.float32)
    with np.errstate(invalid="ignore"):
        lo = np.where(np.isfinite(hi), (v - hi.astype(np.float64)), 0.0).astype(np.float32)
    return hi, lo


def _acc_shift(alpha, x, g, m):
    """d = (alpha x + g) - m in float32 arithmetic (alpha, g float64; x, m float32)."""
    f32 = np.float32
    ahi, alo = _split(alpha)
    ghi, glo = _split(g)
    x, m = np.asarray(x, f32), np.asarray(m, f32)
    with np.errstate(invalid="ignore", over="ignore"):
        p = (ahi * x).astype(f32)
        pe = _fmaf(ahi, x, -p)
        s = (p + ghi).astype(f32)
        z = (s - p).astype(f32)
        e = ((p - (s - z)) + (ghi - z)).astype(f32)
        lo = ((_fmaf(alo, x, glo) + pe) + e).astype(f32)
        d = ((s - m) + lo).astype(f32)
    d = np.where(np.isnan(d), f32(-np.inf), d)          # max.f32 d, -inf
    return np.minimum(d, f32(64.0))


def _plain_t(alpha, x, g):
    """The run-1 float t = fmaf(alpha, x, g) (also picks the row max m on the ACC path)."""
    return _fmaf(np.float32(alpha), np.asarray(x, np.float32), np.asarray(g, np.float32))


# NumPy mirror of the device algorithm (float32 compute for a float32 input).
def _emulate_pass(X, alpha, g, loga, rho_a, nrb, width, acc=False):
    N, K = X.shape
    f32 = np.float32
    with np.errstate(invalid="ignore"):
        t = _plain_t(alpha, X, g[None, :]) if acc else \
            (f32(alpha) * X.astype(f32) + g.astype(f32)[None, :]).astype(f32)
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
    if acc:
        # one tile: the sums above must use the accurate d too (the kernels' s)
        assert ntiles == 1
        Ms = np.where(np.isneginf(M), f32(0), M)
        dd = _acc_shift(alpha, X, g[None, :], Ms[:, None])
        e = np.exp(dd).astype(f32)
        S = e.sum(axis=1, dtype=f32).astype(np.float64)
        f = rho_a * (loga - M.astype(np.float64) - np.log(S))
        logr = (rho_a * (loga - np.log(S)) + (1 - rho_a) * M).astype(f32)
        d = (dd + logr[:, None]).astype(f32)
    else:
        e = np.exp(t - M[:, None]).astype(f32)
        d = (t - M[:, None] + logr[:, None]).astype(f32)
    q = e * np.exp(logr)[:, None].astype(f32)
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


def _emulate_solve(X, alpha, loga, logb, *, tol, max_iter, n_iter, nrb, width, acc=False):
    N, K = X.shape
    log_n = math.log(N)
    S64 = alpha * X.astype(np.float64)
    mx = S64.max(axis=0)
    L = mx + np.log(np.exp(S64 - mx).sum(axis=0))
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
        f, lab, colpart, cmpart, qx = _emulate_pass(X, alpha, gslots[gc], loga, 1.0, nrb, width,
                                                    acc)
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
# The pipelined pass (fused_pass_pipe_kernel): the cp.async ring's slot / wait_group bookkeeping,
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
    K, lay = _cuda.kernels, _cuda.layout
    for dtype in DTYPES:
        names = _cuda.instances(dtype)
        for cfg in _cuda.PIPE_CONFIGS[dtype]:
            assert K.fused_pass_pipe_name(dtype, cfg) in names
            assert cfg[3] <= 512 and cfg[0] % K.VEC[dtype] == 0
    # layout arithmetic without a device: register counts given, no smem opt-in call
    monkeypatch.setattr(K.KERNELS, "opt_in_smem", lambda name, n: None)
    regs = K.KERNELS._registers
    for dtype in DTYPES:
        for cfg in _cuda.PIPE_CONFIGS[dtype]:
            monkeypatch.setitem(regs, K.fused_pass_pipe_name(dtype, cfg), 128)
    L = lay.Layout("float32", 1_281_167, 3000, 16, 132, ("pipe", 8, 1, 4, 384, 2))
    assert (L.pipe, L.bt, L.cpt, L.R, L.v, L.tiled) == ((8, 1, 4, 384, 2), 384, 8, 1, 4, False)
    assert L.smem == 4 * 384 * 8 * 4 and L.bps == 1 and L.nrb % 132 == 0
    assert L.bt * L.cpt >= 3000
    L = lay.Layout("bfloat16", 4096, 3000, 16, 132, ("pipe", 16, 1, 4, 192, 2))
    assert L.bt == 192 and L.smem == 4 * 192 * 16 * 2
    # misaligned or too wide: falls back to the direct pass (regs needed for its instance)
    for acc in (True, False):
        for v in (4, 1):
            monkeypatch.setitem(regs, K.fused_pass_name("float32", 8, 2, v, 0, acc), 126)
        for cfg in _cuda.PIPE_CONFIGS["float32"]:
            monkeypatch.setitem(regs, K.fused_pass_pipe_name("float32", cfg, acc), 128)
    L = lay.Layout("float32", 1000, 3000, 1, 132, ("pipe", 8, 1, 4, 384, 2))
    assert L.pipe is None and L.v == 1
    monkeypatch.setattr(lay, "DEFAULT_PASS", "pipe")
    L = lay.Layout("float32", 1000, 3000, 16, 132, None)
    assert L.pipe == _cuda.PIPE_CONFIGS["float32"][0]
    monkeypatch.setattr(lay, "DEFAULT_PASS", "direct")
    L = lay.Layout("float32", 1000, 3000, 16, 132, None)
    assert L.pipe is None and (L.cpt, L.bt) == (8, 384)
    # the ACC flag reaches every kernel name of the layout (float64: one variant)
    for acc in (True, False):
        L = lay.Layout("float32", 1000, 3000, 16, 132, None, accurate=acc)
        flag = "true" if acc else "false"
        assert L.accurate == acc
        for lab in (True, False):  # pass kernels: <..., ACC, LAB>
            assert all(n.endswith(f", {flag}, {'true' if lab else 'false'}>")
                       for n in L.passes[lab])
        assert L.column_lse.endswith(f", {flag}>")
        L = lay.Layout("float32", 1000, 3000, 16, 132, ("pipe", 8, 1, 4, 384, 2),
                       accurate=acc)
        for lab in (True, False):
            assert L.passes[lab] == [K.fused_pass_pipe_name("float32", (8, 1, 4, 384, 2), acc,
                                                            lab)]
        assert L.column_lse.endswith(f", {flag}>")
        assert L.labels in _cuda.instances("float32")
    assert lay.ACCURATE  # the default for float32 / float16 / bfloat16
    names = _cuda.instances("float32")
    assert K.fused_pass_name("float32", 8, 2, 4, 0, True) in names
    assert K.fused_pass_name("float32", 8, 2, 4, 0, False) in names
    for n in _cuda.instances("float64"):  # ACC is false everywhere for float64
        args = n[n.find("<") + 1:-1].split(", ")
        if "pass" in n and "finish" not in n:
            assert args[-2] == "false", n
        elif "column_lse_kernel" in n:
            assert args[-1] == "false", n
    # the column-tiled passes always write labels: no LAB = false instance of them
    assert K.fused_pass_name("float32", 8, 2, 4, 1, True, False).endswith(", true>")


@pytest.mark.parametrize("name", ["State", "PassArgs", "FinishArgs"])
def test_argument_structs_match_the_compiler(name):
    """The NumPy dtype the launchers build from kernel_args.cuh has the compiler's field
    offsets and size.  NVRTC compiles a kernel that stores sizeof and every offset; they
    are constants, read back from the PTX (no device needed, and no __builtin_offsetof,
    which older NVRTC versions lack)."""
    import re

    _nvrtc()
    from cupy.cuda import nvrtc

    dt = _cuda.launch.struct_dtype(name)
    body = [f"o[0] = sizeof({name});"]
    body += [f"o[{k + 1}] = (unsigned long long)((const char*)&t.{f} - (const char*)&t);"
             for k, f in enumerate(dt.names)]
    src = (_cuda.kernels.read_source("kernel_args.cuh") +
           f"\nextern \"C\" __global__ void offsets(unsigned long long* o) {{\n"
           f"    {name} t;\n    " + "\n    ".join(body) + "\n}\n")
    prog = nvrtc.createProgram(src, "args.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, ["-std=c++17", "--gpu-architecture=compute_90"])
        except nvrtc.NVRTCError as exc:
            raise AssertionError(f"{exc}\n{nvrtc.getProgramLog(prog)}") from None
        ptx = nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    regs = dict(re.findall(r"mov\.u64\s+(%rd\d+),\s*(\d+);", ptx))
    stored = {int(off or 0) // 8: int(regs.get(val, val)) for off, val in re.findall(
        r"st\.global\.u64\s+\[%rd\d+(?:\+(\d+))?\],\s*(%rd\d+|\d+);", ptx)}
    want = {0: dt.itemsize, **{k + 1: dt.fields[f][1] for k, f in enumerate(dt.names)}}
    assert stored == want, (stored, want)
    assert dt.itemsize == {"State": 64, "PassArgs": 128, "FinishArgs": 120}[name]


# ---------------------------------------------------------------------------------------------
# The ACC path: d = (alpha x + g) - m from error-free float32 transformations, against float64.
def _dead_cluster(N, K, lam, seed=3):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((N, K))
    z[np.arange(N), np.arange(N) % K] += 2.0
    logP = z - np.log(np.exp(z).sum(1, keepdims=True))
    logP[:, 0] -= 1000.0
    return logP.astype(np.float32)


def _g64(X, lam):
    """The float64 solution's g (realistic magnitudes: the dead column's g is ~ +1000 lam)."""
    from sinkhorn_ot._cpu import CPUBackend

    N, K = X.shape
    r = CPUBackend(1).solve(X.astype(np.float64), lam, np.full(N, -math.log(N)),
                            np.full(K, -math.log(K)), tol=1e-3, max_iter=20000)
    return r.g


def _acc_cases():
    rng = np.random.default_rng(7)
    out = []
    # logP = -1e3 at lam = 1e4: |t| ~ 1e7, ulp(t) = 1 in float32
    x = (-1e3 + rng.uniform(-1e-2, 1e-2, (64, 5))).astype(np.float32)
    for lam in (1e4, 1e4 * (1 + 1e-9), 1 / 7e-5):      # float-exact and inexact alpha
        g = -lam * x.astype(np.float64).mean(0) + rng.uniform(-20, 20, 5) + math.pi
        out.append((f"logP=-1e3 lam={lam:.6g}", x, lam, g))
    for lam in (25.0, 1000.0):                          # a column 1000 below the rest
        x = _dead_cluster(60, 6, lam)
        out.append((f"dead column lam={lam:g}", x, lam, _g64(x, lam)))
    return out


@pytest.mark.parametrize("case", _acc_cases(), ids=lambda c: c[0])
def test_acc_shift_matches_float64(case):
    _, x, lam, g = case
    f32 = np.float32
    t = _plain_t(lam, x, g[None, :])
    m = t.max(axis=1)                                   # the kernels' approximate row max
    d = _acc_shift(lam, x, g[None, :], m[:, None])
    d64 = lam * x.astype(np.float64) + g[None, :] - m[:, None].astype(np.float64)
    scale = np.abs(lam * x.astype(np.float64)) + np.abs(g)[None, :]
    err = np.abs(d.astype(np.float64) - d64)
    # float32 relative precision of d (2 ulp), plus 2^-44 |t| for the float-pair inputs
    bound = 2.0 ** -23 * np.abs(d64) + 2.0 ** -44 * scale
    assert (err <= bound).all(), (err / bound).max()
    # the entries that carry mass (d > -30): relative error of exp(d) at float32 level
    live = d64 > -30
    assert live.any()
    np.testing.assert_allclose(np.exp(d[live].astype(np.float64)), np.exp(d64[live]),
                               rtol=1e-6)
    # the run-1 arithmetic is far off at these magnitudes (what ACC fixes)
    plain = (t - m[:, None]).astype(f32)
    if np.max(scale) > 1e6:
        assert np.abs(plain[live] - d64[live]).max() > 1e-2


def test_acc_shift_special_values():
    f32 = np.float32
    x = np.array([-np.inf, -1.0, 0.0, -np.inf, 3.0], f32)
    g = np.array([2.0, -np.inf, -np.inf, -np.inf, 1e7 + 0.3])
    d = _acc_shift(25.0, x, g, f32(1e7))
    assert np.isneginf(d[:4]).all() and np.isfinite(d[4])   # forbidden / padding: exp = 0
    d = _acc_shift(-10.0, np.array([np.inf], f32), np.array([0.0]), f32(0))  # cost +inf
    assert np.isneginf(d).all()
    assert _acc_shift(1e4, np.array([1e5], f32), np.array([0.0]), f32(0))[0] == 64.0  # clamp


def _plan_violation(X, lam, f, g):
    P = np.exp(lam * X.astype(np.float64) + f[:, None] + g[None, :])
    N, K = X.shape
    return P, np.abs(P.sum(1) - 1 / N).sum() + np.abs(P.sum(0) - 1 / K).sum()


@pytest.mark.parametrize("acc", [True, False])
def test_emulated_acc_single_column_lam_1e4(acc):
    """balanced_assign(np.full((5, 1), -1e3, np.float32), 1e4): the plan of the returned
    potentials must be 0.2 everywhere; the run-1 arithmetic reported err 0 for a wrong plan."""
    X = np.full((5, 1), -1e3, np.float32)
    loga, logb = np.full(5, -math.log(5)), np.zeros(1)
    f, g, lab, it, err, qx = _emulate_solve(X, 1e4, loga, logb, tol=1e-5, max_iter=50,
                                            n_iter=None, nrb=2, width=32, acc=acc)
    P, viol = _plan_violation(X, 1e4, f, g)
    if acc:
        np.testing.assert_allclose(P, 0.2, rtol=1e-5)
        assert abs(err - viol) <= 1e-6
    else:
        assert np.abs(P - 0.2).max() > 1e-3 or abs(err - viol) > 1e-6


@pytest.mark.parametrize("lam", [25.0, 1000.0])
def test_emulated_acc_dead_cluster(lam):
    N, K = 120, 6
    X = _dead_cluster(N, K, lam)
    loga, logb = np.full(N, -math.log(N)), np.full(K, -math.log(K))
    # plain Sinkhorn (no acceleration) converges slowly at lam = 1000: consistency only
    f, g, lab, it, err, qx = _emulate_solve(X, lam, loga, logb, tol=1e-5, max_iter=3000,
                                            n_iter=None, nrb=7, width=32, acc=True)
    P, viol = _plan_violation(X, lam, f, g)
    assert abs(err - viol) <= 1e-6, (err, viol)      # err is the returned plan's violation
    if lam == 25.0:
        assert err <= 1e-5
        np.testing.assert_allclose(P.sum(0), 1 / K, rtol=0, atol=1e-5)
    else:
        assert P[:, 0].sum() > 0.5 / K                 # the dead column holds its mass
