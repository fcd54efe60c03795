"""Ray Train on a real local Ray (2 gloo workers, fractional CPUs) and on a real 2-node cluster:
real data, checkpoint resume after a lost worker, same-name resume, CLI."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

import cicl
from cicl.distributed import (
    RayOptions,
    WorkerConfig,
    fit_plan,
    fit_ray,
    prepare_run,
    train_sharded,
    worker_loop,
)


@pytest.fixture(scope="module")
def pollen(data_dir):
    from cicl.config import PreprocessConfig
    from cicl.data.preprocess import preprocess

    a = ad.read_h5ad(data_dir / "pollen.h5ad")
    p = preprocess(a, PreprocessConfig(n_pcs=20))
    y = a.obs["cell_type"].astype(str).to_numpy()
    return p.x, p.pcs, y


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.shutdown()
    ray.init(num_cpus=2, dashboard_host="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


def _cfg(tiny_cfg):
    """Few final restarts (100 on pollen by default): each run's final step over gloo is
    seconds of the suite's longest chain, and none of these tests is about restarts."""
    return tiny_cfg.with_overrides(
        {"train.epochs": 6, "train.batch_size": 128, "cluster.final_n_init": 4}
    )


@pytest.fixture(scope="module")
def clean(pollen, local_ray, tiny_cfg, tmp_path_factory):
    """One uninterrupted 2-worker run on pollen (and its storage folder), shared by the test
    that checks it and the one that compares a resumed run against it."""
    x, pcs, y = pollen
    storage = tmp_path_factory.mktemp("clean")
    res = fit_ray(x, pcs, len(set(y)), _cfg(tiny_cfg), RayOptions(workers=2, storage=str(storage)))
    return res, storage


def test_two_workers_on_real_data(pollen, clean):
    x, pcs, y = pollen
    k = len(set(y))
    res, storage = clean
    assert res.labels.shape == (x.shape[0],) and res.embedding.shape[0] == x.shape[0]
    assert len(np.unique(res.labels)) == k
    assert adjusted_rand_score(y, res.labels) > 0.6
    assert res.history and res.history[-1]["epoch"] == 6
    # per-round checkpoints reported through ray.train.report, the last two kept
    ckpts = sorted(storage.glob("*/checkpoint_epoch=*"))
    assert ckpts[-1].name.endswith("00006") and len(ckpts) == 2
    import torch

    state = torch.load(ckpts[-1] / "state.pt", weights_only=True)  # no pickled code
    assert state["epoch"] == 6 and state["rng_aug"].shape[0] == 2


FAIL_AT_EPOCH = 2


def _loses_rank1_once(wc: WorkerConfig) -> None:
    """The fit's own worker, except that rank 1 dies once (its process exits) right after it
    reported round ``FAIL_AT_EPOCH``; a marker file next to the run's results says it did."""
    marker = Path(wc.out_dir).parent / "failed_once"

    def die_once(rank: int, rec: dict) -> None:
        if rank == 1 and rec["epoch"] >= FAIL_AT_EPOCH and not marker.exists():
            marker.write_text("killed")
            os._exit(1)

    worker_loop(wc, after_round=die_once)


def test_lost_worker_resumes_to_the_same_labels(pollen, clean, tiny_cfg, tmp_path):
    """Rank 1 dies after the epoch-2 checkpoint; FailureConfig restarts the group from it and
    the restored RNG states give exactly the labels of an uninterrupted run."""
    from ray import cloudpickle

    x, pcs, y = pollen
    k = len(set(y))
    cfg = _cfg(tiny_cfg)
    clean, _ = clean
    opts = RayOptions(workers=2, storage=str(tmp_path), name="hit")
    # the workers cannot import this test module: ship its worker function by value
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        run = prepare_run(opts)
        hit, _ = train_sharded(x, pcs, k, cfg, fit_plan(opts), run, worker=_loses_rank1_once)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert (tmp_path / "hit" / "failed_once").exists()  # the worker really was lost
    assert np.array_equal(clean.labels, hit.labels)
    assert [h["epoch"] for h in hit.history] == [2, 4, 6]
    # the same name again resumes from the final checkpoint: no new training steps
    again = fit_ray(x, pcs, k, cfg, RayOptions(workers=2, storage=str(tmp_path), name="hit"))
    assert np.array_equal(again.labels, clean.labels)
    assert again.steps == clean.steps


def test_cli_fit_with_workers(data_dir, local_ray, tmp_path):
    from cicl.cli import main

    out = tmp_path / "b.h5ad"
    rc = main(
        [
            "fit",
            str(data_dir / "biase.h5ad"),
            "--out",
            str(out),
            "-k",
            "4",
            "--workers",
            "2",
            "--run-dir",
            str(tmp_path / "ray"),
            "--set",
            "train.epochs=4",
            "--set",
            "cluster.final_n_init=4",
            "--json",
            "--quiet",
        ]
    )
    assert rc == 0
    a = ad.read_h5ad(out)
    assert a.uns["cicl"]["workers"] == 2 and a.uns["cicl"]["device"] == "cpu"  # via meta.json
    # each worker's torch threads, written by rank 0 (read from meta.json itself: the loader's
    # fallback for runs that predate the field is also 1, what 2 workers get on 2 cores)
    meta = json.loads(next((tmp_path / "ray").glob("*/shards/meta.json")).read_text())
    assert meta["threads"] == a.uns["cicl"]["threads"] == max(1, (os.cpu_count() or 1) // 2)
    counts = a.uns["cicl"]["preprocess"]["values"] == "counts"
    assert a.uns["cicl"]["decoder"] == ("nb" if counts else "gaussian")  # the workers' choice
    assert a.uns["cicl"]["pca_weight"] == 2.0  # 56 cells: the rule's small-set weight
    assert a.uns["cicl"]["metric"]["kind"] == "full"  # the final metric, via meta.json
    d, k = a.obsm["X_cicl"].shape[1], a.uns["cicl"]["n_clusters"]
    assert a.uns["cicl"]["model"]["metric"]["whiten"].shape == (k, d, d)
    assert a.uns["cicl"]["model"]["metric"]["logdet"].shape == (k,)
    assert a.obs["cicl"].nunique() == 4
    # rank 0 hands back the trained encoder: the fit is a reference for new cells
    b = ad.read_h5ad(data_dir / "biase.h5ad")
    cicl.predict(b, a)
    assert np.array_equal(b.obs["cicl"].to_numpy(), a.obs["cicl"].to_numpy())


def test_cli_rejects_bad_workers(tmp_path, data_dir, capsys):
    from cicl.cli import main

    rc = main(
        ["fit", str(data_dir / "biase.h5ad"), "--out", str(tmp_path / "o.h5ad")]
        + ["--workers", "two"]
    )
    assert rc == 2 and "--workers must be an integer" in capsys.readouterr().err
    assert not (tmp_path / "o.h5ad").exists()


def test_multi_node_cluster(pollen, tiny_cfg, tmp_path):
    """A real 2-node Ray cluster (two raylets on loopback); 1-CPU workers cannot share a
    1-CPU node, so the two ranks land on different nodes."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "dashboard_host": "127.0.0.1"}
    )
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        x, pcs, y = pollen
        opts = RayOptions(workers=2, cpus_per_worker=1.0, storage=str(tmp_path), name="mn")
        res = fit_ray(x, pcs, len(set(y)), _cfg(tiny_cfg), opts)
        shards = tmp_path / "mn" / "shards"
        nodes = {(shards / f"node_rank{r}.txt").read_text() for r in (0, 1)}
        assert len(nodes) == 2
        assert adjusted_rand_score(y, res.labels) > 0.6
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_two_workers_streaming_from_disk(data_dir, local_ray, tmp_path):
    """Each worker reads only its rows of the file (random chunks of it); results come back
    in file order."""
    from cicl.api import fit_h5ad_stream
    from cicl.config import CICLConfig
    from cicl.data.simulate import simulate

    atlas = simulate(data_dir / "pollen.h5ad", 4000, tmp_path / "atlas.h5ad", n_genes=400)
    cfg = CICLConfig().with_overrides(
        {
            "train.block_size": 512,
            "cluster.kmeans_sample": 2000,
            "train.max_steps": 40,
            "cluster.final_n_init": 4,
        }
    )
    opts = RayOptions(workers=2, storage=str(tmp_path / "ray"), name="st")
    uns = fit_h5ad_stream(atlas, tmp_path / "o.h5ad", 11, config=cfg, ray_options=opts)
    a, src = ad.read_h5ad(tmp_path / "o.h5ad"), ad.read_h5ad(atlas)
    assert uns["workers"] == 2 and a.obs["cicl"].nunique() == 11
    assert (a.obs_names == src.obs_names).all() and a.X is None  # no copy of the atlas
    assert a.obsm["X_cicl"].shape[0] == 4000 and np.isfinite(a.obsm["X_cicl"]).all()
    assert adjusted_rand_score(src.obs["cell_type"], a.obs["cicl"]) > 0.4
    shards = tmp_path / "ray" / "st" / "shards"
    sizes = [np.load(shards / f"rank{r}_labels.npy").shape[0] for r in range(2)]
    assert sum(sizes) == 4000 and abs(sizes[0] - sizes[1]) <= cfg.train.chunk_size
    assert list((tmp_path / "ray" / "st").glob("checkpoint_epoch=*"))


def test_local_ray_listens_on_loopback_and_starts_workers_with_the_malloc_setting():
    """The dashboard on loopback; every worker process starts with the fixed glibc mmap
    threshold (without it a streaming worker's heap fragmented: 3.2 GB peak at 1 M cells)."""
    import os

    import ray

    from cicl.distributed import ensure_ray, ray_runtime_env

    ray.shutdown()
    try:
        ctx = ensure_ray()
        assert ctx.dashboard_url.startswith("127.0.0.1:")
        seen = ray.get(ray.remote(lambda: os.environ.get("MALLOC_MMAP_THRESHOLD_")).remote())
        assert seen == ray_runtime_env()["env_vars"]["MALLOC_MMAP_THRESHOLD_"] and int(seen) > 0
    finally:
        ray.shutdown()
