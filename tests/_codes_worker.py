"""Worker for tests/test_codes.py: one process of a 2-process torch.distributed (gloo) group.

    python tests/_codes_worker.py OUTDIR PORT RANK        (twice, RANK = 0 and 1)

For every case of ``cases()`` this rank takes its block of rows, runs the codebase's own loop
(tests/clients.py, all-reducing as the original does) and ``sinkhorn_ot.codes`` with
``comm="auto"`` (which finds the initialised group), and writes both to
``OUTDIR/rank{r}.npz`` for the test to compare, with each other and with the single-process
codes of all ranks' rows together.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import clients as C  # noqa: E402

BS = 48          # batch rows per rank
QUEUE = 80       # queue rows per rank


def cases():
    """(name, per-rank matrices [rank 0, rank 1], original(block), ours(block), rows kept)

    ``original`` and ``ours`` map one rank's matrix to its codes; ``rows`` (a slice) is what
    both keep of it (the batch of a batch + queue matrix), or None."""
    out = []
    for dt in (torch.float64, torch.float32):
        tag = str(dt).replace("torch.", "")
        s = [C.cosine_scores(BS, 40, seed=r, dtype=dt) for r in range(2)]
        q = [C.cosine_scores(QUEUE, 40, seed=10 + r, dtype=dt) for r in range(2)]
        # DINOv2 takes B = local rows x world (equal batches); iBOT all-reduces the count of
        # masked patches, which differs across ranks
        t = [C.teacher_logits(BS, 50, seed=20 + r, dtype=dt) for r in range(2)]
        tr = [C.teacher_logits(n, 50, seed=25 + r, dtype=dt) for r, n in enumerate((37, 61))]
        p = [C.msn_targets(BS, 30, seed=30 + r, dtype=dt) for r in range(2)]
        out += [
            (f"swav_{tag}", s, lambda m: C.swav(m.clone()),
             lambda m: _codes(m, eps=0.05), None),
            (f"swav_queue_{tag}", [torch.cat((q[r], s[r])) for r in range(2)],
             lambda m: C.swav(m.clone()), lambda m: _codes(m, eps=0.05, rows=slice(-BS, None)),
             slice(-BS, None)),
            (f"solo_queue_{tag}", [torch.cat((s[r], q[r])) for r in range(2)],
             lambda m: C.SoloSinkhornKnopp(3, 0.05, world_size=2)(m.clone()),
             lambda m: _codes(m, eps=0.05, rows=slice(0, BS)), slice(0, BS)),
            (f"lightly_swav_{tag}", s,
             lambda m: C.lightly_swav(m.clone(), gather_distributed=True),
             lambda m: _codes(m, eps=0.05), None),
            (f"dinov2_{tag}", t, lambda m: C.dinov2(m, 0.07),
             lambda m: _codes(m.float(), eps=0.07), None),
            (f"ibot_{tag}", tr, lambda m: C.ibot(m, 0.07, torch.tensor(m.shape[0])),
             lambda m: _codes(m.float(), eps=0.07), None),
            (f"msn_{tag}", p, lambda m: C.msn(m), lambda m: _codes(m, eps=1.0,
                                                                   probabilities=True), None),
            (f"lightly_msn_{tag}", p, lambda m: C.lightly_msn(m, gather_distributed=True),
             lambda m: _codes(m, eps=1.0, probabilities=True), None),
        ]
    return out


def error_case(rank):
    """MSN targets with a negative entry on rank 1 only (its local row 3, global row 51):
    both ranks must raise the same error, naming the global entry."""
    p = C.msn_targets(BS, 30, seed=40 + rank)
    if rank == 1:
        p[3, 7] = -0.5
    return p


def _codes(m, **kw):
    import sinkhorn_ot

    return sinkhorn_ot.codes(m, n_threads=1, **kw)


def main(argv):
    import torch.distributed as dist

    outdir, port, rank = argv[1], int(argv[2]), int(argv[3])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        res = {}
        for name, mats, original, ours, rows in cases():
            m = mats[rank]
            ref = original(m)
            res[f"{name}.original"] = (ref if rows is None else ref[rows]).numpy()
            res[f"{name}.ours"] = ours(m).numpy()
        # an empty block: rank 0 holds no rows, rank 1 all of them
        full = C.cosine_scores(2 * BS, 40, seed=50)
        mine = full[:0] if rank == 0 else full
        res["empty_rank0.ours"] = _codes(mine, eps=0.05).numpy()
        try:
            _codes(error_case(rank), eps=1.0, probabilities=True)
            res["error"] = np.array("no error")
        except ValueError as exc:
            res["error"] = np.array(str(exc))
        np.savez(os.path.join(outdir, f"rank{rank}.npz"), **res)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv)
