"""The CUDA backend as a package: hand-written kernels (csrc/cuda/sinkhorn_cuda.cu) compiled
at run time by NVRTC through CuPy.

- :mod:`.kernels`: the kernel catalogue (instance names), the source and its compilation,
  the compiled kernels of this process;
- :mod:`.layout`: how a pass covers a matrix, from the device's occupancy;
- :mod:`.launch`: one typed launcher per kernel, the argument structs of kernel_args.cuh;
- :mod:`.backend`: :class:`CUDABackend`, the primitives and the device-side loop.
"""
from .backend import WORK, CUDABackend
from .kernels import KERNELS, PIPE_CONFIGS, compile_offline, instances, kernel_source
from .layout import LAYOUTS

__all__ = ["CUDABackend", "PIPE_CONFIGS", "compile_offline", "instances", "kernel_source",
           "clear_caches"]

_kernel = KERNELS.get  # the name tests/test_cuda_emu.py launches a kernel by


def clear_caches():
    """Forget every compiled kernel, layout and work buffer (the kernel emulation of the
    tests swaps CuPy out underneath)."""
    KERNELS.clear()
    LAYOUTS.clear()
    WORK.clear()
