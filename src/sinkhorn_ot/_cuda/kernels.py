"""The kernel catalogue and its compilation: instance names, the source as NVRTC sees it, and
the compiled kernels of this process.

Kernels are compiled lazily, one instance at a time, on first use (NVRTC through CuPy, which
caches the binary on disk), so ``pip install`` needs no CUDA toolkit.
"""
from __future__ import annotations

import functools
import os
import re

import numpy as np

NS = "sinkhorn_ot::cuda::"
TYPE = {"float64": "double", "float32": "float", "float16": NS + "f16_t",
        "bfloat16": NS + "bf16_t"}
COMPUTE = {"float64": "double", "float32": "float", "float16": "float", "bfloat16": "float"}
ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
VEC = {k: 16 // v for k, v in ITEMSIZE.items()}   # elements of one 16-byte load
CPTS = (1, 2, 4, 8, 16)                            # columns per thread (register tile)
TILED_CPT, TILED_BT = 8, 256                       # column-tiled pass: 2048 columns a tile
OPTIONS = ("-std=c++17",)
# Pipelined pass (fused_pass_pipe_kernel): (CPT, R, S, MAXT, MINB) per input dtype.  CPT
# columns per thread, R rows per step, S cp.async stages in shared memory, at most MAXT
# threads, MINB blocks per SM asked of the register allocator.  Registers on sm_90 (ptxas -v,
# no spills): float32 (8,1,4,384,2) 78, (8,2,3,384,1) 143, (16,1,4,192,2) 146.  MAXT <= 512:
# the LSE and check kernels of the same layout are launched with the same threads.  The
# first entry is the fastest measured (benchmarks/gpu/NOTES.md): at 1_281_167 x 3000 on an
# H200, 9.4 ms a pass against 10.9 and 12.7 for the others and 14.2 for the direct pass.
PIPE_CONFIGS = {
    "float32": [(16, 1, 4, 192, 2), (8, 1, 4, 384, 2), (8, 2, 3, 384, 1)],
    "float16": [(16, 1, 4, 192, 2), (8, 1, 4, 384, 2), (8, 2, 3, 384, 1)],
    "bfloat16": [(16, 1, 4, 192, 2), (8, 1, 4, 384, 2), (8, 2, 3, 384, 1)],
    "float64": [(8, 1, 3, 384, 1)],
}


def rows_at_once(cpt: int, dtype: str = "float32") -> int:
    """Rows a thread holds in registers at once (R): R * CPT = 16 values (R <= 8); 8 values
    for float64 (twice the registers each)."""
    if dtype == "float64":
        return max(1, min(4, 8 // cpt))
    return max(1, min(8, 16 // cpt))


def vectors(dtype):
    return (1, VEC[dtype])


def tile_configs(dtype):
    """(CPT, V) pairs instantiated for the register-tile kernels."""
    return [(c, v) for c in CPTS for v in vectors(dtype) if c % v == 0]


def _acc(dtype, accurate) -> str:
    """The ACC template argument: only float compute has two variants (float64 has one)."""
    return "true" if accurate and dtype != "float64" else "false"


def _accs(dtype):
    return ("false",) if dtype == "float64" else ("true", "false")


def _b(flag) -> str:
    return "true" if flag else "false"


# -- instance names: one function per kernel template of sinkhorn_cuda.cu --------------------
def fused_pass_name(dtype, cpt, R, v, mode, accurate=True, lab=True) -> str:
    """LAB (labels) only varies for the fused pass: the column-tiled passes always track the
    argmax (their first launch needs it)."""
    lab = lab or mode != 0
    return (f"{NS}fused_pass_kernel<{TYPE[dtype]}, {cpt}, {R}, {v}, {mode}, "
            f"{_acc(dtype, accurate)}, {_b(lab)}>")


def fused_pass_pipe_name(dtype, cfg, accurate=True, lab=True) -> str:
    cpt, R, S, maxt, minb = cfg
    return (f"{NS}fused_pass_pipe_kernel<{TYPE[dtype]}, {cpt}, {R}, {S}, {maxt}, {minb}, "
            f"{_acc(dtype, accurate)}, {_b(lab)}>")


def labels_name(dtype, cpt, v) -> str:
    return f"{NS}labels_kernel<{TYPE[dtype]}, {cpt}, {rows_at_once(cpt, dtype)}, {v}>"


def column_lse_name(dtype, cpt, v, accurate=True) -> str:
    return f"{NS}column_lse_kernel<{TYPE[dtype]}, {cpt}, {v}, {_acc(dtype, accurate)}>"


def check_matrix_name(dtype, cpt, v) -> str:
    return f"{NS}check_matrix_kernel<{TYPE[dtype]}, {cpt}, {v}>"


def tie_count_name(dtype) -> str:
    return f"{NS}tie_count_kernel<{TYPE[dtype]}>"


def plan_name(dtype) -> str:
    return f"{NS}plan_kernel<{TYPE[dtype]}, {'double' if dtype == 'float64' else 'float'}>"


def finish_name(dtype) -> str:
    return f"{NS}fused_pass_finish_kernel<{COMPUTE[dtype]}>"


def column_lse_finish_name(dtype) -> str:
    return f"{NS}column_lse_finish_kernel<{COMPUTE[dtype]}>"


START = NS + "start_kernel"
COLUMN_UPDATE = NS + "column_update_kernel"
CHECK_INIT = NS + "check_matrix_init_kernel"
CHECK_FINISH = NS + "check_matrix_finish_kernel"


def instances(dtype: str) -> list:
    """Every kernel template instantiation the backend may launch for one input dtype (both
    ACC variants for float compute)."""
    out = []
    for acc in _accs(dtype):
        a = acc == "true"
        for cpt, v in tile_configs(dtype):
            for lab in (True, False):
                out.append(fused_pass_name(dtype, cpt, rows_at_once(cpt, dtype), v, 0, a, lab))
            out.append(column_lse_name(dtype, cpt, v, a))
        for v in vectors(dtype):
            if TILED_CPT % v == 0:
                for mode in (1, 2):
                    out.append(fused_pass_name(dtype, TILED_CPT, rows_at_once(TILED_CPT, dtype),
                                               v, mode, a))
        for cfg in PIPE_CONFIGS[dtype]:
            for lab in (True, False):
                out.append(fused_pass_pipe_name(dtype, cfg, a, lab))
    for cpt, v in tile_configs(dtype):
        out.append(check_matrix_name(dtype, cpt, v))
        out.append(labels_name(dtype, cpt, v))
    out += [plan_name(dtype), tie_count_name(dtype), finish_name(dtype), column_lse_finish_name(dtype), START,
            COLUMN_UPDATE, CHECK_INIT, CHECK_FINISH]
    return list(dict.fromkeys(out))


# -- the source --------------------------------------------------------------------------------
_HEADERS = ("sinkhorn_math.h", "kernel_args.cuh")


def _source_dirs():
    """Where the kernel sources are: inside the installed package (wheel: sinkhorn_ot/cuda/),
    or the checkout (csrc/)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pkg = os.path.join(package, "cuda")
    if all(os.path.isfile(os.path.join(pkg, f)) for f in ("sinkhorn_cuda.cu",) + _HEADERS):
        return {f: os.path.join(pkg, f) for f in ("sinkhorn_cuda.cu",) + _HEADERS}
    root = os.path.join(os.path.dirname(os.path.dirname(package)), "csrc")
    paths = {"sinkhorn_cuda.cu": os.path.join(root, "cuda", "sinkhorn_cuda.cu"),
             "kernel_args.cuh": os.path.join(root, "cuda", "kernel_args.cuh"),
             "sinkhorn_math.h": os.path.join(root, "common", "sinkhorn_math.h")}
    if all(os.path.isfile(p) for p in paths.values()):
        return paths
    raise FileNotFoundError("sinkhorn_ot: CUDA kernel sources not found (looked in "
                            f"{pkg} and {root}); the installation is incomplete")


def read_source(name: str) -> str:
    """One source file of the kernels (``sinkhorn_cuda.cu`` or one of its headers)."""
    with open(_source_dirs()[name]) as fh:
        return fh.read()


@functools.lru_cache(maxsize=None)
def kernel_source() -> str:
    """The kernel file with its headers pasted in place of their #includes (so NVRTC needs
    no include path), with #line directives so errors name the real files."""
    out = ['#line 1 "sinkhorn_cuda.cu"']
    for k, line in enumerate(read_source("sinkhorn_cuda.cu").splitlines()):
        m = re.fullmatch(r'\s*#include "([\w.]+)"\s*', line)
        if m and m.group(1) in _HEADERS:
            out += [f'#line 1 "{m.group(1)}"',
                    read_source(m.group(1)).replace("#pragma once", ""),
                    f'#line {k + 2} "sinkhorn_cuda.cu"']
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def compile_offline(names, arch: str = "sm_90", options=()):
    """Compile instantiations with NVRTC alone (no device needed: CI and tests).  Returns the
    NVRTC log (with ``--ptxas-options=-v`` in ``options``, the register counts)."""
    from cupy.cuda import nvrtc

    prog = nvrtc.createProgram(kernel_source(), "sinkhorn_cuda.cu", [], [])
    try:
        for n in names:
            nvrtc.addNameExpression(prog, n)
        opts = list(OPTIONS) + [f"--gpu-architecture={arch}"] + list(options)
        try:
            nvrtc.compileProgram(prog, opts)
        except nvrtc.NVRTCError as exc:
            raise RuntimeError(f"NVRTC failed: {exc}\n{nvrtc.getProgramLog(prog)}") from None
        for n in names:
            nvrtc.getLoweredName(prog, n)  # raises if an instantiation is missing
        return nvrtc.getProgramLog(prog)
    finally:
        nvrtc.destroyProgram(prog)


# -- the compiled kernels of this process ---------------------------------------------------
class KernelCache:
    """Compiled kernel instances by name, with what the launch configuration asks of them:
    their register count and the dynamic shared memory they were opted in to."""

    def __init__(self):
        self._functions: dict = {}
        self._registers: dict = {}
        self._smem_opt_in: dict = {}

    def clear(self):
        self._functions.clear()
        self._registers.clear()
        self._smem_opt_in.clear()

    def get(self, name: str):
        """One kernel instance, compiled on first use."""
        k = self._functions.get(name)
        if k is None:
            import cupy

            mod = cupy.RawModule(code=kernel_source(), options=OPTIONS,
                                 name_expressions=[name])
            k = self._functions[name] = mod.get_function(name)
        return k

    def registers(self, name: str) -> int:
        """Registers per thread (0: unknown)."""
        r = self._registers.get(name)
        if r is None:
            try:
                r = max(int(self.get(name).num_regs), 1)
            except Exception:  # noqa: BLE001 - attribute missing on some CuPy versions
                r = 0
            self._registers[name] = r
        return r

    def opt_in_smem(self, name: str, nbytes: int):
        """Allow more than 48 KiB of dynamic shared memory (once per kernel and size)."""
        if nbytes > 40 * 1024 and self._smem_opt_in.get(name, 0) < nbytes:  # 48 KiB incl. static
            self.get(name).max_dynamic_shared_size_bytes = int(nbytes)
            self._smem_opt_in[name] = nbytes


KERNELS = KernelCache()


def null():
    return np.uint64(0)  # a null pointer argument


def ceil_div(a, b):
    return -(-a // b)
