"""Gradient benchmark (issue 18): forward + backward of sinkhorn_ot.torch.sinkhorn_cost.

On the standard problem random(N, K) (C = -logP, reg = 1 / 25, float32 CPU tensors) it
times, in one process:

- the forward pass alone (``sinkhorn_cost`` on a tensor that does not require grad), solved
  to ``err <= tol``;
- forward + backward with the gradient of ``C`` (the envelope-theorem backward: one plan
  pass), and with the gradients of ``C``, ``a`` and ``b`` (one more read of ``C`` for the
  column sums);
- POT's ``ot.sinkhorn2`` on torch tensors (its PyTorch backend, plain Sinkhorn), forward +
  ``backward()`` through its unrolled iterations, run for exactly the iteration count at
  which its plan first reaches our err (found by an untimed NumPy run of the same algorithm,
  as in bench_cpu.py): in float32 first, then in float64 where the float32 plan misses that
  err or its unrolled gradient is not finite (POT's log-domain solver would keep an ``N x
  K`` array per iteration for autograd).

Every err is the L1 violation of both marginals computed here in float64 from the plan
(ours: the gradient of ``C``, which is the plan of the returned potentials; POT's: from the
untimed run).  Peak memory is the resident high-water mark during the call beyond what the
process held before (``C`` excluded), set against the bound ``one N x K gradient + O(N +
K)``.

Usage::

    python benchmarks/bench_grad.py            # random(50000, 1000), writes RESULTS.md
    python benchmarks/bench_grad.py --quick    # small sizes, seconds
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import warnings

os.environ["POT_BACKEND_DISABLE_PYTORCH"] = ""  # POT's torch backend is the point here

import _common as C  # noqa: E402
import numpy as np  # noqa: E402


def ours(M, reg, tol, n_threads, grads):
    """One call: forward (grads=()) or forward + backward for the named inputs."""
    import torch

    import sinkhorn_ot.torch as st
    Ct = M.clone().requires_grad_(True) if "C" in grads else M
    N, K = M.shape
    a = torch.full((N,), 1.0 / N, dtype=torch.float64, requires_grad="a" in grads)
    b = torch.full((K,), 1.0 / K, dtype=torch.float64, requires_grad="b" in grads)
    kw = dict(reg=reg, tol=tol, n_threads=n_threads, max_iter=5000)

    def call():
        v = st.sinkhorn_cost(Ct, a, b, **kw)
        t0 = time.perf_counter()
        if grads:
            v.backward()
        return time.perf_counter() - t0

    dt, t_back, mem = C.timed(call)
    return dt, t_back, mem, (Ct.grad if "C" in grads else None)


def pot(M, reg, n_iter):
    """POT's sinkhorn2 forward and backward through n_iter unrolled iterations."""
    import ot
    import torch
    Mt = M.clone().requires_grad_(True)
    N, K = Mt.shape
    a = torch.full((N,), 1.0 / N, dtype=M.dtype)
    b = torch.full((K,), 1.0 / K, dtype=M.dtype)

    def call():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = ot.sinkhorn2(a, b, Mt, reg, method="sinkhorn", numItermax=n_iter,
                                stopThr=0.0)
        t0 = time.perf_counter()
        loss.backward()
        return time.perf_counter() - t0

    dt, t_back, mem = C.timed(call)
    ok = bool(torch.isfinite(Mt.grad).all())
    return dt, t_back, mem, ok


def pot_plan_err(Mt, reg, n_iter):
    """err of the plan of POT's torch-backend Sinkhorn after n_iter iterations (untimed)."""
    import ot
    import torch
    N, K = Mt.shape
    a = torch.full((N,), 1.0 / N, dtype=Mt.dtype)
    b = torch.full((K,), 1.0 / K, dtype=Mt.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        P = ot.sinkhorn(a, b, Mt, reg, method="sinkhorn", numItermax=n_iter, stopThr=0.0,
                        warn=False)
    return C.err_from_plan(P.numpy())


def pot_iterations(M, reg, target, max_iter):
    """The first iteration (POT checks every 10) whose plan has L1 err <= target, from one
    untimed run that records POT's L2 column error (see bench_cpu.pot_iterations)."""
    import ot
    N, K = M.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        P, log = ot.sinkhorn(np.full(N, 1.0 / N), np.full(K, 1.0 / K), M, reg,
                             method="sinkhorn", numItermax=max_iter,
                             stopThr=target / K ** 0.5, warn=False, log=True)
    err = C.err_from_plan(P)
    del P
    l2 = np.asarray(log["err"], dtype=np.float64)
    if not np.isfinite(err) or len(l2) == 0 or not l2[-1] > 0:
        return int(log["niter"])
    hit = np.nonzero(l2 * (err / l2[-1]) <= 0.8 * target)[0]
    return 10 * int(hit[0]) + 1 if len(hit) else int(log["niter"])


def run_size(N, K, args, out):
    import torch
    if args.n_threads:
        torch.set_num_threads(args.n_threads)
    print(f"\n=== random({N}, {K}) float32, reg = 1/{C.LAM:g}, tol = {args.tol:g} ===",
          flush=True)
    logP = C.random_problem(N, K)
    M64 = np.negative(logP)
    del logP
    M32 = torch.from_numpy(M64.astype(np.float32))
    reg = 1.0 / C.LAM
    nt = args.n_threads or None
    grad_bytes = N * K * 4
    rows, rec = [], {}
    ours(M32[:64].contiguous(), reg, args.tol, nt, ("C",))  # imports and first calls, untimed
    for rnd in range(args.repeats):  # interleaved rounds, best time kept
        for key, grads in (("forward", ()), ("forward + backward (C)", ("C",)),
                           ("forward + backward (C, a, b)", ("C", "a", "b"))):
            dt, t_back, mem, P = ours(M32, reg, args.tol, nt, grads)
            err = C.err_from_plan(P.numpy()) if P is not None else None
            if key not in rec or dt < rec[key][0]:
                rec[key] = (dt, mem, err, t_back)
            print(f"  round {rnd}: {key}: {dt:.3f} s (backward {t_back:.3f} s), peak "
                  f"+{C.fmt_bytes(mem)}" + (f", err {err:.2e}" if err is not None else ""),
                  flush=True)
            del P
            gc.collect()
    err_ours = rec["forward + backward (C)"][2]
    n_match = pot_iterations(M64, reg, err_ours, args.max_iter)
    # POT in float32 first; float64 where its float32 plan does not reach our err or its
    # unrolled gradient is not finite (its kernel exp(-C / reg) and the divisions by K v
    # of the backward pass leave float32's range on this problem)
    pot_rows, timing = [], None
    for pot_dtype in ("float32", "float64"):
        Mt = M32 if pot_dtype == "float32" else torch.from_numpy(M64)
        n = n_match
        while True:
            err_pot = pot_plan_err(Mt, reg, n)
            if err_pot <= err_ours or n >= args.max_iter or pot_dtype == "float32":
                break
            n += 10
        print(f"  POT {pot_dtype}: {n} iterations, plan err {err_pot:.2e} (ours "
              f"{err_ours:.2e})", flush=True)
        if not err_pot <= err_ours:
            pot_rows.append((f"POT ot.sinkhorn2 {pot_dtype} ({n} it)", "not run",
                             C.fmt_e(err_pot), "", "", "its plan misses our err"))
            continue
        dt_pot, t_back, mem_pot, ok = pot(Mt, reg, n)
        print(f"  POT sinkhorn2 {pot_dtype} forward + backward: {dt_pot:.2f} s (backward "
              f"{t_back:.2f} s), peak +{C.fmt_bytes(mem_pot)}"
              f"{'' if ok else ', NON-FINITE gradient'}", flush=True)
        pot_rows.append((f"POT ot.sinkhorn2 {pot_dtype} forward + backward ({n} it)",
                         C.fmt_t(dt_pot), C.fmt_e(err_pot), C.fmt_bytes(mem_pot),
                         C.fmt_t(t_back), "" if ok else "gradient not finite (NaN / inf)"))
        if ok:
            timing = (pot_dtype, dt_pot)
            break
    t_f = rec["forward"][0]
    t_fb = rec["forward + backward (C)"][0]
    t_fb3 = rec["forward + backward (C, a, b)"][0]
    for key, (dt, mem, err, t_back) in rec.items():
        rows.append((f"sinkhorn_cost {key}", C.fmt_t(dt), C.fmt_e(err), C.fmt_bytes(mem),
                     C.fmt_t(t_back) if key != "forward" else "", ""))
    tab = C.table(rows + pot_rows, ["what", f"time (best of {args.repeats}; POT one run)",
                                    "err (independent, float64)", "peak memory beyond C",
                                    "of which backward", "note"])
    back_C, back_3 = rec["forward + backward (C)"][3], rec["forward + backward (C, a, b)"][3]
    mem_fb = rec["forward + backward (C)"][1]
    bound = grad_bytes + 64 * (N + K) + (16 << 20)  # + 16 MB: allocator and thread slack
    if timing is None:
        pot_line = "- POT sinkhorn2: no run with a finite gradient at our err"
    else:
        r = timing[1] / t_fb
        pot_line = (f"- POT sinkhorn2 ({timing[0]}) forward + backward / ours: {r:.1f}x "
                    f"(target >= 10x: {'met' if r >= 10 else f'missed by {10 / r:.2f}x'})")
    verdict = [
        f"- forward + backward / forward: {t_fb / t_f:.2f}x with the gradient of C, "
        f"{t_fb3 / t_f:.2f}x with those of C, a and b (target <= 2x: "
        f"{'met' if t_fb / t_f <= 2 else 'missed'}); within those calls the backward pass "
        f"took {back_C / t_f:.3f}x and {back_3 / t_f:.3f}x the forward alone",
        pot_line,
        f"- peak memory of forward + backward beyond C: {C.fmt_bytes(mem_fb)}; one N x K "
        f"float32 gradient is {C.fmt_bytes(grad_bytes)} (bound gradient + O(N + K): "
        f"{'met' if mem_fb is not None and mem_fb <= bound else 'missed or not measured'})",
    ]
    text = "\n".join([f"#### random({N}, {K}) float32", "", tab, "", *verdict, ""])
    print("\n" + text, flush=True)
    out.append(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    p.add_argument("--sizes", default=None, help="comma-separated NxK, default 50000x1000")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (best kept)")
    p.add_argument("--tol", type=float, default=1e-6)
    p.add_argument("--max-iter", type=int, default=5000)
    p.add_argument("--n-threads", type=int, default=0, help="0: the libraries' defaults")
    p.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    p.add_argument("--results", default=C.RESULTS)
    args = p.parse_args(argv)
    if args.sizes is None:
        args.sizes = "2000x50" if args.quick else "50000x1000"
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")]
    head = C.header(C.command_line())  # the machine's load before the run
    out = []
    for N, K in sizes:
        run_size(N, K, args, out)
    if not args.no_write:
        body = ["## Gradients: sinkhorn_ot.torch.sinkhorn_cost forward + backward "
                "(benchmarks/bench_grad.py)", "", *head, "",
                "One process; the backward pass is the envelope theorem's (no unrolling); "
                "POT differentiates through its iterations, run for the iteration count at "
                "which its plan first reaches our err; err computed independently in "
                "float64; peak memory = resident high-water mark during the call beyond "
                "what the process held before.", "", *out]
        C.write_section(args.results, "bench_grad", "\n".join(body))
        print(f"wrote section 'bench_grad' of {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
