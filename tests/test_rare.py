"""Rare cell types (issue 43): per-type scores, and a streamed fit's density-balanced sketch
that lets the preprocessing and the K estimate see a type a random sample leaves at a few
cells."""

from __future__ import annotations

import math

import numpy as np
import pytest


def test_type_scores_exact_on_a_hand_made_example():
    from cicl.objective import type_scores

    truth = np.array(["a"] * 6 + ["b"] * 3 + ["c"])
    # a: 5 in cluster 0, 1 in cluster 1; b: 2 in cluster 1, 1 unlabelled (left out); c: cluster 1
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, None, 1], dtype=object)
    got = type_scores(labels, truth)
    assert got["a"] == pytest.approx((6 / 9, 2 * 5 / (6 + 5)))
    assert got["b"] == pytest.approx((2 / 9, 2 * 2 / (2 + 4)))
    assert got["c"] == pytest.approx((1 / 9, 2 * 1 / (1 + 4)))


def test_truth_scores_rare_f1_is_the_mean_over_types_below_one_percent():
    from cicl.objective import truth_scores

    # 200 cells: a 150, b 48, rare c and d one cell each (0.5 %)
    truth = np.array(["a"] * 150 + ["b"] * 48 + ["c", "d"])
    labels = np.array([0] * 150 + [1] * 48 + [2, 1])  # c has its own cluster, d sits in b's
    r = truth_scores(labels, truth)
    assert r["n_rare"] == 2
    assert r["rare_f1"] == pytest.approx((1.0 + 2 * 1 / (1 + 49)) / 2)
    assert r["ari"] < 1.0
    none_rare = truth_scores(np.array([0, 0, 1, 1]), np.array(["x", "x", "y", "y"]))
    assert none_rare["n_rare"] == 0 and math.isnan(none_rare["rare_f1"])
    assert none_rare["ari"] == 1.0


def test_water_level_takes_equal_cells_per_group_and_all_of_a_smaller_one():
    from cicl.data.sketch import water_level

    assert water_level(np.array([2, 5, 30, 40]), 30) == 11  # 2 + 5 + 11 + 11 = 29 <= 30
    assert water_level(np.array([2, 5, 30, 40]), 77) == 40  # everything fits
    assert water_level(np.array([10, 10]), 5) == 2
    sizes = np.random.default_rng(0).integers(1, 300, 150)
    for total in (100, 1_000, 10_000, int(sizes.sum()) - 1):
        q = water_level(sizes, total)
        assert np.minimum(sizes, q).sum() <= total < np.minimum(sizes, q + 1).sum()


def test_balanced_sketch_lifts_a_small_separated_group():
    """A group of 0.1 % of the points gets a micro-cluster of its own and ~1/N_MICRO of the
    sketch: a random sample of the same size would hold ~2 of its points."""
    from cicl.data.sketch import N_MICRO, balanced_sketch

    rng = np.random.default_rng(0)
    big = rng.normal(0, 1, (19_980, 10)) * np.linspace(3, 0.5, 10)
    small = rng.normal(0, 0.3, (20, 10)) + 12.0
    pcs = np.vstack([big, small]).astype(np.float32)
    take, q = balanced_sketch(pcs, 2_000, N_MICRO, seed=0)
    assert np.all(np.diff(take) > 0) and 1_900 <= len(take) <= 2_000
    assert q >= 2_000 // N_MICRO
    assert (take >= 19_980).sum() >= min(20, q)  # the small group: >= one micro-cluster's share
    again, _ = balanced_sketch(pcs, 2_000, N_MICRO, seed=0)
    assert np.array_equal(take, again)  # seeded


@pytest.fixture(scope="module")
def rare_file(data_dir, tmp_path_factory):
    """20,000 cells like cite_cbmc, Zipf proportions with the rarest type at 0.3 %."""
    from cicl.data.simulate import simulate

    path = tmp_path_factory.mktemp("rare") / "rare.h5ad"
    simulate(
        data_dir / "cite_cbmc.h5ad",
        20_000,
        path,
        mode="resample",
        proportions="zipf",
        rarest=0.003,
        seed=0,
    )
    return path


def _rarest_found(path, prep, rows) -> tuple[float, int]:
    """F1 of the rarest type's best Leiden community among those K estimation counts, and
    its cells in the sample."""
    import anndata as ad

    from cicl.data.estimate import knn_graph, leiden_labels

    truth = np.asarray(ad.read_h5ad(path, backed="r").obs["cell_type"]).astype(str)
    names, counts = np.unique(truth, return_counts=True)
    rare = truth[rows] == names[np.argmin(counts)]
    lab = leiden_labels(knn_graph(prep.pcs, 0), 1.0, 0)
    sizes = np.bincount(lab)
    counted = np.flatnonzero(sizes >= max(3, 0.005 * len(lab)))
    f1 = [2 * np.sum(rare & (lab == c)) / (rare.sum() + sizes[c]) for c in counted]
    return max(f1), int(rare.sum())


def test_sketch_lets_k_estimation_count_a_rare_type(rare_file, monkeypatch):
    """On the random sample the rarest type (0.3 %: ~12 of 4,000 cells) is below the
    0.5 % a Leiden community needs to count; on the sketch it is a counted community."""
    import cicl.data.sketch as sketch
    from cicl.config import PreprocessConfig
    from cicl.data.stream import fit_on_sample

    cfg = PreprocessConfig(n_top_genes=300)
    _, old, _, _ = fit_on_sample(rare_file, cfg, n_sample=4_000, seed=0)
    assert old.info["steps"][0] == "fitted on a random sample of 4000 of 20000 cells"
    old_rows = np.sort(np.random.default_rng(0).choice(20_000, 4_000, replace=False))
    f1_old, n_old = _rarest_found(rare_file, old, old_rows)

    seen = {}
    monkeypatch.setattr(sketch, "SKETCH_FROM", 10_000)
    real = sketch.sketch_rows
    monkeypatch.setattr(sketch, "sketch_rows", lambda *a, **k: seen.setdefault("s", real(*a, **k)))
    _, new, _, _ = fit_on_sample(rare_file, cfg, n_sample=4_000, seed=0)
    assert new.info["steps"][0].startswith("fitted on a density-balanced sketch of")
    f1_new, n_new = _rarest_found(rare_file, new, seen["s"].rows)
    assert n_old < 20 <= n_new, (n_old, n_new)
    assert f1_old < 0.5 <= f1_new, (f1_old, f1_new)


def test_small_files_keep_the_random_sample_bit_for_bit(data_dir, monkeypatch):
    """Below ``SKETCH_FROM`` cells nothing of the sketch runs, and the sample is the seeded
    random one preprocessed as before."""
    import anndata as ad

    import cicl.data.sketch as sketch
    from cicl.config import PreprocessConfig
    from cicl.data.preprocess import preprocess
    from cicl.data.stream import fit_on_sample

    def refuse(*a, **k):
        raise AssertionError("sketch used below SKETCH_FROM")

    monkeypatch.setattr(sketch, "sketch_rows", refuse)
    path = data_dir / "cite_cbmc.h5ad"
    cfg = PreprocessConfig(n_top_genes=300)  # fewer genes: a cheaper exact PCA, same path
    _, prep, n, _ = fit_on_sample(path, cfg, n_sample=3_000, seed=3)
    rows = np.sort(np.random.default_rng(3).choice(n, 3_000, replace=False))
    want = preprocess(ad.read_h5ad(path)[rows], cfg)
    assert np.array_equal(prep.pcs, want.pcs) and np.array_equal(prep.x, want.x)


def test_sketch_with_a_batch_key_keeps_every_batch(data_dir, tmp_path, monkeypatch):
    """The sketch is topped up so that ComBat sees every batch, a 20-cell one included."""
    import anndata as ad

    import cicl.data.sketch as sketch
    from cicl.config import PreprocessConfig
    from cicl.data.stream import fit_on_sample

    a = ad.read_h5ad(data_dir / "cite_cbmc.h5ad")
    run = np.where(np.random.default_rng(0).integers(0, 2, a.n_obs) == 1, "run2", "run1")
    run[:20] = "tiny"
    a.obs["run"] = run
    path = tmp_path / "runs.h5ad"
    a.write_h5ad(path)
    monkeypatch.setattr(sketch, "SKETCH_FROM", 1_000)
    cfg = PreprocessConfig(n_top_genes=300, batch_key="run")
    t, prep, n, _ = fit_on_sample(path, cfg, n_sample=1_500, seed=0)
    step = prep.info["steps"][0]
    assert step.startswith("fitted on a density-balanced sketch of ") and f"of {n} cells" in step
    assert step.endswith("random cells so that every batch is in")
    assert prep.info["n_batches"] == 3 and (t.batch_codes >= 0).all()
