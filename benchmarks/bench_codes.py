"""Deep-clustering call sites (issue 14 item 3): ``sinkhorn_ot.codes`` against PyTorch loops
written like each codebase's (tests/clients.py), interleaved in one process.

Each row times the original loop and the one-call replacement of docs/migration.rst on the
same input, in rounds (each round runs both, in turn; the first round is a warm-up and not
counted), and reports the median of each, their ratio (the loop's time / ours: above 1 we are
faster) and the largest difference between the two outputs.  CPU rows run at each thread
count of ``--n-threads`` (``torch.set_num_threads`` for the loop, ``codes(n_threads=)`` for
ours); GPU rows (when ``torch.cuda.is_available()``) synchronise the device around each call.
Each loop gets a fresh copy of the input, made before its clock starts (MSN's works in place).

Call sites and shapes (B x K, cosine scores / eps unless said otherwise, 3 iterations):

- SwAV ``distributed_sinkhorn``, 1024 x 3000, float32 and float64; with a queue, 3840 + 256
  rows (4096 x 3000, the codes of the last 256), float32 and float64;
- solo-learn ``SinkhornKnopp`` and lightly ``swav_loss.sinkhorn``, 1024 x 3000 float32;
- DINOv2 ``sinkhorn_knopp_teacher`` (teacher_temp 0.07), 64 x 8192 and 128 x 65_536 float32;
- MSN ``distributed_sinkhorn`` and lightly ``msn_loss.sinkhorn`` (sharpened probabilities),
  64 x 1024 float32;
- SeLa ``optimize_L_sk`` (lamb 25, its stop rule 0.1) against ``codes(tol=1e-3)``, and SeLaVi
  ``optimize_L_sk_gpu`` (CPU port, float64), 20_000 x 500 (``--no-sela`` skips them);
- GPU: SwAV 4096 x 3000 and DINOv2 64 x 65_536, float32.

Usage::

    python benchmarks/bench_codes.py              # full run, writes a section of RESULTS.md
    python benchmarks/bench_codes.py --quick --no-write    # tiny shapes, a smoke run
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import _common as C
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def _sites(quick: bool):
    """(label, shape, dtype name, make input(torch dtype, device), loop(x), ours(x, n_threads)
    [, compare(ours, loop) -> text]); without compare, the largest absolute difference."""
    import clients as L

    import sinkhorn_ot

    def scores(B, K, seed=0):
        return lambda dt, dev: L.cosine_scores(B, K, seed, dim=128, dtype=dt).to(dev)

    def targets(B, K):
        return lambda dt, dev: L.msn_targets(B, K, dtype=dt).to(dev)

    def teacher(B, K):
        return lambda dt, dev: L.teacher_logits(B, K, dtype=dt).to(dev)

    s = (lambda n: max(8, n // 32)) if quick else (lambda n: n)
    swav_b, swav_k, bs, queue = s(1024), s(3000), s(256), s(3840)
    out = []
    for dt in ("float32", "float64"):
        out.append(("SwAV `distributed_sinkhorn`", (swav_b, swav_k), dt, scores(swav_b, swav_k),
                    lambda x: L.swav(x),
                    lambda x, t: sinkhorn_ot.codes(x, eps=0.05, n_threads=t)))
    for dt in ("float32", "float64"):
        n = queue + bs
        out.append((f"SwAV with a queue ({queue} + {bs} rows)", (n, swav_k), dt,
                    scores(n, swav_k), lambda x, bs=bs: L.swav(x)[-bs:],
                    lambda x, t, bs=bs: sinkhorn_ot.codes(x, eps=0.05, rows=slice(-bs, None),
                                                          n_threads=t)))
    out.append(("solo-learn `SinkhornKnopp`", (swav_b, swav_k), "float32",
                scores(swav_b, swav_k), lambda x: L.SoloSinkhornKnopp(3, 0.05)(x),
                lambda x, t: sinkhorn_ot.codes(x, eps=0.05, n_threads=t)))
    out.append(("lightly `swav_loss.sinkhorn`", (swav_b, swav_k), "float32",
                scores(swav_b, swav_k), lambda x: L.lightly_swav(x),
                lambda x, t: sinkhorn_ot.codes(x, eps=0.05, n_threads=t)))
    for B, K in ((64, 8192), (128, 65_536)):
        B, K = (B, s(K)) if quick else (B, K)
        out.append(("DINOv2 `sinkhorn_knopp_teacher`", (B, K), "float32", teacher(B, K),
                    lambda x: L.dinov2(x, 0.07),
                    lambda x, t: sinkhorn_ot.codes(x, eps=0.07, n_threads=t)))
    B, K = 64, s(1024)
    out.append(("MSN `distributed_sinkhorn`", (B, K), "float32", targets(B, K),
                lambda x: L.msn(x, inplace=True), lambda x, t: sinkhorn_ot.codes(
                    x, eps=1.0, probabilities=True, n_threads=t)))
    out.append(("lightly `msn_loss.sinkhorn`", (B, K), "float32", targets(B, K),
                lambda x: L.lightly_msn(x), lambda x, t: sinkhorn_ot.codes(
                    x, eps=1.0, probabilities=True, n_threads=t)))
    return out


def _sela_sites(quick: bool):
    """SeLa and SeLaVi: tolerance solves, codes(tol=1e-3) against their stop rule."""
    import clients as L

    import sinkhorn_ot

    N, K, lamb = (2000, 50, 25.0) if quick else (20_000, 500, 25.0)

    def labels(ours, loop):  # two tolerances: compare what they are used for
        import torch

        same = torch.as_tensor(ours).argmax(1) == torch.as_tensor(loop).argmax(1)
        return f"labels {100 * float(same.double().mean()):.1f}% equal"

    def probs(dt, dev):
        return L.softmax_probs(N, K, scale=3.0, dtype=dt).to(dev)

    out = []
    for dt in ("float64", "float32"):
        out.append((f"SeLa `optimize_L_sk` (lamb {lamb:g}) vs `tol=1e-3`", (N, K), dt, probs,
                    lambda x, dt=dt: L.sela(x.numpy(), lamb, dtype=getattr(np, dt))[0] * N,
                    lambda x, t: sinkhorn_ot.codes(x.numpy(), eps=1 / lamb, probabilities=True,
                                                   tol=1e-3, n_threads=t), labels))
    out.append((f"SeLaVi `optimize_L_sk_gpu`, CPU port (lamb {lamb:g}) vs `tol=1e-3`", (N, K),
                "float64", probs, lambda x: L.selavi(x, lamb)[0] * N,
                lambda x, t: sinkhorn_ot.codes(x, eps=2 / lamb, probabilities=True, tol=1e-3,
                                               n_threads=t), labels))
    return out


def _gpu_sites():
    import clients as L

    import sinkhorn_ot

    return [
        ("SwAV `distributed_sinkhorn` (GPU)", (4096, 3000), "float32",
         lambda dt, dev: L.cosine_scores(4096, 3000, dim=128, dtype=dt).to(dev),
         lambda x: L.swav(x), lambda x, t: sinkhorn_ot.codes(x, eps=0.05)),
        ("DINOv2 `sinkhorn_knopp_teacher` (GPU)", (64, 65_536), "float32",
         lambda dt, dev: L.teacher_logits(64, 65_536, dtype=dt).to(dev),
         lambda x: L.dinov2(x, 0.07), lambda x, t: sinkhorn_ot.codes(x, eps=0.07)),
    ]


def _diff(a, b):
    import torch

    a = torch.as_tensor(a).double().cpu()
    b = torch.as_tensor(b).double().cpu()
    return float((a - b).abs().max())


def measure(site, device, threads, rounds):
    """Median times (loop, ours) over ``rounds`` interleaved rounds after one warm-up, and
    the largest difference of the outputs."""
    import torch

    label, shape, dt, make, loop, ours = site[:6]
    compare = site[6] if len(site) > 6 else (lambda a, b: f"{_diff(a, b):.1e}")
    x = make(getattr(torch, dt), device)
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(threads)

    def timed(fn, *args):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(*args)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    t_loop, t_ours = [], []
    diff = None
    for r in range(rounds + 1):
        # a fresh copy, made before the clock starts: MSN's loop works in place
        dl, ref = timed(loop, x.clone())
        do, got = timed(ours, x, threads)
        if r == 0:
            diff = compare(got, ref)
            continue
        t_loop.append(dl)
        t_ours.append(do)
    return statistics.median(t_loop), statistics.median(t_ours), diff


def _fmt_us(t):
    return f"{t * 1e6:.0f} us" if t < 1e-3 else C.fmt_t(t)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds (a smoke run)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 15)")
    p.add_argument("--n-threads", default="1,2", help="CPU thread counts, comma separated")
    p.add_argument("--no-sela", action="store_true", help="skip the SeLa / SeLaVi rows")
    p.add_argument("--no-gpu", action="store_true", help="skip the GPU rows")
    p.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    p.add_argument("--results", default=C.RESULTS)
    args = p.parse_args(argv)
    import torch

    rounds = args.rounds or (2 if args.quick else 15)
    threads = [int(t) for t in str(args.n_threads).split(",") if t.strip()]
    cpu = torch.device("cpu")
    sites = _sites(args.quick) + ([] if args.no_sela else _sela_sites(args.quick))
    rows = []
    for site in sites:
        label, shape, dt = site[:3]
        sela = label.startswith(("SeLa", "SeLaVi"))
        for t in threads:
            t_loop, t_ours, diff = measure(site, cpu, t, 1 if sela and not args.quick
                                           else rounds)
            rows.append((label, f"{shape[0]} x {shape[1]}", dt, f"CPU, {t}", _fmt_us(t_loop),
                         _fmt_us(t_ours), f"{t_loop / t_ours:.2f}", diff))
            print(" | ".join(rows[-1]), flush=True)
    if torch.cuda.is_available() and not args.no_gpu:
        gpu = torch.device("cuda")
        for site in _gpu_sites():
            label, shape, dt = site[:3]
            t_loop, t_ours, diff = measure(site, gpu, 0, rounds)
            rows.append((label, f"{shape[0]} x {shape[1]}", dt, torch.cuda.get_device_name(),
                         _fmt_us(t_loop), _fmt_us(t_ours), f"{t_loop / t_ours:.2f}", diff))
            print(" | ".join(rows[-1]), flush=True)
    headers = ["call site", "B x K", "dtype", "device, threads", "loop", "codes()",
               "ratio loop / codes", "agreement"]
    body = ["## Deep-clustering call sites: `codes()` against the loops it replaces "
            "(bench_codes.py)", "",
            *C.header(C.command_line()), f"- torch {torch.__version__}; median of {rounds} "
            "interleaved rounds after a warm-up (SeLa / SeLaVi rows: one timed round); ratio "
            "above 1: codes() is faster; agreement: the largest absolute difference of the codes "
            "(SeLa / SeLaVi: of the labels, each solved to its own tolerance).", "",
            C.table(rows, headers)]
    print("\n".join(body[-1:]))
    if not args.no_write:
        C.write_section(args.results, "bench_codes", "\n".join(body))
        print(f"wrote section 'bench_codes' of {args.results}")


if __name__ == "__main__":
    main()
