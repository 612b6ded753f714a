"""Exact (unregularised) optimal transport by linear programming: :func:`emd`.

A host solver for small problems and references: a transport simplex (sinkhorn_ot._simplex)
started from :func:`scipy.optimize.linear_sum_assignment` for assignment problems, else from
the vertex HiGHS (:func:`scipy.optimize.linprog`) finds on the few pairs a coarse entropic
plan favours.
"""
from __future__ import annotations

import math

import numpy as np

from . import _validation as V
from ._arrays import to_native
from ._results import EMDResult

__all__ = ["emd", "EMD_MAX_ENTRIES", "ASSIGNMENT_MAX_N"]

#: Largest ``n * m`` :func:`emd` accepts.  The simplex keeps a few dense float64 ``n x m``
#: arrays and its pivots grow in number and in cost with ``n + m``, so its run time grows
#: faster than ``n * m``.
EMD_MAX_ENTRIES = 2_000_000
#: Largest ``n`` for the assignment path (a dense float64 ``n x n`` cost, O(n^3) time).
ASSIGNMENT_MAX_N = 5_000
#: Entropic regularisation of the start of the exact finish, relative to the cost range.
START_REG = 0.003


def _host_matrix(C, name):
    native = to_native(C, name)
    arr = native.array
    if native.device == "cuda":  # a small host problem: one copy back
        arr = arr.get()
        native = to_native(arr, name)
    return V.matrix(native, name, np), native


def check_size(n: int, m: int, max_entries=None):
    """Raise ValueError, before any work, when the LP is too large."""
    cap = EMD_MAX_ENTRIES if max_entries is None else int(max_entries)
    if n * m > cap:
        raise ValueError(f"emd: problem too large for the exact LP: n * m = {n} * {m} = "
                         f"{n * m:,} variables exceeds the limit max_entries = {cap:,} "
                         f"(sinkhorn_ot.EMD_MAX_ENTRIES); use sinkhorn with a small reg, or "
                         f"raise max_entries if you have the memory and time")


def _uniform(w, wfull):
    return w is None or bool(np.all(wfull == wfull[0]))


def emd(C, a=None, b=None, *, max_entries=None) -> EMDResult:
    r"""Exact optimal transport: the unregularised transport linear program.

    Solves

    .. math::

        \min_{P \ge 0,\; P 1 = a,\; P^T 1 = b} \langle P, C\rangle

    and its dual :math:`\max_{f_i + g_j \le C_{ij}} \langle a, f\rangle + \langle b,
    g\rangle`.  With ``n == m`` and uniform marginals it is an assignment problem, started
    by :func:`scipy.optimize.linear_sum_assignment`; otherwise a coarse entropic plan (a
    few Sinkhorn passes on one thread) picks each row's and column's few most likely
    pairs, and HiGHS (:func:`scipy.optimize.linprog`, dual simplex) solves the LP on them.
    Either answer only starts an exact finish: its support is made a spanning-tree basis
    and the transport simplex pivots until every reduced cost is nonnegative, so the plan
    meets ``a`` and ``b`` to round-off, its cost is optimal to round-off, and the duals
    certify it (no reliance on HiGHS's tolerances, nor on its verdict of
    infeasibility).  The plan returned is a basic (vertex) solution, so it has at
    most ``n + m - 1`` nonzeros, and it is integral when ``a`` and ``b`` are.

    Parameters
    ----------
    C : array of float, shape (n, m)
        Cost matrix; ``+inf`` marks a forbidden pair.  Any array family is accepted (a
        CUDA array is copied to the host); results are always NumPy / SciPy.
    a : array of float, shape (n,), optional
        Row marginal, uniform ``1/n`` by default.
    b : array of float, shape (m,), optional
        Column marginal, uniform ``1/m`` by default.  Its total must equal ``sum(a)`` to a
        relative 1e-6; it is rescaled to ``sum(a)`` exactly.
    max_entries : int, optional
        Limit on ``n * m`` (default :data:`EMD_MAX_ENTRIES`, 2,000,000); larger problems
        raise ``ValueError`` before any work.  The assignment path also needs
        ``n <= ASSIGNMENT_MAX_N`` (5,000), else it uses the LP.

    Returns
    -------
    EMDResult
        ``cost``, the duals ``f`` (n,) and ``g`` (m,), ``method`` and ``plan()``, a
        ``scipy.sparse.csr_array`` (n, m).

    Raises
    ------
    ValueError
        Too large; invalid ``C``, ``a`` or ``b``; a row or column with every pair forbidden;
        or no feasible plan through the allowed pairs.

    Examples
    --------
    >>> import numpy as np, sinkhorn_ot
    >>> C = np.array([[0.0, 2.0], [1.0, 0.0], [3.0, 1.0]])
    >>> res = sinkhorn_ot.emd(C, a=[0.4, 0.3, 0.3], b=[0.5, 0.5])
    >>> round(res.cost, 12)
    0.4
    >>> res.plan().toarray()
    array([[0.4, 0. ],
           [0.1, 0.2],
           [0. , 0.3]])

    References
    ----------
    G. Peyre, M. Cuturi, "Computational optimal transport", Foundations and Trends in
    Machine Learning 11, 2019, chapter 3.

    Q. Huangfu, J. A. J. Hall, "Parallelizing the dual revised simplex method",
    Mathematical Programming Computation 10, 2018 (HiGHS).
    """
    from scipy import optimize, sparse

    X, native = _host_matrix(C, "C")
    n, m = X.shape
    check_size(n, m, max_entries)
    ma, mb = V.marginal(a, n, "a", np), V.marginal(b, m, "b", np)
    (wa, _), (wb, _) = ma, mb
    V.balanced_totals(ma.total, mb.total)
    wb = wb * (ma.total / mb.total)
    check = _check(X)
    Xd = np.asarray(X, dtype=np.float64)
    ri, ci = _massless_empty(Xd, wa, wb, check)
    if ri is not None:  # solve without them: their plan rows / columns are zero
        sub = emd(Xd[np.ix_(ri, ci)], wa[ri], wb[ci], max_entries=max_entries)
        P = sub.plan().tocoo()
        f, g = np.zeros(n), np.zeros(m)  # no pair constrains their duals
        f[ri], g[ci] = sub.f, sub.g
        plan = sparse.csr_array((P.data, (ri[P.row], ci[P.col])), shape=(n, m))
        return EMDResult(cost=sub.cost, f=f, g=g, method=sub.method, _plan=plan)
    V.matrix_values(check, X.shape, "C", math.inf, 1.0, native.dtype)

    finite = np.isfinite(Xd)
    assignment = n == m and n <= ASSIGNMENT_MAX_N and _uniform(a, wa) and _uniform(b, wb)
    if assignment:
        try:
            rows, cols = optimize.linear_sum_assignment(Xd)
        except ValueError as exc:  # "cost matrix is infeasible"
            raise ValueError("emd: infeasible problem: no assignment avoids the forbidden "
                             "(+inf) pairs") from exc
        start = list(zip(rows.tolist(), cols.tolist()))
    Cm = _big_m(Xd, finite)
    duals = None
    if not assignment:
        score, duals = _entropic_scores(Xd, finite, wa, wb)
        start = _greedy_start(score, wa, wb)
        lp = _highs_start(Cm, score, start, wa, wb)
        if lp is not None:
            start, duals = lp
    rows, cols, x, f, g = _finish(Cm, finite, wa, wb, start, duals)
    keep = x > 0
    plan = sparse.csr_array((x[keep], (rows[keep], cols[keep])), shape=(n, m))
    cost = float(np.dot(x[keep], Xd[rows[keep], cols[keep]]))
    return EMDResult(cost=cost, f=f, g=g, method="assignment" if assignment else "simplex",
                     _plan=plan)


def _massless_empty(Xd, wa, wb, check):
    """Indices of the rows and columns to keep when every row or column with every pair
    forbidden has zero mass (and at least one has); else (None, None)."""
    if int(check["first_empty_row"]) < 0 and int(check["first_empty_col"]) < 0:
        return None, None
    if int(check["first_invalid"]) >= 0:
        return None, None
    allowed = np.isfinite(Xd)
    er, ec = ~allowed.any(axis=1), ~allowed.any(axis=0)
    if (wa[er] > 0).any() or (wb[ec] > 0).any() or er.all() or ec.all():
        return None, None  # the validation names the row or column
    return np.nonzero(~er)[0], np.nonzero(~ec)[0]


def _entropic_scores(Xd, finite, wa, wb):
    """How much a coarse entropic plan favours each pair (its log, up to a constant: ``f_i +
    g_j - C_ij`` in cost units; ``-inf`` on forbidden pairs) and its duals ``(f, g)``; the
    negated cost and ``None`` where the entropic solve cannot answer.

    Regularisation ``START_REG`` times the cost range and a loose tolerance: a few dozen
    passes of the compiled core, on one thread (the simplex that follows runs on one)."""
    import warnings

    from ._api import sinkhorn

    fin = Xd[finite]
    span = float(fin.max() - fin.min()) if fin.size else 0.0
    C = np.where(finite, Xd, np.inf)
    if span > 0 and min(Xd.shape) > 1:
        reg = START_REG * span
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # unconverged is good enough for a start
                res = sinkhorn(C, wa, wb, reg=reg, tol=1e-2 * float(wa.sum()), max_iter=200,
                               n_threads=1)
            f = reg * np.asarray(res.f, dtype=np.float64)
            g = reg * np.asarray(res.g, dtype=np.float64)
            if np.isfinite(f).all() and np.isfinite(g).all():
                return f[:, None] + g[None, :] - C, (f, g)
        except (ValueError, ArithmeticError):  # e.g. an infeasible support: the finish says so
            pass
    return -C, None


def _top(score, k):
    """Boolean mask of each row's and each column's ``k`` largest scores."""
    n, m = score.shape
    sel = np.zeros((n, m), dtype=bool)
    k_r, k_c = min(k, m), min(k, n)
    sel[np.arange(n)[:, None], np.argpartition(-score, k_r - 1, axis=1)[:, :k_r]] = True
    sel[np.argpartition(-score, k_c - 1, axis=0)[:k_c, :], np.arange(m)[None, :]] = True
    return sel & np.isfinite(score)


def _greedy_start(score, wa, wb, k_near=8):
    """A feasible basic start: the least-cost method (each pair in turn takes all the mass
    its row and column still have; every step exhausts a row or a column, so the pairs form a
    forest) over each row's and each column's ``k_near`` best-scored pairs, best first; the
    rows and columns left with mass then by the northwest corner."""
    from ._simplex import _northwest

    n, m = score.shape
    flat = np.flatnonzero(_top(score, k_near))
    flat = flat[np.argsort(-score.ravel()[flat], kind="stable")]
    ra, rb = wa.tolist(), wb.tolist()
    tiny = 1e-15 * float(wa.sum())
    start = []
    for k in flat.tolist():
        i, j = divmod(k, m)
        t = min(ra[i], rb[j])
        if t > 0:
            ra[i] = ra[i] - t if ra[i] - t > tiny else 0.0
            rb[j] = rb[j] - t if rb[j] - t > tiny else 0.0
            start.append((i, j))
    rest_r = [i for i in range(n) if ra[i] > 0]
    rest_c = [j for j in range(m) if rb[j] > 0]
    if rest_r and rest_c:
        nw = _northwest(np.array([ra[i] for i in rest_r]), np.array([rb[j] for j in rest_c]))
        start += [(rest_r[p], rest_c[q]) for p, q in nw]
    return start


def _highs_start(Cm, score, greedy, wa, wb, k=3):
    """The vertex HiGHS finds on a small LP, largest flow first, and its duals: the pairs of
    ``greedy`` (so the LP is feasible) and each row's and column's ``k`` best-scored pairs.
    On the entropic scores that LP holds nearly all of the optimal support, so the simplex
    finishes in a few hundred pivots.  ``None`` when HiGHS fails (its presolve, off here,
    and its tolerances can call a feasible problem infeasible)."""
    from scipy import optimize, sparse

    n, m = Cm.shape
    sel = _top(score, k)
    if greedy:
        g = np.array(greedy)
        sel[g[:, 0], g[:, 1]] = True
    ii, jj = np.nonzero(sel)
    nnz = ii.size
    kk = np.arange(nnz)
    A = sparse.csr_array((np.ones(2 * nnz), (np.concatenate([ii, n + jj]),
                                             np.concatenate([kk, kk]))), shape=(n + m, nnz))
    scale = float(wa.sum())  # marginals of total 1 for HiGHS's tolerances
    res = optimize.linprog(Cm[ii, jj], A_eq=A, b_eq=np.concatenate([wa, wb]) / scale,
                           bounds=(0, None), method="highs-ds", options={"presolve": False})
    if res.status != 0 or res.x is None:
        return None
    x = res.x
    order = np.argsort(-x, kind="stable")
    order = order[x[order] > 0]
    duals = np.asarray(res.eqlin.marginals, dtype=np.float64)
    return list(zip(ii[order].tolist(), jj[order].tolist())), (duals[:n], duals[n:])


def _big_m(Xd, finite):
    """The cost with forbidden pairs at a big-M larger than any cycle of allowed costs can
    save, so an optimum uses one only when the problem is infeasible."""
    n, m = Xd.shape
    fin = Xd[finite]
    span = float(fin.max() - fin.min()) if fin.size else 0.0
    big = float(np.abs(fin).max() if fin.size else 0.0) + 2.0 * (n + m) * span + 1.0
    return np.where(finite, Xd, big)


def _finish(Cm, finite, wa, wb, start, duals):
    """The exact transport simplex (sinkhorn_ot._simplex) from ``start``; on an infeasible
    support, the max-flow names the rows that cannot be served and the columns they allow."""
    from ._feasibility import check_support
    from ._simplex import Infeasible, finish

    try:
        return finish(Cm, wa, wb, start, duals=duals, forbidden=~finite)
    except Infeasible as exc:
        check_support(finite, wa, wb, "C")
        raise ValueError(str(exc)) from None


def _check(X):
    from . import _core

    return _core.check_matrix(X, math.inf, 0)
