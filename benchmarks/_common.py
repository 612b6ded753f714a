"""Shared helpers of the benchmark scripts (bench_cpu.py, peers.py, scaling.py).

Problems are the benchmarks' standard problems (defined here); the error of every solution
is computed here, independently of the solver that produced it, in float64 and a block of
rows at a time (no N x K float64 temporary beyond one block).
"""
from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys
import time

# POT imports every backend it finds; PyTorch/TensorFlow/CuPy imports cost seconds and
# threads and are not used here (JAX is kept: OTT-JAX needs it).
for _key in ("POT_BACKEND_DISABLE_PYTORCH", "POT_BACKEND_DISABLE_TENSORFLOW",
             "POT_BACKEND_DISABLE_CUPY"):
    os.environ.setdefault(_key, "1")

import numpy as np  # noqa: E402

LAM = 25.0
BLOCK_ELEMS = 1 << 22          # float64 elements per block in the error checks (32 MB)


# --------------------------------------------------------------------------- problems
def log_softmax(x, axis=1):
    """Row log-softmax, in place on a float64 array (no extra N x K temporary)."""
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=axis, keepdims=True)
    x -= m
    s = np.empty(x.shape[0] if axis == 1 else x.shape[1])
    step = max(1, BLOCK_ELEMS // x.shape[1])
    for lo in range(0, x.shape[0], step):
        s[lo:lo + step] = np.log(np.exp(x[lo:lo + step]).sum(axis=1))
    x -= s[:, None]
    return x


def random_problem(N, K, seed=0):
    """The standard random(N, K): log_softmax(3 * standard normal), float64, C-contiguous."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((N, K))
    logits *= 3.0
    return log_softmax(logits)


def peaked_problem(max_iter=2000, K=10):
    """The standard peaked problem: log-probabilities of an MLP trained on sklearn's
    load_digits until confident, deterministic (random_state=0), nothing cached on disk.  K = 10 uses the digit
    classes; another K trains on an over-clustering (k-means labels with K clusters), as deep
    clustering heads do."""
    import warnings

    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    if K != 10:
        from sklearn.cluster import KMeans

        y = KMeans(K, n_init=1, random_state=0).fit_predict(X)
    clf = MLPClassifier(hidden_layer_sizes=(64,), alpha=0.0, tol=0.0,
                        n_iter_no_change=max_iter, max_iter=max_iter, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(X, y)
    # log_softmax of the logits computed here in float64 (predict_log_proba clips at 1e-300)
    h = np.maximum(X @ clf.coefs_[0] + clf.intercepts_[0], 0.0)
    logits = h @ clf.coefs_[1] + clf.intercepts_[1]
    return np.ascontiguousarray(log_softmax(logits))


def describe_peaked(logP):
    conf = np.exp(logP.max(axis=1))
    return (f"median max-probability {np.median(conf):.6f}, min logP {logP.min():.1f}, "
            f"train accuracy of argmax {np.mean(logP.argmax(1) == _digits_y()):.4f}")


def _digits_y():
    from sklearn.datasets import load_digits
    return load_digits().target


# --------------------------------------------------------------------------- errors
def err_from_potentials(X, alpha, f, g, a=None, b=None):
    """L1 marginal violation of Q = exp(alpha * X + f_i + g_y), in float64, by row blocks.

    For this library ``alpha = lam`` and X = logP (or alpha = -1/reg and X = C)."""
    N, K = X.shape
    a = np.full(N, 1.0 / N) if a is None else np.asarray(a, np.float64)
    b = np.full(K, 1.0 / K) if b is None else np.asarray(b, np.float64)
    f = np.asarray(f, dtype=np.float64)
    g = np.asarray(g, dtype=np.float64)
    rows = np.empty(N)
    cols = np.zeros(K)
    step = max(1, BLOCK_ELEMS // K)
    for lo in range(0, N, step):
        blk = X[lo:lo + step].astype(np.float64)
        blk *= alpha
        blk += f[lo:lo + step, None]
        blk += g[None, :]
        np.exp(blk, out=blk)
        rows[lo:lo + step] = blk.sum(axis=1)
        cols += blk.sum(axis=0)
    return float(np.abs(rows - a).sum() + np.abs(cols - b).sum())


def err_from_plan(Q, a=None, b=None):
    """L1 marginal violation of a materialised plan (row and column sums in float64, by
    row blocks). NaN entries give err = nan, reported as such."""
    N, K = Q.shape
    a = np.full(N, 1.0 / N) if a is None else np.asarray(a, np.float64)
    b = np.full(K, 1.0 / K) if b is None else np.asarray(b, np.float64)
    rows = np.empty(N)
    cols = np.zeros(K)
    step = max(1, BLOCK_ELEMS // K)
    for lo in range(0, N, step):
        blk = np.asarray(Q[lo:lo + step], dtype=np.float64)
        rows[lo:lo + step] = blk.sum(axis=1)
        cols += blk.sum(axis=0)
    return float(np.abs(rows - a).sum() + np.abs(cols - b).sum())


# --------------------------------------------------------------------------- memory
def _status(key):
    with open("/proc/self/status") as fh:
        m = re.search(rf"^{key}:\s+(\d+) kB", fh.read(), re.M)
    return int(m.group(1)) * 1024 if m else None


class PeakMemory:
    """Peak resident memory of the process during a block, beyond what it held before.

    Resets the kernel's high-water mark (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0)
    and reads ``VmHWM`` afterwards, so allocations made by C++/OpenMP code, BLAS and JAX
    count (tracemalloc sees only Python's allocator).  ``extra`` is None where /proc is not
    available."""

    def __enter__(self):
        self.extra = None
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self._base = _status("VmRSS")
        except OSError:
            self._base = None
        return self

    def __exit__(self, *exc):
        if self._base is not None:
            hwm = _status("VmHWM")
            self.extra = max(0, hwm - self._base) if hwm is not None else None
        return False


def fmt_bytes(n):
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0


# --------------------------------------------------------------------------- timing
def timed(fn, *args, **kw):
    """(seconds, result, peak extra bytes) of one call."""
    with PeakMemory() as pm:
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        dt = time.perf_counter() - t0
    return dt, out, pm.extra


def streaming_read(X, n_threads=2, repeats=3):
    """Best time of a plain streaming read of X: a sum over all entries split into
    ``n_threads`` row blocks summed in parallel threads (NumPy releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    flat_blocks = np.array_split(np.arange(X.shape[0]), n_threads)
    spans = [(int(b[0]), int(b[-1]) + 1) for b in flat_blocks if len(b)]
    best = float("inf")
    with ThreadPoolExecutor(n_threads) as ex:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(ex.map(lambda s: np.add.reduce(X[s[0]:s[1]].ravel()), spans))
            best = min(best, time.perf_counter() - t0)
    return best


# --------------------------------------------------------------------------- reporting
def machine_info():
    model = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"Model name:\s+(.+)", out)
        model = m.group(1).strip() if m else model
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = float("nan")
    try:
        load = os.getloadavg()
        load_s = f"{load[0]:.1f}"
    except OSError:
        load_s = "n/a"
    return (f"{model}, {os.cpu_count()} logical cores, {mem:.0f} GiB RAM, "
            f"load average at start {load_s}")


def versions(extra=()):
    import numpy
    out = [f"python {platform.python_version()}", f"numpy {numpy.__version__}"]
    names = ("sinkhorn_ot", "ot", "scipy") + tuple(extra)
    for name in names:
        try:
            mod = __import__(name)
            out.append(f"{'POT' if name == 'ot' else name} {getattr(mod, '__version__', '?')}")
        except Exception:  # noqa: BLE001 - any import failure: say it is missing
            out.append(f"{name} (not installed)")
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src", "csrc"],
                               capture_output=True, text=True, timeout=10,
                               cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        if rev:
            out.append(f"sinkhorn-ot commit {rev}{' + uncommitted changes' if dirty else ''}")
    except (OSError, subprocess.SubprocessError):
        pass
    return ", ".join(out)


def header(command):
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return [f"- Date: {now}", f"- Machine: {machine_info()}",
            f"- Versions: {versions(('jax', 'ott'))}", f"- Command: `{command}`"]


def command_line():
    return "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])


def write_section(path, name, body):
    """Replace (or append) the section between this script's markers in RESULTS.md, keeping
    every other engineer's content."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    text = ""
    if os.path.exists(path):
        with open(path) as fh:
            text = fh.read()
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        _, post = rest.split(end, 1)
        text = pre + block.rstrip("\n") + post
    else:
        if not text:
            text = "# Benchmark results\n\nEach section is written by the script it names; " \
                   "numbers are from one run on the machine stated.\n"
        text = text.rstrip("\n") + "\n\n" + block
    with open(path, "w") as fh:
        fh.write(text)


def table(rows, headers):
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def fmt_t(t):
    if t is None:
        return "—"
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def fmt_e(e):
    return "—" if e is None else f"{e:.2e}"


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
