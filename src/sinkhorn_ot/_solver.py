"""The Sinkhorn iteration, written once over backend primitives.

A backend provides three primitives on its own arrays (NumPy for the CPU core, CuPy for the
CUDA kernels): ``column_lse`` (exact column log-sum-exp, used to initialise), ``fused_pass``
(one read of the matrix: new ``f``, labels, the plan's column sums and column max, and
``sum Q * X``) and ``column_update`` (the next ``g`` and the column error).  The update
formulas live in ``csrc/common/sinkhorn_math.h``, shared by both cores.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any


@dataclass
class Solution:
    f: Any
    g: Any
    labels: Any
    n_iter: int
    err: float
    qx: float          # sum_iy Q_iy X_iy of the returned plan
    converged: bool


def sinkhorn_loop(backend, X, alpha: float, loga, logb, *, rho_a: float = 1.0,
                  rho_b: float = 1.0, g0=None, tol: float, max_iter: int, n_iter=None,
                  want_labels: bool = False, comm=None) -> Solution:
    """Run Sinkhorn passes until ``err <= tol`` (or exactly ``n_iter`` passes).

    Without ``g0`` the first half-iteration is a column normalisation of ``exp(S)``
    (``f = 0``), as SwAV's loop starts; so ``n_iter = 3`` is three column and three row
    normalisations.  ``comm`` (optional) combines the column quantities of processes that
    each hold a block of rows: it provides ``allreduce_sum``, ``allreduce_max``,
    ``allreduce_lse`` and ``n_rows_total``.
    """
    xp = backend.xp
    N = X.shape[0]
    n_rows = comm.n_rows_total if comm is not None else N
    log_n = math.log(max(n_rows, 1))
    if g0 is None:
        L = backend.column_lse(X, alpha, None)
        if comm is not None:
            L = comm.allreduce_lse(L)
        g = rho_b * (logb - L)
    else:
        g = g0
    fixed = n_iter is not None
    iters = n_iter if fixed else max_iter
    # Two buffers for f and the labels: the best solution seen so far is kept without copies.
    f_work, f_best = xp.empty(N), xp.empty(N)
    lab_work = xp.empty(N, dtype=xp.int64) if want_labels else None
    lab_best = xp.empty(N, dtype=xp.int64) if want_labels else None
    best = None
    for it in range(1, iters + 1):
        col, colmax, qx = backend.fused_pass(X, alpha, g, loga, rho_a, f_work, lab_work)
        if comm is not None:
            col = comm.allreduce_sum(col)
            colmax = comm.allreduce_max(colmax)
            qx = float(comm.allreduce_sum(xp.asarray([qx]))[0])
        g_next, err = backend.column_update(g, logb, col, colmax, log_n, rho_b)
        if best is None or err <= best[1] or fixed:
            f_work, f_best = f_best, f_work
            lab_work, lab_best = lab_best, lab_work
            best = (g, err, qx, it)
        if (not fixed and err <= tol) or not math.isfinite(err):
            break
        g = g_next
    g, err, qx, _ = best
    converged = err <= tol
    if not math.isfinite(err):
        raise FloatingPointError(  # a bug, never a property of valid input: say so loudly
            "sinkhorn_ot: the column error became non-finite; please report this input")
    if not fixed and not converged:
        warnings.warn(f"Sinkhorn did not converge in {max_iter} iterations: err = {err:.3e} "
                      f"> tol = {tol:.1e} (the best iterate is returned, converged=False)",
                      UserWarning, stacklevel=3)
    return Solution(f_best, g, lab_best, it, float(err), float(qx), converged)  # it: passes run
