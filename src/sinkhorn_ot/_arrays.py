"""Array families: NumPy to the CPU core, CuPy to the CUDA kernels, anything with
``__dlpack__`` (PyTorch, JAX, ...) taken without a copy and answered in its own family."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

_KDL_CPU = 1
_KDL_CUDA = 2


@dataclass(frozen=True)
class Native:
    """An input seen as a NumPy or CuPy array, and how to hand results back."""

    array: Any            # numpy.ndarray or cupy.ndarray (bfloat16 travels as a uint16 view)
    dtype: str            # "float64", "float32", "float16" or "bfloat16"
    device: str           # "cpu" or "cuda"
    wrap: Callable[[Any], Any]   # native result array -> caller's family
    stream: Any = None    # the producer's current CUDA stream (cupy ExternalStream) if any


def _identity(x):
    return x


def is_cupy(x) -> bool:
    return type(x).__module__.split(".")[0] == "cupy"


def to_host(x):
    """A NumPy view of a CuPy array (one device-to-host copy); anything else unchanged."""
    return x.get() if is_cupy(x) else x


def import_cupy():
    """Import CuPy or raise a clear error naming the extra to install."""
    try:
        return importlib.import_module("cupy")
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise ImportError(
            "this input lives on a CUDA device, which needs CuPy: "
            'pip install "sinkhorn-ot[cuda]"') from exc


def _torch_native(x, name):
    import torch

    dt = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16",
          torch.bfloat16: "bfloat16"}.get(x.dtype)
    if dt is None:
        raise TypeError(f"{name} must be a floating tensor, got dtype {x.dtype}")
    if x.device.type == "cuda":
        cp = import_cupy()
        stream = cp.cuda.ExternalStream(torch.cuda.current_stream(x.device).cuda_stream,
                                        x.device.index)
        # CuPy has no bfloat16 dtype: move the bits as uint16 and tell the kernels.
        src = x.view(torch.int16) if dt == "bfloat16" else x
        with cp.cuda.Device(x.device.index):
            arr = cp.from_dlpack(src)
        return Native(arr, dt, "cuda", lambda r: torch.from_dlpack(r), stream)
    if x.device.type != "cpu":
        raise TypeError(f"{name} is on device {x.device}; only CPU and CUDA are supported")
    if dt == "bfloat16":
        raise TypeError(f"{name}: bfloat16 is supported on CUDA devices only; "
                        "call .float() for the CPU core")
    return Native(np.from_dlpack(x.detach()), dt, "cpu", lambda r: torch.from_dlpack(r))


def to_native(x, name: str) -> Native:
    """See ``x`` as a NumPy or CuPy array without copying it."""
    if is_cupy(x):  # first: the kernel emulation of the tests passes NumPy subclasses as CuPy
        return Native(x, x.dtype.name, "cuda", _identity)
    if isinstance(x, np.ndarray):
        return Native(x, x.dtype.name, "cpu", _identity)
    mod = type(x).__module__.split(".")[0]
    if mod == "torch":
        return _torch_native(x, name)
    if hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__"):
        dev = x.__dlpack_device__()[0]
        back = importlib.import_module(mod).from_dlpack if hasattr(
            importlib.import_module(mod), "from_dlpack") else _identity
        if dev == _KDL_CPU:
            arr = np.from_dlpack(x)
            return Native(arr, arr.dtype.name, "cpu", back)
        if dev == _KDL_CUDA:
            arr = import_cupy().from_dlpack(x)
            return Native(arr, arr.dtype.name, "cuda", back)
        raise TypeError(f"{name}: unsupported DLPack device type {dev}")
    arr = np.asarray(x)
    return Native(arr, arr.dtype.name, "cpu", _identity)


def array_module(native: Native):
    return import_cupy() if native.device == "cuda" else np


def constant(x):
    """``x`` as a constant: a PyTorch tensor that requires grad is detached (DLPack refuses
    to export it; the solvers are not differentiable, so its gradient could not flow
    anyway)."""
    if type(x).__module__.split(".")[0] == "torch" and getattr(x, "requires_grad", False):
        return x.detach()
    return x

