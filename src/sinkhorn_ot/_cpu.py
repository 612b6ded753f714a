"""The CPU backend: thin wrappers over the compiled core ``sinkhorn_ot._core``."""
from __future__ import annotations

import numpy as np

from . import _core
from ._solver import sinkhorn_loop


class CPUBackend:
    xp = np
    device = "cpu"
    # rows may be formed with float32 arithmetic (float32 input) or short float64
    # exponentials within a relative error the loop allows (fused_pass(fast=...); 0: float64
    # rows at full precision), the bound used is reported in `slack`
    mixed_precision = True

    def __init__(self, n_threads=None):
        self.n_threads = 0 if n_threads is None else int(n_threads)
        self.slack = 0.0
        # (X, alpha, g, row log-sum-exps) of the last pass: the next pass over the same X
        # and alpha shifts its rows by them (see RowShifts in csrc/cpu/sinkhorn_cpu.h)
        self._rows = None

    def check(self, X, forbidden: float, alpha=None) -> dict:
        """The validation facts of X; with ``alpha``, from the same read, also the column
        log-sum-exp ``log sum_i exp(alpha X_iy)`` under the key ``"lse"``."""
        if alpha is None:
            return _core.check_matrix(X, forbidden, self.n_threads)
        L, facts = _core.column_lse(X, alpha, None, self.n_threads, forbidden)
        facts["lse"] = L
        return facts

    def column_lse(self, X, alpha, f):
        return _core.column_lse(X, alpha, f, self.n_threads)

    def fused_pass(self, X, alpha, g, loga, rho_a, f_out, labels_out, plan=None, fast=0.0):
        """One pass; ``plan`` (optional): ``(out, rows, scale)``, the plan rows (``rows`` a
        slice of contiguous rows or a sorted index array) times ``scale`` written into
        ``out`` (X's dtype) by the same read."""
        kw = {}
        if plan is not None:
            out, rows, scale = plan
            kw = dict(plan=out, plan_scale=scale)
            if isinstance(rows, slice):
                kw["plan_row0"] = rows.start or 0
            elif rows is not None:
                kw["plan_rows"] = np.ascontiguousarray(rows, dtype=np.int64)
        lse = np.empty(X.shape[0])
        prev = self._rows
        if prev is not None and prev[0] is X and prev[1] == alpha:
            kw.update(lse_prev=prev[3], g_prev=prev[2])
        col, colmax, qx, self.slack = _core.fused_pass(
            X, alpha, g, loga, rho_a, f_out, labels_out, self.n_threads, fast=fast, lse=lse,
            **kw)
        self._rows = (X, alpha, np.array(g, dtype=np.float64), lse)
        return col, colmax, qx

    def column_update(self, g, logb, col, colmax, log_n_rows, rho_b):
        return _core.column_update(g, logb, col, colmax, log_n_rows, rho_b)

    def labels(self, X, alpha, g, out):
        """The first argmax over y of ``alpha X_iy + g_y`` of every row, in ``out``."""
        _core.labels(X, alpha, g, out, self.n_threads)
        return out

    def solve(self, X, alpha, loga, logb, **kw):
        """Plain Sinkhorn passes: the generic loop over this backend's primitives."""
        return sinkhorn_loop(self, X, alpha, loga, logb, acceleration=None, **kw)

    def plan(self, X, alpha, f, g, scale=1.0, rows=None, out=None):
        """``exp(alpha X + f_i + g_y) * scale`` of all rows (or of ``rows``: a slice of
        contiguous rows or a sorted index array), in X's precision, by the kernels' own
        arithmetic (t - m in float64, the exponential in X's precision)."""
        N, K = X.shape
        kw = {}
        if rows is None:
            n = N
        elif isinstance(rows, slice):
            lo, hi, _ = rows.indices(N)
            n, kw["row0"] = max(hi - lo, 0), lo
        else:
            kw["rows"] = np.ascontiguousarray(rows, dtype=np.int64)
            n = kw["rows"].shape[0]
        if out is None:
            out = np.empty((n, K), dtype=X.dtype)
        _core.plan(X, alpha, np.ascontiguousarray(f, dtype=np.float64),
                   np.ascontiguousarray(g, dtype=np.float64), out, scale=scale,
                   n_threads=self.n_threads, **kw)
        return out
