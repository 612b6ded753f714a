"""The CUDA backend: the primitives of ``_backend.Backend`` on CuPy arrays, and a device-side
Sinkhorn loop.

The loop runs two launches per iteration (three when a row is wider than one block: see the
.cu file) and no host synchronisation except one 64-byte read of the loop state every
``CHECK_EVERY`` iterations in tolerance mode (none at all inside a fixed ``n_iter`` solve):
the state, the best ``f``/``g``/labels and the stop flag live on the device, and kernels
launched after convergence return at once.
"""
from __future__ import annotations

import contextlib
import math
import threading

import numpy as np

from .._solver import Solution, plan_buffer
from . import launch
from .kernels import COMPUTE, TYPE, ceil_div
from .layout import ACCURATE, LAYOUTS
from .launch import struct_dtype

CHECK_EVERY = 10    # tolerance mode: read the loop state every 10 passes (the first after 5)
FIRST_CHECK = 5


class WorkBuffers:
    """Work buffers cached per (device, stream, host thread, kind, key): kernels on one stream
    run in order, so a later call on the same stream may reuse a buffer.  Never handed to the
    caller."""

    MAX = 32

    def __init__(self):
        self._bufs: dict = {}

    def clear(self):
        self._bufs.clear()

    def get(self, cp, kind, make, *key):
        k = (cp.cuda.runtime.getDevice(), cp.cuda.get_current_stream().ptr,
             threading.get_ident(), kind) + key
        buf = self._bufs.get(k)
        if buf is None:
            if len(self._bufs) >= self.MAX:
                self._bufs.clear()
            buf = self._bufs[k] = make()
        return buf


WORK = WorkBuffers()


class CUDABackend:
    """Backend primitives and the device-side loop on CuPy arrays (see module docstring)."""

    device = "cuda"
    mixed_precision = False  # (see _backend.Backend)

    def __init__(self, dtype: str, stream=None, layout_override=None, accurate=None):
        import cupy

        self.xp = cupy
        if dtype not in TYPE:
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
        self.layout_override = None if layout_override is None else tuple(layout_override)
        self.accurate = ACCURATE if accurate is None else bool(accurate)
        self._ctype = np.float64 if COMPUTE[dtype] == "double" else np.float32

    # -- helpers ------------------------------------------------------------------------
    def _ctx(self, X):
        if self.stream is None and X.data.device_id == self.xp.cuda.runtime.getDevice():
            return contextlib.nullcontext()  # on X's device, current stream: nothing to enter
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
        return LAYOUTS.get(self.dtype, X, self.layout_override, self.accurate)

    def _work(self, kind, make, *key):
        return WORK.get(self.xp, kind, make, *key)

    def _state(self):
        """The loop state (cached; every user initialises it with start_kernel or
        column_lse_finish_kernel first, on the same stream)."""
        return self._work("state", lambda: self.xp.zeros(struct_dtype("State").itemsize,
                                                         dtype=self.xp.uint8))

    @staticmethod
    def _read_state(state):
        return np.frombuffer(state.get().tobytes(), dtype=struct_dtype("State"))[0]

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
            st = (None, None, None)
        errpart = xp.empty(ceil_div(L.K, 32), dtype=xp.float64)
        return colpart, cmpart, qxpart, st, errpart

    def _gslots(self, K):
        return self._work("gslots", lambda: self.xp.empty((3, K), dtype=self.xp.float64), K)

    # -- backend primitives -------------------------------------------------------------
    def check(self, X, forbidden: float, alpha=None) -> dict:  # alpha: the LSE is not fused
        xp = self.xp
        X = self._matrix(X)
        N, K = X.shape
        with self._ctx(X):
            L = self.layout(X)
            flags = xp.zeros(N + K, dtype=xp.uint8)   # row_ok, col_ok
            res = xp.empty(4, dtype=xp.uint64)
            launch.check_matrix(L, X, forbidden, LAYOUTS.sm_count(X.data.device_id), flags,
                                res)
            pack = res.get()
        none = np.iinfo(np.uint64).max
        return dict(first_invalid=-1 if pack[0] == none else int(pack[0]),
                    first_empty_row=-1 if pack[1] == none else int(pack[1]),
                    first_empty_col=-1 if pack[2] == none else int(pack[2]),
                    max_abs=float(pack[3:4].view(np.float64)[0]))

    def column_lse(self, X, alpha, f):
        xp = self.xp
        X = self._matrix(X)
        with self._ctx(X):
            L = self.layout(X)
            f = None if f is None else self._f64(f)
            out = xp.empty(X.shape[1], dtype=xp.float64)
            bufs = self._buffers(L)
            launch.column_lse(L, self.dtype, X, alpha, f, bufs[0], bufs[1], L_out=out)
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
            gslots = self._gslots(K)
            zeros = self._work("zeros", lambda: xp.zeros(K, dtype=xp.float64), K)
            loga = self._f64(loga)
            state = self._state()
            launch.start(K, state, g0=self._f64(g), g_out=gslots[0])  # g -> slot 0
            bufs = self._buffers(L)
            out = xp.empty((2, K), dtype=xp.float64)  # returned: never a cached buffer
            col, colmax = out[0], out[1]
            launch.fused_pass(L, X, alpha, gslots, loga, rho_a, f_out, labels_out, bufs,
                              state)
            launch.finish(L, self.dtype, gslots, zeros, 0.0, 1.0, 0.0, True, bufs, state,
                          col, colmax)
            # sum Q X stays on the device (a copy: the state buffer is reused); the caller
            # reads it when it needs it, with other scalars
            at = struct_dtype("State").fields["best_qx"][1]
            qx = state[at:at + 8].view(xp.float64).copy()[0]
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
            if L.labels is None:  # column-tiled rows: a pass with labels
                self.fused_pass(X, alpha, g, xp.zeros(X.shape[0]), 1.0,
                                xp.empty(X.shape[0]), out)
            else:
                launch.labels(L, X, alpha, g, out)
        return out

    def tie_counts(self, X, alpha, g, tau):
        """Per row (int32, (N,)): the columns whose score ``alpha X_iy + g_y`` (float64) is
        within ``tau`` (and rounding) of the row's best; two or more: the row ties.  One read
        of X, no host synchronisation."""
        xp = self.xp
        X = self._matrix(X)
        with self._ctx(X):
            out = xp.empty(X.shape[0], dtype=xp.int32)
            launch.tie_count(self.dtype, X, alpha, self._f64(g), tau, out,
                             LAYOUTS.sm_count(X.data.device_id))
        return out

    def column_update(self, g, logb, col, colmax, log_n_rows, rho_b):
        xp = self.xp
        g, logb, col, colmax = (self._f64(a) for a in (g, logb, col, colmax))
        K = g.shape[0]
        with g.device:
            with self.stream if self.stream is not None else contextlib.nullcontext():
                g_next = xp.empty(K, dtype=xp.float64)
                terms = xp.empty(K, dtype=xp.float64)
                launch.column_update(g, logb, col, colmax, log_n_rows, rho_b, g_next, terms)
                err = terms.sum()  # a device scalar: read by the caller with others
        return g_next, err

    def plan(self, X, alpha, f, g):
        """exp(alpha X + f_i + g_y) in float64 arithmetic, stored as float32 (float64 for a
        float64 input)."""
        xp = self.xp
        X = self._matrix(X)
        with self._ctx(X):
            f, g = self._f64(f), self._f64(g)
            out_t = xp.float64 if self.dtype == "float64" else xp.float32
            out = xp.empty(X.shape, dtype=out_t)
            launch.plan(self.dtype, X, alpha, f, g, out, LAYOUTS.sm_count(X.device.id))
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
        fixed = n_iter is not None
        with self._ctx(X):
            L = self.layout(X)
            loga, logb = self._f64(loga), self._f64(logb)
            # gslots is cached (the result's g is a copy); f and labels are returned as views
            # of fslots / labslots, so those are fresh every call.
            gslots = self._gslots(K)
            fslots = xp.empty((2, N), dtype=xp.float64)
            labslots = xp.empty((2, N), dtype=xp.int64) if want_labels else None
            state = self._state()
            bufs = self._buffers(L)
            if g0 is None:  # g = rho_b (logb - LSE_i alpha X_iy): SwAV's first normalisation
                launch.column_lse(L, self.dtype, X, alpha, None, bufs[0], bufs[1], logb=logb,
                                  rho_b=rho_b, g_out=gslots[0], state=state)
            else:
                launch.start(K, state, g0=self._f64(g0), g_out=gslots[0])
            # Labels: the column-tiled passes write them every pass; otherwise the passes skip
            # the argmax, except the last one of a fixed n_iter (always the best), and a
            # tolerance solve writes the best pass's labels with labels_kernel at the end.
            every = L.labels is None
            step = dict(L=L, X=X, alpha=alpha, gslots=gslots, loga=loga, rho_a=rho_a,
                        fslots=fslots, bufs=bufs, state=state)
            done = dict(L=L, dtype=self.dtype, gslots=gslots, logb=logb,
                        log_n=math.log(max(N, 1)), rho_b=rho_b, tol=tol, fixed=fixed,
                        bufs=bufs, state=state)
            iters = int(n_iter) if fixed else int(max_iter)
            launched, chunk = 0, min(FIRST_CHECK, check_every)
            while launched < iters:
                c = min(chunk, iters - launched)
                for k in range(c):
                    last = fixed and launched + k == iters - 1
                    launch.fused_pass(labslots=labslots if (every or last) else None, **step)
                    launch.finish(**done)
                launched += c
                chunk = check_every
                if not fixed and launched < iters and self._read_state(state)["done"]:
                    break
            st = self._read_state(state)
            if want_labels and not every and not fixed:
                launch.labels(L, X, alpha, gslots[int(st["g_best"])],
                              labslots[int(st["f_best"])])
        err = float(st["best_err"])
        fb, gb = int(st["f_best"]), int(st["g_best"])
        if plan is not None:
            plan = plan_buffer(self.xp, X, plan)
            self.write_plan(X, alpha, fslots[fb], gslots[gb], plan)
        return Solution(fslots[fb], gslots[gb].copy(),
                        labslots[fb] if want_labels else None, int(st["it"]), err,
                        float(st["best_qx"]), err <= tol, None if plan is None else plan[0])
