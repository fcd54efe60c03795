"""The benchmark's dataset variants: a subsample keeps its cells' labels and only the classes it
drew; thinning keeps integer counts, lowers the median to the target, and refuses non-counts."""

import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import variants  # noqa: E402


def test_subsample_keeps_labels_of_the_drawn_cells(data_dir):
    a = ad.read_h5ad(data_dir / "pollen.h5ad")
    s = variants.subsample(a, 40, seed=1)
    assert s.n_obs == 40
    assert list(s.obs["cell_type"].cat.categories) == sorted(set(s.obs["cell_type"]))
    # the same cells, in the original order, with their own labels
    pos = a.obs_names.get_indexer(s.obs_names)
    assert (np.diff(pos) > 0).all()
    assert (a.obs["cell_type"].astype(str).to_numpy()[pos] == s.obs["cell_type"].astype(str)).all()
    assert (variants.subsample(a, 40, seed=1).obs_names == s.obs_names).all()


def test_thinning_lowers_depth_and_keeps_counts(data_dir):
    a = ad.read_h5ad(data_dir / "baron_mouse1.h5ad")
    t = variants.thin(a, 300, seed=0)
    totals = np.asarray(t.X.sum(1)).ravel()
    assert abs(np.median(totals) - 300) < 30
    assert np.array_equal(t.X.data, np.round(t.X.data))
    assert (totals > 0).all()
    # binomial thinning only removes molecules: no cell/gene gains counts
    kept = a.obs_names.get_indexer(t.obs_names)
    assert (t.X - a.X[kept]).max() <= 0


def test_main_writes_the_variants_to_out(data_dir, tmp_path):
    argv = ["--data", str(data_dir), "--out", str(tmp_path), "--subsample", "pollen"]
    argv += ["--sizes", "50,5000", "--thin", "pollen", "--median", "1000"]
    assert variants.main(argv) == 0
    # 5,000 is more than pollen's 300 cells: skipped, not an error
    assert sorted(p.name for p in tmp_path.glob("*.h5ad")) == ["pollen_50.h5ad", "pollen_thin.h5ad"]
    assert ad.read_h5ad(tmp_path / "pollen_50.h5ad").n_obs == 50


def test_thinning_refuses_values_that_are_not_counts(data_dir):
    a = ad.read_h5ad(data_dir / "goolam.h5ad")  # shipped log-normalised
    with pytest.raises(ValueError, match="raw counts"):
        variants.thin(a, 300)
