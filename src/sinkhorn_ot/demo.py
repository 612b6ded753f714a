"""SeLa self-labelling end to end on scikit-learn's bundled ``load_digits``.

``sinkhorn-ot demo`` (or ``python -m sinkhorn_ot demo``) follows SeLa's recipe (Asano,
Rupprecht and Vedaldi, ICLR 2020), alternating two steps:

1. **Self-labelling.**  For every image the model's ``log_softmax`` is averaged over the image
   and a few randomly warped views of it, and :func:`sinkhorn_ot.balanced_assign` turns each
   head's averages into equipartitioned labels (every cluster gets N/K images), warm-started
   from the previous round's potentials.
2. **Representation learning.**  A small NumPy-only MLP (pixels -> ReLU hidden layer -> one
   linear head per clustering) is trained for a few epochs by minibatch Adam on the
   cross-entropy to those pseudo-labels, each minibatch freshly warped (small rotations,
   scalings, shears and shifts, ink and noise): the invariances the labels must not depend on.

As in SeLa the hidden layer feeds several heads, each self-labelled on its own: ``--heads``
heads of ``--clusters`` clusters (the first one is scored) and optional over-clustering heads
(``--overcluster 30``).  Nothing here ever sees the true digit labels except the metrics:
NMI, ARI and Hungarian accuracy of the first head's labels per round, then k-means on the same
pixels as a baseline, and a PNG figure.

Needs the ``demo`` extra: ``pip install "sinkhorn-ot[demo]"`` (scikit-learn, tqdm,
matplotlib).
"""
from __future__ import annotations

import argparse
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

__all__ = ["run_demo", "build_parser", "DemoResult"]

_EXTRA_HINT = 'the demo needs optional packages: pip install "sinkhorn-ot[demo]"'

def _require(module: str):
    """Import an optional dependency of the demo, or fail naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{_EXTRA_HINT} (missing: {module.split('.')[0]})") from exc


# --------------------------------------------------------------------------------------------
# Data and augmentation


def load_data():
    """Digits as (N, 8, 8) images in [0, 1] and the true digit of each (for metrics only)."""
    datasets = _require("sklearn.datasets")
    d = datasets.load_digits()
    return (d.images / 16.0).astype(np.float64), d.target.astype(np.int64)


def augment(images: np.ndarray, rng: np.random.Generator, *, rotate: float = 0.3,
            scale: float = 0.1, shear: float = 0.15, shift: float = 1.0, ink: float = 0.2,
            noise: float = 0.05) -> np.ndarray:
    """A random affine warp of each 8x8 image (rotation up to ``rotate`` radians, scaling by
    up to ``scale``, shear, shift up to ``shift`` pixels; bilinear, zero outside), its ink
    rescaled by up to ``ink`` and a little Gaussian noise."""
    n = len(images)
    th = rng.uniform(-rotate, rotate, n)
    s = 1.0 + rng.uniform(-scale, scale, n)
    sh = rng.uniform(-shear, shear, n)
    c, si = np.cos(th) / s, np.sin(th) / s
    A = np.stack([np.stack([c, -si + sh], -1), np.stack([si, c], -1)], -2)  # (n, 2, 2)
    centred = np.stack(np.meshgrid(np.arange(8) - 3.5, np.arange(8) - 3.5, indexing="ij"),
                       -1).reshape(64, 2)
    src = np.einsum("nij,pj->npi", A, centred) + 3.5 + rng.uniform(-shift, shift, (n, 1, 2))
    y0, x0 = np.floor(src[..., 0]), np.floor(src[..., 1])
    wy, wx = src[..., 0] - y0, src[..., 1] - x0
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1)))
    rows = np.arange(n)[:, None]

    def at(y, x):  # pixel (y, x) of each image, 0 outside
        return padded[rows, np.clip(y.astype(np.int64) + 1, 0, 9),
                      np.clip(x.astype(np.int64) + 1, 0, 9)]

    out = (at(y0, x0) * (1 - wy) * (1 - wx) + at(y0 + 1, x0) * wy * (1 - wx)
           + at(y0, x0 + 1) * (1 - wy) * wx + at(y0 + 1, x0 + 1) * wy * wx).reshape(n, 8, 8)
    out = out * rng.uniform(1 - ink, 1 + ink, (n, 1, 1)) + noise * rng.standard_normal(out.shape)
    return np.clip(out, 0.0, 1.2)


# --------------------------------------------------------------------------------------------
# A NumPy MLP with several softmax heads, trained by Adam


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


class MultiHeadMLP:
    """``x (64) -> ReLU(x W + c) (hidden) -> one linear head per clustering``."""

    def __init__(self, n_in: int, hidden: int, heads, rng: np.random.Generator,
                 lr: float = 3e-3):
        def dense(a, b, scale):
            return [rng.standard_normal((a, b)) * scale * np.sqrt(2.0 / a), np.zeros(b)]

        self.params = dense(n_in, hidden, 1.0)
        for k in heads:
            self.params += dense(hidden, k, 0.5)
        self.n_heads = len(heads)
        self.lr = lr
        self._m = [np.zeros_like(p) for p in self.params]
        self._v = [np.zeros_like(p) for p in self.params]
        self._t = 0

    def forward(self, x: np.ndarray):
        W, c = self.params[:2]
        h = np.maximum(x @ W + c, 0.0)
        logits = [h @ self.params[2 + 2 * j] + self.params[3 + 2 * j]
                  for j in range(self.n_heads)]
        return h, logits

    def log_probs(self, x: np.ndarray):
        """``log_softmax`` of every head: the input of the self-labelling step."""
        return [log_softmax(z) for z in self.forward(x)[1]]

    def train_step(self, x: np.ndarray, targets) -> float:
        """One Adam step on the mean cross-entropy of the heads to their pseudo-labels."""
        h, logits = self.forward(x)
        n = len(x)
        rows = np.arange(n)
        grads = [None] * len(self.params)
        dh = np.zeros_like(h)
        loss = 0.0
        for j, (z, y) in enumerate(zip(logits, targets)):
            lp = log_softmax(z)
            loss -= lp[rows, y].mean()
            dz = np.exp(lp)
            dz[rows, y] -= 1.0
            dz /= n * self.n_heads
            Wj = self.params[2 + 2 * j]
            grads[2 + 2 * j] = h.T @ dz
            grads[3 + 2 * j] = dz.sum(axis=0)
            dh += dz @ Wj.T
        dh *= h > 0
        grads[0] = x.T @ dh
        grads[1] = dh.sum(axis=0)
        self._t += 1
        b1, b2 = 0.9, 0.999
        for i, (p, g) in enumerate(zip(self.params, grads)):
            self._m[i] = b1 * self._m[i] + (1 - b1) * g
            self._v[i] = b2 * self._v[i] + (1 - b2) * g * g
            mhat = self._m[i] / (1 - b1 ** self._t)
            vhat = self._v[i] / (1 - b2 ** self._t)
            p -= self.lr * mhat / (np.sqrt(vhat) + 1e-8)
        return loss / self.n_heads


# --------------------------------------------------------------------------------------------
# Metrics


def hungarian_accuracy(y_true: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy under the best one-to-one matching of clusters to classes
    (``scipy.optimize.linear_sum_assignment`` on the contingency table)."""
    from scipy.optimize import linear_sum_assignment

    C = np.zeros((int(labels.max()) + 1, int(y_true.max()) + 1))
    np.add.at(C, (labels, y_true), 1)
    r, c = linear_sum_assignment(-C)
    return float(C[r, c].sum() / len(y_true))


def scores(y_true: np.ndarray, labels: np.ndarray) -> dict:
    metrics = _require("sklearn.metrics")
    return {"nmi": float(metrics.normalized_mutual_info_score(y_true, labels)),
            "ari": float(metrics.adjusted_rand_score(y_true, labels)),
            "acc": hungarian_accuracy(y_true, labels)}


# --------------------------------------------------------------------------------------------
# The demo


@dataclass
class DemoResult:
    """What :func:`run_demo` measured: one dict per round, the final labels, k-means' scores
    and sizes, wall and CPU seconds, and the figure's path."""

    history: list = field(default_factory=list)
    labels: np.ndarray = None
    kmeans: dict = None
    kmeans_sizes: list = None
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    figure: str = None


def _average_log_probs(model, images, rng, views):
    """Each head's ``log_softmax`` averaged over the images and ``views`` warped views."""
    n = len(images)
    total = model.log_probs(images.reshape(n, -1))
    for _ in range(views):
        for acc, lp in zip(total, model.log_probs(augment(images, rng).reshape(n, -1))):
            acc += lp
    return [acc / (views + 1) for acc in total]


def _self_label(log_probs, previous, lam, max_iter):
    """balanced_assign on every head's log-probabilities, warm-started from ``previous``."""
    import sinkhorn_ot

    results, its, secs, worst_err, all_conv = [], 0, 0.0, 0.0, True
    for logP, init in zip(log_probs, previous):
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            # A loose tolerance is enough for labels; non-convergence is reported per round
            # (the "err" column) instead of as a warning per head.
            warnings.simplefilter("ignore", UserWarning)
            # One thread: at N x K = 1797 x 10 a pass is microseconds, and OpenMP barriers
            # on a busy machine would cost more than the arithmetic.
            res = sinkhorn_ot.balanced_assign(logP, lam=lam, init=init, tol=1e-3,
                                              max_iter=max_iter, n_threads=1)
        secs += time.perf_counter() - t0
        its += res.n_iter
        worst_err = max(worst_err, res.err)
        all_conv &= bool(res.converged)
        results.append(res)
    return results, its, secs, worst_err, all_conv


def _legend(N, K, tol):
    return "\n".join([
        "columns: NMI, ARI, acc  agreement of head 1's labels with the true digits (acc: "
        "accuracy under the best",
        "                        one-to-one matching of clusters to digits; 1 is perfect)",
        f"         sizes          smallest-largest cluster of head 1 (N/K = {N / K:.1f})",
        "         SK iters, ms   Sinkhorn passes and milliseconds of balanced_assign, all "
        "heads together",
        f"         err            largest marginal violation of the heads' plans (tol {tol:g}; "
        "* not reached)",
        "         loss           training cross-entropy to the previous round's labels "
        "(- before training)"])


def run_demo(*, rounds: int = 40, clusters: int = 10, heads: int = 3, overcluster=(),
             lam: float = 25.0, views: int = 4, final_views: int = 16, epochs: int = 3,
             hidden: int = 512, batch_size: int = 128, lr: float = 3e-3, max_iter: int = 300,
             seed: int = 0, out: str | None = "sela_demo.png", progress: bool = True,
             print_every: int = 5, echo=print) -> DemoResult:
    """Run SeLa self-labelling on ``load_digits`` and compare with k-means.

    Parameters
    ----------
    rounds : int
        Self-labelling rounds; each is one ``balanced_assign`` per head followed by
        ``epochs`` epochs of training on the new pseudo-labels (none after the last).
    clusters : int
        Clusters of each main head; the first head is the one scored.
    heads : int
        Number of main heads (SeLa trains several on one representation).
    overcluster : sequence of int
        Cluster counts of extra over-clustering heads (may be empty).
    lam : float
        ``balanced_assign``'s inverse regularisation (its default, 25: with the views and
        heads above it did as well as 10 here).
    views : int
        Warped views averaged with each image for the pseudo-labels of a round.
    final_views : int
        The same for the last round, whose labels are the result.
    seed : int
        Seeds the weights, the minibatch order and the augmentation (and k-means).
    out : str or None
        Where to write the PNG figure; ``None`` for no figure.
    progress : bool
        Show the tqdm progress bar over rounds.
    print_every : int
        Print the first round, every ``print_every``-th and the last.
    echo : callable
        Where the lines go (through ``tqdm.write`` when the bar is shown).

    Returns
    -------
    DemoResult
    """
    tqdm = _require("tqdm").tqdm
    cluster_mod = _require("sklearn.cluster")
    t_start, cpu_start = time.perf_counter(), time.process_time()
    rng = np.random.default_rng(seed)
    images, y = load_data()
    N = len(images)
    X = images.reshape(N, -1)
    sizes_k = [int(clusters)] * int(heads) + [int(k) for k in overcluster]
    model = MultiHeadMLP(X.shape[1], hidden, sizes_k, rng, lr=lr)
    previous = [None] * len(sizes_k)
    tol = 1e-3

    bar = tqdm(range(rounds), desc="SeLa rounds", unit="round", disable=not progress,
               leave=False)
    say = tqdm.write if progress and echo is print else echo
    say(f"SeLa self-labelling on load_digits: N={N} images, heads K={sizes_k}, lam={lam:g}"
        f"{' (the API default)' if lam == 25 else ''}, "
        f"labels from {views} warped views + the image, {epochs} epochs/round, seed={seed}")
    say(_legend(N, clusters, tol))
    say(f"{'round':>5} {'NMI':>6} {'ARI':>6} {'acc':>6} {'sizes':>9} {'SK iters':>8} "
        f"{'ms':>6} {'err':>8}  {'loss':>6}")
    history, loss = [], None
    for r in bar:
        last = r == rounds - 1
        lps = _average_log_probs(model, images, rng, final_views if last else views)
        previous, its, secs, err, conv = _self_label(lps, previous, lam, max_iter)
        labels = np.asarray(previous[0].labels)
        sizes = np.bincount(labels, minlength=clusters)
        row = dict(round=r + 1, **scores(y, labels), sizes=sizes.tolist(), sk_iters=its,
                   sk_seconds=secs, err=err, converged=conv, loss=loss)
        history.append(row)
        if r == 0 or last or (r + 1) % max(1, print_every) == 0:
            say(f"{r + 1:>5} {row['nmi']:6.3f} {row['ari']:6.3f} {row['acc']:6.3f} "
                f"{f'{sizes.min()}-{sizes.max()}':>9} {its:>8} {1e3 * secs:6.1f} "
                f"{err:8.1e}{' ' if conv else '*'} {'-' if loss is None else f'{loss:6.3f}':>6}")
        bar.set_postfix(nmi=f"{row['nmi']:.3f}")
        if last:
            break  # the last round's labels are the result; no training after them
        targets = [np.asarray(res.labels) for res in previous]
        losses = []
        for _ in range(epochs):
            perm = rng.permutation(N)
            for s in range(0, N, batch_size):
                idx = perm[s:s + batch_size]
                xb = augment(images[idx], rng).reshape(len(idx), -1)
                losses.append(model.train_step(xb, [t[idx] for t in targets]))
        loss = float(np.mean(losses))
    bar.close()
    final = history[-1]
    say(f"final cluster sizes of head 1: {final['sizes']}")

    km = cluster_mod.KMeans(n_clusters=clusters, n_init=10, random_state=seed).fit(X)
    km_scores = scores(y, km.labels_)
    km_sizes = np.bincount(km.labels_, minlength=clusters).tolist()
    say(f"SeLa    ({rounds} rounds): NMI {final['nmi']:.3f}  ARI {final['ari']:.3f}  "
        f"acc {final['acc']:.3f}  sizes {min(final['sizes'])}-{max(final['sizes'])}")
    say(f"k-means (same pixels)  : NMI {km_scores['nmi']:.3f}  ARI {km_scores['ari']:.3f}  "
        f"acc {km_scores['acc']:.3f}  sizes {min(km_sizes)}-{max(km_sizes)}")
    result = DemoResult(history=history, labels=np.asarray(previous[0].labels),
                        kmeans=km_scores, kmeans_sizes=km_sizes)
    if out:
        result.figure = write_figure(out, history, km_scores, km_sizes, images, result.labels,
                                     y, clusters)
        say(f"figure written to {out}")
    result.seconds = time.perf_counter() - t_start
    result.cpu_seconds = time.process_time() - cpu_start
    say(f"total time {result.seconds:.1f} s ({result.cpu_seconds:.1f} s of CPU)")
    return result


def _mosaic(images, labels, y, clusters, per_cluster, gap=1):
    """Thumbnails of the first images of each cluster, one row per cluster (rows ordered by
    the cluster's majority digit), on a white background; also each row's label."""
    order = sorted(range(clusters), key=lambda k: (np.bincount(y[labels == k],
                                                               minlength=10).argmax(), k))
    h = w = images.shape[1]
    canvas = np.full((clusters * (h + gap) - gap, per_cluster * (w + gap) - gap), np.nan)
    names = []
    for row, k in enumerate(order):
        members = np.flatnonzero(labels == k)
        for j, i in enumerate(members[:per_cluster]):
            canvas[row * (h + gap):row * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = \
                images[i]
        counts = np.bincount(y[members], minlength=10)
        share = counts.max() / max(1, len(members))
        names.append(f"cluster {k}: {share:.0%} are {counts.argmax()}s")
    return canvas, names, [row * (h + gap) + (h - 1) / 2 for row in range(clusters)]


def write_figure(path, history, km_scores, km_sizes, images, labels, y, clusters,
                 per_cluster=12):
    """Metrics per round (k-means dashed), final cluster sizes against N/K for SeLa and
    k-means, and the first images of each cluster."""
    mpl = _require("matplotlib")
    mpl.use("Agg")
    plt = _require("matplotlib.pyplot")
    fig = plt.figure(figsize=(13, 6.5))
    grid = fig.add_gridspec(2, 2, width_ratios=[1, 1.1])
    ax = fig.add_subplot(grid[0, 0])
    rounds = [h["round"] for h in history]
    for key, color in (("nmi", "C0"), ("ari", "C1"), ("acc", "C2")):
        ax.plot(rounds, [h[key] for h in history], "o-", ms=3, color=color,
                label=f"SeLa {key.upper()}")
        ax.axhline(km_scores[key], ls="--", color=color, lw=1,
                   label=f"k-means {key.upper()}")
    ax.xaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("self-labelling round")
    ax.set_ylabel("score against the true digits")
    ax.set_ylim(0, 1)
    ax.set_title("clustering quality (head 1)")
    ax.legend(fontsize=7, ncol=2, loc="lower right")

    ax = fig.add_subplot(grid[1, 0])
    target = len(labels) / clusters
    sela = np.sort(np.asarray(history[-1]["sizes"], dtype=float))[::-1]
    kmeans = np.sort(np.asarray(km_sizes, dtype=float))[::-1]
    x = np.arange(clusters)
    ax.bar(x - 0.2, sela - target, width=0.4, color="C0", label="SeLa (balanced_assign)")
    ax.bar(x + 0.2, kmeans - target, width=0.4, color="C7", label="k-means")
    ax.axhline(0, color="k", lw=0.8)
    ax.text(0.02, 0.05, f"SeLa: {sela.min():.0f} to {sela.max():.0f} images per cluster\n"
            f"k-means: {kmeans.min():.0f} to {kmeans.max():.0f}", transform=ax.transAxes,
            fontsize=8, va="bottom")
    ax.set_xticks(x)
    ax.set_xlabel("clusters, largest first")
    ax.set_ylabel(f"images minus N/K = {target:.1f}")
    ax.set_title("final cluster sizes as deviation from equal sizes")
    ax.legend(fontsize=7)

    ax = fig.add_subplot(grid[:, 1])
    canvas, names, centres = _mosaic(images, labels, y, clusters, per_cluster)
    cmap = mpl.colormaps["gray_r"].with_extremes(bad="white")
    ax.imshow(canvas, cmap=cmap, vmin=0, vmax=1, aspect="equal", interpolation="nearest")
    ax.set_yticks(centres, names, fontsize=8)
    ax.set_xticks([])
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    ax.tick_params(left=False)
    ax.set_title(f"first {per_cluster} images of each SeLa cluster (head 1), with the share "
                 "of its\nmost frequent true digit (never seen by the model)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="sinkhorn-ot demo")
    p.description = ("SeLa self-labelling on scikit-learn's load_digits with "
                     "balanced_assign, against a k-means baseline.")
    p.add_argument("--rounds", type=int, default=40, help="self-labelling rounds (40)")
    p.add_argument("--clusters", type=int, default=10, help="clusters of each main head (10)")
    p.add_argument("--heads", type=int, default=3, help="main heads; the first is scored (3)")
    p.add_argument("--overcluster", type=int, nargs="*", default=[], metavar="K",
                   help="cluster counts of extra over-clustering heads (none)")
    p.add_argument("--lam", type=float, default=25.0,
                   help="balanced_assign lam (25, its default)")
    p.add_argument("--views", type=int, default=4,
                   help="warped views averaged per image for the pseudo-labels (4)")
    p.add_argument("--epochs", type=int, default=3, help="training epochs per round (3)")
    p.add_argument("--hidden", type=int, default=512, help="hidden units (512)")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument("--out", default="sela_demo.png", help="PNG figure path (sela_demo.png)")
    p.add_argument("--no-figure", action="store_true", help="do not write the figure")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(args: argparse.Namespace) -> int:
    for name in ("rounds", "clusters", "heads", "epochs", "hidden"):
        if getattr(args, name) < 1:
            raise SystemExit(f"sinkhorn-ot demo: --{name} must be at least 1")
    if args.views < 0:
        raise SystemExit("sinkhorn-ot demo: --views must be at least 0")
    try:
        run_demo(rounds=args.rounds, clusters=args.clusters, heads=args.heads,
                 overcluster=args.overcluster, lam=args.lam, views=args.views,
                 epochs=args.epochs, hidden=args.hidden, seed=args.seed,
                 out=None if args.no_figure else args.out, progress=not args.no_progress)
    except ImportError as exc:
        if _EXTRA_HINT in str(exc):
            print(f"sinkhorn-ot demo: {exc}")
            return 2
        raise
    return 0
