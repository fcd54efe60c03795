"""Choosing the number of clusters without labels."""

from __future__ import annotations

import anndata as ad
import numpy as np


def estimate_n_clusters(pcs: np.ndarray, seed: int = 0, resolution: float = 1.0) -> int:
    """Number of clusters scanpy's default Leiden (resolution 1.0, 15-NN graph on the PCA)
    finds, counting only clusters of at least max(3, 0.5 % of cells) cells.

    This is what a biologist's standard pipeline would report, so CICL's K matches the
    resolution users already reason in; tiny Leiden fragments are not cell types."""
    import scanpy as sc

    n = pcs.shape[0]
    a = ad.AnnData(X=np.zeros((n, 1), dtype=np.float32))
    a.obsm["X_pca"] = pcs
    # exact kNN via sklearn: scanpy 1.11's pynndescent path (>= 8192 cells) fails on csr_array
    sc.pp.neighbors(
        a, use_rep="X_pca", n_neighbors=min(15, n - 1), random_state=seed, transformer="sklearn"
    )
    sc.tl.leiden(
        a,
        resolution=resolution,
        random_state=seed,
        key_added="_k",
        flavor="igraph",
        n_iterations=2,
        directed=False,
    )
    sizes = a.obs["_k"].value_counts().to_numpy()
    k = int((sizes >= max(3, 0.005 * n)).sum())
    return int(min(max(k, 2), n - 1))
