"""Typed launchers: one function per kernel of sinkhorn_cuda.cu that the backend calls, each
building its arguments in one place.  The pass and its finish take one argument struct
(``PassArgs``, ``FinishArgs``) whose NumPy dtype is read from ``kernel_args.cuh``, the header
the kernels include, so the field list exists once."""
from __future__ import annotations

import functools
import re

import numpy as np

from .kernels import (CHECK_FINISH, CHECK_INIT, COLUMN_UPDATE, KERNELS, START, ceil_div,
                      column_lse_finish_name, finish_name, null, plan_name, read_source,
                      tie_count_name)

_C_TYPES = {"int": "<i4", "unsigned": "<u4", "long long": "<i8", "double": "<f8"}


@functools.lru_cache(maxsize=None)
def struct_dtype(name: str) -> np.dtype:
    """The NumPy dtype of ``struct name`` in kernel_args.cuh, laid out as a C compiler does
    (``align=True``); pointers are 8-byte addresses."""
    src = read_source("kernel_args.cuh")
    body = re.search(r"struct %s \{(.*?)\n\};" % name, src, re.S)
    if body is None:
        raise LookupError(f"struct {name} not found in kernel_args.cuh")
    fields = []
    for line in body.group(1).splitlines():
        line = line.split("//")[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(?:const )?([\w ]+?)\s*(\*?)\s*(\w+);", line)
        if m is None:
            raise ValueError(f"kernel_args.cuh, struct {name}: cannot parse {line!r}")
        ctype, ptr, field = m.groups()
        fields.append((field, "<u8" if ptr else _C_TYPES[ctype]))
    return np.dtype(fields, align=True)


def _ptr(a) -> int:
    if a is None or isinstance(a, np.integer):  # None or null(): a null pointer
        return 0 if a is None else int(a)
    return int(a.data.ptr)


def _struct(name: str, **values):
    """One argument struct as a NumPy structured scalar (passed to the kernel by value);
    arrays become their device addresses, None a null pointer."""
    dt = struct_dtype(name)
    rec = np.zeros((), dtype=dt)
    for k, v in values.items():
        rec[k] = _ptr(v) if dt.fields[k][0] == np.dtype("<u8") else v
    missing = set(dt.names) - set(values) - {n for n in dt.names if n.startswith("pad")}
    if missing:
        raise TypeError(f"{name}: no value for {sorted(missing)}")
    return rec[()]


def start(K, state, g0=None, g_out=None):
    """A fresh loop state; ``g0`` copied to ``g_out`` when given."""
    KERNELS.get(START)((max(1, ceil_div(K, 256)),), (256,),
                       (null() if g0 is None else g0, null() if g_out is None else g_out,
                        np.int64(K), state))


def fused_pass(L, X, alpha, gslots, loga, rho_a, fslots, labslots, bufs, state):
    """One pass at g = gslots[state.g_cur]; labels (and the argmax work) only with
    ``labslots``."""
    N, K = X.shape
    colpart, cmpart, qxpart, st, _ = bufs
    args = _struct("PassArgs", X=X, N=N, K=K, alpha=alpha, gslots=gslots, loga=loga,
                   rho_a=rho_a, fslots=fslots, labslots=labslots, colpart=colpart,
                   cmpart=cmpart, qxpart=qxpart, st_m=st[0], st_s=st[1], st_a=st[2],
                   state=state)
    for name in L.passes[labslots is not None]:
        KERNELS.get(name)(L.grid, (L.bt,), (args,), shared_mem=L.smem)


def finish(L, dtype, gslots, logb, log_n, rho_b, tol, fixed, bufs, state, col_out=None,
           colmax_out=None):
    """Reduce the pass partials, apply the column update, advance the loop state."""
    colpart, cmpart, qxpart, _, errpart = bufs
    args = _struct("FinishArgs", colpart=colpart, cmpart=cmpart, qxpart=qxpart,
                   gslots=gslots, logb=logb, errpart=errpart, col_out=col_out,
                   colmax_out=colmax_out, state=state, K=L.K, log_n_rows=log_n, rho_b=rho_b,
                   tol=tol, nrb=L.nrb, nq=L.nrb * L.ntiles, fixed=1 if fixed else 0)
    KERNELS.get(finish_name(dtype))((ceil_div(L.K, 32),), (256,), (args,))


def column_lse(L, dtype, X, alpha, f, Mp, Zp, L_out=None, logb=None, rho_b=1.0, g_out=None,
               state=None):
    """Column log-sum-exp of ``alpha X + f``; into ``L_out``, or as the first
    ``g = rho_b (logb - L)`` into ``g_out`` with a fresh loop ``state``."""
    N, K = X.shape
    KERNELS.get(L.column_lse)(L.grid, (L.bt,), (X, np.int64(N), np.int64(K),
                                                np.float64(alpha),
                                                null() if f is None else f, Mp, Zp))
    KERNELS.get(column_lse_finish_name(dtype))(
        (ceil_div(K, 32),), (256,),
        (Mp, Zp, np.int32(L.nrb), np.int64(K), null() if L_out is None else L_out,
         null() if logb is None else logb, np.float64(rho_b),
         null() if g_out is None else g_out, null() if state is None else state))


def labels(L, X, alpha, g, out):
    N, K = X.shape
    KERNELS.get(L.labels)((L.nrb,), (L.bt,), (X, np.int64(N), np.int64(K),
                                              np.float64(alpha), g, out))


def check_matrix(L, X, forbidden, n_sm, flags, res):
    """The validation scan into ``res`` (first invalid, first empty row and column, max
    |x|), with the row and column flags in ``flags`` ([N + K], zeroed)."""
    N, K = X.shape
    KERNELS.get(CHECK_INIT)((1,), (32,), (res,))
    KERNELS.get(L.check_matrix)(L.grid, (L.bt,), (X, np.int64(N), np.int64(K),
                                                  np.float64(forbidden), res[0:1],
                                                  flags[:N], flags[N:], res[3:4]))
    grid = int(max(1, min(ceil_div(max(N, K), 256), n_sm * 8)))
    KERNELS.get(CHECK_FINISH)((grid,), (256,), (flags[:N], np.int64(N), flags[N:],
                                                np.int64(K), res))


def column_update(g, logb, col, colmax, log_n_rows, rho_b, g_next, terms):
    K = g.shape[0]
    KERNELS.get(COLUMN_UPDATE)((max(1, ceil_div(K, 256)),), (256,),
                               (g, logb, col, colmax, np.int64(K), np.float64(log_n_rows),
                                np.float64(rho_b), g_next, terms))


def plan(dtype, X, alpha, f, g, out, n_sm):
    N, K = X.shape
    grid = int(max(1, min(ceil_div(N * K, 256), n_sm * 32)))
    KERNELS.get(plan_name(dtype))((grid,), (256,), (X, np.int64(N), np.int64(K),
                                                    np.float64(alpha), f, g, out))


def tie_count(dtype, X, alpha, g, tau, out, n_sm):
    """Per row, the columns whose score ties with the row's best (see the kernel)."""
    N, K = X.shape
    grid = int(max(1, min(ceil_div(N, 8), n_sm * 32)))  # 8 warps a block, one a row
    KERNELS.get(tie_count_name(dtype))((grid,), (256,), (X, np.int64(N), np.int64(K),
                                                         np.float64(alpha), g,
                                                         np.float64(tau), out))
