"""Feasibility of a transport support: is there a plan with marginals ``a``, ``b`` that uses
only the allowed pairs?  By max-flow / min-cut (Hall's condition for weighted sides): a
source feeds row ``i`` with ``a_i``, every allowed pair carries any amount, column ``j`` feeds
the sink with ``b_j``; a plan exists iff the maximum flow carries all the mass.

Rows with the same allowed pattern are one node of the flow network (their masses add up),
and so are columns: a plan of the merged problem splits in proportion to the masses, so the
check is exact, and masks built from a few classes (rows of one class allow the same
clusters) reduce to a network of a few nodes.  Balanced solves run it before the first pass
where that network is small (:func:`precheck`), else only after a solve that did not
converge (:func:`diagnose`).
"""
from __future__ import annotations

import math

import numpy as np

# Units of mass in the integer flow (scipy's maximum_flow takes int32 capacities).
_UNITS = 1 << 28
# Largest number of pairs checked (the masks cost a byte a pair, the flow graph ~30 B).
MAX_PAIRS = 1 << 24
# Largest merged network (row patterns x column patterns) checked before a solve: its
# max-flow takes milliseconds, while the mask and its merge cost about one pass.
UPFRONT_PAIRS = 1 << 16


def _patterns(mask):
    """``(first, inverse)``: a representative row of each distinct row of boolean ``mask``
    and the pattern index of every row."""
    packed = np.ascontiguousarray(np.packbits(mask, axis=1))
    keys = packed.view(np.dtype((np.void, packed.shape[1]))).ravel()
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    return first, inverse.ravel()


class _Merged:
    """The support with rows (and columns) of equal allowed patterns merged."""

    def __init__(self, allowed):
        self.fr, self.ir = _patterns(allowed)
        self.fc, self.ic = _patterns(allowed.T)
        self.allowed = allowed[np.ix_(self.fr, self.fc)]

    @property
    def pairs(self):
        return self.allowed.size


def _shown(idx):
    return ", ".join(str(int(v)) for v in idx[:8]) + (", ..." if idx.size > 8 else "")


def check_support(allowed, a, b, name: str, merged=None, row_index=None, col_index=None):
    """Raise ``ValueError`` when no plan with marginals ``a``, ``b`` (host float64 arrays of
    equal total) lives on ``allowed`` (host boolean (n, m)).

    The capacities are rounded in the problem's favour (row supplies down, column demands
    up), so a reported infeasibility is certain; one smaller than about ``(n + m) / 2**28``
    of the mass can pass unnoticed (the solve then reports its err honestly).  The message
    names the rows of the violating block and the only columns they allow (``row_index``,
    ``col_index``: the caller's indices of ``allowed``'s rows and columns).
    """
    from scipy import sparse
    from scipy.sparse.csgraph import breadth_first_order, maximum_flow

    M = _Merged(allowed) if merged is None else merged
    tot = float(a.sum())
    if not tot > 0:
        return
    A = np.bincount(M.ir, weights=a, minlength=M.fr.size)
    B = np.bincount(M.ic, weights=b, minlength=M.fc.size) * (tot / float(b.sum()))
    n, m = M.allowed.shape
    unit = _UNITS / tot
    cap_a = np.floor(A * unit).astype(np.int64)
    cap_b = np.ceil(B * unit).astype(np.int64)
    need = int(cap_a.sum())
    ii, jj = np.nonzero(M.allowed)
    src, sink = n + m, n + m + 1
    rows = np.concatenate([np.full(n, src), ii, n + np.arange(m)])
    cols = np.concatenate([np.arange(n), n + jj, np.full(m, sink)])
    caps = np.concatenate([cap_a, np.full(ii.size, need + 1), cap_b]).astype(np.int32)
    G = sparse.csr_array((caps, (rows, cols)), shape=(n + m + 2, n + m + 2))
    res = maximum_flow(G, src, sink, method="dinic")
    if res.flow_value >= need:
        return
    # The min cut: rows still reachable from the source in the residual graph hold more
    # mass than their allowed columns (all reachable too) can take.
    # (scipy's flow is antisymmetric: G - flow is the residual graph, reverse edges included)
    R = (G - res.flow).tocsr()
    R.data = (R.data > 0).astype(np.int8)
    R.eliminate_zeros()
    reach = breadth_first_order(R, src, directed=True, return_predecessors=False)
    bad_r = np.zeros(n, dtype=bool)
    bad_c = np.zeros(m, dtype=bool)
    bad_r[reach[reach < n]] = True
    bad_c[reach[(reach >= n) & (reach < n + m)] - n] = True
    rows_out = np.nonzero(bad_r[M.ir])[0]
    cols_out = np.nonzero(bad_c[M.ic])[0]
    mass_r, mass_c = float(a[rows_out].sum()), float(b[cols_out].sum() * tot / b.sum())
    if row_index is not None:
        rows_out = np.asarray(row_index)[rows_out]
    if col_index is not None:
        cols_out = np.asarray(col_index)[cols_out]
    raise ValueError(
        f"infeasible problem: rows {_shown(rows_out)} of {name} ({rows_out.size} rows, mass "
        f"{mass_r:.6g}) allow only columns {_shown(cols_out)} ({cols_out.size} columns, "
        f"total mass {mass_c:.6g}): no plan through the allowed pairs meets the marginals")


def _host_support(p):
    """The allowed pattern of a prepared balanced problem (``_problem.Problem``) on the
    host, its marginals on the solved rows and kept columns, and those rows' and columns'
    indices in the caller's matrix; None where the matrix is too large to check."""
    X = p.Xs
    if X.size > MAX_PAIRS:
        return None
    from ._arrays import to_host

    allowed = np.asarray(to_host(p.xp.isfinite(X)))
    a = np.asarray(to_host(p.a[0] if p.rows is None else p.a[0][p.rows]), dtype=np.float64)
    b = np.asarray(to_host(p.b[0] if p.keep is None else p.b[0][p.keep]), dtype=np.float64)
    rows = None if p.rows is None else np.asarray(to_host(p.rows))
    cols = None if p.keep is None else np.asarray(to_host(p.keep))
    return allowed, a, b, rows, cols


def _balanced(p):
    return p.reducer.local and p.rho_a == 1.0 and p.rho_b == 1.0 and p.opts.n_iter is None


def precheck(p) -> bool:
    """Before a balanced solve to a tolerance on the host: raise if the support admits no
    plan, where that is cheap (the merged network has at most ``UPFRONT_PAIRS`` pairs).
    Returns whether the support was checked (then :func:`diagnose` has nothing to add).

    Without forbidden pairs it costs one reduction over the matrix (its extreme value)."""
    if not _balanced(p) or p.xp is not np or p.Xs.size == 0:
        return False
    X = p.Xs
    extreme = X.min() if p.alpha > 0 else X.max()
    if not math.isinf(float(extreme)):  # no forbidden pair (NaN was rejected before)
        return True
    support = _host_support(p)
    if support is None:
        return False
    allowed, a, b, rows, cols = support
    M = _Merged(allowed)
    if M.pairs > UPFRONT_PAIRS:
        return False
    check_support(allowed, a, b, p.name, M, rows, cols)
    return True


def diagnose(p, sol, checked: bool) -> None:
    """After a balanced solve to a tolerance that did not converge on a matrix with forbidden
    pairs, raise if the support admits no plan at all (only then, unless :func:`precheck`
    did already: the max-flow can cost a fair part of a solve, and a converging solve
    proves feasibility)."""
    if checked or sol.converged or not _balanced(p):
        return
    support = _host_support(p)
    if support is None:
        return
    allowed, a, b, rows, cols = support
    if bool(allowed.all()):
        return
    check_support(allowed, a, b, p.name, None, rows, cols)
