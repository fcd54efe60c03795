"""Baselines biologists run today, on the same preprocessed input as CICL.

- K-means (k-means++, 10 restarts) on the PCA with the true K;
- scanpy Leiden at resolution 1.0 on the 15-NN graph of the PCA;
- scanpy Leiden with the resolution bisected until it gives K clusters.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans

from cicl.data.estimate import knn_graph, leiden_labels


def kmeans_pca(pcs: np.ndarray, k: int, seed: int) -> np.ndarray:
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(pcs)


def leiden(pcs: np.ndarray, seed: int, resolution: float = 1.0) -> np.ndarray:
    return leiden_labels(knn_graph(pcs, seed), resolution, seed)


def leiden_at_k(pcs: np.ndarray, k: int, seed: int, steps: int = 20) -> np.ndarray:
    """Bisect the resolution (log scale) until Leiden returns k clusters (or the closest)."""
    g = knn_graph(pcs, seed)
    lo, hi = 0.01, 10.0
    best: tuple[int, np.ndarray] | None = None
    for _ in range(steps):
        res = float(np.sqrt(lo * hi))
        lab = leiden_labels(g, res, seed)
        n = len(np.unique(lab))
        if best is None or abs(n - k) < abs(best[0] - k):
            best = (n, lab)
        if n == k:
            break
        if n < k:
            lo = res
        else:
            hi = res
    assert best is not None
    return best[1]
