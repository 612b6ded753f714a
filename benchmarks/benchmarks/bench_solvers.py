"""asv benchmarks of sinkhorn-ot: time, peak memory and iterations of the public solvers.

Problems are the standard random(N, K) of benchmarks/_common.py:
``logP = log_softmax(3 * standard_normal((N, K)))`` with
``default_rng(0)``, lam = 25 (``sinkhorn`` gets ``C = -logP``, ``reg = 1/lam``).  Sizes are
strings "NxK" so that ``asv run --bench`` can select them by regex, e.g.
``--bench "BalancedAssign.time_balanced_assign\\('1000x10'"``.

Solvers that do not exist yet (``sinkhorn_unbalanced``, ``emd``) and the GPU benchmarks
(without CuPy and a CUDA device) skip themselves: ``setup`` raises ``NotImplementedError``,
asv's skip idiom.
"""
import numpy as np

import sinkhorn_ot

LAM = 25.0
SIZES = ["1000x10", "10000x100", "50000x1000", "200000x1000"]
DTYPES = ["float32", "float64"]
THREADS = [1, 2]

_CACHE = {}


def random_logP(size, dtype):
    """The standard random(N, K), cached per process (the largest is 1.6 GB in float64)."""
    key = (size, dtype)
    if key not in _CACHE:
        if len(_CACHE) > 1:                 # keep at most two large arrays alive
            _CACHE.clear()
        N, K = (int(v) for v in size.split("x"))
        x = np.random.default_rng(0).standard_normal((N, K))
        x *= 3.0
        x -= x.max(axis=1, keepdims=True)
        x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
        _CACHE[key] = np.ascontiguousarray(x, dtype=dtype)
    return _CACHE[key]


class _Base:
    params = (SIZES, DTYPES, THREADS)
    param_names = ["size", "dtype", "n_threads"]
    timeout = 1800.0                        # 200_000 x 1_000 at 1 thread is minutes per run
    number = 1
    repeat = (1, 3, 60.0)
    warmup_time = 0.0


class BalancedAssign(_Base):
    """``balanced_assign(logP, lam=25)`` to the default tolerance."""

    def setup(self, size, dtype, n_threads):
        self.logP = random_logP(size, dtype)

    def time_balanced_assign(self, size, dtype, n_threads):
        sinkhorn_ot.balanced_assign(self.logP, LAM, n_threads=n_threads)

    def time_10_passes(self, size, dtype, n_threads):
        """Fixed 10 iterations: the cost of one fused pass, without the iteration count."""
        sinkhorn_ot.balanced_assign(self.logP, LAM, n_iter=10, n_threads=n_threads)

    def peakmem_balanced_assign(self, size, dtype, n_threads):
        sinkhorn_ot.balanced_assign(self.logP, LAM, n_threads=n_threads)

    def track_n_iter(self, size, dtype, n_threads):
        return sinkhorn_ot.balanced_assign(self.logP, LAM, n_threads=n_threads).n_iter

    track_n_iter.unit = "iterations"


class Sinkhorn(_Base):
    """``sinkhorn(C = -logP, reg = 1/lam)`` to the default tolerance."""

    def setup(self, size, dtype, n_threads):
        self.C = np.negative(random_logP(size, dtype))

    def time_sinkhorn(self, size, dtype, n_threads):
        sinkhorn_ot.sinkhorn(self.C, reg=1.0 / LAM, n_threads=n_threads)

    def peakmem_sinkhorn(self, size, dtype, n_threads):
        sinkhorn_ot.sinkhorn(self.C, reg=1.0 / LAM, n_threads=n_threads)


class SinkhornUnbalanced(_Base):
    """``sinkhorn_unbalanced(C, reg = 1/lam, reg_m = 1)``, once it exists."""

    def setup(self, size, dtype, n_threads):
        if not hasattr(sinkhorn_ot, "sinkhorn_unbalanced"):
            raise NotImplementedError("sinkhorn_ot.sinkhorn_unbalanced does not exist yet")
        self.C = np.negative(random_logP(size, dtype))

    def time_sinkhorn_unbalanced(self, size, dtype, n_threads):
        sinkhorn_ot.sinkhorn_unbalanced(self.C, reg=1.0 / LAM, reg_m=1.0, n_threads=n_threads)

    def peakmem_sinkhorn_unbalanced(self, size, dtype, n_threads):
        sinkhorn_ot.sinkhorn_unbalanced(self.C, reg=1.0 / LAM, reg_m=1.0, n_threads=n_threads)


class Emd:
    """Exact LP ``emd(C)``, once it exists (small sizes only: it is an LP)."""

    params = (["1000x10", "300x300", "1000x1000"], ["float64"])
    param_names = ["size", "dtype"]
    timeout = 600.0

    def setup(self, size, dtype):
        if not hasattr(sinkhorn_ot, "emd"):
            raise NotImplementedError("sinkhorn_ot.emd does not exist yet")
        self.C = np.negative(random_logP(size, dtype))

    def time_emd(self, size, dtype):
        sinkhorn_ot.emd(self.C)

    def peakmem_emd(self, size, dtype):
        sinkhorn_ot.emd(self.C)


def _cupy_or_skip():
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no device")
    except Exception as e:  # noqa: BLE001 - ImportError, CUDA driver errors: all mean skip
        raise NotImplementedError(f"GPU benchmarks need CuPy and a CUDA device ({e})")
    return cupy


class GPUBalancedAssign:
    """``balanced_assign`` on a CuPy array (the CUDA kernels); skipped without a device.
    Includes the ImageNet-scale shape (1_281_167 x 3000) where the device memory allows it."""

    params = (["4096x3000", "200000x1000", "1281167x3000"], ["float32", "float64"])
    param_names = ["size", "dtype"]
    timeout = 600.0
    number = 1
    repeat = (1, 5, 60.0)

    def setup(self, size, dtype):
        cupy = _cupy_or_skip()
        N, K = (int(v) for v in size.split("x"))
        need = N * K * np.dtype(dtype).itemsize
        if need > 0.6 * cupy.cuda.Device().mem_info[0]:
            raise NotImplementedError(f"{size} {dtype} does not fit in device memory")
        rng = cupy.random.default_rng(0)
        x = 3.0 * rng.standard_normal((N, K), dtype=dtype)
        x -= x.max(axis=1, keepdims=True)
        x -= cupy.log(cupy.exp(x).sum(axis=1, keepdims=True))
        self.cupy, self.logP = cupy, cupy.ascontiguousarray(x)
        sinkhorn_ot.balanced_assign(self.logP, LAM, n_iter=2)        # compile the kernels
        cupy.cuda.Device().synchronize()

    def time_balanced_assign(self, size, dtype):
        sinkhorn_ot.balanced_assign(self.logP, LAM)
        self.cupy.cuda.Device().synchronize()

    def time_3_iterations(self, size, dtype):
        """SwAV/DINOv2 style: a fixed 3 iterations."""
        sinkhorn_ot.balanced_assign(self.logP, LAM, n_iter=3)
        self.cupy.cuda.Device().synchronize()
