"""Every bad input in docs/reliability.md's table: one clear line, exit 2, no traceback, no
output left behind, nothing of the user's overwritten; and every sparse format and dtype accepted."""

from __future__ import annotations

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cicl.cli import main
from cicl.data.synthetic import synthetic_adata

FAST = ["--set", "train.epochs=2", "--set", "model.encoder=mlp", "--set", "cluster.n_init=2"]


@pytest.fixture
def syn():
    return synthetic_adata(n_cells=120, n_genes=60, n_clusters=3, seed=1)


def _fit(tmp_path, adata_or_path, *extra):
    inp = adata_or_path
    if isinstance(adata_or_path, ad.AnnData):
        inp = tmp_path / "in.h5ad"
        adata_or_path.write_h5ad(inp)
    out = tmp_path / "out.h5ad"
    rc = main(["fit", str(inp), "--out", str(out), "--quiet", *extra])
    return rc, out


def _bad(tmp_path, capsys, adata_or_path, msg, *extra):
    rc, out = _fit(tmp_path, adata_or_path, *extra)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert msg in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("error: ")
    assert not out.exists()


def _with(adata: ad.AnnData, X) -> ad.AnnData:
    return ad.AnnData(X=X, obs=adata.obs.copy(), var=adata.var.copy())


def test_missing_file(tmp_path, capsys):
    _bad(tmp_path, capsys, tmp_path / "nope.h5ad", "does not exist")


def test_not_hdf5(tmp_path, capsys):
    f = tmp_path / "fake.h5ad"
    f.write_text("this is not HDF5")
    _bad(tmp_path, capsys, f, "Could not read")


def test_unknown_format(tmp_path, capsys):
    f = tmp_path / "data.xyz"
    f.write_text("1,2")
    _bad(tmp_path, capsys, f, "unknown format")


def test_h5ad_without_x(tmp_path, capsys, syn):
    f = tmp_path / "nox.h5ad"
    syn.write_h5ad(f)
    with h5py.File(f, "a") as h:
        del h["X"]
    _bad(tmp_path, capsys, f, "no expression matrix")


@pytest.mark.parametrize("shape", [(0, 60), (120, 0)])
def test_zero_cells_or_genes(tmp_path, capsys, shape):
    a = ad.AnnData(X=sp.csr_matrix(shape, dtype=np.float32))
    _bad(tmp_path, capsys, a, "both must be > 0")


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_or_inf(tmp_path, capsys, syn, value):
    X = syn.X.toarray()
    X[3, 4] = value
    _bad(tmp_path, capsys, _with(syn, X), "NaN or infinite")


def test_negative_values_that_are_not_z_scores(tmp_path, capsys, syn):
    X = syn.X.toarray()
    X[0, 0] = -5.0
    _bad(tmp_path, capsys, _with(syn, X), "negative values")


def test_non_integer_values_where_counts_are_required(tmp_path, capsys, syn):
    X = np.log1p(syn.X.toarray())
    _bad(
        tmp_path,
        capsys,
        _with(syn, X),
        "preprocess.values=counts",
        "--set",
        "preprocess.values=counts",
    )


def test_all_zero_matrix(tmp_path, capsys, syn):
    _bad(tmp_path, capsys, _with(syn, sp.csr_matrix(syn.shape, dtype=np.float32)), "all zeros")


def test_all_zero_cells_and_genes_are_dropped_with_a_warning(tmp_path, capsys, syn):
    X = syn.X.toarray()
    X[:5] = 0  # five empty cells
    X[:, :3] = 0  # three empty genes
    rc, out = _fit(tmp_path, _with(syn, X), "-k", "3", *FAST)
    err = capsys.readouterr().err
    assert rc == 0 and "warning: dropped 5 cells" in err
    res = ad.read_h5ad(out)
    assert res.obs["cicl"].isna().sum() == 5 and res.obs["cicl"][5:].notna().all()
    assert np.isnan(res.obsm["X_cicl"][:5]).all()
    assert any("constant" in s for s in res.uns["cicl"]["preprocess"]["steps"])


@pytest.mark.parametrize("axis", ["obs", "var"])
def test_duplicate_names(tmp_path, capsys, syn, axis):
    names = list(getattr(syn, f"{axis}_names"))
    names[1] = names[0]
    setattr(syn, f"{axis}_names", names)
    _bad(tmp_path, capsys, syn, "duplicate " + ("cell" if axis == "obs" else "gene") + " names")


@pytest.mark.parametrize(
    "k, msg",
    [
        ("1", "must be >= 2"),
        ("0", "must be >= 2"),
        ("abc", "must be an integer"),
        ("2.5", "must be an integer"),
        ("100000", "exceeds the number of cells"),
    ],
)
def test_bad_n_clusters(tmp_path, capsys, syn, k, msg):
    _bad(tmp_path, capsys, syn, msg, "-k", k)


def test_fewer_genes_than_the_requested_hvg_count(tmp_path, capsys, syn):
    _bad(tmp_path, capsys, syn, "n_top_genes=500 but only", "--set", "preprocess.n_top_genes=500")


def test_label_key_missing_or_with_missing_values(tmp_path, capsys, syn):
    _bad(tmp_path, capsys, syn, "not an obs column", "--label-key", "nope")
    syn.obs["part"] = pd.Categorical(["a"] * 119 + [None])
    _bad(tmp_path, capsys, syn, "has missing values", "--label-key", "part")


def test_unknown_config_key_did_you_mean(tmp_path, capsys, syn):
    _bad(tmp_path, capsys, syn, "Did you mean 'loss.temperature'", "--set", "loss.temprature=1")


def test_output_equal_to_input_or_existing(tmp_path, capsys, syn):
    inp = tmp_path / "in.h5ad"
    syn.write_h5ad(inp)
    before = inp.read_bytes()
    assert main(["fit", str(inp), "--out", str(inp)]) == 2
    assert "is the input file" in capsys.readouterr().err and inp.read_bytes() == before
    out = tmp_path / "keep.h5ad"
    out.write_bytes(b"user data")
    assert main(["fit", str(inp), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and out.read_bytes() == b"user data"
    assert main(["fit", str(inp), "--out", str(out), "--force", "-k", "3", "--quiet", *FAST]) == 0
    assert ad.read_h5ad(out).obs["cicl"].nunique() == 3


def test_unwritable_or_missing_output_folder(tmp_path, capsys, syn, monkeypatch):
    _bad(tmp_path, capsys, syn, "does not exist", "--out", str(tmp_path / "no" / "o.h5ad"))
    import os

    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if m & os.W_OK else real(p, m))
    _bad(tmp_path, capsys, syn, "not writable")


def test_output_must_be_h5ad(tmp_path, capsys, syn):
    inp = tmp_path / "in.h5ad"
    syn.write_h5ad(inp)
    assert main(["fit", str(inp), "--out", str(tmp_path / "o.csv")]) == 2
    assert "must end in .h5ad" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["csr", "csc", "dense"])  # anndata itself refuses COO
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.float16, np.float32, np.float64])
def test_every_sparse_format_and_dtype(tmp_path, syn, fmt, dtype):
    from cicl.config import CICLConfig
    from cicl.data.preprocess import preprocess

    if dtype is np.float16 and fmt != "dense":
        pytest.skip("scipy.sparse has no float16")
    dense = syn.X.toarray().astype(dtype)
    X = dense if fmt == "dense" else getattr(sp, f"{fmt}_matrix")(dense)
    a = _with(syn, X)
    p = preprocess(a, CICLConfig().preprocess)
    assert p.info["values"] == "counts" and p.x.shape == (120, 60)
    from cicl.data.io import check_matrix

    check_matrix(a)


def test_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path, syn, monkeypatch):
    from cicl.data.io import write_h5ad_atomic

    out = tmp_path / "result.h5ad"
    out.write_bytes(b"previous good result")

    def dies_half_way(self, path, **kw):
        open(path, "wb").write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(ad.AnnData, "write_h5ad", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        write_h5ad_atomic(syn, out)
    assert out.read_bytes() == b"previous good result"
    assert [p.name for p in tmp_path.iterdir()] == ["result.h5ad"]


def test_count_decoder_on_non_count_input_is_one_clear_error(tmp_path, capsys, syn):
    logged = _with(syn, syn.X.log1p())
    _bad(
        tmp_path, capsys, logged, "loss.recon=nb reconstructs raw counts", "--set", "loss.recon=nb"
    )
