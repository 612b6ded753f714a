"""Re-implementations of the Sinkhorn step of deep-clustering codebases, for tests/test_codes.py
and benchmarks/bench_codes.py.

Each function is written here from the public code's behaviour (the order of its
normalisations, its all-reduces, its scalars, its dtype handling), not copied, so that the
mapping of docs/migration.rst can be checked against what each codebase computes:

- SwAV ``distributed_sinkhorn`` (main_swav.py), DINOv2 ``SinkhornKnopp``'s
  ``sinkhorn_knopp_teacher`` (the DINO head) and iBOT's (``iBOTPatchLoss``, whose sample count
  is the all-reduced number of masked patches), MSN ``distributed_sinkhorn`` (probabilities
  in), solo-learn ``SinkhornKnopp``, lightly ``swav_loss.sinkhorn`` and ``msn_loss.sinkhorn``:
  ``iters`` alternations of a prototype (column of the B x K scores) and a sample (row)
  normalisation of the K x B kernel, after a normalisation of its total, all-reducing the
  sums that span samples when torch.distributed is initialised;
- SeLa ``optimize_L_sk`` (NumPy, ``P ** lamb``, the dtype of the run) and SeLaVi
  ``optimize_L_sk_gpu`` (torch float64, ``P ** (lamb / 2)`` of the product of two modalities'
  probabilities, a prior on the cluster sizes): matrix-vector scalings until the summed
  relative change of the sample scaling, checked every 10 iterations, is below a threshold.

``max_count`` (SeLa, SeLaVi) caps the iterations, as SeLaVi's 2000; tests use it to run a
fixed number.  Nothing here imports sinkhorn_ot.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


def _world(enabled=True):
    if enabled and dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _allreduce(t, world):
    if world > 1:
        dist.all_reduce(t)
    return t


def _alternate(Q, iters, world, B, divide_by_k=True):
    """The shared loop on the K x B kernel ``Q`` (in place): total to 1, then ``iters``
    times prototypes to 1/K (sums over samples: all-reduced) and samples to 1/B."""
    K = Q.shape[0]
    Q /= _allreduce(Q.sum(), world)
    for _ in range(iters):
        Q /= _allreduce(Q.sum(dim=1, keepdim=True), world)
        if divide_by_k:
            Q /= K
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


@torch.no_grad()
def swav(out, epsilon=0.05, sinkhorn_iterations=3):
    """SwAV ``distributed_sinkhorn``: B is the global batch (local columns x world)."""
    world = _world()
    Q = torch.exp(out / epsilon).t()
    return _alternate(Q, sinkhorn_iterations, world, Q.shape[1] * world)


@torch.no_grad()
def dinov2(teacher_output, teacher_temp, n_iterations=3):
    """DINOv2 ``sinkhorn_knopp_teacher`` of the DINO head: computed in float32."""
    teacher_output = teacher_output.float()
    world = _world()
    Q = torch.exp(teacher_output / teacher_temp).t()
    return _alternate(Q, n_iterations, world, Q.shape[1] * world)


@torch.no_grad()
def ibot(teacher_output, teacher_temp, n_masked_patches_tensor, n_iterations=3):
    """DINOv2 ``iBOTPatchLoss.sinkhorn_knopp_teacher``: the masked patch tokens of this
    process; B is the all-reduced count of masked patches."""
    teacher_output = teacher_output.float()
    world = _world()
    Q = torch.exp(teacher_output / teacher_temp).t()
    B = _allreduce(n_masked_patches_tensor.clone(), world)
    return _alternate(Q, n_iterations, world, B)


@torch.no_grad()
def msn(Q, num_itr=3, use_dist=True, inplace=False):
    """MSN ``distributed_sinkhorn``: the (sharpened) probabilities are the kernel.  The
    original normalises the caller's tensor in place (``inplace=True``); by default a copy."""
    world = _world(use_dist)
    Q = Q.t() if inplace else Q.t().clone()
    return _alternate(Q, num_itr, world, Q.shape[1] * world)


class SoloSinkhornKnopp:
    """solo-learn ``SinkhornKnopp(num_iters, epsilon, world_size)``, called on the scores."""

    def __init__(self, num_iters=3, epsilon=0.05, world_size=1):
        self.num_iters, self.epsilon, self.world_size = num_iters, epsilon, world_size

    @torch.no_grad()
    def __call__(self, Q):
        Q = torch.exp(Q / self.epsilon).t()
        world = _world()
        return _alternate(Q, self.num_iters, world, Q.shape[1] * self.world_size)


@torch.no_grad()
def lightly_swav(out, iterations=3, epsilon=0.05, gather_distributed=False):
    """lightly ``swav_loss.sinkhorn``: prototypes normalised without the 1/K factor."""
    world = _world(gather_distributed)
    Q = torch.exp(out / epsilon).t()
    return _alternate(Q, iterations, world, Q.shape[1] * world, divide_by_k=False)


@torch.no_grad()
def lightly_msn(probabilities, iterations=3, gather_distributed=False):
    """lightly ``msn_loss.sinkhorn``: the local number of targets as B."""
    world = _world(gather_distributed)
    Q = probabilities.t()
    Q = Q / _allreduce(Q.sum(), world)
    return _alternate(Q, iterations, world, Q.shape[1])


def sela(PS, lamb, dtype=np.float64, threshold=1e-1, max_count=None):
    """SeLa ``optimize_L_sk`` on probabilities ``PS`` (N x K, NumPy) in ``dtype``.

    Returns ``(plan, labels, count)``: the scaled ``P ** lamb`` (N x K, rows summing to 1/N)
    and its row argmax."""
    P = np.array(PS, dtype=dtype).T          # K x N, as SeLa keeps it
    K, N = P.shape
    r = np.ones((K, 1), dtype=dtype) / K
    c = np.ones((N, 1), dtype=dtype) / N
    P **= lamb
    inv_K, inv_N = dtype(1.0 / K), dtype(1.0 / N)
    err, count = 1e6, 0
    while err > threshold and (max_count is None or count < max_count):
        r = inv_K / (P @ c)
        c_new = inv_N / (r.T @ P).T
        if count % 10 == 0:
            err = np.nansum(np.abs(c / c_new - 1))
        c = c_new
        count += 1
    P *= np.squeeze(c)
    P = P.T
    P *= np.squeeze(r)
    return P, np.nanargmax(P, 1), count


@torch.no_grad()
def selavi_prior(PS, K_dist):
    """SeLaVi's cluster proportions ``r`` for its sizes ``K_dist`` (K,): the sizes sorted onto
    the clusters in the order of their total probability, then ``r = 1 / K_dist`` summing
    to 1 (the ``args.distribution != 'default'`` branch)."""
    K_dist = K_dist.to(torch.float64).reshape(-1, 1).clone()
    K_dist[torch.argsort(PS.sum(0))] = torch.sort(K_dist, dim=0)[0]
    r = 1.0 / K_dist
    return (r / r.sum()).reshape(-1)


@torch.no_grad()
def selavi(PS, lamb, r=None, threshold=1e-1, max_count=2000):
    """SeLaVi ``optimize_L_sk_gpu`` on ``PS`` (N x K torch float64, the product of the video
    and audio probabilities), with cluster proportions ``r`` (K,; :func:`selavi_prior`),
    uniform by default.  Returns ``(plan, labels, count)`` like :func:`sela`."""
    N, K = PS.shape
    P = PS.clone().pow_(0.5 * lamb)
    r = torch.full((K, 1), 1.0 / K, dtype=torch.float64) if r is None else \
        r.reshape(K, 1).to(torch.float64)
    beta = torch.ones((N, 1), dtype=torch.float64) / N
    c = 1.0 / N
    ones = torch.ones(N, dtype=torch.float64)
    err, count = 1e6, 0
    while err > threshold and count < max_count:
        alpha = r / (beta.t() @ P).t()
        beta_new = c / (P @ alpha)
        if count % 10 == 0:
            err = float(torch.sum(torch.abs(beta.squeeze() / beta_new.squeeze() - ones)))
        beta = beta_new
        count += 1
    P *= beta
    P *= alpha.t()
    return P, torch.argmax(P, 1), count


# --------------------------------------------------------------------------- inputs
def cosine_scores(B, K, seed=0, dim=32, dtype=torch.float64):
    """SwAV-style scores: cosine similarities of unit embeddings to unit prototypes."""
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(B, dim, generator=g, dtype=torch.float64), dim=1)
    c = torch.nn.functional.normalize(torch.randn(K, dim, generator=g, dtype=torch.float64), dim=1)
    return (z @ c.t()).to(dtype)


def teacher_logits(B, K, seed=0, scale=0.5, dtype=torch.float64):
    """DINOv2-style teacher head outputs (moderate logits: ``exp(x / 0.07)`` stays finite in
    float32, as the original loop needs)."""
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(B, K, generator=g, dtype=torch.float64)).to(dtype)


def msn_targets(B, K, seed=0, temperature=0.1, sharpen=0.25, dtype=torch.float64):
    """MSN / lightly MSNLoss targets: softmax of cosine similarities / temperature, sharpened
    (``p ** (1 / T)`` renormalised), the input of their sinkhorn."""
    p = torch.softmax(cosine_scores(B, K, seed) / temperature, dim=1) ** (1.0 / sharpen)
    return (p / p.sum(dim=1, keepdim=True)).to(dtype)


def softmax_probs(N, K, seed=0, scale=1.0, dtype=torch.float64):
    """SeLa / SeLaVi network outputs: row softmax of random logits."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(scale * torch.randn(N, K, generator=g, dtype=torch.float64),
                         dim=1).to(dtype)
