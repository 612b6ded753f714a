"""Typed, immutable result objects returned by the solvers."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["OTResult", "Assignment"]


@dataclass(frozen=True, eq=False)
class OTResult:
    """Solution of an entropic optimal transport problem.

    The plan is ``Q[i, y] = exp(S[i, y] + f[i] + g[y])`` with ``S = -C / reg`` (or
    ``S = lam * logP`` for :func:`balanced_assign`); it is never formed unless :meth:`plan`
    is called.  Arrays are of the input's family (NumPy, CuPy, or the ``__dlpack__``
    producer such as PyTorch) and device.

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
        pairs excluded.
    """

    f: Any
    g: Any
    n_iter: int
    err: float
    converged: bool
    cost: float
    _plan: Callable[[], Any] = field(repr=False)

    def plan(self) -> Any:
        """Materialise the transport plan ``Q`` (shape (n, m)): ``n * m`` values of memory.

        Computed from the potentials and the input matrix that was solved (a reference is
        kept, not a copy: do not modify the input in place before calling this).
        """
        return self._plan()


@dataclass(frozen=True, eq=False)
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
