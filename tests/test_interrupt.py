"""Ctrl-C stops a long solve promptly with KeyboardInterrupt (run in a subprocess so the
signal cannot reach pytest itself)."""
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os, signal, threading, time
    import numpy as np
    import sinkhorn_ot
    X = np.random.default_rng(0).standard_normal((4000, 500))
    threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    t0 = time.perf_counter()
    try:
        # unreachable tolerance: only the interrupt ends this solve
        sinkhorn_ot.balanced_assign(X, 25.0, tol=1e-300, max_iter=10**7,
                                    acceleration=None, eps_scaling=False)
    except KeyboardInterrupt:
        print("interrupted after %.2f s" % (time.perf_counter() - t0))
""")


def test_ctrl_c_stops_a_solve_within_a_second():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "interrupted after" in out.stdout
    elapsed = float(out.stdout.split("after")[1].split()[0])
    assert elapsed < 0.5 + 1.0, out.stdout


EMD_SCRIPT = textwrap.dedent("""
    import os, signal, threading, time
    import numpy as np
    import sinkhorn_ot
    rng = np.random.default_rng(0)
    C = rng.random((3000, 2000))
    a, b = np.full(3000, 2.0), np.full(2000, 3.0)
    threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    t0 = time.perf_counter()
    try:
        sinkhorn_ot.emd(C, a, b, max_entries=C.size)   # seconds: only Ctrl-C ends it in time
        print("finished after %.2f s" % (time.perf_counter() - t0))
    except KeyboardInterrupt:
        print("interrupted after %.2f s" % (time.perf_counter() - t0))
""")


def test_ctrl_c_stops_emd_within_a_second():
    out = subprocess.run([sys.executable, "-c", EMD_SCRIPT], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "interrupted after" in out.stdout, out.stdout
    elapsed = float(out.stdout.split("after")[1].split()[0])
    assert elapsed < 0.5 + 1.0, out.stdout


CODES_SCRIPT = textwrap.dedent("""
    import os, signal, threading, time
    import numpy as np
    import sinkhorn_ot
    X = np.random.default_rng(0).standard_normal((4000, 500)).astype(np.float32)
    threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    t0 = time.perf_counter()
    try:
        sinkhorn_ot.codes(X, eps=0.05, n_iter=10**6)   # the scaling passes
    except KeyboardInterrupt:
        print("interrupted after %.2f s" % (time.perf_counter() - t0))
""")


def test_ctrl_c_stops_the_scaling_passes_of_codes_within_a_second():
    out = subprocess.run([sys.executable, "-c", CODES_SCRIPT], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "interrupted after" in out.stdout
    elapsed = float(out.stdout.split("after")[1].split()[0])
    assert elapsed < 0.5 + 1.0, out.stdout
