"""One training plan for cells in memory and streamed ones: what one path honours, the other
honours too or refuses, naming the option."""

from __future__ import annotations

import numpy as np
import pytest

from cicl.config import ConfigError


class ArraySource:
    """A ``Source`` over arrays in memory: the streamed path without a file."""

    def __init__(self, x: np.ndarray, pcs: np.ndarray, counts: np.ndarray | None):
        self.x, self.pcs, self.counts = x, pcs, counts
        self.n, self.has_counts = x.shape[0], counts is not None
        self.chunk_starts = np.arange(0, self.n, 64)

    def read(self, idx):
        return self.x[idx], self.pcs[idx]

    def read_counts(self, idx):
        return self.x[idx], self.pcs[idx], self.counts[idx]


@pytest.fixture(scope="module")
def prep(tiny_cfg):
    from cicl.data.preprocess import preprocess
    from cicl.data.synthetic import synthetic_adata

    return preprocess(
        synthetic_adata(n_cells=300, n_genes=200, n_clusters=3, seed=4), tiny_cfg.preprocess
    )


def _stream(prep, cfg, **kw):
    from cicl.train.stream import train_stream

    source = ArraySource(prep.x, prep.pcs, prep.counts)
    mean = prep.pcs.mean(0)
    rms = float(np.sqrt(((prep.pcs - mean) ** 2).sum(1).mean()))
    return train_stream(
        source, 3, cfg, pca_stats=(mean, rms), n_genes=prep.x.shape[1], progress=False, **kw
    )


def test_without_reclustering_both_paths_refresh_pseudo_labels_and_record_every_5_epochs(
    prep, tiny_cfg, monkeypatch
):
    """``cluster.recluster_every: null`` (the official code): the centroids stay, the
    pseudo-labels are re-derived every epoch once the cluster term is on, and the history
    records every 5 epochs and the last. Streaming used to do neither (no history at all)."""
    from cicl.train.loop import train
    from cicl.train.plan import TrainingPlan

    cfg = tiny_cfg.with_overrides(
        {
            "cluster.recluster_every": None,
            "train.epochs": 11,
            "loss.lam": 0.5,
            "loss.instance_weight": 1.0,
            "loss.warmup_frac": 0.3,  # the cluster term from epoch 4 on
            "train.block_size": 128,
            "cluster.kmeans_sample": 200,
            "cluster.final_n_init": 3,  # the final partition is not what is tested: cheap
            "cluster.metric": "euclidean",
        }
    )
    refreshed: list[int] = []
    original = TrainingPlan.refresh_pseudo_labels

    def spy(plan, h=None):
        refreshed.append(1)
        original(plan, h)

    monkeypatch.setattr(TrainingPlan, "refresh_pseudo_labels", spy)
    runs = {
        "memory": train(prep.x, prep.pcs, 3, cfg, counts=prep.counts),
        "stream": None,
    }
    calls = {"memory": len(refreshed)}
    refreshed.clear()
    runs["stream"] = _stream(prep, cfg)
    calls["stream"] = len(refreshed)
    for path, res in runs.items():
        assert [r["epoch"] for r in res.history] == [5, 10, 11], path
        assert all(r["cluster_active"] for r in res.history), path
        assert len({r["inertia"] for r in res.history}) == 1, path  # the centroids never move
    # the initial assignment, then one per epoch with the cluster term (epochs 4 to 11)
    assert calls == {"memory": 1 + 8, "stream": 1 + 8}
    assert runs["stream"].history[0].keys() == runs["memory"].history[0].keys()


def test_streaming_refuses_what_it_cannot_honour(prep, tiny_cfg):
    """Two views of every cell drawn once (``augment.resample: static``) would hold the atlas
    twice in memory: refused, naming the option, not silently drawn per step."""
    with pytest.raises(ConfigError, match=r"augment\.resample: static"):
        _stream(prep, tiny_cfg.with_overrides({"augment.resample": "static"}))


def test_a_pca_residual_model_needs_its_projection(prep, tiny_cfg):
    """``model.pca_residual`` without the PCA projection would train the plain encoder."""
    with pytest.raises(ValueError, match=r"model\.pca_residual"):
        _stream(prep, tiny_cfg.with_overrides({"model.pca_residual": True}))
