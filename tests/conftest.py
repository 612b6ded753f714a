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
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "sinkhorn"))
except ImportError:  # pragma: no cover
    pass


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
