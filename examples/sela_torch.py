"""SeLa self-labelling in PyTorch on scikit-learn's ``load_digits``, the way deep clustering
codebases write it: a model, an optimiser, and once per epoch a self-labelling step that hands
the network's ``log_softmax`` (a PyTorch tensor, CPU or CUDA) to
:func:`sinkhorn_ot.balanced_assign` through DLPack, warm-started from the previous epoch.

    python examples/sela_torch.py --epochs 30

Runs on the GPU when ``torch.cuda.is_available()`` (the CUDA path needs
``pip install "sinkhorn-ot[cuda]"``), otherwise on the CPU; nothing else changes.
Needs torch and scikit-learn.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import sinkhorn_ot


def load_digits_tensor(device):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32, device=device).unsqueeze(1)
    return x, d.target  # the true digits stay on the host, for the metrics only


class Net(nn.Module):
    """A small CNN trunk with one linear head per clustering (SeLa's multi-head trick)."""

    def __init__(self, heads=(10, 30), width=64):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(1, width // 2, 3, padding=1), nn.BatchNorm2d(width // 2), nn.ReLU(),
            nn.Conv2d(width // 2, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(width * 16, 128), nn.BatchNorm1d(128), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(128, k) for k in heads)

    def forward(self, x):
        h = self.trunk(x)
        return [head(h) for head in self.heads]


def augment(x, generator):
    """Shift each image by up to one pixel each way and rescale its ink."""
    n = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1))
    dy = torch.randint(0, 3, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 3, (n,), generator=generator).to(x.device)
    r = torch.arange(8, device=x.device)
    rows = (dy[:, None] + r)[:, :, None].expand(n, 8, 8)
    cols = (dx[:, None] + r)[:, None, :].expand(n, 8, 8)
    out = padded[torch.arange(n, device=x.device)[:, None, None], 0, rows, cols].unsqueeze(1)
    scale = 0.8 + 0.4 * torch.rand(n, 1, 1, 1, generator=generator).to(x.device)
    return out * scale


@torch.no_grad()
def self_label(model, x, previous, lam, batch=1024):
    """One balanced_assign per head on the model's log_softmax over the whole data set."""
    model.eval()
    outs = [model(x[i:i + batch]) for i in range(0, len(x), batch)]
    results = []
    for j, init in enumerate(previous):
        logP = F.log_softmax(torch.cat([o[j] for o in outs]), dim=1).contiguous()
        # A torch tensor in, torch tensors out (same device); init = the previous result.
        results.append(sinkhorn_ot.balanced_assign(logP, lam=lam, init=init, tol=1e-3,
                                                   max_iter=500))
    model.train()
    return results


def metrics(y, labels):
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    return normalized_mutual_info_score(y, labels), adjusted_rand_score(y, labels)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lam", type=float, default=25.0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x, y = load_digits_tensor(device)
    model = Net().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    print(f"device {device}, N = {len(x)}, heads {[h.out_features for h in model.heads]}")

    results = [None] * len(model.heads)
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        results = self_label(model, x, results, args.lam)
        t_sk = time.perf_counter() - t0
        labels = [r.labels for r in results]           # int64 tensors on `device`
        nmi, ari = metrics(y, labels[0].cpu().numpy())
        sizes = results[0].sizes
        print(f"epoch {epoch:3d}  NMI {nmi:.3f}  ARI {ari:.3f}  sizes {int(sizes.min())}-"
              f"{int(sizes.max())}  Sinkhorn {[r.n_iter for r in results]} iters "
              f"{1e3 * t_sk:.0f} ms", end="", flush=True)
        perm = torch.randperm(len(x), generator=gen).to(device)
        total = 0.0
        for s in range(0, len(x), args.batch_size):
            idx = perm[s:s + args.batch_size]
            outs = model(augment(x[idx], gen))
            loss = sum(F.cross_entropy(o, lab[idx]) for o, lab in zip(outs, labels))
            loss = loss / len(outs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        print(f"  loss {total / len(x):.3f}")
    return nmi


if __name__ == "__main__":
    main()
