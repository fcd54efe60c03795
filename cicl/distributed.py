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

from cicl.config import CICLConfig
from cicl.train.loop import TrainResult

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
    fail_at_epoch: int | None = None  # test hook: kill rank 1 once after this epoch's report


def shard_indices(n: int, world: int, seed: int) -> list[np.ndarray]:
    """A seeded permutation of the cells cut into ``world`` near-equal contiguous blocks."""
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(b) for b in np.array_split(perm, world)]


def ensure_ray(address: str | None = None) -> None:
    """Connect to ``address`` or start a local Ray whose dashboard listens on 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(
            num_cpus=max(2, os.cpu_count() or 1),
            dashboard_host="127.0.0.1",
            log_to_driver=False,
            include_dashboard=True,
        )


def fit_ray(
    x: np.ndarray,
    pcs: np.ndarray,
    n_clusters: int,
    cfg: CICLConfig,
    opts: RayOptions,
    *,
    progress: bool = True,
) -> TrainResult:
    """Train with ``opts.workers`` Ray Train workers; returns the stitched result."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cicl.model.modules import balanced_gene_groups, pca_projection
    from cicl.train.loop import gene_loadings

    t0 = time.perf_counter()
    ensure_ray(opts.address)
    storage = Path(opts.storage or "runs/ray").resolve()
    storage.mkdir(parents=True, exist_ok=True)
    name = opts.name or f"cicl-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    out_dir = storage / name / "shards"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)

    groups = pca_init = None
    if cfg.model.encoder == "transformer":
        groups = balanced_gene_groups(gene_loadings(x, pcs), cfg.model.n_tokens, seed=cfg.seed)
    if cfg.model.encoder in ("transformer", "mlp") and cfg.model.pca_residual:
        pca_init = pca_projection(x, pcs, cfg.model.embed_dim)
    parts = shard_indices(x.shape[0], opts.workers, cfg.seed)
    shards = [ray.put((x[p], pcs[p], p)) for p in parts]

    total_cpu = float(ray.cluster_resources().get("CPU", 1.0))
    cpus = opts.cpus_per_worker or max(0.25, min(1.0, total_cpu / opts.workers))
    resources: dict[str, float] = {"CPU": cpus}
    if opts.gpus_per_worker:
        resources["GPU"] = opts.gpus_per_worker
    local_threads = max(1, (os.cpu_count() or 1) // opts.workers)
    loop_config = {
        "cfg": cfg,
        "k": n_clusters,
        "shards": shards,
        "groups": groups,
        "pca_init": pca_init,
        "out_dir": str(out_dir),
        "threads": max(1, int(cpus)) if opts.address else local_threads,
        "fail_at_epoch": opts.fail_at_epoch,
        "marker": str(storage / name / "failed_once"),
    }
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=opts.workers,
            use_gpu=bool(opts.gpus_per_worker),
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=opts.max_failures),
        ),
    )
    trainer.fit()
    res = _collect(out_dir, parts, x.shape[0])
    res.seconds = time.perf_counter() - t0
    if progress:
        print(f"Ray Train: {opts.workers} workers, run '{name}' under {storage}")
    return res


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
    meta = json.loads((out_dir / "meta.json").read_text())
    assert emb is not None
    return TrainResult(
        embedding=emb,
        labels=labels,
        centroids=np.asarray(meta["centroids"], dtype=np.float32),
        history=meta["history"],
        epochs=meta["epochs"],
        steps=meta["steps"],
    )


def _worker_loop(config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker: fetch the own shard, restore, train, write results."""
    import ray
    import ray.train
    import torch
    from ray.train import Checkpoint

    from cicl.comm import default_comm
    from cicl.train.loop import train

    torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    cfg: CICLConfig = config["cfg"]
    if torch.cuda.is_available() and cfg.train.device in ("auto", "cuda"):
        import ray.train.torch

        cfg = cfg.with_overrides({"train.device": str(ray.train.torch.get_device())})
    x, pcs, idx = ray.get(config["shards"][rank])
    restore = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            restore = torch.load(Path(d) / STATE_FILE, weights_only=True)

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
    )
    out = Path(config["out_dir"])
    tmp = out / f".rank{rank}.tmp.npz"
    np.savez(tmp, idx=idx, labels=res.labels, embedding=res.embedding.astype(np.float32))
    os.replace(tmp, out / f"rank{rank}.npz")
    (out / f"node_rank{rank}.txt").write_text(ray.get_runtime_context().get_node_id())
    if rank == 0:
        meta = {
            "centroids": res.centroids.tolist(),
            "history": res.history,
            "epochs": res.epochs,
            "steps": res.steps,
        }
        tmpj = out / ".meta.tmp"
        tmpj.write_text(json.dumps(meta))
        os.replace(tmpj, out / "meta.json")
