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
    src = H5adSource(sim, np.arange(100, 600), t)
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
    args = (
        ["fit", str(sim), "--out", str(out), "-k", "11", "--stream", "--quiet"]
        + ["--label-key", "cell_type", "--set", "train.block_size=512"]
        + ["--set", "cluster.kmeans_sample=1500", "--set", "train.max_steps=60"]
    )
    assert main(args) == 0
    a, src = ad.read_h5ad(out), ad.read_h5ad(sim)
    # the result holds the cells and genes, not the atlas' matrix (the input is untouched)
    assert a.X is None and not a.layers and list(a.obs.columns) == ["cicl"]
    assert (a.obs_names == src.obs_names).all() and (a.var_names == src.var_names).all()
    assert a.obs["cicl"].dtype.name == "category" and a.obs["cicl"].nunique() == 11
    assert a.obsm["X_cicl"].shape[0] == 3000
    assert a.uns["cicl"]["n_clusters"] == 11
    assert a.uns["cicl"]["pca_weight"] == pytest.approx(0.776, abs=0.001)  # the rule at 3,000 cells
    assert a.uns["cicl"]["metric"]["kind"] == "full"  # sample refined, every cell assigned by it
    assert adjusted_rand_score(src.obs["cell_type"], a.obs["cicl"]) > 0.4
    # a streamed fit stores its model too: mapping the atlas' own cells gives their labels
    import cicl

    src.obs = src.obs[["cell_type"]]
    cicl.predict(src, a, key_added="p")
    assert np.mean(src.obs["p"].to_numpy() == a.obs["cicl"].to_numpy()) > 0.99
    # the same atlas log-normalised, its counts in a layer: streamed from them, same labels
    import scanpy as sc

    logged = ad.read_h5ad(sim)
    logged.layers["counts"] = logged.X.copy()
    sc.pp.normalize_total(logged, target_sum=1e4)
    sc.pp.log1p(logged)
    inp, out2 = tmp_path / "logged.h5ad", tmp_path / "o2.h5ad"
    logged.write_h5ad(inp)
    args[1], args[3] = str(inp), str(out2)
    assert main(args) == 0
    b = ad.read_h5ad(out2)
    assert b.uns["cicl"]["preprocess"]["matrix"] == "layers['counts']"
    assert np.array_equal(b.obs["cicl"].to_numpy(), a.obs["cicl"].to_numpy())


def test_stream_rejects_non_h5ad(tmp_path, capsys):
    from cicl.cli import main

    f = tmp_path / "x.csv"
    f.write_text("c,g1\na,1\n")
    rc = main(["fit", str(f), "--out", str(tmp_path / "o.h5ad"), "--stream"])
    assert rc == 2 and "--stream reads .h5ad files only" in capsys.readouterr().err


def test_streamed_fit_reads_the_counts_kept_beside_log_normalised_x(sim, tmp_path):
    """A log-normalised atlas with its counts in a layer, or in raw/X with more genes
    (CELLxGENE's layout): the streamed preprocessing finds them on the sample and every block
    is read from them, giving exactly the model input of the counts file."""
    import scanpy as sc

    from cicl.config import PreprocessConfig
    from cicl.data.stream import H5adSource, fit_on_sample
    from cicl.errors import InputError

    a = ad.read_h5ad(sim)
    b = a.copy()
    sc.pp.normalize_total(b, target_sum=1e4)
    sc.pp.log1p(b)
    layered, rawed = b.copy(), b[:, :400].copy()  # raw keeps all 500 genes, X 400 of them
    layered.layers["counts"] = a.X.copy()
    rawed.raw = a
    cfg = PreprocessConfig(n_pcs=10, n_top_genes=200)
    t0, p0, _, _ = fit_on_sample(sim, cfg, n_sample=1000)
    want = H5adSource(sim, np.arange(3000), t0).read_counts(np.arange(100, 400))
    for obj, matrix, name in (
        (layered, "layers/counts", "layers['counts']"),
        (rawed, "raw/X", "raw.X"),
    ):
        path = tmp_path / f"{matrix.replace('/', '_')}.h5ad"
        obj.write_h5ad(path)
        t, p, n, g = fit_on_sample(path, cfg, n_sample=1000)
        assert (t.matrix, t.kind, p.info["matrix"], g) == (matrix, "counts", name, 500)
        assert p.info["steps"][0].startswith(f"X holds log values, the raw counts are in {name}")
        assert np.array_equal(p.genes, p0.genes)
        got = H5adSource(path, np.arange(3000), t).read_counts(np.arange(100, 400))
        for x, y in zip(got, want, strict=True):
            assert np.allclose(x, y, atol=1e-5)
    t, p, _, _ = fit_on_sample(path, cfg, n_sample=1000, layer="X")  # the user keeps X
    assert (t.matrix, t.kind, p.info["matrix"]) == ("X", "log", "X")
    with pytest.raises(InputError, match="Layer 'spliced' not found; available: X, raw"):
        fit_on_sample(path, cfg, n_sample=1000, layer="spliced")


def test_a_sorted_file_streams_like_a_shuffled_one(data_dir, tmp_path, tiny_cfg):
    """The same atlas stored sorted by type and shuffled: the streamed fits agree. With
    contiguous pools and a K-means sample of whole contiguous blocks (before), the sorted
    file's sample held a few types and its partition fell apart."""
    from cicl.api import fit_h5ad_stream
    from cicl.data.simulate import simulate

    cfg = tiny_cfg.with_overrides(
        {
            "train.epochs": 4,
            "train.block_size": 256,
            "train.chunk_size": 32,
            "cluster.kmeans_sample": 400,
            "cluster.final_n_init": 4,
        }
    )
    scores = {}
    for order in ("sorted", "shuffled"):
        path = simulate(
            data_dir / "pollen.h5ad", 3000, tmp_path / f"{order}.h5ad", n_genes=300,
            mode="resample", order=order, seed=0,
        )  # fmt: skip
        fit_h5ad_stream(path, tmp_path / f"o_{order}.h5ad", 11, config=cfg, progress=False)
        truth = ad.read_h5ad(path).obs["cell_type"].astype(str)
        labels = ad.read_h5ad(tmp_path / f"o_{order}.h5ad").obs["cicl"]
        scores[order] = adjusted_rand_score(truth, labels)
    assert scores["shuffled"] > 0.5
    assert abs(scores["sorted"] - scores["shuffled"]) < 0.1, scores
