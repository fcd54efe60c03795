"""Issue 42's classes, case by case: no silent wrong result, nothing of the user's overwritten,
nothing written before an error, outputs like any Unix tool's (umask, mode kept on --force)."""

from __future__ import annotations

import os

import anndata as ad
import numpy as np
import pytest

from cicl.cli import main
from cicl.data.synthetic import synthetic_adata

FAST = ["--set", "train.epochs=2", "--set", "cluster.n_init=2", "--set", "cluster.final_n_init=2"]


@pytest.fixture
def inp(tmp_path):
    a = synthetic_adata(n_cells=120, n_genes=60, n_clusters=3, seed=1)
    path = tmp_path / "in.h5ad"
    a.write_h5ad(path)
    return path


def _refused(capsys, argv: list[str], msg: str) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert msg in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("key", ["cell_type", "batch"])
def test_key_added_may_not_replace_a_column_the_run_reads(tmp_path, inp, capsys, key):
    """Was exit 0 with ARI 1.000: the true labels replaced by the cluster ids."""
    out = tmp_path / "out.h5ad"
    flag = "--label-key" if key == "cell_type" else "--batch-key"
    argv = ["fit", str(inp), "-o", str(out), "--key-added", key, flag, key, *FAST]
    _refused(capsys, argv, f"is also {flag}")
    assert not out.exists()


def test_predict_key_added_may_not_replace_the_label_column(tmp_path, inp, capsys):
    out = tmp_path / "out.h5ad"
    argv = ["predict", str(inp), "--reference", str(inp), "-o", str(out)]
    _refused(capsys, [*argv, "--key-added", "cell_type", "--label-key", "cell_type"], "is also")
    _refused(capsys, [*argv, "--key-added", "a/b"], "without '/'")
    assert not out.exists()


def test_existing_figure_is_kept_without_force(tmp_path, inp, capsys):
    fig = tmp_path / "fig.png"
    fig.write_bytes(b"the user's figure")
    out = tmp_path / "out.h5ad"
    _refused(capsys, ["fit", str(inp), "-o", str(out), "--plot", str(fig), *FAST], "--force")
    assert fig.read_bytes() == b"the user's figure" and not out.exists()


@pytest.mark.parametrize(
    ("plot", "msg"), [("fig.xyz", "must end in"), ("in.h5ad", "must end in"), ("d", "folder")]
)
def test_bad_figure_path_is_refused_before_the_fit(tmp_path, inp, capsys, plot, msg):
    """fig.xyz was refused by matplotlib after the output was written (a traceback)."""
    (tmp_path / "d").mkdir()
    out = tmp_path / "out.h5ad"
    _refused(capsys, ["fit", str(inp), "-o", str(out), "--plot", str(tmp_path / plot)], msg)
    assert not out.exists()


def test_out_naming_a_folder_is_refused_before_the_fit(tmp_path, inp, capsys):
    """Failed after the whole fit, also with the --force the first error advised."""
    folder = tmp_path / "res.h5ad"
    folder.mkdir()
    for extra in ([], ["--force"]):
        _refused(capsys, ["fit", str(inp), "-o", str(folder), *extra], "is a folder")
    assert folder.is_dir() and not any(folder.iterdir())


def test_too_long_output_name_is_refused_before_the_fit(tmp_path, inp, capsys):
    out = tmp_path / ("x" * 250 + ".h5ad")
    _refused(capsys, ["fit", str(inp), "-o", str(out)], "too long")


def test_outputs_follow_the_umask_and_keep_a_mode_on_force(tmp_path, inp, capsys):
    """Outputs were created 0600 whatever the umask, and --force turned 0644 into 0600."""
    out, fig = tmp_path / "out.h5ad", tmp_path / "fig.png"
    old = os.umask(0o022)
    try:
        argv = ["fit", str(inp), "-o", str(out), "-k", "3", "--plot", str(fig), "-q", *FAST]
        assert main(argv) == 0
        assert (out.stat().st_mode & 0o777) == 0o644 and (fig.stat().st_mode & 0o777) == 0o644
        out.chmod(0o640)
        assert main([*argv, "--force"]) == 0
        assert (out.stat().st_mode & 0o777) == 0o640
    finally:
        os.umask(old)
    capsys.readouterr()


def test_streamed_fit_with_missing_labels_is_refused_before_the_fit(tmp_path, capsys):
    """Wrote the output, then a ValueError traceback."""
    a = synthetic_adata(n_cells=120, n_genes=60, n_clusters=3, seed=1)
    a.obs["cell_type"] = a.obs["cell_type"].astype(object)
    a.obs.iloc[0, a.obs.columns.get_loc("cell_type")] = np.nan
    path, out = tmp_path / "in.h5ad", tmp_path / "out.h5ad"
    a.write_h5ad(path)
    argv = ["fit", str(path), "-o", str(out), "--stream", "--label-key", "cell_type", *FAST]
    _refused(capsys, argv, "missing values")
    assert not out.exists()


def test_k_is_checked_against_the_cells_left_after_dropping(tmp_path, capsys):
    """-k equal to the cell count with one empty cell failed after the fit."""
    a = synthetic_adata(n_cells=40, n_genes=60, n_clusters=3, seed=1)
    X = a.X.toarray()
    X[0] = 0
    path, out = tmp_path / "in.h5ad", tmp_path / "out.h5ad"
    ad.AnnData(X=X, obs=a.obs, var=a.var).write_h5ad(path)
    _refused(capsys, ["fit", str(path), "-o", str(out), "-k", "40"], "dropped 1")
    assert not out.exists()


def test_simulate_refuses_zero_genes(tmp_path, inp, capsys):
    """Wrote a 20 x 0 atlas."""
    out = tmp_path / "sim.h5ad"
    argv = ["simulate", "--like", str(inp), "--cells", "20", "--genes", "0", "-o", str(out)]
    _refused(capsys, argv, "--genes must be >= 2")
    assert not out.exists()


def test_a_count_layer_that_is_not_counts_is_named_when_auto_passes_it(tmp_path, capsys):
    """A negative value in layers['counts'] made --layer auto read X without a word."""
    a = synthetic_adata(n_cells=120, n_genes=60, n_clusters=3, seed=1)
    counts = a.X.toarray()
    counts[0, 0] = -1
    a.layers["counts"] = counts
    a.X = np.log1p(a.X.toarray())
    path, out = tmp_path / "in.h5ad", tmp_path / "out.h5ad"
    a.write_h5ad(path)
    assert main(["fit", str(path), "-o", str(out), "-k", "3", "-q", *FAST]) == 0
    err = capsys.readouterr().err
    assert "warning: layers['counts'] is named like raw counts" in err and "negative" in err
    assert ad.read_h5ad(out).uns["cicl"]["preprocess"]["matrix"] == "X"


def test_a_genes_by_cells_table_gets_a_warning(tmp_path, capsys):
    a = synthetic_adata(n_cells=40, n_genes=80, n_clusters=2, seed=1)
    path = tmp_path / "t.csv"
    a.to_df().T.to_csv(path)  # rows: gene0..., columns: cell0...
    out = tmp_path / "out.h5ad"
    assert main(["fit", str(path), "-o", str(out), "-k", "2", "-q", *FAST]) == 0
    err = capsys.readouterr().err
    assert "warning: " in err and "looks like genes x cells" in err and "80 'cells'" in err
    a.to_df().to_csv(path)  # the right way round: no warning
    assert main(["fit", str(path), "-o", str(out), "-k", "2", "-q", "--force", *FAST]) == 0
    assert "genes x cells" not in capsys.readouterr().err


def test_min_genes_above_every_cell_says_so(tmp_path, inp, capsys):
    """Said "X is all zeros", which was false."""
    out = tmp_path / "out.h5ad"
    err = _refused(
        capsys, ["fit", str(inp), "-o", str(out), "--set", "preprocess.min_genes=100000"], "Lower"
    )
    assert "all zeros" not in err and "min_genes=100000" in err


def test_malformed_set_value_is_one_error(tmp_path, inp, capsys):
    out = tmp_path / "out.h5ad"
    _refused(capsys, ["fit", str(inp), "-o", str(out), "--set", "train.lr=[1,"], "not valid YAML")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_a_device_this_machine_lacks_is_refused_before_work(tmp_path, inp, capsys):
    """train.device=cuda on a machine without a GPU was a traceback from inside training."""
    out = tmp_path / "out.h5ad"
    _refused(capsys, ["fit", str(inp), "-o", str(out), "--set", "train.device=cuda"], "GPU")
    _refused(capsys, ["fit", str(inp), "-o", str(out), "--set", "train.device=tpu"], "device")
    assert not out.exists()


def _corrupt(path, how: str) -> None:
    import h5py

    with h5py.File(path, "a") as f:
        if how == "indices out of range":
            f["X/indices"][:5] = 10_000
        elif how == "pointers decreasing":
            f["X/indptr"][3] = 10**6
        else:  # text where numbers belong
            data = f["X/data"][:]
            del f["X/data"]
            f["X/data"] = data.astype("S8")


@pytest.mark.parametrize("how", ["indices out of range", "pointers decreasing", "text values"])
@pytest.mark.parametrize("stream", [False, True])
def test_structurally_broken_h5ad_is_one_error(tmp_path, inp, capsys, how, stream):
    """scipy trusts a CSR's index arrays: out-of-range indices could crash the process."""
    _corrupt(inp, how)
    out = tmp_path / "out.h5ad"
    argv = ["fit", str(inp), "-o", str(out), "-k", "3", *FAST, *(["--stream"] if stream else [])]
    _refused(capsys, argv, "'" if how == "text values" else "corrupt")
    assert not out.exists()


def test_truncated_h5ad_is_one_error(tmp_path, inp, capsys):
    data = inp.read_bytes()
    inp.write_bytes(data[: len(data) // 2])
    _refused(capsys, ["fit", str(inp), "-o", str(tmp_path / "out.h5ad")], "Could not read")


@pytest.mark.parametrize(
    ("setting", "msg"),
    [
        ("train.weight_decay=-1", "train.weight_decay must be >= 0"),  # was a traceback
        ("train.lr=nan", "finite"),
        ("loss.temperature=.inf", "finite"),
        ("seed=-3", "seed must be in [0, 4294967295]"),
        ("seed=4294967296", "seed must be in [0, 4294967295]"),  # numpy refused it after work
        ("train.lr=1e400", "finite"),
        ("cluster.kmeans_sample=1", ">= 2"),
        ("model.dropout=1", "in [0, 1)"),
        ("train.epochs=2.5", "integer"),
    ],
)
def test_config_values_are_checked_before_work(tmp_path, inp, capsys, setting, msg):
    out = tmp_path / "out.h5ad"
    _refused(capsys, ["fit", str(inp), "-o", str(out), "--set", setting], msg)
    assert not out.exists()


def test_numbers_written_with_an_exponent_are_numbers():
    """YAML 1.1 reads 1e-3 as a string; it was refused as 'must be a number'."""
    from cicl.config import load_config

    assert load_config(None, {"train.lr": "1e-3", "train.epochs": "3"}).train.lr == 0.001


def test_run_dir_and_root_that_are_files_are_refused_before_work(tmp_path, inp, capsys):
    afile = tmp_path / "afile"
    afile.write_text("the user's file")
    out = tmp_path / "out.h5ad"
    argv = ["fit", str(inp), "-o", str(out), "--workers", "2", "--run-dir", str(afile)]
    _refused(capsys, argv, "--run-dir")
    _refused(capsys, ["tune", str(inp), "--root", str(afile)], "--root")
    assert afile.read_text() == "the user's file" and not out.exists()
