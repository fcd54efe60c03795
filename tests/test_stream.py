"""`cicl simulate` and the streaming (larger-than-memory) path, single process."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score


@pytest.fixture(scope="module")
def sim(data_dir, tmp_path_factory):
    from cicl.cli import main

    out = tmp_path_factory.mktemp("sim") / "atlas.h5ad"
    rc = main(
        ["simulate", "--like", str(data_dir / "pollen.h5ad"), "--cells", "3000"]
        + ["--out", str(out), "--genes", "500", "--quiet"]
    )
    assert rc == 0
    return out


def test_simulate_writes_what_it_promises(sim, data_dir):
    a = ad.read_h5ad(sim)
    real = ad.read_h5ad(data_dir / "pollen.h5ad")
    assert a.shape == (3000, 500)
    assert sp.issparse(a.X) and a.X.format == "csr"
    v = a.X.data
    assert np.all(v >= 0) and np.all(v == np.round(v))  # counts
    assert set(a.obs["cell_type"].cat.categories) <= set(real.obs["cell_type"].astype(str))
    # every real cluster appears, in roughly the real proportions
    real_p = real.obs["cell_type"].astype(str).value_counts(normalize=True)
    sim_p = a.obs["cell_type"].astype(str).value_counts(normalize=True)
    assert abs(sim_p.reindex(real_p.index).fillna(0) - real_p).max() < 0.05
    assert not (sim.parent / f".{sim.name}.tmp").exists()


def test_simulated_clusters_are_recoverable_but_not_trivial(sim):
    from sklearn.cluster import KMeans

    from cicl.config import PreprocessConfig
    from cicl.data.preprocess import preprocess

    a = ad.read_h5ad(sim)
    p = preprocess(a, PreprocessConfig(n_pcs=20))
    k = a.obs["cell_type"].nunique()
    lab = KMeans(k, n_init=4, random_state=0).fit_predict(p.pcs)
    assert 0.3 < adjusted_rand_score(a.obs["cell_type"], lab) <= 1.0


def test_block_transform_matches_in_memory_preprocessing(sim):
    """Fitted on all cells, the per-block transform reproduces `preprocess` exactly."""
    from cicl.config import PreprocessConfig
    from cicl.data.preprocess import preprocess
    from cicl.data.stream import H5adSource, fit_on_sample

    cfg = PreprocessConfig(n_pcs=10, n_top_genes=200)
    t, prep, n, _ = fit_on_sample(sim, cfg, n_sample=10**9)
    full = preprocess(ad.read_h5ad(sim), cfg)
    src = H5adSource(sim, 100, 600, t)
    x, pcs = src.read(np.arange(50, 250))
    x2, pcs2, counts = src.read_counts(np.arange(50, 250))  # one read gives all three
    src.close()
    assert np.allclose(x, full.x[150:350], atol=1e-4)
    assert np.allclose(pcs, full.pcs[150:350], atol=1e-3)
    assert src.has_counts and np.array_equal(x2, x) and np.array_equal(pcs2, pcs)
    assert np.array_equal(counts, full.counts[150:350])  # the decoder's target, as in memory


def test_cli_fit_stream_single_process(sim, tmp_path):
    from cicl.cli import main

    out = tmp_path / "o.h5ad"
    rc = main(
        ["fit", str(sim), "--out", str(out), "-k", "11", "--stream", "--quiet"]
        + ["--label-key", "cell_type", "--set", "train.block_size=512"]
        + ["--set", "cluster.kmeans_sample=1500", "--set", "train.max_steps=60"]
    )
    assert rc == 0
    a, src = ad.read_h5ad(out), ad.read_h5ad(sim)
    assert (a.X != src.X).nnz == 0  # the input's data is carried over untouched
    assert a.obs["cicl"].dtype.name == "category" and a.obs["cicl"].nunique() == 11
    assert a.obsm["X_cicl"].shape[0] == 3000
    assert a.uns["cicl"]["n_clusters"] == 11
    assert a.uns["cicl"]["pca_weight"] == pytest.approx(0.776, abs=0.001)  # the rule at 3,000 cells
    assert a.uns["cicl"]["metric"]["kind"] == "full"  # sample refined, every cell assigned by it
    assert adjusted_rand_score(a.obs["cell_type"], a.obs["cicl"]) > 0.4
    # a streamed fit stores its model too: mapping the atlas' own cells gives their labels
    import cicl

    src.obs = src.obs[["cell_type"]]
    cicl.predict(src, a, key_added="p")
    assert np.mean(src.obs["p"].to_numpy() == a.obs["cicl"].to_numpy()) > 0.99


def test_stream_rejects_non_h5ad(tmp_path, capsys):
    from cicl.cli import main

    f = tmp_path / "x.csv"
    f.write_text("c,g1\na,1\n")
    rc = main(["fit", str(f), "--out", str(tmp_path / "o.h5ad"), "--stream"])
    assert rc == 2 and "--stream reads .h5ad files only" in capsys.readouterr().err


def test_streamed_fit_says_when_the_counts_sit_beside_x(tmp_path, capsys):
    """A streamed fit reads X only; with log values in X and counts kept in a layer or
    ``.raw``, the user is told how to fit the counts (nothing said when X holds counts)."""
    from cicl.cli import _stream_counts_hint
    from cicl.data.synthetic import synthetic_adata

    a = synthetic_adata(n_cells=30, n_genes=20)
    a.layers["raw_counts"] = a.X.copy()
    a.raw = a
    p = tmp_path / "a.h5ad"
    a.write_h5ad(p)
    _stream_counts_hint(str(p), "log")
    err = capsys.readouterr().err
    assert "layers['raw_counts'], raw.X" in err and "store them as X" in err
    _stream_counts_hint(str(p), "counts")
    assert capsys.readouterr().err == ""
