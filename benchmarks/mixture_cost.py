"""Cost of the final partition's mixture refinements: shared covariance vs one per cluster.

Times ``refine_tied`` and ``refine_full`` (from the same K-means partition, one process, the
threads torch is given) on Gaussian clusters of different shapes in the default clustering
space's width (82 = 32 embedding + 50 PCA), at the sizes a fit refines (up to the 50,000-cell
sample a streamed atlas is clustered on), and the rate at which each stored rule assigns cells
(what ``cicl predict`` and a streamed fit's final pass pay per cell). Writes
mixture_cost.csv / mixture_cost.md.

    python benchmarks/mixture_cost.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch


def clusters(n: int, k: int, d: int, seed: int) -> torch.Tensor:
    """k Gaussian types, each with its own random covariance shape and scale."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(k, (n,), generator=g)
    means = torch.randn(k, d, generator=g) * 3.0
    shapes = torch.randn(k, d, d, generator=g) / d**0.5 * torch.rand(k, 1, 1, generator=g) * 2
    z = torch.randn(n, d, generator=g)
    return means[y] + torch.einsum("nd,nde->ne", z, shapes[y]) + 0.3 * z


def run(n: int, k: int, d: int, assign_cells: int) -> dict:
    from cicl.cluster.kmeans import kmeans
    from cicl.cluster.mixture import refine_full, refine_tied

    x = clusters(n, k, d, seed=0)
    start = kmeans(x, k, n_init=1, seed=0).labels
    t = time.perf_counter()
    tied, tm = refine_tied(x, start, k)
    t_tied = time.perf_counter() - t
    t = time.perf_counter()
    _, fm = refine_full(x, tied.labels, k)
    t_full = time.perf_counter() - t
    q = clusters(assign_cells, k, d, seed=1)
    rates = {}
    for name, m in (("tied", tm), ("full", fm)):
        t = time.perf_counter()
        m.assign(q, tied.centroids)
        rates[name] = assign_cells / (time.perf_counter() - t)
    return {
        "cells": n,
        "k": k,
        "d": d,
        "threads": torch.get_num_threads(),
        "tied_s": round(t_tied, 2),
        "tied_steps": tm.n_iter,
        "full_s": round(t_full, 2),
        "full_steps": fm.n_iter,
        "full_s_per_step": round(t_full / max(fm.n_iter, 1), 3),
        "assign_tied_cells_per_s": round(rates["tied"]),
        "assign_full_cells_per_s": round(rates["full"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default="10000,50000")
    ap.add_argument("--k", default="10,30")
    ap.add_argument("--d", type=int, default=82)
    ap.add_argument("--assign-cells", type=int, default=200_000)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    rows = [
        run(n, k, args.d, args.assign_cells)
        for n in map(int, args.cells.split(","))
        for k in map(int, args.k.split(","))
    ]
    df = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "mixture_cost.csv", index=False)
    from scaling import _markdown  # benchmarks/ is on the path when run as a script

    (out / "mixture_cost.md").write_text(_markdown(df))
    print(_markdown(df))


if __name__ == "__main__":
    main()
