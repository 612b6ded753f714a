"""Unbalanced (KL-relaxed) entropic optimal transport: :func:`sinkhorn_unbalanced`."""
from __future__ import annotations

import math
import numbers

import numpy as np

from . import _batched, _problem
from . import _validation as V
from ._results import UnbalancedResult

__all__ = ["sinkhorn_unbalanced"]


def _reg_m_value(v, name):
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number or inf, got {type(v).__name__}")
    v = float(v)
    if not v > 0:  # also rejects NaN
        raise ValueError(f"{name} must be positive (inf keeps that side exact), got {v!r}")
    return v


def reg_m_pair(reg_m):
    """(reg_m_a, reg_m_b) from a number or a pair; each positive, inf allowed."""
    if isinstance(reg_m, (tuple, list)) or (hasattr(reg_m, "__len__") and
                                            not isinstance(reg_m, str)):
        if len(reg_m) != 2:
            raise ValueError(f"reg_m must be a number or a pair (reg_m_a, reg_m_b), got "
                             f"{len(reg_m)} values")
        return _reg_m_value(reg_m[0], "reg_m[0]"), _reg_m_value(reg_m[1], "reg_m[1]")
    v = _reg_m_value(reg_m, "reg_m")
    return v, v


def relaxation(reg_m: float, reg: float) -> float:
    """rho = reg_m / (reg_m + reg); 1 (an exact side) for reg_m = inf."""
    return 1.0 if math.isinf(reg_m) else reg_m / (reg_m + reg)


def _xlogy_sum(xp, x, logx, logy):
    """sum x (log x - log y), with 0 log 0 = 0."""
    t = xp.where(x > 0, x * (logx - logy), 0.0)
    return float(t.sum())


def sinkhorn_unbalanced(C, a=None, b=None, *, reg, reg_m, tol=None, max_iter=1000,
                        n_iter=None, init=None, n_threads=None) -> UnbalancedResult:
    r"""Unbalanced entropic optimal transport: marginals relaxed by KL penalties.

    Solves (Chizat et al. 2018; the convention of POT's ``ot.sinkhorn_unbalanced`` with
    ``reg_type="kl"``)

    .. math::

        \min_{Q \ge 0} \langle Q, C\rangle + \mathrm{reg}\,\mathrm{KL}(Q \,\|\, a b^T)
            + \mathrm{reg\_m}_a \mathrm{KL}(Q 1 \,\|\, a)
            + \mathrm{reg\_m}_b \mathrm{KL}(Q^T 1 \,\|\, b)

    with the generalised divergence :math:`\mathrm{KL}(x\|y) = \sum x \log(x/y) - \sum x +
    \sum y`.  The plan is ``Q = exp(-C / reg + f[:, None] + g[None, :])``; the log-domain
    updates are the balanced ones scaled on each relaxed side by
    :math:`\rho = \mathrm{reg\_m} / (\mathrm{reg\_m} + \mathrm{reg})`:

    .. math::

        f_i = \log a_i - \rho_a \operatorname{LSE}_j(-C_{ij}/\mathrm{reg} + g_j), \qquad
        g_j = \log b_j - \rho_b \operatorname{LSE}_i(-C_{ij}/\mathrm{reg} + f_i),

    run in the same fused pass as :func:`sinkhorn`.  ``reg_m = inf`` on a side keeps that
    marginal exact (semi-relaxed OT; ``inf`` on both sides is balanced Sinkhorn).

    Parameters
    ----------
    C : array of float, shape (n, m) or (B, n, m)
        Cost matrix (NumPy, CuPy or a ``__dlpack__`` array, as in :func:`sinkhorn`);
        ``+inf`` marks a forbidden pair.  A leading axis is a batch of ``B`` problems,
        solved one by one by this function (``a``, ``b``: ``(n,)``/``(m,)`` shared or
        ``(B, n)``/``(B, m)``); every result field gains the batch axis (:doc:`batched`).
    a : array of float, shape (n,), optional
        Row reference measure, uniform ``1/n`` by default.  Totals of ``a`` and ``b`` may
        differ.
    b : array of float, shape (m,), optional
        Column reference measure, uniform ``1/m`` by default.
    reg : float
        Entropic regularisation (``> 0``).
    reg_m : float or (float, float)
        Marginal relaxation strength, one value for both sides or ``(reg_m_a, reg_m_b)``;
        each positive, ``inf`` allowed.
    tol : float, optional
        Stop when ``err``, the L1 violation of the optimality conditions on the column
        sums (``||Q^T 1 - b~||_1``, see :class:`UnbalancedResult`), is at most ``tol``.
        Default ``1e-6`` (float64) or ``1e-5`` (float32) times ``sum(a)``.
    max_iter, n_iter, init, n_threads
        As in :func:`sinkhorn`.

    Returns
    -------
    UnbalancedResult
        Potentials, ``cost = <Q, C>``, the full ``objective``, the marginal errors against
        the relaxed targets (``err_a``, ``err_b``) and the input marginals (``dev_a``,
        ``dev_b``), ``row_sums``, ``col_sums``, ``mass`` and ``plan()``.  Measuring the
        column sums costs one extra pass over ``C``.

    Examples
    --------
    >>> import numpy as np, sinkhorn_ot
    >>> C = np.array([[0.0, 1.0], [1.0, 0.0]])
    >>> res = sinkhorn_ot.sinkhorn_unbalanced(C, a=[0.5, 0.5], b=[0.9, 0.1], reg=0.1,
    ...                                       reg_m=1.0)
    >>> np.round(res.plan(), 3)
    array([[0.611, 0.   ],
           [0.103, 0.165]])
    >>> res = sinkhorn_ot.sinkhorn_unbalanced(C, a=[0.5, 0.5], b=[0.9, 0.1], reg=0.1,
    ...                                       reg_m=(float("inf"), 1.0))
    >>> np.round(res.row_sums, 6), np.round(res.col_sums, 3)   # rows exact: semi-relaxed
    (array([0.5, 0.5]), array([0.799, 0.201]))

    References
    ----------
    L. Chizat, G. Peyre, B. Schmitzer, F.-X. Vialard, "Scaling algorithms for unbalanced
    optimal transport problems", Mathematics of Computation 87, 2018.

    S. Sejourne, J. Feydy, F.-X. Vialard, A. Trouve, G. Peyre, "Sinkhorn divergences for
    unbalanced optimal transport", arXiv:1910.12958, 2019.
    """
    if _batched.is_batch(C):
        return _batched.sinkhorn_unbalanced(C, a, b, reg=reg, reg_m=reg_m, tol=tol,
                                            max_iter=max_iter, n_iter=n_iter, init=init,
                                            n_threads=n_threads)
    reg = V.positive_scalar(reg, "reg")
    reg_m_a, reg_m_b = reg_m_pair(reg_m)
    opts = _problem.options(tol=tol, max_iter=max_iter, n_iter=n_iter, n_threads=n_threads,
                            init=init)
    rho_a, rho_b = relaxation(reg_m_a, reg), relaxation(reg_m_b, reg)
    alpha = -1.0 / reg
    p = _problem.prepare(C, "C", alpha=alpha, a=a, b=b, rho_a=rho_a, rho_b=rho_b, opts=opts,
                         want_labels=False, balanced=rho_a == 1.0 and rho_b == 1.0,
                         reducer=_problem.reducer(None))
    sol = _problem.run(p)
    xp, backend, X = p.xp, p.backend, p.X
    n = X.shape[0]
    (wa, loga), (wb, logb) = p.a, p.b
    f, g = sol.f, sol.g
    # Marginals of the returned plan.  The f update makes the rows meet their relaxed target
    # exactly: log(Q 1)_i = LSE_y(S_iy + g_y) + f_i = log a_i / rho_a + f_i (1 - 1 / rho_a).
    # The columns are measured by one more pass at the returned g with the solver's own
    # arguments: it recomputes the same f and returns the column sums of Q(f, g).
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        # f = -inf: a row of zero mass, or a relaxed row with every pair forbidden (no plan)
        log_r = xp.where(xp.isneginf(loga) | xp.isneginf(f), -math.inf,
                         loga / rho_a + f * (1 - 1 / rho_a))
        c, _, _ = backend.fused_pass(X, alpha, g, loga / rho_a, rho_a, xp.empty(n), None)
        log_c = xp.log(c)
        r = xp.exp(log_r)

        def target(logw, pot, rho):
            if rho == 1.0:
                return xp.exp(logw)
            return xp.where(xp.isneginf(logw) | xp.isneginf(pot), 0.0,
                            xp.exp(logw / rho + pot * (1 - 1 / rho)))

        ta, tb = target(loga, f, rho_a), target(logb, g, rho_b)
        err_a, err_b = float(xp.abs(r - ta).sum()), float(xp.abs(c - tb).sum())
        dev_a, dev_b = float(xp.abs(r - wa).sum()), float(xp.abs(c - wb).sum())
        mass, ma, mb = float(r.sum()), float(wa.sum()), float(wb.sum())
        # KL(Q | a b^T) = sum Q (log Q - log a_i - log b_j) - mass + ma mb, with
        # log Q = S + f + g and sum Q S = -cost / reg.
        cost = sol.qx
        kl_q = (-cost / reg + _xlogy_sum(xp, r, f, loga) + _xlogy_sum(xp, c, g, logb)
                - mass + ma * mb)
        obj = cost + reg * kl_q
        if not math.isinf(reg_m_a):
            obj += reg_m_a * (_xlogy_sum(xp, r, log_r, loga) - mass + ma)
        if not math.isinf(reg_m_b):
            obj += reg_m_b * (_xlogy_sum(xp, c, log_c, logb) - mass + mb)
    for arr in (r, c):
        if isinstance(arr, np.ndarray):
            arr.setflags(write=False)
    wrap = p.native.wrap
    return UnbalancedResult(**_problem.result_fields(p, sol, cost), objective=float(obj),
                            err_a=err_a, err_b=err_b, dev_a=dev_a, dev_b=dev_b, mass=mass,
                            row_sums=wrap(r), col_sums=wrap(c))
