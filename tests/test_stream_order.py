"""Streaming that does not care about the file's row order, and a schedule that grows with
the data (issue 43): shards, pools and samples are random over all cells; training is at
least one pass, cut into epochs so that rounds happen while it trains; a time budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cicl.comm import Comm
from cicl.config import CICLConfig
from cicl.data.stream import chunk_starts, runs, shard_rows
from cicl.train.plan import schedule
from cicl.train.stream import _pools


def sorted_types(n: int, n_types: int) -> np.ndarray:
    """Cell types of a file stored sorted by type, equal shares."""
    return np.repeat(np.arange(n_types), -(-n // n_types))[:n]


@pytest.mark.parametrize("n,world,chunk", [(20_000, 2, 256), (1_001, 3, 64), (10, 4, 3)])
def test_shards_cover_every_row_once_in_chunks(n, world, chunk):
    shards = shard_rows(n, world, chunk)
    rows = np.concatenate(shards)
    assert np.array_equal(np.sort(rows), np.arange(n))  # a partition of the file
    assert all((np.diff(s) > 0).all() for s in shards)  # each in file order
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= chunk  # balanced up to a chunk
    assert all(
        (b - a) % chunk == 0 or b == n for s in shards for a, b in zip(*runs(s), strict=True)
    )


def test_every_rank_of_a_sorted_file_holds_every_type():
    """A file sorted by type, two ranks: contiguous row ranges gave each rank half of the
    types; chunks dealt in turn give each rank all of them, in their overall shares."""
    types = sorted_types(20_000, 10)
    for rows in shard_rows(20_000, 2, 256):
        share = np.bincount(types[rows], minlength=10) / len(rows)
        assert np.abs(share - 0.1).max() < 0.02


def test_pools_of_a_sorted_file_mix_types_and_make_one_pass():
    """One pass over a rank's cells in pools of random chunks: every cell once, and a pool of
    a sorted file holds many types (a contiguous pool of 4,096 rows held one or two)."""
    types = sorted_types(40_000, 10)
    starts = chunk_starts(np.arange(40_000), 256)
    gen = torch.Generator().manual_seed(0)
    pools = list(_pools(starts, 40_000, 4096, gen))
    seen = np.concatenate(pools)
    assert np.array_equal(np.sort(seen), np.arange(40_000))
    assert all((np.diff(p) > 0).all() for p in pools)
    kinds = [len(np.unique(types[p])) for p in pools[:-1]]
    assert min(kinds) >= 6, kinds


def test_chunk_starts_break_at_gaps_and_every_chunk():
    rows = np.r_[np.arange(0, 5), np.arange(10, 13), np.arange(20, 27)]
    assert chunk_starts(rows, 3).tolist() == [0, 3, 5, 8, 11, 14]


def schedule_of(n: int, **over) -> tuple[int, int, int]:
    cfg = CICLConfig().with_overrides({f"train.{k}": v for k, v in over.items()})
    s = schedule(cfg, n, n, Comm())
    return s.epochs, s.steps_per_epoch, s.epochs * s.steps_per_epoch


def test_schedule_of_an_atlas_is_a_pass_cut_into_epochs():
    epochs, per_epoch, total = schedule_of(1_000_000)
    assert total * 256 >= 1_000_000  # every cell seen at least once
    assert per_epoch <= 100 and epochs >= 20  # rounds (every 5 epochs) while it trains
    # small sets keep their schedule: one pass per epoch, 20 passes within 100-600 steps
    assert schedule_of(3_000) == (20, 11, 220)
    assert schedule_of(8_617) == (19, 33, 627)
    # a fixed epoch count or a cap on an epoch's steps is taken as given
    assert schedule_of(1_000_000, epochs=2)[:2] == (2, 1_000_000 // 256)
    assert schedule_of(1_000_000, steps_per_epoch=10)[1] == 10


def test_time_budget_stops_training_and_still_partitions(tiny_cfg):
    from cicl.train.loop import train

    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 40)).astype(np.float32)
    pcs = x[:, :10].copy()
    cfg = tiny_cfg.with_overrides({"train.epochs": 500, "train.time_budget": 0.5})
    res = train(x, pcs, 3, cfg)
    assert res.budget_hit and res.epochs < 500 and res.steps < 500 * 2
    assert res.labels.shape == (600,) and len(np.unique(res.labels)) == 3
    assert res.history[-1]["epoch"] == res.epochs  # the last round was run at the stop
    full = train(x, pcs, 3, tiny_cfg.with_overrides({"train.epochs": 3}))
    assert not full.budget_hit and full.epochs == 3
