"""The training plan: one CICL training run, however its cells arrive.

An epoch is a run of optimiser steps. Each step draws two augmented views of a minibatch (fresh
every step, or the pair drawn once: ``augment.resample: static``) and minimises the
reconstruction of the cells, the instance term and, after warm-up, the cluster-aware term with
the cells' pseudo-labels. Every ``cluster.recluster_every`` epochs K-means is re-fitted on the
embedding, so the centroids follow it (the official code never moves them), and every cell gets
its pseudo-label from the Student's t head (nearest centroid, with its confidence); without
reclustering (``null``, the official code) the pseudo-labels are re-derived against the fixed
centroids every epoch instead, and the history records every 5 epochs. Training ends with the
final partition (``cicl.train.final``).

``TrainingPlan`` does all of that. Where the cells come from is a ``Cells``: in memory
(``cicl.train.loop``: every local cell a tensor, mixing neighbours from a kNN graph of all of
them, K-means on every cell) or streamed (``cicl.train.stream``: blocks read from disk,
neighbours within the block, K-means on a fixed sample, pseudo-labels assigned block by block).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score

from cicl.cluster.kmeans import KMeansResult, kmeans, lloyd
from cicl.cluster.mixture import Metric
from cicl.comm import Comm
from cicl.config import CICLConfig
from cicl.model.augment import augment
from cicl.model.losses import CLUSTER_LOSSES, INSTANCE_LOSSES, gaussian_nll, nb_nll
from cicl.model.modules import CICLModel, global_batch_norm
from cicl.train.final import final_partition, metric_record

RoundMetrics = Callable[[np.ndarray, Callable[[], np.ndarray]], dict]


@dataclass(frozen=True)
class LossOutput:
    """One step's losses: the weighted total that was minimised, and each term unweighted."""

    total: float
    instance: float
    cluster: float
    recon: float


@dataclass(frozen=True)
class Batch:
    """A minibatch: rows ``rows`` of ``x`` (scaled expression) and, in ``nbr``, the rows of
    their mixing neighbours; ``cells``: their local indices (for their pseudo-labels);
    ``counts``/``library``: the raw counts of ``x``'s rows and their sums (the count decoder's
    target); ``views``: the two views when drawn once (``augment.resample: static``)."""

    cells: torch.Tensor
    rows: torch.Tensor
    x: torch.Tensor
    nbr: torch.Tensor
    counts: torch.Tensor | None = None
    library: torch.Tensor | None = None
    views: tuple[torch.Tensor, torch.Tensor] | None = None


class Cells(Protocol):
    """How the plan reaches this rank's cells: all that the in-memory and streamed paths do
    differently. Embeddings are the plan's model's, in the clustering space."""

    fits_all: bool  # whether K-means fits every local cell (else a sample)
    n_fit: int  # the cells K-means fits, all ranks together
    pca_center: np.ndarray | None  # the hybrid space's PCA block: (pcs - centre) * scale, of
    pca_scale: float  # RMS norm pca_weight (None outside the hybrid space)
    pca_weight: float | None

    def batches(self, size: int, steps: int, gen: torch.Generator) -> Iterator[Batch]:
        """An epoch: ``steps`` minibatches of ``size`` cells, shuffled with ``gen``."""

    def fit_space(self, train_mode: bool) -> torch.Tensor:
        """The embedding of the cells K-means fits."""

    def assign(
        self, centroids: torch.Tensor, train_mode: bool, h: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """(confidence, label) of the local cells under the Student's t head (``h``: the
        fitted cells' embedding, when the round has just computed it)."""

    def label(self, final: KMeansResult, metric: Metric | None, h_fit: torch.Tensor) -> tuple:
        """(embedding, label) arrays of every local cell under the final partition."""


@dataclass
class TrainResult:
    embedding: np.ndarray  # (n, E) the clustering space (see ClusterConfig.space), eval mode
    labels: np.ndarray  # (n,) final cluster labels
    centroids: np.ndarray  # (k, E)
    # one entry per reclustering round (without rounds: every 5 epochs) and the last epoch
    history: list[dict] = field(default_factory=list)
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
    budget_hit: bool = False  # training stopped at train.time_budget, before its schedule's end
    precision: str = "fp32"  # what the training forward ran in (``train.precision`` resolved)


class TrainingPlan:
    """One training run on this rank's ``shape`` = (cells, genes) (see the module docstring):
    the model, its optimiser and RNG, the centroids, every cell's pseudo-label, the history.
    ``fit(cells)`` runs it. Under ``torch.distributed`` (Ray Train workers, torchrun) every
    rank runs one on its shard; ``comm`` makes the contrastive loss see the global batch
    (projections gathered with gradients), BatchNorm its statistics, DDP average gradients
    and K-means run across shards, so the objective is the one-process one. ``groups`` and
    ``pca_init`` (gene modules, PCA-initialised skip) must then be the same on every rank."""

    def __init__(
        self,
        n_clusters: int,
        cfg: CICLConfig,
        comm: Comm,
        shape: tuple[int, int],
        has_counts: bool,
        groups: np.ndarray | None = None,
        pca_init: tuple[np.ndarray, np.ndarray] | None = None,
        rank: int = 0,
    ):
        if cfg.model.pca_residual and cfg.model.encoder != "reference" and pca_init is None:
            raise ValueError("model.pca_residual needs the PCA projection (pca_init)")
        self.t0 = time.perf_counter()
        self.k, self.cfg, self.comm, self.rank = n_clusters, cfg, comm, rank
        self.device = resolve_device(cfg.train.device)
        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        self.gen = rng(self.device, cfg.seed + rank)  # augmentation and shuffling: seed + rank
        self.n = int(comm.sum(torch.tensor(shape[0], dtype=torch.long)))
        self.recon = recon_kind(cfg, has_counts)
        self.model, self.net, self.opt = build_model(
            shape[1], cfg, groups, pca_init, self.device, comm, self.recon
        )
        if rank:  # dropout masks: each rank its own stream (rank 0 keeps one process' stream)
            torch.manual_seed(cfg.seed + rank)
        self.sched = schedule(cfg, self.n, shape[0], comm)
        self.pl_train = cfg.cluster.pseudo_label_mode == "train"
        self.km: KMeansResult | None = None
        self.conf = self.labels = self.prev_labels = torch.empty(0)
        self.history: list[dict] = []
        self.steps = 0
        self.budget_hit = False  # train.time_budget spent: training stopped early
        self.cluster_term = False  # whether this epoch's steps read pseudo-labels
        self.timings = dict.fromkeys(("read", "train", "kmeans", "assign"), 0.0)

    def fit(
        self,
        cells: Cells,
        *,
        restore: dict | None = None,
        on_round: Callable[[dict, dict], None] | None = None,
        round_metrics: RoundMetrics | None = None,
        progress: bool = False,
    ) -> TrainResult:
        """Train on ``cells`` and partition them. ``on_round(record, state)`` is called with
        every history entry on every rank; ``state`` is the full training state (collective:
        every rank's RNG), to pass back as ``restore`` to continue exactly where it was taken.
        ``round_metrics(labels, embedding)`` adds to each entry (``embedding()`` computes the
        rank's on demand, so every cell's: in memory only)."""
        if round_metrics is not None and not cells.fits_all:
            raise ValueError("round_metrics needs every cell's embedding: cells in memory only")
        self.cells, self.on_round, self.round_metrics = cells, on_round, round_metrics
        start = 1
        if restore is None:
            self.recluster()
        else:
            self.km, self.history, self.steps, start = load_state(
                restore, self.model, self.opt, self.gen, self.comm, self.device
            )
            self.refresh_pseudo_labels()
        self.prev_labels = self.labels.clone()
        sched = self.sched
        bar = _progress(sched.epochs, progress and self.rank == 0, initial=start - 1)
        self.epoch = start - 1
        for epoch in range(start, sched.epochs + 1):
            self.model.train()
            cluster_term = self.cfg.loss.lam > 0 and epoch > sched.warm_epoch
            self.cluster_term = cluster_term  # streamed pools label their cells only then
            with self.timed("train"):
                batches = cells.batches(sched.batch_local, sched.steps_per_epoch, self.gen)
                losses = []
                for batch in batches:
                    losses.append(self.step(batch, cluster_term))
                    if self.out_of_time():
                        break
            self.epoch = epoch
            self.end_epoch(epoch, cluster_term, losses)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{sum(o.total for o in losses) / max(len(losses), 1):.3f}")
            if self.budget_hit:
                break
        if bar is not None:
            bar.close()
        return self.finalize()

    def out_of_time(self) -> bool:
        """Whether ``train.time_budget`` is spent (the slowest rank's clock, so every rank
        stops at the same step)."""
        budget = self.cfg.train.time_budget
        if budget is None:
            return False
        spent = torch.tensor(time.perf_counter() - self.t0, dtype=torch.float64)
        self.budget_hit = bool(self.comm.max(spent) > budget)
        return self.budget_hit

    def step(self, batch: Batch, cluster_term: bool) -> LossOutput:
        """One optimiser step on ``batch``, with the cells' pseudo-labels when ``cluster_term``."""
        v1, v2 = batch.views if batch.views is not None else (self.view(batch), self.view(batch))
        c, dev = batch.cells, self.device  # the cells' pseudo-labels, once the term is on
        pseudo = (self.labels[c].to(dev), self.conf[c].float().to(dev)) if cluster_term else None
        target = None  # what the decoder reconstructs: (counts, library) or (scaled x,)
        if self.recon == "nb":
            target = (batch.counts[batch.rows], batch.library[batch.rows])
        elif self.recon == "gaussian":
            target = (batch.x[batch.rows],)
        cfg = self.cfg
        li, lc, lr = train_step(self.net, self.opt, v1, v2, pseudo, cfg, self.comm, target)
        self.steps += 1
        return LossOutput(total_loss(cfg, li, lc, lr), li, lc, lr)

    def view(self, batch: Batch) -> torch.Tensor:
        """One augmented view of the batch's cells, each mixed (``augment.neighbor_prob``) with
        one of its neighbours picked at random."""
        g, x = self.gen, batch.x
        pick = torch.randint(batch.nbr.shape[1], (len(batch.rows),), generator=g, device=g.device)
        return augment(x[batch.rows], x[batch.nbr[batch.rows, pick]], self.cfg.augment, g)

    def recluster(self) -> None:
        """A reclustering round: K-means on the embedding (``round_kmeans``: restarts, and a
        warm start from the last round's centroids), then every cell's pseudo-label. Streamed
        without the cluster-aware term, pseudo-labels are never read and the rounds only feed
        the history: after the first, a round is the warm start alone (one Lloyd run, not
        ``cluster.n_init`` restarts on the sample: an atlas gets a round every few epochs)."""
        with self.timed("kmeans"):
            sync_norm_stats(self.model, self.comm)
            h = self.cells.fit_space(self.pl_train)
            if self.km is not None and not self.cells.fits_all and self.cfg.loss.lam == 0:
                self.km = lloyd(
                    h, self.km.centroids, max_iter=self.cfg.cluster.max_iter, comm=self.comm
                )
            else:
                self.km = round_kmeans(h, self.k, self.cfg, self.km, self.comm)
        self.refresh_pseudo_labels(h)

    def refresh_pseudo_labels(self, h: torch.Tensor | None = None) -> None:
        """The local cells' pseudo-labels and confidences against the current centroids
        (``Cells.assign``). ``h``: the fitted cells' embedding when the round has just computed
        it (in eval mode; a train-mode one is drawn afresh, with its own dropout)."""
        with self.timed("assign"):
            fresh = None if self.pl_train else h
            if fresh is None:
                sync_norm_stats(self.model, self.comm)
            self.conf, self.labels = self.cells.assign(self.km.centroids, self.pl_train, fresh)

    def end_epoch(self, epoch: int, cluster_term: bool, losses: list[LossOutput]) -> None:
        """A reclustering round every ``recluster_every`` epochs and after the last one; without
        rounds, the pseudo-labels against the fixed centroids once the cluster term is on. A
        history entry every round (without rounds, every 5 epochs, as the official code) and
        after the last epoch."""
        every = self.cfg.cluster.recluster_every
        last = epoch == self.sched.epochs or self.budget_hit
        if every is None and cluster_term:
            self.refresh_pseudo_labels()
        if every is not None and (epoch % every == 0 or last):
            self.recluster()
        if epoch % (every or 5) != 0 and not last:
            return
        rec = round_record(
            epoch, self.steps, losses, self.km, self.prev_labels, self.labels, cluster_term
        )
        if self.round_metrics is not None:  # the statistics are synced: assigned just before

            def embedding() -> np.ndarray:
                return self.cells.fit_space(False).cpu().numpy()

            rec.update(self.round_metrics(self.labels.cpu().numpy(), embedding))
        self.prev_labels = self.labels.clone()
        self.history.append(rec)
        if self.on_round is not None:
            state = make_state(
                epoch, self.steps, self.model, self.opt, self.km, self.history, self.gen, self.comm
            )
            self.on_round(rec, state)

    def finalize(self) -> TrainResult:
        """The final partition of the cells K-means fits, embedded in eval mode, and every
        cell's label under it."""
        with self.timed("kmeans"):
            sync_norm_stats(self.model, self.comm)
            h = self.cells.fit_space(False)
            final, metric = final_partition(h, self.k, self.cfg, self.cells.n_fit, self.comm)
        with self.timed("assign"):
            embedding, labels = self.cells.label(final, metric, h)
        self.timings["train_steps"] = float(self.steps)
        return TrainResult(
            embedding=embedding,
            labels=labels,
            centroids=final.centroids.cpu().numpy(),
            history=self.history,
            epochs=self.epoch,
            steps=self.steps,
            budget_hit=self.budget_hit,
            precision="bf16" if autocast_dtype(self.cfg.train.precision, self.device) else "fp32",
            seconds=time.perf_counter() - self.t0,
            timings=self.timings,
            encoder_state=encoder_state(self.model),
            pca_center=self.cells.pca_center,
            pca_scale=self.cells.pca_scale,
            device=device_name(self.device),
            threads=torch.get_num_threads(),
            decoder=self.recon or "off",
            pca_weight=self.cells.pca_weight,
            metric=metric_record(metric),
        )

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Adds the time the block takes to ``timings[phase]``."""
        t = time.perf_counter()
        yield
        self.timings[phase] += time.perf_counter() - t


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
    """The training schedule for ``n`` cells, ``n_local`` of them on this rank. The automatic
    one trains ``auto_epochs`` passes within [``min_steps``, ``max_steps``] steps, but never
    less than one pass (an atlas is seen whole, its cost grows with it), and cuts passes
    longer than ``train.epoch_steps`` steps into epochs of that length: reclustering rounds
    come every ``cluster.recluster_every`` epochs, so a large dataset gets rounds while it
    trains, not only at its end."""
    t = cfg.train
    bs = min(t.batch_size, n)
    b_local = max(1, bs // comm.world)  # the global batch is split evenly over ranks
    steps = int(comm.min(torch.tensor(max(1, n_local // b_local))))  # one pass
    if t.steps_per_epoch is not None:
        steps = min(steps, t.steps_per_epoch)
    epochs = t.epochs
    if epochs is None:
        epochs = auto_epochs(n, bs, t.auto_epochs, t.min_steps, t.max_steps)
        if t.steps_per_epoch is None and steps > t.epoch_steps:
            total = epochs * steps  # whole passes
            epochs, steps = math.ceil(total / t.epoch_steps), t.epoch_steps
    return Schedule(epochs, b_local, steps, int(round(cfg.loss.warmup_frac * epochs)))


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
    contrastive term this step, one view. The forward runs in ``train.precision``
    (``forward_precision``), the losses in fp32. Returns (instance, cluster, reconstruction)
    losses."""
    b = v1.shape[0]
    lo = cfg.loss
    two = needs_two_views(cfg, pseudo is not None)
    with forward_precision(cfg.train.precision, v1.device):
        _, z, rec = net(torch.cat([v1, v2]) if two else v1)
    z, rec = z.float(), None if rec is None else rec.float()  # losses in fp32 (no-op in fp32)
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


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype a training forward autocasts to under ``train.precision``, or None: plain
    fp32. ``auto`` takes bf16 only on a CUDA GPU that supports it (Ampere and later), where it
    speeds the matrix products; elsewhere fp32, so a CPU run is bitwise the fp32 one. ``bf16``
    is honoured on any device (on CPU: slow, for tests)."""
    if precision == "bf16":
        return torch.bfloat16
    native = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    if precision == "auto" and native:
        return torch.bfloat16
    return None


def forward_precision(precision: str, device: torch.device):
    """The context a training forward runs in: ``torch.autocast`` to ``autocast_dtype``, or
    nothing at all (fp32)."""
    dtype = autocast_dtype(precision, device)
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


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
    losses: list[LossOutput],
    km: KMeansResult,
    prev_labels: torch.Tensor,
    labels: torch.Tensor,
    cluster_active: bool,
) -> dict:
    """One entry of the training history: the epoch's mean losses, the round's inertia and how
    much of this rank's labelling changed since the last entry (1 - ARI: K-means restarts
    renumber clusters, so the change must be permutation-invariant)."""
    nb = max(len(losses), 1)
    return {
        "epoch": epoch,
        "step": steps,
        "loss": sum(o.total for o in losses) / nb,
        "instance_loss": sum(o.instance for o in losses) / nb,
        "cluster_loss": sum(o.cluster for o in losses) / nb,
        "recon_loss": sum(o.recon for o in losses) / nb,
        "inertia": km.inertia,
        "label_change": 1.0
        - float(adjusted_rand_score(prev_labels.cpu().numpy(), labels.cpu().numpy())),
        "cluster_active": bool(cluster_active),
    }


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


def encoder_state(model: CICLModel) -> dict[str, np.ndarray]:
    """The encoder's weights and buffers as CPU arrays (what ``embed_new`` rebuilds it from)."""
    return {k: v.detach().cpu().numpy() for k, v in model.encoder.state_dict().items()}


def _progress(total: int, enabled: bool, initial: int = 0):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="CICL training", unit="epoch", leave=False)
