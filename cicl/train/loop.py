"""CICL on cells held in memory (pure torch/numpy; no AnnData, Ray or MLflow).

``train`` runs the training plan (``cicl.train.plan``) over ``InMemoryCells``: every local cell
is a tensor, an epoch is a shuffle of all of them, mixing neighbours come from the kNN graph of
their PCA scores, and K-means and the pseudo-labels cover every cell. Also here: embedding new
cells with a trained encoder (``embed_new``) and the clustering space both paths share.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.neighbors import NearestNeighbors

from cicl.cluster.kmeans import KMeansResult
from cicl.cluster.mixture import Metric
from cicl.comm import Comm
from cicl.config import CICLConfig
from cicl.model.modules import CICLModel, balanced_gene_groups, pca_projection, student_t

# re-exported: callers import them from here
from cicl.train.final import (  # noqa: F401
    assign_cells,
    final_kmeans,
    load_metric,
    main_k,
    metric_record,
)
from cicl.train.plan import (  # noqa: F401
    Batch,
    TrainingPlan,
    TrainResult,
    auto_epochs,
    build_model,
    needs_two_views,
    recon_kind,
    recon_loss,
    resolve_device,
    train_step,
)


def train(
    x: np.ndarray,
    pcs: np.ndarray,
    n_clusters: int,
    cfg: CICLConfig,
    *,
    rank: int = 0,
    progress: bool = False,
    on_round: Callable[[dict, dict], None] | None = None,
    comm: Comm | None = None,
    groups: np.ndarray | None = None,
    pca_init: tuple[np.ndarray, np.ndarray] | None = None,
    restore: dict | None = None,
    round_metrics: Callable[[np.ndarray, Callable[[], np.ndarray]], dict] | None = None,
    counts: np.ndarray | None = None,
) -> TrainResult:
    """Train CICL on this process' cells and cluster them (the training plan over
    ``InMemoryCells``).

    In one process ``x`` (cells x genes, scaled) and ``pcs`` hold every cell; ``counts`` (the
    same cells x genes, raw counts; None for non-count input) is what the negative binomial
    decoder reconstructs. Under ``torch.distributed`` they hold this rank's shard (see
    ``TrainingPlan``) and ``groups``/``pca_init`` are computed once by the caller; in one
    process they are derived here. ``on_round``, ``restore``, ``round_metrics``: see
    ``TrainingPlan.fit``.
    """
    t0 = time.perf_counter()
    comm = comm or Comm()
    if cfg.model.encoder == "transformer" and groups is None:
        groups = balanced_gene_groups(
            gene_loadings(x, pcs), cfg.model.transformer.n_tokens, seed=cfg.seed
        )
    if cfg.model.encoder in ("transformer", "mlp") and cfg.model.pca_residual and pca_init is None:
        pca_init = pca_projection(x, pcs, cfg.model.embed_dim)
    rank = comm.rank if comm.world > 1 else rank
    plan = TrainingPlan(n_clusters, cfg, comm, x.shape, counts is not None, groups, pca_init, rank)
    cells = InMemoryCells(plan, x, pcs, counts)
    res = plan.fit(
        cells, restore=restore, on_round=on_round, round_metrics=round_metrics, progress=progress
    )
    return replace(res, seconds=time.perf_counter() - t0)  # the gene modules' time included


class InMemoryCells:
    """This rank's cells as tensors on the training device (``Cells`` for ``TrainingPlan``)."""

    fits_all = True

    def __init__(
        self, plan: TrainingPlan, x: np.ndarray, pcs: np.ndarray, counts: np.ndarray | None
    ):
        cfg, device = plan.cfg, plan.device

        def tensor(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)

        self.plan, self.n_fit = plan, plan.n
        self.x = tensor(x)
        self.nbr = torch.from_numpy(knn_indices(pcs, cfg.augment.n_neighbors)).to(device)
        self.counts = tensor(counts) if plan.recon == "nb" else None
        self.library = None if self.counts is None else self.counts.sum(1)
        self.views = None
        self._perm: torch.Tensor | None = None  # the running pass and where it is
        self._at = 0
        if cfg.augment.resample == "static":  # official code: two views drawn once
            every = self._batch(torch.arange(x.shape[0], device=device))
            self.views = (plan.view(every), plan.view(every))
        self.pca_block = self.pca_center = self.pca_weight = None
        self.pca_scale = 1.0
        if cfg.cluster.space == "hybrid":
            self.pca_weight = cluster_pca_weight(cfg, plan.n)
            self.pca_center, self.pca_scale = _pca_stats(pcs, self.pca_weight, plan.comm)
            block = _pca_part(pcs, self.pca_center, self.pca_scale)
            self.pca_block = torch.from_numpy(block).to(device)

    def _batch(self, idx: torch.Tensor) -> Batch:
        views = None if self.views is None else (self.views[0][idx], self.views[1][idx])
        return Batch(idx, idx, self.x, self.nbr, self.counts, self.library, views)

    def batches(self, size: int, steps: int, gen: torch.Generator) -> Iterator[Batch]:
        """Minibatches of a shuffled pass; an epoch shorter than a pass (``train.epoch_steps``)
        goes on where the last one left it, a new pass is drawn when too few cells are left."""
        for _ in range(steps):
            if self._perm is None or self._at + size > len(self._perm):
                self._perm, self._at = (
                    torch.randperm(len(self.x), generator=gen, device=gen.device),
                    0,
                )
            yield self._batch(self._perm[self._at : self._at + size])
            self._at += size

    def fit_space(self, train_mode: bool) -> torch.Tensor:
        h = embed(self.plan.model, self.x, train_mode=train_mode)
        return cluster_space(h, self.pca_block, self.plan.cfg.cluster.space)

    def assign(
        self, centroids: torch.Tensor, train_mode: bool, h: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        h = self.fit_space(train_mode) if h is None else h
        return student_t(h, centroids, self.plan.cfg.cluster.alpha).max(1)

    def label(self, final: KMeansResult, metric: Metric | None, h_fit: torch.Tensor) -> tuple:
        return h_fit.cpu().numpy(), final.labels.cpu().numpy()


def cluster_pca_weight(cfg: CICLConfig, n_cells: int) -> float:
    """The hybrid space's PCA-block weight (``cluster.pca_weight``; None: by cell count).
    The learned embedding is an estimate that needs cells: on the twelve shared sets the PCA
    geometry clustered better up to about a thousand cells and the learned embedding from a
    few thousand on, so the PCA block's weight falls from 2 at 1,000 cells to 0.5 at 5,000
    (log-linear), and stays there."""
    if cfg.cluster.pca_weight is not None:
        return float(cfg.cluster.pca_weight)
    lo, hi, w_lo, w_hi = 1_000, 5_000, 2.0, 0.5
    t = min(max(math.log(max(n_cells, 1) / lo) / math.log(hi / lo), 0.0), 1.0)
    return w_lo * (w_hi / w_lo) ** t


def knn_indices(pcs: np.ndarray, k: int) -> np.ndarray:
    """k nearest neighbours (self excluded) in PCA space, for neighbour-mixing augmentation."""
    k = min(k, pcs.shape[0] - 1)
    nn_ = NearestNeighbors(n_neighbors=k + 1).fit(pcs)
    idx = nn_.kneighbors(pcs, return_distance=False)
    return idx[:, 1:]


def gene_loadings(x: np.ndarray, pcs: np.ndarray) -> np.ndarray:
    """Gene x PC correlation-like loadings used to group genes into modules."""
    pc = pcs / np.maximum(pcs.std(0, keepdims=True), 1e-8)
    return (x.T @ pc) / x.shape[0]


@torch.no_grad()
def embed(
    model: CICLModel, x: torch.Tensor, batch: int = 4096, train_mode: bool = False
) -> torch.Tensor:
    was = model.training
    model.train(train_mode)
    out = torch.cat([model.encoder(x[i : i + batch]) for i in range(0, x.shape[0], batch)])
    model.train(was)
    return out


def load_encoder(cfg: CICLConfig, state: dict[str, np.ndarray], n_genes: int) -> CICLModel:
    """A trained model rebuilt from ``encoder_state`` (projection head untrained: unused),
    in eval mode on ``cfg.train.device``."""
    pca_init = (state["skip.weight"], state["skip.bias"]) if "skip.weight" in state else None
    model = CICLModel(n_genes, cfg.model, state.get("groups"), pca_init)
    model.encoder.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
    return model.to(resolve_device(cfg.train.device)).eval()


@torch.no_grad()
def embed_new(
    model: CICLModel,
    x: np.ndarray,
    pcs: np.ndarray,
    cfg: CICLConfig,
    pca_center: np.ndarray | None = None,
    pca_scale: float = 1.0,
) -> np.ndarray:
    """Clustering-space coordinates of cells preprocessed like the training cells (``x``
    scaled genes in model order, ``pcs`` in the training PCA) under a trained encoder
    (``load_encoder``): the space the training cells' labels and centroids live in."""
    device = next(model.parameters()).device
    h = embed(model, torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device))
    block = None
    if cfg.cluster.space == "hybrid":
        if pca_center is None:
            raise ValueError("the hybrid space needs the training PCA block's centre and scale")
        block = torch.from_numpy(_pca_part(pcs, pca_center, pca_scale)).to(device)
    return cluster_space(h, block, cfg.cluster.space).cpu().numpy()


def cluster_space(h: torch.Tensor, pca_block: torch.Tensor | None, space: str) -> torch.Tensor:
    """Where K-means and the Student's t head work (``cluster.space``): the encoder output
    (euclidean), L2-normalised (sphere), or normalised next to the weighted PCA block (hybrid)."""
    if space == "euclidean":
        return h
    h = F.normalize(h, dim=1)
    return h if space == "sphere" else torch.cat([h, pca_block], dim=1)


def _pca_stats(pcs: np.ndarray, weight: float, comm: Comm) -> tuple[np.ndarray, float]:
    """Centre and scale that put the PCA scores at root-mean-square norm ``weight`` over all
    cells (every rank's): the hybrid space's PCA block is ``(pcs - centre) * scale``."""
    p = torch.from_numpy(np.ascontiguousarray(pcs, dtype=np.float64))
    n = comm.sum(torch.tensor(float(p.shape[0]), dtype=torch.float64))
    center = comm.sum(p.sum(0)) / n
    rms = (comm.sum((p - center).pow(2).sum()) / n).sqrt()
    return center.numpy(), float(weight / rms)


def _pca_part(pcs: np.ndarray, center: np.ndarray, scale: float) -> np.ndarray:
    """The hybrid space's PCA block (computed in float64, as its statistics)."""
    return ((np.asarray(pcs, dtype=np.float64) - center) * scale).astype(np.float32)
