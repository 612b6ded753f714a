"""The CPU backend: thin wrappers over the compiled core ``sinkhorn_ot._core``."""
from __future__ import annotations

import numpy as np

from . import _core
from ._solver import sinkhorn_loop


class CPUBackend:
    xp = np
    device = "cpu"
    labels_per_pass = True  # the argmax rides along in the fused pass at no extra read

    def __init__(self, n_threads=None):
        self.n_threads = 0 if n_threads is None else int(n_threads)

    def check(self, X, forbidden: float) -> dict:
        return _core.check_matrix(X, forbidden, self.n_threads)

    def column_lse(self, X, alpha, f):
        return _core.column_lse(X, alpha, f, self.n_threads)

    def fused_pass(self, X, alpha, g, loga, rho_a, f_out, labels_out):
        return _core.fused_pass(X, alpha, g, loga, rho_a, f_out, labels_out, self.n_threads)

    def column_update(self, g, logb, col, colmax, log_n_rows, rho_b):
        return _core.column_update(g, logb, col, colmax, log_n_rows, rho_b)

    def labels(self, X, alpha, g, out):
        """The row argmax at ``g``: a fused pass that keeps only its labels."""
        N = X.shape[0]
        self.fused_pass(X, alpha, g, np.zeros(N), 1.0, np.empty(N), out)
        return out

    def solve(self, X, alpha, loga, logb, **kw):
        """Plain Sinkhorn passes: the generic loop over this backend's primitives."""
        return sinkhorn_loop(self, X, alpha, loga, logb, acceleration=None, **kw)

    def plan(self, X, alpha, f, g):
        """exp(alpha X + f_i + g_y), computed a block of rows at a time in float64 and
        returned in the input's precision."""
        Q = np.empty(X.shape, dtype=X.dtype)
        step = max(1, (1 << 22) // X.shape[1])
        for lo in range(0, X.shape[0], step):
            blk = X[lo:lo + step].astype(np.float64) * alpha
            blk += f[lo:lo + step, None]
            blk += g[None, :]
            Q[lo:lo + step] = np.exp(blk)
        return Q
