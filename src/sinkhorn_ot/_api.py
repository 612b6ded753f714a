"""Public solvers: :func:`sinkhorn` and :func:`balanced_assign`."""
from __future__ import annotations

import math

import numpy as np

from . import _validation as V
from ._arrays import to_native
from ._results import Assignment, OTResult

__all__ = ["sinkhorn", "balanced_assign"]

_DEFAULT_TOL = {"float64": 1e-6, "float32": 1e-5, "float16": 1e-3, "bfloat16": 1e-3}


def _backend(native, n_threads):
    if native.device == "cuda":
        from ._cuda import CUDABackend  # lazy: CuPy is optional

        return CUDABackend(dtype=native.dtype, stream=native.stream)
    from ._cpu import CPUBackend

    return CPUBackend(n_threads)


def _solve(M, name, *, alpha, a, b, rho_a, rho_b, tol, max_iter, n_iter, init, n_threads,
           want_labels, balanced):
    """Validate, dispatch on the array family, run the loop; returns what the public
    functions wrap into results."""
    native = to_native(M, name)
    n_threads = V.positive_int(n_threads, "n_threads", allow_none=True)
    max_iter = V.positive_int(max_iter, "max_iter")
    n_iter = V.positive_int(n_iter, "n_iter", allow_none=True)
    backend = _backend(native, n_threads)
    xp = backend.xp
    X = V.matrix(native, name, xp)
    N, K = X.shape
    wa, loga = V.marginal(a, N, "a", xp)
    wb, logb = V.marginal(b, K, "b", xp)
    if balanced:
        V.balanced_totals(wa, wb)
    tol = _DEFAULT_TOL[native.dtype] * float(wa.sum()) if tol is None else \
        V.positive_scalar(tol, "tol")
    g0 = V.init_potential(init, K, xp)
    forbidden = -math.inf if alpha > 0 else math.inf
    # Columns with zero mass carry no plan: solve without them (one copy) and give them
    # g = -inf, so no row is left with every allowed entry in a massless column.
    keep = None
    if bool((wb == 0).any()):
        keep = xp.nonzero(wb > 0)[0]
        Xs = xp.ascontiguousarray(X[:, keep])
        logb_s = logb[keep]
        g0 = None if g0 is None else g0[keep]
    else:
        Xs, logb_s = X, logb
    V.matrix_values(backend.check(Xs, forbidden), Xs.shape, name, forbidden, alpha,
                    native.dtype)
    sol = backend.solve(Xs, alpha, loga, logb_s, rho_a=rho_a, rho_b=rho_b, g0=g0, tol=tol,
                        max_iter=max_iter, n_iter=n_iter, want_labels=want_labels)
    if keep is not None:
        g = xp.full(K, -math.inf)
        g[keep] = sol.g
        sol.g = g
        if want_labels:
            sol.labels = keep[sol.labels]
    return native, backend, X, sol


def _common(native, backend, X, alpha, sol, cost):
    wrap = native.wrap
    f, g = sol.f, sol.g
    for arr in (f, g):
        if isinstance(arr, np.ndarray):
            arr.setflags(write=False)
    return dict(f=wrap(f), g=wrap(g), n_iter=sol.n_iter, err=sol.err,
                converged=sol.converged, cost=cost,
                _plan=lambda: wrap(backend.plan(X, alpha, f, g)))


def sinkhorn(C, a=None, b=None, *, reg, tol=None, max_iter=1000, n_iter=None, init=None,
             n_threads=None) -> OTResult:
    r"""Entropic optimal transport between ``a`` and ``b`` for the cost ``C``.

    Solves

    .. math::

        \min_{Q \ge 0,\; Q 1 = a,\; Q^T 1 = b} \langle Q, C\rangle
            + \mathrm{reg}\, \mathrm{KL}(Q \,\|\, a b^T)

    by log-domain Sinkhorn-Knopp scaling, one fused read of ``C`` per iteration.  The plan
    is ``Q = exp(-C / reg + f[:, None] + g[None, :])``.

    Parameters
    ----------
    C : array of float, shape (n, m)
        Cost matrix: NumPy (CPU core), CuPy (CUDA kernels), or any ``__dlpack__`` array such
        as a PyTorch tensor (taken without a copy).  ``+inf`` marks a forbidden pair.
        A non-contiguous array is copied once.
    a : array of float, shape (n,), optional
        Row marginal, uniform ``1/n`` by default.  Nonnegative, same total as ``b``.
    b : array of float, shape (m,), optional
        Column marginal, uniform ``1/m`` by default.
    reg : float
        Entropic regularisation (``> 0``).
    tol : float, optional
        Stop when the L1 marginal violation ``err`` is at most ``tol``.  Default ``1e-6``
        (float64) or ``1e-5`` (float32) times the total mass; float32 cannot go much below
        1e-6.
    max_iter : int, default 1000
        Passes allowed before giving up with a ``UserWarning``.
    n_iter : int, optional
        Run exactly this many iterations and ignore ``tol`` (SwAV and DINOv2 use 3).
    init : OTResult or array of shape (m,), optional
        Warm start from a previous result or its column potential ``g``.
    n_threads : int, optional
        CPU threads (default: OpenMP's default).

    Returns
    -------
    OTResult
        Potentials ``f``, ``g``, ``n_iter``, ``err``, ``converged``, ``cost = <Q, C>``, and
        ``plan()``.

    Examples
    --------
    >>> import numpy as np, sinkhorn_ot
    >>> C = np.array([[0.0, 1.0], [1.0, 0.0]])
    >>> res = sinkhorn_ot.sinkhorn(C, reg=0.1)
    >>> np.round(res.plan(), 4)
    array([[0.5, 0. ],
           [0. , 0.5]])

    References
    ----------
    M. Cuturi, "Sinkhorn distances: lightspeed computation of optimal transport", NeurIPS
    2013.
    """
    reg = V.positive_scalar(reg, "reg")
    alpha = -1.0 / reg
    native, backend, X, sol = _solve(
        C, "C", alpha=alpha, a=a, b=b, rho_a=1.0, rho_b=1.0, tol=tol, max_iter=max_iter,
        n_iter=n_iter, init=init, n_threads=n_threads, want_labels=False, balanced=True)
    return OTResult(**_common(native, backend, X, alpha, sol, sol.qx))


def balanced_assign(logP, lam=25.0, *, b=None, tol=None, max_iter=1000, n_iter=None,
                    init=None, n_threads=None) -> Assignment:
    r"""Equipartitioned self-labelling (SeLa): cluster assignments with prescribed sizes.

    Finds ``Q = diag(alpha) P^lam diag(beta)`` solving

    .. math::

        \min_{Q \ge 0,\; Q 1 = 1/N,\; Q^T 1 = b} \langle Q, -\log P\rangle
            + \frac{1}{\lambda} \mathrm{KL}(Q \,\|\, a b^T)

    with ``a = 1/N``; this is exactly ``sinkhorn(-logP, reg=1/lam, b=b)``.  Logits work as
    well as log-probabilities, since a per-row shift of ``logP`` is absorbed by ``f``:
    SwAV-style code passes ``scores`` with ``lam = 1 / eps``.

    Parameters
    ----------
    logP : array of float, shape (N, K)
        Log-probabilities (or logits) of N samples over K clusters, a network's
        ``log_softmax`` output.  NumPy, CuPy, or a ``__dlpack__`` tensor (PyTorch CPU or
        CUDA, no copy); results come back in the same family.  ``-inf`` forbids a pair.
    lam : float, default 25.0
        Inverse entropic regularisation (SeLa uses 25); larger is closer to hard labels.
    b : array of float, shape (K,), optional
        Cluster proportions (sum 1), uniform ``1/K`` by default.
    tol, max_iter, n_iter, init, n_threads
        As in :func:`sinkhorn`.

    Returns
    -------
    Assignment
        ``labels`` (N,) int64, ``sizes`` (K,), potentials ``f``, ``g``, ``n_iter``,
        ``err``, ``converged``, ``cost = <Q, -logP>`` and ``plan()``.

    Examples
    --------
    >>> import numpy as np, sinkhorn_ot
    >>> rng = np.random.default_rng(0)
    >>> logits = 3 * rng.standard_normal((1000, 10))
    >>> logP = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    >>> res = sinkhorn_ot.balanced_assign(logP, lam=25.0)
    >>> bool(res.converged), int(res.sizes.min()) > 50
    (True, True)

    References
    ----------
    Y. M. Asano, C. Rupprecht, A. Vedaldi, "Self-labelling via simultaneous clustering and
    representation learning", ICLR 2020.
    """
    lam = V.positive_scalar(lam, "lam")
    native, backend, X, sol = _solve(
        logP, "logP", alpha=lam, a=None, b=b, rho_a=1.0, rho_b=1.0, tol=tol,
        max_iter=max_iter, n_iter=n_iter, init=init, n_threads=n_threads, want_labels=True,
        balanced=True)
    xp = backend.xp
    sizes = xp.bincount(sol.labels, minlength=X.shape[1])
    for arr in (sol.labels, sizes):
        if isinstance(arr, np.ndarray):
            arr.setflags(write=False)
    common = _common(native, backend, X, lam, sol, -sol.qx)
    return Assignment(**common, labels=native.wrap(sol.labels), sizes=native.wrap(sizes))
