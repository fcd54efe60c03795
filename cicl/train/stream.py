"""CICL for atlases that do not fit in memory: the training plan (``cicl.train.plan``) fed
block by block from disk.

A ``Source`` hands out (scaled expression, PCA scores) for any sorted set of this rank's cells,
and where its runs of consecutive file rows (chunks) begin; nothing else about the storage is
known here. A pass visits the rank's cells in pools of ``train.block_size`` cells, each pool
the union of random chunks, so a file stored sorted by type still gives mixed pools; passes run
on across epochs (an epoch of an atlas is shorter than a pass). Neighbour mixing uses the
nearest neighbours within the pool (in PCA space), and minibatches are drawn from the pool.
A reclustering round fits K-means (distributed, all ranks) on a fixed random sample of
``cluster.kmeans_sample`` cells; with the cluster-aware term on, each pool's cells get their
pseudo-labels against the current centroids when the pool is read (a pass over every cell per
round would cost as much as training), without it only the sample is labelled (the history).
Memory per rank is one pool, the K-means sample's embedding and one label + confidence per own
cell; what would need more (``augment.resample: static``: two views of every cell) is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np
import torch

from cicl.cluster.kmeans import KMeansResult
from cicl.cluster.mixture import Metric
from cicl.comm import Comm
from cicl.config import CICLConfig, ConfigError
from cicl.model.modules import student_t
from cicl.train.final import assign_cells
from cicl.train.loop import cluster_pca_weight, cluster_space, embed
from cicl.train.plan import Batch, TrainingPlan, TrainResult

BlockSink = Callable[[np.ndarray, np.ndarray, np.ndarray], None]  # (cells, labels, embedding)


class Source(Protocol):
    n: int  # this rank's cells
    has_counts: bool  # whether ``read_counts`` gives the raw counts (count input)
    chunk_starts: np.ndarray  # local offsets where a run of cells read together begins

    def read(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(x, pcs) float32 for the sorted local cell indices ``idx``."""
        ...

    def read_counts(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x, pcs, raw counts of the genes used) float32, from one read of the rows."""
        ...


def block_knn(pcs: torch.Tensor, k: int) -> torch.Tensor:
    """k nearest neighbours (self excluded) of every row within the block."""
    k = min(k, pcs.shape[0] - 1)
    d = torch.cdist(pcs, pcs)
    d.fill_diagonal_(float("inf"))
    return d.topk(k, largest=False).indices


def _blocks(n: int, size: int) -> Iterator[np.ndarray]:
    """Local cells in order, ``size`` at a time (passes that visit every cell once)."""
    for s in range(0, n, size):
        yield np.arange(s, min(s + size, n))


def _pools(starts: np.ndarray, n: int, size: int, gen: torch.Generator) -> Iterator[np.ndarray]:
    """One pass over the local cells in pools of about ``size`` cells, each pool the union of
    random chunks (``starts``: local offsets where chunks begin), sorted for reading."""
    ends = np.r_[starts[1:], n]
    order = torch.randperm(len(starts), generator=gen, device=gen.device).cpu().numpy()
    pool: list[np.ndarray] = []
    have = 0
    for i in order:
        pool.append(np.arange(starts[i], ends[i]))
        have += ends[i] - starts[i]
        if have >= size:
            yield np.sort(np.concatenate(pool))
            pool, have = [], 0
    if pool:
        yield np.sort(np.concatenate(pool))


def train_stream(
    source: Source,
    n_clusters: int,
    cfg: CICLConfig,
    *,
    comm: Comm | None = None,
    groups: np.ndarray | None = None,
    pca_init: tuple[np.ndarray, np.ndarray] | None = None,
    pca_stats: tuple[np.ndarray, float] = (np.zeros(1, np.float32), 1.0),
    n_genes: int,
    on_round: Callable[[dict, dict], None] | None = None,
    on_block: BlockSink | None = None,
    restore: dict | None = None,
    progress: bool = False,
) -> TrainResult:
    """Train on ``source`` streamed block by block. ``pca_stats`` = (mean, rms) of the PCA
    scores (from the preprocessing sample) for the hybrid space. ``on_block(idx, labels,
    embedding)`` receives the final result block by block; the returned ``TrainResult`` then
    has empty per-cell arrays. Options streaming cannot honour are refused (``ConfigError``)."""
    if cfg.augment.resample == "static":
        raise ConfigError(
            "augment.resample: static is not available when streaming: it draws two views of "
            "every cell once and holds them in memory. Use augment.resample: step."
        )
    comm = comm or Comm()
    shape, has_counts = (source.n, n_genes), source.has_counts
    plan = TrainingPlan(n_clusters, cfg, comm, shape, has_counts, groups, pca_init, comm.rank)
    cells = StreamedCells(plan, source, pca_stats, on_block)
    return plan.fit(cells, restore=restore, on_round=on_round, progress=progress)


class StreamedCells:
    """This rank's cells read from a ``Source`` block by block (``Cells`` for ``TrainingPlan``;
    see the module docstring)."""

    fits_all = False

    def __init__(
        self, plan: TrainingPlan, source: Source, pca_stats: tuple, on_block: BlockSink | None
    ):
        cfg, comm = plan.cfg, plan.comm
        self.plan, self.source, self.on_block = plan, source, on_block
        self.block = max(cfg.train.block_size, plan.sched.batch_local)
        self.p_mean = torch.as_tensor(pca_stats[0], dtype=torch.float32, device=plan.device)
        weight = cluster_pca_weight(cfg, plan.n)
        self.pca_center = np.asarray(pca_stats[0], dtype=np.float64)
        self.pca_scale = weight / float(pca_stats[1])
        self.pca_weight = weight if cfg.cluster.space == "hybrid" else None
        # fixed K-means sample: random cells (one scattered read per round), same on restart
        want = min(source.n, max(plan.k, cfg.cluster.kmeans_sample // comm.world))
        pick = np.random.default_rng(cfg.seed + comm.rank).choice(source.n, want, replace=False)
        self.sample = np.sort(pick)
        self.n_fit = int(comm.sum(torch.tensor(len(self.sample), dtype=torch.long)))
        # pseudo-labels are only read by the cluster-aware term: without it (lam = 0) a round
        # labels the K-means sample alone (the history's label change), not every cell
        self.lazy = cfg.loss.lam > 0
        self._pool_iter: Iterator[np.ndarray] | None = None

    def _next_pool(self, gen: torch.Generator) -> np.ndarray:
        """The next pool of the running pass; a new shuffled pass when one ends (epochs may be
        shorter than a pass: the pass goes on where the last epoch left it)."""
        while True:
            if self._pool_iter is None:
                self._pool_iter = _pools(self.source.chunk_starts, self.source.n, self.block, gen)
            idx = next(self._pool_iter, None)
            if idx is not None:
                return idx
            self._pool_iter = None

    def batches(self, size: int, steps: int, gen: torch.Generator) -> Iterator[Batch]:
        """Pools of random chunks, each read once: its kNN graph, its cells' pseudo-labels
        against the current centroids (in epochs where the cluster-aware term is on), then minibatches
        from a shuffle of its cells. A pool too small for a minibatch is skipped."""
        done = 0
        while done < steps:
            idx = self._next_pool(gen)
            if len(idx) < size:
                continue
            x, p, *counts = self._read(idx, with_counts=self.plan.recon == "nb")
            if self.plan.cluster_term:  # warm-up steps never read them: no forward pass
                self._pseudo_label(idx, x, p)
            nbr = block_knn(p, self.plan.cfg.augment.n_neighbors)
            perm = torch.randperm(len(idx), generator=gen, device=gen.device)
            c, lib = (counts[0], counts[0].sum(1)) if counts else (None, None)
            for j in range(0, len(idx) - size + 1, size)[: steps - done]:
                rows = perm[j : j + size]
                yield Batch(torch.from_numpy(idx)[rows.cpu()], rows, x, nbr, c, lib)
                done += 1

    def _pseudo_label(self, idx: np.ndarray, x: torch.Tensor, p: torch.Tensor) -> None:
        """The pool's cells' pseudo-labels and confidences, by the encoder as it is now."""
        plan = self.plan
        with torch.no_grad():
            h = embed(plan.model, x, batch=len(idx), train_mode=plan.pl_train)
            h = cluster_space(h, (p - self.p_mean) * self.pca_scale, plan.cfg.cluster.space)
            c, lab = student_t(h, plan.km.centroids, plan.cfg.cluster.alpha).max(1)
        plan.conf[idx], plan.labels[idx] = c.cpu().half(), lab.cpu()

    def fit_space(self, train_mode: bool) -> torch.Tensor:
        s, b = self.sample, self.block
        return torch.cat([self._embed(s[i : i + b], train_mode) for i in range(0, len(s), b)])

    def assign(
        self, centroids: torch.Tensor, train_mode: bool, h: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """(confidence, label) on the CPU, confidences in half precision. Without the
        cluster-aware term: the K-means sample's alone (the history's label change). With it:
        every cell's, the sample's from this round (``h``: its embedding, when just computed),
        the others' as of when their pool was last read (``batches`` labels each pool as it
        is read, so a pass over every cell per round is never needed)."""
        if h is None:
            s, b = self.sample, self.block
            with torch.no_grad():
                h = torch.cat([self._embed(s[i : i + b], train_mode) for i in range(0, len(s), b)])
        c, lab = student_t(h, centroids, self.plan.cfg.cluster.alpha).max(1)
        if not self.lazy:
            return c.cpu().half(), lab.cpu()
        conf, labels = self.plan.conf, self.plan.labels
        if labels.shape[0] != self.source.n:  # the first round; pools are labelled when read
            conf = torch.zeros(self.source.n, dtype=torch.float16)
            labels = torch.zeros(self.source.n, dtype=torch.long)
        conf, labels = conf.clone(), labels.clone()
        conf[self.sample], labels[self.sample] = c.cpu().half(), lab.cpu()
        return conf, labels

    def label(self, final: KMeansResult, metric: Metric | None, h_fit: torch.Tensor) -> tuple:
        """Every block assigned under the final partition's metric, handed to ``on_block`` if
        given (the arrays returned are then empty)."""
        dim = final.centroids.shape[1]
        embedding, labels = [np.zeros((0, dim), np.float32)], [np.zeros(0, np.int64)]
        for idx in _blocks(self.source.n, self.block):
            h = self._embed(idx)
            lab = assign_cells(h, final.centroids, metric).cpu().numpy()
            if self.on_block is not None:
                self.on_block(idx, lab, h.cpu().numpy())
            else:
                embedding.append(h.cpu().numpy())
                labels.append(lab)
        return np.concatenate(embedding), np.concatenate(labels)

    def _read(self, idx: np.ndarray, with_counts: bool = False) -> list[torch.Tensor]:
        """(x, pcs) of these cells on the training device, and their raw counts if asked."""
        with self.plan.timed("read"):
            arrays = self.source.read_counts(idx) if with_counts else self.source.read(idx)
            return [torch.from_numpy(a).to(self.plan.device) for a in arrays]

    def _embed(self, idx: np.ndarray, train_mode: bool = False) -> torch.Tensor:
        x, p = self._read(idx)
        h = embed(self.plan.model, x, batch=len(idx), train_mode=train_mode)
        return cluster_space(h, (p - self.p_mean) * self.pca_scale, self.plan.cfg.cluster.space)
