"""Choosing the number of clusters without labels."""

from __future__ import annotations

import anndata as ad
import numpy as np


def knn_graph(pcs: np.ndarray, seed: int = 0, n_neighbors: int = 15) -> ad.AnnData:
    """scanpy's 15-NN graph on a PCA, computed exactly with sklearn: scanpy 1.11's
    pynndescent path (from 8,192 cells on) fails on scipy's csr_array."""
    import scanpy as sc

    a = ad.AnnData(X=np.zeros((pcs.shape[0], 1), dtype=np.float32))
    a.obsm["X_pca"] = pcs
    sc.pp.neighbors(
        a,
        use_rep="X_pca",
        n_neighbors=min(n_neighbors, pcs.shape[0] - 1),
        random_state=seed,
        transformer="sklearn",
    )
    return a


def leiden_labels(graph: ad.AnnData, resolution: float = 1.0, seed: int = 0) -> np.ndarray:
    """scanpy Leiden (igraph flavour) on a graph from ``knn_graph``."""
    import scanpy as sc

    sc.tl.leiden(
        graph,
        resolution=resolution,
        random_state=seed,
        key_added="_leiden",
        flavor="igraph",
        n_iterations=2,
        directed=False,
    )
    return graph.obs["_leiden"].cat.codes.to_numpy()


def estimate_n_clusters(pcs: np.ndarray, seed: int = 0, resolution: float = 1.0) -> int:
    """Number of clusters scanpy's default Leiden (resolution 1.0, 15-NN graph on the PCA)
    finds, counting only clusters of at least max(3, 0.5 % of cells) cells.

    This is what a biologist's standard pipeline would report, so CICL's K matches the
    resolution users already reason in; tiny Leiden fragments are not cell types."""
    n = pcs.shape[0]
    labels = leiden_labels(knn_graph(pcs, seed), resolution, seed)
    sizes = np.bincount(labels)
    k = int((sizes >= max(3, 0.005 * n)).sum())
    return int(min(max(k, 2), n - 1))
