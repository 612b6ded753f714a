"""Typed, immutable result objects returned by the solvers."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

__all__ = ["OTResult", "Assignment", "UnbalancedResult", "EMDResult"]


def _length(x) -> str:
    """Length of a potential (any array family), or ``?`` where there is none."""
    shape = getattr(x, "shape", None)
    return str(shape[0]) if shape else "?"


@dataclass(frozen=True, eq=False, repr=False)
class OTResult:
    """Solution of an entropic optimal transport problem.

    The plan is ``Q[i, y] = exp(S[i, y] + f[i] + g[y])`` with ``S = -C / reg`` (or
    ``S = lam * logP`` for :func:`balanced_assign`); it is never formed unless :meth:`plan`
    is called.  Arrays are of the input's family (NumPy, CuPy, or the ``__dlpack__``
    producer such as PyTorch) and device.  The result of a batch of ``B`` problems (a
    matrix of shape ``(B, n, m)``, or ``B`` targets) has the batch axis in front of every
    field: ``f`` (B, n), ``g`` (B, m), ``n_iter``, ``err``, ``converged`` and ``cost``
    NumPy arrays of shape (B,), ``plan()`` (B, n, m).

    Attributes
    ----------
    f : array, shape (n,)
        Row (sample) dual potential, natural-log units.
    g : array, shape (m,)
        Column (cluster) dual potential, natural-log units.
    n_iter : int
        Fused passes run (one pass updates ``f`` and measures the column sums).
    err : float
        L1 marginal violation ``||Q 1 - a||_1 + ||Q^T 1 - b||_1`` of the returned
        ``(f, g)``.  The rows are exact by construction (up to rounding), so this is the
        column violation.  For a KL-relaxed side it is measured against that side's relaxed
        target (see :func:`sinkhorn_unbalanced`).
    converged : bool
        ``err <= tol``.
    cost : float
        Transport cost ``<Q, C>`` (``C = -logP`` for :func:`balanced_assign`), forbidden
        pairs excluded.  Results are constants, not differentiable: for a loss to
        backpropagate through, see :func:`sinkhorn_ot.torch.sinkhorn_cost`.
    """

    f: Any
    g: Any
    n_iter: int
    err: float
    converged: bool
    cost: float
    _plan: Callable[[], Any] = field(repr=False)

    def __repr__(self) -> str:
        # A summary, not the potentials: printing a result must not dump n + m numbers.
        shape = getattr(self.f, "shape", None)
        if shape is not None and len(shape) == 2:  # a batch: its size and worst problem
            n_iter, err, conv = (np.asarray(v) for v in (self.n_iter, self.err, self.converged))
            return (f"{type(self).__name__}(batch={shape[0]}, shape=({shape[1]}, "
                    f"{self.g.shape[1]}), max n_iter={int(n_iter.max())}, max err="
                    f"{float(err.max()):.3g}, converged={int(conv.sum())}/{conv.size})")
        return (f"{type(self).__name__}(shape=({_length(self.f)}, {_length(self.g)}), "
                f"n_iter={self.n_iter}, err={self.err:.3g}, converged={bool(self.converged)})")

    def plan(self) -> Any:
        """Materialise the transport plan ``Q`` (shape (n, m)): ``n * m`` values of memory.

        Computed from the potentials and the input matrix that was solved (a reference is
        kept, not a copy: do not modify the input in place before calling this).
        """
        return self._plan()


@dataclass(frozen=True, eq=False, repr=False)
class Assignment(OTResult):
    """Self-labelling solution of :func:`balanced_assign`.

    Attributes
    ----------
    labels : array of int64, shape (N,)
        Hard cluster of each sample, ``argmax_y (lam * logP[i, y] + g[y])``: the argmax of
        each row of the plan.
    sizes : array of int64, shape (K,)
        Number of samples given each cluster by ``labels``.
    """

    labels: Any = None
    sizes: Any = None


@dataclass(frozen=True, eq=False, repr=False)
class UnbalancedResult(OTResult):
    r"""Solution of :func:`sinkhorn_unbalanced` (KL-relaxed marginals).

    Inherits ``f``, ``g``, ``n_iter``, ``err`` (the L1 column violation against the relaxed
    target, the stopping quantity), ``converged``, ``cost = <Q, C>`` and ``plan()``.

    Attributes
    ----------
    objective : float
        The unbalanced objective of the returned plan,
        ``<Q, C> + reg KL(Q | a b^T) + reg_m_a KL(Q 1 | a) + reg_m_b KL(Q^T 1 | b)`` with the
        generalised KL ``KL(x | y) = sum x log(x / y) - sum x + sum y`` (mass terms
        included; a side with ``reg_m = inf`` contributes nothing).
    err_a, err_b : float
        ``||Q 1 - a~||_1`` and ``||Q^T 1 - b~||_1`` against the relaxed targets
        ``a~ = a^(1/rho_a) exp(f (1 - 1/rho_a))`` and ``b~ = b^(1/rho_b) exp(g (1 - 1/rho_b))``
        (the first-order optimality conditions; ``a~ = a`` on an exact side).  Both are 0 at
        the optimum; ``err_a`` is 0 up to rounding by construction.
    dev_a, dev_b : float
        ``||Q 1 - a||_1`` and ``||Q^T 1 - b||_1``: how far the relaxation moved the
        marginals (0 on an exact side, up to ``err``).
    mass : float
        Total mass ``sum(Q)``.
    row_sums, col_sums : array, shapes (n,) and (m,)
        ``Q 1`` (exact by construction: the relaxed row target) and ``Q^T 1`` (measured by
        one extra pass), float64.
    """

    objective: float = float("nan")
    err_a: float = float("nan")
    err_b: float = float("nan")
    dev_a: float = float("nan")
    dev_b: float = float("nan")
    mass: float = float("nan")
    row_sums: Any = None
    col_sums: Any = None


@dataclass(frozen=True, eq=False, repr=False)
class EMDResult:
    r"""Solution of the exact (unregularised) transport LP, from :func:`emd`.

    Attributes
    ----------
    cost : float
        Optimal cost ``<P, C>``.
    f : ndarray of float64, shape (n,)
        Row dual potential; with ``g``, ``f_i + g_j <= C_ij`` on allowed pairs (to
        round-off), ``f_i + g_j = C_ij`` wherever the plan is positive, and ``<a, f> + <b,
        g> = cost``.
    g : ndarray of float64, shape (m,)
        Column dual potential.
    method : str
        What started the exact finish (a transport simplex): ``"simplex"`` (HiGHS's vertex
        of the LP on the pairs a coarse entropic plan favours) or ``"assignment"``
        (:func:`scipy.optimize.linear_sum_assignment`).
    """

    cost: float
    f: Any
    g: Any
    method: str
    _plan: Any = field(repr=False)

    def __repr__(self) -> str:
        shape = getattr(self._plan, "shape", None)
        shape = f"({shape[0]}, {shape[1]})" if shape else f"({_length(self.f)}, {_length(self.g)})"
        return f"EMDResult(shape={shape}, cost={self.cost:.6g}, method={self.method!r})"

    def plan(self):
        """The optimal plan as a ``scipy.sparse.csr_array`` of shape (n, m), float64: a
        basic solution has at most ``n + m - 1`` nonzeros."""
        return self._plan
