"""``cicl simulate``: a realistic synthetic atlas of any size, fitted to a real dataset.

Model (per-cluster negative binomial, as used by splatter-like simulators): for each cluster c
and gene g the relative expression p_cg (cluster mean of library-normalised counts), one
dispersion phi_g per gene (method of moments over cells, clusters pooled), and log-normal
library sizes per cluster. A cell of cluster c with library L gets counts
``Poisson(Gamma(shape=1/phi_g, scale=phi_g * L * p_cg))``. Cells are generated and appended in
chunks to a CSR ``.h5ad``, so the atlas never has to fit in memory; ``obs["cell_type"]`` keeps
the true cluster, and rows come out in random order (contiguous row ranges are fair shards).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cicl.data.io import atomic_path
from cicl.data.preprocess import detect_values
from cicl.errors import InputError


@dataclass
class NBModel:
    genes: np.ndarray  # names (G,)
    types: np.ndarray  # cluster names (C,)
    weights: np.ndarray  # cluster proportions (C,)
    profile: np.ndarray  # relative expression (C, G), rows sum to 1
    dispersion: np.ndarray  # (G,)
    log_lib: np.ndarray  # (C, 2) mean and sd of log library size


def _as_counts(adata: ad.AnnData) -> sp.csr_matrix:
    X = sp.csr_matrix(adata.X, dtype=np.float64)
    kind = detect_values(X)
    if kind == "scaled":
        raise InputError("--like needs counts or log/unlogged expression, not scaled values.")
    if kind == "log":
        X = X.expm1()
    if kind != "counts":
        X.data = np.round(X.data)
        X.eliminate_zeros()
    return X


def fit_nb(adata: ad.AnnData, label_key: str, n_genes: int | None = None) -> NBModel:
    """Fit the per-cluster NB model to ``adata`` grouped by ``obs[label_key]``."""
    if label_key not in adata.obs:
        raise InputError(f"--label-key '{label_key}' is not an obs column of the --like data.")
    X = _as_counts(adata)
    lib = np.asarray(X.sum(1)).ravel()
    ok = lib > 0
    X, lib = X[ok], lib[ok]
    lab = pd.Categorical(adata.obs[label_key].to_numpy()[ok])
    codes, types = lab.codes, np.asarray(lab.categories).astype(str)
    norm = sp.diags(1.0 / lib) @ X  # relative expression per cell
    onehot = sp.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))))
    counts = np.bincount(codes, minlength=len(types)).astype(float)
    profile = np.asarray((onehot @ norm).todense()) / counts[:, None]
    # dispersion: Var = mu + phi mu^2 around each cell's expected count
    mu = profile[codes] * lib[:, None]
    resid2 = (
        np.asarray((X.multiply(X)).sum(0)).ravel()
        - 2 * np.asarray(X.multiply(mu).sum(0)).ravel()
        + (mu * mu).sum(0)
    )
    m1, m2 = mu.sum(0), (mu * mu).sum(0)
    phi = np.clip((resid2 - m1) / np.maximum(m2, 1e-12), 0.01, 10.0)
    keep = np.arange(X.shape[1])
    if n_genes is not None and n_genes < X.shape[1]:  # the most variable genes across clusters
        score = profile.std(0) / np.maximum(profile.mean(0), 1e-12) * (profile.mean(0) > 0)
        keep = np.sort(np.argsort(-score)[:n_genes])
    prof = profile[:, keep]
    prof = prof / np.maximum(prof.sum(1, keepdims=True), 1e-12)
    ll = np.log(lib)
    log_lib = np.array(
        [
            [ll[codes == c].mean(), ll[codes == c].std() if (codes == c).sum() > 1 else 0.3]
            for c in range(len(types))
        ]
    )
    return NBModel(
        genes=np.asarray(adata.var_names)[keep].astype(str),
        types=types,
        weights=counts / counts.sum(),
        profile=prof,
        dispersion=phi[keep],
        log_lib=log_lib,
    )


def sample_cells(
    model: NBModel, n: int, rng: np.random.Generator
) -> tuple[sp.csr_matrix, np.ndarray]:
    """``n`` cells from the model: CSR counts (float32) and cluster codes."""
    y = rng.choice(len(model.types), size=n, p=model.weights)
    lib = np.exp(rng.normal(model.log_lib[y, 0], model.log_lib[y, 1]))
    mu = model.profile[y] * lib[:, None]
    shape = 1.0 / model.dispersion
    lam = rng.gamma(shape[None, :], mu / shape[None, :])
    counts = rng.poisson(lam).astype(np.float32)
    return sp.csr_matrix(counts), y


def simulate(
    like: str | Path,
    n_cells: int,
    out: str | Path,
    *,
    label_key: str = "cell_type",
    n_genes: int | None = 2000,
    seed: int = 0,
    chunk: int = 20_000,
    progress: bool = False,
) -> Path:
    """Write an ``n_cells`` synthetic atlas like ``like`` to ``out`` (.h5ad, CSR counts),
    chunk by chunk, through a temporary file renamed at the end."""
    out = Path(out)
    src = ad.read_h5ad(like)
    model = fit_nb(src, label_key, n_genes)
    rng = np.random.default_rng(seed)
    codes: list[np.ndarray] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_cells, desc="simulating", unit="cell")
    try:
        with atomic_path(out) as tmp:
            done = 0
            while done < n_cells:
                m = min(chunk, n_cells - done)
                X, y = sample_cells(model, m, rng)
                codes.append(y)
                if done == 0:
                    first = ad.AnnData(X=X, var=pd.DataFrame(index=model.genes))
                    first.write_h5ad(tmp)
                else:
                    with h5py.File(tmp, "a") as f:
                        ad.io.sparse_dataset(f["X"]).append(X)
                done += m
                if bar is not None:
                    bar.update(m)
            y = np.concatenate(codes)
            obs = pd.DataFrame(
                {"cell_type": pd.Categorical.from_codes(y, categories=list(model.types))},
                index=[f"sim{i}" for i in range(n_cells)],
            )
            with h5py.File(tmp, "a") as f:
                del f["obs"]
                ad.io.write_elem(f, "obs", obs)
                f["uns"].attrs["encoding-type"] = "dict"
                ad.io.write_elem(
                    f["uns"],
                    "simulate",
                    {"like": str(like), "seed": seed, "model": "per-cluster negative binomial"},
                )
    finally:
        if bar is not None:
            bar.close()
    return out
