"""Ray Train wiring: the same ``cicl.train.loop.train`` in N workers (gloo on CPU, NCCL on GPU).

The driver shuffles cells once (seeded) and cuts them into one contiguous block per worker;
each block goes to the object store separately, so a worker only ever fetches its own shard.
Gene modules and the PCA-initialised skip are computed once on the driver so every rank builds
the same model. Rank 0 reports metrics and a checkpoint (model, optimiser, centroids, every
rank's RNG state) every reclustering round; ``FailureConfig`` restarts a lost worker group from
the last one, and a new run with the same ``name`` and ``storage`` resumes it. Each worker
writes its cells' labels and embedding under the run folder; the driver stitches them back in
the input order.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
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
    gpus_per_worker: float = 0.0
    cpus_per_worker: float | None = None  # default: fair share of the cluster, at most 1
    address: str | None = None  # None: start a local Ray (or reuse the one already up)
    storage: str | None = None  # default: ./runs/ray (absolute); shared storage on clusters
    name: str | None = None  # default: a fresh unique name
    max_failures: int = 2  # worker-group restarts from the last checkpoint
    threads: int | None = None  # torch threads per worker (default: cores / workers locally)
    fail_at_epoch: int | None = None  # test hook: kill rank 1 once after this epoch's report


def model_init(
    x: np.ndarray, pcs: np.ndarray, cfg: CICLConfig
) -> tuple[np.ndarray | None, tuple[np.ndarray, np.ndarray] | None]:
    """Gene modules and PCA-initialised skip, computed once so every rank builds one model."""
    from cicl.model.modules import balanced_gene_groups, pca_projection
    from cicl.train.loop import gene_loadings

    groups = pca_init = None
    if cfg.model.encoder == "transformer":
        groups = balanced_gene_groups(gene_loadings(x, pcs), cfg.model.n_tokens, seed=cfg.seed)
    if cfg.model.encoder in ("transformer", "mlp") and cfg.model.pca_residual:
        pca_init = pca_projection(x, pcs, cfg.model.embed_dim)
    return groups, pca_init


def put_shards(
    x: np.ndarray, pcs: np.ndarray, counts: np.ndarray | None, parts: list[np.ndarray]
) -> list:
    """One object-store entry per worker: its cells' (x, pcs, indices, counts or None)."""
    import ray

    return [ray.put((x[p], pcs[p], p, None if counts is None else counts[p])) for p in parts]


def _prepare_run(opts: RayOptions) -> tuple[Path, str, Path]:
    ensure_ray(opts.address)
    storage = Path(opts.storage or "runs/ray").resolve()
    storage.mkdir(parents=True, exist_ok=True)
    name = opts.name or f"cicl-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    out_dir = storage / name / "shards"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    return storage, name, out_dir


def shard_indices(n: int, world: int, seed: int) -> list[np.ndarray]:
    """A seeded permutation of the cells cut into ``world`` near-equal contiguous blocks."""
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(b) for b in np.array_split(perm, world)]


def ray_runtime_env() -> dict:
    """The job's runtime environment: Ray starts every worker process with these variables
    (glibc reads them at process start, so setting them inside a worker is too late).

    glibc raises its mmap threshold each time a large block is freed, after which the streamed
    blocks (4,096 cells x 2,000 genes) come from the heap and fragment it: a 1-thread worker
    streaming 1 M cells peaked at 3.2-3.5 GB against 1.0 GB at 100 k. A fixed 4 MiB threshold
    keeps large blocks in mmap, returned on free (1.28 GB at 1 M; benchmarks/scaling.py). A
    value the user set is kept. Workers pin torch's CPU kernels as the driver does
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
    storage, name, out_dir = _prepare_run(opts)
    groups, pca_init = model_init(x, pcs, cfg)
    parts = shard_indices(x.shape[0], opts.workers, cfg.seed)
    shards = put_shards(x, pcs, counts, parts)

    loop_config = {
        "cfg": cfg,
        "k": n_clusters,
        "shards": shards,
        "groups": groups,
        "pca_init": pca_init,
    }
    _run_trainer(_worker_loop, loop_config, opts, storage, name, out_dir)
    res = _collect(out_dir, parts, x.shape[0])
    res.seconds = time.perf_counter() - t0
    if progress:
        print(f"Ray Train: {opts.workers} workers, run '{name}' under {storage}")
    return res


def build_trainer(
    fn,
    loop_config: dict,
    *,
    workers: int,
    resources: dict[str, float],
    name: str,
    storage: Path,
    max_failures: int = 2,
    keep: int = 2,
    callbacks: list | None = None,
):
    """A ``TorchTrainer`` running ``fn`` on ``workers`` ranks (NCCL when ``resources`` asks for
    GPUs, else gloo), keeping the last ``keep`` per-round checkpoints."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        fn,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=bool(resources.get("GPU")),
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            checkpoint_config=CheckpointConfig(num_to_keep=keep),
            failure_config=FailureConfig(max_failures=max_failures),
            callbacks=callbacks or [],
        ),
    )


def _run_trainer(
    fn, loop_config: dict, opts: RayOptions, storage: Path, name: str, out_dir: Path
) -> None:
    """Build and fit the TorchTrainer: fractional CPUs where the cluster is small, GPUs when
    asked (NCCL then), checkpoints kept per round, lost workers restarted from the last one."""
    import ray

    total_cpu = float(ray.cluster_resources().get("CPU", 1.0))
    cpus = opts.cpus_per_worker or max(0.25, min(1.0, total_cpu / opts.workers))
    resources: dict[str, float] = {"CPU": cpus}
    if opts.gpus_per_worker:
        resources["GPU"] = opts.gpus_per_worker
    local_threads = max(1, (os.cpu_count() or 1) // opts.workers)
    loop_config = {
        **loop_config,
        "out_dir": str(out_dir),
        "threads": opts.threads or (max(1, int(cpus)) if opts.address else local_threads),
        "fail_at_epoch": opts.fail_at_epoch,
        "marker": str(storage / name / "failed_once"),
    }
    trainer = build_trainer(
        fn,
        loop_config,
        workers=opts.workers,
        resources=resources,
        name=name,
        storage=storage,
        max_failures=opts.max_failures,
    )
    trainer.fit()


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


def _worker_setup(config: dict[str, Any]) -> tuple[int, CICLConfig, dict | None]:
    """Threads, rank, device and the checkpoint to resume from (if Ray restarted us)."""
    import ray.train
    import torch

    torch.set_num_threads(config["threads"])
    rank = ray.train.get_context().get_world_rank()
    cfg: CICLConfig = config["cfg"]
    if torch.cuda.is_available() and cfg.train.device in ("auto", "cuda"):
        import ray.train.torch

        cfg = cfg.with_overrides({"train.device": str(ray.train.torch.get_device())})
    restore = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            restore = torch.load(Path(d) / STATE_FILE, weights_only=True)
    return rank, cfg, restore


def _reporter(rank: int, config: dict[str, Any]):
    """``on_round``: every rank reports (a barrier); rank 0 attaches the checkpoint."""
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
        fail = config.get("fail_at_epoch")
        if fail is not None and rec["epoch"] >= fail and rank == 1:
            marker = Path(config["marker"])
            if not marker.exists():  # test hook: lose a worker once, mid-training
                marker.write_text("killed")
                os._exit(1)

    return on_round


def _worker_loop(config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker: fetch the own shard, restore, train, write results."""
    import ray

    from cicl.comm import default_comm
    from cicl.train.loop import train

    rank, cfg, restore = _worker_setup(config)
    x, pcs, idx, counts = ray.get(config["shards"][rank])
    hook = None
    if config.get("objective"):  # sweeps: score every round on this rank's cells
        from cicl.objective import score_labels, truth_scores

        truth = config["truth"][rank] if config.get("truth") is not None else None

        def hook(labels: np.ndarray, emb) -> dict:
            out = {"objective": score_labels(config["objective"], labels, pcs, emb, truth)}
            if truth is not None:
                out.update(truth_scores(labels, truth))
            return out

    on_round = _reporter(rank, config)
    res = train(
        x,
        pcs,
        config["k"],
        cfg,
        comm=default_comm(),
        groups=config["groups"],
        pca_init=config["pca_init"],
        restore=restore,
        on_round=on_round,
        round_metrics=hook,
        counts=counts,
    )
    out = Path(config["out_dir"])
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


def fit_ray_stream(
    setup: StreamSetup, n_clusters: int, cfg: CICLConfig, opts: RayOptions, *, progress: bool
) -> TrainResult:
    """Streaming training over Ray Train workers, each reading its own row range of the file;
    returns labels and embedding of every cell in file order."""
    t0 = time.perf_counter()
    storage, name, out_dir = _prepare_run(opts)
    loop_config = {"cfg": cfg, "k": n_clusters, "setup": setup}
    _run_trainer(_stream_worker_loop, loop_config, opts, storage, name, out_dir)
    from cicl.data.stream import row_ranges

    labels = np.empty(setup.n_cells, dtype=np.int64)
    emb: np.ndarray | None = None
    for r, (a, b) in enumerate(row_ranges(setup.n_cells, opts.workers)):
        lab = np.load(out_dir / f"rank{r}_labels.npy", mmap_mode="r")
        e = np.load(out_dir / f"rank{r}_embedding.npy", mmap_mode="r")
        if emb is None:
            emb = np.empty((setup.n_cells, e.shape[1]), dtype=np.float32)
        labels[a:b], emb[a:b] = lab, e
    assert emb is not None
    if progress:
        print(f"Ray Train (streaming): {opts.workers} workers, run '{name}' under {storage}")
    res = load_result(out_dir, labels, emb)
    res.seconds = time.perf_counter() - t0
    return res


def _stream_worker_loop(config: dict[str, Any]) -> None:
    """Every worker streams rows [start, stop) of the file; results go to .npy files in
    blocks, so neither input nor output is ever held whole."""
    import ray

    from cicl.comm import default_comm
    from cicl.data.stream import H5adSource, row_ranges
    from cicl.train.stream import train_stream

    rank, cfg, restore = _worker_setup(config)
    setup: StreamSetup = config["setup"]
    comm = default_comm()
    a, b = row_ranges(setup.n_cells, comm.world)[rank]
    src = H5adSource(setup.path, a, b, setup.transform)
    out = Path(config["out_dir"])
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
        config["k"],
        cfg,
        comm=comm,
        groups=setup.groups,
        pca_init=setup.pca_init,
        pca_stats=setup.pca_stats,
        n_genes=setup.n_genes_used,
        on_round=_reporter(rank, config),
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
