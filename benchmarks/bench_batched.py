"""Many problems in one call (issue 19): batched solves and several targets, on the CPU.

In one process, interleaved (each round runs every method once, in turn), median of the
rounds:

- **Batch**: B = 1000 problems of 64 x 64 float32 costs, each to err <= 1e-6 (L1 violation of
  both marginals), as one call ``sinkhorn(C, reg=..., tol=1e-6)`` with C of shape (B, 64, 64),
  against a Python loop of single calls of this library, and against a loop of POT
  ``ot.sinkhorn`` (float64), each problem run for exactly the number of iterations at which
  its plan first reaches err <= tol (found by untimed runs, see ``pot_iterations``): fairer
  to POT than its own stop rule, an L2 norm checked every 10 iterations.  Two cost families: uniform random
  costs (reg 0.05) and squared distances between random point clouds in the unit square (reg 0.01, peakier plans).
- **Targets**: k = 16 column marginals against one random(20_000, 1_000) float32 cost
  (``b`` of shape (m, 16): one call), against one target (``b`` of shape (m,)), to err <= 1e-6.

Every err is recomputed here in float64 from the returned potentials or plan; the table
shows the largest over the problems or targets.

Usage::

    python benchmarks/bench_batched.py            # full run, writes a section of RESULTS.md
    python benchmarks/bench_batched.py --quick    # small sizes, seconds
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings

import _common as C
import numpy as np


def costs(kind, B, n, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        return rng.random((B, n, n)).astype(np.float32)
    x, y = rng.random((B, n, 2)), rng.random((B, n, 2))
    return ((x[:, :, None] - y[:, None]) ** 2).sum(-1).astype(np.float32)


def pot_iterations(M, reg, tol):
    """The fewest iterations of POT's ``ot.sinkhorn`` whose plan has L1 err <= tol: an
    untimed run with stopThr = tol / (2 sqrt(m)) (L2 <= tol / sqrt(m) implies L1 <= tol)
    bounds it, a bisection over numItermax (stopThr = 0: exactly that many) finds it."""
    import ot

    n, m = M.shape
    w, v = np.full(n, 1.0 / n), np.full(m, 1.0 / m)

    def err(k, thr=0.0):
        P, log = ot.sinkhorn(w, v, M, reg, stopThr=thr, numItermax=k, log=True, warn=False)
        return C.err_from_plan(P), int(log["niter"])

    e, hi = err(100_000, tol / (2 * math.sqrt(m)))
    hi = max(hi, 1)
    if not e <= tol:
        return hi
    lo = 0  # err(lo) > tol (0 iterations: not run)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if err(mid)[0] <= tol:
            hi = mid
        else:
            lo = mid
    return hi


def batch_err(Cb, reg, f, g):
    return max(C.err_from_potentials(Cb[p], -1.0 / reg, f[p], g[p]) for p in range(len(Cb)))


def run_batch(kind, reg, args, out):
    import ot
    import sinkhorn_ot as so

    B, n, tol = args.batch, args.n, args.tol
    Cb = costs(kind, B, n)
    C64 = Cb.astype(np.float64)
    w = np.full(n, 1.0 / n)
    nt = args.n_threads or None

    def batched():
        return so.sinkhorn(Cb, reg=reg, tol=tol, n_threads=nt)

    def loop():
        return [so.sinkhorn(Cb[p], reg=reg, tol=tol, n_threads=nt) for p in range(B)]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pot_iters = [pot_iterations(C64[p], reg, tol) for p in range(B)]

    def pot():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [ot.sinkhorn(w, w, C64[p], reg, stopThr=0.0, numItermax=pot_iters[p],
                                warn=False) for p in range(B)]

    times = {"batched": [], "loop": [], "pot": []}
    res = {}
    for _ in range(args.repeats):
        for name, fn in (("batched", batched), ("loop", loop), ("pot", pot)):
            t0 = time.perf_counter()
            res[name] = fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    rb = res["batched"]
    errs = {"batched": batch_err(Cb, reg, rb.f, rb.g),
            "loop": max(C.err_from_potentials(Cb[p], -1.0 / reg, r.f, r.g)
                        for p, r in enumerate(res["loop"])),
            "pot": max(C.err_from_plan(P) for P in res["pot"])}
    iters = {"batched": f"{int(np.median(rb.n_iter))} (max {int(rb.n_iter.max())})",
             "loop": f"{int(np.median([r.n_iter for r in res['loop']]))}",
             "pot": f"{int(np.median(pot_iters))} (max {max(pot_iters)})"}
    label = f"{B} x {n}x{n} {kind}, reg {reg}"
    for name, what in (("batched", "sinkhorn(C (B, n, m)), one call"),
                       ("loop", "loop of single sinkhorn calls"),
                       ("pot", "loop of POT ot.sinkhorn (float64)")):
        ratio = "1" if name == "batched" else f"{med[name] / med['batched']:.1f}x"
        out.append([label, what, C.fmt_t(med[name]), ratio, iters[name], C.fmt_e(errs[name])])
        print(" | ".join(str(c) for c in out[-1]), flush=True)


def run_targets(args, out):
    import sinkhorn_ot as so

    N, K, k, tol, reg = args.targets_n, args.targets_m, args.k, args.tol, args.targets_reg
    rng = np.random.default_rng(1)
    M = rng.random((N, K)).astype(np.float32)
    bk = rng.random((K, k)) + 0.5
    bk /= bk.sum(axis=0)
    nt = args.n_threads or None

    def one():
        return so.sinkhorn(M, b=bk[:, 0], reg=reg, tol=tol, n_threads=nt)

    def many():
        return so.sinkhorn(M, b=bk, reg=reg, tol=tol, n_threads=nt)

    def loop():
        return [so.sinkhorn(M, b=bk[:, t], reg=reg, tol=tol, n_threads=nt) for t in range(k)]

    times = {"one": [], "many": [], "loop": []}
    res = {}
    for _ in range(args.repeats):
        for name, fn in (("one", one), ("many", many), ("loop", loop)):
            t0 = time.perf_counter()
            res[name] = fn()
            times[name].append(time.perf_counter() - t0)
    med = {key: statistics.median(v) for key, v in times.items()}
    r1, rk = res["one"], res["many"]
    e1 = C.err_from_potentials(M, -1.0 / reg, r1.f, r1.g, b=bk[:, 0])
    ek = max(C.err_from_potentials(M, -1.0 / reg, rk.f[t], rk.g[t], b=bk[:, t])
             for t in range(k))
    el = max(C.err_from_potentials(M, -1.0 / reg, r.f, r.g, b=bk[:, t])
             for t, r in enumerate(res["loop"]))
    label = f"random({N}, {K}) float32, reg {reg}"
    rows = [("one target, b (m,)", med["one"], "1", r1.n_iter, e1),
            (f"{k} targets, b (m, {k}), one call", med["many"],
             f"{med['many'] / med['one']:.2f}x", f"{int(rk.n_iter.max())} (max)", ek),
            (f"{k} single calls", med["loop"], f"{med['loop'] / med['one']:.2f}x",
             max(r.n_iter for r in res["loop"]), el)]
    for what, t, ratio, it, e in rows:
        out.append([label, what, C.fmt_t(t), ratio, it, C.fmt_e(e)])
        print(" | ".join(str(c) for c in out[-1]), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--n-threads", type=int, default=0, help="0: OpenMP's default")
    p.add_argument("--tol", type=float, default=1e-6)
    p.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    p.add_argument("--results", default=C.RESULTS)
    args = p.parse_args(argv)
    args.batch, args.n = (50, 16) if args.quick else (1000, 64)
    args.targets_n, args.targets_m, args.k = (2000, 100, 4) if args.quick else (20_000, 1_000, 16)
    args.targets_reg = 0.05
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    headers = ["problem", "method", "time", "ratio to the first row", "passes", "max err"]
    print(" | ".join(headers), flush=True)
    batch_rows, target_rows = [], []
    run_batch("uniform", 0.05, args, batch_rows)
    run_batch("clouds", 0.05 if args.quick else 0.01, args, batch_rows)
    run_targets(args, target_rows)
    if not args.no_write:
        body = ["## CPU: many problems in one call (benchmarks/bench_batched.py)", "",
                *C.header(C.command_line()), "",
                f"Interleaved in one process, median of {args.repeats} rounds; err recomputed "
                "independently in float64 (L1, both marginals), largest over the problems or "
                "targets; POT gets float64 costs and runs, per problem, exactly the iterations "
                "at which its plan first reaches tol (found by untimed runs). Passes: median "
                "(max) over the problems. Provisional: the machine is shared.", "", "### Batches", "",
                C.table(batch_rows, headers), "", "### Several targets against one cost", "",
                C.table(target_rows, headers)]
        C.write_section(args.results, "bench_batched", "\n".join(body))
        print(f"wrote section 'bench_batched' of {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
