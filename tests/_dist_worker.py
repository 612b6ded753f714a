"""Worker for tests/test_distributed.py: one process of a 2-process sharded solve.

    mpiexec -n 2 python tests/_dist_worker.py mpi OUTDIR
    python tests/_dist_worker.py torch OUTDIR PORT RANK        (twice, RANK = 0 and 1)

Every case of ``cases()`` is solved with this rank's block of rows; each rank writes
``OUTDIR/rank{r}.npz`` (results) and ``OUTDIR/rank{r}.json`` (errors raised) for the test to
compare with the single-process solve of the whole matrix.  The data come from ``cases()``,
which the test imports too.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np


def _log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def cases():
    """(name, function, full matrix, split row, keyword arguments, per-rank a or None)."""
    rng = np.random.default_rng(0)
    logP = _log_softmax(3 * rng.standard_normal((700, 15)))
    C = rng.random((300, 12))
    C[rng.random(C.shape) < 0.05] = np.inf         # a few forbidden pairs
    a = rng.random(300) + 0.1
    a /= a.sum()
    b = rng.random(12)
    b[4] = 0.0                                      # a massless column
    b /= b.sum()
    g_init = rng.standard_normal(15)
    out = [
        ("assign_ragged", "balanced_assign", logP, 520, dict(lam=25.0, tol=1e-5)),
        ("assign_empty_rank1", "balanced_assign", logP, 700, dict(lam=5.0)),
        ("assign_empty_rank0", "balanced_assign", logP, 0, dict(lam=25.0, n_iter=5)),
        ("assign_init_f32", "balanced_assign", logP.astype(np.float32), 350,
         dict(lam=10.0, init=g_init)),
        ("assign_size_penalty", "balanced_assign", logP, 260,
         dict(lam=10.0, size_penalty=0.5)),
        ("sinkhorn_a_b", "sinkhorn", C, 110, dict(reg=0.05, b=b, a=a)),
        ("sinkhorn_default_a", "sinkhorn", C, 299, dict(reg=0.1, tol=1e-9)),
    ]
    return out


def error_cases(rank):
    """Inputs where one rank's block (or both together) is invalid: every rank must raise
    the same error instead of deadlocking."""
    rng = np.random.default_rng(1)
    X = _log_softmax(rng.standard_normal((40, 6)))
    nan = X.copy()
    if rank == 1:
        nan[23, 2] = np.nan                         # global row 23: rank 1's row 3
    wide = X if rank == 0 else np.zeros((20, 7))
    dead = X.copy()
    dead[:, 2] = -np.inf                            # column 2 forbidden on every rank
    bad_lam = 25.0 if rank == 0 else -1.0
    return [("err_nan", nan[20 * rank:20 * rank + 20], {}),
            ("err_K", wide[20 * rank:20 * rank + 20] if rank == 0 else wide, {}),
            ("err_dead_column", dead[20 * rank:20 * rank + 20], {}),
            ("err_lam_rank1", X[20 * rank:20 * rank + 20], {"lam": bad_lam})]


def run(comm, rank, outdir):
    import sinkhorn_ot

    res = {}
    for name, fn, M, split, kw in cases():
        lo, hi = (0, split) if rank == 0 else (split, M.shape[0])
        kw = dict(kw)
        if "a" in kw:
            kw["a"] = kw["a"][lo:hi]
        if fn == "sinkhorn":
            r = sinkhorn_ot.sinkhorn(M[lo:hi], comm=comm, n_threads=1, **kw)
        else:
            r = sinkhorn_ot.balanced_assign(M[lo:hi], comm=comm, n_threads=1, **kw)
            res[f"{name}.labels"] = np.asarray(r.labels)
            res[f"{name}.sizes"] = np.asarray(r.sizes)
        res[f"{name}.f"] = np.asarray(r.f)
        res[f"{name}.g"] = np.asarray(r.g)
        res[f"{name}.scalars"] = np.array([r.n_iter, r.err, float(r.converged), r.cost])
        res[f"{name}.plan"] = np.asarray(r.plan())
    errors = {}
    for name, X, kw in error_cases(rank):
        try:
            sinkhorn_ot.balanced_assign(X, comm=comm, n_threads=1, **kw)
            errors[name] = None
        except Exception as e:  # noqa: BLE001 - recorded for the test
            errors[name] = [type(e).__name__, str(e)]
    np.savez(os.path.join(outdir, f"rank{rank}.npz"), **res)
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as fh:
        json.dump(errors, fh)


def main(argv):
    engine, outdir = argv[1], argv[2]
    if engine == "mpi":
        from mpi4py import MPI

        run(MPI.COMM_WORLD, MPI.COMM_WORLD.Get_rank(), outdir)
    elif engine == "torch":
        import torch.distributed as dist

        port, rank = int(argv[3]), int(argv[4])
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=2)
        try:
            run("torch", rank, outdir)
        finally:
            dist.destroy_process_group()
    else:
        raise SystemExit(f"unknown engine {engine}")


if __name__ == "__main__":
    main(sys.argv)
