"""A density-balanced sample of an atlas, so that rare cell types reach the preprocessing fit
and the K estimate (issue 43).

A random sample of 20k cells holds ~20 cells of a type at 0.1 % of the atlas: too few for
the HVGs and PCs to describe it, and below the ``max(3, 0.5 %)`` cells Leiden's communities
must have to count as a cluster (``cicl.data.estimate``). Instead: a cheap first-pass
preprocessing (fitted on a small random sample, few genes) projects a large random pool of
cells onto PCs block by block; MiniBatchKMeans cuts the pool into ``N_MICRO`` micro-clusters
and the sample takes equally many cells from each (all of a smaller one: water-filling).
Why this shape: a type that k-means gives a micro-cluster of its own (a separated group
does, whatever its size) gets about ``1 / N_MICRO`` of the sample, while a large type keeps
as many micro-clusters as its spread needs. ``N_MICRO = 150`` makes that share 0.67 %, above
the 0.5 % Leiden counts with room for the cells Leiden leaves with a neighbour (at 200, the
share is the threshold itself, and a type that got exactly its share could fall just short:
docs/preprocessing.md). Seeded, label-free, memory bounded by the pool's PCs (not counts).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import h5py
import numpy as np

from cicl.errors import InputError

if TYPE_CHECKING:
    from cicl.config import PreprocessConfig
    from cicl.data.stream import BlockTransform

SKETCH_FROM = 50_000  # files with more cells than this are sampled by sketch; smaller, randomly
POOL = 200_000  # cells projected by the first pass (a 0.1 % type: 200 of them)
FIRST = 5_000  # random cells the first pass is fitted on
FIRST_GENES = 500  # HVGs of the first pass: its exact PCA costs cells x genes^2
N_MICRO = 150  # micro-clusters: one of them is 1 / N_MICRO = 0.67 % of the sample
BLOCK = 20_000  # pool cells read and projected at a time


@dataclass(frozen=True)
class Sketch:
    """File rows (sorted) of the sample and how they were chosen, for the record."""

    rows: np.ndarray
    n_pool: int
    n_micro: int
    per_micro: int
    first_cells: int
    first_genes: int | None

    def step(self, n: int) -> str:
        genes = "default HVGs" if self.first_genes is None else f"{self.first_genes} HVGs"
        return (
            f"fitted on a density-balanced sketch of {len(self.rows)} of {n} cells: a first "
            f"pass (fitted on {self.first_cells} random cells, {genes}) projected a random "
            f"pool of {self.n_pool} cells on its PCs, MiniBatchKMeans cut it into "
            f"{self.n_micro} micro-clusters and at most {self.per_micro} cells were taken "
            "from each"
        )


def water_level(sizes: np.ndarray, total: int) -> int:
    """The largest q with ``sum(min(sizes, q)) <= total``: equal cells per group, all of a
    group smaller than that."""
    s = np.sort(np.asarray(sizes, dtype=np.int64))
    if s.sum() <= total:
        return int(s[-1]) if len(s) else 0
    below = np.concatenate([[0], np.cumsum(s)[:-1]])  # cells in groups smaller than s[i]
    # a level below s[i], groups before i taken whole: below[i] + (len - i) * q <= total
    q = (total - below) // (len(s) - np.arange(len(s)))
    i = int(np.flatnonzero(q < s)[0])
    return int(q[i])


def balanced_sketch(
    pcs: np.ndarray, n_take: int, n_micro: int, seed: int
) -> tuple[np.ndarray, int]:
    """Indices (sorted) of about ``n_take`` rows of ``pcs``: ``n_micro`` MiniBatchKMeans
    micro-clusters, at most ``q`` random rows from each, ``q`` as large as ``n_take`` allows.
    Returns the indices and ``q``."""
    from sklearn.cluster import MiniBatchKMeans

    n_micro = int(min(n_micro, len(pcs)))
    km = MiniBatchKMeans(n_micro, batch_size=4096, n_init=1, max_iter=20, random_state=seed)
    micro = km.fit_predict(np.asarray(pcs, dtype=np.float32))
    sizes = np.bincount(micro, minlength=n_micro)
    q = water_level(sizes, n_take)
    rng = np.random.default_rng(seed)
    # a random order, then the first q of each micro-cluster in it
    order = rng.permutation(len(pcs))
    order = order[np.argsort(micro[order], kind="stable")]
    start = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = np.arange(len(pcs)) - np.repeat(start, sizes)
    return np.sort(order[rank < q]), q


def project_rows(
    f: h5py.File, rows: np.ndarray, transform: BlockTransform, block: int = BLOCK
) -> np.ndarray:
    """PCs of file rows ``rows`` (sorted) through ``transform``, read ``block`` at a time."""
    from cicl.data.stream import _read_rows

    out = np.empty((len(rows), transform.pca_components.shape[1]), np.float32)
    for a in range(0, len(rows), block):
        r = rows[a : a + block]
        out[a : a + block] = transform(_read_rows(f, r, transform.matrix), r)[1]
    return out


def first_pass_config(cfg: PreprocessConfig, n_genes: int | None) -> PreprocessConfig:
    """The first pass: the user's preprocessing with ``n_genes`` HVGs and no batch
    correction (it only has to place cells for the sketch; batches then get micro-clusters
    of their own, which balances them too)."""
    return replace(cfg, n_top_genes=n_genes, batch_key=None)


def sketch_rows(
    path: str,
    n: int,
    n_sample: int,
    seed: int,
    fit_first,
    *,
    pool: int = POOL,
    first: int = FIRST,
    first_genes: int = FIRST_GENES,
    n_micro: int = N_MICRO,
) -> Sketch:
    """The sketch of ``n_sample`` of the file's ``n`` cells. ``fit_first(rows, n_genes)``
    fits the first-pass ``BlockTransform`` on file rows with ``n_genes`` HVGs (None: the
    default)."""
    rng = np.random.default_rng(seed)
    first_rows = np.sort(rng.choice(n, min(n, first), replace=False))
    genes: int | None = first_genes
    try:
        transform = fit_first(first_rows, genes)
    except InputError:  # fewer varying genes than that in the first sample: all of them
        genes = None
        transform = fit_first(first_rows, genes)
    pool_rows = np.sort(rng.choice(n, min(n, pool), replace=False))
    with h5py.File(path, "r") as f:
        pcs = project_rows(f, pool_rows, transform)
    take, q = balanced_sketch(pcs, n_sample, n_micro, seed)
    return Sketch(pool_rows[take], len(pool_rows), n_micro, q, len(first_rows), genes)
