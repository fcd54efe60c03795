"""Reading an atlas in shards straight from its ``.h5ad`` (layout choice: backed h5ad).

Why backed h5ad and not Parquet through Ray Data: it is the file users already have (no
conversion pass, no second copy of a 50 M-cell atlas); anndata reads any row range of a CSR
``X`` cheaply; ownership of cells by ranks is fixed (contiguous row ranges), which pseudo-labels
keyed by cell need and Ray Data's ``streaming_split`` does not promise; and a K-means round must
pass over the shard several times per epoch, which is a plain re-read here. Multi-node runs need
the file on shared storage (EFS/NFS/FSx, or an S3 mount).

Preprocessing is fitted once on a random sample of cells with the same scanpy pipeline as the
in-memory path (``preprocess``), then applied per block: library normalisation and log1p are
per cell, HVG selection, scaling and PCA projection use the sample's genes, means, SDs and
loadings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import scipy.sparse as sp

from cicl.config import PreprocessConfig
from cicl.data.preprocess import Prepared, detect_values, preprocess
from cicl.errors import InputError


@dataclass
class BlockTransform:
    """Preprocessing fitted on a sample, applied to any block of raw rows."""

    kind: str
    gene_idx: np.ndarray  # columns of the file's X used, in model order
    scale_mean: np.ndarray | None
    scale_sd: np.ndarray | None
    max_value: float
    pca_mean: np.ndarray
    pca_components: np.ndarray  # (genes used, n_pcs)

    def __call__(self, X) -> tuple[np.ndarray, np.ndarray]:
        X = sp.csr_matrix(X, dtype=np.float32)
        if self.kind == "counts":
            lib = np.asarray(X.sum(1)).ravel()
            X = sp.diags((1e4 / np.maximum(lib, 1e-12)).astype(np.float32)) @ X
            X.data = np.log1p(X.data)
        elif self.kind == "unlogged":
            X.data = np.log1p(X.data)
        x = X[:, self.gene_idx].toarray()
        if self.scale_mean is not None:
            x = np.clip((x - self.scale_mean) / self.scale_sd, -self.max_value, self.max_value)
        x = x.astype(np.float32)
        pcs = ((x - self.pca_mean) @ self.pca_components).astype(np.float32)
        return x, pcs


def _read_rows(f: h5py.File, rows: np.ndarray):
    """Rows (sorted) of X, as CSR; contiguous runs read as slices."""
    X = f["X"]
    if isinstance(X, h5py.Dataset):  # dense X
        if len(rows) and rows[-1] - rows[0] + 1 == len(rows):
            return sp.csr_matrix(X[int(rows[0]) : int(rows[-1]) + 1])
        return sp.csr_matrix(X[rows])
    ds = ad.io.sparse_dataset(X)
    if len(rows) and rows[-1] - rows[0] + 1 == len(rows):
        return ds[int(rows[0]) : int(rows[-1]) + 1]
    return ds[rows]


def fit_on_sample(
    path: str | Path, cfg: PreprocessConfig, n_sample: int = 20_000, seed: int = 0
) -> tuple[BlockTransform, Prepared, int, int]:
    """Fit the preprocessing on up to ``n_sample`` random cells of the file.
    Returns the transform, the sample's ``Prepared`` and the file's (n_cells, n_genes)."""
    a = ad.read_h5ad(path, backed="r")
    n, g = a.n_obs, a.n_vars
    var_names = np.asarray(a.var_names).astype(str)
    a.file.close()
    if n == 0 or g == 0:
        raise InputError(f"'{path}' has {n} cells and {g} genes; nothing to cluster.")
    rows = np.sort(np.random.default_rng(seed).choice(n, min(n, n_sample), replace=False))
    with h5py.File(path, "r") as f:
        X = _read_rows(f, rows)
    sample = ad.AnnData(X=X)
    sample.var_names = var_names
    kind = detect_values(sample.X)
    prep = preprocess(sample, cfg)
    pos = {name: i for i, name in enumerate(var_names)}
    gene_idx = np.array([pos[str(name)] for name in prep.genes])
    t = BlockTransform(
        kind=kind,
        gene_idx=gene_idx,
        scale_mean=prep.scale_mean,
        scale_sd=prep.scale_sd,
        max_value=cfg.max_value,
        pca_mean=prep.pca_mean,
        pca_components=prep.pca_components,
    )
    prep.info["steps"].insert(0, f"fitted on a random sample of {len(rows)} of {n} cells")
    return t, prep, n, g


class H5adSource:
    """One rank's rows [start, stop) of an ``.h5ad``, read through a ``BlockTransform``.
    Picklable: the file is opened lazily in the process that reads."""

    def __init__(self, path: str | Path, start: int, stop: int, transform: BlockTransform):
        self.path, self.start, self.stop, self.transform = str(path), start, stop, transform
        self.n = stop - start
        self._f: h5py.File | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_f": None}

    def read(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._f is None:
            self._f = h5py.File(self.path, "r")
        return self.transform(_read_rows(self._f, np.asarray(idx) + self.start))

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def row_ranges(n: int, world: int) -> list[tuple[int, int]]:
    """Contiguous near-equal row ranges, one per rank."""
    cuts = np.linspace(0, n, world + 1).round().astype(int)
    return [(int(cuts[i]), int(cuts[i + 1])) for i in range(world)]
