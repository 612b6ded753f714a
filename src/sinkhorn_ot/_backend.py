"""The contract between the solver and a compute backend, and the choice of backend.

Two backends implement it: ``_cpu.CPUBackend`` (NumPy arrays, the compiled C++/OpenMP core)
and ``_cuda.CUDABackend`` (CuPy arrays, the CUDA kernels).  The solver (:mod:`._solver`) is
written once over these primitives; the arithmetic they share lives in
``csrc/common/sinkhorn_math.h``.  Arrays are the backend's own (``xp``); vectors are float64.
"""
from __future__ import annotations

from typing import Any, Protocol


class Backend(Protocol):
    xp: Any                 # the array module: numpy or cupy
    device: str             # "cpu" or "cuda"
    # True: a pass may form rows in float32 (float32 input) or with short float64
    # exponentials within a relative plan error the loop allows (fused_pass(fast=...)), the
    # bound it used reported in ``slack``
    mixed_precision: bool

    def check(self, X, forbidden: float, alpha=None) -> dict:
        """One scan of ``X``: ``first_invalid`` (flat index of a NaN or wrong infinity, -1
        if none), ``first_empty_row``, ``first_empty_col`` (every entry ``forbidden``, -1 if
        none) and ``max_abs`` (the largest finite ``|X|``); with ``alpha``, where the backend
        can compute it in the same read, ``lse``: the column log-sum-exp of ``alpha X``."""

    def column_lse(self, X, alpha: float, f):
        """``LSE_i(alpha X_iy + f_i)`` per column (``f`` None: 0)."""

    def fused_pass(self, X, alpha: float, g, loga, rho_a: float, f_out, labels_out,
                   plan=None):
        """One read of ``X`` at ``g``: writes ``f`` (and the row argmax when ``labels_out``
        is given; the plan rows when ``plan = (out, rows, scale)`` is given); returns
        ``(col, colmax, qx)``, the plan's column sums, column maxima and ``sum Q * X``
        (``qx`` may be a device scalar)."""

    def column_update(self, g, logb, col, colmax, log_n_rows: float, rho_b: float):
        """The next ``g`` and the L1 column error of the pass (possibly a device scalar)."""

    def labels(self, X, alpha: float, g, out):
        """Write the first argmax over y of ``alpha X_iy + g_y`` into ``out``; return it."""

    def plan(self, X, alpha: float, f, g):
        """``exp(alpha X + f_i + g_y)`` in X's precision (float32 for 16-bit inputs)."""

    def solve(self, X, alpha: float, loga, logb, **kw):
        """Plain passes with the semantics of ``_solver.sinkhorn_loop`` (best iterate, no
        acceleration; ``L0`` and ``plan`` as there); returns a ``_solver.Solution``."""


def select_backend(native, n_threads) -> Backend:
    """The backend of an input's array family: CUDA for device arrays, else the CPU core."""
    if native.device == "cuda":
        from ._cuda import CUDABackend  # lazy: CuPy is optional

        return CUDABackend(dtype=native.dtype, stream=native.stream)
    from ._cpu import CPUBackend

    return CPUBackend(n_threads)
