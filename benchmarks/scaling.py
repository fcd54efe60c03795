"""Scaling benchmark: streaming Ray Train on simulated atlases of growing size.

For each atlas size (simulated like a real dataset with ``cicl simulate``'s model and cached)
and each worker count, runs one streaming fit with a fixed number of training steps and one
reclustering round, and records: training-step throughput (cells/s over the global batch,
both views counted once), time split (read, train, K-means, assignment passes), end-to-end
seconds and peak resident memory per worker. Writes scaling.csv / scaling.md / scaling.png.

    python benchmarks/scaling.py --like ../shared/data/young_kidney.h5ad \
        --sizes 10000,100000,1000000 --workers 1,2 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd


def run_one(
    atlas: Path,
    k: int,
    workers: int,
    threads: int | None,
    steps: int,
    tmp: Path,
    overrides: dict | None = None,
):
    from cicl.api import fit_h5ad_stream
    from cicl.config import CICLConfig
    from cicl.distributed import RayOptions

    cfg = CICLConfig().with_overrides(
        {
            "train.epochs": 1,
            "train.steps_per_epoch": steps,
            "cluster.recluster_every": 1,
            "cluster.n_init": 3,
            "cluster.kmeans_sample": 20_000,
            **(overrides or {}),
        }
    )
    name = f"scale-{atlas.stem}-{workers}w-{threads}t-{time.time_ns()}"
    opts = RayOptions(workers=workers, storage=str(tmp), name=name, threads=threads)
    t0 = time.perf_counter()
    uns = fit_h5ad_stream(
        atlas, tmp / f"{name}.h5ad", k, config=cfg, ray_options=opts, progress=False
    )
    wall = time.perf_counter() - t0
    shards = tmp / name / "shards"
    rss = [float((shards / f"maxrss_rank{r}.txt").read_text()) for r in range(workers)]
    (tmp / f"{name}.h5ad").unlink()
    return uns, wall, max(rss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--like", default="../shared/data/young_kidney.h5ad")
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--steps", type=int, default=40, help="training steps per run")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "cicl_scaling"))
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--append", action="store_true", help="keep other sizes' rows in the CSV")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every run (e.g. cluster.metric=euclidean), recorded per row",
    )
    ap.add_argument(
        "--no-per-core", action="store_true", help="skip the one-worker, one-thread run"
    )
    args = ap.parse_args()
    from cicl.cli import parse_set

    overrides = parse_set(args.set)  # as `cicl fit --set`

    import ray

    from cicl.data.simulate import simulate
    from cicl.distributed import ensure_ray

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ensure_ray()  # as `cicl` starts Ray: loopback dashboard, the workers' malloc setting
    old = (
        pd.read_csv(out / "scaling.csv") if args.append and (out / "scaling.csv").exists() else None
    )
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        atlas = cache / f"{Path(args.like).stem}_{n}.h5ad"
        if not atlas.exists():
            t = time.perf_counter()
            simulate(args.like, n, atlas, n_genes=2000, seed=0)
            print(f"simulated {n} cells in {time.perf_counter() - t:.0f} s")
        import anndata as ad

        k = ad.read_h5ad(atlas, backed="r").obs["cell_type"].nunique()
        configs = [(w, None) for w in (int(s) for s in args.workers.split(","))]
        if not args.no_per_core:
            configs.insert(1, (1, 1))  # one worker restricted to one core: per-core scaling
        for w, threads in configs:
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                uns, wall, rss = run_one(atlas, k, w, threads, args.steps, Path(tmp), overrides)
            tm = uns["timings"]
            batch = 256
            row = {
                "cells": n,
                "metric": uns.get("metric", {}).get("kind", "?"),
                "metric_steps": uns.get("metric", {}).get("iterations", 0),
                "workers": w,
                "threads_per_worker": threads or max(1, (os.cpu_count() or 1) // w),
                "train_cells_per_s": round(
                    args.steps * batch / max(tm.get("train", np.nan), 1e-9), 1
                ),
                "read_s": round(tm.get("read", np.nan), 1),
                "train_s": round(tm.get("train", np.nan), 1),
                "kmeans_s": round(tm.get("kmeans", np.nan), 1),
                "assign_s": round(tm.get("assign", np.nan), 1),
                # initial, end-of-round and final passes over every cell
                "assign_cells_per_s": round(3 * n / max(tm.get("assign", np.nan), 1e-9), 1),
                "wall_s": round(wall, 1),
                "peak_rss_mb_per_worker": round(rss, 0),
            }
            print(row, flush=True)
            rows.append(row)
            df = _merge(old, rows)
            df.to_csv(out / "scaling.csv", index=False)
    df = _merge(old, rows)
    (out / "scaling.md").write_text(_markdown(df))
    _plot(df, out / "scaling.png")
    ray.shutdown()


def _merge(old: pd.DataFrame | None, rows: list[dict]) -> pd.DataFrame:
    new = pd.DataFrame(rows)
    if old is None:
        return new
    key = ["cells", "workers", "threads_per_worker"]
    keep = ~old.set_index(key).index.isin(new.set_index(key).index)
    return pd.concat([old[keep], new]).sort_values(key).reset_index(drop=True)


def _markdown(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for (w, t), g in df.groupby(["workers", "threads_per_worker"]):
        lab = f"{w} worker(s) x {t} thread(s)"
        ax[0].plot(g["cells"], g["train_cells_per_s"], "o-", label=lab)
        ax[1].plot(g["cells"], g["peak_rss_mb_per_worker"], "o-", label=lab)
    for a, yl in zip(
        ax, ["training throughput (cells/s)", "peak RSS per worker (MB)"], strict=True
    ):
        a.set_xscale("log")
        a.set_xlabel("cells in the atlas")
        a.set_ylabel(yl)
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
