"""Ray Train equivalence: N workers vs one process on a real dataset, same seed and config.

For each preset (``--preset``: default, contrastive, ...) and seed: ARI (vs the true labels,
scored only) of the single-process ``train`` and of ``fit_ray`` with ``--workers`` workers, and
the ARI between the two labelings; plus distributed K-means on 2 shards of the dataset's PCA vs
one process from the same k-means++ init (max absolute centroid difference). Every row names its
preset. Writes equivalence.csv / equivalence.md (the default preset alone), else
equivalence_<presets>.csv / .md.

    python benchmarks/equivalence.py --dataset ../shared/data/young_kidney.h5ad --seeds 3
    python benchmarks/equivalence.py --preset default contrastive --seeds 3
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd


def _kmeans_shards(rank: int, world: int, init_file: str, pcs_file: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    from cicl.cluster.kmeans import kmeans_pp, lloyd
    from cicl.comm import TorchDistComm

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    x = torch.from_numpy(np.load(pcs_file))
    shard = torch.tensor_split(x, world)[rank]
    comm = TorchDistComm()
    init = kmeans_pp(shard, 11, torch.Generator().manual_seed(0), comm)
    res = lloyd(shard, init, comm=comm)
    if rank == 0:
        np.save(out, res.centroids.numpy())
    dist.destroy_process_group()


def kmeans_check(pcs: np.ndarray) -> float:
    import torch
    import torch.multiprocessing as mp

    from cicl.cluster.kmeans import kmeans_pp, lloyd

    with tempfile.TemporaryDirectory() as d:
        pf, out = os.path.join(d, "pcs.npy"), os.path.join(d, "c.npy")
        np.save(pf, pcs.astype(np.float32))
        mp.spawn(_kmeans_shards, args=(2, os.path.join(d, "pg"), pf, out), nprocs=2)
        dist_c = np.load(out)
    x = torch.from_numpy(pcs.astype(np.float32))
    single = lloyd(x, kmeans_pp(x, 11, torch.Generator().manual_seed(0))).centroids.numpy()
    return float(np.abs(dist_c - single).max())


def main() -> None:
    from cicl.config import PRESETS

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="../shared/data/young_kidney.h5ad")
    ap.add_argument("--label-key", default="cell_type")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--preset", nargs="+", choices=PRESETS, default=["default"])
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()

    import anndata as ad
    import ray
    import torch
    from sklearn.metrics import adjusted_rand_score as ari

    from cicl.config import preset
    from cicl.data.preprocess import preprocess
    from cicl.distributed import RayOptions, fit_ray
    from cicl.train.loop import train

    a = ad.read_h5ad(args.dataset)
    y = a.obs[args.label_key].astype(str).to_numpy()
    k = len(set(y))
    preps = {}  # by preprocessing config: presets that share it share its result
    for name in args.preset:
        pc = preset(name).preprocess
        if pc not in preps:
            preps[pc] = preprocess(a, pc)
    diff = kmeans_check(next(iter(preps.values())).pcs)
    print(f"distributed K-means (2 shards) vs one process, same init: max |diff| {diff:.2e}")
    ray.init(num_cpus=2, dashboard_host="127.0.0.1", log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.preset:
            base = preset(name)
            prep = preps[base.preprocess]
            for seed in range(args.seeds):
                cfg = base.with_overrides({"seed": seed})
                torch.set_num_threads(2)
                t = time.perf_counter()
                one = train(prep.x, prep.pcs, k, cfg, counts=prep.counts)
                t1 = time.perf_counter() - t
                opts = RayOptions(workers=args.workers, storage=tmp, name=f"eq-{name}-{seed}")
                t = time.perf_counter()
                many = fit_ray(prep.x, prep.pcs, k, cfg, opts, progress=False, counts=prep.counts)
                t2 = time.perf_counter() - t
                row = {
                    "preset": name,
                    "seed": seed,
                    "ari_1_process": round(ari(y, one.labels), 4),
                    f"ari_{args.workers}_workers": round(ari(y, many.labels), 4),
                    "ari_between": round(ari(one.labels, many.labels), 4),
                    "seconds_1_process": round(t1, 1),
                    f"seconds_{args.workers}_workers": round(t2, 1),
                }
                print(row, flush=True)
                rows.append(row)
    ray.shutdown()
    df = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "equivalence" if args.preset == ["default"] else "_".join(["equivalence", *args.preset])
    df.to_csv(out / f"{stem}.csv", index=False)
    (out / f"{stem}.md").write_text(_markdown(df, Path(args.dataset).stem, k, args, diff))
    print(f"wrote {out / stem}.csv and .md")


def _markdown(df: pd.DataFrame, dataset: str, k: int, args, diff: float) -> str:
    """The table, each preset's rows followed by their mean ± sd."""
    metrics = list(df.columns[2:])
    lines = [
        f"Dataset {dataset}, K = {k}, {args.seeds} seeds, preset {', '.join(args.preset)}.",
        "",
        "| preset | seed | " + " | ".join(metrics) + " |",
        "|" + "---|" * len(df.columns),
    ]
    for name, part in df.groupby("preset", sort=False):
        lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in part.itertuples(index=False)]
        mean, sd = part[metrics].mean(), part[metrics].std()
        cells = " | ".join(f"{mean[c]:.3f} ± {sd[c]:.3f}" for c in metrics)
        lines.append(f"| {name} | mean ± sd | {cells} |")
    lines += [
        "",
        f"Distributed K-means on 2 shards vs one process (same init): max |Δ| = {diff:.1e}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
