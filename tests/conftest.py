import os
import sys

import numpy as np
import pytest

# tests/ has no __init__.py: make the float64 reference importable from every test module.
sys.path.insert(0, os.path.dirname(__file__))

try:  # keep hypothesis small and deterministic on the shared 2-core machines
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "sinkhorn", max_examples=40, deadline=None, derandomize=True,
        suppress_health_check=[HealthCheck.too_slow])
    # HYPOTHESIS_PROFILE=long: the fuzzing suite (tests/test_fuzz.py) at length, by hand
    settings.register_profile(
        "long", max_examples=1000, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "sinkhorn"))
except ImportError:  # pragma: no cover
    pass


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


# SINKHORN_OT_CUDA_EMU=1: run the GPU tests without a GPU, on the kernel emulation of
# tests/cuda_emu (CuPy replaced by a NumPy-backed stand-in; see its docstring for the limits).
CUDA_EMU = os.environ.get("SINKHORN_OT_CUDA_EMU", "0") == "1"
if CUDA_EMU:
    import cuda_emu

    sys.modules["cupy"] = cuda_emu.fake_cupy()
