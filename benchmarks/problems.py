"""The standard problems of ANCHORS.md, built deterministically (no download)."""
from __future__ import annotations

import numpy as np


def log_softmax(z, axis=1):
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def random_problem(N, K, seed=0, dtype=np.float64):
    """random(N, K): log_softmax of 3 * standard normal logits (lam = 25 in ANCHORS.md)."""
    rng = np.random.default_rng(seed)
    out = np.empty((N, K), dtype=dtype)
    step = max(1, (1 << 22) // K)  # in blocks, so large problems need no float64 copy
    for lo in range(0, N, step):
        n = min(step, N - lo)
        out[lo:lo + n] = log_softmax(3.0 * rng.standard_normal((n, K)))
    return out


def peaked_problem(K=10, seed=0, epochs=300):
    """peaked: log-probabilities of an MLP trained on scikit-learn's digits until confident.

    K = 10 uses the digit classes; K > 10 trains on an over-clustering of the digits
    (k-means labels with K clusters), as deep-clustering heads do.
    """
    from sklearn.cluster import KMeans
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    if K != 10:
        y = KMeans(K, n_init=1, random_state=seed).fit_predict(X)
    clf = MLPClassifier(hidden_layer_sizes=(128,), max_iter=epochs, alpha=0.0, tol=0.0,
                        n_iter_no_change=epochs, random_state=seed)
    clf.fit(X, y)
    with np.errstate(divide="ignore"):
        logP = np.log(np.clip(clf.predict_proba(X), 1e-300, None))
    return logP
