"""Shared fixtures: a tiny fast config, the shared real data folder, single-threaded torch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

DATA = Path(
    os.environ.get("CICL_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
).resolve()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.fail(f"shared data folder not found at {DATA}; set CICL_DATA")
    return DATA


@pytest.fixture
def tiny_cfg():
    from cicl.config import CICLConfig

    return CICLConfig().with_overrides(
        {
            "model.n_tokens": 8,
            "model.d_model": 16,
            "model.n_heads": 2,
            "model.ffn_dim": 32,
            "model.embed_dim": 8,
            "model.proj_hidden": 32,
            "model.proj_dim": 16,
            "train.epochs": 6,
            "train.batch_size": 64,
            "cluster.recluster_every": 2,
            "cluster.n_init": 3,
            "preprocess.n_pcs": 10,
        }
    )
