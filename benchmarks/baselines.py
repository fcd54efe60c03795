"""Baselines biologists run today, on the same preprocessed input as CICL.

- K-means (k-means++, 10 restarts) on the PCA with the true K;
- scanpy Leiden at resolution 1.0 on the 15-NN graph of the PCA;
- scanpy Leiden with the resolution bisected until it gives K clusters.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import scanpy as sc
from sklearn.cluster import KMeans


def kmeans_pca(pcs: np.ndarray, k: int, seed: int) -> np.ndarray:
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(pcs)


def _graph(pcs: np.ndarray, seed: int) -> ad.AnnData:
    a = ad.AnnData(X=np.zeros((pcs.shape[0], 1), dtype=np.float32))
    a.obsm["X_pca"] = pcs
    # exact kNN via sklearn: scanpy 1.11's pynndescent path (>= 8192 cells) breaks on csr_array
    sc.pp.neighbors(a, use_rep="X_pca", n_neighbors=15, random_state=seed, transformer="sklearn")
    return a


def leiden(
    pcs: np.ndarray, seed: int, resolution: float = 1.0, graph: ad.AnnData | None = None
) -> np.ndarray:
    a = graph if graph is not None else _graph(pcs, seed)
    sc.tl.leiden(
        a,
        resolution=resolution,
        random_state=seed,
        key_added="_l",
        flavor="igraph",
        n_iterations=2,
        directed=False,
    )
    return a.obs["_l"].cat.codes.to_numpy()


def leiden_at_k(pcs: np.ndarray, k: int, seed: int, steps: int = 20) -> np.ndarray:
    """Bisect the resolution (log scale) until Leiden returns k clusters (or closest)."""
    g = _graph(pcs, seed)
    lo, hi = 0.01, 10.0
    best = None
    for _ in range(steps):
        res = float(np.sqrt(lo * hi))
        lab = leiden(pcs, seed, res, g)
        n = len(np.unique(lab))
        if best is None or abs(n - k) < abs(best[0] - k):
            best = (n, lab)
        if n == k:
            break
        if n < k:
            lo = res
        else:
            hi = res
    return best[1]
