"""The single-process CICL training loop (pure torch/numpy; no AnnData, Ray or MLflow).

One epoch = shuffled minibatches; each step draws two fresh augmented views, computes the
instance term and (after warm-up) the cluster-aware term with pseudo-labels from the Student's t
head against the current centroids. Every ``recluster_every`` epochs K-means is re-fitted on the
embedding of all cells, so the centroids follow the embedding (the official code never moves
them).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score
from sklearn.neighbors import NearestNeighbors

from cicl.cluster.kmeans import KMeansResult, kmeans, lloyd
from cicl.cluster.ward import ward_labels
from cicl.config import CICLConfig
from cicl.model.augment import augment
from cicl.model.losses import CLUSTER_LOSSES, INSTANCE_LOSSES
from cicl.model.modules import CICLModel, balanced_gene_groups, pca_projection, student_t


@dataclass
class TrainResult:
    embedding: np.ndarray  # (n, E) the clustering space (see ClusterConfig.space), eval mode
    labels: np.ndarray  # (n,) final cluster labels
    centroids: np.ndarray  # (k, E)
    history: list[dict] = field(default_factory=list)  # one entry per reclustering round
    epochs: int = 0
    steps: int = 0
    seconds: float = 0.0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def auto_epochs(n_cells: int, batch_size: int, epochs: int, min_steps: int, max_steps: int) -> int:
    """Epochs so that training takes ``epochs`` passes, but between ``min_steps`` and
    ``max_steps`` optimiser steps: small datasets are memorised by the instance term if trained
    for many steps, large ones need passes to learn, and atlases are capped in cost."""
    steps_per_epoch = max(1, n_cells // min(batch_size, n_cells))
    steps = min(max(epochs * steps_per_epoch, min_steps), max_steps)
    return max(1, math.ceil(steps / steps_per_epoch))


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


def train(
    x: np.ndarray,
    pcs: np.ndarray,
    n_clusters: int,
    cfg: CICLConfig,
    *,
    rank: int = 0,
    progress: bool = False,
    on_round: Callable[[dict], None] | None = None,
) -> TrainResult:
    t0 = time.perf_counter()
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + rank)  # augmentation: seed + rank
    n = x.shape[0]
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)

    groups = None
    if cfg.model.encoder == "transformer":
        groups = balanced_gene_groups(gene_loadings(x, pcs), cfg.model.n_tokens, seed=cfg.seed)
    pca_init = None
    if cfg.model.encoder in ("transformer", "mlp") and cfg.model.pca_residual:
        pca_init = pca_projection(x, pcs, cfg.model.embed_dim)
    model = CICLModel(x.shape[1], cfg.model, groups, pca_init).to(device)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
    )
    nbr = torch.from_numpy(knn_indices(pcs, cfg.augment.n_neighbors)).to(device)

    bs = min(cfg.train.batch_size, n)
    epochs = cfg.train.epochs or auto_epochs(
        n, bs, cfg.train.auto_epochs, cfg.train.min_steps, cfg.train.max_steps
    )
    warm_epoch = int(round(cfg.loss.warmup_frac * epochs))
    inst_fn = INSTANCE_LOSSES[cfg.loss.instance_loss]
    clu_fn = CLUSTER_LOSSES[cfg.loss.cluster_loss]
    tau = cfg.loss.temperature
    kern = cfg.loss.kernel

    def nbr_rows(idx: torch.Tensor) -> torch.Tensor:
        pick = torch.randint(nbr.shape[1], (idx.shape[0],), generator=gen).to(device)
        return xt[nbr[idx, pick]]

    static = None
    if cfg.augment.resample == "static":  # official code: two views drawn once
        all_idx = torch.arange(n, device=device)
        static = (
            augment(xt, nbr_rows(all_idx), cfg.augment, gen),
            augment(xt, nbr_rows(all_idx), cfg.augment, gen),
        )

    pca_block = None
    if cfg.cluster.space == "hybrid":
        p = torch.from_numpy(np.ascontiguousarray(pcs, dtype=np.float32)).to(device)
        p = p - p.mean(0)
        pca_block = p * (cfg.cluster.pca_weight / p.pow(2).sum(1).mean().sqrt())

    def space(h: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        if cfg.cluster.space == "euclidean":
            return h
        h = F.normalize(h, dim=1)
        if pca_block is None:
            return h
        blk = pca_block if idx is None else pca_block[idx]
        return torch.cat([h, blk], dim=1)

    def pseudo_labels(res: KMeansResult) -> tuple[torch.Tensor, torch.Tensor]:
        """Clustering head: Student's t soft assignment of every cell to the round's centroids
        (argmax = nearest centroid; the max probability is the confidence)."""
        h = space(embed(model, xt, train_mode=cfg.cluster.pseudo_label_mode == "train"))
        return student_t(h, res.centroids, cfg.cluster.alpha).max(1)

    def recluster(epoch: int, prev: KMeansResult | None) -> KMeansResult:
        h = space(embed(model, xt, train_mode=cfg.cluster.pseudo_label_mode == "train"))
        res = kmeans(
            h, n_clusters, n_init=cfg.cluster.n_init, max_iter=cfg.cluster.max_iter, seed=cfg.seed
        )
        if prev is not None:  # warm start from the previous round, keep whichever fits better
            warm = lloyd(h, prev.centroids, max_iter=cfg.cluster.max_iter)
            if warm.inertia <= res.inertia:
                res = warm
        return res

    km = recluster(0, None)
    conf_all, lab_all = pseudo_labels(km)
    history: list[dict] = []
    prev_labels = lab_all.clone()
    steps = 0
    bar = _progress(epochs, progress)
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(n, generator=gen).to(device)
        use_cluster = cfg.loss.lam > 0 and epoch > warm_epoch
        tot = inst_tot = clu_tot = 0.0
        nb = 0
        for i in range(0, n - bs + 1, bs):
            idx = perm[i : i + bs]
            xb = xt[idx]
            if static is not None:
                v1, v2 = static[0][idx], static[1][idx]
            else:
                v1 = augment(xb, nbr_rows(idx), cfg.augment, gen)
                v2 = augment(xb, nbr_rows(idx), cfg.augment, gen)
            _, z1 = model(v1)
            _, z2 = model(v2)
            loss_i = inst_fn(z1, z2, tau, kern)
            loss = loss_i
            loss_c = torch.zeros(())
            if use_cluster:
                valid = conf_all[idx] >= cfg.loss.confidence
                loss_c = clu_fn(z1, z2, lab_all[idx], tau, valid, kern)
                loss = loss + cfg.loss.lam * loss_c
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            nb += 1
            tot += loss.item()
            inst_tot += loss_i.item()
            clu_tot += loss_c.item()
        every = cfg.cluster.recluster_every
        if every is None and use_cluster:
            # official code: centroids fixed, pseudo-labels re-derived as the embedding moves
            conf_all, lab_all = pseudo_labels(km)
        if every is not None and (epoch % every == 0 or epoch == epochs):
            km = recluster(epoch, km)
            conf_all, lab_all = pseudo_labels(km)
        log_every = every or 5  # without reclustering, still record every 5 epochs (as the code)
        if epoch % log_every == 0 or epoch == epochs:
            rec = {
                "epoch": epoch,
                "step": steps,
                "loss": tot / max(nb, 1),
                "instance_loss": inst_tot / max(nb, 1),
                "cluster_loss": clu_tot / max(nb, 1),
                "inertia": km.inertia,
                # permutation-invariant: K-means restarts renumber clusters
                "label_change": 1.0
                - float(adjusted_rand_score(prev_labels.cpu().numpy(), lab_all.cpu().numpy())),
                "cluster_active": bool(use_cluster),
            }
            prev_labels = lab_all.clone()
            history.append(rec)
            if on_round is not None:
                on_round(rec)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{tot / max(nb, 1):.3f}")
    if bar is not None:
        bar.close()

    h = space(embed(model, xt))
    if cfg.cluster.final == "kmeans":
        final = kmeans(
            h, n_clusters, n_init=cfg.cluster.n_init, max_iter=cfg.cluster.max_iter, seed=cfg.seed
        )
        labels, cents = final.labels, final.centroids
    elif cfg.cluster.final == "ward":
        labels = ward_labels(h, n_clusters, seed=cfg.seed)
        cents = torch.stack([h[labels == c].mean(0) for c in range(n_clusters)])
    else:
        labels = student_t(h, km.centroids, cfg.cluster.alpha).argmax(1)
        cents = km.centroids
    return TrainResult(
        embedding=h.cpu().numpy(),
        labels=labels.cpu().numpy(),
        centroids=cents.cpu().numpy(),
        history=history,
        epochs=epochs,
        steps=steps,
        seconds=time.perf_counter() - t0,
    )


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="CICL training", unit="epoch", leave=False)
