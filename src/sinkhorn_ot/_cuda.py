"""The CUDA backend: hand-written kernels (csrc/cuda/sinkhorn_cuda.cu) compiled at run time by
NVRTC through CuPy, and a device-side Sinkhorn loop.

Mirrors ``_cpu.CPUBackend`` (same primitives, same ``solve`` semantics as
``_solver.sinkhorn_loop``) on CuPy arrays.  The loop runs two launches per iteration (three when
a row is wider than one block: see the .cu file) and no host synchronisation except one 64-byte
read of the loop state every ``check_every`` iterations in tolerance mode (none at all inside
a fixed ``n_iter`` solve): the state, the best ``f``/``g``/labels and the stop flag live on the
device, and kernels launched after convergence return at once.

Kernels are compiled lazily, one instance at a time, on first use (NVRTC; CuPy caches the binary
on disk), so ``pip install`` needs no CUDA toolkit.
"""
from __future__ import annotations

import math
import os
import threading
import warnings

import numpy as np

from ._solver import Solution, plan_buffer

_NS = "sinkhorn_ot::cuda::"
_TYPE = {"float64": "double", "float32": "float", "float16": _NS + "f16_t",
         "bfloat16": _NS + "bf16_t"}
_COMPUTE = {"float64": "double", "float32": "float", "float16": "float", "bfloat16": "float"}
_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
_VEC = {k: 16 // v for k, v in _ITEMSIZE.items()}   # one 16-byte load
_CPTS = (1, 2, 4, 8, 16)                              # columns per thread (register tile)
_TILED_CPT, _TILED_BT = 8, 256                        # column-tiled pass: 2048 columns a tile
_MAX_SINGLE_TILE = 8192                               # BT <= 512 threads x CPT = 16
_OPTIONS = ("-std=c++17",)
# Pipelined pass (pass_pipe_kernel): (CPT, R, S, MAXT, MINB) per compute family.  CPT columns
# per thread, R rows per step, S cp.async stages in shared memory, at most MAXT threads, MINB
# blocks per SM asked of the register allocator.  Registers on sm_90 (ptxas -v, no spills):
# float32 (8,1,4,384,2) 78, (8,2,3,384,1) 143, (16,1,4,192,2) 146.  MAXT <= 512: the LSE
# and check kernels of the same layout are launched with the same threads.
PIPE_CONFIGS = {
    # run 2 on an H200, 1_281_167 x 3000 (ms/iter f32 | bf16): (16,1,4,192,2) 9.39 | 9.42,
    # (8,1,4,384,2) 10.88 | 10.39, (8,2,3,384,1) 12.67 | 12.90; direct pass 14.22 | 14.42
    "float32": [(16, 1, 4, 192, 2), (8, 1, 4, 384, 2), (8, 2, 3, 384, 1)],
    "float16": [(16, 1, 4, 192, 2), (8, 1, 4, 384, 2), (8, 2, 3, 384, 1)],
    "bfloat16": [(16, 1, 4, 192, 2), (8, 1, 4, 384, 2), (8, 2, 3, 384, 1)],
    "float64": [(8, 1, 3, 384, 1)],
}
# Which pass the automatic layout uses for single-tile rows of at least PIPE_MIN_K columns
# (16-byte aligned): "direct" (pass_kernel, the run-1 path) or "pipe" (the first config of
# PIPE_CONFIGS[dtype] whose thread count fits the row).  Environment override:
# SINKHORN_OT_CUDA_PASS=direct|pipe.  Chosen from benchmarks/gpu run 2 (see NOTES.md).
# Run 2 measured the pipelined pass 1.5x faster at ImageNet scale with the same results, but
# its own GPU tests have not run yet (run 2 stopped early on the buffer-cache bug, fixed since;
# no device was lent for run 3), so the default stays the direct pass that passed them.
DEFAULT_PASS = os.environ.get("SINKHORN_OT_CUDA_PASS", "direct")
# The pipelined pass is the default only where it was measured (float64 keeps the direct pass).
PIPE_DEFAULT_DTYPES = ("float32", "float16", "bfloat16")
PIPE_MIN_K = 1024
# Accurate shifted exponents for float32 / float16 / bfloat16 inputs (template flag ACC of the
# pass and LSE kernels, acc_shift in the .cu): t - m formed with error-free float32
# transformations, so err and the column sums the kernels measure are those of the plan the
# float64 potentials define, up to lam = 1e4 (|t| ~ 1e7).  False: the run-1 arithmetic
# (t = fmaf(alpha, x, g) in float32; ~13 fewer FP32 instructions an element).  Environment
# override: SINKHORN_OT_CUDA_ACCURATE=0.  Per backend: CUDABackend(..., accurate=...).
ACCURATE = os.environ.get("SINKHORN_OT_CUDA_ACCURATE", "1") != "0"
_SMEM_PER_SM = 227 * 1024      # usable shared memory per SM (sm_80 / sm_90: 164 / 227 KiB)
FAST_CHECK = True              # check(): fused finish kernel, one 32-byte read (False: run-1)
CHECK_EVERY = 10    # tolerance mode: read the loop state every 10 passes (the first after 5)
FIRST_CHECK = 5

# Loop state shared with the kernels (struct State in sinkhorn_cuda.cu): keep in sync.
_STATE_DTYPE = np.dtype([
    ("done", "<i4"), ("it", "<i4"), ("f_best", "<i4"), ("g_cur", "<i4"), ("g_best", "<i4"),
    ("counter", "<u4"), ("pad0", "<i4"), ("pad1", "<i4"), ("best_err", "<f8"),
    ("best_qx", "<f8"), ("last_err", "<f8"), ("pad2", "<f8")])
assert _STATE_DTYPE.itemsize == 64
_QX_AT = _STATE_DTYPE.fields["best_qx"][1]  # byte offset of State.best_qx


def rows_at_once(cpt: int, dtype: str = "float32") -> int:
    """Rows a thread holds in registers at once (R): R * CPT = 16 values (R <= 8); 8 values
    for float64 (twice the registers each)."""
    if dtype == "float64":
        return max(1, min(4, 8 // cpt))
    return max(1, min(8, 16 // cpt))


def _vectors(dtype):
    return (1, _VEC[dtype])


def _tile_configs(dtype):
    """(CPT, V) pairs instantiated for the register-tile kernels."""
    return [(c, v) for c in _CPTS for v in _vectors(dtype) if c % v == 0]


def _acc(dtype, accurate) -> str:
    """The ACC template argument: only float compute has two variants (float64 has one)."""
    return "true" if accurate and dtype != "float64" else "false"


def _accs(dtype):
    return ("false",) if dtype == "float64" else ("true", "false")


def _b(flag) -> str:
    return "true" if flag else "false"


def pass_name(dtype, cpt, R, v, mode, accurate=True, lab=True) -> str:
    """LAB (labels) only varies for the fused pass: the column-tiled passes always track the
    argmax (their first launch needs it)."""
    lab = lab or mode != 0
    return (f"{_NS}pass_kernel<{_TYPE[dtype]}, {cpt}, {R}, {v}, {mode}, "
            f"{_acc(dtype, accurate)}, {_b(lab)}>")


def label_name(dtype, cpt, v) -> str:
    return f"{_NS}label_kernel<{_TYPE[dtype]}, {cpt}, {rows_at_once(cpt, dtype)}, {v}>"


def lse_name(dtype, cpt, v, accurate=True) -> str:
    return f"{_NS}lse_kernel<{_TYPE[dtype]}, {cpt}, {v}, {_acc(dtype, accurate)}>"


def instances(dtype: str) -> list:
    """Every kernel template instantiation the backend may launch for one input dtype (both
    ACC variants for float compute)."""
    T, C = _TYPE[dtype], _COMPUTE[dtype]
    out = []
    for acc in _accs(dtype):
        a = acc == "true"
        for cpt, v in _tile_configs(dtype):
            for lab in (True, False):
                out.append(pass_name(dtype, cpt, rows_at_once(cpt, dtype), v, 0, a, lab))
            out.append(lse_name(dtype, cpt, v, a))
        for v in _vectors(dtype):
            if _TILED_CPT % v == 0:
                for mode in (1, 2):
                    out.append(pass_name(dtype, _TILED_CPT, rows_at_once(_TILED_CPT, dtype), v,
                                         mode, a))
        for cfg in PIPE_CONFIGS[dtype]:
            for lab in (True, False):
                out.append(_pipe_name(dtype, cfg, a, lab))
    for cpt, v in _tile_configs(dtype):
        out.append(f"{_NS}check_kernel<{T}, {cpt}, {v}>")
        out.append(label_name(dtype, cpt, v))
    out.append(f"{_NS}plan_kernel<{T}, {'double' if dtype == 'float64' else 'float'}>")
    out += [f"{_NS}finish_kernel<{C}>", f"{_NS}lse_finish_kernel<{C}>",
            f"{_NS}start_kernel", f"{_NS}column_update_kernel", f"{_NS}check_init_kernel",
            f"{_NS}check_finish_kernel"]
    return list(dict.fromkeys(out))


def _pipe_name(dtype, cfg, accurate=True, lab=True):
    cpt, R, S, maxt, minb = cfg
    return (f"{_NS}pass_pipe_kernel<{_TYPE[dtype]}, {cpt}, {R}, {S}, {maxt}, {minb}, "
            f"{_acc(dtype, accurate)}, {_b(lab)}>")


def _source_dirs():
    """Where the kernel sources are: inside the installed package (wheel), or the checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    pkg = os.path.join(here, "cuda")
    if os.path.isfile(os.path.join(pkg, "sinkhorn_cuda.cu")) and \
            os.path.isfile(os.path.join(pkg, "sinkhorn_math.h")):
        return pkg, pkg
    root = os.path.dirname(os.path.dirname(here))
    cu, common = os.path.join(root, "csrc", "cuda"), os.path.join(root, "csrc", "common")
    if os.path.isfile(os.path.join(cu, "sinkhorn_cuda.cu")):
        return cu, common
    raise FileNotFoundError("sinkhorn_ot: CUDA kernel sources not found (looked in "
                            f"{pkg} and {cu}); the installation is incomplete")


_SOURCE = None


def kernel_source() -> str:
    """The kernel file with the shared math header pasted in place of its #include (so NVRTC
    needs no include path), with #line directives so errors name the real files."""
    global _SOURCE
    if _SOURCE is None:
        cu_dir, common_dir = _source_dirs()
        with open(os.path.join(common_dir, "sinkhorn_math.h")) as fh:
            header = fh.read().replace("#pragma once", "")
        with open(os.path.join(cu_dir, "sinkhorn_cuda.cu")) as fh:
            cu = fh.read().splitlines()
        inc = '#include "sinkhorn_math.h"'
        k = next(i for i, line in enumerate(cu) if line.strip() == inc)
        _SOURCE = "\n".join(
            ['#line 1 "sinkhorn_math.h"', header,
             '#line 1 "sinkhorn_cuda.cu"'] + cu[:k] + [f'#line {k + 2} "sinkhorn_cuda.cu"']
            + cu[k + 1:]) + "\n"
    return _SOURCE


def compile_offline(names, arch: str = "sm_90", options=(), log=False):
    """Compile instantiations with NVRTC alone (no device needed: CI and tests).  Returns the
    NVRTC log (with ``--ptxas-options=-v`` in ``options``, the register counts)."""
    from cupy.cuda import nvrtc

    prog = nvrtc.createProgram(kernel_source(), "sinkhorn_cuda.cu", [], [])
    try:
        for n in names:
            nvrtc.addNameExpression(prog, n)
        opts = list(_OPTIONS) + [f"--gpu-architecture={arch}"] + list(options)
        try:
            nvrtc.compileProgram(prog, opts)
        except nvrtc.NVRTCError as exc:
            raise RuntimeError(f"NVRTC failed: {exc}\n{nvrtc.getProgramLog(prog)}") from None
        for n in names:
            nvrtc.getLoweredName(prog, n)  # raises if an instantiation is missing
        return nvrtc.getProgramLog(prog)
    finally:
        nvrtc.destroyProgram(prog)


# ------------------------------------------------------------------------------------------
_KERNELS: dict = {}


def _kernel(name: str):
    """One kernel instance, compiled on first use (per process; CuPy also caches on disk)."""
    k = _KERNELS.get(name)
    if k is None:
        import cupy

        mod = cupy.RawModule(code=kernel_source(), options=_OPTIONS, name_expressions=[name])
        k = mod.get_function(name)
        _KERNELS[name] = k
    return k


def _null():
    return np.uint64(0)  # a null pointer argument


def _ceil(a, b):
    return -(-a // b)


_SM_COUNT: dict = {}
_NUM_REGS: dict = {}
_LAYOUTS: dict = {}
_WORK: dict = {}        # cached work buffers (see CUDABackend._work)
_WORK_MAX = 32


def _sm_count(dev_id):
    n = _SM_COUNT.get(dev_id)
    if n is None:
        import cupy

        n = int(cupy.cuda.runtime.getDeviceProperties(dev_id)["multiProcessorCount"])
        _SM_COUNT[dev_id] = n
    return n


def _num_regs(name):
    r = _NUM_REGS.get(name)
    if r is None:
        try:
            r = max(int(_kernel(name).num_regs), 1)
        except Exception:  # noqa: BLE001 - attribute missing on some CuPy versions
            r = 0
        _NUM_REGS[name] = r
    return r


def _blocks_per_sm(name, bt, smem=0):
    """Resident blocks per SM from registers, threads and dynamic shared memory."""
    regs = _num_regs(name)
    if regs == 0:
        return 1
    per_warp = _ceil(regs * 32, 256) * 256
    by_regs = 65536 // (per_warp * _ceil(bt, 32))
    by_smem = _SMEM_PER_SM // (smem + 2048) if smem else 32
    return max(1, min(32, 2048 // bt, by_regs, by_smem))


def _set_smem(name, nbytes):
    """Opt in to more than 48 KiB of dynamic shared memory (once per kernel and size)."""
    key = ("smem", name)
    if nbytes > 40 * 1024 and _NUM_REGS.get(key, 0) < nbytes:  # 48 KiB includes static
        _kernel(name).max_dynamic_shared_size_bytes = int(nbytes)
        _NUM_REGS[key] = nbytes


def _pipe_fit(dtype, K, cfg):
    """Threads of a pipelined config for K columns (None: does not fit)."""
    cpt, R, S, maxt, minb = cfg
    bt = _ceil(_ceil(K, cpt), 32) * 32
    return bt if bt <= maxt else None


class _Layout:
    """How a pass covers an (N, K) matrix: block threads, columns per thread, vector width,
    column tiles, row blocks."""

    def __init__(self, dtype, N, K, ptr, n_sm, override=None, accurate=None):
        self.dtype, self.N, self.K = dtype, N, K
        self.accurate = ACCURATE if accurate is None else bool(accurate)
        self.pipe = None   # (CPT, R, S, MAXT, MINB) of the pipelined pass, or None
        self.smem = 0      # dynamic shared memory of the pass launch (bytes)
        vec = _VEC[dtype]
        aligned = ptr % 16 == 0 and (K * _ITEMSIZE[dtype]) % 16 == 0
        if override is not None and override[0] == "pipe":  # ("pipe", CPT, R, S, MAXT, MINB)
            pcfg = tuple(override[1:])
            if pcfg not in PIPE_CONFIGS[dtype]:
                raise ValueError(f"no pipelined instance {pcfg} for {dtype}")
            if not aligned or pcfg[0] % vec or _pipe_fit(dtype, K, pcfg) is None:
                override = None  # not applicable: the automatic direct layout
            else:
                self._init_pipe(dtype, N, K, n_sm, pcfg)
                return
        elif (override is None and DEFAULT_PASS == "pipe" and dtype in PIPE_DEFAULT_DTYPES
              and aligned and K >= PIPE_MIN_K):
            for pcfg in PIPE_CONFIGS[dtype]:
                if pcfg[0] % vec == 0 and _pipe_fit(dtype, K, pcfg) is not None:
                    self._init_pipe(dtype, N, K, n_sm, pcfg)
                    return
        cfg = None
        tiled = False
        if override is not None:  # (cpt, bt, tiled) for tuning and tests
            cpt, bt, tiled = override
            cfg = (cpt, bt)
        elif K <= _MAX_SINGLE_TILE:
            for cpt in _CPTS:
                bt = _ceil(_ceil(K, cpt), 32) * 32
                if bt <= (256 if cpt < 8 else 512):
                    cfg = (cpt, bt)
                    break
            # few wide rows: split columns so that enough blocks exist
            if cfg is not None and K > 2048 and _ceil(N, rows_at_once(cfg[0], dtype)) < n_sm:
                tiled = True
        if cfg is None or tiled:
            tiled = True
            cfg = cfg if override is not None else (_TILED_CPT, _TILED_BT)
        self.cpt, self.bt = cfg
        self.tiled = tiled
        self.R = rows_at_once(self.cpt, dtype)
        self.v = vec if (aligned and self.cpt % vec == 0) else 1
        self.width = self.bt * self.cpt
        self.ntiles = _ceil(K, self.width) if tiled else 1
        if not tiled and self.ntiles != 1:
            raise ValueError("layout does not cover the row")
        T = _TYPE[dtype]
        self.mode = 1 if tiled else 0
        acc = self.accurate
        # pass launches with (True) and without (False) labels; the column-tiled passes always
        # write labels, so they need no label kernel
        self.passes = {lab: [pass_name(dtype, self.cpt, self.R, self.v, m, acc, lab)
                             for m in ((1, 2) if tiled else (0,))] for lab in (True, False)}
        self.label_name = None if tiled else label_name(dtype, self.cpt, self.v)
        self.lse_name = lse_name(dtype, self.cpt, self.v, acc)
        self.check_name = f"{_NS}check_kernel<{T}, {self.cpt}, {self.v}>"
        bps = _blocks_per_sm(self.passes[True][-1], self.bt)
        self._rows(N, n_sm, bps)

    def _rows(self, N, n_sm, bps):
        self.bps = bps
        slots = n_sm * bps
        groups = _ceil(N, self.R)
        if self.tiled:
            nrb = max(_ceil(slots, self.ntiles), _ceil(N, 1024))
        else:  # at most ~1024 rows a block (float32 partial sums), a whole number of waves
            nrb = slots * max(1, _ceil(N, slots * 1024))
        self.nrb = int(max(1, min(groups, nrb)))
        self.grid = (self.nrb, self.ntiles)

    def _init_pipe(self, dtype, N, K, n_sm, pcfg):
        cpt, R, S, maxt, minb = pcfg
        T = _TYPE[dtype]
        self.pipe = pcfg
        self.cpt, self.R, self.v = cpt, R, _VEC[dtype]
        self.bt = _pipe_fit(dtype, K, pcfg)
        self.tiled, self.ntiles, self.mode = False, 1, 0
        self.width = self.bt * cpt
        self.smem = S * R * self.width * _ITEMSIZE[dtype]
        self.passes = {lab: [_pipe_name(dtype, pcfg, self.accurate, lab)] for lab in (True, False)}
        # LSE, check and labels use the direct kernels (same column layout, vector loads)
        self.label_name = label_name(dtype, cpt, self.v)
        self.lse_name = lse_name(dtype, cpt, self.v, self.accurate)
        self.check_name = f"{_NS}check_kernel<{T}, {cpt}, {self.v}>"
        for names in self.passes.values():
            _set_smem(names[0], self.smem)
        self._rows(N, n_sm, _blocks_per_sm(self.passes[True][0], self.bt, self.smem))

    def __repr__(self):
        p = f", pipe={self.pipe}, smem={self.smem}, bps={self.bps}" if self.pipe else \
            f", bps={self.bps}"
        return (f"_Layout(cpt={self.cpt}, bt={self.bt}, R={self.R}, v={self.v}, "
                f"tiled={self.tiled}, ntiles={self.ntiles}, nrb={self.nrb}, "
                f"accurate={self.accurate}{p})")


class CUDABackend:
    """Backend primitives and the device-side loop on CuPy arrays (see module docstring)."""

    device = "cuda"
    # A pass with labels pays for the argmax (comparisons, a wider block reduction): the
    # generic loop asks labels() once, at the best g, instead (_solver.sinkhorn_loop).
    labels_per_pass = False

    def __init__(self, dtype: str, stream=None, layout_override=None, accurate=None):
        import cupy

        self.xp = cupy
        if dtype not in _TYPE:
            raise TypeError(f"sinkhorn_ot: unsupported dtype {dtype} for the CUDA backend")
        try:
            n_dev = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # noqa: BLE001 - CUDARuntimeError and driver errors
            raise RuntimeError(
                "sinkhorn_ot: the input lives on a CUDA device (CuPy), but no usable CUDA "
                f"device/driver was found ({exc}); move the data to NumPy for the CPU core"
            ) from exc
        if n_dev < 1:
            raise RuntimeError("sinkhorn_ot: the input is a CuPy array but no CUDA device "
                               "is available")
        self.dtype = dtype
        self.stream = stream
        self.layout_override = layout_override
        self.accurate = ACCURATE if accurate is None else bool(accurate)
        self._ctype = np.float64 if _COMPUTE[dtype] == "double" else np.float32

    # -- helpers ------------------------------------------------------------------------
    def _ctx(self, X):
        import contextlib

        if self.stream is None and X.data.device_id == self.xp.cuda.runtime.getDevice():
            return _NULLCTX  # already on X's device, current stream: nothing to enter
        stack = contextlib.ExitStack()
        stack.enter_context(X.device)
        if self.stream is not None:
            stack.enter_context(self.stream)
        return stack

    def _f64(self, a):
        return self.xp.ascontiguousarray(a, dtype=self.xp.float64)

    def _matrix(self, X):
        if X.ndim != 2:
            raise ValueError("X must be 2-d")
        if X.shape[1] >= 2 ** 31 - 2 ** 14:
            raise ValueError("sinkhorn_ot: the CUDA backend needs fewer than 2**31 - 2**14 "
                             "columns")
        return self.xp.ascontiguousarray(X)

    def layout(self, X):
        N, K = X.shape
        dev = X.data.device_id
        ptr = X.data.ptr
        aligned = ptr % 16 == 0
        ov = None if self.layout_override is None else tuple(self.layout_override)
        key = (self.dtype, N, K, aligned, ov, dev, DEFAULT_PASS, self.accurate)
        L = _LAYOUTS.get(key)
        if L is None:
            if len(_LAYOUTS) > 256:
                _LAYOUTS.clear()
            L = _Layout(self.dtype, N, K, 16 if aligned else 1, _sm_count(dev), ov,
                        accurate=self.accurate)
            _LAYOUTS[key] = L
        return L

    def _work(self, kind, make, *key):
        """A work buffer cached per (device, stream, host thread, kind, key): kernels on one
        stream run in order, so a later call may reuse it.  Never returned to the caller."""
        cp = self.xp
        k = (cp.cuda.runtime.getDevice(), cp.cuda.get_current_stream().ptr,
             threading.get_ident(), kind) + key
        buf = _WORK.get(k)
        if buf is None:
            if len(_WORK) >= _WORK_MAX:
                _WORK.clear()
            buf = make()
            _WORK[k] = buf
        return buf

    def _state(self):
        """The loop state (cached; every user initialises it with start_kernel or
        lse_finish_kernel first, on the same stream)."""
        return self._work("state", lambda: self.xp.zeros(_STATE_DTYPE.itemsize,
                                                         dtype=self.xp.uint8))

    @staticmethod
    def _read_state(state):
        return np.frombuffer(state.get().tobytes(), dtype=_STATE_DTYPE)[0]

    def _start(self, K, state, g0=None, g_out=None):
        _kernel(f"{_NS}start_kernel")((max(1, _ceil(K, 256)),), (256,),
                                      (_null() if g0 is None else g0,
                                       _null() if g_out is None else g_out,
                                       np.int64(K), state))

    def _lse(self, X, L, alpha, f, buf, L_out=None, logb=None, rho_b=1.0, g_out=None,
             state=None):
        N, K = X.shape
        Mp, Zp = buf
        _kernel(L.lse_name)(L.grid, (L.bt,), (X, np.int64(N), np.int64(K), np.float64(alpha),
                                              _null() if f is None else f, Mp, Zp))
        C = _COMPUTE[self.dtype]
        _kernel(f"{_NS}lse_finish_kernel<{C}>")(
            (_ceil(K, 32),), (256,),
            (Mp, Zp, np.int32(L.nrb), np.int64(K), _null() if L_out is None else L_out,
             _null() if logb is None else logb, np.float64(rho_b),
             _null() if g_out is None else g_out, _null() if state is None else state))

    def _buffers(self, L):
        # the compute type is part of the key: float32 partials are half the size of float64
        return self._work("bufs", lambda: self._new_buffers(L), np.dtype(self._ctype).name,
                          L.nrb, L.K, L.N if L.tiled else -1, L.ntiles)

    def _new_buffers(self, L):
        xp = self.xp
        colpart = xp.empty((L.nrb, L.K), dtype=self._ctype)
        cmpart = xp.empty((L.nrb, L.K), dtype=self._ctype)
        qxpart = xp.empty(L.nrb * L.ntiles, dtype=xp.float64)
        if L.tiled:
            st = (xp.empty((L.ntiles, L.N), dtype=self._ctype),
                  xp.empty((L.ntiles, L.N), dtype=self._ctype),
                  xp.empty((L.ntiles, L.N), dtype=xp.int32))
        else:
            st = (_null(), _null(), _null())
        errpart = xp.empty(_ceil(L.K, 32), dtype=xp.float64)
        return colpart, cmpart, qxpart, st, errpart

    def _pass(self, X, L, alpha, gslots, loga, rho_a, fslots, labslots, bufs, state):
        """One pass; labels (and the argmax work) only when labslots is given."""
        N, K = X.shape
        colpart, cmpart, qxpart, st, _ = bufs
        args = (X, np.int64(N), np.int64(K), np.float64(alpha), gslots, loga,
                np.float64(rho_a), fslots, _null() if labslots is None else labslots,
                colpart, cmpart, qxpart, st[0], st[1], st[2], state)
        for name in L.passes[labslots is not None]:
            _kernel(name)(L.grid, (L.bt,), args, shared_mem=L.smem)

    def _labels(self, X, L, alpha, g, out):
        N, K = X.shape
        _kernel(L.label_name)((L.nrb,), (L.bt,), (X, np.int64(N), np.int64(K),
                                                  np.float64(alpha), g, out))

    def _finish(self, L, gslots, logb, log_n, rho_b, tol, fixed, bufs, state, col_out=None,
                colmax_out=None):
        colpart, cmpart, qxpart, _, errpart = bufs
        C = _COMPUTE[self.dtype]
        _kernel(f"{_NS}finish_kernel<{C}>")(
            (_ceil(L.K, 32),), (256,),
            (colpart, cmpart, np.int32(L.nrb), np.int64(L.K), qxpart,
             np.int32(L.nrb * L.ntiles), gslots, logb, np.float64(log_n), np.float64(rho_b),
             np.float64(tol), np.int32(1 if fixed else 0), errpart,
             _null() if col_out is None else col_out,
             _null() if colmax_out is None else colmax_out, state))

    # -- backend primitives -------------------------------------------------------------
    def check(self, X, forbidden: float, alpha=None) -> dict:  # alpha: see CPUBackend
        if not FAST_CHECK:
            return self._check_legacy(X, forbidden)
        xp = self.xp
        X = self._matrix(X)
        N, K = X.shape
        with self._ctx(X):
            L = self.layout(X)
            flags = xp.zeros(N + K, dtype=xp.uint8)   # row_ok, col_ok
            res = xp.empty(4, dtype=xp.uint64)
            _kernel(f"{_NS}check_init_kernel")((1,), (32,), (res,))
            _kernel(L.check_name)(L.grid, (L.bt,), (X, np.int64(N), np.int64(K),
                                                    np.float64(forbidden), res[0:1],
                                                    flags[:N], flags[N:], res[3:4]))
            n_sm = _sm_count(X.data.device_id)
            grid = int(max(1, min(_ceil(max(N, K), 256), n_sm * 8)))
            _kernel(f"{_NS}check_finish_kernel")((grid,), (256,), (
                flags[:N], np.int64(N), flags[N:], np.int64(K), res))
            pack = res.get()
        none = np.iinfo(np.uint64).max
        return dict(first_invalid=-1 if pack[0] == none else int(pack[0]),
                    first_empty_row=-1 if pack[1] == none else int(pack[1]),
                    first_empty_col=-1 if pack[2] == none else int(pack[2]),
                    max_abs=float(pack[3:4].view(np.float64)[0]))

    def _check_legacy(self, X, forbidden: float) -> dict:
        xp = self.xp
        X = self._matrix(X)
        N, K = X.shape
        with self._ctx(X):
            L = self.layout(X)
            first = xp.full(1, np.iinfo(np.uint64).max, dtype=xp.uint64)
            row_ok = xp.zeros(N, dtype=xp.uint8)
            col_ok = xp.zeros(K, dtype=xp.uint8)
            mbits = xp.zeros(1, dtype=xp.uint64)
            _kernel(L.check_name)(L.grid, (L.bt,), (X, np.int64(N), np.int64(K),
                                                    np.float64(forbidden), first, row_ok,
                                                    col_ok, mbits))
            er = xp.argmin(row_ok)
            ec = xp.argmin(col_ok)
            pack = xp.stack([first.view(xp.int64)[0], er.astype(xp.int64),
                             row_ok[er].astype(xp.int64), ec.astype(xp.int64),
                             col_ok[ec].astype(xp.int64), mbits.view(xp.int64)[0]]).get()
        return dict(first_invalid=int(pack[0]),
                    first_empty_row=int(pack[1]) if pack[2] == 0 else -1,
                    first_empty_col=int(pack[3]) if pack[4] == 0 else -1,
                    max_abs=float(np.array([pack[5]], dtype=np.int64).view(np.float64)[0]))

    def column_lse(self, X, alpha, f):
        xp = self.xp
        X = self._matrix(X)
        N, K = X.shape
        with self._ctx(X):
            L = self.layout(X)
            f = None if f is None else self._f64(f)
            out = xp.empty(K, dtype=xp.float64)
            bufs = self._buffers(L)
            self._lse(X, L, alpha, f, (bufs[0], bufs[1]), L_out=out)
        return out

    def fused_pass(self, X, alpha, g, loga, rho_a, f_out, labels_out, plan=None):
        """One pass at ``g``: writes ``f_out`` (and ``labels_out``; ``plan`` as
        :meth:`write_plan`, by one more read), returns ``(col, colmax, qx)`` (``qx`` a
        device scalar)."""
        xp = self.xp
        X = self._matrix(X)
        N, K = X.shape
        if f_out.dtype != xp.float64 or f_out.shape != (N,) or not f_out.flags.c_contiguous:
            raise ValueError("f_out must be a contiguous float64 array of shape (N,)")
        if labels_out is not None and (labels_out.dtype != xp.int64 or
                                       labels_out.shape != (N,) or
                                       not labels_out.flags.c_contiguous):
            raise ValueError("labels_out must be a contiguous int64 array of shape (N,)")
        with self._ctx(X):
            L = self.layout(X)
            gslots = self._work("gslots", lambda: xp.empty((3, K), dtype=xp.float64), K)
            zeros = self._work("zeros", lambda: xp.zeros(K, dtype=xp.float64), K)
            loga = self._f64(loga)
            state = self._state()
            self._start(K, state, g0=self._f64(g), g_out=gslots[0])  # g -> slot 0, fresh state
            bufs = self._buffers(L)
            out = xp.empty((2, K), dtype=xp.float64)  # returned: never a cached buffer
            col, colmax = out[0], out[1]
            self._pass(X, L, alpha, gslots, loga, rho_a, f_out, labels_out, bufs, state)
            self._finish(L, gslots, zeros, 0.0, 1.0, 0.0, True, bufs, state, col,
                         colmax)
            # sum Q X stays on the device (a copy: the state buffer is reused); the caller
            # reads it when it needs it, with other scalars
            qx = state[_QX_AT:_QX_AT + 8].view(xp.float64).copy()[0]
        if plan is not None:
            self.write_plan(X, alpha, f_out, g, plan)
        return col, colmax, qx

    def write_plan(self, X, alpha, f, g, plan):
        """``plan = (out, rows, scale)``: out[...] = scale * plan rows (rows a slice or an
        index array)."""
        out, rows, scale = plan
        Q = self.plan(X, alpha, f, g)
        out[...] = (Q if rows is None else Q[rows]) * scale

    def labels(self, X, alpha, g, out):
        """Write the first argmax over y of ``alpha X_iy + g_y`` (as a pass forms it) into
        ``out`` (int64, (N,)) and return it: one read of X, no exponentials."""
        xp = self.xp
        X = self._matrix(X)
        with self._ctx(X):
            L = self.layout(X)
            g = self._f64(g)
            if L.label_name is None:  # column-tiled rows: a pass with labels
                self.fused_pass(X, alpha, g, xp.zeros(X.shape[0]), 1.0,
                                xp.empty(X.shape[0]), out)
            else:
                self._labels(X, L, alpha, g, out)
        return out

    def column_update(self, g, logb, col, colmax, log_n_rows, rho_b):
        xp = self.xp
        g, logb, col, colmax = (self._f64(a) for a in (g, logb, col, colmax))
        K = g.shape[0]
        with g.device:
            ctx = self.stream if self.stream is not None else _nullcontext()
            with ctx:
                g_next = xp.empty(K, dtype=xp.float64)
                terms = xp.empty(K, dtype=xp.float64)
                _kernel(f"{_NS}column_update_kernel")(
                    (max(1, _ceil(K, 256)),), (256,),
                    (g, logb, col, colmax, np.int64(K), np.float64(log_n_rows),
                     np.float64(rho_b), g_next, terms))
                err = terms.sum()  # a device scalar: read by the caller with others
        return g_next, err

    def plan(self, X, alpha, f, g):
        """exp(alpha X + f_i + g_y) in float64 arithmetic, stored as float32 (float64 for a
        float64 input)."""
        xp = self.xp
        X = self._matrix(X)
        N, K = X.shape
        with self._ctx(X):
            f, g = self._f64(f), self._f64(g)
            out_t = xp.float64 if self.dtype == "float64" else xp.float32
            out = xp.empty((N, K), dtype=out_t)
            n_sm = _sm_count(X.device.id)
            grid = int(max(1, min(_ceil(N * K, 256), n_sm * 32)))
            name = f"{_NS}plan_kernel<{_TYPE[self.dtype]}, " \
                   f"{'double' if self.dtype == 'float64' else 'float'}>"
            _kernel(name)((grid,), (256,), (X, np.int64(N), np.int64(K), np.float64(alpha),
                                            f, g, out))
        return out

    # -- the device loop ----------------------------------------------------------------
    def solve(self, X, alpha, loga, logb, *, rho_a=1.0, rho_b=1.0, g0=None, L0=None, tol,
              max_iter, n_iter=None, want_labels=False, check_every=None, plan=None):
        """Same semantics as ``_solver.sinkhorn_loop`` (best pass returned, ``n_iter`` =
        passes run, a fixed ``n_iter`` ignores ``tol``), run as a device loop.  ``L0`` is
        not used (the device computes the column LSE itself); ``plan`` is written by the
        plan kernel after the loop (one more read of X)."""
        xp = self.xp
        X = self._matrix(X)
        N, K = X.shape
        check_every = CHECK_EVERY if check_every is None else max(1, int(check_every))
        with self._ctx(X):
            L = self.layout(X)
            loga, logb = self._f64(loga), self._f64(logb)
            # gslots is cached (the result's g is a copy); f and labels are returned as views
            # of fslots / labslots, so those are fresh every call.
            gslots = self._work("gslots", lambda: xp.empty((3, K), dtype=xp.float64), K)
            fslots = xp.empty((2, N), dtype=xp.float64)
            labslots = xp.empty((2, N), dtype=xp.int64) if want_labels else None
            state = self._state()
            bufs = self._buffers(L)
            if g0 is None:  # g = rho_b (logb - LSE_i alpha X_iy): SwAV's first normalisation
                self._lse(X, L, alpha, None, (bufs[0], bufs[1]), logb=logb, rho_b=rho_b,
                          g_out=gslots[0], state=state)
            else:
                self._start(K, state, g0=self._f64(g0), g_out=gslots[0])
            log_n = math.log(max(N, 1))
            fixed = n_iter is not None
            iters = int(n_iter) if fixed else int(max_iter)
            # Labels: the column-tiled passes write them every pass; otherwise the passes skip
            # the argmax, except the last one of a fixed n_iter (always the best), and a
            # tolerance solve writes the best pass's labels with label_kernel at the end.
            every = L.label_name is None
            launched, chunk = 0, min(FIRST_CHECK, check_every)
            while launched < iters:
                c = min(chunk, iters - launched)
                for k in range(c):
                    last = fixed and launched + k == iters - 1
                    lab = labslots if (every or last) else None
                    self._pass(X, L, alpha, gslots, loga, rho_a, fslots, lab, bufs, state)
                    self._finish(L, gslots, logb, log_n, rho_b, tol, fixed, bufs, state)
                launched += c
                chunk = check_every
                if not fixed and launched < iters and self._read_state(state)["done"]:
                    break
            st = self._read_state(state)
            if want_labels and not every and not fixed:
                self._labels(X, L, alpha, gslots[int(st["g_best"])],
                             labslots[int(st["f_best"])])
        err = float(st["best_err"])
        if not math.isfinite(err):
            raise FloatingPointError(
                "sinkhorn_ot: the column error became non-finite; please report this input")
        converged = err <= tol
        if not fixed and not converged:
            warnings.warn(f"Sinkhorn did not converge in {max_iter} iterations: err = "
                          f"{err:.3e} > tol = {tol:.1e} (the best iterate is returned, "
                          "converged=False)", UserWarning, stacklevel=2)
        fb, gb = int(st["f_best"]), int(st["g_best"])
        if plan is not None:
            plan = plan_buffer(self.xp, X, plan)
            self.write_plan(X, alpha, fslots[fb], gslots[gb], plan)
        return Solution(fslots[fb], gslots[gb].copy(),
                        labslots[fb] if want_labels else None, int(st["it"]), err,
                        float(st["best_qx"]), converged, None if plan is None else plan[0])


class _nullcontext:  # noqa: N801
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_NULLCTX = _nullcontext()
