"""Ray Train wiring: the same ``cicl.train.loop.train`` in N workers (gloo on CPU, NCCL on GPU).

The driver shuffles cells once (seeded) and cuts them into one contiguous block per worker;
each block goes to the object store separately, so a worker only ever fetches its own shard.
Gene modules and the PCA-initialised skip are computed once on the driver so every rank builds
the same model. Rank 0 reports metrics and a checkpoint (model, optimiser, centroids, every
rank's RNG state) every reclustering round; ``FailureConfig`` restarts a lost worker group from
the last one, and a new run with the same ``name`` and ``storage`` resumes it. Each worker
writes its cells' labels and embedding under the run folder; the driver stitches them back in
the input order.

One driver serves a single fit and a sweep's trial (Ray's Train-inside-Tune pattern):
``train_sharded`` shards the cells, hands every rank one ``WorkerConfig`` and runs the workers
as ``plan_workers`` sized them; a trial adds its Tune/MLflow callbacks and per-round scoring.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from cicl._logging import quieted
from cicl.config import CICLConfig
from cicl.train.loop import TrainResult, load_metric, metric_record

STATE_FILE = "state.pt"


@dataclass(frozen=True)
class RayOptions:
    """How to run on Ray. ``name`` makes a run resumable: the same name under the same
    ``storage`` continues from the last checkpoint instead of starting again."""

    workers: int = 2
    # GPUs each worker reserves: a number, or "auto" (``worker_gpus``: one each when the
    # cluster has a GPU for every worker, else none)
    gpus_per_worker: float | str = "auto"
    cpus_per_worker: float | None = None  # default: fair share of the cluster, at most 1
    address: str | None = None  # None: start a local Ray (or reuse the one already up)
    storage: str | None = None  # default: ./runs/ray (absolute); shared storage on clusters
    name: str | None = None  # default: a fresh unique name
    max_failures: int = 2  # worker-group restarts from the last checkpoint
    threads: int | None = None  # torch threads per worker (default: cores / workers locally)


@dataclass(frozen=True)
class WorkerPlan:
    """How many Ray Train workers and what each gets: the CPUs and GPUs reserved for it with
    Ray, and its torch threads."""

    workers: int
    cpus: float
    gpus: float = 0.0
    threads: int = 1

    def resources(self) -> dict[str, float]:
        """Ray's ``resources_per_worker`` (GPUs only when asked: NCCL then, else gloo)."""
        out = {"CPU": self.cpus}
        if self.gpus:
            out["GPU"] = self.gpus
        return out


def worker_gpus(request: float | str, total_gpu: float, workers: int) -> float:
    """GPUs each worker reserves: a number as given; ``"auto"``: one each when the Ray
    cluster has a GPU for every worker of the run (NCCL runs one rank per GPU; fewer would
    leave the run waiting for GPUs that never come), else none (gloo on the CPUs). Only the
    GPUs of nodes that are up count: an autoscaler's GPU nodes still down are not seen."""
    if request != "auto":
        return float(request)
    return 1.0 if total_gpu >= workers else 0.0


def plan_workers(
    workers: int,
    total_cpu: float,
    *,
    cpus: float | None = None,
    gpus: float | str = "auto",
    total_gpu: float = 0.0,
    threads: int | None = None,
    concurrent: int = 1,
    driver_cpu: float = 0.0,
    whole_machine: bool = False,
) -> WorkerPlan:
    """The one place that sizes workers, for a fit and for a sweep's trials.

    CPUs (unless given): a fair share of the cluster's ``total_cpu``, less ``driver_cpu`` for
    each of ``concurrent`` trial drivers, over all their workers; between a quarter and one CPU
    (fractional requests let workers share a small machine's cores), on a quarter grid so the
    requests of drivers and workers add up within the total. GPUs: ``worker_gpus`` of the
    cluster's ``total_gpu``. Threads (unless given): a fit that
    has the local machine to itself (``whole_machine``) splits its cores over the workers;
    otherwise (a cluster, or trials sharing the machine) a worker runs on the whole CPUs it
    reserved, at least one."""
    share = (total_cpu - driver_cpu * concurrent) / (concurrent * workers)
    c = cpus or max(0.25, min(1.0, share))
    c = float(np.floor(c * 4) / 4) or 0.25
    if threads is None:
        cores = os.cpu_count() or 1
        threads = max(1, cores // workers) if whole_machine else max(1, int(c))
    g = worker_gpus(gpus, total_gpu, workers)
    return WorkerPlan(workers=workers, cpus=c, gpus=g, threads=threads)


def fit_plan(opts: RayOptions) -> WorkerPlan:
    """A single fit's workers on the Ray it is connected to (see ``plan_workers``)."""
    import ray

    total = ray.cluster_resources()
    return plan_workers(
        opts.workers,
        float(total.get("CPU", 1.0)),
        cpus=opts.cpus_per_worker,
        gpus=opts.gpus_per_worker,
        total_gpu=float(total.get("GPU", 0.0)),
        threads=opts.threads,
        whole_machine=opts.address is None,
    )


@dataclass(frozen=True)
class RayRun:
    """Where a Ray Train run lives: its checkpoints under ``storage/name`` (the same pair
    again resumes it), the ranks' results in ``out_dir``."""

    storage: Path
    name: str
    out_dir: Path


@dataclass(frozen=True)
class WorkerConfig:
    """What every rank is handed (small: cells travel as object-store references, one per
    rank, or as the file each rank streams its rows of)."""

    cfg: CICLConfig
    k: int
    out_dir: str
    threads: int
    shards: tuple = ()  # per rank: ObjectRef of (x, pcs, indices, counts or None)
    groups: np.ndarray | None = None
    pca_init: tuple[np.ndarray, np.ndarray] | None = None
    stream: StreamSetup | None = None  # streaming: the file and the driver-fitted transform
    objective: str | None = None  # sweeps: score every round on the rank's cells ...
    truth: tuple[np.ndarray, ...] | None = None  # ... and against its cells' true labels


def model_init(
    x: np.ndarray, pcs: np.ndarray, cfg: CICLConfig
) -> tuple[np.ndarray | None, tuple[np.ndarray, np.ndarray] | None]:
    """Gene modules and PCA-initialised skip, computed once so every rank builds one model."""
    from cicl.model.modules import balanced_gene_groups, pca_projection
    from cicl.train.loop import gene_loadings

    groups = pca_init = None
    if cfg.model.encoder == "transformer":
        groups = balanced_gene_groups(
            gene_loadings(x, pcs), cfg.model.transformer.n_tokens, seed=cfg.seed
        )
    if cfg.model.encoder in ("transformer", "mlp") and cfg.model.pca_residual:
        pca_init = pca_projection(x, pcs, cfg.model.embed_dim)
    return groups, pca_init


def put_shards(
    x: np.ndarray, pcs: np.ndarray, counts: np.ndarray | None, parts: list[np.ndarray]
) -> list:
    """One object-store entry per worker: its cells' (x, pcs, indices, counts or None)."""
    import ray

    return [ray.put((x[p], pcs[p], p, None if counts is None else counts[p])) for p in parts]


def prepare_run(opts: RayOptions) -> RayRun:
    """Connect to Ray and name the run; its results folder starts empty."""
    ensure_ray(opts.address)
    storage = Path(opts.storage or "runs/ray").resolve()
    storage.mkdir(parents=True, exist_ok=True)
    name = opts.name or f"cicl-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    out_dir = storage / name / "shards"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    return RayRun(storage, name, out_dir)


def shard_indices(n: int, world: int, seed: int) -> list[np.ndarray]:
    """A seeded permutation of the cells cut into ``world`` near-equal contiguous blocks."""
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(b) for b in np.array_split(perm, world)]


def ray_runtime_env() -> dict:
    """The job's runtime environment: Ray starts every worker process with these variables
    (glibc reads them at process start, so setting them inside a worker is too late).

    glibc raises its mmap threshold each time a large block is freed, after which the streamed
    blocks come from the heap and fragment it, so a streaming worker's memory grew with the
    atlas. A fixed 4 MiB threshold keeps large blocks in mmap, returned on free (measured in
    docs/benchmarks.md, ``benchmarks/scaling.py``). A value the user set is kept. Workers pin torch's CPU kernels as the driver does
    (``cicl._cpu``): Ray Train imports torch before a worker imports cicl."""
    from cicl._cpu import kernel_env

    threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_", "4194304")
    return {"env_vars": {"MALLOC_MMAP_THRESHOLD_": threshold, **kernel_env()}}


def ensure_ray(address: str | None = None):
    """Connect to ``address`` or start a local Ray whose dashboard listens on 127.0.0.1.
    Returns Ray's context (None when Ray was already up)."""
    import ray

    if ray.is_initialized():
        return None
    if address:
        return ray.init(address=address, log_to_driver=False, runtime_env=ray_runtime_env())
    # a new local Ray turns token authentication on (good) and warns that it did so, on every
    # start; keep the behaviour, drop the warning
    with quieted("ray._private.authentication.authentication_token_setup"):
        return ray.init(
            num_cpus=max(2, os.cpu_count() or 1),
            dashboard_host="127.0.0.1",
            log_to_driver=False,
            include_dashboard=True,
            runtime_env=ray_runtime_env(),
        )


def fit_ray(
    x: np.ndarray,
    pcs: np.ndarray,
    n_clusters: int,
    cfg: CICLConfig,
    opts: RayOptions,
    *,
    progress: bool = True,
    counts: np.ndarray | None = None,
) -> TrainResult:
    """Train with ``opts.workers`` Ray Train workers; returns the stitched result.
    ``counts``: the raw counts for the negative binomial decoder (count input)."""
    t0 = time.perf_counter()
    run = prepare_run(opts)
    res, _ = train_sharded(
        x, pcs, n_clusters, cfg, fit_plan(opts), run, counts=counts, max_failures=opts.max_failures
    )
    res.seconds = time.perf_counter() - t0
    if progress:
        print(f"Ray Train: {opts.workers} workers, run '{run.name}' under {run.storage}")
    return res


def train_sharded(
    x: np.ndarray,
    pcs: np.ndarray,
    k: int,
    cfg: CICLConfig,
    plan: WorkerPlan,
    run: RayRun,
    *,
    counts: np.ndarray | None = None,
    truth: np.ndarray | None = None,
    objective: str | None = None,
    callbacks: list | None = None,
    keep: int = 2,
    max_failures: int = 2,
    worker: Callable[[WorkerConfig], None] | None = None,
) -> tuple[TrainResult, Any]:
    """The driver of a fit or a sweep's trial on cells in memory: model pieces computed once,
    one seeded shard per rank in the object store, ``worker`` (default ``worker_loop``) on
    every rank, results stitched back in input order. ``objective`` and ``truth`` make each
    rank score its cells every round (sweeps). Returns the result and Ray's ``Result``."""
    groups, pca_init = model_init(x, pcs, cfg)
    parts = shard_indices(x.shape[0], plan.workers, cfg.seed)
    wc = WorkerConfig(
        cfg=cfg,
        k=k,
        out_dir=str(run.out_dir),
        threads=plan.threads,
        shards=tuple(put_shards(x, pcs, counts, parts)),
        groups=groups,
        pca_init=pca_init,
        objective=objective,
        truth=None if truth is None else tuple(truth[p] for p in parts),
    )
    result = run_workers(
        worker or worker_loop,
        wc,
        plan,
        run,
        keep=keep,
        max_failures=max_failures,
        callbacks=callbacks,
    )
    return _collect(run.out_dir, parts, x.shape[0]), result


def run_workers(
    worker: Callable[[WorkerConfig], None],
    wc: WorkerConfig,
    plan: WorkerPlan,
    run: RayRun,
    *,
    keep: int = 2,
    max_failures: int = 2,
    callbacks: list | None = None,
):
    """Fit a ``TorchTrainer`` running ``worker(wc)`` on ``plan.workers`` ranks (NCCL when the
    plan has GPUs, else gloo), keeping the last ``keep`` per-round checkpoints; a lost worker
    group restarts from the last one up to ``max_failures`` times. Returns Ray's ``Result``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = plan.resources()
    trainer = TorchTrainer(
        partial(worker, wc),
        scaling_config=ScalingConfig(
            num_workers=plan.workers,
            use_gpu=bool(resources.get("GPU")),
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=run.name,
            storage_path=str(run.storage),
            checkpoint_config=CheckpointConfig(num_to_keep=keep),
            failure_config=FailureConfig(max_failures=max_failures),
            callbacks=callbacks or [],
        ),
    )
    return trainer.fit()


def _collect(out_dir: Path, parts: list[np.ndarray], n: int) -> TrainResult:
    """Stitch the per-rank results back into input order."""
    labels = np.empty(n, dtype=np.int64)
    emb: np.ndarray | None = None
    for r, p in enumerate(parts):
        with np.load(out_dir / f"rank{r}.npz") as d:
            if not np.array_equal(d["idx"], p):
                raise RuntimeError(f"rank {r} wrote results for other cells than its shard")
            labels[p] = d["labels"]
            if emb is None:
                emb = np.empty((n, d["embedding"].shape[1]), dtype=np.float32)
            emb[p] = d["embedding"]
    assert emb is not None
    return load_result(out_dir, labels, emb)


def load_result(out_dir: Path, labels: np.ndarray, emb: np.ndarray) -> TrainResult:
    """The run's result from what rank 0 wrote to ``out_dir`` (centroids, history, the trained
    encoder) and the stitched labels and embedding."""
    meta = json.loads((out_dir / "meta.json").read_text())
    enc = out_dir / "encoder.npz"  # absent in runs written before models were stored
    return TrainResult(
        embedding=emb,
        labels=labels,
        centroids=np.asarray(meta["centroids"], dtype=np.float32),
        history=meta["history"],
        epochs=meta["epochs"],
        steps=meta["steps"],
        budget_hit=meta.get("budget_hit", False),
        precision=meta.get("precision", "fp32"),
        timings=meta.get("timings", {}),
        encoder_state=dict(np.load(enc)) if enc.exists() else {},
        pca_center=None if meta.get("pca_center") is None else np.asarray(meta["pca_center"]),
        pca_scale=meta.get("pca_scale", 1.0),
        device=meta.get("device", "cpu"),
        threads=meta.get("threads", 1),
        decoder=meta.get("decoder", "off"),
        pca_weight=meta.get("pca_weight"),
        metric=metric_record(load_metric(meta.get("metric"))),  # meta.json's lists -> arrays
    )


def _worker_setup(wc: WorkerConfig) -> tuple[int, CICLConfig, dict | None]:
    """Threads, rank, device and the checkpoint to resume from (if Ray restarted us)."""
    import ray.train
    import torch

    torch.set_num_threads(wc.threads)
    rank = ray.train.get_context().get_world_rank()
    cfg = wc.cfg
    if torch.cuda.is_available() and cfg.train.device in ("auto", "cuda"):
        import ray.train.torch

        cfg = cfg.with_overrides({"train.device": str(ray.train.torch.get_device())})
    restore = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            restore = torch.load(Path(d) / STATE_FILE, weights_only=True)
    return rank, cfg, restore


RoundHook = Callable[[int, dict], None]  # (rank, the round's record), after its report


def _reporter(rank: int, after_round: RoundHook | None = None):
    """``on_round``: every rank reports (a barrier); rank 0 attaches the checkpoint; then
    ``after_round`` if given."""
    import ray.train
    import torch
    from ray.train import Checkpoint

    def on_round(rec: dict, state: dict) -> None:
        metrics = {k: float(v) for k, v in rec.items()}
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                torch.save(state, Path(tmp) / STATE_FILE)
                ray.train.report(
                    metrics,
                    checkpoint=Checkpoint.from_directory(tmp),
                    checkpoint_dir_name=f"checkpoint_epoch={rec['epoch']:05d}",
                )
        else:
            ray.train.report(metrics)
        if after_round is not None:
            after_round(rank, rec)

    return on_round


def worker_loop(wc: WorkerConfig, *, after_round: RoundHook | None = None) -> None:
    """Runs in every Ray Train worker: fetch the own shard, restore, train, write results.
    ``after_round(rank, record)`` runs on every rank after each round's report."""
    import ray

    from cicl.comm import default_comm
    from cicl.train.loop import train

    rank, cfg, restore = _worker_setup(wc)
    x, pcs, idx, counts = ray.get(wc.shards[rank])
    hook = None
    if wc.objective:  # sweeps: score every round on this rank's cells
        from cicl.objective import score_labels, truth_scores

        objective = wc.objective
        truth = wc.truth[rank] if wc.truth is not None else None

        def hook(labels: np.ndarray, emb) -> dict:
            out = {"objective": score_labels(objective, labels, pcs, emb, truth)}
            if truth is not None:
                out.update(truth_scores(labels, truth))
            return out

    res = train(
        x,
        pcs,
        wc.k,
        cfg,
        comm=default_comm(),
        groups=wc.groups,
        pca_init=wc.pca_init,
        restore=restore,
        on_round=_reporter(rank, after_round),
        round_metrics=hook,
        counts=counts,
    )
    out = Path(wc.out_dir)
    tmp = out / f".rank{rank}.tmp.npz"
    np.savez(tmp, idx=idx, labels=res.labels, embedding=res.embedding.astype(np.float32))
    os.replace(tmp, out / f"rank{rank}.npz")
    _write_worker_info(out, rank, ray.get_runtime_context().get_node_id())
    if rank == 0:
        _write_meta(out, res)


def _write_worker_info(out: Path, rank: int, node: str) -> None:
    """Which node the rank ran on and its peak resident memory (for tests and benchmarks)."""
    import resource

    (out / f"node_rank{rank}.txt").write_text(node)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    (out / f"maxrss_rank{rank}.txt").write_text(f"{peak_mb:.1f}")


def _write_meta(out: Path, res: TrainResult) -> None:
    meta = {
        "timings": res.timings,
        "centroids": res.centroids.tolist(),
        "history": res.history,
        "epochs": res.epochs,
        "steps": res.steps,
        "budget_hit": res.budget_hit,
        "precision": res.precision,
        "pca_center": None if res.pca_center is None else res.pca_center.tolist(),
        "pca_scale": res.pca_scale,
        "device": res.device,
        "threads": res.threads,
        "decoder": res.decoder,
        "pca_weight": res.pca_weight,
        "metric": None
        if res.metric is None
        else {k: np.asarray(v).tolist() for k, v in res.metric.items()},
    }
    tmp = out / ".encoder.tmp.npz"  # the trained encoder, for predicting new cells
    np.savez(tmp, **res.encoder_state)
    os.replace(tmp, out / "encoder.npz")
    tmp = out / ".meta.tmp"
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, out / "meta.json")


@dataclass
class StreamSetup:
    """What the driver fits on a sample and hands every rank (small: no cells)."""

    path: str
    transform: Any  # cicl.data.stream.BlockTransform
    n_cells: int
    n_genes_used: int
    groups: np.ndarray | None
    pca_init: tuple[np.ndarray, np.ndarray] | None
    pca_stats: tuple[np.ndarray, float]


def stream_shards(setup: StreamSetup, cfg: CICLConfig, world: int) -> list[np.ndarray]:
    """Every rank's file rows (``shard_rows``: chunks dealt in turn, whatever the order)."""
    from cicl.data.stream import shard_rows

    return shard_rows(setup.n_cells, world, cfg.train.chunk_size)


def fit_ray_stream(
    setup: StreamSetup, n_clusters: int, cfg: CICLConfig, opts: RayOptions, *, progress: bool
) -> tuple[TrainResult, list[tuple[int, int, Path]]]:
    """Streaming training over Ray Train workers, each reading its own rows of the file.
    Returns the result with every cell's label in file order (its embedding left empty) and
    where the embedding is: (start, stop, .npy file, row in it) per run of file rows a worker
    held, never stitched in memory."""
    from cicl.data.stream import runs

    t0 = time.perf_counter()
    run = prepare_run(opts)
    plan = fit_plan(opts)
    wc = WorkerConfig(
        cfg=cfg, k=n_clusters, out_dir=str(run.out_dir), threads=plan.threads, stream=setup
    )
    run_workers(_stream_worker_loop, wc, plan, run, max_failures=opts.max_failures)
    labels = np.empty(setup.n_cells, dtype=np.int64)
    parts = []
    for r, rows in enumerate(stream_shards(setup, cfg, opts.workers)):
        labels[rows] = np.load(run.out_dir / f"rank{r}_labels.npy")
        path, at = run.out_dir / f"rank{r}_embedding.npy", 0
        for a, b in zip(*runs(rows), strict=True):  # each run of file rows: where it is
            parts.append((int(a), int(b), path, at))
            at += int(b - a)
        del rows
    parts.sort(key=lambda part: part[0])
    if progress:
        print(
            f"Ray Train (streaming): {opts.workers} workers, run '{run.name}' under {run.storage}"
        )
    res = load_result(run.out_dir, labels, np.zeros((0, 0), np.float32))
    res.seconds = time.perf_counter() - t0
    return res, parts


def _stream_worker_loop(wc: WorkerConfig) -> None:
    """Every worker streams its rows of the file (``stream_shards``); results go to .npy
    files in blocks (in the rank's row order), so neither input nor output is ever held whole."""
    import ray

    from cicl.comm import default_comm
    from cicl.data.stream import H5adSource
    from cicl.train.stream import train_stream

    rank, cfg, restore = _worker_setup(wc)
    setup = wc.stream
    assert setup is not None
    comm = default_comm()
    rows = stream_shards(setup, cfg, comm.world)[rank]
    src = H5adSource(setup.path, rows, setup.transform, cfg.train.chunk_size)
    out = Path(wc.out_dir)
    lab_tmp, emb_tmp = out / f".rank{rank}_labels.npy", out / f".rank{rank}_embedding.npy"
    files: dict[str, np.ndarray] = {}  # result memmaps, opened when the first block arrives

    def on_block(idx: np.ndarray, lab: np.ndarray, h: np.ndarray) -> None:
        if not files:
            files["lab"] = np.lib.format.open_memmap(lab_tmp, "w+", np.int64, (src.n,))
            files["emb"] = np.lib.format.open_memmap(emb_tmp, "w+", np.float32, (src.n, h.shape[1]))
        files["lab"][idx] = lab
        files["emb"][idx] = h

    res = train_stream(
        src,
        wc.k,
        cfg,
        comm=comm,
        groups=setup.groups,
        pca_init=setup.pca_init,
        pca_stats=setup.pca_stats,
        n_genes=setup.n_genes_used,
        on_round=_reporter(rank),
        on_block=on_block,
        restore=restore,
    )
    src.close()
    for f in files.values():
        f.flush()
    files.clear()
    os.replace(lab_tmp, out / f"rank{rank}_labels.npy")
    os.replace(emb_tmp, out / f"rank{rank}_embedding.npy")
    _write_worker_info(out, rank, ray.get_runtime_context().get_node_id())
    if rank == 0:
        _write_meta(out, res)
