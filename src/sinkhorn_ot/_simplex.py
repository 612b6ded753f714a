"""Exact finishing of a transport LP: the network (transport) simplex on a spanning-tree basis.

HiGHS returns a vertex to its tolerances (marginals off by ~1e-7, reduced costs by as much,
and sometimes a false "infeasible").  The transport polytope's vertices are spanning trees of
the bipartite row-column graph, and on a tree everything is exact arithmetic's business:
the flows follow from the marginals by eliminating leaves, the duals from ``f_i + g_j =
C_ij`` on the tree edges.  :func:`finish` takes any starting support (HiGHS's, an
assignment's, or none), makes it a spanning tree, and pivots (Dantzig's rule, full pricing)
until every reduced cost is nonnegative: the plan then meets its marginals to round-off and
the duals certify its optimality.  Forbidden pairs cost ``big`` (a big-M) in the pivots; an
optimum that still uses one proves the problem infeasible.
"""
from __future__ import annotations

from collections import deque

import numpy as np


class Infeasible(ValueError):
    pass


def _find(parent, v):
    while parent[v] != v:
        parent[v] = parent[parent[v]]
        v = parent[v]
    return v


def _spanning_tree(n, m, edges, R):
    """Complete the acyclic part of ``edges`` (pairs (i, j), in priority order) to a spanning
    tree of the complete bipartite graph, adding pairs of least ``R`` (n x m)."""
    parent = list(range(n + m))
    tree = []
    for i, j in edges:
        ri, rj = _find(parent, i), _find(parent, n + j)
        if ri != rj:
            parent[ri] = rj
            tree.append((i, j))
    if len(tree) < n + m - 1:
        order = np.argsort(R, axis=None, kind="stable")
        for k in order:
            i, j = divmod(int(k), m)
            ri, rj = _find(parent, i), _find(parent, n + j)
            if ri != rj:
                parent[ri] = rj
                tree.append((i, j))
                if len(tree) == n + m - 1:
                    break
    return tree


def _adjacency(n, m, tree):
    adj = [[] for _ in range(n + m)]
    for k, (i, j) in enumerate(tree):
        adj[i].append((n + j, k))
        adj[n + j].append((i, k))
    return adj


def _flows(n, m, tree, a, b, adj):
    """Flows on the tree edges meeting the marginals exactly (leaf elimination)."""
    supply = np.concatenate([a, b]).astype(np.float64)
    deg = np.array([len(x) for x in adj])
    x = np.zeros(len(tree))
    done = np.zeros(len(tree), dtype=bool)
    leaves = deque(int(v) for v in np.nonzero(deg == 1)[0])
    while leaves:
        v = leaves.popleft()
        if deg[v] != 1:
            continue
        for u, k in adj[v]:
            if not done[k]:
                break
        else:
            continue
        done[k] = True
        x[k] = supply[v]
        supply[u] -= supply[v]
        supply[v] = 0.0
        deg[v] -= 1
        deg[u] -= 1
        if deg[u] == 1:
            leaves.append(u)
    return x


def _duals(n, m, tree, Cm, adj):
    """f, g with f_i + g_j = C_ij on the tree (f_0 = 0), and BFS parents/depths from row 0."""
    pot = np.zeros(n + m)
    par = np.full(n + m, -1)
    pedge = np.full(n + m, -1)
    depth = np.zeros(n + m, dtype=np.int64)
    seen = np.zeros(n + m, dtype=bool)
    seen[0] = True
    q = deque([0])
    while q:
        v = q.popleft()
        for u, k in adj[v]:
            if not seen[u]:
                seen[u] = True
                i, j = tree[k]
                pot[u] = Cm[i, j] - pot[v]
                par[u], pedge[u], depth[u] = v, k, depth[v] + 1
                q.append(u)
    return pot[:n], pot[n:], par, pedge, depth


def finish(Cm, a, b, start=(), *, duals=None, forbidden=None, max_pivots=None):
    """Optimal basic plan and duals of ``min <P, Cm>`` over the transport polytope.

    ``Cm`` (n x m, finite; forbidden pairs already set to ``big``), ``a``, ``b`` (same total);
    ``start``: pairs to build the first basis from (priority order), completed to a spanning
    tree by the pairs of least reduced cost under ``duals`` (approximate ``(f, g)``, e.g.
    HiGHS's: the degenerate basic pairs it had are the tight ones), or of least cost.
    Returns ``(rows, cols, flows, f, g)`` of the tree (zero flows included).  Raises
    :class:`Infeasible` when the optimum uses a ``forbidden`` pair (boolean n x m).
    """
    n, m = Cm.shape
    allowed = Cm if forbidden is None else Cm[~forbidden]
    scale = (float(np.abs(allowed).max()) if allowed.size else 0.0) + 1.0
    eps = 1e-12 * scale
    R0 = Cm if duals is None else Cm - duals[0][:, None] - duals[1][None, :]
    tree = _spanning_tree(n, m, list(start), R0)
    adj = _adjacency(n, m, tree)
    x = _flows(n, m, tree, a, b, adj)
    tot = float(a.sum())
    if (x < -1e-13 * tot).any():  # an infeasible start: rebuild from the northwest corner
        tree = _northwest(a, b)
        adj = _adjacency(n, m, tree)
        x = _flows(n, m, tree, a, b, adj)
    x = np.maximum(x, 0.0)
    limit = max_pivots if max_pivots is not None else 50 * (n + m) ** 2
    for it in range(limit + 1):
        f, g, par, pedge, depth = _duals(n, m, tree, Cm, adj)
        R = Cm - f[:, None] - g[None, :]
        k = int(np.argmin(R))
        if R.flat[k] >= -eps:
            break
        i, j = divmod(k, m)
        # the tree path from row i to column j: the cycle closed by the entering pair
        u, v = i, n + j
        up, down = [], []
        while u != v:
            if depth[u] >= depth[v]:
                up.append(pedge[u])
                u = par[u]
            else:
                down.append(pedge[v])
                v = par[v]
        path = up + down[::-1]
        signs = _signs(path)
        minus = [e for e, s in zip(path, signs) if s < 0]
        theta_k = min(minus, key=lambda e: (x[e], e))
        theta = x[theta_k]
        for e, s in zip(path, signs):
            x[e] += s * theta
        tree[theta_k] = (i, j)
        x[theta_k] = theta
        adj = _adjacency(n, m, tree)
    else:
        raise RuntimeError("emd: the transport simplex did not finish")
    # exact flows on the final tree, and duals certified by the pricing above
    x = _flows(n, m, tree, a, b, adj)
    if (x < -1e-12 * tot).any():  # the incremental flows said feasible: rounding cannot
        raise RuntimeError("emd: the transport simplex lost primal feasibility; please "
                           "report this input")
    x = np.maximum(x, 0.0)
    rows = np.array([e[0] for e in tree], dtype=np.int64)
    cols = np.array([e[1] for e in tree], dtype=np.int64)
    if forbidden is not None and (x[forbidden[rows, cols]] > 0).any():
        raise Infeasible("emd: infeasible problem: the marginals cannot be met through the "
                         "allowed (finite-cost) pairs")
    return rows, cols, x, f, g


def _signs(path):
    """-1, +1, -1, ... along the path from the entering pair's row: that row sends theta
    more through the entering pair, so its tree edge carries theta less, and so on."""
    return [-1 if k % 2 == 0 else 1 for k in range(len(path))]


def _northwest(a, b):
    n, m = a.size, b.size
    ra, rb = a.astype(np.float64).copy(), b.astype(np.float64).copy()
    i = j = 0
    tree = []
    while i < n and j < m:
        tree.append((i, j))
        if i == n - 1:
            j += 1
        elif j == m - 1:
            i += 1
        elif ra[i] <= rb[j]:
            rb[j] -= ra[i]
            i += 1
        else:
            ra[i] -= rb[j]
            j += 1
    return tree[:n + m - 1]
