"""The Sinkhorn iteration, written once over backend primitives (``_backend.Backend``) and a
reducer (``_reducer.Local``, or ``distributed.Sharded`` when rows are split across processes).

The loop reads what it needs of a pass in one transfer (each is a synchronisation on a GPU):
``sum Q * X`` and the column error may be device scalars.  The update formulas live in
``csrc/common/sinkhorn_math.h``, shared by both cores.  Nothing here warns or raises on
non-convergence: the loop returns its best iterate and ``_problem.run`` reports.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._arrays import to_host
from ._reducer import Local

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
    stalled: bool = False   # stopped early by ``stall_window`` (see sinkhorn_loop)


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

    Balanced potentials are defined up to the gauge ``(f - c, g + c)``: ``T(g + c) = T(g) +
    c``, so the residual cannot see a shift of ``g`` and unguarded extrapolation drifts
    along it (to ``|g| ~ 1e17`` at large ``lam``, where ``f + g`` loses every digit).  The
    mixing therefore runs in the quotient space: every ``g`` and ``T(g)`` it sees is
    centred (zero mean), and so is every point it returns.
    """

    # memory 12 against 5: 28 vs 38 passes on random(50_000, 1_000) to 1e-6, 2158 vs 12_325 on
    # the peaked digits problem at lam 50, no worse elsewhere (benchmarks/bench_accel.py)
    def __init__(self, xp, memory: int = 12, rel_slack: float = 1e-13, bound: float = math.inf):
        self.xp, self.memory, self.rel_slack, self.bound = xp, memory, rel_slack, bound
        self.dg, self.dr = [], []
        self.prev = None       # (g, r) of the last accepted point
        self.accepted = None   # (dual, T(g)) of the last accepted point
        self.rejections = 0

    def step(self, g, Tg, dual: float, scale: float, g_max: float = 0.0):
        """The next point to evaluate, from the evaluated ``g``, its plain step ``Tg``, the
        dual at ``g`` and its scale (``sum |a f| + sum |b g|``), and ``max |g|``."""
        xp = self.xp
        # A column of tiny mass leaves a direction the residual barely sees (its potential can
        # fall towards -inf for an err change of that mass), so extrapolation may run along it
        # to potentials far beyond any optimum's, where f + g loses its digits: such a point
        # is rejected like one that lowers the dual (before its Tg, which may have
        # overflowed, is looked at).
        if self.accepted is not None and (dual < self.accepted[0] - self.rel_slack * scale
                                          or not g_max <= self.bound):
            self.rejections += 1
            self.dg, self.dr, self.prev = [], [], None
            g_next, self.accepted = self.accepted[1], None
            return g_next
        g, Tg = g - g.mean(), Tg - Tg.mean()
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
        out = g + r - (dG + dR) @ xp.asarray(gamma)
        return out - out.mean()


def _log_range(xp, logw, comm=None) -> float:
    """max |log w| over the positive entries (0 when none), identical on every rank."""
    lw = xp.where(xp.isfinite(logw), xp.abs(logw), 0.0)
    v = xp.stack([lw.max() if lw.size else xp.asarray(0.0)])
    if comm is not None:
        v = comm.allreduce_max(v)
    return float(to_host(v)[0])


def potential_bound(xp, loga, logb, s_max: float, n_rows: int, comm=None) -> float:
    """A bound on ``max |g - mean(g)|`` no optimum of the balanced problem exceeds.

    At the optimum ``g_y - g_y' = log b_y - log b_y' - (LSE_i(S_iy + f_i) - LSE_i(S_iy' +
    f_i))``; on a dense matrix the LSE difference is at most ``2 max |S|``.  Forbidden pairs
    chain such differences along paths of the support (at most ``min(n, m)`` columns long)
    through plan entries as small as the marginals' smallest: hence the loose product.
    """
    K = logb.shape[0]
    lr = _log_range(xp, loga, comm) + _log_range(xp, logb) + math.log(max(n_rows * K, 2))
    return 4.0 * min(n_rows, K) * (s_max + lr + 1.0)


# Mixed precision (CPU): a pass may form rows with float32 arithmetic (t - m in float32, for
# float32 input, or only the exponentials and row sums) or with float64 exponentials of a
# relative error near 2e-10 (vexp_short in csrc/cpu/simd.h), when the bound on their
# relative plan error (the backend's `slack`, covering the entries and the row sums) is
# small against the error being measured; other rows run in float64 throughout at full
# precision.  A float64 solve with a fixed n_iter keeps every pass at full precision (its
# potentials are float64 Sinkhorn's to rounding).  The next pass is allowed
# FAST_SHARE * err / mass (the first FIRST_FAST); a pass whose bound could move its own err
# by more than HONEST_SHARE is redone at full precision, so the reported err always
# describes the plan of the returned potentials, whose rows hold to within as much.
FIRST_FAST, FAST_SHARE, HONEST_SHARE = 1e-4, 2.5e-3, 0.05


def _mixed_pass(backend, comm, X, alpha, g, loga, rho_a, f_out, kw, fast, col_args,
                reported=True, exact_at=-math.inf):
    """A pass allowed a relative plan error ``fast``, redone at full precision when its
    bound could move its err by more than HONEST_SHARE and that err is ``reported`` (a fixed
    ``n_iter`` reports only its last pass's; the others' only set the next allowance), or
    when its err is at most ``exact_at`` (the pass that meets the tolerance, whose f is
    returned).  The column quantities and the bound are combined over ``comm``'s ranks, so
    every rank decides alike.  Returns the combined pass, its column update and the next
    pass's allowance."""
    logb, log_n, rho_b = col_args

    def run(fast):
        col, colmax, qx = backend.fused_pass(X, alpha, g, loga, rho_a, f_out, None, fast=fast,
                                             **kw)
        slack = backend.slack
        if not comm.local:
            col, colmax, qx = comm.allreduce_pass(col, colmax, qx)
            slack = float(comm.allreduce_max(np.asarray([slack]))[0])
        return (col, colmax, qx), backend.column_update(g, logb, col, colmax, log_n, rho_b), slack

    out, upd, slack = run(fast)
    err, mass = float(upd[1]), float(out[0].sum())
    if slack > 0 and (err <= exact_at or (
            reported and not 2 * slack * mass <= HONEST_SHARE * err)):
        out, upd, _ = run(0.0)
    return (*out, upd, FAST_SHARE * err / max(mass, 1e-300))


def sinkhorn_loop(backend, X, alpha: float, loga, logb, *, rho_a: float = 1.0,
                  rho_b: float = 1.0, g0=None, L0=None, tol: float, max_iter: int,
                  n_iter=None, want_labels: bool = False, comm=None,
                  acceleration: str | None = "anderson", plan=None, s_max: float = math.inf, stall_window: int | None = None,
                  translate: bool = True, symmetric: bool = False,
                  full_precision: bool = True) -> Solution:
    """Run Sinkhorn passes until ``err <= tol`` (or exactly ``n_iter`` passes).

    Without ``g0`` the first half-iteration is a column normalisation of ``exp(S)``
    (``f = 0``), as SwAV's loop starts; so ``n_iter = 3`` is three column and three row
    normalisations.  ``acceleration="anderson"`` applies :class:`Anderson` mixing in
    tolerance mode on balanced problems (fixed ``n_iter`` and KL-relaxed sides always run
    plain steps); its iterates are gauge-fixed (``g`` centred), kept within
    :func:`potential_bound` (``s_max`` bounds ``|alpha X|``).  On KL-relaxed problems solved
    to a tolerance each pass is followed by the translation-invariant step of
    :func:`_translation` (``translate=False``: plain passes).  With ``stall_window`` the
    loop gives up early (``stalled=True``) when that many passes cut the best ``err`` by
    less than 5%: :func:`solve` then restarts with plain passes.
    The returned ``err`` is that of the pass which computed the returned ``f`` from the
    returned ``g``: the L1 column violation of exactly that plan.  ``comm``, the reducer
    (default :class:`_reducer.Local`), combines the column quantities of processes that each
    hold a block of rows.  A non-finite error stops the loop (the caller raises).  ``L0``: the column log-sum-exp of ``alpha X`` when the
    caller already has it (the validation read computes it).  ``plan``: ``(out, rows,
    scale)``, written by the last pass of a fixed ``n_iter`` solve (the plan of the
    returned potentials; see ``CPUBackend.fused_pass``).  With a fixed ``n_iter`` the labels
    come from the last pass only: it is the one returned.  ``symmetric``: a symmetric ``X``
    with equal marginals and relaxations (a self-transport problem), whose potentials
    agree at the optimum: the next ``g`` is the average of ``g`` and the pass's ``f``
    (Feydy et al. 2019), which removes the oscillation that slows the alternating updates
    on such problems (31 passes to 1e-12 instead of more than 20,000 on a 20-point cloud at
    reg 0.05); no acceleration or translation step then.  ``full_precision``: on float64
    input, the pass that meets ``tol`` is at full precision (short exponentials may serve
    the passes before it, see the note on mixed precision above), so the returned ``f`` is
    float64 Sinkhorn's row update at the returned ``g``; the epsilon-scaling stages, whose
    potentials only warm-start the next stage, skip it.
    """
    xp = backend.xp
    N = X.shape[0]
    comm = comm if comm is not None else Local()
    n_rows = N if comm.local else comm.n_rows_total
    log_n = math.log(max(n_rows, 1))
    if g0 is None:
        L = L0 if L0 is not None else backend.column_lse(X, alpha, None)
        L = comm.allreduce_lse(L)
        g = rho_b * (logb - L)
    else:
        g = g0
    fixed = n_iter is not None
    iters = n_iter if fixed else max_iter
    accel = None
    if acceleration == "anderson" and not fixed and rho_a == 1.0 and rho_b == 1.0 and \
            not symmetric:
        accel = Anderson(xp, rel_slack=1e-13 if X.dtype == xp.float64 else 1e-6,
                         bound=potential_bound(xp, loga, logb, s_max, n_rows, comm))
        a = xp.exp(loga)
        a_pos = a > 0
        b = xp.exp(logb)
    ti = None
    if translate and not fixed and (rho_a != 1.0 or rho_b != 1.0) and not symmetric:
        ti = _translation(xp, loga, logb, rho_a, rho_b, comm)
    # Two buffers for f: the best solution seen so far is kept without copies.  The argmax
    # costs a pass a good share of its time (and keeps float32 rows from float32 arithmetic
    # on the CPU): the labels are one read of X after the loop, at the best g.
    f_work, f_best = xp.empty(N), xp.empty(N)
    best = None
    history = []       # best err after each pass, for stall_window
    stalled = False
    it = 0
    mixed = backend.mixed_precision and (X.dtype == np.float32 or not fixed)
    if not comm.local:
        # Alike on every rank (one without rows has no kernels of its own); a sharded fixed
        # n_iter (sharded codes) keeps full-precision rows: its codes are the single
        # process's scaling passes to float32 rounding.
        mixed = not fixed and bool(comm.allreduce_max(np.asarray([float(mixed)]))[0])
    fast = FIRST_FAST if mixed else 0.0
    exact_at = tol if full_precision and X.dtype == np.float64 else -math.inf
    if plan is not None:
        plan = plan_buffer(xp, X, plan)
    for it in range(1, iters + 1):
        last = fixed and it == iters
        kw = {} if plan is None or not last else {"plan": plan}
        upd = None  # (g_next, err) when the pass computed them already
        if mixed:
            col, colmax, qx, upd, fast = _mixed_pass(backend, comm, X, alpha, g, loga, rho_a,
                                                     f_work, kw, fast,
                                                     (logb, log_n, rho_b), not fixed or last,
                                                     exact_at)
        else:
            col, colmax, qx = backend.fused_pass(X, alpha, g, loga, rho_a, f_work, None, **kw)
            col, colmax, qx = comm.allreduce_pass(col, colmax, qx)
        g_next, err = upd or backend.column_update(g, logb, col, colmax, log_n, rho_b)
        if accel is None:
            err = float(err)
        else:  # the dual of this pass (its f is f_work until the swap below), read with err
            af = a * xp.where(a_pos, f_work, 0.0)  # a_i = 0 rows have f_i = -inf
            local = comm.allreduce_sum(xp.stack([af.sum(), xp.abs(af).sum()]))
            bg = b * g
            err, dual, scale, g_max = (float(v) for v in to_host(xp.stack([
                xp.asarray(err, dtype=xp.float64), local[0] + bg.sum(),
                local[1] + xp.abs(bg).sum(), xp.abs(g - g.mean()).max()])))
        # A point beyond the bound is never returned (its err is not that of its plan to the
        # digit: f + g cancels); the step below rejects it.
        if best is None or ((err <= best[1] or fixed) and (accel is None or
                                                           g_max <= accel.bound)):
            f_work, f_best = f_best, f_work
            best = (g, err, qx, it)
        if (not fixed and err <= tol and best[3] == it) or not math.isfinite(err):
            break
        if stall_window is not None:
            history.append(best[1])
            if len(history) > stall_window and best[1] > 0.95 * history[-1 - stall_window]:
                stalled = True
                break
        if symmetric:
            g = 0.5 * (g + (f_best if best[3] == it else f_work))
            continue
        if accel is None:
            g = g_next if ti is None else ti(f_best if best[3] == it else f_work, g_next)
            continue
        g = accel.step(g, g_next, dual, scale, g_max)
    g, err, qx, _ = best
    converged = err <= tol
    labels = None
    if want_labels and math.isfinite(err):
        labels = backend.labels(X, alpha, g, xp.empty(N, dtype=xp.int64))
    return Solution(f_best, g, labels, it, float(err), float(qx), converged,  # it: passes
                    None if plan is None or not fixed else plan[0], stalled)


def _translation(xp, loga, logb, rho_a, rho_b, comm):
    """The translation-invariant step of Sejourne, Vialard and Peyre (2022) for KL-relaxed
    sides: after a pass, move ``(f, g)`` to ``(f + t, g - t)`` with the ``t`` that maximises
    the dual along that line, in closed form.  Near the balanced limit (``rho`` close to 1)
    plain passes converge the total mass at the rate ``rho`` (about ``reg_m / reg`` passes);
    the step removes that slow mode.  Only ``g`` is moved: the next pass recomputes ``f``.

    In the paper's potentials ``F = reg (f - log a)``, ``G = reg (g - log b)`` the dual's
    dependence on ``t`` is ``-reg_m_a A e^{-t/reg_m_a} - reg_m_b B e^{t/reg_m_b}`` with
    ``A = <a, e^{-F/reg_m_a}>``, ``B = <b, e^{-G/reg_m_b}>``; in units of ``reg``, with
    ``k = reg / reg_m = (1 - rho) / rho``: ``t = (log A - log B) / (k_a + k_b)``.
    """
    la = loga * rho_a  # the kernels are handed log a / rho_a
    lb = logb * rho_b
    ka, kb = (1.0 - rho_a) / rho_a, (1.0 - rho_b) / rho_b
    pos_a, pos_b = xp.isfinite(la), xp.isfinite(lb)

    def lse(v, mask):
        v = xp.where(mask, v, -math.inf)
        m = v.max() if v.size else xp.asarray(-math.inf)
        return m, xp.exp(v - m).sum() if v.size else xp.asarray(0.0)

    def step(f, g):
        with np.errstate(invalid="ignore"):
            ma, sa = lse(la - ka * (f - la), pos_a & xp.isfinite(f))
        if comm is not None:
            ma_all = comm.allreduce_max(xp.stack([ma]))[0]
            sa = comm.allreduce_sum(xp.stack([sa * xp.exp(ma - ma_all)]))[0]
            ma = ma_all
        mb, sb = lse(lb - kb * (g - lb), pos_b & xp.isfinite(g))
        t = float((ma + xp.log(sa) - mb - xp.log(sb)) / (ka + kb))
        return g - t if math.isfinite(t) else g

    return step


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


def drop_unconstrained_empty(backend, X, wa, loga, logb, g0, keep, check, forbidden,
                             rho_a: float, rho_b: float):
    """Rows and columns with every pair forbidden that need no pair: a row of zero mass, or
    any row (column) of a KL-relaxed side, whose plan row (column) is then zero.  They are
    solved without (one copy of X) and get f = -inf (g = -inf) afterwards; an empty row or
    column that does need a pair stays, for the validation to name.  Only looked for when
    the validation scan found an empty row or column.  Returns ``(X, loga, logb, g0, keep,
    rows, check)``: ``keep`` composes with drop_massless_columns', ``rows`` is None when
    every row is kept."""
    xp = backend.xp
    rows, changed = None, False
    if int(check["first_empty_row"]) >= 0:
        empty = ~(X != forbidden).any(axis=1)
        drop = empty & ((wa == 0) if rho_a == 1.0 else True)
        if bool(drop.any()) and not bool(drop.all()):
            rows = xp.nonzero(~drop)[0]
            X, loga = xp.ascontiguousarray(X[rows]), loga[rows]
    if int(check["first_empty_col"]) >= 0 and rho_b != 1.0:
        empty = ~(X != forbidden).any(axis=0)
        if bool(empty.any()) and not bool(empty.all()):
            cols = xp.nonzero(~empty)[0]
            X, logb = xp.ascontiguousarray(X[:, cols]), logb[cols]
            g0 = None if g0 is None else g0[cols]
            keep = cols if keep is None else keep[cols]
            changed = True
    if rows is not None or changed:
        check = backend.check(X, forbidden)
    return X, loga, logb, g0, keep, rows, check


def restore_rows(sol: Solution, rows, N: int, xp) -> Solution:
    """Undo the row dropping of drop_unconstrained_empty: f = -inf on dropped rows."""
    if rows is not None:
        f = xp.full(N, -math.inf)
        f[rows] = sol.f
        sol.f = f
        if sol.labels is not None:
            lab = xp.zeros(N, dtype=sol.labels.dtype)
            lab[rows] = sol.labels
            sol.labels = lab
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
          max_abs: float = 1.0, plan=None, symmetric: bool = False):
    """Solve to ``tol`` with the chosen accelerations, or run exactly ``n_iter`` plain passes.

    Epsilon scaling (Schmitzer 2019) applies to balanced problems solved to a tolerance
    without a warm start: stages at ``alpha / 4**k`` are solved to a loose tolerance
    (``1e-2`` of the mass), each warm-starting the next with ``g`` rescaled by the ratio of
    the ``alpha``; the last stage solves the requested problem to ``tol``.  ``max_iter``
    bounds the passes of every stage together (the last stage keeps at least one), and
    ``n_iter`` of the result counts them all.  ``L0`` (the column log-sum-exp of ``alpha
    X``, when the validation read computed it) and ``plan`` are handed to the loop (see
    :func:`sinkhorn_loop`), and so is ``symmetric`` (no acceleration then).
    """
    comm = comm if comm is not None else Local()
    fixed = n_iter is not None
    balanced = rho_a == 1.0 and rho_b == 1.0
    kw = dict(rho_a=rho_a, rho_b=rho_b, want_labels=want_labels)
    if symmetric:
        kw["symmetric"], acceleration = True, None
    stages = eps_stages(eps_scaling, alpha, max_abs) if (
        not fixed and balanced and g0 is None) else []
    passes = 0
    g0_user = g0
    if stages:
        mass = float(backend.xp.exp(loga).sum())
        mass = float(comm.allreduce_sum(backend.xp.asarray([mass]))[0])
        a_g = None  # the alpha g0 belongs to (None: no stage ran yet, g0 is None)
        for a_k in stages:
            if max_iter - passes <= 1:
                break
            st = sinkhorn_loop(backend, X, a_k, loga, logb,
                               g0=None if a_g is None else g0 * (a_k / a_g),
                               tol=max(tol, 1e-2 * mass), comm=comm,
                               acceleration=acceleration,
                               max_iter=max_iter - passes - 1, s_max=abs(a_k) * max_abs,
                               full_precision=False, **{**kw, "want_labels": False})
            passes += st.n_iter
            if not math.isfinite(st.err):  # reported by the caller
                return st
            g0, a_g = st.g, a_k
        if a_g is not None:
            g0 = g0 * (alpha / a_g)
    rest = max_iter - passes
    accelerated = not fixed and (passes > 0 or acceleration is not None)
    sol = _final(backend, X, alpha, loga, logb, g0=g0, L0=None if passes else L0, tol=tol,
                 n_iter=n_iter, comm=comm, acceleration=acceleration, max_iter=rest,
                 s_max=abs(alpha) * max_abs,
                 stall_window=STALL_WINDOW if accelerated else None, plan=plan, **kw)
    if sol.stalled:
        # Extrapolation, or the warm start of the stages, can leave the iterate on a plateau
        # (a column starved of mass that must come back through exponentially small entries)
        # that plain passes from the cold start do not meet: restart with those.
        passes += sol.n_iter
        if max_iter > passes:
            cold = _final(backend, X, alpha, loga, logb, g0=g0_user, L0=L0, tol=tol,
                          n_iter=None, comm=comm, acceleration=None,
                          max_iter=max_iter - passes, s_max=abs(alpha) * max_abs, **kw)
            passes += cold.n_iter
            if cold.err <= sol.err:
                sol = cold
        sol.n_iter = 0  # every pass is counted in passes
    sol.n_iter += passes
    return sol


# Passes of an accelerated solve that must cut the best err by 5%, else plain passes restart
# (Anderson's slowest regular progress seen, on peaked problems, is about 5% in 10 passes).
STALL_WINDOW = 100


def _final(backend, X, alpha, loga, logb, *, comm, acceleration, n_iter, s_max,
           stall_window=None, plan=None, **kw):
    """The solve at the requested ``alpha``: the generic loop, or the backend's own for plain
    passes (on the GPU a device-side loop)."""
    fixed = n_iter is not None
    if not comm.local or (acceleration is not None and not fixed) or stall_window or \
            kw.get("symmetric"):
        return sinkhorn_loop(backend, X, alpha, loga, logb, n_iter=n_iter, comm=comm,
                             acceleration=acceleration, s_max=s_max,
                             stall_window=stall_window, plan=plan, **kw)
    if plan is not None:
        kw["plan"] = plan
    return backend.solve(X, alpha, loga, logb, n_iter=n_iter, **kw)
