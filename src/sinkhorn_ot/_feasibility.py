"""Feasibility of a transport support: is there a plan with marginals ``a``, ``b`` that uses
only the allowed pairs?  By max-flow / min-cut (Hall's condition for weighted sides): a
source feeds row ``i`` with ``a_i``, every allowed pair carries any amount, column ``j`` feeds
the sink with ``b_j``; a plan exists iff the maximum flow carries all the mass.
"""
from __future__ import annotations

import numpy as np

# Units of mass in the integer flow (scipy's maximum_flow takes int32 capacities).
_UNITS = 1 << 28
# Largest number of pairs checked (the flow graph costs ~30 B a pair).
MAX_PAIRS = 1 << 24


def check_support(allowed, a, b, name: str):
    """Raise ``ValueError`` when no plan with marginals ``a``, ``b`` (host float64 arrays of
    equal total) lives on ``allowed`` (host boolean (n, m)).

    The capacities are rounded in the problem's favour (row supplies down, column demands
    up), so a reported infeasibility is certain; one smaller than about ``(n + m) / 2**28``
    of the mass can pass unnoticed (the solve then reports its err honestly).
    """
    from scipy import sparse
    from scipy.sparse.csgraph import breadth_first_order, maximum_flow

    n, m = allowed.shape
    tot = float(a.sum())
    if not tot > 0:
        return
    unit = _UNITS / tot
    cap_a = np.floor(a * unit).astype(np.int64)
    cap_b = np.ceil(b * (tot / float(b.sum())) * unit).astype(np.int64)
    need = int(cap_a.sum())
    ii, jj = np.nonzero(allowed)
    inf = need + 1
    src, sink = n + m, n + m + 1
    rows = np.concatenate([np.full(n, src), ii, n + np.arange(m)])
    cols = np.concatenate([np.arange(n), n + jj, np.full(m, sink)])
    caps = np.concatenate([cap_a, np.full(ii.size, inf), cap_b]).astype(np.int32)
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
    reach = reach[reach != src]
    bad_rows = np.sort(reach[reach < n])
    bad_cols = np.sort(reach[(reach >= n) & (reach < n + m)] - n)
    shown = ", ".join(str(int(r)) for r in bad_rows[:8]) + (", ..." if bad_rows.size > 8 else "")
    raise ValueError(
        f"infeasible problem: rows {shown} of {name} ({bad_rows.size} rows, mass "
        f"{float(a[bad_rows].sum()):.6g}) allow only columns whose total mass is "
        f"{float(b[bad_cols].sum() * tot / b.sum()):.6g}: no plan through the allowed pairs "
        "meets the marginals")


def diagnose(sol, X, wa, wb, name: str, xp, balanced: bool, fixed: bool):
    """After a balanced solve to a tolerance that did not converge on a matrix with forbidden
    pairs, raise if the support admits no plan at all (run only then: it costs about a
    solve's worth of passes, and a converging solve proves feasibility)."""
    if sol.converged or fixed or not balanced or X.size > MAX_PAIRS:
        return
    allowed = xp.isfinite(X)
    if bool(allowed.all()):
        return
    from ._arrays import to_host

    check_support(np.asarray(to_host(allowed)), np.asarray(to_host(wa), dtype=np.float64),
                  np.asarray(to_host(wb), dtype=np.float64), name)
