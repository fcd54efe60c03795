"""A small seeded synthetic count dataset with planted clusters (for tests and demos)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp


def synthetic_adata(
    n_cells: int = 300,
    n_genes: int = 200,
    n_clusters: int = 3,
    seed: int = 0,
    sizes: list[float] | None = None,
) -> ad.AnnData:
    """Negative-binomial-like counts: each cluster up-regulates its own block of genes.
    ``obs["cell_type"]`` holds the planted labels."""
    rng = np.random.default_rng(seed)
    p = np.asarray(sizes or [1.0] * n_clusters, dtype=float)
    y = rng.choice(n_clusters, size=n_cells, p=p / p.sum())
    base = rng.gamma(2.0, 0.5, size=n_genes)
    mu = np.tile(base, (n_clusters, 1))
    block = n_genes // (2 * n_clusters)
    for c in range(n_clusters):
        mu[c, c * block : (c + 1) * block] *= 6.0
    lib = rng.lognormal(0.0, 0.3, size=n_cells)[:, None]
    lam = rng.gamma(5.0, mu[y] * lib / 5.0)  # gamma-Poisson = negative binomial
    X = sp.csr_matrix(rng.poisson(lam).astype(np.float32))
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical([f"type{c}" for c in y])},
        index=[f"cell{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"gene{i}" for i in range(n_genes)])
    return ad.AnnData(X=X, obs=obs, var=var)
