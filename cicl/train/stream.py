"""CICL for atlases that do not fit in memory: the same step, fed block by block from disk.

A ``Source`` hands out (scaled expression, PCA scores) for any sorted set of this rank's cells;
nothing else about the storage is known here. Per epoch the rank visits its cells in shuffled
blocks of ``train.block_size``; neighbour mixing uses the nearest neighbours within the block
(in PCA space), and minibatches are drawn from the block. A reclustering round fits K-means
(distributed, all ranks) on a fixed random sample of ``cluster.kmeans_sample`` cells, then
streams every cell through the Student's t head for its pseudo-label. Memory per rank is one
block, the K-means sample's embedding and one label + confidence per own cell.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np
import torch

from cicl.cluster.kmeans import KMeansResult
from cicl.comm import Comm
from cicl.config import CICLConfig
from cicl.model.augment import augment
from cicl.model.modules import student_t
from cicl.train.loop import (
    TrainResult,
    _progress,
    assign_cells,
    build_model,
    cluster_pca_weight,
    cluster_space,
    device_name,
    encoder_state,
    final_partition,
    load_state,
    make_state,
    metric_record,
    recon_kind,
    resolve_device,
    rng,
    round_kmeans,
    round_record,
    schedule,
    sync_norm_stats,
    total_loss,
    train_step,
)


class Source(Protocol):
    n: int  # this rank's cells
    has_counts: bool  # whether ``read_counts`` gives the raw counts (count input)

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


def _blocks(n: int, size: int, gen: torch.Generator | None) -> Iterator[np.ndarray]:
    starts = np.arange(0, n, size)
    order = None
    if gen is not None:
        order = torch.randperm(len(starts), generator=gen, device=gen.device).cpu().numpy()
    for i in order if order is not None else range(len(starts)):
        s = int(starts[i])
        yield np.arange(s, min(s + size, n))


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
    on_block: Callable[[np.ndarray, np.ndarray, np.ndarray], None] | None = None,
    restore: dict | None = None,
    progress: bool = False,
) -> TrainResult:
    """Train on ``source`` streamed block by block. ``pca_stats`` = (mean, rms) of the PCA
    scores (from the preprocessing sample) for the hybrid space. ``on_block(idx, labels,
    embedding)`` receives the final result block by block; the returned ``TrainResult`` then
    has empty per-cell arrays."""
    t0 = time.perf_counter()
    comm = comm or Comm()
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.seed)
    gen = rng(device, cfg.seed + comm.rank)
    n_local = source.n
    n = int(comm.sum(torch.tensor(n_local, dtype=torch.long)))
    recon = recon_kind(cfg, source.has_counts)
    model, net, opt = build_model(n_genes, cfg, groups, pca_init, device, comm, recon)
    sched = schedule(cfg, n, n_local, comm)
    epochs, b_local, steps_per_epoch = sched.epochs, sched.batch_local, sched.steps_per_epoch
    p_mean = torch.as_tensor(pca_stats[0], dtype=torch.float32, device=device)
    pca_weight = cluster_pca_weight(cfg, n)
    p_scale = pca_weight / float(pca_stats[1])
    block = max(cfg.train.block_size, b_local)

    timings = {"read": 0.0, "train": 0.0, "kmeans": 0.0, "assign": 0.0}

    def load(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        t = time.perf_counter()
        x, p = source.read(idx)
        out = torch.from_numpy(x).to(device), torch.from_numpy(p).to(device)
        timings["read"] += time.perf_counter() - t
        return out

    @torch.no_grad()
    def space(x: torch.Tensor, p: torch.Tensor, train_mode: bool = False) -> torch.Tensor:
        was = model.training
        model.train(train_mode)
        h = model.encoder(x)
        model.train(was)
        return cluster_space(h, (p - p_mean) * p_scale, cfg.cluster.space)

    # fixed K-means sample: whole blocks (cheap contiguous reads), same on every restart
    rs = np.random.default_rng(cfg.seed + comm.rank)
    want = max(n_clusters, cfg.cluster.kmeans_sample // comm.world)
    starts = np.arange(0, n_local, block)
    rs.shuffle(starts)
    sample_idx = np.sort(
        np.concatenate([np.arange(s, min(s + block, n_local)) for s in starts])[:want]
    )
    pl_train = cfg.cluster.pseudo_label_mode == "train"

    def sample_space() -> torch.Tensor:
        sync_norm_stats(model, comm)
        parts = [
            space(*load(sample_idx[i : i + block]), pl_train)
            for i in range(0, len(sample_idx), block)
        ]
        return torch.cat(parts)

    def recluster(prev: KMeansResult | None) -> KMeansResult:
        t = time.perf_counter()
        res = round_kmeans(sample_space(), n_clusters, cfg, prev, comm)
        timings["kmeans"] += time.perf_counter() - t
        return res

    lab_all = torch.zeros(n_local, dtype=torch.long)
    conf_all = torch.zeros(n_local, dtype=torch.float16)

    def assign_all(res: KMeansResult) -> None:
        t = time.perf_counter()
        sync_norm_stats(model, comm)
        for idx in _blocks(n_local, block, None):
            q = student_t(space(*load(idx), pl_train), res.centroids, cfg.cluster.alpha)
            c, lab = q.max(1)
            lab_all[idx] = lab.cpu()
            conf_all[idx] = c.cpu().half()
        timings["assign"] += time.perf_counter() - t

    history: list[dict] = []
    steps, start_epoch = 0, 1
    if restore is None:
        km = recluster(None)
    else:
        km, history, steps, start_epoch = load_state(restore, model, opt, gen, comm, device)
    assign_all(km)
    prev = lab_all.clone()
    bar = _progress(epochs, progress and comm.rank == 0, initial=start_epoch - 1)
    for epoch in range(start_epoch, epochs + 1):
        model.train()
        use_cluster = cfg.loss.lam > 0 and epoch > sched.warm_epoch
        done, tot, inst, clu, rec_sum = 0, 0.0, 0.0, 0.0, 0.0
        t_epoch = time.perf_counter()
        blocks = _blocks(n_local, block, gen)
        while done < steps_per_epoch:
            idx = next(blocks, None)
            if idx is None:  # this rank ran out of cells before the slowest: start over
                blocks = _blocks(n_local, block, gen)
                continue
            if recon == "nb":
                t = time.perf_counter()
                x_np, p_np, c_np = source.read_counts(idx)
                xb, pb = torch.from_numpy(x_np).to(device), torch.from_numpy(p_np).to(device)
                cb = torch.from_numpy(c_np).to(device)
                lib_b = cb.sum(1)
                timings["read"] += time.perf_counter() - t
            else:
                xb, pb = load(idx)
            nbr = block_knn(pb, cfg.augment.n_neighbors)
            perm = torch.randperm(len(idx), generator=gen, device=gen.device)
            for j in range(0, len(idx) - b_local + 1, b_local):
                if done == steps_per_epoch:
                    break
                loc = perm[j : j + b_local]
                # loc and pick are drawn on the training device (``rng``), as xb and nbr live
                pick = torch.randint(nbr.shape[1], (len(loc),), generator=gen, device=gen.device)
                v1 = augment(xb[loc], xb[nbr[loc, pick]], cfg.augment, gen)
                pick = torch.randint(nbr.shape[1], (len(loc),), generator=gen, device=gen.device)
                v2 = augment(xb[loc], xb[nbr[loc, pick]], cfg.augment, gen)
                gl = torch.from_numpy(idx)[loc.cpu()]
                pseudo = (lab_all[gl].to(device), conf_all[gl].float().to(device))
                target = None
                if recon == "nb":
                    target = (cb[loc], lib_b[loc])
                elif recon == "gaussian":
                    target = (xb[loc],)
                li, lc, lr = train_step(
                    net, opt, v1, v2, pseudo if use_cluster else None, cfg, comm, target
                )
                done += 1
                steps += 1
                tot, inst, clu = tot + total_loss(cfg, li, lc, lr), inst + li, clu + lc
                rec_sum += lr
        timings["train"] += time.perf_counter() - t_epoch
        every = cfg.cluster.recluster_every
        if every is not None and (epoch % every == 0 or epoch == epochs):
            km = recluster(km)
            assign_all(km)
            sums = (tot, inst, clu, rec_sum)
            rec = round_record(epoch, steps, sums, done, km, prev, lab_all, use_cluster)
            prev = lab_all.clone()
            history.append(rec)
            if on_round is not None:
                state = make_state(epoch, steps, model, opt, km, history, gen, comm)
                on_round(rec, state)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    n_fit = int(comm.sum(torch.tensor(len(sample_idx), dtype=torch.long)))
    t = time.perf_counter()  # final labels: K-means on the sample (as in memory), all assigned
    final, metric = final_partition(sample_space(), n_clusters, cfg, n_fit, comm)
    timings["kmeans"] += time.perf_counter() - t
    t_final = time.perf_counter()
    labels_out: list[np.ndarray] = []
    emb_out: list[np.ndarray] = []
    for idx in _blocks(n_local, block, None):
        h = space(*load(idx))
        lab = assign_cells(h, final.centroids, metric).cpu().numpy()
        if on_block is not None:
            on_block(idx, lab, h.cpu().numpy())
        else:
            labels_out.append(lab)
            emb_out.append(h.cpu().numpy())
    timings["assign"] += time.perf_counter() - t_final
    timings["train_steps"] = float(steps)
    dim = final.centroids.shape[1]
    return TrainResult(
        embedding=np.concatenate(emb_out) if emb_out else np.zeros((0, dim), np.float32),
        labels=np.concatenate(labels_out) if labels_out else np.zeros(0, np.int64),
        centroids=final.centroids.cpu().numpy(),
        history=history,
        epochs=epochs,
        steps=steps,
        seconds=time.perf_counter() - t0,
        timings=timings,
        encoder_state=encoder_state(model),
        pca_center=np.asarray(pca_stats[0], dtype=np.float64),
        pca_scale=p_scale,
        device=device_name(device),
        threads=torch.get_num_threads(),
        decoder=recon or "off",
        pca_weight=pca_weight if cfg.cluster.space == "hybrid" else None,
        metric=metric_record(metric),
    )
