"""Problem preparation, written once for every public solver.

A public function validates its own parameters, then :func:`options` validates the options
every solver shares (before the matrix is touched) and :func:`prepare` builds a
:class:`Problem`: the matrix as the kernels read it, the marginals, the tolerance, the backend
and the reducer (identity for one process, across ranks for a sharded solve).  :func:`run`
solves it and raises the solver's warnings and errors, once, attributed to the caller.
Adding an option means one field of :class:`Options`, its check in :func:`options`, and its
use where the solver needs it.
"""
from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _validation as V
from ._arrays import Native, to_native
from ._backend import select_backend
from .distributed import Sharded
from ._reducer import Local
from ._solver import (ACCELERATIONS, Solution, drop_massless_columns,
                      drop_unconstrained_empty, restore_columns, restore_rows, solve)

DEFAULT_TOL = {"float64": 1e-6, "float32": 1e-5, "float16": 1e-3, "bfloat16": 1e-3}
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def reducer(comm):
    """The reducer of a solve: :class:`Local` without ``comm``, else one across its ranks."""
    return Local() if comm is None else Sharded(comm)


def warn(message: str, category=UserWarning):
    """``warnings.warn`` attributed to the first frame outside this package (the caller of
    the public function, whatever the depth of the call inside the package)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


@dataclass(frozen=True)
class Options:
    """The validated options every solver shares."""

    tol: float | None          # None: DEFAULT_TOL of the dtype times the mass of a
    max_iter: int
    n_iter: int | None         # a fixed number of passes (ignores tol)
    acceleration: str | None
    eps_scaling: bool | int    # True, False or a number of stages
    n_threads: int | None
    init: Any                  # a result or a potential g, checked against K in prepare()


def _eps_scaling(value):
    if isinstance(value, bool):
        return value
    if not isinstance(value, numbers.Integral):
        raise TypeError(f"eps_scaling must be True, False or a number of stages (an int), "
                        f"got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"eps_scaling must be >= 0 stages, got {value}")
    return int(value)


def options(*, tol=None, max_iter=1000, n_iter=None, acceleration="anderson",
            eps_scaling=True, n_threads=None, init=None) -> Options:
    """Check the shared options (types and ranges) without touching any array."""
    if not (acceleration is None or (isinstance(acceleration, str) and
                                     acceleration in ACCELERATIONS)):
        raise ValueError(f"acceleration must be one of {ACCELERATIONS}, got {acceleration!r}")
    return Options(tol=None if tol is None else V.positive_scalar(tol, "tol"),
                   max_iter=V.positive_int(max_iter, "max_iter"),
                   n_iter=V.positive_int(n_iter, "n_iter", allow_none=True),
                   acceleration=acceleration, eps_scaling=_eps_scaling(eps_scaling),
                   n_threads=V.positive_int(n_threads, "n_threads", allow_none=True),
                   init=init)


@dataclass
class Problem:
    """Everything a solve needs, validated."""

    native: Native             # the caller's matrix and how to hand results back
    backend: Any               # a _backend.Backend
    X: Any                     # the matrix as the kernels read it (C-contiguous)
    Xs: Any                    # X without its massless columns (X itself if none)
    keep: Any                  # indices of the kept columns, None if all are kept
    alpha: float               # S = alpha * X: lam, or -1 / reg for a cost
    a: V.Weights               # the marginals as given (or uniform)
    b: V.Weights
    loga: Any                  # log a / rho_a: what the kernels are handed
    logb: Any                  # log b / rho_b on the kept columns
    rho_a: float
    rho_b: float
    g0: Any                    # warm start on the kept columns, or None
    tol: float
    opts: Options
    want_labels: bool
    max_abs: float             # largest finite |X| (epsilon-scaling stages)
    reducer: Any               # Local, or distributed.Sharded
    L0: Any = None             # column log-sum-exp of alpha X, when the scan computed it
    rows: Any = None           # the rows solved (None: all), see drop_unconstrained_empty
    name: str = "X"            # the matrix's name in error messages

    @property
    def xp(self):
        return self.backend.xp


_DTYPE_CODE = {"float64": 0, "float32": 1, "float16": 2, "bfloat16": 3}


def _local_inputs(M, name, a, b, opts, red):
    """Phase 1: every check a process can do alone on its O(N + K) inputs."""
    native = to_native(M, name)
    backend = select_backend(native, opts.n_threads)
    xp = backend.xp
    X = V.matrix(native, name, xp, allow_empty_rows=red.sharded)
    N, K = X.shape
    mb = V.marginal(b, K, "b", xp)
    ma = None if a is None else V.marginal(a, N, "a", xp, allow_zero_sum=red.sharded)
    g0 = V.init_potential(opts.init, K, xp)
    Xs, logb, g0, keep = drop_massless_columns(X, mb[0], mb[1], g0, xp, mb.any_zero)
    return native, backend, X, ma, mb, Xs, logb, V.finite_init(g0), keep


def _params(native, K, alpha, rho_a, rho_b, opts, a, mb, g0) -> list:
    """What must agree across the ranks of a sharded solve, as numbers."""
    o = opts
    return [("number of columns K", K), ("rho_a", rho_a), ("rho_b", rho_b),
            ("dtype", _DTYPE_CODE.get(getattr(native, "dtype", None), -1)),
            ("alpha (lam or -1/reg)", alpha), ("tol", -1.0 if o.tol is None else o.tol),
            ("max_iter", o.max_iter), ("n_iter", -1 if o.n_iter is None else o.n_iter),
            ("acceleration", o.acceleration is not None), ("eps_scaling", int(o.eps_scaling)),
            ("a given", a is not None), ("b", None if mb is None else mb[0]), ("init", g0)]


def prepare(M, name: str, *, alpha: float, a, b, rho_a: float, rho_b: float, opts: Options,
            want_labels: bool, balanced: bool, reducer) -> Problem:
    """Validate the inputs and build the :class:`Problem` (see the module docstring).

    The steps run on every process of a sharded solve, each on its block of rows, and the
    reducer combines them in two collectives (one after the O(N + K) checks, one after the
    scan of the matrix), so that every rank raises the same error or none does.
    """
    red = reducer
    exc, out = None, (None,) * 9
    try:
        out = _local_inputs(M, name, a, b, opts, red)
    except Exception as e:  # noqa: BLE001 - raised at once (Local) or on every rank
        exc = e
    native, backend, X, ma, mb, Xs, logb, g0, keep = out
    N, K = (0, 0) if X is None else X.shape
    params = _params(native, K, alpha, rho_a, rho_b, opts, a, mb, g0)
    n_total, sum_a = red.agree_shape(exc, N, None if ma is None else ma.total, params, name)
    if balanced:
        V.balanced_totals(sum_a, mb.total)
    xp = backend.xp
    if ma is None:  # uniform 1/n over every process's rows
        w = xp.full(N, 1.0 / n_total)
        ma = V.Weights(w, xp.log(w), sum_a, False)
    # KL-relaxed sides use the reference measure a b^T (POT's reg_type="kl"): the optimum has
    # f_i = log a_i - rho_a LSE_y(S_iy + g_y) (and likewise g); the kernels compute
    # rho_a (loga_i - LSE_y(...)), so they are handed log a / rho_a.
    loga = ma[1] if rho_a == 1.0 else ma[1] / rho_a
    if rho_b != 1.0:
        logb = logb / rho_b
    forbidden = -math.inf if alpha > 0 else math.inf
    exc, chk = None, {"first_invalid": -1, "first_empty_row": -1, "first_empty_col": -1,
                      "max_abs": 0.0}
    # Without a warm start or epsilon scaling the solve begins with the column LSE of
    # alpha X: the validation read computes it (where the backend can; one process only).
    lse_first = red.local and g0 is None and (opts.n_iter is not None or not opts.eps_scaling)
    try:
        if N > 0:
            chk = backend.check(Xs, forbidden, alpha if lse_first else None)
    except Exception as e:  # noqa: BLE001 - as above
        exc = e
    chk = red.agree_scan(exc, chk, Xs, forbidden)
    rows = None
    if red.local and N > 0:  # rows and relaxed columns that need no pair at all
        Xs, loga, logb, g0, keep, rows, chk = drop_unconstrained_empty(
            backend, Xs, ma[0], loga, logb, g0, keep, chk, forbidden, rho_a, rho_b)
    V.matrix_values(chk, (n_total, Xs.shape[1]), name, forbidden, alpha, native.dtype)
    tol = DEFAULT_TOL[native.dtype] * sum_a if opts.tol is None else opts.tol
    return Problem(native, backend, X, Xs, keep, alpha, ma, mb, loga, logb, rho_a, rho_b, g0,
                   tol, opts, want_labels, max(float(chk["max_abs"]), 0.0), red,
                   chk.get("lse"), rows=rows, name=name)


def run(p: Problem, plan=None, symmetric: bool = False) -> Solution:
    """Solve a prepared problem; raise its errors and warnings here, once.  ``plan``:
    ``(out, rows, scale)``, plan rows the last pass of a fixed ``n_iter`` solve writes
    (``Solution.plan``; only on one process and with every column kept).  ``symmetric``:
    a self-transport problem (see ``_solver.sinkhorn_loop``)."""
    o = p.opts
    N = p.X.shape[0]
    if not p.reducer.local or p.keep is not None or p.rows is not None:
        plan = None
    from ._feasibility import diagnose, precheck

    checked = precheck(p)  # a support with no plan raises before the first pass, if cheap
    sol = solve(p.reducer.loop_backend(p.backend, N), p.Xs, p.alpha, p.loga, p.logb,
                rho_a=p.rho_a, rho_b=p.rho_b, g0=p.g0, L0=p.L0, tol=p.tol,
                max_iter=o.max_iter, n_iter=o.n_iter, want_labels=p.want_labels,
                comm=p.reducer, acceleration=o.acceleration, eps_scaling=o.eps_scaling,
                max_abs=p.max_abs, plan=plan, symmetric=symmetric)
    if not math.isfinite(sol.err):
        raise FloatingPointError(  # a bug, never a property of valid input: say so loudly
            "sinkhorn_ot: the column error became non-finite; please report this input")
    if o.n_iter is None and not sol.converged:
        warn(f"Sinkhorn did not converge in {sol.n_iter} iterations: err = {sol.err:.3e} > "
             f"tol = {p.tol:.1e} (the best iterate is returned, converged=False)")
    diagnose(p, sol, checked)  # else an unconverged one on a support with no plan raises
    sol = restore_columns(sol, p.keep, p.X.shape[1], p.xp)
    return restore_rows(sol, p.rows, p.X.shape[0], p.xp)


def result_fields(p: Problem, sol: Solution, cost: float) -> dict:
    """The fields every result shares, in the caller's array family (host arrays read-only)."""
    wrap = p.native.wrap
    f, g = sol.f, sol.g
    for arr in (f, g):
        if isinstance(arr, np.ndarray):
            arr.setflags(write=False)
    backend, X, alpha = p.backend, p.X, p.alpha
    fp, gp = f.copy(), g.copy()  # writing the returned f or g must not change plan()
    return dict(f=wrap(f), g=wrap(g), n_iter=sol.n_iter, err=sol.err,
                converged=sol.converged, cost=cost,
                _plan=lambda: wrap(backend.plan(X, alpha, fp, gp)))
