"""Exact LP: sinkhorn_ot.emd against POT's network simplex (ot.emd) on the same problems,
timed in one run (median of interleaved rounds after a warm-up), with the two costs'
relative difference and the plan's marginal violation (L1) as the check.

    python benchmarks/bench_emd.py              # 500 x 500, every problem family
    python benchmarks/bench_emd.py --quick      # small sizes, seconds (a smoke run)

Writes its section of benchmarks/RESULTS.md (``--results`` for another file).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import sinkhorn_ot  # noqa: E402


def problems(n, m, seed=0):
    """(name, cost, a, b): the families of the exactness tests (tests/test_lp_exact.py)."""
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal((n, 2)), rng.standard_normal((m, 2))
    euclid = np.sqrt(((x[:, None] - y[None]) ** 2).sum(-1))
    s, t = np.linspace(0, 1, n), np.linspace(0, 1, m)
    sq1d = (s[:, None] - t[None, :]) ** 2
    ra, rb = rng.random(n) + 0.05, rng.random(m) + 0.05
    g_a = np.exp(-(s - 0.3) ** 2 / (2 * 0.1 ** 2))
    g_b = np.exp(-(t - 0.6) ** 2 / (2 * 0.15 ** 2))
    ia, ib = rng.integers(1, 5, n).astype(float), rng.integers(1, 5, m).astype(float)
    d = ia.sum() - ib.sum()
    (ib if d > 0 else ia)[0] += abs(d)
    out = [("2-D euclidean, random marginals", euclid, ra / ra.sum(), rb / rb.sum()),
           ("1-D squared, Gaussian histograms", sq1d, g_a / g_a.sum(), g_b / g_b.sum()),
           ("integer costs 0..4, integer marginals", rng.integers(0, 5, (n, m)).astype(float),
            ia, ib)]
    if n == m:
        out.append(("2-D euclidean, uniform (assignment)", euclid, np.full(n, 1 / n),
                    np.full(m, 1 / m)))
    return out


def measure(Cm, a, b, rounds):
    import ot

    sinkhorn_ot.emd(Cm, a, b)           # warm-up: imports, thread pools
    ot.emd(a, b, Cm)
    t_ours, t_pot = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        res = sinkhorn_ot.emd(Cm, a, b)
        t_ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        P = ot.emd(a, b, Cm, numItermax=10**7)
        t_pot.append(time.perf_counter() - t0)
    Q = res.plan()
    viol = float(np.abs(Q.sum(axis=1) - a).sum() + np.abs(Q.sum(axis=0) - b).sum())
    ref = float(np.sum(P * Cm))
    rel = abs(res.cost - ref) / max(abs(ref), 1e-300)
    return float(np.median(t_ours)), float(np.median(t_pot)), rel, viol


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="50 x 50, 2 rounds (a smoke run)")
    p.add_argument("--size", default="500x500", help="n x m (default 500x500)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 7)")
    p.add_argument("--n-threads", type=int, default=None,
                   help="OMP_NUM_THREADS for the entropic start (default: unchanged)")
    p.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    p.add_argument("--results", default=C.RESULTS)
    args = p.parse_args(argv)
    if args.n_threads:  # read by OpenMP at its first parallel region, still to come
        os.environ["OMP_NUM_THREADS"] = str(args.n_threads)
    n, m = (50, 50) if args.quick else tuple(int(v) for v in args.size.lower().split("x"))
    rounds = args.rounds or (2 if args.quick else 7)
    load = os.getloadavg()[0]
    rows = []
    for name, Cm, a, b in problems(n, m):
        t_ours, t_pot, rel, viol = measure(Cm, a, b, rounds)
        rows.append((name, f"{n} x {m}", C.fmt_t(t_ours), C.fmt_t(t_pot),
                     f"{t_ours / t_pot:.1f}", f"{rel:.1e}", f"{viol:.1e}"))
        print(" | ".join(rows[-1]), flush=True)
    headers = ["problem", "n x m", "emd", "ot.emd", "ratio emd / ot.emd", "cost rel. diff",
               "marginal L1"]
    body = ["## Exact LP: `emd` against POT's `ot.emd` (bench_emd.py)", "",
            *C.header(C.command_line()),
            f"- median of {rounds} interleaved rounds after a warm-up; load average "
            f"{load:.1f} before the first round; ot.emd is POT's C++ network simplex (one "
            "thread); emd: a coarse entropic plan (the compiled Sinkhorn core, one thread) "
            "picks each row's and column's likeliest pairs, HiGHS solves the LP on them, and "
            "a NumPy transport simplex finishes exactly (assignment: from "
            "linear_sum_assignment).", "",
            C.table(rows, headers)]
    print(body[-1])
    if not args.no_write:
        C.write_section(args.results, "bench_emd", "\n".join(body))
        print(f"wrote section 'bench_emd' of {args.results}")


if __name__ == "__main__":
    main()
