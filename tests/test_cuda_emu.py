"""The GPU test suite (tests/test_gpu.py) without a GPU, on the kernel emulation of
tests/cuda_emu: the real kernel source compiled for the CPU, every launch checked against the
kernel's C++ signature, results compared with the CPU core as on a device.  It checks the
kernels' logic and the host code that drives them, not speed or the GPU memory model: a GPU
run (benchmarks/gpu/run.sh) is still the test of those."""
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or shutil.which("g++") is None,
    reason="the kernel emulation needs g++ on x86-64")


@pytest.mark.slow
def test_gpu_suite_on_the_kernel_emulation():
    env = dict(os.environ, SINKHORN_OT_CUDA_EMU="1")
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-m", "pytest", "-q", "-p",
                        "no:cacheprovider", "-rfs",
                        os.path.join(here, "test_gpu.py")],
                       env=env, capture_output=True, text=True, timeout=1800)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-8000:]
    passed = int(re.search(r"(\d+) passed", out).group(1))
    assert passed >= 80, out[-4000:]  # the suite ran, not skipped wholesale


def test_small_batch_solve_launches_and_host_reads():
    """Issue 3's launch-bound shapes (SwAV: n_iter = 3): the public API makes a handful of
    kernel launches and reads device memory from the host three times (the validation
    scan's 32 bytes, the loop state, and whether any row's label ties: the count of
    tie_count_kernel with the empty-cluster check), never inside the loop; a tolerance solve
    reads the loop state once per 10 passes, an accelerated one twice a pass.  Counted on
    the emulation (CuPy's own elementwise kernels, e.g. the uniform marginals, are not
    counted)."""
    import math

    import numpy as np

    import cuda_emu
    import sinkhorn_ot

    logp = np.log(np.random.default_rng(0).dirichlet(np.ones(300), 256)).astype(np.float32)
    with cuda_emu.installed() as cp:
        X = cp.asarray(logp)
        sinkhorn_ot.balanced_assign(X, 25.0, n_iter=3)  # compile the kernels first
        cuda_emu.Counters.reset()
        r = sinkhorn_ot.balanced_assign(X, 25.0, n_iter=3)
        # check (init, scan, finish), first column LSE (2), 3 x (pass, finish), tie count
        assert (cuda_emu.Counters.launches, cuda_emu.Counters.reads) == (12, 3)
        ref = sinkhorn_ot.balanced_assign(logp, 25.0, n_iter=3)
        assert (r.labels.get() == ref.labels).mean() >= 0.99
        cuda_emu.Counters.reset()
        r = sinkhorn_ot.balanced_assign(X, 25.0, acceleration=None, eps_scaling=False,
                                        tol=1e-3)
        assert r.converged
        # + 2 after the loop for the labels: the tie tolerance (min and sum of b) and the
        # tie count
        assert cuda_emu.Counters.reads <= 3 + math.ceil(r.n_iter / 10) + 2
        # the accelerated loop decides on the host each pass: two reads a pass (err with the
        # dual objective, then the Anderson system), not six
        cuda_emu.Counters.reset()
        r = sinkhorn_ot.balanced_assign(X, 25.0, tol=1e-6)
        assert r.converged
        assert cuda_emu.Counters.reads <= 3 + 2 * r.n_iter + 2


def test_emulation_catches_out_of_bounds_writes():
    """The guards of every emulated allocation: bytes checked after each launch for a short
    overrun (a long one hits an inaccessible page and faults), and argument sizes."""
    import numpy as np

    import cuda_emu

    with cuda_emu.installed() as cp:
        from sinkhorn_ot import _cuda

        K = 100
        g, logb, colmax = cp.zeros(K), cp.zeros(K), cp.zeros(K)
        col = cp.full(K, 1.0)
        short, terms = cp.empty(K - 1), cp.empty(K)
        kern = _cuda._kernel("sinkhorn_ot::cuda::column_update_kernel")
        with pytest.raises(RuntimeError, match="wrote past the end of an allocation"):
            kern((1,), (128,), (g, logb, col, colmax, np.int64(K), np.float64(0.0),
                                np.float64(1.0), short, terms))
        with pytest.raises(TypeError, match="argument 4"):  # int32 for an i64 parameter
            kern((1,), (128,), (g, logb, col, colmax, np.int32(K), np.float64(0.0),
                                np.float64(1.0), terms, terms))
