"""The Sinkhorn iteration, written once over backend primitives.

A backend provides three primitives on its own arrays (NumPy for the CPU core, CuPy for the
CUDA kernels): ``column_lse`` (exact column log-sum-exp, used to initialise), ``fused_pass``
(one read of the matrix: new ``f``, labels, the plan's column sums and column max, and
``sum Q * X``) and ``column_update`` (the next ``g`` and the column error).  The two scalars
(``sum Q * X`` and the error) may be device scalars: the loop reads what it needs of a pass in
one transfer (each is a synchronisation on a GPU).  The update formulas live in
``csrc/common/sinkhorn_math.h``, shared by both cores.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._arrays import to_host

ACCELERATIONS = ("anderson", None)


@dataclass
class Solution:
    f: Any
    g: Any
    labels: Any
    n_iter: int
    err: float
    qx: float          # sum_iy Q_iy X_iy of the returned plan
    converged: bool
    plan: Any = None   # the plan rows written by the last pass, when asked (sinkhorn_loop)


def plan_buffer(xp, X, plan):
    """``plan = (out, rows, scale)`` with ``out`` allocated (X's dtype) when it is None."""
    out, rows, scale = plan
    if out is None:
        n = X.shape[0] if rows is None else (
            len(range(*rows.indices(X.shape[0]))) if isinstance(rows, slice) else len(rows))
        out = xp.empty((n, X.shape[1]), dtype=X.dtype)
    return out, rows, scale


class Anderson:
    """Anderson mixing (type II) of the column potential, guarded by the dual objective.

    One Sinkhorn iteration is a map ``g -> T(g)``; Anderson extrapolates from the last
    ``memory`` pairs ``(g, T(g) - g)``.  Plain steps never decrease the dual objective
    ``D(g) = <a, f(g)> + <b, g>`` (block coordinate ascent on a concave function), so an
    extrapolated ``g`` whose dual falls below the last accepted one is rejected: the
    history is cleared and the plain step from the last accepted point is taken instead.
    That costs one pass per rejection and keeps the method from diverging or stalling.
    """

    # memory 12 against 5: 28 vs 38 passes on random(50_000, 1_000) to 1e-6, 2158 vs 12_325 on
    # the peaked digits problem at lam 50, no worse elsewhere (benchmarks/bench_accel.py)
    def __init__(self, xp, memory: int = 12, rel_slack: float = 1e-13):
        self.xp, self.memory, self.rel_slack = xp, memory, rel_slack
        self.dg, self.dr = [], []
        self.prev = None       # (g, r) of the last accepted point
        self.accepted = None   # (dual, T(g)) of the last accepted point
        self.rejections = 0

    def step(self, g, Tg, dual: float, scale: float):
        xp = self.xp
        if self.accepted is not None and dual < self.accepted[0] - self.rel_slack * scale:
            self.rejections += 1
            self.dg, self.dr, self.prev = [], [], None
            g_next, self.accepted = self.accepted[1], None
            return g_next
        self.accepted = (dual, Tg)
        r = Tg - g
        if self.prev is not None:
            self.dg.append(g - self.prev[0])
            self.dr.append(r - self.prev[1])
            if len(self.dg) > self.memory:
                self.dg.pop(0)
                self.dr.pop(0)
        self.prev = (g, r)
        if not self.dg:
            return Tg
        dR, dG = xp.stack(self.dr, axis=1), xp.stack(self.dg, axis=1)
        m = dR.shape[1]  # memory x memory, solved on the host: one transfer for A and rhs
        Ar = to_host(xp.concatenate([(dR.T @ dR).ravel(), dR.T @ r]))
        A, rhs = Ar[:m * m].reshape(m, m), Ar[m * m:]
        # Tikhonov term: the differences become nearly collinear close to convergence.
        A = A + (1e-10 * np.trace(A) + 1e-300) * np.eye(A.shape[0])
        try:
            gamma = np.linalg.solve(A, rhs)
        except np.linalg.LinAlgError:
            self.dg, self.dr = [], []
            return Tg
        return g + r - (dG + dR) @ xp.asarray(gamma)


# Mixed precision (CPU, float32 input): a pass may form rows in float32 when the bound on
# their relative plan error (the backend's `slack`) is small against the error being
# measured.  The next pass is allowed FAST_SHARE * err / mass (the first FIRST_FAST); a pass
# whose bound could move its own err by more than HONEST_SHARE is redone in float64, so the
# reported err always describes the plan of the returned potentials.
FIRST_FAST, FAST_SHARE, HONEST_SHARE = 1e-4, 2.5e-3, 0.05


def _mixed_pass(backend, X, alpha, g, loga, rho_a, f_out, labels_out, kw, fast, col_args):
    """A pass allowed a relative plan error ``fast``, redone in float64 when its bound could
    move its err by more than HONEST_SHARE.  Returns the pass, its column update and the
    next pass's allowance."""
    logb, log_n, rho_b = col_args
    out = backend.fused_pass(X, alpha, g, loga, rho_a, f_out, labels_out, fast=fast, **kw)
    upd = backend.column_update(g, logb, out[0], out[1], log_n, rho_b)
    err, mass = float(upd[1]), float(out[0].sum())
    if backend.slack > 0 and not 2 * backend.slack * mass <= HONEST_SHARE * err:
        out = backend.fused_pass(X, alpha, g, loga, rho_a, f_out, labels_out, fast=0.0, **kw)
        upd = backend.column_update(g, logb, out[0], out[1], log_n, rho_b)
    return (*out, upd, FAST_SHARE * err / max(mass, 1e-300))


def sinkhorn_loop(backend, X, alpha: float, loga, logb, *, rho_a: float = 1.0,
                  rho_b: float = 1.0, g0=None, L0=None, tol: float, max_iter: int,
                  n_iter=None, want_labels: bool = False, comm=None,
                  acceleration: str | None = "anderson", warn: bool = True,
                  plan=None) -> Solution:
    """Run Sinkhorn passes until ``err <= tol`` (or exactly ``n_iter`` passes).

    Without ``g0`` the first half-iteration is a column normalisation of ``exp(S)``
    (``f = 0``), as SwAV's loop starts; so ``n_iter = 3`` is three column and three row
    normalisations.  ``acceleration="anderson"`` applies :class:`Anderson` mixing in
    tolerance mode on balanced problems (fixed ``n_iter`` and KL-relaxed sides always run
    plain steps).  ``comm`` (optional) combines the column quantities of processes that
    each hold a block of rows: it provides ``allreduce_sum``, ``allreduce_max``,
    ``allreduce_lse`` and ``n_rows_total`` (and optionally ``allreduce_pass``).  ``L0``:
    the column log-sum-exp of ``alpha X`` when the caller already has it (the validation
    read computes it).  ``plan``: ``(out, rows, scale)``, written by the last pass of a
    fixed ``n_iter`` solve (the plan of the returned potentials; see
    ``CPUBackend.fused_pass``).  With a fixed ``n_iter`` the labels come from the last pass
    only: it is the one returned.
    """
    xp = backend.xp
    N = X.shape[0]
    n_rows = comm.n_rows_total if comm is not None else N
    log_n = math.log(max(n_rows, 1))
    if g0 is None:
        L = L0 if L0 is not None else backend.column_lse(X, alpha, None)
        if comm is not None:
            L = comm.allreduce_lse(L)
        g = rho_b * (logb - L)
    else:
        g = g0
    fixed = n_iter is not None
    iters = n_iter if fixed else max_iter
    accel = None
    if acceleration == "anderson" and not fixed and rho_a == 1.0 and rho_b == 1.0:
        accel = Anderson(xp, rel_slack=1e-13 if X.dtype == xp.float64 else 1e-6)
        a = xp.exp(loga)
        a_pos = a > 0
        b = xp.exp(logb)
    # Two buffers for f and the labels: the best solution seen so far is kept without copies.
    # A backend whose passes pay for the argmax (labels_per_pass False: the GPU) computes the
    # labels once, at the best g, after the loop.
    per_pass = want_labels and getattr(backend, "labels_per_pass", True)
    f_work, f_best = xp.empty(N), xp.empty(N)
    lab_work = xp.empty(N, dtype=xp.int64) if per_pass else None
    lab_best = xp.empty(N, dtype=xp.int64) if per_pass else None
    best = None
    mixed = getattr(backend, "mixed_precision", False) and comm is None and \
        X.dtype == np.float32
    fast = FIRST_FAST if mixed else 0.0
    if plan is not None:
        plan = plan_buffer(xp, X, plan)
    for it in range(1, iters + 1):
        last = fixed and it == iters
        lab = lab_work if not fixed or last else None
        kw = {} if plan is None or not last else {"plan": plan}
        upd = None  # (g_next, err) when the pass computed them already
        if mixed:
            col, colmax, qx, upd, fast = _mixed_pass(backend, X, alpha, g, loga, rho_a,
                                                     f_work, lab, kw, fast,
                                                     (logb, log_n, rho_b))
        else:
            col, colmax, qx = backend.fused_pass(X, alpha, g, loga, rho_a, f_work, lab, **kw)
        if comm is not None:
            qx = float(qx)
        if comm is not None and hasattr(comm, "allreduce_pass"):
            col, colmax, qx = comm.allreduce_pass(col, colmax, qx)  # one collective if it can
        elif comm is not None:
            col = comm.allreduce_sum(col)
            colmax = comm.allreduce_max(colmax)
            qx = float(comm.allreduce_sum(xp.asarray([qx]))[0])
        g_next, err = upd or backend.column_update(g, logb, col, colmax, log_n, rho_b)
        if accel is None:
            err = float(err)
        else:  # the dual of this pass (its f is f_work until the swap below), read with err
            af = a * xp.where(a_pos, f_work, 0.0)  # a_i = 0 rows have f_i = -inf
            local = xp.stack([af.sum(), xp.abs(af).sum()])
            if comm is not None:
                local = comm.allreduce_sum(local)
            bg = b * g
            err, dual, scale = (float(v) for v in to_host(xp.stack([
                xp.asarray(err, dtype=xp.float64), local[0] + bg.sum(),
                local[1] + xp.abs(bg).sum()])))
        if best is None or err <= best[1] or fixed:
            f_work, f_best = f_best, f_work
            lab_work, lab_best = lab_best, lab_work
            best = (g, err, qx, it)
        if (not fixed and err <= tol) or not math.isfinite(err):
            break
        if accel is None:
            g = g_next
            continue
        g = accel.step(g, g_next, dual, scale)
    g, err, qx, _ = best
    converged = err <= tol
    if not math.isfinite(err):
        raise FloatingPointError(  # a bug, never a property of valid input: say so loudly
            "sinkhorn_ot: the column error became non-finite; please report this input")
    if want_labels and not per_pass:
        lab_best = backend.labels(X, alpha, g, xp.empty(N, dtype=xp.int64))
    if warn and not fixed and not converged:
        warnings.warn(f"Sinkhorn did not converge in {max_iter} iterations: err = {err:.3e} "
                      f"> tol = {tol:.1e} (the best iterate is returned, converged=False)",
                      UserWarning, stacklevel=3)
    return Solution(f_best, g, lab_best, it, float(err), float(qx), converged,  # it: passes run
                    None if plan is None or not fixed else plan[0])


def drop_massless_columns(X, wb, logb, g0, xp, any_zero: bool):
    """Columns with zero mass carry no plan: solve without them (one copy of X) and give them
    g = -inf afterwards, so no row is left with every allowed entry in a massless column.
    Returns (X, logb, g0, keep) for the kept columns; keep is None when all are kept
    (``any_zero`` False, known on the host: see _validation.Weights)."""
    if not any_zero:
        return X, logb, g0, None
    keep = xp.nonzero(wb > 0)[0]
    return (xp.ascontiguousarray(X[:, keep]), logb[keep], None if g0 is None else g0[keep],
            keep)


def restore_columns(sol: Solution, keep, K: int, xp) -> Solution:
    """Undo drop_massless_columns on a solution: g = -inf and no label on dropped columns."""
    if keep is not None:
        g = xp.full(K, -math.inf)
        g[keep] = sol.g
        sol.g = g
        if sol.labels is not None:
            sol.labels = keep[sol.labels]
    return sol


def eps_stages(eps_scaling, alpha: float, max_abs: float) -> list:
    """The smaller ``alpha`` of the epsilon-scaling stages run before ``alpha`` itself.

    ``eps_scaling`` is True (automatic: up to 2 stages), False/0 (none) or a number of
    stages; each stage divides ``alpha`` by 4.  A stage is skipped once ``|alpha| * max|X|``
    would fall below 4: at that entropy one plain pass is already close to converged.
    """
    if eps_scaling is True:
        n = 2
    elif eps_scaling is False or eps_scaling is None:
        n = 0
    else:
        n = int(eps_scaling)
    out = []
    for k in range(n, 0, -1):
        a_k = alpha / 4.0 ** k
        if abs(a_k) * max_abs >= 4.0:
            out.append(a_k)
    return out


def solve(backend, X, alpha: float, loga, logb, *, rho_a: float = 1.0, rho_b: float = 1.0,
          g0=None, L0=None, tol: float, max_iter: int, n_iter=None,
          want_labels: bool = False, comm=None, acceleration="anderson", eps_scaling=True,
          max_abs: float = 1.0, plan=None):
    """Solve to ``tol`` with the chosen accelerations, or run exactly ``n_iter`` plain passes.

    Epsilon scaling (Schmitzer 2019) applies to balanced problems solved to a tolerance
    without a warm start: stages at ``alpha / 4**k`` are solved to a loose tolerance
    (``1e-2`` of the mass), each warm-starting the next with ``g`` rescaled by the ratio of
    the ``alpha``; the last stage solves the requested problem to ``tol``.  ``n_iter`` of
    the result counts the passes of every stage.  ``L0`` (the column log-sum-exp of
    ``alpha X``, when the validation read computed it) and ``plan`` are handed to the loop
    (see :func:`sinkhorn_loop`).
    """
    if acceleration not in ACCELERATIONS:
        raise ValueError(f"acceleration must be one of {ACCELERATIONS}, got {acceleration!r}")
    fixed = n_iter is not None
    balanced = rho_a == 1.0 and rho_b == 1.0
    kw = dict(rho_a=rho_a, rho_b=rho_b, want_labels=want_labels, max_iter=max_iter)
    stages = eps_stages(eps_scaling, alpha, max_abs) if (
        not fixed and balanced and g0 is None) else []
    passes = 0
    if stages:
        mass = float(backend.xp.exp(loga).sum())
        if comm is not None:
            mass = float(comm.allreduce_sum(backend.xp.asarray([mass]))[0])
        for k, a_k in enumerate(stages):
            st = sinkhorn_loop(backend, X, a_k, loga, logb, g0=g0, tol=max(tol, 1e-2 * mass),
                               comm=comm, acceleration=acceleration, warn=False, **kw)
            passes += st.n_iter
            a_next = stages[k + 1] if k + 1 < len(stages) else alpha
            g0 = st.g * (a_next / a_k)
    if stages:
        L0 = None
    if plan is not None:
        kw["plan"] = plan
    if comm is not None or (acceleration is not None and not fixed):
        sol = sinkhorn_loop(backend, X, alpha, loga, logb, g0=g0, L0=L0, tol=tol,
                            n_iter=n_iter, comm=comm, acceleration=acceleration, **kw)
    else:  # plain passes: the backend's own loop (on the GPU, a device-side loop)
        sol = backend.solve(X, alpha, loga, logb, g0=g0, L0=L0, tol=tol, n_iter=n_iter,
                            **kw)
    sol.n_iter += passes
    return sol
