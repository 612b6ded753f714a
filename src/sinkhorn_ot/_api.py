"""Public solvers: :func:`sinkhorn` and :func:`balanced_assign`."""
from __future__ import annotations

import math

import numpy as np

from . import _batched, _hard, _problem
from . import _validation as V
from ._arrays import to_host
from ._lp import check_size
from ._results import Assignment, OTResult

__all__ = ["sinkhorn", "balanced_assign"]


def sinkhorn(C, a=None, b=None, *, reg, tol=None, max_iter=1000, n_iter=None, init=None,
             acceleration="anderson", eps_scaling=True, n_threads=None,
             comm=None) -> OTResult:
    r"""Entropic optimal transport between ``a`` and ``b`` for the cost ``C``.

    Solves

    .. math::

        \min_{Q \ge 0,\; Q 1 = a,\; Q^T 1 = b} \langle Q, C\rangle
            + \mathrm{reg}\, \mathrm{KL}(Q \,\|\, a b^T)

    by log-domain Sinkhorn-Knopp scaling, one fused read of ``C`` per iteration.  The plan
    is ``Q = exp(-C / reg + f[:, None] + g[None, :])``.

    Parameters
    ----------
    C : array of float, shape (n, m) or (B, n, m)
        Cost matrix: NumPy (CPU core), CuPy (CUDA kernels), or any ``__dlpack__`` array such
        as a PyTorch tensor (taken without a copy).  ``+inf`` marks a forbidden pair.
        A non-contiguous array is copied once.  A leading axis is a batch of ``B``
        independent problems, each solved to its own tolerance (see :doc:`batched`; ragged
        problems are padded with rows and columns of zero mass).
    a : array of float, shape (n,) or (B, n), optional
        Row marginal, uniform ``1/n`` by default.  Nonnegative, same total as ``b``.  For a
        batch: one per problem, or one shared by all.
    b : array of float, shape (m,), (B, m) or (m, k), optional
        Column marginal, uniform ``1/m`` by default; for a batch one per problem or one
        shared.  With a 2-d ``C``, shape ``(m, k)`` is POT's multi-target form: ``k``
        problems against the same ``C`` and ``a``, sharing each read of ``C`` (the result
        is a batch of ``k``; ``cost`` is POT's ``ot.sinkhorn(a, b, C, reg)``).
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
    acceleration : {"anderson", None}, default "anderson"
        Anderson mixing of ``g`` (memory 12), guarded by the dual objective: a step that
        lowers it is rejected and replaced by a plain step.  Used on balanced problems
        solved to ``tol``; fixed ``n_iter`` always runs plain (SwAV-exact) iterations.
    eps_scaling : bool or int, default True
        Epsilon scaling when solving to ``tol`` without ``init``: first solve at
        ``1/reg`` divided by 4 and 16 (True: up to 2 stages; an int sets the count) to a
        loose tolerance, each stage warm-starting the next.  Cuts the iterations on peaked
        problems by about 10x; ``n_iter`` counts the passes of every stage.
    n_threads : int, optional
        CPU threads, at most (default: OpenMP's default); never more than one per 32k
        entries of the matrix, where starting threads costs more than they save.
    comm : optional
        Rows split across processes (see :mod:`sinkhorn_ot.distributed`): an mpi4py
        communicator, a ``torch.distributed`` process group, ``"torch"`` (the default
        group), or a :class:`sinkhorn_ot.distributed.Comm`.  ``C`` and ``a`` are then this
        process's block of rows (any size, zero included; ``a`` defaults to ``1/n`` over all
        processes' rows) and every other argument must be the same on every process.
        ``f`` and ``plan()`` cover this block; ``g``, ``err``, ``n_iter``, ``converged``
        and ``cost`` are global.

    Returns
    -------
    OTResult
        Potentials ``f``, ``g``, ``n_iter``, ``err``, ``converged``, ``cost = <Q, C>``, and
        ``plan()``.  For a batch (or several targets) every field has the batch axis in
        front: ``f`` (B, n), ``g`` (B, m), ``n_iter``, ``err``, ``converged``, ``cost`` (B,)
        arrays, ``plan()`` (B, n, m).

    Examples
    --------
    >>> import numpy as np, sinkhorn_ot
    >>> C = np.array([[0.0, 1.0], [1.0, 0.0]])
    >>> res = sinkhorn_ot.sinkhorn(C, reg=0.1)
    >>> np.round(res.plan(), 4)
    array([[0.5, 0. ],
           [0. , 0.5]])
    >>> batch = sinkhorn_ot.sinkhorn(np.stack([C, 1 - C]), reg=0.1)   # two problems
    >>> batch.f.shape, bool(batch.converged.all())
    ((2, 2), True)

    References
    ----------
    M. Cuturi, "Sinkhorn distances: lightspeed computation of optimal transport", NeurIPS
    2013.
    """
    if _batched.is_batch(C) or _batched.is_multi_target(C, b):
        solve = _batched.sinkhorn if _batched.is_batch(C) else _batched.multi_target
        return solve(C, a, b, reg=reg, tol=tol, max_iter=max_iter, n_iter=n_iter, init=init,
                     acceleration=acceleration, eps_scaling=eps_scaling,
                     n_threads=n_threads, comm=comm)
    red = _problem.reducer(comm)
    reg = red.agreed(V.positive_scalar, reg, "reg")
    opts = red.agreed(lambda: _problem.options(
        tol=tol, max_iter=max_iter, n_iter=n_iter, acceleration=acceleration,
        eps_scaling=eps_scaling, n_threads=n_threads, init=init))
    p = _problem.prepare(C, "C", alpha=-1.0 / reg, a=a, b=b, rho_a=1.0, rho_b=1.0, opts=opts,
                         want_labels=False, balanced=True, reducer=red)
    sol = _problem.run(p)
    return OTResult(**_problem.result_fields(p, sol, sol.qx))


def balanced_assign(logP, lam=25.0, *, b=None, size_penalty=None, hard="argmax", tol=None,
                    max_iter=1000, n_iter=None, init=None, acceleration="anderson",
                    eps_scaling=True, n_threads=None, comm=None) -> Assignment:
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
    logP : array of float, shape (N, K) or (B, N, K)
        Log-probabilities (or logits) of N samples over K clusters, a network's
        ``log_softmax`` output.  NumPy, CuPy, or a ``__dlpack__`` tensor (PyTorch CPU or
        CUDA, no copy); results come back in the same family.  ``-inf`` forbids a pair.
        A leading axis is a batch of ``B`` problems (:doc:`batched`); ``b`` is then
        ``(K,)`` or ``(B, K)`` and every result field gains the batch axis.
    lam : float, default 25.0
        Inverse entropic regularisation (SeLa uses 25); larger is closer to hard labels.
    b : array of float, shape (K,), optional
        Cluster proportions (sum 1), uniform ``1/K`` by default; a non-uniform prior (e.g.
        SeLaVi's Gaussian or Zipf proportions) pins the soft cluster masses to ``b``.
    size_penalty : float, optional
        Relaxed mode for data whose classes are imbalanced: the cluster masses are free,
        held near ``b`` by the penalty ``size_penalty * KL(Q^T 1 || b)`` (generalised KL)
        instead of the constraint ``Q^T 1 = b``; sample marginals stay exact.  This is
        :func:`sinkhorn_unbalanced` with ``reg = 1/lam`` and ``reg_m = (inf,
        size_penalty)``: each column update is scaled by ``rho = size_penalty /
        (size_penalty + 1/lam)``.  It is in the units of ``-logP`` per unit mass: the masses
        ``c`` trade ``size_penalty * KL(c || b)`` against the mean log-probability.  Small
        values (``<< 1``) approach the plain argmax (no protection against collapse),
        large ones (``>> 1``) the balanced solution; about 0.1 to 1 lets a 10:1 imbalance
        through while still preventing collapse.  A translation-invariant step after
        each pass (Sejourne et al. 2022) keeps large values from costing ~``lam *
        size_penalty`` passes (the rate of plain passes on the total mass); for exactly
        balanced sizes prefer ``size_penalty=None``.  ``None`` (default): sizes exact.
    hard : {"argmax", "exact", "greedy"}, default "argmax"
        How ``labels`` are made from the plan.  ``"argmax"``: the argmax of each row of the
        plan (free, from the last pass; sizes near but not exactly ``N * b``, and far from
        it when ``logP`` is diffuse).  ``"exact"``: the hard assignment of least cost
        ``sum_i -logP[i, y_i]`` whose sizes equal :func:`target_sizes` ``(N, b)`` exactly
        (differ by at most one for uniform ``b``; else the largest-remainder rounding of
        ``N * b``), by the exact LP (:func:`emd`): small problems only, ``N * K`` at most
        ``EMD_MAX_ENTRIES``, checked before any work.  ``"greedy"``: the same sizes, never
        exceeded, for any N: samples propose their best cluster with room left (plan score
        ``lam * logP + g``) and clusters accept in decreasing plan probability; close to
        the exact optimum once the plan has converged.  The hard modes need prescribed
        sizes (not with ``size_penalty``) and run on the host for ``"exact"``.
    tol, max_iter, n_iter, init, acceleration, eps_scaling, n_threads
        As in :func:`sinkhorn`.
    comm : optional
        As in :func:`sinkhorn`: ``logP`` is this process's block of samples; ``labels`` and
        ``f`` cover the block, ``sizes`` counts every process's samples.  Only with
        ``hard="argmax"`` and without ``size_penalty``.

    Returns
    -------
    Assignment
        ``labels`` (N,) int64 (per ``hard``), ``sizes`` (K,) (their counts), potentials
        ``f``, ``g``, ``n_iter``, ``err``, ``converged``, ``cost = <Q, -logP>`` of the soft
        plan and ``plan()``.

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
    if _batched.is_batch(logP):
        return _batched.balanced_assign(
            logP, lam, b=b, size_penalty=size_penalty, hard=hard, tol=tol, max_iter=max_iter,
            n_iter=n_iter, init=init, acceleration=acceleration, eps_scaling=eps_scaling,
            n_threads=n_threads, comm=comm)
    red = _problem.reducer(comm)
    lam = red.agreed(V.positive_scalar, lam, "lam")
    opts = red.agreed(lambda: _problem.options(
        tol=tol, max_iter=max_iter, n_iter=n_iter, acceleration=acceleration,
        eps_scaling=eps_scaling, n_threads=n_threads, init=init))
    rho_b = 1.0
    if size_penalty is not None:
        size_penalty = V.positive_scalar(size_penalty, "size_penalty")
        rho_b = size_penalty / (size_penalty + 1.0 / lam)
    if hard not in ("argmax", "exact", "greedy"):
        raise ValueError(f"hard must be 'argmax', 'exact' or 'greedy', got {hard!r}")
    if hard != "argmax" and (size_penalty is not None or comm is not None):
        raise ValueError(f"hard={hard!r} needs prescribed cluster sizes on one process: "
                         "not available with size_penalty or comm")
    if hard == "exact":  # refuse an oversized LP before any work
        shape = getattr(logP, "shape", None) or np.shape(logP)
        if len(shape) == 2:
            check_size(int(shape[0]), int(shape[1]))
    p = _problem.prepare(logP, "logP", alpha=lam, a=None, b=b, rho_a=1.0, rho_b=rho_b,
                         opts=opts, want_labels=True, balanced=size_penalty is None,
                         reducer=red)
    sol = _problem.run(p)
    xp, X = p.xp, p.X
    if hard == "argmax":
        sol.labels = _argmax_ties(p, sol, lam)
    else:
        targets = _hard.target_sizes(X.shape[0], to_host(p.b[0]))
        if hard == "exact":
            sol.labels = xp.asarray(_hard.exact_labels(to_host(X), targets))
        else:
            sol.labels = _hard.greedy_labels(xp, X, lam, sol.f, sol.g, sol.labels,
                                             xp.asarray(targets))
    sizes = red.sum_counts(xp.bincount(sol.labels, minlength=X.shape[1]))
    for arr in (sol.labels, sizes):
        if isinstance(arr, np.ndarray):
            arr.setflags(write=False)
    wrap = p.native.wrap
    return Assignment(**_problem.result_fields(p, sol, -sol.qx), labels=wrap(sol.labels),
                      sizes=wrap(sizes))


def _argmax_ties(p, sol, lam):
    """The argmax labels with ties spread as the plan spreads them (see _hard.tie_break)."""
    xp, X = p.xp, p.X
    n_rows = X.shape[0] if p.reducer.local else p.reducer.n_rows_total
    wb = p.b[0]
    tau = 0.0  # after a fixed n_iter: ties to rounding (and no host read for b on a device)
    if p.opts.n_iter is None:
        lo, tot = to_host(xp.stack([xp.where(wb > 0, wb, xp.inf).min(), wb.sum()]))  # one read
        tau = _hard.tie_tolerance(sol.err, True, float(lo) / float(tot))
    # on a device, the rows that tie come from a kernel (the host reads them only if any)
    counts = None if xp is np else p.backend.tie_counts(X, lam, sol.g, tau)
    return _hard.tie_break(xp, X, lam, sol.f, sol.g, sol.labels, -math.log(n_rows), tau,
                           n_rows * wb / wb.sum(), counts, p.native.dtype == "bfloat16")
