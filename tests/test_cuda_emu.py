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


def test_gpu_suite_on_the_kernel_emulation():
    env = dict(os.environ, SINKHORN_OT_CUDA_EMU="1")
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfs",
                        os.path.join(here, "test_gpu.py")],
                       env=env, capture_output=True, text=True, timeout=1800)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-8000:]
    passed = int(re.search(r"(\d+) passed", out).group(1))
    assert passed >= 80, out[-4000:]  # the suite ran, not skipped wholesale
