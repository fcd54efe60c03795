"""Shared fixtures: a tiny fast config, the shared real data folder, single-threaded torch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import cicl  # noqa: F401  (first: pins torch's CPU kernels before torch loads, see cicl._cpu)

# isort: split
import torch
from hypothesis import HealthCheck, settings

# Hypothesis (tests/test_fuzz.py): `ci` is the default (what `make test` runs: few examples,
# derandomized so CI is reproducible); `HYPOTHESIS_PROFILE=slow` (`make test-slow`) explores.
# No example database: it would be written into the checkout.
_FUZZ = dict(
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("ci", max_examples=15, derandomize=True, **_FUZZ)
settings.register_profile("slow", max_examples=300, **_FUZZ)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# `make test` runs two pytest-xdist workers: share the cores between them
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))

# Modules whose tests start Ray (a local instance, a 2-node cluster, sweeps in subprocesses):
# under xdist they run one after another in one worker, never two Ray instances at once
# (`ray stop` in one would kill the other's).
RAY_MODULES = {"test_api_ray", "test_cluster", "test_ray_train", "test_tune", "test_tune_atlas"}


def _scope(nodeid: str) -> str:
    module = nodeid.split("::", 1)[0]
    return "ray" if Path(module).stem in RAY_MODULES else module


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadscope`` with the Ray modules as one scope; every other module is its own,
    so module fixtures are built once. (xdist's ``loadgroup`` marks do not reach the
    scheduler under pytest 9.)"""
    from xdist.scheduler import LoadScopeScheduling

    class RayTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _scope(nodeid)

    return RayTogether(config, log) if config.getvalue("dist") == "loadscope" else None


def pytest_collection_modifyitems(config, items):
    """The Ray tests first: they are the longest chain, so they start at once."""
    items.sort(key=lambda item: _scope(item.nodeid) != "ray")  # stable sort


DATA = Path(
    os.environ.get("CICL_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
).resolve()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.fail(f"shared data folder not found at {DATA}; set CICL_DATA")
    return DATA


@pytest.fixture(scope="session")
def tiny_cfg():
    """A small, fast model and schedule (configs are frozen, so one instance is shared)."""
    from cicl.config import CICLConfig

    return CICLConfig().with_overrides(
        {
            "model.transformer.n_tokens": 8,
            "model.transformer.d_model": 16,
            "model.transformer.n_heads": 2,
            "model.transformer.ffn_dim": 32,
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
