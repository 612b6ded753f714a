"""Peers, head to head (issue 7 item 2): time to err <= 1e-3 and <= 1e-6, and peak memory.

In one process, on the standard problems (_common.py) random(10_000, 100), random(50_000, 1_000)
and peaked (an MLP trained on sklearn's load_digits until confident, K = 10), lam = 25:

- this library, ``balanced_assign`` float64 (and float32), stopping on its own err <= tol;
- POT ``ot.sinkhorn`` with ``method`` = sinkhorn, sinkhorn_log, sinkhorn_stabilized (float64);
- OTT-JAX ``Sinkhorn`` (plain, momentum, Anderson(5)), JAX's default float32, compiled ahead
  of time (compilation excluded), if importable;
- SeLa's ``cpu_sk`` reimplemented from its description: float64 matrix-vector products on
  P^lam (K x N, a copy), ``r = (1/K) / (P^lam c)``, ``c = (1/N) / (r^T P^lam)``, stopping when
  the sum of relative changes of ``c`` is <= 0.1 (its rule), checked every 10 iterations;
- a SwAV-style loop (exp, normalise the whole matrix, 3 alternating normalisations, float64).

Method for "time to err <= tol" (err = L1 violation of both marginals of the plan each returns,
computed here independently in float64, a block of rows at a time):
peers without an err-based stop (or whose stop measures something else: POT's L2 norm, SeLa's
relative change) are run with their own threshold on a ladder, tightened by 10x each step
(POT: stopThr = tol, tol/10, tol/100; OTT: threshold = tol, tol/10; SeLa: 0.1 (its own rule),
then 1e-2 ... 1e-5), each run from scratch; the time of the first run whose plan reaches
err <= tol is reported.  A peer whose ladder for one tolerance would exceed ``--budget``
seconds (estimated from its time per iteration, measured on a row block, times the
iterations plain Sinkhorn needed (this library with acceleration=None, eps_scaling=False)) is
not run for that tolerance: its estimate is printed, marked "~" (extrapolated); no single run
may take more iterations than the budget left allows (its max_iter is capped).  Fixed-iteration methods (SwAV) report the err they reach.
Peak memory is the resident high-water mark during the call beyond what the process held
before (/proc/self/clear_refs + VmHWM), the largest over the runs made.  The time of this
library is the median of its runs, interleaved between the peers.

Usage::

    python benchmarks/peers.py                 # all problems, writes a section of RESULTS.md
    python benchmarks/peers.py --quick         # small problems, a smoke run
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import warnings

import _common as C
import numpy as np

TOLS = (1e-3, 1e-6)


# --------------------------------------------------------------------------- peers
class Peer:
    """One solver: ``run(logP, param)`` returns (err, n_iter); ``ladder(tol)`` the params
    tried in order; ``rate(logP)`` an estimate of seconds per iteration at full size."""
    name = "?"
    note = ""
    max_iter = 100_000

    def ladder(self, tol):
        return [tol, tol / 10, tol / 100]

    def rate(self, logP, rows=2000):
        sub = np.ascontiguousarray(logP[:min(rows, logP.shape[0])])
        t1 = C.timed(self.fixed, sub, 2)[0]
        t2 = C.timed(self.fixed, sub, 6)[0]
        return max(t2 - t1, 1e-9) / 4 * logP.shape[0] / sub.shape[0]


class Ours(Peer):
    def __init__(self, dtype, n_threads, plain=False):
        import inspect

        import sinkhorn_ot
        self.dtype, self.n_threads = dtype, n_threads
        self.name = f"sinkhorn_ot {np.dtype(dtype).name}"
        self.note = "own stop on err <= tol"
        self.kw = {}
        if plain:
            self.kw = dict(acceleration=None, eps_scaling=False)
            self.name += " plain (acceleration=None, eps_scaling=False)"
            self.supported = all(k in inspect.signature(sinkhorn_ot.balanced_assign).parameters
                                 for k in self.kw)

    def prepare(self, logP):
        return logP.astype(self.dtype)

    def ladder(self, tol):
        return [tol]

    def run(self, X, tol):
        import sinkhorn_ot
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            r = sinkhorn_ot.balanced_assign(X, C.LAM, tol=tol, max_iter=self.max_iter,
                                            n_threads=self.n_threads, **self.kw)
        return r

    def check(self, X, r):
        return C.err_from_potentials(X, C.LAM, r.f, r.g), r.n_iter

    def fixed(self, X, n):
        import sinkhorn_ot
        return sinkhorn_ot.balanced_assign(X.astype(self.dtype), C.LAM, n_iter=n,
                                           n_threads=self.n_threads)


class POT(Peer):
    def __init__(self, method):
        self.method = method
        self.name = f"POT {method}"
        self.note = "stopThr ladder tol, tol/10, tol/100 (L2 of column error)"

    def prepare(self, logP):
        return np.negative(logP)           # C = -logP, made once outside the timings

    def run(self, M, thr, n=None):
        import ot
        N, K = M.shape
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            P, log = ot.sinkhorn(np.full(N, 1.0 / N), np.full(K, 1.0 / K), M, 1.0 / C.LAM,
                                 method=self.method, numItermax=n or self.max_iter,
                                 stopThr=thr, warn=False, log=True)
        return P, log

    def check(self, M, out):
        P, log = out
        it = log.get("niter", log.get("n_iter", len(log.get("err", [])) * 10))
        return C.err_from_plan(P), int(it)

    def fixed(self, logP, n):
        return self.run(np.negative(logP), 0.0, n)


class OTT(Peer):
    def __init__(self, kind):
        self.kind = kind
        self.name = f"OTT-JAX {kind} (float32)"
        self.note = "AOT-compiled; threshold ladder tol, tol/10 (its L1 column error)"
        self._cache = {}

    def ladder(self, tol):
        return [tol, tol / 10]

    def prepare(self, logP):
        import jax.numpy as jnp
        return jnp.asarray(np.negative(logP), dtype=jnp.float32)

    def _solver(self, thr, n=None):
        from ott.solvers.linear import acceleration, sinkhorn
        kw = {}
        if self.kind == "momentum":
            kw["momentum"] = acceleration.Momentum(start=20)   # adaptive over-relaxation
        elif self.kind == "Anderson":
            kw["anderson"] = acceleration.AndersonAcceleration(memory=5)
        if n is not None:
            return sinkhorn.Sinkhorn(threshold=-1.0, min_iterations=n, max_iterations=n,
                                     inner_iterations=1, **kw)
        return sinkhorn.Sinkhorn(threshold=thr, max_iterations=self.max_iter, **kw)

    def compiled(self, M, thr, n=None):
        import jax
        from ott.geometry import geometry
        from ott.problems.linear import linear_problem
        key = (M.shape, thr, n, self.max_iter)
        if key not in self._cache:
            solver = self._solver(thr, n)

            def solve(cost):
                geom = geometry.Geometry(cost_matrix=cost, epsilon=1.0 / C.LAM)
                out = solver(linear_problem.LinearProblem(geom))
                return out.f, out.g, out.n_iters

            if any(k[0] != M.shape for k in self._cache):
                self._cache.clear()
            self._cache[key] = jax.jit(solve).lower(M).compile()   # compile outside timing
        return self._cache[key]

    def before(self, M, thr):
        self.compiled(M, thr)

    def run(self, M, thr, n=None):
        f, g, it = self.compiled(M, thr, n)(M)
        f.block_until_ready()
        return f, g, it

    def check(self, M, out):
        f, g, it = out
        # OTT's plan is exp((f_i + g_j - C_ij) / eps) with C = -logP, eps = 1/lam
        logP = -np.asarray(M, dtype=np.float64)
        return (C.err_from_potentials(logP, C.LAM, C.LAM * np.asarray(f, np.float64),
                                      C.LAM * np.asarray(g, np.float64)), int(it))

    def fixed(self, logP, n):
        import jax.numpy as jnp
        M = jnp.asarray(np.negative(logP), dtype=jnp.float32)
        self.compiled(M, None, n)
        return self.run(M, None, n)

    def rate(self, logP, rows=2000):
        sub = np.ascontiguousarray(logP[:min(rows, logP.shape[0])])
        self.fixed(sub, 2), self.fixed(sub, 6)          # compile both first
        t1 = C.timed(self.fixed, sub, 2)[0]
        t2 = C.timed(self.fixed, sub, 6)[0]
        return max(t2 - t1, 1e-9) / 4 * logP.shape[0] / sub.shape[0]


class SeLa(Peer):
    name = "SeLa cpu_sk (float64)"
    note = "its rule (sum rel. change of c <= 0.1, every 10 it.), then 1e-2 ... 1e-5"

    def ladder(self, tol):
        return [0.1, 1e-2, 1e-3, 1e-4, 1e-5]

    def prepare(self, logP):
        return logP

    def run(self, logP, thr, n=None):
        N, K = logP.shape
        PS = np.exp(C.LAM * logP.T)          # P^lam, K x N, as SeLa holds it (a copy)
        r = np.ones((K, 1)) / K
        c = np.ones((N, 1)) / N
        inv_K, inv_N = 1.0 / K, 1.0 / N
        err, it = 1e6, 0
        while (err > thr and it < self.max_iter) if n is None else it < n:
            r = inv_K / (PS @ c)
            c_new = inv_N / (r.T @ PS).T
            if it % 10 == 0:
                with np.errstate(all="ignore"):
                    err = np.nansum(np.abs(c / c_new - 1))
            c = c_new
            it += 1
        # plan Q = diag(c) (P^lam)^T diag(r): N x K; err from its rows/cols in float64
        with np.errstate(all="ignore"):
            rows = c[:, 0] * (PS.T @ r)[:, 0]
            cols = r[:, 0] * (PS @ c)[:, 0]
        return float(np.abs(rows - inv_N).sum() + np.abs(cols - inv_K).sum()), it

    def check(self, logP, out):
        return out

    def fixed(self, logP, n):
        return self.run(logP, 0.0, n)


class SwAV(Peer):
    name = "SwAV-style loop, 3 iterations (float64)"
    note = "fixed 3 iterations: reports the err it reaches"

    def ladder(self, tol):
        return [3]

    def prepare(self, logP):
        return logP

    def run(self, logP, n):
        Q = np.exp(C.LAM * logP).T           # as SwAV: exp(scores / eps).t()
        B, K = Q.shape[1], Q.shape[0]
        Q /= Q.sum()
        for _ in range(n):
            Q /= Q.sum(axis=1, keepdims=True)
            Q /= K
            Q /= Q.sum(axis=0, keepdims=True)
            Q /= B
        return Q.T                            # the plan, N x K (SwAV then multiplies by B)

    def check(self, logP, Q):
        with np.errstate(all="ignore"):
            return C.err_from_plan(Q), 3

    def fixed(self, logP, n):
        return self.run(logP, n)


# --------------------------------------------------------------------------- driver
def problems(args):
    out = []
    for name in args.problems.split(","):
        name = name.strip()
        if name == "peaked":
            logP = C.peaked_problem(max_iter=args.mlp_iter)
            out.append((f"peaked (load_digits MLP, {logP.shape[0]} x {logP.shape[1]})", logP,
                        C.describe_peaked(logP)))
        else:
            N, K = (int(v) for v in name.lower().split("x"))
            out.append((f"random({N}, {K})", C.random_problem(N, K), ""))
    return out


def add_peer_args(p):
    """The options make_peers and the RESULTS.md writer read (shared with scaling.py)."""
    p.add_argument("--n-threads", type=int, default=0, help="0: OpenMP's default")
    p.add_argument("--only", default=None, help="comma-separated substrings of peer names")
    p.add_argument("--no-ott", action="store_true", help="skip OTT-JAX")
    p.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    p.add_argument("--results", default=C.RESULTS)


def make_peers(args):
    peers, skipped = [], []
    try:
        import ot  # noqa: F401
        peers += [POT("sinkhorn"), POT("sinkhorn_log"), POT("sinkhorn_stabilized")]
    except Exception as e:  # noqa: BLE001
        skipped.append(f"POT skipped: not importable ({e.__class__.__name__}: {e})")
    if args.no_ott:
        skipped.append("OTT-JAX skipped: --no-ott")
    else:
        try:
            import jax  # noqa: F401
            import ott  # noqa: F401
            peers += [OTT("plain"), OTT("momentum"), OTT("Anderson")]
        except Exception as e:  # noqa: BLE001
            skipped.append(f"OTT-JAX skipped: not importable ({e.__class__.__name__}: {e})")
    peers += [SeLa(), SwAV()]
    if args.only:
        keep = [s.strip().lower() for s in args.only.split(",")]
        peers = [p for p in peers if any(k in p.name.lower() for k in keep)]
    return peers, skipped


def run_peer(peer, logP, n_ref, args, tols=TOLS):
    """Ladder for each tolerance; returns {tol: (time, err, iters, param) or None}, notes."""
    X = peer.prepare(logP)
    peer.max_iter = args.max_iter
    res, mem, notes = {}, None, []
    rate = None
    done = {}                                   # param -> (t, err, it): reuse across tols
    spent = 0.0
    for tol in tols:
        res[tol] = None
        if isinstance(peer, Ours):
            params = [tol]
        else:
            params = peer.ladder(tol)
        for param in params:
            if param in done:
                t, err, it = done[param]
            else:
                if rate is None and not isinstance(peer, (Ours, SwAV)):
                    rate = peer.rate(logP)
                if spent >= args.budget:
                    notes.append(f"tol {tol:g}: budget of {args.budget:g} s used up")
                    break
                if rate is not None and rate * n_ref[tol] > args.budget - spent:
                    res[tol] = ("est", rate * n_ref[tol])
                    notes.append(f"tol {tol:g}: not run, ~{rate * n_ref[tol]:.0f} s estimated "
                                 f"({rate * 1e3:.1f} ms/it x {n_ref[tol]} it)")
                    break
                if rate is not None:        # no single run may outlast the budget left
                    peer.max_iter = max(10, min(args.max_iter,
                                                int((args.budget - spent) / rate)))
                if hasattr(peer, "before"):
                    peer.before(X, param)
                t, out, m = C.timed(peer.run, X, param)
                err, it = peer.check(X, out)
                del out
                gc.collect()
                spent += t
                done[param] = (t, err, it)
                mem = m if mem is None or (m is not None and m > mem) else mem
                print(f"    {peer.name}: param {param:g}: {t:.3f} s, {it} it, err {err:.2e}",
                      flush=True)
            if err <= tol:
                res[tol] = (t, err, it, param)
                break
            if not np.isfinite(err) or it >= peer.max_iter:
                break
        if res[tol] is None:
            best = min((v[1] for v in done.values() if np.isfinite(v[1])), default=float("nan"))
            notes.append(f"tol {tol:g}: not reached (best err {best:.2e})")
    del X
    gc.collect()
    return res, mem, notes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small problems (a smoke run)")
    p.add_argument("--problems", default=None,
                   help="comma-separated NxK or 'peaked'; default 10000x100,50000x1000,peaked")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds a peer may spend on one problem (default 120; quick 10)")
    p.add_argument("--max-iter", type=int, default=None,
                   help="iteration cap of every solver (default 30000; quick 3000)")
    p.add_argument("--mlp-iter", type=int, default=None, help="MLP training epochs")
    add_peer_args(p)
    args = p.parse_args(argv)
    if args.problems is None:
        args.problems = "500x10,2000x20,peaked" if args.quick else \
            "10000x100,50000x1000,peaked"
    if args.budget is None:
        args.budget = 5.0 if args.quick else 120.0
    if args.max_iter is None:
        args.max_iter = 3000 if args.quick else 30_000
    if args.mlp_iter is None:
        args.mlp_iter = 100 if args.quick else 2000
    nt = args.n_threads or None
    peers, skipped = make_peers(args)
    for s in skipped:
        print(s)
    ours64, ours32 = Ours(np.float64, nt), Ours(np.float32, nt)
    plain = Ours(np.float64, nt, plain=True)
    extra = [ours32]
    sections = []
    for pname, logP, desc in problems(args):
        print(f"\n=== {pname} {desc} ===", flush=True)
        ours_t = {tol: [] for tol in TOLS}
        rows = []
        n_ref = {}

        def run_ours():
            r, m, _ = run_peer(ours64, logP, None, args)
            for tol in TOLS:
                if r[tol] is not None and r[tol][0] != "est":
                    ours_t[tol].append(r[tol][0])
                    n_ref[tol] = r[tol][2]
            return r, m

        r64, m64 = run_ours()
        for tol in TOLS:
            n_ref.setdefault(tol, ours64.max_iter)
        if plain.supported:
            # budgets of the peers are estimated from plain Sinkhorn's iteration counts
            rp, _, _ = run_peer(plain, logP, None, args)
            for tol in TOLS:
                if rp[tol] is not None and rp[tol][0] != "est":
                    n_ref[tol] = rp[tol][2]
        results = [(ours64, r64, m64, [])]
        if plain.supported:
            results.append((plain, rp, None, ["not interleaved; ratio against the default"]))
        for peer in extra + peers:
            r, m, notes = run_peer(peer, logP, n_ref, args)
            results.append((peer, r, m, notes))
            run_ours()                                     # interleave
        med = {tol: statistics.median(ours_t[tol]) if ours_t[tol] else None for tol in TOLS}
        for peer, r, m, notes in results:
            cells = [peer.name]
            for tol in TOLS:
                v = r[tol]
                if v is None:
                    cells += ["not reached", "—"]
                elif v[0] == "est":
                    cells += [f"~{C.fmt_t(v[1])}", f"~{v[1] / med[tol]:.1f}x" if med[tol]
                              else "—"]
                else:
                    t = med[tol] if peer is ours64 else v[0]
                    cells += [f"{C.fmt_t(t)} ({v[2]} it, {v[1]:.1e})",
                              f"{t / med[tol]:.2f}x" if med[tol] else "—"]
            cells += [C.fmt_bytes(m), "; ".join([peer.note] + notes)]
            rows.append(cells)
        tab = C.table(rows, ["solver", "time to 1e-3 (it, err)", "x ours", "time to 1e-6 "
                             "(it, err)", "x ours", "peak memory beyond input", "method / notes"])
        text = f"#### {pname}\n\n" + (f"{desc}\n\n" if desc else "") + tab + "\n"
        print("\n" + text, flush=True)
        sections.append(text)
        del logP
        gc.collect()
    if not args.no_write:
        body = ["## Peers, head to head (benchmarks/peers.py)", "",
                *C.header(C.command_line()), *[f"- {s}" for s in skipped], "",
                "Ratios are peer time / this library's float64 time (median of its runs, "
                "interleaved between the peers) to the same err, computed independently in "
                "float64 from each solver's plan. Method: see the docstring of peers.py "
                "(threshold ladders, extrapolation marked ~). Provisional: shared 2-core "
                "machine, library under optimisation.", "", *sections]
        C.write_section(args.results, "peers", "\n".join(body))
        print(f"wrote section 'peers' of {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
