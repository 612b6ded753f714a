"""Latency of the per-iteration all-reduce of a sharded solve (docs/distributed.rst).

    mpiexec -n 2 python benchmarks/allreduce_latency.py mpi
    python benchmarks/allreduce_latency.py torch            # spawns 2 gloo processes
    python benchmarks/allreduce_latency.py torch --nccl     # 2 GPUs, NCCL, CuPy buffers

For K = 3000 and 65_536 it times, median over ``--reps`` calls after a warm-up, with a
barrier before each call:

- ``pass``: what one iteration exchanges, ``Comm.allreduce_pass`` (K column sums, K column
  maxima and one scalar: 2K+1 float64 values), through the library's adapter;
- ``sum+max``: the generic ``Comm.allreduce_pass``: two built-in collectives, a sum of K+1
  values and a max of K values;
- ``sum``: a plain built-in sum all-reduce of 2K+1 float64 values, for comparison.

Not an asv benchmark (it needs several processes); run by hand.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

import numpy as np

KS = (3000, 65_536)


def _median_us(fn, barrier, reps):
    for _ in range(10):
        fn()
    ts = []
    for _ in range(reps):
        barrier()
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1e6 * float(np.median(ts))


def bench(comm, barrier, raw_sum, reps, xp=np):
    from sinkhorn_ot.distributed import Comm

    rows = []
    for K in KS:
        col, colmax = xp.ones(K), xp.zeros(K)
        buf = xp.ones(2 * K + 1)
        t_pass = _median_us(lambda: comm.allreduce_pass(col, colmax, 1.0), barrier, reps)
        t_two = _median_us(lambda: Comm.allreduce_pass(comm, col, colmax, 1.0), barrier,
                           reps)
        t_sum = _median_us(lambda: raw_sum(buf), barrier, reps)
        rows.append((K, 8 * (2 * K + 1), t_pass, t_two, t_sum))
    return rows


def _report(engine, size, rows):
    print(f"{engine}, {size} processes on this machine (loopback)")
    print(f"{'K':>7} {'bytes':>8} {'pass (us)':>10} {'sum+max (us)':>13} {'plain sum (us)':>15}")
    for K, nbytes, tp, t2, ts in rows:
        print(f"{K:>7} {nbytes:>8} {tp:>10.1f} {t2:>13.1f} {ts:>15.1f}")


def run_mpi(reps):
    from mpi4py import MPI

    from sinkhorn_ot.distributed import MPIComm

    world = MPI.COMM_WORLD
    comm = MPIComm(world)
    rows = bench(comm, world.Barrier,
                 lambda b: world.Allreduce(MPI.IN_PLACE, b, op=MPI.SUM), reps)
    if comm.rank == 0:
        _report(f"MPI ({MPI.Get_library_version().splitlines()[0].strip()})", comm.size, rows)


def run_torch_rank(port, rank, reps, nccl):
    import torch
    import torch.distributed as dist

    from sinkhorn_ot.distributed import TorchComm

    if nccl:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if nccl else "gloo",
                            init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        comm = TorchComm()
        if nccl:
            import cupy as xp

            def raw(b):
                dist.all_reduce(torch.from_dlpack(b))
                torch.cuda.synchronize()
        else:
            xp = np

            def raw(b):
                dist.all_reduce(torch.from_numpy(b))
        rows = bench(comm, dist.barrier, raw, reps, xp)
        if rank == 0:
            _report(f"torch {torch.__version__} {'nccl' if nccl else 'gloo'}", 2, rows)
    finally:
        dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("engine", choices=["mpi", "torch"])
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--nccl", action="store_true")
    ap.add_argument("--_port", type=int)
    ap.add_argument("--_rank", type=int)
    args = ap.parse_args()
    if args.engine == "mpi":
        run_mpi(args.reps)
    elif args._rank is not None:
        run_torch_rank(args._port, args._rank, args.reps, args.nccl)
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        cmd = [sys.executable, __file__, "torch", "--reps", str(args.reps), "--_port", str(port)]
        cmd += ["--nccl"] if args.nccl else []
        procs = [subprocess.Popen(cmd + ["--_rank", str(r)], env=env) for r in range(2)]
        sys.exit(max(p.wait(timeout=600) for p in procs))


if __name__ == "__main__":
    main()
