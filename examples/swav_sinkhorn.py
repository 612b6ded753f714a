"""A drop-in replacement for SwAV's ``distributed_sinkhorn(out)``, checked against the original.

SwAV (Caron et al., NeurIPS 2020; the same step is in DINOv2's ``SinkhornKnopp`` centering)
turns a batch of prototype scores ``out`` (B x K, cosine similarities) into soft codes: the
entropic transport plan with uniform marginals, ``exp(out / eps)`` scaled by 3 column and 3
row normalisations, rows rescaled to sum to 1.  That is ``codes(out, eps=eps)``
(``balanced_assign(out, lam=1/eps, n_iter=3)`` with its plan times B): a per-row shift of the
scores is absorbed by the row potential, so raw scores can be passed as they are.

    python examples/swav_sinkhorn.py            # random 4096 x 3000 batch, CPU or GPU

Runs on the GPU when ``torch.cuda.is_available()`` (needs ``pip install
"sinkhorn-ot[cuda]"``), otherwise on the CPU.  In multi-process training (torch.distributed
initialised) ``codes`` all-reduces the column sums itself, as SwAV does.
"""
from __future__ import annotations

import argparse
import time

import torch

import sinkhorn_ot


@torch.no_grad()
def distributed_sinkhorn(out, epsilon=0.05, sinkhorn_iterations=3):
    """Soft codes of a B x K batch of scores: rows sum to 1, columns to B / K.

    Same contract as SwAV's function of the same name: ``out`` a B x K tensor (this
    process's rows when torch.distributed is initialised), returns a B x K tensor on the
    same device.
    """
    return sinkhorn_ot.codes(out, eps=epsilon, n_iter=sinkhorn_iterations)


@torch.no_grad()
def swav_distributed_sinkhorn(out, epsilon=0.05, sinkhorn_iterations=3):
    """SwAV's original loop (facebookresearch/swav, main_swav.py), world_size = 1."""
    Q = torch.exp(out / epsilon).t()  # Q is K-by-B for consistency with notations from our paper
    B = Q.shape[1]  # number of samples to assign
    K = Q.shape[0]  # how many prototypes

    # make the matrix sums to 1
    sum_Q = torch.sum(Q)
    Q /= sum_Q

    for it in range(sinkhorn_iterations):
        # normalize each row: total weight per prototype must be 1/K
        sum_of_rows = torch.sum(Q, dim=1, keepdim=True)
        Q /= sum_of_rows
        Q /= K

        # normalize each column: total weight per sample must be 1/B
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B

    Q *= B  # the colomns must sum to 1 so that Q is an assignment
    return Q.t()


def random_scores(B, K, device, dtype, seed=0):
    """Cosine similarities of random unit embeddings to random unit prototypes."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(B, 128, generator=gen, dtype=dtype), dim=1)
    c = torch.nn.functional.normalize(torch.randn(K, 128, generator=gen, dtype=dtype), dim=1)
    return (z @ c.t()).to(device)


def compare(B, K, device, dtype, repeats=3):
    out = random_scores(B, K, device, dtype)
    ref = swav_distributed_sinkhorn(out.clone())
    q = distributed_sinkhorn(out)
    diff = float((q - ref).abs().max())

    def timed(fn):
        best = float("inf")
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn(out)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return best

    t_ours, t_swav = timed(distributed_sinkhorn), timed(swav_distributed_sinkhorn)
    rows = float((q.sum(1) - 1).abs().max())
    print(f"{B} x {K} {str(dtype).replace('torch.', ''):8s} on {device.type}: "
          f"max |ours - SwAV| = {diff:.2e} (codes up to {float(ref.max()):.3f}), "
          f"max |row sum - 1| = {rows:.1e}; best of {repeats}: ours {1e3 * t_ours:.1f} ms, "
          f"SwAV loop {1e3 * t_swav:.1f} ms")
    return diff


def main(argv=None):
    p = argparse.ArgumentParser(description="sinkhorn_ot.codes as SwAV's distributed_sinkhorn")
    p.add_argument("--batch", type=int, default=4096, help="B (4096)")
    p.add_argument("--prototypes", type=int, default=3000, help="K (3000)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    diffs = {}
    for dtype in (torch.float64, torch.float32):
        diffs[dtype] = compare(args.batch, args.prototypes, device, dtype, args.repeats)
    return diffs


if __name__ == "__main__":
    main()
