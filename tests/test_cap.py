"""The K cap: given K above what the data resolve (Leiden's community count), the final
K-means forms that many clusters and the rest are minority sub-groups split off them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score

import cicl.pipeline as pipeline
from cicl.comm import Comm
from cicl.config import CICLConfig, ConfigError
from cicl.data.estimate import estimate_n_clusters
from cicl.train.loop import final_kmeans, main_k


def _pcs(n: int = 300, k: int = 3) -> np.ndarray:
    x, _ = make_blobs(n_samples=n, centers=k, n_features=10, cluster_std=1.0, random_state=0)
    return x.astype(np.float32)


def test_main_k_caps_only_when_on_and_resolved():
    cfg = CICLConfig()
    assert main_k(cfg, 8) == 8  # nothing resolved yet: K as asked
    capped = cfg.with_overrides({"cluster.n_resolved": 5})
    assert main_k(capped, 8) == 5 and main_k(capped, 4) == 4  # never above K
    assert main_k(capped.with_overrides({"cluster.cap_k": "off"}), 8) == 8
    with pytest.raises(ConfigError, match="n_resolved"):
        cfg.with_overrides({"cluster.n_resolved": 0})


def test_resolve_cap_counts_leiden_communities_for_a_given_k():
    pcs, cfg = _pcs(), CICLConfig()
    got = pipeline.resolve_cap(cfg, pcs, 6, estimated=False).cluster.n_resolved
    assert got == estimate_n_clusters(pcs, seed=cfg.seed) and got < 6  # 3 blobs, not 6
    # an estimated K is Leiden's count already; a number set by hand or "off" is kept
    assert pipeline.resolve_cap(cfg, pcs, 4, estimated=True).cluster.n_resolved == 4
    fixed = cfg.with_overrides({"cluster.n_resolved": 9})
    assert pipeline.resolve_cap(fixed, pcs, 6, estimated=False).cluster.n_resolved == 9
    off = cfg.with_overrides({"cluster.cap_k": "off"})
    assert pipeline.resolve_cap(off, pcs, 6, estimated=False).cluster.n_resolved is None


def test_resolve_cap_skips_atlases_above_the_cell_limit(monkeypatch):
    monkeypatch.setattr(pipeline, "CAP_MAX_CELLS", 100)
    assert pipeline.resolve_cap(CICLConfig(), _pcs(), 6, estimated=False).cluster.n_resolved is None


def test_cap_note_says_how_the_clusters_were_formed():
    cfg = CICLConfig().with_overrides({"cluster.n_resolved": 3})
    note = pipeline.cap_note(cfg, 5, "given")
    assert note.startswith("given; the data resolve 3 (Leiden), the other 2 are minority")
    assert pipeline.cap_note(cfg, 3, "given") == "given"


def test_final_kmeans_keeps_a_large_population_whole():
    """An elongated large class, and a second class with a small distinct group beside it;
    K = 3 asked, 2 resolved. Halving the large class lowers the inertia more than splitting off
    the small group, so K-means with K halves it; the cap keeps it whole and finds the group."""
    g = torch.Generator().manual_seed(0)
    big = torch.randn(600, 3, generator=g) * torch.tensor([6.0, 1.0, 1.0])
    other = torch.randn(300, 3, generator=g) + torch.tensor([0.0, 40.0, 0.0])
    small = torch.randn(20, 3, generator=g) * 0.3 + torch.tensor([0.0, 40.0, 15.0])
    h = torch.cat([big, other, small])
    truth = np.repeat([0, 1, 2], [600, 300, 20])
    cfg = CICLConfig().with_overrides({"cluster.n_init": 3})
    plain = final_kmeans(h, 3, cfg, len(h), Comm())
    capped = final_kmeans(h, 3, cfg.with_overrides({"cluster.n_resolved": 2}), len(h), Comm())
    assert adjusted_rand_score(truth, plain.labels.numpy()) < 0.8  # K-means halves the big one
    assert adjusted_rand_score(truth, capped.labels.numpy()) == 1.0
    # centroids and inertia describe the returned labels
    cents = torch.stack([h[capped.labels == c].mean(0) for c in range(3)])
    assert torch.allclose(capped.centroids, cents, atol=1e-4)
    assert capped.inertia == pytest.approx(float(((h - cents[capped.labels]) ** 2).sum()), 1e-4)
