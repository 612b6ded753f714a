"""Validation of every public input, done once in Python before dispatch (the compiled
cores assume valid input and never repeat these checks)."""
from __future__ import annotations

import numbers

import numpy as np

from ._arrays import Native, constant, to_host

_FLOAT_KINDS = {"float64", "float32", "float16", "bfloat16"}
# Largest magnitude the kernels may meet in S = alpha * X (computed in float32 at least).
# (Python floats: a NumPy float32 here would make the comparison itself overflow.)
_FLOAT_MAX = {"float64": float(np.finfo(np.float64).max),
              "float32": float(np.finfo(np.float32).max),
              "float16": float(np.finfo(np.float32).max),
              "bfloat16": float(np.finfo(np.float32).max)}


def positive_scalar(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not (np.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return v


def positive_int(value, name: str, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def matrix(native: Native, name: str, xp, allow_empty_rows: bool = False):
    """Check dtype and shape; return a C-contiguous array the kernels can read.

    A non-contiguous input (a transposed view, Fortran order) is copied once.  On the CPU a
    float16 input is upcast to float32 (a copy); the CUDA kernels read float16 and bfloat16
    directly.
    """
    arr = native.array
    if native.dtype not in _FLOAT_KINDS:
        kind = np.dtype(arr.dtype).kind if native.dtype != "bfloat16" else "f"
        what = {"i": "integer", "u": "integer", "b": "boolean", "c": "complex"}.get(kind, "")
        raise TypeError(f"{name} must be a real floating array, got {what} dtype "
                        f"{native.dtype}".replace("  ", " "))
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-d (3-d: a batch of problems), got {arr.ndim}-d "
                         f"with shape {arr.shape}")
    if (arr.shape[0] == 0 and not allow_empty_rows) or arr.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    if native.device == "cpu" and native.dtype == "float16":
        arr = arr.astype(np.float32)
    if not arr.flags.c_contiguous:
        arr = xp.ascontiguousarray(arr)
    return arr


def matrix_values(check: dict, shape, name: str, forbidden: float, alpha: float, dtype: str):
    """Raise for what the backend's validation scan found (NaN, wrong infinity, an empty
    row or column, values that overflow once multiplied by ``alpha``)."""
    N, K = shape
    fi = int(check["first_invalid"])
    if fi >= 0:
        i, j = divmod(fi, K)
        other = "+inf" if forbidden < 0 else "-inf"
        raise ValueError(f"{name} has a NaN or {other} entry at ({i}, {j}); only finite "
                         f"values and {'-inf' if forbidden < 0 else '+inf'} (a forbidden "
                         "pair) are allowed")
    r = int(check["first_empty_row"])
    if r >= 0:
        raise ValueError(f"infeasible problem: row {r} of {name} has every entry forbidden")
    c = int(check["first_empty_col"])
    if c >= 0:
        raise ValueError(f"infeasible problem: column {c} of {name} has every entry forbidden")
    if abs(alpha) * float(check["max_abs"]) > _FLOAT_MAX[dtype] / 16:
        raise ValueError(f"{name} times {abs(alpha):g} overflows {dtype} "
                         f"(largest |entry| {float(check['max_abs']):g})")


class Weights(tuple):
    """``(w, log w)`` of a marginal, with what the host needs to know of it: ``total`` (the
    sum) and ``any_zero``, read from the device once, with the validation."""

    def __new__(cls, w, logw, total: float, any_zero: bool):
        out = super().__new__(cls, (w, logw))
        out.total, out.any_zero = float(total), bool(any_zero)
        return out


def marginal(v, n: int, name: str, xp, allow_zero_sum: bool = False) -> Weights:
    """Return (weights, log weights) as float64 arrays of the matrix's family (a
    :class:`Weights`); uniform 1/n when v is None."""
    if v is None:
        w = xp.full(n, 1.0 / n)
        return Weights(w, xp.log(w), 1.0, False)
    v = constant(v)
    if hasattr(v, "__dlpack__") and not isinstance(v, (np.ndarray,)) and \
            type(v).__module__.split(".")[0] != xp.__name__:
        v = xp.from_dlpack(v)
    w = xp.asarray(v)
    if w.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be real, got dtype {w.dtype}")
    w = w.astype(xp.float64)  # always a copy: the caller's array is never touched
    if w.ndim != 1 or w.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) to match the matrix, got {w.shape}")
    # one device-to-host read for the four facts (each read is a synchronisation on a GPU)
    finite, negative, total, zero = (float(v) for v in to_host(xp.stack([
        xp.isfinite(w).all(), (w < 0).any(), w.sum(), (w == 0).any()])))
    if not finite:
        raise ValueError(f"{name} has a non-finite entry at {int(xp.argmin(xp.isfinite(w)))}")
    if negative:
        raise ValueError(f"{name} has a negative entry at {int(xp.argmax(w < 0))}")
    if not total > 0 and not allow_zero_sum:  # a block of rows may sum to zero
        raise ValueError(f"{name} sums to zero")
    with np.errstate(divide="ignore"):
        return Weights(w, xp.log(w), total, zero)


def balanced_totals(sa: float, sb: float):
    """Raise unless the totals of a and b agree (to 1e-6 relative)."""
    if abs(sa - sb) > 1e-6 * max(sa, sb):
        raise ValueError(f"balanced marginals must have equal totals: sum(a) = {sa!r}, "
                         f"sum(b) = {sb!r}")


def init_potential(init, m: int, xp):
    """The column potential to warm-start from: a previous result, or its g."""
    if init is None:
        return None
    g = constant(getattr(init, "g", init))
    if hasattr(g, "__dlpack__") and type(g).__module__.split(".")[0] != xp.__name__:
        g = xp.from_dlpack(g)
    g = xp.asarray(g, dtype=xp.float64).copy()
    if g.shape != (m,):
        raise ValueError(f"init must be a result or a potential g of shape ({m},), "
                         f"got shape {g.shape}")
    # -inf is what a column of zero mass gets; such columns are solved without (see _api)
    if bool(xp.isnan(g).any()) or bool((g == xp.inf).any()):
        raise ValueError("init potential g has NaN or +inf entries")
    return g


def finite_init(g0):
    """After the columns of zero mass are dropped, the warm start must be finite."""
    if g0 is not None and not bool((g0 > -float("inf")).all()):
        raise ValueError("init potential g is -inf on a column of positive mass")
    return g0
