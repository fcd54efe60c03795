"""The whole CICL fit on the twelve real datasets on a GPU, without Ray or AnnData.

The device machine has torch but no scanpy/AnnData, and only a small folder travels there, so
the work is split in two:

    # here (AnnData + scanpy): the default preprocessing of every dataset, stored compactly
    .venv/bin/python benchmarks/gpu_fit.py prepare --data ../shared/data --out .gpu_data
    # on the GPU box (torch, numpy, sklearn): train + cluster each dataset, 3 seeds
    python benchmarks/gpu_fit.py run --prep .gpu_data --seeds 3 --out benchmarks/results

``prepare`` stores the scaled matrix losslessly as a per-gene base (the value every zero of the
log-normalised input scales to) plus the sparse values that differ from it, next to the PCA and the labels.
``run`` calls ``cicl.train.loop.train`` exactly as ``cicl fit`` does (default config, true K,
``train.device`` = the GPU) and writes ``gpu_fit.csv`` / ``gpu_fit.md``: ARI and NMI mean ± sd
and training seconds per dataset, beside the CPU numbers of ``quality.csv`` when present.
With ``--dist-check`` it also trains one dataset through ``TorchDistComm`` over a one-rank NCCL
process group (every collective of the multi-GPU path, on CUDA tensors) and compares its
labels with the plain run's; ``--repeat-check`` refits seed 0 to see whether the GPU run is
bit-reproducible.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def prepare(data: Path, out: Path) -> None:
    import anndata as ad

    from cicl.config import PreprocessConfig
    from cicl.data.estimate import estimate_n_clusters
    from cicl.data.preprocess import preprocess

    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(data.glob("*.h5ad")):
        a = ad.read_h5ad(path)
        p = preprocess(a, PreprocessConfig())
        x = p.x.astype(np.float32)
        base = _mode_per_gene(x)
        # CSR of the cells' own values wherever they differ from the base (stored, not
        # differenced: base + (x - base) need not round back to x)
        differs = x != base[None, :]
        y = a.obs["cell_type"].astype("category").cat.codes.to_numpy().astype(np.int16)
        extra = {}
        if p.counts is not None:  # the negative binomial decoder's target, as CSR
            nz = p.counts != 0
            extra = {
                "c_data": p.counts[nz],
                "c_indices": np.nonzero(nz)[1].astype(np.int32),
                "c_indptr": np.r_[0, np.cumsum(nz.sum(1))].astype(np.int64),
            }
        np.savez_compressed(
            out / f"{path.stem}.npz",
            base=base,
            data=x[differs],  # row-major, as CSR orders them
            indices=np.nonzero(differs)[1].astype(np.int32),
            indptr=np.r_[0, np.cumsum(differs.sum(1))].astype(np.int64),
            shape=np.array(x.shape),
            pcs=p.pcs.astype(np.float32),
            y=y,
            # Leiden's community count for the K cap (cluster.cap_k), as `cicl fit` computes
            # it, with seed 0 for every seed (`cicl fit` counts with the run's seed)
            n_resolved=np.int64(estimate_n_clusters(p.pcs, seed=0)),
            **extra,
        )
        back = load(out / f"{path.stem}.npz")
        assert np.array_equal(back[0], x), path.stem
        assert (back[3] is None) == (p.counts is None), path.stem
        assert p.counts is None or np.array_equal(back[3], p.counts), path.stem
        kb = (out / f"{path.stem}.npz").stat().st_size // 1024
        print(f"{path.stem}: {x.shape[0]} x {x.shape[1]}, stored {differs.mean():.2f}, {kb} KiB")


def _mode_per_gene(x: np.ndarray) -> np.ndarray:
    """Each gene's most frequent value (what its zeros scaled to; 0 for dense genes)."""
    base = np.zeros(x.shape[1], dtype=np.float32)
    for j in range(x.shape[1]):
        vals, counts = np.unique(x[:, j], return_counts=True)
        if counts.max() > 1:
            base[j] = vals[counts.argmax()]
    return base


def load(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """(scaled x, pcs, labels, raw counts or None) from a ``prepare`` file, without scipy."""
    f = np.load(path)
    n, g = (int(v) for v in f["shape"])
    x = np.repeat(f["base"][None, :], n, axis=0)
    indptr, indices, data = f["indptr"], f["indices"], f["data"]
    rows = np.repeat(np.arange(n), np.diff(indptr))
    x[rows, indices] = data
    counts = None
    if "c_data" in f.files:
        counts = np.zeros((n, g), dtype=np.float32)
        counts[np.repeat(np.arange(n), np.diff(f["c_indptr"])), f["c_indices"]] = f["c_data"]
    return x, f["pcs"], f["y"].astype(np.int64), counts


def fit_one(
    x, pcs, k, seed, device, comm=None, counts=None, overrides=None
) -> tuple[np.ndarray, float, int]:
    from cicl.config import CICLConfig
    from cicl.train.loop import train

    cfg = CICLConfig().with_overrides({**(overrides or {}), "seed": seed, "train.device": device})
    t0 = time.perf_counter()
    res = train(x, pcs, k, cfg, comm=comm, counts=counts)
    return res.labels, time.perf_counter() - t0, res.steps


def dist_check(
    x, pcs, k, device, counts=None, overrides=None
) -> tuple[dict, tuple[np.ndarray, float, int]]:
    """Train through TorchDistComm over a one-rank process group (NCCL on a GPU, gloo on the
    CPU) and compare with the plain run."""
    import torch.distributed as dist
    from sklearn.metrics import adjusted_rand_score

    from cicl.comm import TorchDistComm

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        comm = TorchDistComm()
        lab_d, sec_d, _ = fit_one(x, pcs, k, 0, device, comm, counts, overrides)
    finally:
        dist.destroy_process_group()
    plain = fit_one(x, pcs, k, 0, device, counts=counts, overrides=overrides)
    lab_p, sec_p, _ = plain
    return {
        "backend": backend,
        "world": 1,
        "seconds_dist": round(sec_d, 2),
        "seconds_plain": round(sec_p, 2),
        "ari_dist_vs_plain": round(float(adjusted_rand_score(lab_p, lab_d)), 4),
    }, plain


def run(args: argparse.Namespace) -> None:
    import torch
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(Path(args.prep).glob("*.npz"), key=lambda p: -np.load(p)["shape"][0])
    if args.datasets:
        files = [f for f in files if f.stem in args.datasets.split(",")]
    dev_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    extra: dict = {"device": dev_name, "torch": torch.__version__, "overrides": args.overrides}
    rows = []
    t_start = time.perf_counter()
    for f in files:
        x, pcs, y, counts = load(f)
        k = len(np.unique(y))
        ov = dict(args.overrides)  # files from before the K cap hold no count: K-means with K
        if "n_resolved" in (stored := np.load(f)).files:
            ov["cluster.n_resolved"] = int(stored["n_resolved"])
        plain = None
        if args.profile == f.stem:
            _profile(x, pcs, k, args.device, out / "gpu_fit_profile.txt", counts)
        if args.dist_check and "dist" not in extra and f.stem == args.check_dataset:
            extra["dist"], plain = dist_check(
                x, pcs, k, args.device, counts, ov
            )  # plain = seed 0's fit
            print("dist", json.dumps(extra["dist"]), flush=True)
        for seed in range(args.seed_start, args.seed_start + args.seeds):
            if time.perf_counter() - t_start > args.budget_s:
                extra["stopped_early"] = f"time budget {args.budget_s}s reached at {f.stem}"
                break
            fit = plain if seed == 0 and plain is not None else None
            lab, sec, steps = fit or fit_one(
                x, pcs, k, seed, args.device, counts=counts, overrides=ov
            )
            rows.append(
                {
                    "dataset": f.stem,
                    "n_cells": x.shape[0],
                    "k": k,
                    "seed": seed,
                    "ari": adjusted_rand_score(y, lab),
                    "nmi": normalized_mutual_info_score(y, lab),
                    "seconds": sec,
                    "steps": steps,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            if args.repeat_check and seed == 0 and "repeat" not in extra:
                lab2, _, _ = fit_one(x, pcs, k, 0, args.device, counts=counts, overrides=ov)
                extra["repeat"] = {
                    "dataset": f.stem,
                    "identical_labels": bool(np.array_equal(lab, lab2)),
                    "ari_between": round(float(adjusted_rand_score(lab, lab2)), 4),
                }
                print("repeat", json.dumps(extra["repeat"]), flush=True)
        _write(rows, extra, out)
        if "stopped_early" in extra:
            break


def _profile(x, pcs, k, device, path: Path, counts=None) -> None:
    """cProfile of one fit (seed 0): where the wall time goes, top 30 by own time."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    fit_one(x, pcs, k, 0, device, counts=counts)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
    path.write_text(buf.getvalue())
    print(buf.getvalue()[:4000], flush=True)


def _write(rows: list[dict], extra: dict, out: Path) -> None:
    import pandas as pd

    df = pd.DataFrame(rows)
    df.to_csv(out / "gpu_fit.csv", index=False)
    (out / "gpu_fit.json").write_text(json.dumps(extra, indent=1))
    cpu = None
    qpath = Path(__file__).resolve().parent / "results" / "quality.csv"
    if qpath.exists():
        q = pd.read_csv(qpath)
        cpu = q[q.method == "cicl"].groupby("dataset")[["ari", "seconds"]].mean()
    g = df.groupby("dataset", sort=False)
    lines = [
        f"GPU: {extra['device']}, torch {extra['torch']}; "
        + (
            f"overrides `{json.dumps(extra['overrides'])}`"
            if extra.get("overrides")
            else "default config"
        )
        + f", true K, {df.seed.nunique()} seeds ({df.seed.min()}-{df.seed.max()}); "
        "seconds = `train()` (training + K-means rounds).",
        "",
        "| dataset (cells) | ARI GPU | NMI GPU | seconds GPU | ARI CPU | seconds CPU (1 thread) |",
        "|---|---|---|---|---|---|",
    ]
    for ds, r in g:
        c = cpu.loc[ds] if cpu is not None and ds in cpu.index else None
        lines.append(
            f"| {ds} ({r.n_cells.iloc[0]}) | {r.ari.mean():.3f} ± {np.nan_to_num(r.ari.std()):.3f} "
            f"| {r.nmi.mean():.3f} ± {np.nan_to_num(r.nmi.std()):.3f} | {r.seconds.mean():.1f} | "
            + (f"{c.ari:.3f} | {c.seconds:.0f} |" if c is not None else "— | — |")
        )
    m = g[["ari", "seconds"]].mean()
    lines.append(f"| mean | **{m.ari.mean():.3f}** | | {m.seconds.sum():.0f} in all | | |")
    for key in ("repeat", "dist", "stopped_early", "note"):
        if key in extra:
            lines.append(f"\n{key}: `{json.dumps(extra[key])}`")
    (out / "gpu_fit.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--out", default=".gpu_data")
    r = sub.add_parser("run")
    r.add_argument("--prep", default=".gpu_data")
    r.add_argument("--out", default="benchmarks/results")
    r.add_argument("--seeds", type=int, default=3)
    r.add_argument("--seed-start", type=int, default=0, help="first seed (seeds run from it)")
    r.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override"
    )
    r.add_argument("--datasets", default=None)
    r.add_argument("--device", default="cuda")
    r.add_argument("--budget-s", type=float, default=1e9, help="stop starting fits after this")
    r.add_argument("--dist-check", action="store_true")
    r.add_argument("--check-dataset", default="pbmc_10x")
    r.add_argument("--repeat-check", action="store_true")
    r.add_argument("--profile", default=None, help="cProfile one fit of this dataset first")
    args = ap.parse_args()
    if args.cmd == "run":
        from cicl.cli import parse_set

        args.overrides = parse_set(args.set)
    if args.cmd == "prepare":
        prepare(Path(args.data), Path(args.out))
    else:
        run(args)


if __name__ == "__main__":
    main()
