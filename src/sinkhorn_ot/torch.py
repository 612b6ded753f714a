r"""Differentiable Sinkhorn costs for PyTorch: :func:`sinkhorn_cost` and
:func:`sinkhorn_divergence`.

Import it explicitly (``import sinkhorn_ot.torch``); ``import sinkhorn_ot`` alone does not
need PyTorch.  The forward pass is the library's solve (the C++ core for CPU tensors, the
CUDA kernels for CUDA tensors); the backward pass differentiates the dual objective at the
returned potentials (envelope theorem), so nothing is unrolled and nothing of size ``N x K``
is kept between the two passes: the backward pass writes the plan once, as the gradient of
the cost matrix.

The solvers of the main namespace (:func:`sinkhorn_ot.sinkhorn`,
:func:`sinkhorn_ot.sinkhorn_unbalanced`, ...) stay non-differentiable: their results are
constants (a tensor that requires grad is detached).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

try:
    import torch
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("sinkhorn_ot.torch needs PyTorch: pip install torch") from exc

from . import _problem
from . import _validation as V
from ._arrays import to_host, to_native
from ._backend import select_backend
from ._unbalanced import reg_m_pair, relaxation

__all__ = ["sinkhorn_cost", "sinkhorn_divergence"]


@dataclass
class _Solved:
    """What the backward pass needs of a solve: O(N + K) numbers and the options that
    rebuild the backend (the matrix itself is the caller's tensor, saved by reference)."""

    value: float
    f: Any                 # potentials of the returned plan, float64, the caller's family
    g: Any
    wa: Any                # the marginals as solved (uniform when not given), likewise
    wb: Any
    reg: float
    tau: tuple             # (reg_m_a, reg_m_b); inf on an exact side
    n_threads: Any


def _side(xp, w, pot):
    """``u = pot - log w``, the dual potential of one side in units of ``reg`` (``F / reg``
    in the notation of Feydy et al.).  Zero weights get ``u = 0`` here: they do not enter
    the value, and their gradient takes ``u`` from the c-transform."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        # a relaxed side's row (column) with every pair forbidden is solved without and
        # gets pot = -inf: its plan is zero, which is u = +inf (F = +inf in the dual)
        u = xp.where(w > 0, xp.where(xp.isneginf(pot), math.inf, pot - xp.log(w)), 0.0)
    return u


def _phi(xp, u, reg, tau):
    """``phi(reg u)``: ``reg u`` on an exact side, ``tau (1 - exp(-reg u / tau))`` on a
    relaxed one (tau = reg_m)."""
    if math.isinf(tau):
        return reg * u
    return -tau * xp.expm1(-(reg / tau) * u)


def _ratio(xp, u, reg, tau):
    """The plan's marginal over the weight at the optimum conditions of a side:
    ``exp(-reg u / tau)``, 1 on an exact side."""
    if math.isinf(tau):
        return xp.ones_like(u)
    return xp.exp(-(reg / tau) * u)


def _solve(C, a, b, reg, tau, tol, max_iter, n_iter, n_threads, symmetric=False) -> _Solved:
    """The forward pass: the library's solve and the dual objective of its potentials.
    ``symmetric``: ``C`` is symmetric and ``a`` is ``b`` (a self-transport problem; solved
    by the symmetric update where no row or column is dropped)."""
    rho_a, rho_b = relaxation(tau[0], reg), relaxation(tau[1], reg)
    balanced = rho_a == 1.0 and rho_b == 1.0
    opts = _problem.options(tol=tol, max_iter=max_iter, n_iter=n_iter, n_threads=n_threads)
    p = _problem.prepare(C, "C", alpha=-1.0 / reg, a=a, b=b, rho_a=rho_a, rho_b=rho_b,
                         opts=opts, want_labels=False, balanced=balanced,
                         reducer=_problem.reducer(None))
    sol = _problem.run(p, symmetric=symmetric and p.keep is None and p.rows is None)
    xp = p.xp
    wa, wb = p.a[0], p.b[0]
    u = _side(xp, wa, sol.f)
    v = _side(xp, wb, sol.g)
    # The rows of the returned plan meet their (relaxed) targets by construction: the mass
    # of the plan is that of its rows, a ratio of a away (1 on an exact side).
    mass = (wa * _ratio(xp, u, reg, tau[0])).sum()
    with np.errstate(invalid="ignore"):
        terms = xp.stack([(wa * _phi(xp, u, reg, tau[0])).sum(),
                          (wb * _phi(xp, v, reg, tau[1])).sum(), mass])
    pa, pb, mass = (float(t) for t in to_host(terms))
    value = pa + pb - reg * (mass - p.a.total * p.b.total)
    back = p.native.wrap
    return _Solved(value, back(sol.f), back(sol.g), back(wa), back(wb), reg, tau, n_threads)


def _gradients(backend, X, f, g, wa, wb, reg, tau, need, scale):
    """The backward pass on the backend's own arrays: ``scale`` times the gradients of the
    value of :func:`_solve` in ``X``, ``a`` and ``b`` (those ``need`` asks for, else None),
    with the potentials ``f``, ``g`` and marginals ``wa``, ``wb`` held fixed."""
    xp = backend.xp
    alpha = -1.0 / reg
    tau_a, tau_b = tau
    need_C, need_a, need_b = need
    grad_C = grad_a = grad_b = None
    if need_C:  # the plan of the returned potentials
        # the CPU kernel folds a positive scale into the exponent (as a log): the incoming
        # gradient's sign, or a zero or non-finite one, costs a sweep more
        if backend.device == "cpu" and 0 < abs(scale) < math.inf:
            grad_C = backend.plan(X, alpha, f, g, scale=abs(scale))
            if scale < 0:
                xp.negative(grad_C, out=grad_C)
        else:
            grad_C = backend.plan(X, alpha, f, g)
            grad_C *= scale
    ma, mb = float(wa.sum()), float(wb.sum())
    if need_a:
        u = _side(xp, wa, f)
        zero = wa == 0
        if bool(zero.any()):
            # zero-weight rows: u from the c-transform of g (a pass handed log a = 0
            # computes -rho_a LSE_y(S_iy + g_y) for every row; -inf: no mass reaches it)
            u0 = xp.empty(X.shape[0])
            backend.fused_pass(X, alpha, g, xp.zeros(X.shape[0]), relaxation(tau_a, reg),
                               u0, None)
            u = xp.where(zero, xp.where(xp.isneginf(u0), math.inf, u0), u)
        grad_a = _phi(xp, u, reg, tau_a) - reg * _ratio(xp, u, reg, tau_a) + reg * mb
    if need_b:
        # the columns are not exact at a stopped solve: their plan sums, over b, are
        # exp(v_y + LSE_i(S_iy + f_i)) (one read of X)
        L = backend.column_lse(X, alpha, f)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            v = _side(xp, wb, g)
            zero = wb == 0
            if bool(zero.any()):  # zero-weight columns: the c-transform of f
                v = xp.where(zero, -relaxation(tau_b, reg) * L, v)
            col = xp.where(xp.isneginf(L), 0.0, xp.exp(v + L))
        grad_b = _phi(xp, v, reg, tau_b) - reg * col + reg * ma
    balanced = math.isinf(tau_a) and math.isinf(tau_b)
    out = []
    for grad in (grad_a, grad_b):
        if grad is not None:
            if balanced:  # defined for sum(a) = sum(b) only: keep each total
                grad = grad - grad.mean()
            grad = grad * scale
        out.append(grad)
    return grad_C, out[0], out[1]


class _SinkhornCost(torch.autograd.Function):
    """Value: the dual objective of the solve's potentials (float64, 0-d).  Saves the cost
    matrix by reference and the O(N + K) potentials and marginals, nothing else."""

    @staticmethod
    def forward(ctx, C, a, b, solved):
        ctx.params = (solved.reg, solved.tau, solved.n_threads)
        # the gradients of the marginals in their own dtypes (the solve's are float64)
        ctx.dtypes = (None if a is None else a.dtype, None if b is None else b.dtype)
        ctx.save_for_backward(C, solved.f, solved.g, solved.wa, solved.wb)
        return torch.tensor(solved.value, dtype=torch.float64, device=C.device)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        C, f, g, wa, wb = ctx.saved_tensors
        reg, tau, n_threads = ctx.params
        native = to_native(C.detach(), "C")
        backend = select_backend(native, n_threads)
        xp = backend.xp
        X = V.matrix(native, "C", xp)
        # the saved float64 tensors as the backend's arrays (no copy)
        f, g, wa, wb = (xp.from_dlpack(t) for t in (f, g, wa, wb))
        grads = _gradients(backend, X, f, g, wa, wb, reg, tau, ctx.needs_input_grad[:3],
                           float(grad_out))
        grad_C, grad_a, grad_b = (None if t is None else native.wrap(t) for t in grads)
        if grad_C is not None and grad_C.dtype != C.dtype:  # 16-bit inputs: float32 plans
            grad_C = grad_C.to(C.dtype)
        grad_a, grad_b = (None if t is None else t.to(dtype)
                          for t, dtype in zip((grad_a, grad_b), ctx.dtypes))
        return grad_C, grad_a, grad_b, None


def _check_weights(w, n, name, C):
    """``w`` as given to the solve, and the tensor autograd should see (or None)."""
    if w is None:
        return None, None
    if isinstance(w, torch.Tensor):
        if w.device != C.device:
            raise ValueError(f"{name} is on {w.device} but C is on {C.device}")
        if w.ndim != 1 or w.shape[0] != n:
            raise ValueError(f"{name} must have shape ({n},) to match C, got "
                             f"{tuple(w.shape)}")
        return w.detach(), w
    return w, None


def _options(reg, reg_m):
    reg = V.positive_scalar(reg, "reg")
    tau = (math.inf, math.inf) if reg_m is None else reg_m_pair(reg_m)
    return reg, tau


def _cost64(C, a, b, reg, tau, tol, max_iter, n_iter, n_threads, symmetric=False):
    if not isinstance(C, torch.Tensor):
        raise TypeError(f"C must be a torch.Tensor, got {type(C).__name__} (for NumPy or "
                        "CuPy arrays use sinkhorn_ot.sinkhorn)")
    if C.ndim != 2:
        raise ValueError(f"C must be 2-d, got {C.ndim}-d with shape {tuple(C.shape)}")
    a_in, a_t = _check_weights(a, C.shape[0], "a", C)
    b_in, b_t = _check_weights(b, C.shape[1], "b", C)
    solved = _solve(C.detach(), a_in, b_in, reg, tau, tol, max_iter, n_iter, n_threads,
                    symmetric)
    return _SinkhornCost.apply(C, a_t, b_t, solved)


def sinkhorn_cost(C, a=None, b=None, *, reg, reg_m=None, tol=None, max_iter=1000,
                  n_iter=None, n_threads=None):
    r"""Entropic optimal transport cost of a PyTorch cost matrix, differentiable in ``C``,
    ``a`` and ``b``.

    The value is the regularised objective

    .. math::

        \mathrm{OT}(a, b) = \min_{Q \ge 0} \langle Q, C\rangle
            + \mathrm{reg}\,\mathrm{KL}(Q \,\|\, a b^T)
            + \mathrm{reg\_m}_a \mathrm{KL}(Q 1 \,\|\, a)
            + \mathrm{reg\_m}_b \mathrm{KL}(Q^T 1 \,\|\, b)

    (generalised KL, :math:`\mathrm{KL}(x\|y) = \sum x \log(x/y) - \sum x + \sum y`; a side
    with ``reg_m = inf``, the default ``reg_m=None`` for both, is an exact constraint and
    contributes nothing), computed as its dual objective at the solver's potentials
    :math:`F = \mathrm{reg}(f - \log a)`, :math:`G = \mathrm{reg}(g - \log b)`:

    .. math::

        D(F, G) = \langle a, \varphi_a(F)\rangle + \langle b, \varphi_b(G)\rangle
            - \mathrm{reg}\,\langle a b^T, e^{(F \oplus G - C)/\mathrm{reg}} - 1\rangle,

    with :math:`\varphi(F) = F` on an exact side and :math:`\varphi(F) = \mathrm{reg\_m}
    (1 - e^{-F/\mathrm{reg\_m}})` on a relaxed one (Séjourné et al. 2019).  ``D`` is at
    most ``OT`` for any potentials and equal at the optimum.

    The gradient is that of ``D`` with the potentials held fixed (envelope theorem): the
    plan :math:`Q = e^{-C/\mathrm{reg} + f \oplus g}` for ``C``, :math:`\varphi_a(F) -
    \mathrm{reg}\,(Q1)/a + \mathrm{reg}\sum b` for ``a`` and likewise for ``b``.  It is
    exact for the returned value at any stopping point (``tol`` or ``n_iter``) and is the
    gradient of ``OT`` itself at convergence; nothing is unrolled.  In the balanced case
    (both sides exact) the cost is defined only for ``sum(a) = sum(b)``, and the gradients
    of ``a`` and ``b`` are given centred (zero mean: perturbations that keep each total),
    :math:`F - \bar F` and :math:`G - \bar G` at convergence.

    Parameters
    ----------
    C : torch.Tensor, shape (n, m)
        Cost matrix, float32 or float64 on the CPU (the C++ core) or a CUDA device (the
        CUDA kernels; float16 and bfloat16 too).  ``+inf`` marks a forbidden pair (its
        gradient is 0).
    a : torch.Tensor or array of float, shape (n,), optional
        Row marginal (reference measure on a relaxed side), uniform ``1/n`` by default; a
        tensor on ``C``'s device to get its gradient.
    b : torch.Tensor or array of float, shape (m,), optional
        Column marginal, uniform ``1/m`` by default.
    reg : float
        Entropic regularisation (``> 0``).
    reg_m : float or (float, float), optional
        Marginal relaxation, as in :func:`sinkhorn_ot.sinkhorn_unbalanced`: one value for
        both sides or ``(reg_m_a, reg_m_b)``, ``inf`` for an exact side (semi-relaxed).
        ``None`` (default): balanced, as :func:`sinkhorn_ot.sinkhorn`.
    tol, max_iter, n_iter, n_threads
        As in :func:`sinkhorn_ot.sinkhorn` (a solve that does not reach ``tol`` warns).

    Returns
    -------
    torch.Tensor
        0-d, ``C``'s dtype and device, with a ``grad_fn`` when an input requires grad.

    Notes
    -----
    Memory: the backward pass allocates one ``n x m`` array, the gradient of ``C`` (the
    plan times the incoming gradient; for a 16-bit ``C`` on CUDA it is formed in float32,
    then cast), and O(n + m) besides; between the passes only the
    potentials and the marginals are kept (``C`` itself by reference: do not modify it in
    place before ``backward``).  The gradient of ``b`` costs one more read of ``C`` (the
    column sums of the plan); that of ``a`` none (the rows of the plan are exact).

    Examples
    --------
    >>> import torch, sinkhorn_ot.torch
    >>> x = torch.tensor([[0.0], [1.0]], requires_grad=True)
    >>> y = torch.tensor([[0.0], [2.0]])
    >>> C = ((x[:, None] - y[None]) ** 2).sum(-1)   # squared distances
    >>> cost = sinkhorn_ot.torch.sinkhorn_cost(C, reg=0.1)
    >>> cost.backward()
    >>> round(cost.item(), 4), [round(v, 3) + 0.0 for v in x.grad.flatten().tolist()]
    (0.5693, [0.0, -1.0])

    References
    ----------
    J. Feydy, T. Séjourné, F.-X. Vialard, S. Amari, A. Trouvé, G. Peyré, "Interpolating
    between optimal transport and MMD using Sinkhorn divergences", AISTATS 2019.

    T. Séjourné, J. Feydy, F.-X. Vialard, A. Trouvé, G. Peyré, "Sinkhorn divergences for
    unbalanced optimal transport", arXiv:1910.12958, 2019.
    """
    reg, tau = _options(reg, reg_m)
    out = _cost64(C, a, b, reg, tau, tol, max_iter, n_iter, n_threads)
    return out.to(C.dtype)


def _is_symmetric(M) -> bool:
    """``M == M.T`` exactly, compared a block of rows at a time (no n x n temporary)."""
    n = M.shape[0]
    step = max(1, (1 << 22) // max(n, 1))
    return all(torch.equal(M[i:i + step], M[:, i:i + step].T) for i in range(0, n, step))


def _mass(w, n, C):
    """The total of a marginal: a float64 tensor that carries the gradient of ``w`` when
    ``w`` is a tensor (1 for the uniform default)."""
    if w is None:
        return torch.tensor(1.0, dtype=torch.float64, device=C.device)
    if isinstance(w, torch.Tensor):
        return w.to(torch.float64).sum()
    return torch.tensor(float(np.sum(np.asarray(w, dtype=np.float64))),
                        dtype=torch.float64, device=C.device)


def sinkhorn_divergence(C_ab, C_aa, C_bb, a=None, b=None, *, reg, reg_m=None, tol=None,
                        max_iter=1000, n_iter=None, n_threads=None):
    r"""Debiased Sinkhorn divergence between ``a`` and ``b``, differentiable in the cost
    matrices and the marginals.

    .. math::

        S(a, b) = \mathrm{OT}(a, b) - \tfrac12 \mathrm{OT}(a, a) - \tfrac12 \mathrm{OT}(b, b)
            + \tfrac{\mathrm{reg}}{2} \Bigl(\sum a - \sum b\Bigr)^2

    with ``OT`` the cost of :func:`sinkhorn_cost` on ``C_ab``, ``C_aa`` and ``C_bb``
    (Feydy et al. 2019; the mass term is that of Séjourné et al. 2019 for KL-relaxed
    marginals, and is 0 in the balanced case, where the totals agree).  For costs
    ``C(x, y) = |x - y|`` or ``|x - y|^2 / 2`` evaluated on the points of ``a`` and ``b``,
    ``S`` is nonnegative, 0 exactly when ``a = b`` (up to the solves' tolerance: each
    ``OT`` is the dual objective at its returned potentials, a lower bound of the optimum)
    and metrizes weak convergence; the entropic bias of ``OT(a, b)`` (nonzero at
    ``a = b``) is removed.

    Parameters
    ----------
    C_ab : torch.Tensor, shape (n, m)
        Cost between the points of ``a`` and those of ``b``.
    C_aa : torch.Tensor, shape (n, n)
        Cost between the points of ``a`` (symmetric).
    C_bb : torch.Tensor, shape (m, m)
        Cost between the points of ``b`` (symmetric).
    a : torch.Tensor or array of float, shape (n,), optional
        Weights of the first measure, uniform ``1/n`` by default.
    b : torch.Tensor or array of float, shape (m,), optional
        Weights of the second measure, uniform ``1/m`` by default.
    reg : float
        Entropic regularisation (``> 0``); with squared distances, ``sqrt(reg)`` is the
        blur scale below which the divergence stops resolving the measures.
    reg_m : float, optional
        KL penalty of the marginals, the same on both sides (the debiasing needs a
        symmetric problem); ``None`` (default): balanced, ``sum(a) = sum(b)``.
    tol, max_iter, n_iter, n_threads
        As in :func:`sinkhorn_cost`, for each of the three solves.

    Returns
    -------
    torch.Tensor
        0-d, ``C_ab``'s dtype and device (the three costs are combined in float64).

    Examples
    --------
    >>> import torch, sinkhorn_ot.torch
    >>> x = torch.tensor([[0.0], [1.0]], requires_grad=True)
    >>> y = torch.tensor([[0.0], [2.0]])
    >>> cost = lambda p, q: ((p[:, None] - q[None]) ** 2).sum(-1) / 2   # not cdist: its
    >>> # gradient at a zero distance (the diagonals of C_aa and C_bb) is not defined
    >>> S = sinkhorn_ot.torch.sinkhorn_divergence(cost(x, y), cost(x, x), cost(y, y),
    ...                                           reg=0.01)
    >>> S.backward()
    >>> round(S.item(), 4), [round(v, 3) + 0.0 for v in x.grad.flatten().tolist()]
    (0.25, [0.0, -0.5])

    References
    ----------
    J. Feydy, T. Séjourné, F.-X. Vialard, S. Amari, A. Trouvé, G. Peyré, "Interpolating
    between optimal transport and MMD using Sinkhorn divergences", AISTATS 2019.

    T. Séjourné, J. Feydy, F.-X. Vialard, A. Trouvé, G. Peyré, "Sinkhorn divergences for
    unbalanced optimal transport", arXiv:1910.12958, 2019.
    """
    if reg_m is not None and (isinstance(reg_m, (tuple, list)) or hasattr(reg_m, "__len__")):
        raise ValueError("reg_m must be one number for both marginals: the debiased "
                         "divergence needs the same penalty on each side")
    reg, tau = _options(reg, reg_m)
    for name, M in (("C_ab", C_ab), ("C_aa", C_aa), ("C_bb", C_bb)):
        if not isinstance(M, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(M).__name__}")
        if M.ndim != 2:
            raise ValueError(f"{name} must be 2-d, got shape {tuple(M.shape)}")
    n, m = C_ab.shape
    for name, M, k in (("C_aa", C_aa, n), ("C_bb", C_bb, m)):
        if tuple(M.shape) != (k, k):
            raise ValueError(f"{name} must have shape ({k}, {k}) to match C_ab of shape "
                             f"({n}, {m}), got {tuple(M.shape)}")
    kw = dict(reg=reg, tau=tau, tol=tol, max_iter=max_iter, n_iter=n_iter,
              n_threads=n_threads)
    ot_ab = _cost64(C_ab, a, b, **kw)
    # the self-transport problems: the symmetric update where the costs are symmetric
    ot_aa = _cost64(C_aa, a, a, symmetric=_is_symmetric(C_aa.detach()), **kw)
    ot_bb = _cost64(C_bb, b, b, symmetric=_is_symmetric(C_bb.detach()), **kw)
    s = ot_ab - 0.5 * (ot_aa + ot_bb)
    if reg_m is not None:
        s = s + 0.5 * reg * (_mass(a, n, C_ab) - _mass(b, m, C_ab)) ** 2
    return s.to(C_ab.dtype)
