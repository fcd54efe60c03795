"""How fast one pass over a sorted on-disk atlas is read in random order: cicl's pools of
random chunks (``cicl.train.stream._pools`` + ``cicl.data.stream._read_block``) against
scdataset's block shuffling, when scdataset is importable (it is not a cicl dependency:
install it beside, e.g. ``pip install --target /tmp/scds scdataset`` and ``--path /tmp/scds``).

Both read the same runs of rows from the same ``X``; what differs is the index plan and who
holds which cells. Columns: cells/s of raw reads (no preprocessing), reads per pass, and how
mixed a pool is (median number of true types in a pool of ~4,096 cells).

    python benchmarks/loaders.py ATLAS.h5ad [--label-key cell_type] [--chunk 256]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import date
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import torch
from scaling import _markdown  # benchmarks/ is on the path when run as a script

from cicl.data.stream import _read_block, chunk_starts
from cicl.train.stream import _pools

RESULTS = Path(__file__).parent / "results"


def contiguous(n: int, pool: int):
    for a in range(0, n, pool):
        yield np.arange(a, min(a + pool, n))


def cicl_pools(n: int, pool: int, chunk: int):
    gen = torch.Generator().manual_seed(0)
    yield from _pools(chunk_starts(np.arange(n), chunk), n, pool, gen)


def scdataset_pools(n: int, pool: int, chunk: int):
    """scdataset's BlockShuffling with one rank's fixed cells (``indices``), fetches of
    ``pool`` cells; its fetch callback returns the indices it was asked for."""
    from scdataset import BlockShuffling, scDataset

    class Rows:
        def __len__(self) -> int:
            return n

        def __getitem__(self, idx):
            return np.asarray(idx)

    ds = scDataset(
        Rows(),
        BlockShuffling(block_size=chunk, indices=np.arange(n)),
        batch_size=pool,
        fetch_factor=1,
        seed=0,
        rank=0,
        world_size=1,
    )
    for batch in ds:
        yield np.sort(np.asarray(batch))


def measure(path: Path, plan, label_key: str, name: str) -> dict:
    types = ad.read_h5ad(path, backed="r").obs[label_key].astype(str).to_numpy()
    with h5py.File(path, "r") as f:
        X = f["X"]
        t = time.perf_counter()
        kinds, reads, cells = [], 0, 0
        for rows in plan:
            block = _read_block(X, rows)
            cells += block.shape[0]
            reads += int((np.diff(rows) != 1).sum() + 1)
            kinds.append(len(np.unique(types[rows])))
        s = time.perf_counter() - t
    return {
        "loader": name,
        "cells": cells,
        "seconds": round(s, 2),
        "cells_per_s": round(cells / s),
        "runs_read": reads,
        "median_types_per_pool": float(np.median(kinds)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("atlas", type=Path)
    ap.add_argument("--label-key", default="cell_type")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--pool", type=int, default=4096)
    ap.add_argument("--path", default=None, help="folder scdataset is installed in")
    args = ap.parse_args()
    if args.path:
        sys.path.insert(0, args.path)
    with h5py.File(args.atlas, "r") as f:
        n = int(f["X"].attrs["shape"][0])
    plans = {
        "contiguous pools (before)": contiguous(n, args.pool),
        f"cicl: pools of random {args.chunk}-row chunks": cicl_pools(n, args.pool, args.chunk),
    }
    try:
        import scdataset  # noqa: F401

        plans[f"scdataset BlockShuffling({args.chunk})"] = scdataset_pools(n, args.pool, args.chunk)
    except ImportError:
        print("scdataset not importable: its row left out", file=sys.stderr)
    rows = [measure(args.atlas, plan, args.label_key, name) for name, plan in plans.items()]
    df = pd.DataFrame(rows)
    RESULTS.mkdir(exist_ok=True)
    df.to_csv(RESULTS / "loaders.csv", index=False)
    head = (
        f"One pass over `{args.atlas.name}` ({n} cells, stored sorted by type), pools of "
        f"{args.pool} cells; {platform.processor() or platform.machine()}, {date.today()}.\n\n"
    )
    (RESULTS / "loaders.md").write_text(head + _markdown(df))
    print(head + _markdown(df))


if __name__ == "__main__":
    main()
