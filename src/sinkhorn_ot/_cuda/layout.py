"""How a pass covers an (N, K) matrix (block threads, columns per thread, vector width,
column tiles, row blocks), and the occupancy arithmetic it is chosen by."""
from __future__ import annotations

import os

from .kernels import (CPTS, ITEMSIZE, KERNELS, PIPE_CONFIGS, TILED_BT, TILED_CPT, VEC,
                      ceil_div, check_matrix_name, column_lse_name, fused_pass_name,
                      fused_pass_pipe_name, labels_name, rows_at_once)

MAX_SINGLE_TILE = 8192            # BT <= 512 threads x CPT = 16
SMEM_PER_SM = 227 * 1024          # usable shared memory per SM (sm_80 / sm_90: 164 / 227 KiB)
# Which pass the automatic layout uses for single-tile rows of at least PIPE_MIN_K columns
# (16-byte aligned): "direct" (fused_pass_kernel: rows loaded into registers as their turn
# comes) or "pipe" (the first config of PIPE_CONFIGS[dtype] whose thread count fits the row).
# The pipelined pass measured 1.5x faster at ImageNet scale (benchmarks/gpu/NOTES.md), but the
# GPU suite has not yet run it on a device, so the default stays the direct pass that passed
# it there.  Environment override: SINKHORN_OT_CUDA_PASS=direct|pipe.
DEFAULT_PASS = os.environ.get("SINKHORN_OT_CUDA_PASS", "direct")
# The pipelined pass is chosen only where it was measured (float64 keeps the direct pass).
PIPE_DEFAULT_DTYPES = ("float32", "float16", "bfloat16")
PIPE_MIN_K = 1024
# Accurate shifted exponents for float32 / float16 / bfloat16 inputs (template flag ACC of the
# pass and LSE kernels, acc_shift in the .cu): t - m formed with error-free float32
# transformations, so err and the column sums the kernels measure are those of the plan the
# float64 potentials define, up to lam = 1e4 (|t| ~ 1e7).  False: t = fmaf(alpha, x, g) in
# float32 (~13 fewer FP32 instructions an element, err off by up to ~lam * 6e-8 * |x|).
# Environment override: SINKHORN_OT_CUDA_ACCURATE=0.  Per backend: CUDABackend(accurate=...).
ACCURATE = os.environ.get("SINKHORN_OT_CUDA_ACCURATE", "1") != "0"


def blocks_per_sm(name, bt, smem=0):
    """Resident blocks per SM from registers, threads and dynamic shared memory."""
    regs = KERNELS.registers(name)
    if regs == 0:
        return 1
    per_warp = ceil_div(regs * 32, 256) * 256
    by_regs = 65536 // (per_warp * ceil_div(bt, 32))
    by_smem = SMEM_PER_SM // (smem + 2048) if smem else 32
    return max(1, min(32, 2048 // bt, by_regs, by_smem))


def pipe_fit(K, cfg):
    """Threads of a pipelined config for K columns (None: does not fit)."""
    cpt, R, S, maxt, minb = cfg
    bt = ceil_div(ceil_div(K, cpt), 32) * 32
    return bt if bt <= maxt else None


def _direct_config(dtype, N, K, n_sm):
    """(cpt, bt, tiled) of the automatic direct layout."""
    if K <= MAX_SINGLE_TILE:
        for cpt in CPTS:
            bt = ceil_div(ceil_div(K, cpt), 32) * 32
            if bt <= (256 if cpt < 8 else 512):
                # few wide rows: split the columns so that enough blocks exist
                tiled = K > 2048 and ceil_div(N, rows_at_once(cpt, dtype)) < n_sm
                return (TILED_CPT, TILED_BT, True) if tiled else (cpt, bt, False)
    return TILED_CPT, TILED_BT, True


class Layout:
    """The launch configuration of every kernel for one (dtype, N, K, alignment) on one
    device.  ``override``: ``(cpt, bt, tiled)`` for a direct layout, or
    ``("pipe", CPT, R, S, MAXT, MINB)`` for a pipelined one (tuning and tests)."""

    def __init__(self, dtype, N, K, ptr, n_sm, override=None, accurate=None):
        self.dtype, self.N, self.K = dtype, N, K
        self.accurate = ACCURATE if accurate is None else bool(accurate)
        self.pipe = None   # (CPT, R, S, MAXT, MINB) of the pipelined pass, or None
        self.smem = 0      # dynamic shared memory of the pass launch (bytes)
        vec = VEC[dtype]
        aligned = ptr % 16 == 0 and (K * ITEMSIZE[dtype]) % 16 == 0
        pcfg = self._pipe_choice(dtype, K, vec, aligned, override)
        if pcfg is not None:
            self._init_pipe(dtype, N, K, n_sm, pcfg)
            return
        if override is not None and override[0] == "pipe":
            override = None  # not applicable: the automatic direct layout
        cpt, bt, tiled = override if override is not None else _direct_config(dtype, N, K,
                                                                               n_sm)
        self.cpt, self.bt, self.tiled = cpt, bt, tiled
        self.R = rows_at_once(cpt, dtype)
        self.v = vec if (aligned and cpt % vec == 0) else 1
        self.width = bt * cpt
        self.ntiles = ceil_div(K, self.width) if tiled else 1
        if not tiled and self.ntiles != 1:
            raise ValueError("layout does not cover the row")
        self.mode = 1 if tiled else 0
        acc = self.accurate
        # pass launches with (True) and without (False) labels; the column-tiled passes always
        # write labels, so they need no labels kernel
        self.passes = {lab: [fused_pass_name(dtype, cpt, self.R, self.v, m, acc, lab)
                             for m in ((1, 2) if tiled else (0,))] for lab in (True, False)}
        self.labels = None if tiled else labels_name(dtype, cpt, self.v)
        self.column_lse = column_lse_name(dtype, cpt, self.v, acc)
        self.check_matrix = check_matrix_name(dtype, cpt, self.v)
        self._rows(N, n_sm, blocks_per_sm(self.passes[True][-1], bt))

    @staticmethod
    def _pipe_choice(dtype, K, vec, aligned, override):
        """The pipelined config to use, or None for a direct layout."""
        if override is not None and override[0] == "pipe":
            pcfg = tuple(override[1:])
            if pcfg not in PIPE_CONFIGS[dtype]:
                raise ValueError(f"no pipelined instance {pcfg} for {dtype}")
            ok = aligned and pcfg[0] % vec == 0 and pipe_fit(K, pcfg) is not None
            return pcfg if ok else None
        if (override is None and DEFAULT_PASS == "pipe" and dtype in PIPE_DEFAULT_DTYPES
                and aligned and K >= PIPE_MIN_K):
            for pcfg in PIPE_CONFIGS[dtype]:
                if pcfg[0] % vec == 0 and pipe_fit(K, pcfg) is not None:
                    return pcfg
        return None

    def _rows(self, N, n_sm, bps):
        self.bps = bps
        slots = n_sm * bps
        groups = ceil_div(N, self.R)
        if self.tiled:
            nrb = max(ceil_div(slots, self.ntiles), ceil_div(N, 1024))
        else:  # at most ~1024 rows a block (float32 partial sums), a whole number of waves
            nrb = slots * max(1, ceil_div(N, slots * 1024))
        self.nrb = int(max(1, min(groups, nrb)))
        self.grid = (self.nrb, self.ntiles)

    def _init_pipe(self, dtype, N, K, n_sm, pcfg):
        cpt, R, S, maxt, minb = pcfg
        self.pipe = pcfg
        self.cpt, self.R, self.v = cpt, R, VEC[dtype]
        self.bt = pipe_fit(K, pcfg)
        self.tiled, self.ntiles, self.mode = False, 1, 0
        self.width = self.bt * cpt
        self.smem = S * R * self.width * ITEMSIZE[dtype]
        self.passes = {lab: [fused_pass_pipe_name(dtype, pcfg, self.accurate, lab)]
                       for lab in (True, False)}
        # LSE, check and labels use the direct kernels (same column layout, vector loads)
        self.labels = labels_name(dtype, cpt, self.v)
        self.column_lse = column_lse_name(dtype, cpt, self.v, self.accurate)
        self.check_matrix = check_matrix_name(dtype, cpt, self.v)
        for names in self.passes.values():
            KERNELS.opt_in_smem(names[0], self.smem)
        self._rows(N, n_sm, blocks_per_sm(self.passes[True][0], self.bt, self.smem))

    def __repr__(self):
        p = f", pipe={self.pipe}, smem={self.smem}, bps={self.bps}" if self.pipe else \
            f", bps={self.bps}"
        return (f"Layout(cpt={self.cpt}, bt={self.bt}, R={self.R}, v={self.v}, "
                f"tiled={self.tiled}, ntiles={self.ntiles}, nrb={self.nrb}, "
                f"accurate={self.accurate}{p})")


class LayoutCache:
    """Layouts by (dtype, shape, alignment, override, device, pass choice, ACC), and the SM
    count of each device."""

    MAX = 256

    def __init__(self):
        self._layouts: dict = {}
        self._sm_count: dict = {}

    def clear(self):
        self._layouts.clear()
        self._sm_count.clear()

    def sm_count(self, dev_id) -> int:
        n = self._sm_count.get(dev_id)
        if n is None:
            import cupy

            n = int(cupy.cuda.runtime.getDeviceProperties(dev_id)["multiProcessorCount"])
            self._sm_count[dev_id] = n
        return n

    def get(self, dtype, X, override, accurate) -> Layout:
        N, K = X.shape
        dev = X.data.device_id
        aligned = X.data.ptr % 16 == 0
        key = (dtype, N, K, aligned, override, dev, DEFAULT_PASS, accurate)
        L = self._layouts.get(key)
        if L is None:
            if len(self._layouts) > self.MAX:
                self._layouts.clear()
            L = self._layouts[key] = Layout(dtype, N, K, 16 if aligned else 1,
                                            self.sm_count(dev), override, accurate=accurate)
        return L


LAYOUTS = LayoutCache()
