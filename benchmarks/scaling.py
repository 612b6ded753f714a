"""Scaling plot (issue 7 item 3): time per iteration, time to err <= 1e-3 and peak memory
against N*K, for this library and the CPU peers, on the standard
random(N, K) of _common.py, lam = 25.

- Time per iteration: (time of n2 fixed iterations - time of n1) / (n2 - n1), best of 2
  (set-up, compilation and the first exp cancel out).
- Time to err <= 1e-3: as in peers.py (own stop for this library, threshold ladders for the
  peers, err computed independently in float64; a peer over ``--budget`` is left out).
- Peak memory: resident high-water mark during the time-to-tolerance run beyond what the
  process held before (the input excluded).

Writes benchmarks/scaling.png (matplotlib, Agg) and a section of RESULTS.md with the numbers
and a note on memory growth.

Usage::

    python benchmarks/scaling.py           # sizes up to 50_000 x 400 (a few minutes)
    python benchmarks/scaling.py --quick   # tiny sizes, seconds
"""
from __future__ import annotations

import argparse
import gc
import os
import sys

import _common as C
import numpy as np
import peers as PR

TOL = 1e-3


def per_iteration(peer, logP, n1, n2):
    X = logP
    best = float("inf")
    for _ in range(2):
        t1 = C.timed(peer.fixed, X, n1)[0]
        t2 = C.timed(peer.fixed, X, n2)[0]
        best = min(best, max(t2 - t1, 1e-9) / (n2 - n1))
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sizes", default=None, help="comma-separated NxK")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds a peer may spend at one size (default 30; quick 3)")
    p.add_argument("--max-iter", type=int, default=5000)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                 "scaling.png"))
    PR.add_peer_args(p)
    args = p.parse_args(argv)
    if args.sizes is None:
        args.sizes = "300x10,1000x20" if args.quick else \
            "1000x10,2000x50,10000x100,20000x200,50000x400"
    if args.budget is None:
        args.budget = 3.0 if args.quick else 30.0
    nt = args.n_threads or None
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")]
    peers, skipped = PR.make_peers(args)
    peers = [q for q in peers if not isinstance(q, PR.SwAV)]   # fixed 3 iterations: no curve
    for s in skipped:
        print(s)
    solvers = [PR.Ours(np.float64, nt), PR.Ours(np.float32, nt)] + peers
    data = {q.name: {"nk": [], "iter": [], "tol": [], "mem": []} for q in solvers}
    for N, K in sizes:
        logP = C.random_problem(N, K)
        print(f"\n=== random({N}, {K}): N*K = {N * K:.2e} ===", flush=True)
        n_ref = {}
        for q in solvers:
            q.max_iter = args.max_iter
            try:
                big = N * K >= 1_000_000
                rate = q.rate(logP) if big and not isinstance(q, PR.Ours) else None
                if rate is not None and rate * 30 > args.budget:
                    print(f"  {q.name}: skipped at this size (~{rate:.2f} s/it)")
                    continue
                t_it = per_iteration(q, logP, 5, 25 if rate is None or rate < 0.05 else 10)
                r, mem, _ = PR.run_peer(q, logP, n_ref or {TOL: args.max_iter}, args,
                                        tols=(TOL,))
            except Exception as e:  # noqa: BLE001 - one failing peer must not stop the plot
                print(f"  {q.name}: failed ({e.__class__.__name__}: {e})")
                continue
            v = r[TOL]
            t_tol = v[0] if v is not None and v[0] != "est" else None
            if isinstance(q, PR.Ours) and q.dtype == np.float64 and v and v[0] != "est":
                n_ref[TOL] = v[2]
            d = data[q.name]
            d["nk"].append(N * K)
            d["iter"].append(t_it)
            d["tol"].append(t_tol)
            d["mem"].append(mem)
            print(f"  {q.name}: {t_it * 1e3:.3f} ms/it, to {TOL:g}: {C.fmt_t(t_tol)}, peak +"
                  f"{C.fmt_bytes(mem)}", flush=True)
        del logP
        gc.collect()

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    for name, d in data.items():
        if not d["nk"]:
            continue
        nk = np.asarray(d["nk"], float)
        t_it = np.asarray(d["iter"], float)
        t_it[t_it <= 1e-8] = np.nan          # below the timer's noise: not plotted
        axes[0].loglog(nk, t_it, "o-", label=name)
        m = [i for i, t in enumerate(d["tol"]) if t is not None]
        if m:
            axes[1].loglog(nk[m], [d["tol"][i] for i in m], "o-", label=name)
        mm = [i for i, b in enumerate(d["mem"]) if b]
        if mm:
            axes[2].loglog(nk[mm], [d["mem"][i] / (8 * nk[i]) for i in mm], "o-", label=name)
    axes[0].set(title="time per iteration", xlabel="N*K", ylabel="seconds")
    axes[1].set(title=f"time to err <= {TOL:g} (independent float64 check)", xlabel="N*K",
                ylabel="seconds")
    axes[2].set(title="peak memory beyond the input / float64 input size", xlabel="N*K",
                ylabel="ratio")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"random(N, K), lam = 25, CPU: {C.machine_info()}", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")

    if not args.no_write:
        rows = []
        for name, d in data.items():
            for nk, ti, tt, mem in zip(d["nk"], d["iter"], d["tol"], d["mem"]):
                rows.append((name, f"{nk:.1e}", f"{ti * 1e3:.3f} ms", C.fmt_t(tt),
                             C.fmt_bytes(mem), f"{(mem or 0) / (8 * nk):.2f}"))
        tab = C.table(rows, ["solver", "N*K", "time / iteration", f"time to {TOL:g}",
                             "peak memory beyond input", "/ float64 input"])
        note = ("Memory growth: this library keeps O(N + K * threads) beyond the input "
                "(potentials, labels, per-thread column sums: no N x K temporary), so its "
                "ratio to the input size falls towards 0 as N*K grows. POT's plain method "
                "holds the kernel exp(-C/reg) and a plan (2 or more copies of the matrix), "
                "sinkhorn_log several log-domain temporaries, SeLa a copy of P^lam, OTT-JAX a "
                "float32 copy on its device plus temporaries; their ratios stay near a "
                "constant >= 1 (see the last column).")
        body = ["## Scaling with N*K (benchmarks/scaling.py)", "", *C.header(C.command_line()),
                *[f"- {s}" for s in skipped], "",
                "![scaling](scaling.png)", "", tab, "", note]
        C.write_section(args.results, "scaling", "\n".join(body))
        print(f"wrote section 'scaling' of {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
