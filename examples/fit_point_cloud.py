"""Fit a point cloud to another by gradient descent on the Sinkhorn divergence.

The source points ``x`` (a Gaussian blob) are the parameters; the loss is the debiased
Sinkhorn divergence ``S(x, y)`` to a fixed target ``y`` (two crescents) with the cost
``|x - y|^2 / 2``, computed by :func:`sinkhorn_ot.torch.sinkhorn_divergence`.  Each step
solves three transport problems (x-y, x-x, y-y) and backpropagates through them by the
envelope theorem, without unrolling.  With uniform weights ``1/n``, the gradient of ``S``
in ``x_i`` is ``(x_i - T(x_i)) / n`` minus the self-transport's term, so a step of ``n *
lr`` moves every point a fraction ``lr`` of the way to its transport target.

    python examples/fit_point_cloud.py                       # CPU (or CUDA when present)
    python examples/fit_point_cloud.py --out docs/_static/fit_point_cloud.png
"""
from __future__ import annotations

import argparse
import math
import time

import torch

import sinkhorn_ot.torch as ot_torch


def crescents(n, generator, dtype):
    """Two interleaved half circles with a little noise (n points)."""
    t = torch.rand(n, generator=generator, dtype=dtype) * math.pi
    upper = torch.arange(n) % 2 == 0
    xy = torch.stack([torch.cos(t), torch.sin(t)], 1)
    xy[~upper] = torch.stack([1 - torch.cos(t[~upper]), 0.5 - torch.sin(t[~upper])], 1)
    return xy + 0.05 * torch.randn(n, 2, generator=generator, dtype=dtype)


def cost(p, q):
    # squared distances by broadcasting: torch.cdist has no gradient at a zero distance,
    # which the self-transport costs C(x, x) have on their diagonals
    return ((p[:, None, :] - q[None, :, :]) ** 2).sum(-1) / 2


def fit(n=400, m=400, steps=40, lr=0.5, reg=0.01, device="cpu", dtype=torch.float32,
        seed=0, keep=()):
    """Run the descent; returns (losses, {step: points}) for the steps in ``keep``."""
    g = torch.Generator().manual_seed(seed)
    y = crescents(m, g, dtype).to(device)
    x = (0.25 * torch.randn(n, 2, generator=g, dtype=dtype) + torch.tensor([-1.0, 1.2],
                                                                         dtype=dtype))
    x = x.to(device).requires_grad_(True)
    C_yy = cost(y, y)  # constant: computed once
    losses, snaps = [], {}
    for step in range(steps + 1):
        if step in keep:
            snaps[step] = x.detach().cpu().clone()
        loss = ot_torch.sinkhorn_divergence(cost(x, y), cost(x, x), C_yy, reg=reg)
        losses.append(loss.item())
        if step == steps:
            break
        (x_grad,) = torch.autograd.grad(loss, [x])
        with torch.no_grad():
            x -= lr * n * x_grad
    return losses, snaps, y.cpu()


def figure(losses, snaps, y, path, reg):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(snaps)
    fig, axes = plt.subplots(1, len(steps) + 1, figsize=(3.0 * (len(steps) + 1), 3.0))
    for ax, s in zip(axes, steps):
        ax.scatter(y[:, 0], y[:, 1], s=4, c="0.75", label="target y")
        ax.scatter(snaps[s][:, 0], snaps[s][:, 1], s=4, c="C0", label="x")
        ax.set_title(f"step {s}: S = {losses[s]:.2e}", fontsize=9)
        ax.set_xlim(-1.8, 2.4)
        ax.set_ylim(-1.0, 2.2)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].legend(loc="lower left", fontsize=7, markerscale=2)
    ax = axes[-1]
    ax.semilogy(losses, c="C0")
    ax.set_xlabel("gradient step", fontsize=8)
    ax.set_title(f"divergence, reg = {reg:g}", fontsize=9)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=400, help="points in each cloud")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--reg", type=float, default=0.01, help="entropic regularisation (blur^2)")
    p.add_argument("--out", help="write the figure to this PNG file")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    keep = sorted({0, min(3, args.steps), min(10, args.steps), args.steps})
    t0 = time.perf_counter()
    losses, snaps, y = fit(args.n, args.n, args.steps, args.lr, args.reg, device, keep=keep)
    dt = time.perf_counter() - t0
    for s in keep:
        print(f"step {s:3d}: divergence {losses[s]:.3e}")
    print(f"{args.steps} steps in {dt:.2f} s on {device}")
    if args.out:
        figure(losses, snaps, y, args.out, args.reg)
        print(f"figure written to {args.out}")
    return losses


if __name__ == "__main__":
    main()
