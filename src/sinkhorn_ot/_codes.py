"""Soft assignment codes for deep clustering: :func:`codes`, the drop-in for the Sinkhorn
loops of SwAV, DINOv2, MSN, solo-learn, lightly, SeLa and SeLaVi."""
from __future__ import annotations

import math
import numbers
import re
import sys

import numpy as np

from . import _batched, _core, _problem
from . import _validation as V
from ._arrays import is_cupy, to_host

__all__ = ["codes"]

_HALF = ("float16", "bfloat16")


def _family_dtype(x) -> str:
    """The dtype name of ``x`` in its own family ("float32", "bfloat16", ...)."""
    dt = getattr(x, "dtype", None)
    if dt is None:
        return np.asarray(x).dtype.name
    return str(dt).replace("torch.", "") if _is_torch(x) else np.dtype(dt).name


def _is_torch(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _auto_comm(comm):
    """``comm="auto"``: the default torch.distributed group when it is initialised with more
    than one process, otherwise none (torch is never imported here for that)."""
    if not (isinstance(comm, str) and comm == "auto"):
        return comm
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return "torch" if dist.get_world_size() > 1 else None


def _as_input(scores, probabilities: bool):
    """The matrix the solver reads, in the caller's family: ``scores`` as given (detached
    from autograd), or ``log P`` for probabilities; half precision in float32 where the CPU
    core cannot read it (bfloat16 on the CPU) or where a log is taken."""
    x = scores
    if _is_torch(x):
        import torch

        x = x.detach()
        if x.dtype in (torch.float16, torch.bfloat16) and (
                probabilities or (x.dtype == torch.bfloat16 and x.device.type == "cpu")):
            x = x.float()
        if probabilities and x.is_floating_point():
            return torch.log(x)
        return x
    if not probabilities:
        return x
    from ._arrays import array_module, to_native

    native = to_native(x, "scores")
    if native.dtype not in V._FLOAT_KINDS:
        return x  # the solver raises the dtype error
    arr = native.array
    if native.dtype in _HALF:  # (bfloat16 only reaches here from torch, handled above)
        arr = arr.astype(np.float32)
    xp = array_module(native)
    with np.errstate(divide="ignore", invalid="ignore"):
        return xp.log(arr)


# log P is NaN where P is negative or NaN and +inf where P is +inf: the solver's scan finds
# them as it finds a NaN score; its message is reworded for probabilities (on every rank
# alike under comm, with the same entry), so no separate scan of P is needed.
_BAD_ENTRY = re.compile(r"scores has a NaN or \+inf entry at (\(\d+, \d+\))")


def _probability_error(exc: ValueError):
    m = _BAD_ENTRY.search(str(exc))
    if m is None:
        return exc
    return ValueError(f"{str(exc)[:m.start()]}scores has a negative, NaN or infinite "
                      f"probability at {m.group(1)}; with probabilities=True every entry must "
                      "be finite and >= 0 (0 is a forbidden pair)")


def _row_index(rows, N: int, xp):
    """``rows`` as a slice or an int64 index array of the solver's family (None: all)."""
    if rows is None:
        return slice(None)
    if isinstance(rows, slice):
        return rows
    if isinstance(rows, (bool, np.bool_)) or isinstance(rows, numbers.Integral):
        raise TypeError("rows must be a slice or a 1-d array of row indices (or a boolean "
                        f"mask), got {type(rows).__name__}; use rows=[{rows!r}] for one row")
    if _is_torch(rows):
        rows = rows.detach().cpu().numpy()
    idx = to_host(rows) if hasattr(rows, "get") else np.asarray(rows)
    if idx.ndim != 1:
        raise ValueError(f"rows must be 1-d, got shape {idx.shape}")
    if idx.dtype == np.bool_:
        if idx.shape[0] != N:
            raise ValueError(f"rows: a boolean mask must have length {N} (the number of "
                             f"rows of scores), got {idx.shape[0]}")
        idx = np.nonzero(idx)[0]
    elif idx.size == 0:
        idx = idx.astype(np.int64)
    elif idx.dtype.kind not in "iu":
        raise TypeError(f"rows must hold integer indices or booleans, got dtype {idx.dtype}")
    bad = (idx < -N) | (idx >= N)
    if bool(bad.any()):
        raise ValueError(f"rows: index {int(idx[np.argmax(bad)])} is out of range for "
                         f"{N} rows")
    return xp.asarray(np.where(idx < 0, idx + N, idx).astype(np.int64))


def _fused_rows(rows, N: int):
    """``rows`` in the form a pass can write (None: all, a step-1 slice, or a strictly
    increasing host index array), or False when it cannot."""
    if rows is None:
        return None
    if isinstance(rows, slice):
        lo, hi, step = rows.indices(N)
        return slice(lo, max(lo, hi)) if step == 1 else False
    idx = to_host(_row_index(rows, N, np))
    return idx if idx.size == 0 or bool((np.diff(idx) > 0).all()) else False


def _write_codes(backend, X, alpha, f, g, rows, scale, out_dtype):
    """The codes ``scale * exp(alpha X + f_i + g_y)`` of ``rows``, in ``out_dtype`` where the
    family can hold it (bfloat16 comes back as float32, narrowed by the caller's family).

    The one place the codes are written: ``scale`` rides in ``f`` (``log scale`` added to
    ``f_i``), so a pass that writes the plan can write the codes directly."""
    xp = backend.xp
    whole = isinstance(rows, slice) and rows == slice(None)
    Xr, fr = (X, f) if whole else (xp.ascontiguousarray(X[rows]), f[rows])  # a step slice
    Q = backend.plan(Xr, alpha, fr + math.log(scale), g)
    if out_dtype != "bfloat16" and Q.dtype != xp.dtype(out_dtype):
        Q = Q.astype(out_dtype)
    return Q


# With `rows`, the scaling passes hold the whole kernel while they run (the log-domain
# passes need no N x K buffer): only up to this size.
_SCALING_BUFFER_BYTES = 1 << 28


def _scaling(scores, alpha: float, probabilities: bool, b, n_iter: int, n_threads, rows):
    """The codes of a fixed-iteration solve of a whole NumPy or CPU PyTorch float32/float64
    matrix by the core's scaling passes (the kernel exponentiated once with a per-row shift,
    then one read of it per iteration, in float64), or None where they do not apply or give
    up (an invalid entry, an empty row or column, a scaling beyond float64's safe range): the
    log-domain path then runs and raises what it finds.  Probabilities at eps = 1 are the
    kernel themselves; at another eps their log is written into the output, over which the
    kernel is then formed in place (no copy of the input).  With ``rows`` every row's codes
    are computed (in an N x K buffer) and those rows returned."""
    torch_in = _is_torch(scores)
    if torch_in:
        import torch

        if scores.device.type != "cpu" or scores.dtype not in (torch.float32, torch.float64):
            return None
        try:
            arr = scores.detach().numpy()
        except RuntimeError:  # a tensor NumPy cannot view (e.g. a lazy negation)
            return None
    elif isinstance(scores, np.ndarray) and not is_cupy(scores):
        arr = scores
    else:
        return None
    if arr.ndim != 2 or arr.dtype not in (np.float32, np.float64) or arr.size == 0:
        return None
    if rows is not None and arr.nbytes > _SCALING_BUFFER_BYTES:
        return None
    arr = np.ascontiguousarray(arr)
    bw = None
    if b is not None:
        try:
            mb = V.marginal(b, arr.shape[1], "b", np)
            V.balanced_totals(1.0, mb.total)
        except (TypeError, ValueError):
            return None
        bw = mb[0]
    out = np.empty(arr.shape, arr.dtype)
    src = arr
    if probabilities and alpha != 1.0:
        # log P: -inf at a zero (a forbidden pair); NaN or +inf where P is invalid, which
        # the scaling passes refuse (the log-domain path then raises about P)
        with np.errstate(divide="ignore", invalid="ignore"):
            src = np.log(arr, out=out)
        probabilities = False
    if _core.scaling_codes(src, alpha, bool(probabilities), bw, n_iter, float(arr.shape[0]),
                           out, 0 if n_threads is None else n_threads):
        return None
    if rows is not None:
        out = out[_row_index(rows, arr.shape[0], np)]
    return torch.from_numpy(out) if torch_in else out


def codes(scores, *, eps, n_iter=3, probabilities=False, rows=None, comm="auto", b=None,
          tol=None, max_iter=1000, n_threads=None):
    r"""Soft assignment codes of a batch: the entropic transport plan with equipartitioned
    clusters, rows rescaled to sum to 1, as SwAV, DINOv2, MSN, solo-learn, lightly, SeLa and
    SeLaVi compute them.

    For scores :math:`s` (B x K) the codes are

    .. math::

        q_{iy} = B\, \exp\!\big(s_{iy} / \varepsilon + f_i + g_y\big), \qquad
        \textstyle\sum_y q_{iy} = 1,

    where :math:`(f, g)` come from ``n_iter`` Sinkhorn iterations on the kernel
    :math:`\exp(s / \varepsilon)`, each a normalisation of the clusters (columns) to mass
    :math:`b_y` followed by one of the samples (rows) to :math:`1/B`, starting from the
    kernel itself: exactly the alternation of SwAV's ``distributed_sinkhorn``, so
    ``n_iter=3`` reproduces those codebases' codes to rounding.  With ``tol`` the problem

    .. math::

        \min_{Q \ge 0,\; Q 1 = 1/B,\; Q^T 1 = b} -\langle Q, s\rangle
            + \varepsilon\, \mathrm{KL}(Q \,\|\, \tfrac{1}{B} 1 b^T)

    is solved to that tolerance instead (with the accelerated loop) and ``q = B Q``.  No
    ``eps`` overflows: on the CPU a fixed-iteration solve in one process (with ``rows``, of
    a matrix of at most 256 MB) exponentiates the matrix once with a per-row shift
    (``exp(s / eps - max_y s / eps)``, in ``[0, 1]``) and scales that kernel in float64, one
    read of it per iteration, as the original loops do without their overflow; where a
    scaling would leave float64's range, and everywhere else, every pass works in the log
    domain.

    Parameters
    ----------
    scores : array of float, shape (B, K)
        Scores of B samples against K prototypes (e.g. cosine similarities, teacher logits),
        or probabilities with ``probabilities=True``.  NumPy (the C++ core), CuPy or a
        ``__dlpack__`` tensor such as PyTorch (CPU or CUDA); float64, float32, float16 or
        bfloat16 (arithmetic in float32 at least).  A tensor that requires grad is taken as
        a constant: the codes are targets, no gradient flows through them.  A per-row shift
        of ``scores`` does not change the codes solved to ``tol``; after ``n_iter``
        iterations it changes them slightly, as it does in SwAV's loop.  A leading axis
        (shape ``(P, B, K)``) is a batch of ``P`` independent score matrices (e.g.
        positionwise losses), solved in one call (:doc:`batched`); the codes are then
        ``(P, B, K)`` and ``b`` may be ``(P, K)``.
    eps : float
        Temperature (``> 0``): the kernel is ``exp(scores / eps)``.  SwAV, solo-learn and
        lightly call it ``epsilon``, DINOv2 ``teacher_temp``; SeLa's ``lamb`` is ``1 / eps``.
    n_iter : int, default 3
        Sinkhorn iterations (a column and a row normalisation each); ignored when ``tol`` is
        given.
    probabilities : bool, default False
        ``scores`` are probabilities ``P`` (nonnegative; rows need not sum to 1) and the
        kernel is ``P ** (1 / eps)`` (MSN: ``eps = 1``; SeLa: ``eps = 1 / lamb``).  A zero
        probability is a forbidden pair (its code is 0).
    rows : slice or array of int or bool, optional
        Rows whose codes are returned (default all), e.g. the batch rows of a batch + queue
        matrix (``rows=slice(-bs, None)`` for SwAV, ``slice(0, bs)`` for solo-learn and
        lightly).  The solve always runs over every row.  With several processes the rows
        index this process's block.
    comm : "auto", None, or a communicator, default "auto"
        Rows split across processes (see :mod:`sinkhorn_ot.distributed`).  ``"auto"``: the
        default ``torch.distributed`` group when it is initialised with more than one
        process, else a single process.  ``None`` forces a single process; an mpi4py
        communicator, a process group, ``"torch"`` or a ``Comm`` as in :func:`sinkhorn`.
        ``scores`` is then this process's block of rows and ``B`` is the number of rows over
        all processes (every row sums to 1); every other argument must agree across ranks.
        The call is then a collective that every process must make: pass ``None`` where
        one process solves alone while the others wait.
    b : array of float, shape (K,), optional
        Cluster proportions (sum 1), uniform ``1/K`` by default (SeLaVi's prior).
    tol : float, optional
        Solve to this L1 marginal violation of the plan (``Q``, total mass 1) instead of
        running ``n_iter`` iterations (SeLa, SeLaVi).
    max_iter : int, default 1000
        Passes allowed with ``tol`` before giving up with a ``UserWarning``.
    n_threads : int, optional
        CPU threads (default: OpenMP's default).

    Returns
    -------
    array, shape (B, K) or (len(rows), K)
        The codes, in the family, device and dtype of ``scores`` (float16 stays float16,
        bfloat16 stays bfloat16); each row sums to 1 (to the output dtype's rounding).

    Raises
    ------
    ValueError, TypeError
        As :func:`balanced_assign` for a bad matrix (NaN, a row or column with every entry
        forbidden, wrong shape or dtype), a bad ``eps`` or option, and for probabilities
        that are negative or infinite; the message names the argument, row and column.

    See Also
    --------
    balanced_assign : the same solve, returning potentials, hard labels and sizes.

    Examples
    --------
    >>> import numpy as np, sinkhorn_ot
    >>> rng = np.random.default_rng(0)
    >>> z = rng.standard_normal((256, 32)); z /= np.linalg.norm(z, axis=1, keepdims=True)
    >>> c = rng.standard_normal((100, 32)); c /= np.linalg.norm(c, axis=1, keepdims=True)
    >>> q = sinkhorn_ot.codes(z @ c.T, eps=0.05)          # SwAV: distributed_sinkhorn(out)
    >>> q.shape, bool(np.allclose(q.sum(axis=1), 1.0))
    ((256, 100), True)
    >>> sinkhorn_ot.codes(z @ c.T, eps=0.05, rows=slice(-64, None)).shape  # batch of a queue
    (64, 100)

    References
    ----------
    M. Caron et al., "Unsupervised learning of visual features by contrasting cluster
    assignments" (SwAV), NeurIPS 2020.  Y. M. Asano, C. Rupprecht, A. Vedaldi,
    "Self-labelling via simultaneous clustering and representation learning", ICLR 2020.
    """
    comm = _auto_comm(comm)
    if _batched.is_batch(scores):
        if comm is not None:
            raise ValueError("a batch of score matrices (B, N, K) cannot be split across "
                             "processes: pass comm=None")
        return _batched.codes(scores, eps=eps, n_iter=n_iter, probabilities=probabilities,
                              rows=rows, b=b, tol=tol, max_iter=max_iter, n_threads=n_threads)
    eps = V.positive_scalar(eps, "eps")
    if not isinstance(probabilities, (bool, np.bool_)):
        raise TypeError(f"probabilities must be True or False, got {probabilities!r}")
    n_iter = V.positive_int(n_iter, "n_iter")
    if tol is None and comm is None:
        n_threads = _problem.options(max_iter=max_iter, n_threads=n_threads).n_threads
        Q = _scaling(scores, 1.0 / eps, bool(probabilities), b, n_iter, n_threads, rows)
        if Q is not None:
            return Q
    out_dtype = _family_dtype(scores)
    X_in = _as_input(scores, bool(probabilities))
    alpha = 1.0 / eps
    shape = tuple(getattr(X_in, "shape", None) or np.shape(X_in))
    N = int(shape[0]) if len(shape) == 2 else 0
    n_total = N
    if comm is not None:  # the global number of rows: every rank's codes rows sum to 1
        from .distributed import as_comm

        n_total = int(round(float(as_comm(comm).allreduce_sum(np.array([float(N)]))[0])))
    # A fixed n_iter solve writes the codes in its last pass (one read fewer); a bad `rows`
    # is raised after the solve, whose collectives every rank must enter.
    try:
        fused_rows, rows_exc = _fused_rows(rows, N), None
    except (TypeError, ValueError) as exc:
        fused_rows, rows_exc = None, exc
    # rows a pass cannot write directly: all rows are written, then indexed
    plan = (None, None if fused_rows is False else fused_rows, float(n_total)) \
        if tol is None and rows_exc is None else None
    red = _problem.reducer(comm)
    try:
        opts = red.agreed(lambda: _problem.options(
            tol=tol, max_iter=max_iter, n_iter=None if tol is not None else n_iter,
            n_threads=n_threads))
        p = _problem.prepare(X_in, "scores", alpha=alpha, a=None, b=b, rho_a=1.0, rho_b=1.0,
                             opts=opts, want_labels=False, balanced=True, reducer=red)
        sol = _problem.run(p, plan)
        native, backend, X = p.native, p.backend, p.X
    except ValueError as exc:
        err = _probability_error(exc) if probabilities else exc
        if err is exc:
            raise
        raise err from exc
    if rows_exc is not None:
        raise rows_exc
    if sol.plan is not None:
        Q = sol.plan if fused_rows is not False else sol.plan[_row_index(rows, N, backend.xp)]
        if out_dtype != "bfloat16" and Q.dtype != backend.xp.dtype(out_dtype):
            Q = Q.astype(out_dtype)
    else:
        idx = _row_index(rows, N, backend.xp)
        Q = _write_codes(backend, X, alpha, sol.f, sol.g, idx, n_total, out_dtype)
    out = native.wrap(Q)
    if _is_torch(out) and str(out.dtype) != f"torch.{out_dtype}":
        import torch

        out = out.to(getattr(torch, out_dtype))
    return out
