import json

import anndata as ad
import numpy as np
import pytest
import torch

import cicl
from cicl.cli import main
from cicl.config import CICLConfig
from cicl.data.synthetic import synthetic_adata
from cicl.train.loop import cluster_pca_weight


@pytest.fixture
def syn():
    return synthetic_adata(n_cells=150, n_genes=120, n_clusters=3, seed=1)


def test_fit_writes_scanpy_style_fields_and_leaves_x(syn, tiny_cfg):
    x0 = syn.X.copy()
    out = cicl.fit(syn, 3, config=tiny_cfg, progress=False)
    assert out is None
    assert (syn.X != x0).nnz == 0
    assert syn.obs["cicl"].dtype == "category" and syn.obs["cicl"].nunique() == 3
    # hybrid space: normalised encoder output (embed_dim) + weighted PCA block (n_pcs)
    assert syn.obsm["X_cicl"].shape == (150, tiny_cfg.model.embed_dim + tiny_cfg.preprocess.n_pcs)
    u = syn.uns["cicl"]
    assert u["n_clusters"] == 3 and u["n_clusters_source"] == "given"
    assert u["centroids"].shape[0] == 3
    assert u["params"]["loss"]["temperature"] == tiny_cfg.loss.temperature
    assert u["preprocess"]["values"] == "counts"
    assert len(u["history"]["epoch"]) >= 2
    assert cicl.score(syn.obs["cicl"].to_numpy(), syn.obs["cell_type"])["ari"] > 0.9


def test_copy_and_same_seed_same_labels(syn, tiny_cfg):
    a = cicl.fit(syn, 3, config=tiny_cfg, copy=True, progress=False)
    # ``seed=`` (scanpy-style keyword, as ``--seed``) wins over the config's seed; the second
    # fit runs at another thread count, which is recorded and changes nothing
    other = tiny_cfg.with_overrides({"seed": tiny_cfg.seed + 5})
    before = torch.get_num_threads()
    torch.set_num_threads(before % 2 + 1)
    try:
        b = cicl.fit(syn, 3, config=other, seed=tiny_cfg.seed, copy=True, progress=False)
    finally:
        torch.set_num_threads(before)
    assert "cicl" not in syn.obs
    assert b.uns["cicl"]["params"]["seed"] == tiny_cfg.seed
    assert np.array_equal(a.obs["cicl"].to_numpy(), b.obs["cicl"].to_numpy())
    assert np.allclose(a.obsm["X_cicl"], b.obsm["X_cicl"])
    assert a.uns["cicl"]["threads"] == before and b.uns["cicl"]["threads"] == before % 2 + 1


def test_k_is_estimated_without_labels(syn, tiny_cfg):
    a = cicl.fit(syn, config=tiny_cfg, copy=True, progress=False)
    assert a.uns["cicl"]["n_clusters_source"].startswith("estimated")
    assert 2 <= a.uns["cicl"]["n_clusters"] <= 6


def _write(tmp_path, adata):
    p = tmp_path / "in.h5ad"
    adata.write_h5ad(p)
    return p


def test_cli_json_and_summary(tmp_path, syn, tiny_cfg, capsys):
    inp = _write(tmp_path, syn)
    cfg = tmp_path / "cfg.yaml"
    tiny_cfg.to_yaml(cfg)
    out = tmp_path / "out.h5ad"
    rc = main(
        [
            "fit",
            str(inp),
            "--out",
            str(out),
            "-k",
            "3",
            "--label-key",
            "cell_type",
            "--config",
            str(cfg),
            "--seed",
            "2",
            "--json",
            "--quiet",
        ]
    )
    assert rc == 0
    cap = capsys.readouterr()
    line = json.loads(cap.out.strip().splitlines()[-1])
    for key in ("n_cells", "n_genes", "n_clusters", "seconds", "ari", "nmi"):
        assert key in line
    assert line["n_cells"] == 150 and line["n_clusters"] == 3 and line["ari"] > 0.9
    assert "wrote" in cap.err and "ARI" in cap.err
    assert line["device"] == "cpu" and "1 worker(s) on cpu" in cap.err  # no GPU here
    assert f"cpu, {line['threads']} threads each" in cap.err
    res = ad.read_h5ad(out)
    assert "cicl" in res.obs and res.uns["cicl"]["params"]["seed"] == 2
    assert res.uns["cicl"]["device"] == "cpu"
    # loss.recon: auto chose the decoder from the input, and the result says which
    want = "nb" if line["values"] == "counts" else "gaussian"
    assert line["decoder"] == res.uns["cicl"]["decoder"] == want
    assert f"decoder {want}" in cap.err
    # the hybrid space's PCA weight the cell-count rule chose is reported, not hidden
    w = cluster_pca_weight(CICLConfig(), line["n_cells"])
    assert line["pca_weight"] == pytest.approx(w) == res.uns["cicl"]["pca_weight"]
    assert line["pca_weight_source"] == "by cell count" and f"weight {w:.2f}" in cap.err
    # the final partition's mixture refinement, and how far it trusted the data
    assert line["metric"] == "full" == res.uns["cicl"]["metric"]["kind"]
    assert res.uns["cicl"]["metric"]["prior"] == 30.0 and "covariance per cluster" in cap.err
    assert line["metric_shrinkage"] == pytest.approx(res.uns["cicl"]["metric"]["shrinkage"])
    assert 0 <= line["metric_shrinkage"] <= 1 and "shared-covariance" in cap.err


def test_cli_reads_the_counts_of_a_log_normalised_object(tmp_path, syn, tiny_cfg, capsys):
    """`--layer auto` (default): X log-normalised, counts in layers["counts"] -> the counts
    are read and the summary says so; `--layer X` keeps X (and the Gaussian decoder)."""
    import scanpy as sc

    syn.layers["counts"] = syn.X.copy()
    sc.pp.normalize_total(syn, target_sum=1e4)
    sc.pp.log1p(syn)
    inp = _write(tmp_path, syn)
    cfg = tmp_path / "cfg.yaml"
    tiny_cfg.to_yaml(cfg)
    lines = {}
    for layer in ("auto", "X"):
        out = tmp_path / f"{layer}.h5ad"
        args = ["fit", str(inp), "--out", str(out), "-k", "3", "--config", str(cfg)]
        assert main([*args, "--layer", layer, "--json", "--quiet"]) == 0
        cap = capsys.readouterr()
        lines[layer] = (json.loads(cap.out.strip().splitlines()[-1]), cap.err)
    auto, err = lines["auto"]
    assert (auto["values"], auto["matrix"], auto["decoder"]) == ("counts", "layers['counts']", "nb")
    assert "(counts from layers['counts'];" in err
    kept, err = lines["X"]
    assert (kept["values"], kept["matrix"], kept["decoder"]) == ("log", "X", "gaussian")
    assert "from layers" not in err


@pytest.mark.parametrize(
    "extra, msg",
    [
        (["-k", "1"], "--n-clusters must be >= 2"),
        (["-k", "abc"], "must be an integer"),
        (["-k", "100000"], "exceeds the number of cells"),
        (["--label-key", "nope"], "not an obs column"),
        (["--set", "loss.temprature=0.1"], "Did you mean 'loss.temperature'"),
        (["--layer", "spliced"], "Layer 'spliced' not found; available: X"),
    ],
)
def test_cli_bad_input_one_clear_error(tmp_path, syn, capsys, extra, msg):
    inp = _write(tmp_path, syn)
    out = tmp_path / "out.h5ad"
    rc = main(["fit", str(inp), "--out", str(out), "--quiet", *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert msg in err and "Traceback" not in err
    assert not out.exists()


def test_cli_refuses_to_overwrite(tmp_path, syn, capsys):
    inp = _write(tmp_path, syn)
    out = tmp_path / "exists.h5ad"
    out.write_bytes(b"keep me")
    assert main(["fit", str(inp), "--out", str(out)]) == 2
    assert out.read_bytes() == b"keep me"
    assert main(["fit", str(inp), "--out", str(inp)]) == 2
    assert "input file" in capsys.readouterr().err


def test_cli_missing_and_unreadable_input(tmp_path, capsys):
    assert main(["fit", str(tmp_path / "missing.h5ad"), "--out", str(tmp_path / "o.h5ad")]) == 2
    bad = tmp_path / "bad.h5ad"
    bad.write_text("not hdf5")
    assert main(["fit", str(bad), "--out", str(tmp_path / "o.h5ad")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Could not read" in err
    assert not (tmp_path / "o.h5ad").exists()


def test_cli_reads_csv(tmp_path, syn, tiny_cfg, capsys):
    import pandas as pd

    p = tmp_path / "in.csv"
    pd.DataFrame(syn.X.toarray(), index=syn.obs_names, columns=syn.var_names).to_csv(p)
    cfg = tmp_path / "cfg.yaml"
    tiny_cfg.to_yaml(cfg)
    rc = main(
        [
            "fit",
            str(p),
            "--out",
            str(tmp_path / "o.h5ad"),
            "-k",
            "3",
            "-c",
            str(cfg),
            "--json",
            "--quiet",
        ]
    )
    assert rc == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n_cells"] == 150


def test_config_show_and_validate(tmp_path, capsys):
    assert main(["config", "show", "--preset", "reference"]) == 0
    assert "encoder: reference" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss:\n  temprature: 0.2\n")
    assert main(["config", "validate", str(bad)]) == 2
    assert "Did you mean" in capsys.readouterr().err


def test_version_names_cicl_and_its_stack(capsys):
    """`cicl --version` prints cicl's version and the pinned stack's, then exits 0."""
    import cicl

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"cicl {cicl.__version__} (torch 2.13.0")  # "+cpu" on CPU wheels
    assert ", ray 2.60.0, mlflow 3.17." in out
    assert "scanpy 1.11." in out and "Python 3.11" in out


def test_results_feed_scanpy_downstream(syn, tiny_cfg):
    """The scanpy recipe (docs/api.md) runs on a fit's output: neighbours and UMAP on X_cicl,
    marker genes per CICL cluster, after leaving out the cells preprocessing dropped (their
    label is missing and their X_cicl row NaN)."""
    import scanpy as sc

    x = syn.X.tolil()
    x[:2] = 0  # two empty cells: dropped by preprocessing, left unlabelled
    syn.X = x.tocsr()
    with pytest.warns(UserWarning, match="dropped 2 cells"):
        cicl.fit(syn, 3, config=tiny_cfg, progress=False)
    assert syn.obs["cicl"].isna().sum() == 2 and np.isnan(syn.obsm["X_cicl"][:2]).all()
    sub = syn[syn.obs["cicl"].notna()].copy()
    sc.pp.normalize_total(sub, target_sum=1e4)
    sc.pp.log1p(sub)
    sc.pp.neighbors(sub, use_rep="X_cicl")
    sc.tl.umap(sub, random_state=0)
    sc.tl.rank_genes_groups(sub, "cicl")
    assert sub.obsm["X_umap"].shape == (148, 2) and np.isfinite(sub.obsm["X_umap"]).all()
    markers = sc.get.rank_genes_groups_df(sub, None)
    assert set(markers["group"]) == {"0", "1", "2"}
