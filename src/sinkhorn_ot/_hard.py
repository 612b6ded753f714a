"""Rounding: exactly balanced hard labels (``balanced_assign(..., hard=...)``) and the
rounding of a plan onto the transport polytope (:func:`round_to_marginals`)."""
from __future__ import annotations

import math

import numpy as np

from . import _core
from . import _validation as V
from ._arrays import array_module, to_host, to_native

__all__ = ["round_to_marginals", "target_sizes"]

# Elements per block of rows in the greedy's passes over logP (float64 scratch: 32 MB).
_BLOCK = 1 << 22


def target_sizes(N: int, b) -> np.ndarray:
    """Cluster sizes for N samples with proportions b: the largest-remainder (Hamilton)
    rounding of ``N * b / sum(b)``, ties to the lower index.  For uniform ``b`` the sizes
    differ by at most one.  Returns int64 of shape (K,), summing to N."""
    b = np.asarray(b, dtype=np.float64)
    q = N * b / b.sum()
    base = np.floor(q).astype(np.int64)
    short = int(N - base.sum())
    if short > 0:
        rem = q - base
        order = np.lexsort((np.arange(b.size), -rem))  # largest remainder, then index
        base[order[:short]] += 1
    return base


def exact_labels(X, sizes, max_entries=None):
    """argmin sum_i -X[i, y_i] subject to bincount(y) == sizes, by the exact LP.

    X: host float array (N, K) of log-probabilities (-inf forbidden)."""
    from ._lp import emd

    N, K = X.shape
    with np.errstate(over="ignore"):
        C = -np.asarray(X, dtype=np.float64)
    # Integral marginals: the LP's vertex solution is a 0/1 assignment (total unimodularity).
    res = emd(C, a=np.ones(N), b=sizes.astype(np.float64), max_entries=max_entries)
    P = res.plan().tocsr()
    P.sum_duplicates()
    labels = np.empty(N, dtype=np.int64)
    rows = np.repeat(np.arange(N), np.diff(P.indptr))
    # The largest entry of each row (1 for an integral vertex).
    order = np.lexsort((-P.data, rows))
    first = np.unique(rows[order], return_index=True)[1]
    labels[rows[order][first]] = P.indices[order][first]
    if P.data[order][first].min() < 0.5 or \
            not np.array_equal(np.bincount(labels, minlength=K), sizes):
        raise RuntimeError("exact assignment: the LP returned a fractional solution")
    return labels


def greedy_labels(xp, X, lam, f, g, labels0, sizes):
    """Capacity-respecting greedy rounding of a Sinkhorn plan, vectorised.

    Rounds: each unassigned sample proposes its best open cluster (the argmax of the plan
    score ``lam * X[i, y] + g[y]`` over clusters with room left), with priority its
    conditional plan probability ``Q[i, y] / sum_{open y'} Q[i, y']``; each cluster accepts
    its proposals in decreasing priority up to its remaining capacity.  Every round fills at
    least one cluster or places every sample, so it ends; sizes are never exceeded.  Round 1
    reuses the labels and ``f`` of the last Sinkhorn pass (no pass over X); later rounds
    read only the rows still unassigned, a block at a time.
    """
    N, K = X.shape
    cap = xp.asarray(sizes, dtype=xp.int64).copy()
    labels = xp.full(N, -1, dtype=xp.int64)
    rows = xp.arange(N)
    # log Q_iy of the argmax (f_i = log a_i - LSE_y(S_iy + g_y)): log of the conditional
    # probability up to the constant log a_i.
    prio = lam * X[rows, labels0].astype(xp.float64) + g[labels0] + f
    cand = labels0
    while rows.size:
        # Group proposals by cluster, best priority first; accept the first cap[y] of each.
        order = xp.lexsort(xp.stack([-prio, cand]))
        c_sorted = cand[order]
        counts = xp.bincount(c_sorted, minlength=K)
        starts = xp.cumsum(counts) - counts
        rank = xp.arange(order.size) - starts[c_sorted]
        ok = rank < cap[c_sorted]
        acc = order[ok]
        labels[rows[acc]] = cand[acc]
        cap -= xp.minimum(counts, cap)
        rej = order[~ok]
        if rej.size == 0:
            break
        rows = xp.sort(rows[rej])  # sorted: block reads walk X forwards
        open_ = xp.nonzero(cap > 0)[0]
        if open_.size == 0:  # cannot happen: sum(cap) = number of unassigned rows
            raise RuntimeError("greedy assignment: capacities exhausted early")
        g_open = g[open_]
        cand = xp.empty(rows.size, dtype=xp.int64)
        prio = xp.empty(rows.size)
        step = max(1, _BLOCK // max(int(open_.size), 1))
        for lo in range(0, rows.size, step):
            r = rows[lo:lo + step]
            s = X[r[:, None], open_[None, :]].astype(xp.float64)
            s *= lam
            s += g_open[None, :]
            j = xp.argmax(s, axis=1)
            mx = s[xp.arange(r.size), j]
            if not bool(xp.isfinite(mx).all()):
                bad = int(r[int(xp.argmin(xp.isfinite(mx)))])
                raise ValueError(
                    f"greedy assignment: sample {bad} has every cluster with room left "
                    "forbidden (-inf); use hard='exact'")
            s -= mx[:, None]
            xp.exp(s, out=s)
            cand[lo:lo + step] = open_[j]
            prio[lo:lo + step] = -xp.log(s.sum(axis=1))  # log conditional probability
    return labels


def round_to_marginals(Q, a=None, b=None):
    r"""Round a nonnegative plan onto the transport polytope: exact marginals ``a``, ``b``.

    Altschuler, Weed and Rigollet's rounding (their Algorithm 2): scale down the rows that
    carry too much mass, then the columns, and add the rank-one correction
    ``err_a err_b^T / ||err_a||_1`` built from the remaining deficits.  The result ``F``
    satisfies ``F 1 = a`` and ``F^T 1 = b`` up to float64 rounding, is nonnegative, and

    .. math::

        \|F - Q\|_1 \le 2 \left(\|Q 1 - a\|_1 + \|Q^T 1 - b\|_1\right),

    so a converged Sinkhorn plan moves by about twice its ``err``.

    Parameters
    ----------
    Q : array of float, shape (n, m)
        Nonnegative plan, e.g. ``sinkhorn(...).plan()``; NumPy or CuPy (or a ``__dlpack__``
        array).  Not modified.
    a : array of float, shape (n,), optional
        Target row marginal, uniform ``1/n`` by default.
    b : array of float, shape (m,), optional
        Target column marginal, uniform ``1/m`` by default; same total as ``a`` to a
        relative 1e-6 (rescaled to ``sum(a)`` exactly).

    Returns
    -------
    array of float64, shape (n, m)
        A new plan with exactly the marginals ``a`` and ``b``, in ``Q``'s array family.

    Examples
    --------
    >>> import numpy as np, sinkhorn_ot
    >>> C = np.array([[0.0, 1.0], [1.0, 0.0]])
    >>> Q = sinkhorn_ot.sinkhorn(C, reg=0.5, n_iter=1).plan()
    >>> F = sinkhorn_ot.round_to_marginals(Q)
    >>> F.sum(axis=1), F.sum(axis=0)
    (array([0.5, 0.5]), array([0.5, 0.5]))

    References
    ----------
    J. Altschuler, J. Weed, P. Rigollet, "Near-linear time approximation algorithms for
    optimal transport via Sinkhorn iteration", NeurIPS 2017.
    """
    native = to_native(Q, "Q")
    xp = array_module(native)
    Qa = native.array
    if Qa.ndim != 2 or Qa.shape[0] == 0 or Qa.shape[1] == 0:
        raise ValueError(f"Q must be a non-empty 2-d plan, got shape {Qa.shape}")
    if np.dtype(Qa.dtype).kind != "f":
        raise TypeError(f"Q must be a real floating array, got dtype {Qa.dtype}")
    n, m = Qa.shape
    ma, mb = V.marginal(a, n, "a", xp), V.marginal(b, m, "b", xp)
    (wa, _), (wb, _) = ma, mb
    V.balanced_totals(ma.total, mb.total)
    wb = wb * (ma.total / mb.total)
    F = Qa.astype(xp.float64)  # a copy: Q is never modified
    if not bool(xp.isfinite(F).all()) or bool((F < 0).any()):
        raise ValueError("Q must be finite and nonnegative")
    r = F.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        x = xp.where(r > wa, wa / r, 1.0)
    F *= x[:, None]
    c = F.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        y = xp.where(c > wb, wb / c, 1.0)
    F *= y[None, :]
    err_a = wa - F.sum(axis=1)
    err_b = wb - F.sum(axis=0)
    # Both deficits are >= 0 (up to rounding) and carry the same total.
    err_a = xp.maximum(err_a, 0.0)
    err_b = xp.maximum(err_b, 0.0)
    s = float(err_a.sum())
    if s > 0:
        F += xp.outer(err_a, err_b) / s
    return native.wrap(F)


def _cost(X, labels):
    """sum_i -X[i, labels[i]] (the transport cost of hard labels, unit mass per sample)."""
    return -float(np.asarray(X[np.arange(X.shape[0]), labels], dtype=np.float64).sum())



def tie_break(xp, X, lam, f, g, labels, log_a, tau: float, b_mass, counts=None,
              bf16=False):
    """Labels that follow the plan where rows tie: ``labels`` (the first maximiser of the plan
    score ``lam * X[i, y] + g[y]``, from the last pass) with every group of rows that tie on
    the same clusters spread over those clusters round-robin, the clusters holding the most
    plan mass first.  Duplicated rows or a constant ``X`` then fill the clusters as the plan
    does instead of piling into the first maximiser.

    A row ties when its second-best score is within ``tau`` of its best.  Only the rows whose
    label carries at most ``1 / (1 + exp(-tau))`` of the row's mass ``exp(log_a)`` can tie
    (a confident row cannot), and only those are read again: O(N) when none is near a tie.
    Then, when a cluster the plan gives at least one sample (``b_mass``: ``N * b``) is
    still empty, groups of identical rows of ``X`` (which have identical plan rows, so one
    argmax) are spread over the clusters by the largest-remainder rounding of their count
    times their plan row.  Finding them hashes every row (one product with a random
    vector), on that path only.

    On a device, ``counts`` (the backend's ``tie_counts``: per row, the clusters within
    ``tau`` of its best) marks the rows that tie, and the two facts that decide whether
    anything is to be done (how many rows tie, whether a needed cluster is empty) come to
    the host in one read; only the rows that tie are then read, and spread on the host as
    on the CPU.  ``bf16``: ``X`` holds bfloat16 bits (uint16), as on a device.
    Returns labels in ``xp``'s family (``labels`` itself is not modified).
    """
    N, K = X.shape
    if counts is not None:
        near = counts >= 2
    else:
        rows = xp.arange(N)
        with np.errstate(invalid="ignore", over="ignore"):
            share = lam * X[rows, labels].astype(xp.float64) + g[labels] + f - log_a
        limit = -math.log1p(math.exp(-(tau + 1e-6)))  # generous: the rounding term below
        near = share <= limit
    need = (xp.bincount(labels, minlength=K) == 0) & (b_mass >= 1.0)
    facts = xp.concatenate([xp.stack([near.sum(), need.sum()]).astype(xp.float64),
                            g.astype(xp.float64)])
    facts = np.asarray(to_host(facts))  # one read: the counts, and g for the host's scores
    n_near, empty, gh = int(facts[0]), bool(facts[1] > 0), facts[2:]
    if n_near >= 2:
        spread = _spread_ties(xp, X, lam, gh, labels, near, tau, bf16)
        if spread is not labels:
            return _spread_duplicates(xp, X, lam, gh, spread, b_mass, bf16=bf16)
    return _spread_duplicates(xp, X, lam, gh, labels, b_mass, empty=empty, bf16=bf16)


def _host_values(rows, bf16):
    """Host float64 values of rows of X (bfloat16 bits decoded)."""
    h = np.asarray(to_host(rows))
    if bf16:
        h = (h.astype(np.uint32) << 16).view(np.float32)
    return h.astype(np.float64)


def _spread_ties(xp, X, lam, gh, labels, near, tau, bf16=False):
    """(see tie_break; ``gh``: g on the host)"""
    cand = np.asarray(to_host(xp.nonzero(near)[0]))
    if cand.size >= 2 and xp is np and X.dtype in (np.float32, np.float64) and \
            X.flags.c_contiguous:  # the core reads the candidates once for their ties
        cand = cand[_core.near_ties(X, lam, gh, cand.astype(np.int64), tau) > 1]
    if cand.size < 2:
        return labels
    S = lam * _host_values(X[xp.asarray(cand)], bf16)
    S += gh[None, :]
    best = S.max(axis=1)
    tied = S >= (best - tau - 1e-12 * (1.0 + np.abs(best)))[:, None]  # + rounding of S + g
    multi = tied.sum(axis=1) > 1
    if multi.sum() < 2:
        return labels
    cand, S, tied, best = cand[multi], S[multi], tied[multi], best[multi]
    _, group, counts = np.unique(np.packbits(tied, axis=1), axis=0, return_inverse=True,
                                 return_counts=True)
    group = group.ravel()
    out = np.array(to_host(labels), copy=True)
    for k in np.nonzero(counts > 1)[0]:
        members = np.nonzero(group == k)[0]
        clusters = np.nonzero(tied[members[0]])[0]
        mass = np.exp(S[np.ix_(members, clusters)] - best[members, None]).sum(axis=0)
        clusters = clusters[np.argsort(-mass, kind="stable")]
        out[cand[members]] = clusters[np.arange(members.size) % clusters.size]
    return xp.asarray(out)


def tie_tolerance(err: float, tolerance_mode: bool, b_min: float) -> float:
    """Score gap below which :func:`tie_break` calls two clusters of a row tied: the plan's
    own accuracy after a solve to a tolerance (a column off by ``err`` moves its score by
    about ``err / b``; capped at 1e-3), rounding only after a fixed ``n_iter``."""
    if not tolerance_mode or not b_min > 0:
        return 0.0
    return min(1e-3, 2.0 * err / b_min)


def _row_hashes(xp, X, bf16):
    """A host float64 hash per row of X, equal for equal rows (see _core.row_hashes); read
    on the device for a device array, so only N numbers come to the host."""
    K = X.shape[1]
    r = np.random.default_rng(0).standard_normal((2, K))
    if xp is np and not bf16 and X.dtype in (np.float32, np.float64) and X.flags.c_contiguous:
        return _core.row_hashes(X, r[0], r[1])
    if bf16:
        X = (X.astype(xp.uint32) << 16).view(xp.float32)
    allowed = X > -xp.inf
    r0, r1 = xp.asarray(r[0]), xp.asarray(r[1])
    h = xp.where(allowed, X.astype(xp.float64), 0.0) @ r0 + (~allowed) @ r1
    return np.asarray(to_host(h), dtype=np.float64)


def _spread_duplicates(xp, X, lam, gh, labels, b_mass, empty=None, bf16=False):
    """(see tie_break; ``gh``: g on the host; ``empty``: whether a needed cluster is empty,
    when already known)"""
    N, K = X.shape
    if empty is None:
        empty = bool(((xp.bincount(labels, minlength=K) == 0) & (b_mass >= 1.0)).any())
    if not empty:
        return labels
    h = _row_hashes(xp, X, bf16)
    order = np.argsort(h, kind="stable")
    hs = h[order]
    starts = np.nonzero(np.r_[True, hs[1:] != hs[:-1]])[0]
    ends = np.r_[starts[1:], N]
    out = None
    for lo, hi in zip(starts, ends):
        if hi - lo < 2:
            continue
        members = order[lo:hi]
        rows = _host_values(X[xp.asarray(members)], bf16)
        members, first = members[np.all(rows == rows[0], axis=1)], rows[0]  # no collision
        if members.size < 2:
            continue
        with np.errstate(invalid="ignore", over="ignore"):
            s = lam * first + gh
        p = np.exp(s - s.max())
        p /= p.sum()
        counts = target_sizes(members.size, p)
        if out is None:
            out = np.array(to_host(labels), copy=True)
        out[members] = np.repeat(np.argsort(-p, kind="stable"),
                                 counts[np.argsort(-p, kind="stable")])
    return labels if out is None else xp.asarray(out)
