"""Smoke test of an installed sinkhorn-ot (a wheel in a fresh environment), run from outside
the source tree by .ci/run and by cibuildwheel: the compiled core imports, solves a small
problem to the NumPy reference's marginals, the CUDA kernel sources are in the package and
the console script answers.  Needs only the package's own dependencies (NumPy, SciPy).

    python tests/smoke_installed.py
"""
import os
import subprocess
import sys

import numpy as np


def main() -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    # The installed package, not a checkout's src/ next to this file.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    import sinkhorn_ot
    from sinkhorn_ot import _core, _cuda

    where = os.path.dirname(sinkhorn_ot.__file__)
    assert os.path.join("src", "sinkhorn_ot") not in where, f"imported from a checkout: {where}"

    rng = np.random.default_rng(0)
    logits = 3 * rng.standard_normal((500, 20))
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    res = sinkhorn_ot.balanced_assign(logp, lam=25.0, tol=1e-8)
    Q = res.plan()
    np.testing.assert_allclose(Q.sum(1), np.full(500, 1 / 500), rtol=1e-9, atol=0)
    np.testing.assert_allclose(Q.sum(0), np.full(20, 1 / 20), rtol=0, atol=1e-8)
    assert res.converged and int(res.sizes.sum()) == 500
    # Q from the potentials alone (the NumPy formula) matches the returned plan
    ref = np.exp(25.0 * logp + np.asarray(res.f)[:, None] + np.asarray(res.g)[None, :])
    np.testing.assert_allclose(Q, ref, rtol=1e-12, atol=0)

    src = _cuda.kernel_source()
    assert "sinkhorn_math.h" in src and "__global__" in src, "CUDA sources missing"

    out = subprocess.run([sys.executable, "-m", "sinkhorn_ot", "--version"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"sinkhorn-ot {sinkhorn_ot.__version__}", out
    print(f"sinkhorn-ot {sinkhorn_ot.__version__} smoke test passed: {where} "
          f"(OpenMP: {bool(_core.openmp)}, {_core.max_threads()} threads; "
          f"{res.n_iter} passes, err {res.err:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
