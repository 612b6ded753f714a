"""How often bfloat16 input alone moves a label, on the CPU core (float64 sums): random(N, K)
rounded to bfloat16 against the float32 original, both solved with the same 30 passes.

    python benchmarks/gpu/bf16_label_bound.py [--n 20000] [--k 3000]

Issue 3 asks bf16 labels to equal float32 ones on >= 99.9 % of rows; the GPU measured 99.73 %
(RESULTS.md, section gpu).  This script measures what any exact implementation gets on the
same distribution: the difference comes from the rounded inputs, not from the kernels.
"""
import argparse
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from benchmarks._common import random_problem  # noqa: E402
from sinkhorn_ot._cpu import CPUBackend  # noqa: E402


def to_bf16_values(x32):
    """float32 -> the float32 value of its bfloat16 rounding (nearest even)."""
    b = x32.view(np.uint32).astype(np.uint64)
    return (((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint32) << 16).view(np.float32)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--k", type=int, default=3000)
    ap.add_argument("--lam", type=float, default=25.0)
    args = ap.parse_args()
    N, K = args.n, args.k
    x = random_problem(N, K).astype(np.float32)
    xb = to_bf16_values(x)
    loga, logb = np.full(N, -math.log(N)), np.full(K, -math.log(K))
    kw = dict(tol=0.0, max_iter=30, n_iter=30, want_labels=True)
    a = CPUBackend().solve(x, args.lam, loga, logb, **kw)
    b = CPUBackend().solve(xb, args.lam, loga, logb, **kw)
    t = args.lam * x.astype(np.float64) + a.g
    top2 = np.sort(t, axis=1)[:, -2:]
    near = (top2[:, 1] - top2[:, 0]) < args.lam * np.abs(x[np.arange(N), a.labels]) * 2.0 ** -8
    print(f"random({N}, {K}), lam {args.lam:g}, 30 passes on the CPU core:")
    print(f"  labels of the bf16-rounded input equal to float32: {(a.labels == b.labels).mean():.4f}")
    print(f"  rows whose top-2 gap is below the bf16 rounding of their largest entry: "
          f"{near.mean():.4f}")


if __name__ == "__main__":
    main()
