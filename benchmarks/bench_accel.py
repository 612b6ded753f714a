"""Iterations and time to err <= 1e-3 and <= 1e-6: plain Sinkhorn against each acceleration
(issue "Fewer iterations"), and warm starts on a sequence of related problems.

    python benchmarks/bench_accel.py            # the standard problems of _common.py
    python benchmarks/bench_accel.py --quick    # small sizes, seconds

err is the solver's own (the L1 column violation; rows are exact), which the test suite
checks against an independent float64 computation.  Prints a table and appends it to
benchmarks/RESULTS.md with --record.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as problems  # noqa: E402  (the standard problems of _common.py)

import sinkhorn_ot  # noqa: E402

METHODS = {
    "plain": dict(acceleration=None, eps_scaling=False),
    "anderson": dict(acceleration="anderson", eps_scaling=False),
    "eps-scaling": dict(acceleration=None, eps_scaling=True),
    "default (anderson+eps)": dict(acceleration="anderson", eps_scaling=True),
}


DRIFT = 0.02  # per-epoch change of the logits (std 3): logP moves by about 0.02


def solve(logP, lam, tol, max_iter, kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t = time.perf_counter()
        r = sinkhorn_ot.balanced_assign(logP, lam, tol=tol, max_iter=max_iter, **kw)
        return r, time.perf_counter() - t


def table(rows, header):
    w = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    fmt = "  ".join("{:<%d}" % x for x in w)
    return "\n".join([fmt.format(*header), fmt.format(*["-" * x for x in w])] +
                     [fmt.format(*r) for r in rows])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--record", action="store_true",
                    help="write the table into its section of benchmarks/RESULTS.md")
    ap.add_argument("--max-iter", type=int, default=30_000)
    args = ap.parse_args()
    if args.quick:
        probs = [("random(2000, 50)", problems.random_problem(2000, 50), 25.0)]
        peaked_k = []
        max_iter = 3000
    else:
        probs = [("random(10_000, 100)", problems.random_problem(10_000, 100), 25.0),
                 ("random(200_000, 1_000)", problems.random_problem(200_000, 1_000), 25.0)]
        peaked_k = [10, 100]
        max_iter = args.max_iter
    for K in peaked_k:
        lp = problems.peaked_problem(K=K)
        for lam in (25.0, 50.0):
            probs.append((f"peaked digits K={K}", lp, lam))
    rows = []
    for name, logP, lam in probs:
        for tol in (1e-3, 1e-6):
            base = None
            for m, kw in METHODS.items():
                r, t = solve(logP, lam, tol, max_iter, kw)
                it = r.n_iter if r.converged else f">{r.n_iter} (err {r.err:.1e})"
                if m == "plain":
                    base = r.n_iter if r.converged else None
                ratio = f"{base / r.n_iter:.1f}x" if base and r.converged else "-"
                rows.append((name, f"{lam:g}", f"{tol:g}", m, str(it), f"{t:.3f}", ratio))
                print(rows[-1], flush=True)

    # Warm starts: logits drifting slowly, as a network's outputs between epochs.
    N, K = (2000, 50) if args.quick else (50_000, 100)
    rng = np.random.default_rng(1)
    logits = 3 * rng.standard_normal((N, K))
    warm_rows = []
    for m in ("plain", "default (anderson+eps)"):
        prev = None
        x = logits.copy()
        for epoch in range(5):
            x = x + DRIFT * rng.standard_normal((N, K))
            logP = problems.log_softmax(x)
            cold, tc = solve(logP, 25.0, 1e-6, max_iter, METHODS[m])
            if prev is not None:
                warm, tw = solve(logP, 25.0, 1e-6, max_iter, dict(METHODS[m], init=prev))
                warm_rows.append((m, str(epoch), str(cold.n_iter), str(warm.n_iter),
                                  f"{tc:.3f}", f"{tw:.3f}"))
                print(warm_rows[-1], flush=True)
            prev = cold
    cpu = platform.processor() or platform.machine()
    try:
        cpu = subprocess.run(["sh", "-c", "lscpu | grep 'Model name' | cut -d: -f2"],
                             capture_output=True, text=True).stdout.strip() or cpu
    except OSError:
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    text = (f"### Fewer iterations (bench_accel.py)\n\n"
            f"{time.strftime('%Y-%m-%d')}, {cpu}, {os.cpu_count()} cores, float64, "
            f"commit {commit}, `python benchmarks/bench_accel.py{' --quick' if args.quick else ''} --record`; "
            "iterations = fused passes of all stages; time is wall time on a shared machine.\n\n"
            "```\n" + table(rows, ("problem", "lam", "tol", "method", "iterations",
                                  "time s", "fewer than plain")) + "\n```\n\n"
            f"Warm start, logits drifting by {DRIFT} N(0,1) per epoch, random({N}, {K}), "
            "lam 25, tol 1e-6 (defaults otherwise):\n\n```\n" +
            table(warm_rows, ("method", "epoch", "cold iterations", "warm iterations", "cold s",
                              "warm s")) + "\n```\n")
    print(text)
    if args.record:
        problems.write_section(problems.RESULTS, "bench_accel", text.replace("### ", "## ", 1))


if __name__ == "__main__":
    main()
