"""The single-process CICL training loop (pure torch/numpy; no AnnData, Ray or MLflow).

One epoch = shuffled minibatches; each step draws two fresh augmented views, computes the
instance term and (after warm-up) the cluster-aware term with pseudo-labels from the Student's t
head against the current centroids. Every ``recluster_every`` epochs K-means is re-fitted on the
embedding of all cells, so the centroids follow the embedding (the official code never moves
them).
"""

from __future__ import annotations

import copy
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
from cicl.comm import Comm
from cicl.config import CICLConfig
from cicl.model.augment import augment
from cicl.model.losses import CLUSTER_LOSSES, INSTANCE_LOSSES, gaussian_nll, nb_nll
from cicl.model.modules import (
    CICLModel,
    balanced_gene_groups,
    global_batch_norm,
    pca_projection,
    student_t,
)
from cicl.train.final import (  # noqa: F401 (re-exported: callers import them from here)
    assign_cells,
    final_kmeans,
    final_partition,
    load_metric,
    main_k,
    metric_record,
)


@dataclass
class TrainResult:
    embedding: np.ndarray  # (n, E) the clustering space (see ClusterConfig.space), eval mode
    labels: np.ndarray  # (n,) final cluster labels
    centroids: np.ndarray  # (k, E)
    history: list[dict] = field(default_factory=list)  # one entry per reclustering round
    epochs: int = 0
    steps: int = 0
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase
    # what maps new cells into the same space (``embed_new``): the trained encoder's weights
    # and, for the hybrid space, the PCA block's centre and scale
    encoder_state: dict[str, np.ndarray] = field(default_factory=dict)
    pca_center: np.ndarray | None = None
    pca_scale: float = 1.0
    device: str = "cpu"  # what trained it (``device_name``), reported in uns and the summary
    # torch's CPU threads per process, reported with the time it took (the labels do not
    # depend on it: see ``GlobalBatchNorm1d``)
    threads: int = 1
    # what the decoder reconstructed ("nb": raw counts, "gaussian": the scaled input, "off"):
    # ``loss.recon: auto`` decides from the input, so the result says what it chose
    decoder: str = "off"
    # the hybrid space's PCA-block weight (``cluster_pca_weight``: set, or by cell count), so
    # users see what the rule chose; None for the other spaces
    pca_weight: float | None = None
    # the final partition's fitted metric (``cluster.metric``: tied / full): how a cell is
    # assigned to a centroid (``metric_record``'s arrays); None: Euclidean
    metric: dict[str, np.ndarray | float] | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    """The device as users read it: cpu, or the CUDA device and its model, e.g.
    cuda:0 (NVIDIA H100 80GB HBM3)."""
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def rng(device: torch.device, seed: int) -> torch.Generator:
    """The generator for augmentations and shuffling, on the training device: on a GPU, drawing
    the views' random numbers on the CPU and copying them over took longer than the step itself.
    Same seed, same kind of device -> same run (CPU and CUDA streams differ)."""
    return torch.Generator(device=device).manual_seed(seed)


def auto_epochs(n_cells: int, batch_size: int, epochs: int, min_steps: int, max_steps: int) -> int:
    """Epochs so that training takes ``epochs`` passes, but between ``min_steps`` and
    ``max_steps`` optimiser steps: small datasets are memorised by the instance term if trained
    for many steps, large ones need passes to learn, and atlases are capped in cost."""
    steps_per_epoch = max(1, n_cells // min(batch_size, n_cells))
    steps = min(max(epochs * steps_per_epoch, min_steps), max_steps)
    return max(1, math.ceil(steps / steps_per_epoch))


@dataclass(frozen=True)
class Schedule:
    """How long training runs: epochs, this rank's share of the global batch, steps per epoch
    (the same on every rank: the smallest shard's) and the last warm-up epoch."""

    epochs: int
    batch_local: int
    steps_per_epoch: int
    warm_epoch: int


def schedule(cfg: CICLConfig, n: int, n_local: int, comm: Comm) -> Schedule:
    """The training schedule for ``n`` cells, ``n_local`` of them on this rank."""
    bs = min(cfg.train.batch_size, n)
    epochs = cfg.train.epochs or auto_epochs(
        n, bs, cfg.train.auto_epochs, cfg.train.min_steps, cfg.train.max_steps
    )
    b_local = max(1, bs // comm.world)  # the global batch is split evenly over ranks
    steps = int(comm.min(torch.tensor(max(1, n_local // b_local))))
    if cfg.train.steps_per_epoch is not None:
        steps = min(steps, cfg.train.steps_per_epoch)
    return Schedule(epochs, b_local, steps, int(round(cfg.loss.warmup_frac * epochs)))


def round_kmeans(
    h: torch.Tensor, k: int, cfg: CICLConfig, prev: KMeansResult | None, comm: Comm
) -> KMeansResult:
    """A reclustering round's K-means: ``cluster.n_init`` restarts and, after the first round,
    a warm start from the previous round's centroids; whichever fits better."""
    res = kmeans(
        h, k, n_init=cfg.cluster.n_init, max_iter=cfg.cluster.max_iter, seed=cfg.seed, comm=comm
    )
    if prev is not None:
        warm = lloyd(h, prev.centroids, max_iter=cfg.cluster.max_iter, comm=comm)
        if warm.inertia <= res.inertia:
            res = warm
    return res


def round_record(
    epoch: int,
    steps: int,
    sums: tuple[float, float, float, float],
    n_steps: int,
    km: KMeansResult,
    prev_labels: torch.Tensor,
    labels: torch.Tensor,
    cluster_active: bool,
) -> dict:
    """One entry of the training history: the epoch's mean losses (``sums`` = total, instance,
    cluster, reconstruction over ``n_steps`` steps), the round's inertia and how much of this
    rank's labelling changed since the last entry (1 - ARI: K-means restarts renumber
    clusters, so the change must be permutation-invariant)."""
    nb = max(n_steps, 1)
    tot, inst, clu, rec = sums
    return {
        "epoch": epoch,
        "step": steps,
        "loss": tot / nb,
        "instance_loss": inst / nb,
        "cluster_loss": clu / nb,
        "recon_loss": rec / nb,
        "inertia": km.inertia,
        "label_change": 1.0
        - float(adjusted_rand_score(prev_labels.cpu().numpy(), labels.cpu().numpy())),
        "cluster_active": bool(cluster_active),
    }


def recon_kind(cfg: CICLConfig, has_counts: bool) -> str | None:
    """The reconstruction term that trains (``loss.recon``): "nb" on raw counts, "gaussian"
    on the scaled input, or None. "auto" takes nb when the counts are there."""
    kind = cfg.loss.recon
    if kind == "off" or cfg.loss.recon_weight == 0:
        return None
    if kind == "auto":
        return "nb" if has_counts else "gaussian"
    if kind == "nb" and not has_counts:
        raise ValueError("loss.recon='nb' needs the raw counts of the genes used")
    return kind


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


@torch.no_grad()
def sync_norm_stats(model: torch.nn.Module, comm: Comm) -> None:
    """Average the BatchNorm running statistics over ranks, so every rank embeds its cells
    with the same normalisation (DDP syncs gradients, not buffers). Optimiser steps keep them
    equal already (``GlobalBatchNorm1d``); train-mode forwards without gradient (``cluster.
    pseudo_label_mode: train``) update each rank's own. A no-op in one process."""
    if comm.world == 1:
        return
    for mod in model.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) and mod.running_mean is not None:
            mod.running_mean.copy_(comm.sum(mod.running_mean) / comm.world)
            mod.running_var.copy_(comm.sum(mod.running_var) / comm.world)


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
    on_round: Callable[[dict, dict], None] | None = None,
    comm: Comm | None = None,
    groups: np.ndarray | None = None,
    pca_init: tuple[np.ndarray, np.ndarray] | None = None,
    restore: dict | None = None,
    round_metrics: Callable[[np.ndarray, Callable[[], np.ndarray]], dict] | None = None,
    counts: np.ndarray | None = None,
) -> TrainResult:
    """Train CICL on this process' cells and cluster them.

    In one process ``x`` (cells x genes, scaled) and ``pcs`` hold every cell; ``counts`` (the
    same cells x genes, raw counts; None for non-count input) is what the negative binomial
    decoder reconstructs. Under
    ``torch.distributed`` (Ray Train workers, torchrun) they hold this rank's shard; ``comm``
    makes the contrastive loss see the global batch (projections gathered with gradients), DDP
    averages gradients, and K-means runs across shards, so the objective is the one-process one.
    ``groups``/``pca_init`` (gene modules, PCA-initialised skip) must then be the same on every
    rank: computed once by the caller; in one process they are derived here.

    ``on_round(record, checkpoint)`` is called after every reclustering round on every rank
    (``checkpoint`` is the full training state, RNG of every rank included; pass it back as
    ``restore`` to continue exactly where it was taken). ``round_metrics(labels, embedding)``
    adds entries to each round's record (e.g. a sweep objective; ``embedding()`` computes this
    rank's clustering-space embedding on demand).
    """
    t0 = time.perf_counter()
    comm = comm or Comm()
    rank = comm.rank if comm.world > 1 else rank
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    gen = rng(device, cfg.seed + rank)  # augmentation and shuffling: seed + rank
    n_local = x.shape[0]
    n = int(comm.sum(torch.tensor(n_local, dtype=torch.long)))
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)

    if cfg.model.encoder == "transformer" and groups is None:
        groups = balanced_gene_groups(gene_loadings(x, pcs), cfg.model.n_tokens, seed=cfg.seed)
    if cfg.model.encoder in ("transformer", "mlp") and cfg.model.pca_residual and pca_init is None:
        pca_init = pca_projection(x, pcs, cfg.model.embed_dim)
    recon = recon_kind(cfg, counts is not None)
    model, net, opt = build_model(x.shape[1], cfg, groups, pca_init, device, comm, recon)
    nbr = torch.from_numpy(knn_indices(pcs, cfg.augment.n_neighbors)).to(device)
    ct = lib = None
    if recon == "nb":
        ct = torch.from_numpy(np.ascontiguousarray(counts, dtype=np.float32)).to(device)
        lib = ct.sum(1)

    def target(idx: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """What the decoder reconstructs for these cells: (counts, library) or (scaled x,)."""
        if recon == "nb":
            return ct[idx], lib[idx]
        return (xt[idx],) if recon == "gaussian" else None

    sched = schedule(cfg, n, n_local, comm)
    epochs = sched.epochs

    def nbr_rows(idx: torch.Tensor) -> torch.Tensor:
        pick = torch.randint(nbr.shape[1], (idx.shape[0],), generator=gen, device=gen.device)
        return xt[nbr[idx, pick]]

    static = None
    if cfg.augment.resample == "static":  # official code: two views drawn once
        all_idx = torch.arange(n_local, device=device)
        static = (
            augment(xt, nbr_rows(all_idx), cfg.augment, gen),
            augment(xt, nbr_rows(all_idx), cfg.augment, gen),
        )

    pca_block = pca_center = None
    pca_scale = 1.0
    pca_weight = cluster_pca_weight(cfg, n) if cfg.cluster.space == "hybrid" else None
    if pca_weight is not None:
        pca_center, pca_scale = _pca_stats(pcs, pca_weight, comm)
        pca_block = torch.from_numpy(_pca_part(pcs, pca_center, pca_scale)).to(device)

    def space(h: torch.Tensor) -> torch.Tensor:
        return cluster_space(h, pca_block, cfg.cluster.space)

    pl_train = cfg.cluster.pseudo_label_mode == "train"

    def pseudo_labels(
        res: KMeansResult, h: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Clustering head: Student's t soft assignment of every cell to the round's centroids
        (argmax = nearest centroid; the max probability is the confidence). ``h``: the round's
        eval-mode embedding when already computed (train mode draws a fresh one)."""
        if h is None or pl_train:
            sync_norm_stats(model, comm)
            h = space(embed(model, xt, train_mode=pl_train))
        return student_t(h, res.centroids, cfg.cluster.alpha).max(1)

    def recluster(prev: KMeansResult | None) -> tuple[KMeansResult, torch.Tensor]:
        sync_norm_stats(model, comm)
        h = space(embed(model, xt, train_mode=pl_train))
        return round_kmeans(h, n_clusters, cfg, prev, comm), h

    history: list[dict] = []
    h_round: torch.Tensor | None = None  # the last round's embedding, reused for pseudo-labels
    steps = 0
    start_epoch = 1
    if restore is None:
        km, h_round = recluster(None)
    else:
        km, history, steps, start_epoch = load_state(restore, model, opt, gen, comm, device)
    conf_all, lab_all = pseudo_labels(km, h_round)
    prev_labels = lab_all.clone()
    bar = _progress(epochs, progress and rank == 0, initial=start_epoch - 1)
    for epoch in range(start_epoch, epochs + 1):
        model.train()
        perm = torch.randperm(n_local, generator=gen, device=gen.device)
        use_cluster = cfg.loss.lam > 0 and epoch > sched.warm_epoch
        tot = inst_tot = clu_tot = rec_tot = 0.0
        for i in range(sched.steps_per_epoch):
            idx = perm[i * sched.batch_local : (i + 1) * sched.batch_local]
            if static is not None:
                v1, v2 = static[0][idx], static[1][idx]
            else:
                xb = xt[idx]
                v1 = augment(xb, nbr_rows(idx), cfg.augment, gen)
                v2 = augment(xb, nbr_rows(idx), cfg.augment, gen)
            lab = (lab_all[idx], conf_all[idx]) if use_cluster else None
            li, lc, lr = train_step(net, opt, v1, v2, lab, cfg, comm, target(idx))
            steps += 1
            tot += total_loss(cfg, li, lc, lr)
            inst_tot += li
            clu_tot += lc
            rec_tot += lr
        every = cfg.cluster.recluster_every
        if every is None and use_cluster:
            # official code: centroids fixed, pseudo-labels re-derived as the embedding moves
            conf_all, lab_all = pseudo_labels(km)
        if every is not None and (epoch % every == 0 or epoch == epochs):
            km, h_round = recluster(km)
            conf_all, lab_all = pseudo_labels(km, h_round)
        log_every = every or 5  # without reclustering, still record every 5 epochs (as the code)
        if epoch % log_every == 0 or epoch == epochs:
            sums = (tot, inst_tot, clu_tot, rec_tot)
            rec = round_record(
                epoch, steps, sums, sched.steps_per_epoch, km, prev_labels, lab_all, use_cluster
            )
            if round_metrics is not None:
                rec.update(
                    round_metrics(
                        lab_all.cpu().numpy(), lambda: space(embed(model, xt)).cpu().numpy()
                    )
                )  # the round's stats are synced: recluster or pseudo_labels ran just before
            prev_labels = lab_all.clone()
            history.append(rec)
            if on_round is not None:
                on_round(rec, make_state(epoch, steps, model, opt, km, history, gen, comm))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{tot / max(sched.steps_per_epoch, 1):.3f}")
    if bar is not None:
        bar.close()

    sync_norm_stats(model, comm)
    h = space(embed(model, xt))
    final, metric = final_partition(h, n_clusters, cfg, n, comm)
    labels, cents = final.labels, final.centroids
    return TrainResult(
        embedding=h.cpu().numpy(),
        labels=labels.cpu().numpy(),
        centroids=cents.cpu().numpy(),
        history=history,
        epochs=epochs,
        steps=steps,
        seconds=time.perf_counter() - t0,
        encoder_state=encoder_state(model),
        pca_center=pca_center,
        pca_scale=pca_scale,
        device=device_name(device),
        threads=torch.get_num_threads(),
        decoder=recon or "off",
        pca_weight=pca_weight,
        metric=metric_record(metric),
    )


def encoder_state(model: CICLModel) -> dict[str, np.ndarray]:
    """The encoder's weights and buffers as CPU arrays (what ``embed_new`` rebuilds it from)."""
    return {k: v.detach().cpu().numpy() for k, v in model.encoder.state_dict().items()}


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


def make_state(
    epoch: int,
    steps: int,
    model: CICLModel,
    opt: torch.optim.Optimizer,
    km: KMeansResult,
    history: list[dict],
    gen: torch.Generator,
    comm: Comm,
) -> dict:
    """The full training state after a round (collective: gathers every rank's RNG states).
    Only tensors, numbers, strings and containers: loads with ``torch.load(weights_only=True)``.
    A copy, not views of the live weights: a caller may keep it while training goes on."""
    return {
        "epoch": epoch,
        "steps": steps,
        "world": comm.world,
        "model": copy.deepcopy(model.state_dict()),
        "optimizer": copy.deepcopy(opt.state_dict()),
        "centroids": km.centroids.cpu(),
        "inertia": km.inertia,
        "history": list(history),
        "rng_aug": comm.gather(gen.get_state()[None]),
        "rng_torch": comm.gather(torch.get_rng_state()[None]),
    }


def load_state(
    state: dict,
    model: CICLModel,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    comm: Comm,
    device: torch.device,
) -> tuple[KMeansResult, list[dict], int, int]:
    """Restore ``make_state``'s output; returns (centroids, history, steps, next epoch). RNG
    streams continue exactly when the world size is unchanged, else they start afresh."""
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    cents = state["centroids"].to(device)
    km = KMeansResult(cents, torch.empty(0, dtype=torch.long), float(state["inertia"]), 0)
    same_stream = state["rng_aug"].shape[1] == gen.get_state().numel()  # CPU vs CUDA state
    if int(state["world"]) == comm.world and same_stream:
        gen.set_state(state["rng_aug"][comm.rank].clone())
        torch.set_rng_state(state["rng_torch"][comm.rank].clone())
    return km, list(state["history"]), int(state["steps"]), int(state["epoch"]) + 1


def build_model(
    n_genes: int,
    cfg: CICLConfig,
    groups: np.ndarray | None,
    pca_init: tuple[np.ndarray, np.ndarray] | None,
    device: torch.device,
    comm: Comm,
    recon: str | None = None,
) -> tuple[CICLModel, torch.nn.Module, torch.optim.Optimizer]:
    """The model (with a decoder for ``recon``), what to call for training steps (DDP-wrapped
    across ranks), its optimiser. Seed torch before calling: every rank must start from the
    same weights."""
    model = CICLModel(n_genes, cfg.model, groups, pca_init, recon).to(device)
    global_batch_norm(model, comm)  # BatchNorm over the global batch, as in one process
    net: torch.nn.Module = model
    if comm.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
    )
    return model, net, opt


def total_loss(cfg: CICLConfig, instance: float, cluster: float, recon: float) -> float:
    """The weighted objective from its parts (as ``train_step`` returns them)."""
    lo = cfg.loss
    return lo.recon_weight * recon + lo.instance_weight * instance + lo.lam * cluster


def recon_loss(decoder: torch.nn.Module, out: torch.Tensor, target: tuple) -> torch.Tensor:
    """The decoder's loss on its output for these cells: negative binomial on (counts,
    library), or squared error on (scaled x,)."""
    if decoder.kind == "nb":
        counts, library = target
        return nb_nll(counts, out, library, decoder.log_theta)
    return gaussian_nll(target[0], out)


def needs_two_views(cfg: CICLConfig, cluster_term: bool) -> bool:
    """Whether a step encodes both augmented views: only a contrastive term (the instance
    term, or the cluster-aware term once active) compares them; reconstruction needs one."""
    return cfg.loss.instance_weight > 0 or cluster_term


def train_step(
    net: torch.nn.Module,
    opt: torch.optim.Optimizer,
    v1: torch.Tensor,
    v2: torch.Tensor,
    pseudo: tuple[torch.Tensor, torch.Tensor] | None,
    cfg: CICLConfig,
    comm: Comm,
    target: tuple[torch.Tensor, ...] | None = None,
) -> tuple[float, float, float]:
    """One optimiser step on this rank's cells. The decoder reconstructs ``target`` (the
    cells' counts and library sizes, or their clean scaled profile) from the embedding of
    their augmented view(s): a denoising objective. The contrastive terms see both views and
    are over the global batch: projections of all ranks are gathered with gradients, so N
    ranks optimise what one process would. ``pseudo`` = (labels, confidences) of these cells,
    or None before warm-up ends. Only the views a term needs are encoded: without a
    contrastive term this step, one view. Returns (instance, cluster, reconstruction) losses."""
    b = v1.shape[0]
    lo = cfg.loss
    two = needs_two_views(cfg, pseudo is not None)
    _, z, rec = net(torch.cat([v1, v2]) if two else v1)
    model = net.module if hasattr(net, "module") else net
    loss = z.sum() * 0.0  # keeps the projection head in the graph when it is unused (DDP)
    li = lc = lr = 0.0
    if rec is not None and target is not None:
        tgt = tuple(torch.cat([t, t]) for t in target) if two else target
        loss_r = recon_loss(model.decoder, rec, tgt)
        loss = loss + lo.recon_weight * loss_r
        lr = loss_r.item()
    if two:
        z1, z2 = comm.gather_grad(z[:b]), comm.gather_grad(z[b:])
        tau, kern = lo.temperature, lo.kernel
        if lo.instance_weight > 0:
            loss_i = INSTANCE_LOSSES[lo.instance_loss](z1, z2, tau, kern)
            loss = loss + lo.instance_weight * loss_i
            li = loss_i.item()
        if pseudo is not None:
            labels, conf = pseudo
            valid = comm.gather(conf >= lo.confidence)
            loss_c = CLUSTER_LOSSES[lo.cluster_loss](z1, z2, comm.gather(labels), tau, valid, kern)
            loss = loss + lo.lam * loss_c
            lc = loss_c.item()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return li, lc, lr


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


def _progress(total: int, enabled: bool, initial: int = 0):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="CICL training", unit="epoch", leave=False)
