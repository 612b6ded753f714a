"""Many problems in one call: a leading batch axis on the matrix, and several column
marginals (POT's multi-target ``b`` of shape (m, k)) against one matrix.

The public solvers hand over here when their input has a batch axis.  On the CPU a batch of
small balanced problems goes to the compiled batched solve (``_core.batched_solve``: one
problem per thread, each to its own tolerance, the log-domain loop, epsilon scaling and
Anderson mixing of the single solve); anything else (large problems, whose single solve
already spreads rows over the threads; KL-relaxed sides; exact or greedy labels; CUDA
arrays) is solved problem by problem by the single-problem path.  Several targets against one large matrix share each
read of it (``_core.multi_pass``).  Results carry the batch axis: ``f`` (B, n), ``g`` (B, m),
``n_iter``, ``err``, ``converged`` and ``cost`` of shape (B,), ``plan()`` (B, n, m).
"""
from __future__ import annotations

import math
import warnings

import numpy as np

from . import _problem
from . import _validation as V
from ._arrays import to_native
from ._results import Assignment, OTResult, UnbalancedResult
from ._solver import Anderson, potential_bound

# A problem with at most this many entries is solved by the batched kernel (one problem per
# thread): below ~64k entries the single solve runs on one thread anyway (one thread per 32k
# entries), and up to here a problem's rows stay in the L2 cache of its thread.
SMALL_ENTRIES = 1 << 18
_MEMORY = 12            # Anderson memory, as the single solve's
_STALL_WINDOW = 100     # as _solver.STALL_WINDOW


def _shape(x):
    shape = getattr(x, "shape", None)
    return tuple(shape) if shape is not None else np.shape(x)


def is_batch(M) -> bool:
    """The matrix has a leading batch axis (3-d)."""
    return len(_shape(M)) == 3


def is_multi_target(M, b) -> bool:
    """A 2-d matrix with a 2-d ``b`` (m, k): k targets against one matrix."""
    return b is not None and len(_shape(M)) == 2 and len(_shape(b)) == 2


def _prefix(p: int, exc: Exception, what: str = "problem"):
    """``exc`` re-raised with the batch index in front of its message."""
    return type(exc)(f"{what} {p} of the batch: {exc}")


class _Collect:
    """Collects the single solves' non-convergence warnings into one for the batch."""

    def __enter__(self):
        self._cm = warnings.catch_warnings(record=True)
        self._log = self._cm.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)
        for w in self._log:  # anything but our own non-convergence note is passed on
            if not str(w.message).startswith("Sinkhorn did not converge"):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return False


def _warn_unconverged(converged, err, tol, what="problems"):
    bad = np.nonzero(~np.asarray(converged))[0]
    if bad.size:
        shown = ", ".join(str(int(p)) for p in bad[:8]) + (", ..." if bad.size > 8 else "")
        worst = int(bad[np.argmax(np.asarray(err)[bad] - np.asarray(tol)[bad])])
        _problem.warn(f"Sinkhorn did not converge for {bad.size} of {len(converged)} {what} "
                      f"(batch indices {shown}): err = {float(err[worst]):.3e} > tol = "
                      f"{float(tol[worst]):.1e} at {worst} (the best iterates are returned, "
                      "converged=False there)")


def _readonly(*arrays):
    for arr in arrays:
        if isinstance(arr, np.ndarray):
            arr.setflags(write=False)


# ---------------------------------------------------------------------------------------
# Marginals and warm starts with an optional batch axis

def _host64(v):
    """A marginal or potential of any family (NumPy, a list, a CPU tensor) as a float64
    NumPy array (a copy)."""
    from ._arrays import constant

    v = constant(v)
    if hasattr(v, "__dlpack__") and not isinstance(v, np.ndarray):
        v = np.from_dlpack(v)
    return np.array(v, dtype=np.float64)


def _batch_marginal(v, B: int, n: int, name: str):
    """``(w, logw, shared)``: w (n,) when shared by the batch, else (B, n), float64."""
    if v is None:
        w = np.full(n, 1.0 / n)
        return w, np.log(w), True
    w = _host64(v)
    if w.ndim == 1:
        wv, _ = V.marginal(w, n, name, np)
        with np.errstate(divide="ignore"):
            return wv, np.log(wv), True
    if w.shape != (B, n):
        raise ValueError(f"{name} must have shape ({n},) or ({B}, {n}) to match the batch, "
                         f"got {w.shape}")
    bad = ~np.isfinite(w) | (w < 0)
    if bad.any():
        p, i = np.argwhere(bad)[0]
        kind = "a non-finite" if not np.isfinite(w[p, i]) else "a negative"
        raise ValueError(f"problem {p} of the batch: {name} has {kind} entry at {i}")
    zero = ~(w.sum(axis=1) > 0)
    if zero.any():
        raise ValueError(f"problem {int(np.argmax(zero))} of the batch: {name} sums to zero")
    with np.errstate(divide="ignore"):
        return w, np.log(w), False


def _rows_of(w, B):
    return np.broadcast_to(w, (B, w.shape[-1]))


def _row_sums(w, B):
    """The total of each problem's marginal (a shared one's summed once)."""
    return np.full(B, w.sum()) if w.ndim == 1 else w.sum(axis=1)


def _zero_mass(w, B):
    """Whether each problem's marginal has an entry of zero mass."""
    return np.full(B, bool((w == 0).any())) if w.ndim == 1 else (w == 0).any(axis=1)


def _balanced(wa, wb, B):
    sa, sb = _row_sums(wa, B), _row_sums(wb, B)
    for p in np.nonzero(np.abs(sa - sb) > 1e-6 * np.maximum(sa, sb))[0][:1]:
        raise ValueError(f"problem {p} of the batch: balanced marginals must have equal "
                         f"totals: sum(a) = {sa[p]!r}, sum(b) = {sb[p]!r}")
    return sa


def _batch_init(init, B: int, m: int, wb):
    """Warm starts (B, m) or None: a batched result, its g, or one g (m,) for every problem."""
    if init is None:
        return None
    g = _host64(getattr(init, "g", init))
    if g.shape == (m,):
        g = np.broadcast_to(g, (B, m)).copy()
    if g.shape != (B, m):
        raise ValueError(f"init must be a result or a potential g of shape ({m},) or "
                         f"({B}, {m}), got shape {g.shape}")
    if np.isnan(g).any() or (g == np.inf).any():
        raise ValueError("init potential g has NaN or +inf entries")
    live = _rows_of(wb, B) > 0
    bad = live & (g == -np.inf)
    if bad.any():
        raise ValueError(f"problem {int(np.argwhere(bad)[0][0])} of the batch: init potential "
                         "g is -inf on a column of positive mass")
    return np.where(live, g, -np.inf)


# ---------------------------------------------------------------------------------------
# The matrix of a batch

def _batch_matrix(native, name: str):
    arr = native.array
    if native.dtype not in V._FLOAT_KINDS:
        raise TypeError(f"{name} must be a real floating array, got dtype {native.dtype}")
    if arr.ndim != 3 or 0 in arr.shape:
        raise ValueError(f"{name} must be 3-d (B, n, m) with no empty axis, got shape "
                         f"{arr.shape}")
    if native.device == "cpu" and native.dtype == "float16":
        arr = arr.astype(np.float32)
    return np.ascontiguousarray(arr) if native.device == "cpu" else arr


def _check_values(batch, flags, max_abs):
    """Raise, naming the first bad problem by its batch index, for what the batched solve's
    validation read found (``flags``: bit 0 a NaN or wrong infinity, bit 1 a forbidden
    entry; ``max_abs`` the largest finite |entry|), as the single solve's checks would: then
    rows or columns that need mass but allow no pair, and values that overflow."""
    X, name, B, n, m = batch.X, batch.name, batch.B, batch.n, batch.m
    forbidden = batch.forbidden
    bad = np.nonzero(flags & 1)[0]
    if bad.size:
        p = int(bad[0])
        Xp = np.asarray(X[p], dtype=np.float64)
        hit = np.isnan(Xp) | (Xp == -forbidden)
        i, j = np.argwhere(hit)[0]
        other = "+inf" if forbidden < 0 else "-inf"
        raise ValueError(f"problem {p} of the batch: {name} has a NaN or {other} entry at "
                         f"({i}, {j}); only finite values and "
                         f"{'-inf' if forbidden < 0 else '+inf'} (a forbidden pair) are allowed")
    wa, wb = _rows_of(batch.wa, B), _rows_of(batch.wb, B)
    look = (flags & 2).astype(bool) | _zero_mass(batch.wa, B) | _zero_mass(batch.wb, B)
    for p in np.nonzero(look)[0]:  # (a few problems, or every problem of a ragged batch)
        allowed = X[p] != forbidden
        row_bad = (wa[p] > 0) & ~(allowed & (wb[p] > 0)[None, :]).any(axis=1)
        if row_bad.any():
            raise ValueError(f"problem {p} of the batch: infeasible problem: row "
                             f"{int(np.argmax(row_bad))} of {name} has every entry forbidden "
                             "(or in columns of zero mass)")
        col_bad = (wb[p] > 0) & ~(allowed & (wa[p] > 0)[:, None]).any(axis=0)
        if col_bad.any():
            raise ValueError(f"problem {p} of the batch: infeasible problem: column "
                             f"{int(np.argmax(col_bad))} of {name} has every entry forbidden "
                             "(or in rows of zero mass)")
    over = np.abs(batch.alpha) * max_abs > V._FLOAT_MAX[batch.native.dtype] / 16
    if over.any():
        p = int(np.argmax(over))
        raise ValueError(f"problem {p} of the batch: {name} times {abs(batch.alpha):g} "
                         f"overflows {batch.native.dtype} (largest |entry| {max_abs[p]:g})")


class _Batch:
    """A validated batch for the compiled batched solve (NumPy, CPU)."""

    def __init__(self, M, name, alpha, a, b, opts, forbidden):
        self.native = to_native(M, name)
        self.name, self.alpha, self.opts = name, alpha, opts
        X = _batch_matrix(self.native, name)
        self.X = X
        B, n, m = X.shape
        self.B, self.n, self.m = B, n, m
        self.wa, self.loga, self.a_shared = _batch_marginal(a, B, n, "a")
        self.wb, self.logb, self.b_shared = _batch_marginal(b, B, m, "b")
        self.mass = _balanced(self.wa, self.wb, B)
        self.g0 = _batch_init(opts.init, B, m, self.wb)
        self.small = n * m <= SMALL_ENTRIES
        self.forbidden = forbidden
        if not self.small:  # the single solves check each problem; named here first
            from . import _core

            flags = np.zeros(B, dtype=np.uint8)
            max_abs = np.zeros(B)
            for p in range(B):
                chk = _core.check_matrix(X[p], forbidden, opts.n_threads or 0)
                flags[p] = (1 if chk["first_invalid"] >= 0 else 0) | (
                    2 if chk["first_empty_row"] >= 0 or chk["first_empty_col"] >= 0 else 0)
                max_abs[p] = chk["max_abs"]
            _check_values(self, flags, max_abs)
        dt = self.native.dtype
        self.tol = np.broadcast_to(_problem.DEFAULT_TOL[dt] * self.mass if opts.tol is None
                                   else np.full(B, opts.tol), (B,)).astype(np.float64)

    def problem(self, p):
        """The marginals and warm start of problem p, for a single solve."""
        return (self.wa if self.a_shared else self.wa[p],
                self.wb if self.b_shared else self.wb[p],
                None if self.g0 is None else self.g0[p])


def _eps_stages(eps_scaling) -> int:
    """The number of epsilon-scaling stages of ``Options.eps_scaling`` (_solver.eps_stages)."""
    return 2 if eps_scaling is True else int(eps_scaling or 0)


def _kernel(batch, *, n_iter, max_iter, acceleration, want_labels):
    """The compiled batched solve of a validated batch."""
    from . import _core

    o = batch.opts
    memory = _MEMORY if acceleration == "anderson" else 0
    rel_slack = 1e-13 if batch.X.dtype == np.float64 else 1e-6
    f, g, it, err, cost, labels, stalled, flags, max_abs = _core.batched_solve(
        batch.X, batch.B, batch.alpha, batch.loga, batch.logb, batch.g0, batch.tol,
        batch.forbidden, max_iter, n_iter or 0, memory, rel_slack, _STALL_WINDOW,
        _eps_stages(o.eps_scaling), want_labels, o.n_threads or 0)
    _check_values(batch, flags, max_abs)  # the validation read was the kernel's first
    if not np.isfinite(err).all():
        raise FloatingPointError(  # a bug, never a property of valid input: say so loudly
            "sinkhorn_ot: the column error became non-finite in a batched solve; please "
            "report this input")
    return f, g, it, err, cost, labels, stalled.astype(bool)


def _plans(X, alpha, f, g, n_threads):
    """exp(alpha X + f + g) of every problem, by the single solve's plan kernel."""
    from ._cpu import CPUBackend

    be = CPUBackend(n_threads)
    Xs = X if X.ndim == 3 else np.broadcast_to(X, (f.shape[0],) + X.shape)
    out = np.empty((f.shape[0],) + Xs.shape[1:], dtype=X.dtype)
    for p in range(f.shape[0]):
        be.plan(Xs[p], alpha, f[p], g[p], out=out[p])
    return out


def _infeasible(batch, p):
    """Raise, naming problem p, when no plan on its allowed pairs meets its marginals."""
    from ._feasibility import MAX_PAIRS, check_support

    X = batch.X[p]
    forbidden = -math.inf if batch.alpha > 0 else math.inf
    allowed = X != forbidden
    if allowed.all() or X.size > MAX_PAIRS:
        return
    wa = batch.wa if batch.a_shared else batch.wa[p]
    wb = batch.wb if batch.b_shared else batch.wb[p]
    try:
        check_support(allowed, wa, wb, batch.name)
    except ValueError as exc:
        raise _prefix(p, exc) from None


def _solve_kernel(batch, single, *, n_iter, max_iter, acceleration, want_labels):
    """The batched kernel, then the single solve for every problem it stalled on (with the
    passes left of ``max_iter``).  ``single(p, max_iter)`` solves problem p alone and returns
    its result.  Returns (f, g, n_iter, err, cost, labels)."""
    f, g, it, err, cost, labels, stalled = _kernel(
        batch, n_iter=n_iter, max_iter=max_iter, acceleration=acceleration,
        want_labels=want_labels)
    if n_iter is None:
        for p in np.nonzero(~(err <= batch.tol))[0]:
            _infeasible(batch, p)
        _resolve_stalled(stalled, batch.tol, max_iter, single, f, g, it, err, cost, labels)
    return f, g, it, err, cost, labels


def _resolve_stalled(stalled, tols, max_iter, single, f, g, it, err, cost, labels=None):
    """Solve again by ``single(p, passes_left)`` every problem the kernel stalled on short of
    its tolerance; its result replaces the kernel's where its err is no worse (in place;
    n_iter counts both)."""
    for p in np.nonzero(stalled & ~(err <= tols))[0]:
        left = max_iter - int(it[p])
        if left < 1:
            continue
        with _Collect():
            r = single(p, left)
        it[p] += int(r.n_iter)
        if r.err <= err[p]:
            f[p], g[p], err[p], cost[p] = r.f, r.g, r.err, r.cost
            if labels is not None:
                labels[p] = r.labels


# ---------------------------------------------------------------------------------------
# The public batched solvers

def _loop(M, single, B, what="problem"):
    """Solve problem by problem with ``single(p)``; errors named by batch index, the
    non-convergence warnings gathered into one.  Returns the results."""
    out = []
    with _Collect():
        for p in range(B):
            try:
                out.append(single(p))
            except (ValueError, TypeError) as exc:
                raise _prefix(p, exc, what) from exc
    return out


def _stack(native, results, field):
    vals = [getattr(r, field) for r in results]
    if native.device == "cpu":
        arrs = [np.asarray(v) for v in vals]
        out = np.stack(arrs)
        out.setflags(write=False)
        return native.wrap(out)
    from ._arrays import array_module, to_native as _tn

    xp = array_module(native)
    return native.wrap(xp.stack([_tn(v, field).array for v in vals]))


def _stacked_plan(native, results):
    def plan():
        ps = [r.plan() for r in results]
        if native.device == "cpu":
            return native.wrap(np.stack([np.asarray(q) for q in ps]))
        from ._arrays import array_module, to_native as _tn

        return native.wrap(array_module(native).stack([_tn(q, "plan").array for q in ps]))
    return plan


def _common(results, native):
    n_iter = np.array([r.n_iter for r in results], dtype=np.int64)
    err = np.array([r.err for r in results], dtype=np.float64)
    conv = np.array([bool(r.converged) for r in results])
    cost = np.array([r.cost for r in results], dtype=np.float64)
    _readonly(n_iter, err, conv, cost)
    return dict(f=_stack(native, results, "f"), g=_stack(native, results, "g"),
                n_iter=n_iter, err=err, converged=conv, cost=cost,
                _plan=_stacked_plan(native, results))


def _on_cpu(native) -> bool:
    """A batch the CPU core reads (CUDA batches are solved problem by problem)."""
    if native.device != "cpu":
        return False
    if len(native.array.shape) != 3:
        raise ValueError(f"expected a batch of shape (B, n, m), got {native.array.shape}")
    return True


def _single_tols(results, tol, native, a=None):
    """The tolerance each single solve used (its default scales with the mass of a)."""
    out = []
    for p in range(len(results)):
        if tol is not None:
            out.append(tol)
            continue
        mass = 1.0
        if a is not None:
            w = _take(a, p, 1)
            w = w.get() if hasattr(w, "get") else (
                w.detach().cpu().numpy() if hasattr(w, "detach") else w)
            mass = float(np.asarray(w, dtype=np.float64).sum())
        out.append(_problem.DEFAULT_TOL[native.dtype] * mass)
    return out


def _take(v, p, shared_ndim):
    """Problem p's slice of a marginal or warm start given with or without the batch axis."""
    if v is None:
        return None
    if hasattr(v, "g"):
        v = v.g
    return v if len(_shape(v)) == shared_ndim else v[p]


def sinkhorn(C, a, b, *, reg, tol, max_iter, n_iter, init, acceleration, eps_scaling,
             n_threads, comm):
    """:func:`sinkhorn_ot.sinkhorn` of a batch C (B, n, m)."""
    from ._api import sinkhorn as one

    if comm is not None:
        raise ValueError("a batch of problems (C of shape (B, n, m)) cannot be split across "
                         "processes: pass comm=None")
    reg = V.positive_scalar(reg, "reg")
    opts = _problem.options(tol=tol, max_iter=max_iter, n_iter=n_iter,
                            acceleration=acceleration, eps_scaling=eps_scaling,
                            n_threads=n_threads, init=init)
    kw = dict(reg=reg, tol=tol, n_iter=n_iter, acceleration=acceleration,
              eps_scaling=eps_scaling, n_threads=n_threads)
    native = to_native(C, "C")
    batch = _Batch(C, "C", -1.0 / reg, a, b, opts, math.inf) if _on_cpu(native) else None
    if batch is None or not batch.small:
        Cn = native.array

        def single(p):
            return one(Cn[p], _take(a, p, 1), _take(b, p, 1), init=_take(init, p, 1),
                       max_iter=max_iter, **kw)

        res = _loop(C, single, Cn.shape[0])
        out = _common(res, native)
        _warn_unconverged(out["converged"] | (n_iter is not None), out["err"],
                          _single_tols(res, tol, native, a))
        return OTResult(**out)

    def single_left(p, left):
        pa, pb, pg = batch.problem(p)
        return one(batch.X[p], pa, pb, init=pg, max_iter=left, **kw)

    f, g, it, err, cost, _ = _solve_kernel(batch, single_left, n_iter=opts.n_iter,
                                           max_iter=opts.max_iter, acceleration=acceleration,
                                           want_labels=False)
    return _kernel_result(OTResult, batch, f, g, it, err, cost, opts.n_iter is None)


def _kernel_result(cls, batch, f, g, it, err, cost, tol_mode, **extra):
    conv = err <= batch.tol
    _readonly(f, g, it, err, conv, cost)
    if tol_mode:
        _warn_unconverged(conv, err, batch.tol)
    X, alpha, nt, wrap = batch.X, batch.alpha, batch.opts.n_threads, batch.native.wrap
    fp, gp = f.copy(), g.copy()
    return cls(f=wrap(f), g=wrap(g), n_iter=it, err=err, converged=conv, cost=cost,
               _plan=lambda: wrap(_plans(X, alpha, fp, gp, nt)), **extra)


def balanced_assign(logP, lam, *, b, size_penalty, hard, tol, max_iter, n_iter, init,
                    acceleration, eps_scaling, n_threads, comm):
    """:func:`sinkhorn_ot.balanced_assign` of a batch logP (B, N, K)."""
    from . import _hard
    from ._api import balanced_assign as one

    if comm is not None:
        raise ValueError("a batch of problems (logP of shape (B, N, K)) cannot be split "
                         "across processes: pass comm=None")
    lam = V.positive_scalar(lam, "lam")
    opts = _problem.options(tol=tol, max_iter=max_iter, n_iter=n_iter,
                            acceleration=acceleration, eps_scaling=eps_scaling,
                            n_threads=n_threads, init=init)
    kw = dict(lam=lam, size_penalty=size_penalty, hard=hard, tol=tol, n_iter=n_iter,
              acceleration=acceleration, eps_scaling=eps_scaling, n_threads=n_threads)
    if size_penalty is not None or hard != "argmax":
        native = to_native(logP, "logP")
        if len(native.array.shape) != 3:
            raise ValueError(f"logP must be 3-d (B, N, K), got shape {native.array.shape}")
        Xn = native.array

        def single(p):
            return one(Xn[p], b=_take(b, p, 1), init=_take(init, p, 1), max_iter=max_iter,
                       **kw)

        res = _loop(logP, single, Xn.shape[0])
        out = _common(res, native)
        _warn_unconverged(out["converged"] | (n_iter is not None), out["err"],
                          _single_tols(res, tol, native))
        return Assignment(**out, labels=_stack(native, res, "labels"),
                          sizes=_stack(native, res, "sizes"))
    native = to_native(logP, "logP")
    batch = _Batch(logP, "logP", lam, None, b, opts, -math.inf) if _on_cpu(native) else None
    if batch is None or not batch.small:
        Xn = native.array

        def single(p):
            return one(Xn[p], b=_take(b, p, 1), init=_take(init, p, 1), max_iter=max_iter,
                       **kw)

        res = _loop(logP, single, Xn.shape[0])
        out = _common(res, native)
        _warn_unconverged(out["converged"] | (n_iter is not None), out["err"],
                          _single_tols(res, tol, native))
        return Assignment(**out, labels=_stack(native, res, "labels"),
                          sizes=_stack(native, res, "sizes"))
    B, N, K = batch.B, batch.n, batch.m

    def single_left(p, left):
        _, pb, pg = batch.problem(p)
        return one(batch.X[p], b=pb, init=pg, max_iter=left, **kw)

    f, g, it, err, cost, labels = _solve_kernel(
        batch, single_left, n_iter=opts.n_iter, max_iter=opts.max_iter,
        acceleration=acceleration, want_labels=True)
    wb = _rows_of(batch.wb, B)
    tau_mode = opts.n_iter is None
    for p in range(B):  # ties spread as the plan spreads them (as the single solve does)
        b_min = float(np.where(wb[p] > 0, wb[p], np.inf).min()) / float(wb[p].sum())
        tau = _hard.tie_tolerance(float(err[p]), tau_mode, b_min)
        labels[p] = _hard.tie_break(np, batch.X[p], lam, f[p], g[p], labels[p],
                                    -math.log(N), tau, N * wb[p] / wb[p].sum())
    sizes = np.stack([np.bincount(labels[p], minlength=K) for p in range(B)])
    _readonly(labels, sizes)
    wrap = batch.native.wrap
    return _kernel_result(Assignment, batch, f, g, it, err, -cost, tau_mode,
                          labels=wrap(labels), sizes=wrap(sizes))


def sinkhorn_unbalanced(C, a, b, *, reg, reg_m, tol, max_iter, n_iter, init, n_threads):
    """:func:`sinkhorn_ot.sinkhorn_unbalanced` of a batch C (B, n, m), problem by problem."""
    from ._unbalanced import sinkhorn_unbalanced as one

    native = to_native(C, "C")
    Cn = native.array

    def single(p):
        return one(Cn[p], _take(a, p, 1), _take(b, p, 1), reg=reg, reg_m=reg_m, tol=tol,
                   max_iter=max_iter, n_iter=n_iter, init=_take(init, p, 1),
                   n_threads=n_threads)

    res = _loop(C, single, Cn.shape[0])
    out = _common(res, native)
    _warn_unconverged(out["converged"] | (n_iter is not None), out["err"],
                      _single_tols(res, tol, native, a))
    extra = {k: np.array([getattr(r, k) for r in res]) for k in
             ("objective", "err_a", "err_b", "dev_a", "dev_b", "mass")}
    _readonly(*extra.values())
    return UnbalancedResult(**out, **extra, row_sums=_stack(native, res, "row_sums"),
                            col_sums=_stack(native, res, "col_sums"))


# ---------------------------------------------------------------------------------------
# Several targets against one matrix

def _targets(b, m: int, n_total: float):
    """The k column marginals of b (m, k) as (w (k, m), log w (k, m))."""
    w = _host64(b)
    if w.ndim != 2 or w.shape[0] != m or w.shape[1] == 0:
        raise ValueError(f"b must have shape ({m},) or ({m}, k) to match C, got {w.shape}")
    wk = np.ascontiguousarray(w.T)
    for t in range(wk.shape[0]):
        try:
            V.marginal(wk[t], m, "b", np)
            V.balanced_totals(n_total, float(wk[t].sum()))
        except ValueError as exc:
            raise ValueError(f"target {t} (b[:, {t}]): {exc}") from None
    with np.errstate(divide="ignore"):
        return wk, np.log(wk)


def multi_target(C, a, b, *, reg, tol, max_iter, n_iter, init, acceleration, eps_scaling,
                 n_threads, comm):
    """:func:`sinkhorn_ot.sinkhorn` of one C (n, m) against k targets b (m, k)."""
    from ._api import sinkhorn as one

    if comm is not None:
        raise ValueError("several targets (b of shape (m, k)) cannot be split across "
                         "processes: pass comm=None")
    reg = V.positive_scalar(reg, "reg")
    opts = _problem.options(tol=tol, max_iter=max_iter, n_iter=n_iter,
                            acceleration=acceleration, eps_scaling=eps_scaling,
                            n_threads=n_threads, init=init)
    if a is not None and len(_shape(a)) != 1:
        raise ValueError(f"with several targets b (m, k), a must be one marginal (n,), got "
                         f"shape {_shape(a)}")
    native = to_native(C, "C")
    n, m = _shape(native.array)
    # the matrix and a are checked once, with the first target, as a single solve checks them
    b0 = _host64(b)
    if b0.shape[0] != m or b0.shape[1] == 0:
        raise ValueError(f"b must have shape ({m},) or ({m}, k) to match C, got {b0.shape}")
    p = _problem.prepare(C, "C", alpha=-1.0 / reg, a=a, b=b0[:, 0], rho_a=1.0, rho_b=1.0,
                         opts=opts, want_labels=False, balanced=True,
                         reducer=_problem.reducer(None))
    wk, logk = _targets(b0, m, p.a.total)
    k = wk.shape[0]
    kw = dict(reg=reg, tol=tol, n_iter=n_iter, acceleration=acceleration,
              eps_scaling=eps_scaling, n_threads=n_threads)
    if native.device != "cpu" or p.keep is not None or p.rows is not None:
        # (CUDA arrays; zero-mass entries of a, or of the first target: target by target)
        Cn = native.array

        def single(t):
            return one(Cn, a, wk[t], init=_take(init, t, 1), max_iter=max_iter, **kw)

        res = _loop(C, single, k, "target")
        out = _common(res, native)
        _warn_unconverged(out["converged"] | (n_iter is not None), out["err"],
                          [p.tol] * k, "targets")
        return OTResult(**out)
    X = p.X
    g0 = _batch_init(init, k, m, wk)
    tols = np.full(k, p.tol)
    zero = (wk == 0)
    for t in np.nonzero(zero.any(axis=1))[0]:  # a row allowed only in massless columns
        allowed = (X != math.inf) & ~zero[t][None, :]
        rows = ~allowed.any(axis=1) & (p.a[0] > 0)
        if rows.any():
            raise ValueError(f"target {t} (b[:, {t}]): infeasible problem: row "
                             f"{int(np.argmax(rows))} of C has every entry forbidden (or in "
                             "columns of zero mass)")
    alpha = -1.0 / reg
    if n * m <= SMALL_ENTRIES:  # every target on its own thread, sharing the (cached) matrix
        from . import _core

        memory = _MEMORY if acceleration == "anderson" else 0
        rel_slack = 1e-13 if X.dtype == np.float64 else 1e-6
        f, g, it, err, cost, _, stalled, _, _ = _core.batched_solve(
            X, k, alpha, np.ascontiguousarray(p.a[1]), logk, g0, tols, math.inf,
            opts.max_iter, opts.n_iter or 0, memory, rel_slack, _STALL_WINDOW,
            _eps_stages(opts.eps_scaling), False, opts.n_threads or 0)
        if opts.n_iter is None:
            def single_left(t, left):
                return one(X, p.a[0], wk[t], init=None if g0 is None else g0[t],
                           max_iter=left, **kw)

            _resolve_stalled(stalled.astype(bool), tols, opts.max_iter, single_left, f, g,
                             it, err, cost)
    else:
        f, g, it, err, cost = _multi_loop(X, alpha, p.a[1], logk, g0, tols, opts,
                                          acceleration, p.max_abs)
    conv = err <= tols
    _readonly(f, g, it, err, conv, cost)
    if opts.n_iter is None:
        _warn_unconverged(conv, err, tols, "targets")
    wrap, nt = native.wrap, opts.n_threads
    fp, gp = f.copy(), g.copy()
    return OTResult(f=wrap(f), g=wrap(g), n_iter=it, err=err, converged=conv, cost=cost,
                    _plan=lambda: wrap(_plans(X, alpha, fp, gp, nt)))


def _multi_loop(X, alpha, loga, logk, g0, tols, opts, acceleration, max_abs):
    """k targets against one large X: each pass reads X once for every target still
    running (``_core.multi_pass``); each target runs the single solve's loop (its own best
    iterate, Anderson mixing, stop at its tolerance).  Returns (f, g, n_iter, err, cost)."""
    from . import _core

    nt = opts.n_threads or 0
    n, m = X.shape
    k = logk.shape[0]
    loga = np.ascontiguousarray(loga)
    log_n = math.log(n)
    wk = np.exp(logk)
    dead = wk == 0
    if g0 is None:
        L = _core.column_lse(X, alpha, None, nt)
        with np.errstate(invalid="ignore"):
            G = np.where(np.isneginf(logk), -np.inf, logk - L[None, :])
    else:
        G = g0.copy()
    fixed = opts.n_iter is not None
    iters = opts.n_iter if fixed else opts.max_iter
    a = np.exp(loga)
    acc = [None] * k
    if acceleration == "anderson" and not fixed:
        for t in range(k):
            if (wk[t] > 0).all():  # (a massless column's g is -inf: plain passes there)
                acc[t] = Anderson(np, rel_slack=1e-13 if X.dtype == np.float64 else 1e-6,
                                  bound=potential_bound(np, loga, logk[t],
                                                        abs(alpha) * max_abs, n))
    best_err = np.full(k, np.inf)
    best_g = G.copy()
    n_iter = np.zeros(k, dtype=np.int64)
    active = list(range(k))
    for it in range(1, iters + 1):
        if not active:
            break
        F, col, _, under = _core.multi_pass(X, alpha, np.ascontiguousarray(G[active]), loga,
                                            False, nt)
        still = []
        for j, t in enumerate(active):
            g = G[t]
            c = col[j]
            if under[j]:  # a column underflowed: this target's pass measured exactly
                fw = np.empty(n)
                c, colmax, _, _ = _core.fused_pass(X, alpha, g, loga, 1.0, fw, None, nt)
                F[j] = fw
            else:
                with np.errstate(divide="ignore"):
                    colmax = np.log(c)
            g_next, err = _core.column_update(g, logk[t], c, colmax, log_n, 1.0)
            g_next[dead[t]] = -np.inf  # a column of zero mass keeps g = -inf
            n_iter[t] = it
            ok = True
            if acc[t] is not None:
                af = a * np.where(a > 0, F[j], 0.0)
                bg = wk[t] * g
                dual, scale = af.sum() + bg.sum(), np.abs(af).sum() + np.abs(bg).sum()
                g_max = float(np.abs(g - g.mean()).max())
                ok = g_max <= acc[t].bound
            if (err <= best_err[t] or fixed) and ok:
                best_err[t], best_g[t] = err, g
            if (not fixed and err <= tols[t] and best_err[t] == err) or not math.isfinite(err):
                continue
            G[t] = g_next if acc[t] is None else acc[t].step(g, g_next, dual, scale, g_max)
            still.append(t)
        active = still
    # the returned iterates measured by one more pass (their f, err and cost)
    F, col, cost, under = _core.multi_pass(X, alpha, np.ascontiguousarray(best_g), loga, True,
                                           nt)
    err = np.empty(k)
    for t in range(k):
        c = col[t]
        if under[t]:
            fw = np.empty(n)
            c, _, qx, _ = _core.fused_pass(X, alpha, best_g[t], loga, 1.0, fw, None, nt)
            F[t], cost[t] = fw, qx
        err[t] = float(np.abs(c - wk[t]).sum())
    return F, best_g, n_iter, err, cost


def codes(scores, *, eps, n_iter, probabilities, rows, b, tol, max_iter, n_threads):
    """:func:`sinkhorn_ot.codes` of a batch of score matrices (B, N, K).  On the CPU small
    problems go to the batched kernel (fixed ``n_iter``: the same passes as a single call,
    in float64); otherwise problem by problem."""
    from . import _codes as K_

    eps = V.positive_scalar(eps, "eps")
    if not isinstance(probabilities, (bool, np.bool_)):
        raise TypeError(f"probabilities must be True or False, got {probabilities!r}")
    n_iter = V.positive_int(n_iter, "n_iter")
    out_dtype = K_._family_dtype(scores)
    X_in = K_._as_input(scores, bool(probabilities))
    native = to_native(X_in, "scores")
    shape = native.array.shape
    small = native.device == "cpu" and len(shape) == 3 and shape[1] * shape[2] <= SMALL_ENTRIES
    if not small:
        res = []
        for p in range(shape[0]):
            try:
                res.append(K_.codes(scores[p], eps=eps, n_iter=n_iter,
                                    probabilities=probabilities, rows=rows, comm=None,
                                    b=_take(b, p, 1), tol=tol, max_iter=max_iter,
                                    n_threads=n_threads))
            except (ValueError, TypeError) as exc:
                raise _prefix(p, exc) from exc
        if type(res[0]).__module__.split(".")[0] == "torch":
            import torch

            return torch.stack(res)
        from ._arrays import array_module

        return array_module(native).stack(res)
    opts = _problem.options(tol=tol, max_iter=max_iter,
                            n_iter=None if tol is not None else n_iter, n_threads=n_threads)
    def single_left(p, left):
        _, pb, _ = batch.problem(p)
        return _codes_solve(batch.X[p], eps, pb, opts.tol, left, n_threads)

    try:
        batch = _Batch(X_in, "scores", 1.0 / eps, None, b, opts, -math.inf)
        f, g, it, err, cost, _ = _solve_kernel(batch, single_left, n_iter=opts.n_iter,
                                               max_iter=opts.max_iter,
                                               acceleration="anderson", want_labels=False)
    except ValueError as exc:
        err = K_._probability_error(exc) if probabilities else exc
        if err is exc:
            raise
        raise err from exc
    B, N = batch.B, batch.n
    idx = K_._row_index(rows, N, np)
    if opts.n_iter is None:
        _warn_unconverged(err <= batch.tol, err, batch.tol)
    Q = _plans(batch.X, batch.alpha, f + math.log(N), g, n_threads)[:, idx]
    if out_dtype != "bfloat16" and Q.dtype != np.dtype(out_dtype):
        Q = Q.astype(out_dtype)
    out = native.wrap(np.ascontiguousarray(Q))
    if K_._is_torch(out) and str(out.dtype) != f"torch.{out_dtype}":
        import torch

        out = out.to(getattr(torch, out_dtype))
    return out


def _codes_solve(X, eps, b, tol, max_iter, n_threads):
    """The single solve behind :func:`sinkhorn_ot.codes` with ``tol`` (potentials)."""
    from ._api import balanced_assign

    return balanced_assign(X, 1.0 / eps, b=b, tol=tol, max_iter=max_iter, n_threads=n_threads)
