"""How one solve combines what its rows contribute: :class:`Local` (one process holds every
row, the reductions are the identity) or ``distributed.Sharded`` (rows split across
processes, reductions across ranks).  Both the preparation (:mod:`._problem`) and the loop
(:mod:`._solver`) are written once over this interface; a sharded solve differs from a local
one only in the reducer it is handed."""
from __future__ import annotations


class Local:
    """The reducer of a solve whose process holds every row: reductions are the identity and
    errors are raised where they occur."""

    local = True           # the backend's own loop (on a GPU, a device-side loop) may run
    sharded = False        # a block of rows may be empty, and so may its share of a's mass

    def __init__(self):
        self.n_rows_total = 0

    # -- preparation --------------------------------------------------------------------
    def agreed(self, fn, *args):
        """``fn(*args)``; a sharded reducer raises an error of any rank on every rank."""
        return fn(*args)

    def agree_shape(self, exc, N: int, total_a, params, name: str) -> tuple:
        """After every process validated its inputs alone: ``(n_rows_total, sum_a)``, the
        mass of ``a`` over every row (``None``: ``a`` defaults to uniform)."""
        if exc is not None:
            raise exc
        self.n_rows_total = N
        return N, 1.0 if total_a is None else total_a

    def agree_scan(self, exc, chk: dict, Xs, forbidden: float) -> dict:
        """The validation scan of every process's rows combined (row indices global)."""
        if exc is not None:
            raise exc
        return chk

    def loop_backend(self, backend, N: int):
        return backend

    def sum_counts(self, counts):
        return counts

    # -- the loop -----------------------------------------------------------------------
    def allreduce_sum(self, x):
        return x

    def allreduce_max(self, x):
        return x

    def allreduce_lse(self, L):
        return L

    def allreduce_pass(self, col, colmax, qx):
        """Combine one fused pass: column sums, column maxima, ``sum Q * X``."""
        return col, colmax, qx
