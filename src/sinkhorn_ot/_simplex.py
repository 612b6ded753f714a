"""Exact finishing of a transport LP: the network (transport) simplex on a spanning-tree basis.

HiGHS returns a vertex to its tolerances (marginals off by ~1e-7, reduced costs by as much,
and sometimes a false "infeasible").  The transport polytope's vertices are spanning trees of
the bipartite row-column graph, and on a tree everything is exact arithmetic's business:
the flows follow from the marginals by eliminating leaves, the duals from ``f_i + g_j =
C_ij`` on the tree edges.  :func:`finish` takes any starting support (HiGHS's, an
assignment's, or none), makes it a spanning tree, and pivots until every reduced cost is
nonnegative: the plan then meets its marginals to round-off and the duals certify its
optimality.  Forbidden pairs cost ``big`` (a big-M) in the pivots; an optimum that still uses
one proves the problem infeasible.

The tree is kept rooted at row 0 as parent pointers, depths and a preorder (each subtree a
contiguous block), so a pivot costs the length of its cycle in Python steps plus a few
vector operations over the nodes.  Entering pairs come from block pricing (the most negative
reduced cost of the next block of rows, round robin).  Degeneracy: the pivots run on
marginals perturbed so that no basis has a zero flow (Orden's perturbation, see
:func:`finish`); on the marginals as given (the fallback) the leaving pair follows
Cunningham's rule (the last blocking pair met going round the cycle from its apex), and
after a long run of degenerate pivots the pivots follow Bland's rule (least index entering
and leaving) until one moves flow, which rules out cycling.
"""
from __future__ import annotations

import numpy as np

# Pairs priced per pivot (whole rows; at least sqrt(n m)).
BLOCK = 4096
# Orden's perturbation of the marginals (see finish), relative to the mass per node.
PERTURBATION = 1e-10


class Infeasible(ValueError):
    pass


def _find(parent, v):
    while parent[v] != v:
        parent[v] = parent[parent[v]]
        v = parent[v]
    return v


def _spanning_tree(n, m, edges, R, sink=None):
    """Complete the acyclic part of ``edges`` (pairs (i, j), in priority order) to a spanning
    tree of the complete bipartite graph, adding pairs of least ``R`` (n x m).

    With ``sink`` (a column), every pair added joins a part of the tree holding rows to the
    part holding the sink through one of its rows (so the extra supply a perturbation puts on
    every row reaches the sink along it, with positive flow; see :func:`finish`), or a part
    without rows through one of its columns: a Prim growth from the sink's part over each
    row's and each column's 8 least-``R`` pairs, then direct pairs (row, sink) for any part
    left."""
    import heapq

    parent = list(range(n + m))
    tree = []
    for i, j in edges:
        ri, rj = _find(parent, i), _find(parent, n + j)
        if ri != rj:
            parent[ri] = rj
            tree.append((i, j))
    if len(tree) == n + m - 1:
        return tree
    k_r, k_c = min(m, 8), min(n, 8)
    cand_r = np.argpartition(R, k_r - 1, axis=1)[:, :k_r] if k_r < m else \
        np.broadcast_to(np.arange(m), (n, m))
    cand_c = np.argpartition(R, k_c - 1, axis=0)[:k_c, :] if k_c < n else \
        np.broadcast_to(np.arange(n)[:, None], (n, m))
    if sink is None:
        flat = np.unique(np.concatenate([(np.arange(n)[:, None] * m + cand_r).ravel(),
                                         (cand_c * m + np.arange(m)[None, :]).ravel()]))
        flat = flat[np.argsort(R.ravel()[flat], kind="stable")]
        for order in (flat, np.argsort(R, axis=None, kind="stable")):
            for k in order.tolist():
                i, j = divmod(k, m)
                ri, rj = _find(parent, i), _find(parent, n + j)
                if ri != rj:
                    parent[ri] = rj
                    tree.append((i, j))
                    if len(tree) == n + m - 1:
                        return tree
        return tree
    # the parts, their members, and the candidate pairs at each node
    roots = [_find(parent, v) for v in range(n + m)]
    members: dict = {}
    for v, r in enumerate(roots):
        members.setdefault(r, []).append(v)
    has_row = {r: any(v < n for v in vs) for r, vs in members.items()}
    at_row = [[] for _ in range(n)]
    at_col = [[] for _ in range(m)]
    for i, js in enumerate(cand_r.tolist()):
        for j in js:
            at_row[i].append(j)
            at_col[j].append(i)
    for j, is_ in enumerate(cand_c.T.tolist()):
        for i in is_:
            at_row[i].append(j)
            at_col[j].append(i)
    attached = set()
    heap = []

    def attach(r):
        attached.add(r)
        for v in members[r]:
            if v < n:  # pairs into a part without rows, through its column
                for j in at_row[v]:
                    rj = roots[n + j]
                    if rj not in attached and not has_row[rj]:
                        heapq.heappush(heap, (float(R[v, j]), v, j))
            else:  # pairs from a part's row to this column
                for i in at_col[v - n]:
                    if roots[i] not in attached:
                        heapq.heappush(heap, (float(R[i, v - n]), i, v - n))

    attach(roots[n + sink])
    while heap:
        _, i, j = heapq.heappop(heap)
        ri, rj = roots[i], roots[n + j]
        new = rj if ri in attached else ri
        if new in attached or (new == rj and has_row[rj]):
            continue
        tree.append((i, j))
        attach(new)
    row0 = next((v for r in attached for v in members[r] if v < n), None)
    for r, vs in members.items():
        if r in attached:
            continue
        if has_row[r]:
            tree.append((next(v for v in vs if v < n), sink))
            row0 = row0 if row0 is not None else next(v for v in vs if v < n)
    for r, vs in members.items():
        if r not in attached and not has_row[r]:
            tree.append((row0, vs[0] - n))
    return tree


class _Tree:
    """A spanning tree of the bipartite graph (rows ``0..n-1``, columns ``n..n+m-1``) rooted
    at row 0: ``par`` (parent node, -1 at the root), ``x`` (flow, row to column, on the edge
    from a node to its parent), ``pot`` (f on rows, g on columns: ``f_i + g_j = C_ij`` on
    every edge), ``order`` (a preorder; ``pos`` its inverse) and ``dep_o`` (the depths in
    that order)."""

    def __init__(self, n, m, edges, Cm, a, b):
        from scipy import sparse
        from scipy.sparse.csgraph import depth_first_order

        N = n + m
        self.n, self.m, self.Cm = n, m, Cm
        e = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
        G = sparse.coo_array((np.ones(len(e)), (e[:, 0], n + e[:, 1])), shape=(N, N)).tocsr()
        order, pred = depth_first_order(G, 0, directed=False, return_predecessors=True)
        if order.size != N:
            raise RuntimeError("emd: the starting basis is not a spanning tree")
        self.order = order.astype(np.int64)
        self.pos = np.empty(N, dtype=np.int64)
        self.pos[self.order] = np.arange(N)
        pl = pred.tolist()
        pl[0] = -1
        self.pl = pl
        self.typ = np.where(np.arange(N) < n, 1, -1)
        dep = [0] * N
        for v in self.order[1:].tolist():
            dep[v] = dep[pl[v]] + 1
        self.dep = np.array(dep, dtype=np.int64)
        self.dep_o = self.dep[self.order]
        self.x = self.flows(a, b)
        self.potentials()

    def flows(self, a, b):
        """Flows meeting the marginals, by leaf elimination (children before parents)."""
        n = self.n
        s = np.concatenate([a, -b]).astype(np.float64).tolist()
        par = self.pl
        x = [0.0] * (n + self.m)
        for v in self.order[:0:-1].tolist():
            x[v] = s[v] if v < n else -s[v]
            s[par[v]] += s[v]
        return x

    def potentials(self):
        """``f_i + g_j = C_ij`` on the edges, ``f_0 = 0``: exact from the tree."""
        n, Cm = self.n, self.Cm
        order = self.order[1:]
        par = np.array(self.pl)[order]
        rows = np.where(order < n, order, par)
        cols = np.where(order < n, par, order) - n
        c = Cm[rows, cols].tolist()
        pot = [0.0] * (n + self.m)
        for v, p, cv in zip(order.tolist(), par.tolist(), c):
            pot[v] = cv - pot[p]
        self.pot = np.array(pot)

    def end(self, v):
        """One past the last preorder position of the subtree of ``v``."""
        p = int(self.pos[v])
        after = self.dep_o[p + 1:] <= self.dep_o[p]
        k = int(np.argmax(after)) if after.size else 0
        return p + 1 + k if after.size and after[k] else self.dep_o.size

    def pivot(self, i, j, bland):
        """Bring pair (i, j) (negative reduced cost) into the tree; return the flow moved."""
        n, m = self.n, self.m
        pl, x, dep = self.pl, self.x, self.dep
        # the tree path between column n + j and row i, both halves from their endpoint up
        u, v = n + j, i
        side_j, side_i = [], []
        du, dv = int(dep[u]), int(dep[v])
        while du > dv:
            side_j.append(u)
            u = pl[u]
            du -= 1
        while dv > du:
            side_i.append(v)
            v = pl[v]
            dv -= 1
        while u != v:
            side_j.append(u)
            side_i.append(v)
            u, v = pl[u], pl[v]
        # flow goes i -> j -> up side_j -> down side_i -> i: the edges at even places from
        # either end carry it against their direction (they lose theta)
        mj, mi = side_j[0::2], side_i[0::2]
        theta = min([x[c] for c in mj] + [x[c] for c in mi])
        if bland:  # least pair index among the blocking edges
            block = [c for c in mj + mi if x[c] == theta]
            q = min(block, key=lambda c: c * m + pl[c] - n if c < n else pl[c] * m + c - n)
        else:  # Cunningham: the last blocking edge going round from the apex
            q = next((c for c in reversed(mj) if x[c] == theta), None)
            if q is None:
                q = next(c for c in mi if x[c] == theta)
        if theta > 0:
            for side in (side_j, side_i):
                for t, c in enumerate(side):
                    x[c] = x[c] - theta if t % 2 == 0 else x[c] + theta
        # the subtree of q leaves the tree; it hangs again from the entering edge, rerooted
        # at its endpoint w of the entering pair (u the other one)
        path, u = (side_j, i) if q in mj else (side_i, n + j)
        chain = path[:path.index(q) + 1]  # w = chain[0] ... chain[-1] = q, child to parent
        w, k = chain[0], len(chain) - 1
        pot = self.pot
        R = self.Cm[i, j] - pot[i] - pot[n + j]
        lo, hi = int(self.pos[q]), self.end(q)
        o, d = self.order, self.dep_o
        sub, dsub = o[lo:hi], d[lo:hi]
        pot[sub] += (R if w < n else -R) * self.typ[sub]
        base = int(dep[u]) + 1
        if k == 0:
            new_sub, new_dep = sub.copy(), dsub + (base - int(d[lo]))
        else:
            # chain[t]'s block is [p_t, e_t) within sub (nested); a node belongs to the
            # innermost chain block holding it, and the new preorder lists w's block first,
            # then each chain node with its block less the one below it: a stable sort by
            # that innermost index; chain[t] comes to depth base + t, its piece with it
            p_ch = self.pos[chain] - lo
            dw = int(dep[w])
            after = np.minimum.accumulate(dsub[p_ch[0] + 1:])
            t = np.arange(k + 1)
            e_ch = p_ch[0] + 1 + np.searchsorted(-after, t - dw, side="left")
            inside = np.zeros(dsub.size + 1, dtype=np.int64)
            inside[p_ch] += 1
            np.subtract.at(inside, e_ch, 1)
            key = k + 1 - np.cumsum(inside[:-1])
            perm = np.argsort(key, kind="stable")
            new_sub = sub[perm]
            new_dep = dsub[perm] + (base - dw + 2 * t)[key[perm]]
        # flows and parents along the chain turn round; w hangs from u
        for c, below in zip(chain[:0:-1], chain[-2::-1]):
            x[c] = x[below]
            pl[c] = below
        x[w] = theta
        pl[w] = u
        dep[new_sub] = new_dep
        # move the block after u's position
        pu = int(self.pos[u])
        if pu < lo:
            a0, a1 = pu + 1, hi
            o[a0:a1] = np.concatenate([new_sub, o[pu + 1:lo]])
            d[a0:a1] = np.concatenate([new_dep, d[pu + 1:lo]])
        else:
            a0, a1 = lo, pu + 1
            o[a0:a1] = np.concatenate([o[hi:pu + 1], new_sub])
            d[a0:a1] = np.concatenate([d[hi:pu + 1], new_dep])
        self.pos[o[a0:a1]] = np.arange(a0, a1)
        return theta

    def edges(self):
        v = self.order[1:]
        p = np.array(self.pl)[v]
        rows = np.where(v < self.n, v, p)
        cols = np.where(v < self.n, p, v) - self.n
        return rows, cols, v


def finish(Cm, a, b, start=(), *, duals=None, forbidden=None, max_pivots=None,
           stall_limit=None, perturb=True):
    """Optimal basic plan and duals of ``min <P, Cm>`` over the transport polytope.

    ``Cm`` (n x m, finite; forbidden pairs already set to ``big``), ``a``, ``b`` (same total);
    ``start``: pairs to build the first basis from (priority order), completed to a spanning
    tree by the pairs of least reduced cost under ``duals`` (approximate ``(f, g)``, e.g.
    HiGHS's: the degenerate basic pairs it had are the tight ones), or of least cost.
    ``stall_limit``: degenerate pivots in a row before Bland's rule takes over (default
    ``n + m``; 0: Bland's rule throughout).  Returns ``(rows, cols, flows, f, g)`` of the
    tree (zero flows included).  Raises :class:`Infeasible` when the optimum uses a
    ``forbidden`` pair (boolean n x m).

    ``perturb``: pivot on the perturbed marginals ``a_i + d`` and ``b_m-1 + n d`` (Orden's
    perturbation, ``d = 1e-10 sum(a) / (n + m)``), on which every basis has positive flows:
    no degenerate pivot, no stalling on integral or assignment-like data.  The duals do not
    depend on the marginals, so the final tree is optimal for ``a``, ``b`` as soon as its
    flows for them are nonnegative, which they are unless ``a``, ``b`` have partial sums
    closer than about ``n d``; then the pivots run again without the perturbation.
    """
    n, m = Cm.shape
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    allowed = Cm if forbidden is None else Cm[~forbidden]
    scale = (float(np.abs(allowed).max()) if allowed.size else 0.0) + 1.0
    eps = 1e-12 * scale
    tot = float(a.sum())
    R0 = Cm if duals is None else Cm - duals[0][:, None] - duals[1][None, :]
    limit = max_pivots if max_pivots is not None else 50 * (n + m) ** 2
    stall_limit = n + m if stall_limit is None else stall_limit
    start = list(start)
    T = None
    if perturb and n > 1 and m > 1 and tot > 0:
        d = PERTURBATION * tot / (n + m)
        ap, bp = a + d, b.copy()
        bp[-1] += n * d
        T = _pivots(_Tree(n, m, _spanning_tree(n, m, start, R0, sink=m - 1), Cm, ap, bp),
                    ap, bp, Cm, eps, limit, stall_limit)
        x = np.array(T.flows(a, b))
        if (x < -1e-12 * tot).any():  # partial sums of a, b within the perturbation
            T = None
    if T is None:
        T = _pivots(_Tree(n, m, _spanning_tree(n, m, start, R0), Cm, a, b), a, b, Cm, eps,
                    limit, stall_limit)
        x = np.array(T.flows(a, b))
        if (x < -1e-12 * tot).any():  # the incremental flows said feasible: rounding cannot
            raise RuntimeError("emd: the transport simplex lost primal feasibility; please "
                               "report this input")
    # exact flows on the final tree, and duals certified by the pricing in _pivots
    rows, cols, v = T.edges()
    x = np.maximum(x[v], 0.0)
    if forbidden is not None and (x[forbidden[rows, cols]] > 0).any():
        raise Infeasible("emd: infeasible problem: the marginals cannot be met through the "
                         "allowed (finite-cost) pairs")
    return rows, cols, x, T.pot[:n].copy(), T.pot[n:].copy()


def _pivots(T, a, b, Cm, eps, limit, stall_limit):
    """Pivot ``T`` (a spanning tree, flows for ``a``, ``b``) to optimality: block pricing
    round robin over the rows until a whole round finds no reduced cost below ``-eps``, then
    the potentials recomputed from the tree and everything priced once more."""
    n, m = Cm.shape
    if min(T.x) < -1e-13 * float(a.sum()):  # an infeasible start: the northwest corner
        T = _Tree(n, m, _northwest(a, b), Cm, a, b)
    T.x = [max(t, 0.0) for t in T.x]
    rows_per_block = max(1, min(n, -(-max(BLOCK, int(np.sqrt(n * m))) // m)))
    start_row, stall, pivots = 0, 0, 0
    while True:
        scanned = 0
        while scanned < n:
            if pivots > limit:
                raise RuntimeError("emd: the transport simplex did not finish")
            f, g = T.pot[:n], T.pot[n:]
            if stall >= stall_limit:  # Bland: the least-index pair of negative reduced cost
                R = Cm - f[:, None] - g[None, :]
                neg = (R < -eps).ravel()
                k = int(np.argmax(neg))
                if not neg[k]:
                    break
                i, j = divmod(k, m)
                bland = True
            else:
                r1 = min(n, start_row + rows_per_block)
                R = Cm[start_row:r1] - f[start_row:r1, None] - g[None, :]
                k = int(np.argmin(R))
                if R.flat[k] >= -eps:
                    scanned += r1 - start_row
                    start_row = 0 if r1 == n else r1
                    continue
                i, j = divmod(k, m)
                i += start_row
                start_row = 0 if r1 == n else r1
                scanned = 0
                bland = False
            moved = T.pivot(i, j, bland)
            pivots += 1
            stall = 0 if moved > 0 else stall + 1
        # the potentials were updated incrementally: recompute them from the tree and
        # price everything once more
        T.potentials()
        R = Cm - T.pot[:n, None] - T.pot[None, n:]
        if float(R.min()) >= -eps:
            return T
        stall = 0


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
