"""An independent float64 NumPy reference for entropic optimal transport.

Written from the mathematics, not from the library: the balanced entropic problem

    min_{Q >= 0, Q 1 = a, Q^T 1 = b} <Q, C> + reg * KL(Q || a b^T)

has the solution Q = exp(S + f[:, None] + g[None, :]) with S = -C / reg, where (f, g) is the
fixed point of the log-domain Sinkhorn updates

    g_y = log b_y - LSE_i(S_iy + f_i),     f_i = log a_i - LSE_y(S_iy + g_y).

Everything is computed in float64 with ``scipy.special.logsumexp``; ``-inf`` entries of ``S``
(forbidden pairs) and zero marginals are handled by logsumexp's own -inf arithmetic.
"""
from __future__ import annotations

import numpy as np
from scipy.special import logsumexp


def _log(w):
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(w, dtype=np.float64))


def reference_solve(S, a=None, b=None, *, tol=1e-13, max_iter=200_000):
    """Solve the balanced problem for the log-kernel ``S`` (shape (n, m)).

    Returns ``(f, g, plan, err, n_iter)``; ``plan`` has exact row sums ``a`` and ``err`` is the
    L1 column violation.  ``max_iter`` is large: the reference is meant to be converged.
    """
    S = np.asarray(S, dtype=np.float64)
    n, m = S.shape
    a = np.full(n, 1.0 / n) if a is None else np.asarray(a, dtype=np.float64)
    b = np.full(m, 1.0 / m) if b is None else np.asarray(b, dtype=np.float64)
    loga, logb = _log(a), _log(b)
    f = np.zeros(n)
    g = np.zeros(m)
    err = np.inf
    it = 0
    for it in range(1, max_iter + 1):
        with np.errstate(invalid="ignore"):
            g = logb - logsumexp(S + f[:, None], axis=0)
            f = loga - logsumexp(S + g[None, :], axis=1)
        g = np.where(np.isfinite(g) | (b > 0), g, -np.inf)
        f = np.where(np.isfinite(f) | (a > 0), f, -np.inf)
        if it % 10 == 0 or it < 10:
            col = np.exp(logsumexp(S + f[:, None] + g[None, :], axis=0))
            err = float(np.abs(col - b).sum())
            if err <= tol:
                break
    P = plan_from_potentials(S, f, g)
    err = float(np.abs(P.sum(0) - b).sum() + np.abs(P.sum(1) - a).sum())
    return f, g, P, err, it


def plan_from_potentials(S, f, g):
    S = np.asarray(S, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        Z = S + np.asarray(f, np.float64)[:, None] + np.asarray(g, np.float64)[None, :]
    Z = np.where(np.isnan(Z), -np.inf, Z)
    return np.exp(Z)


def reference_sinkhorn(C, a=None, b=None, *, reg, **kw):
    """Reference for ``sinkhorn_ot.sinkhorn``: returns f, g, plan, cost <Q, C>."""
    C = np.asarray(C, dtype=np.float64)
    S = -C / reg
    f, g, P, err, it = reference_solve(S, a, b, **kw)
    cost = float(np.sum(np.where(P > 0, P * np.where(np.isfinite(C), C, 0.0), 0.0)))
    return dict(f=f, g=g, plan=P, cost=cost, err=err, n_iter=it)


def reference_assign(logP, lam, b=None, **kw):
    """Reference for ``sinkhorn_ot.balanced_assign``: S = lam * logP, C = -logP,
    labels = argmax_y (lam logP_iy + g_y)."""
    logP = np.asarray(logP, dtype=np.float64)
    S = lam * logP
    f, g, P, err, it = reference_solve(S, None, b, **kw)
    C = np.where(np.isfinite(logP), -logP, 0.0)
    cost = float(np.sum(np.where(P > 0, P * C, 0.0)))
    labels = np.argmax(S + g[None, :], axis=1)
    return dict(f=f, g=g, plan=P, cost=cost, err=err, n_iter=it, labels=labels)


def swav_distributed_sinkhorn(scores, eps, n_iters=3):
    """SwAV's ``distributed_sinkhorn`` (Caron et al. 2020), single process, in NumPy float64:
    Q = exp(scores / eps).T, normalised to total 1, then ``n_iters`` times a normalisation of
    each prototype (row of Q, divided by K) and of each sample (column, divided by B); the
    result is multiplied by B so each sample's column sums to 1.  Returns Q.T, shape (B, K).
    """
    Q = np.exp(np.asarray(scores, np.float64) / eps).T  # K x B
    B = Q.shape[1]
    K = Q.shape[0]
    Q = Q / Q.sum()
    for _ in range(n_iters):
        Q = Q / Q.sum(axis=1, keepdims=True)
        Q = Q / K
        Q = Q / Q.sum(axis=0, keepdims=True)
        Q = Q / B
    Q = Q * B
    return Q.T


def log_softmax(x, axis=1):
    x = np.asarray(x, dtype=np.float64)
    return x - logsumexp(x, axis=axis, keepdims=True)


def random_logP(N, K, *, seed=0, scale=3.0, dtype=np.float64):
    """The benchmarks' standard 'random(N, K)' problem (benchmarks/_common.py), small."""
    rng = np.random.default_rng(seed)
    return log_softmax(scale * rng.standard_normal((N, K))).astype(dtype)
