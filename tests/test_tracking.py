"""`cicl fit --mlflow`: a fit logged as an MLflow run that compares with sweep trials, and the
tracking-URI check every command shares (real SQLite store, no mocks)."""

import json
from pathlib import Path

import anndata as ad
import pandas as pd
import pytest

import cicl
from cicl.cli import main
from cicl.data.synthetic import synthetic_adata
from cicl.errors import CICLError
from cicl.tracking import mlflow_client, resolve_mlflow_uri


@pytest.fixture
def inp(tmp_path):
    p = tmp_path / "in.h5ad"
    synthetic_adata(n_cells=150, n_genes=120, n_clusters=3, seed=1).write_h5ad(p)
    return p


def _fit(inp, out, cfg, *extra):
    return main(
        ["fit", str(inp), "--out", str(out), "-k", "3", "--config", str(cfg), "--quiet", *extra]
    )


def test_fit_is_logged_as_a_run_next_to_others(tmp_path, inp, tiny_cfg, capsys):
    cfg = tmp_path / "cfg.yaml"
    tiny_cfg.to_yaml(cfg)
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    common = ["--label-key", "cell_type", "--mlflow-uri", uri, "--experiment", "fits", "--json"]
    assert _fit(inp, tmp_path / "a.h5ad", cfg, *common) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert _fit(inp, tmp_path / "b.h5ad", cfg, *common, "--seed", "3") == 0
    capsys.readouterr()

    client = mlflow_client(uri)
    exp = client.get_experiment_by_name("fits")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    assert [r.data.params["seed"] for r in runs] == [str(tiny_cfg.seed), "3"]
    first = runs[0]
    assert first.info.run_id == line["mlflow_run"]["run_id"]
    p, m = first.data.params, first.data.metrics
    assert p["loss.temperature"] == str(tiny_cfg.loss.temperature)
    assert p["cluster.n_clusters"] == "3" and p["input"] == str(inp.resolve())
    # the sweeps' metric names, so fits and trials sit in one comparison
    assert m["final_objective"] == pytest.approx(line["silhouette_pca"])
    assert m["final_ari"] == pytest.approx(line["ari"]) and m["final_n_clusters"] == 3
    assert len(client.get_metric_history(first.info.run_id, "loss")) >= 2  # per round
    arts = {a.path for a in client.list_artifacts(first.info.run_id)}
    assert {"config.yaml", "labels.csv", "umap_curves.png", "reference.h5ad"} <= arts
    table = pd.read_csv(client.download_artifacts(first.info.run_id, "labels.csv", str(tmp_path)))
    written = ad.read_h5ad(tmp_path / "a.h5ad")
    assert (table["cluster"].astype(str).to_numpy() == written.obs["cicl"].to_numpy()).all()
    # the run's model, without cells, maps cells as the fit's own output does
    ref = client.download_artifacts(first.info.run_id, "reference.h5ad", str(tmp_path))
    assert ad.read_h5ad(ref).n_obs == 0
    again = ad.read_h5ad(inp)
    cicl.predict(again, ref)
    assert (again.obs["cicl"].to_numpy() == written.obs["cicl"].to_numpy()).all()
    assert written.uns["cicl"]["silhouette_pca"] == pytest.approx(line["silhouette_pca"])

    assert main(["runs", "--mlflow-uri", uri, "--experiment", "fits", "--sort", "ari"]) == 0
    text = capsys.readouterr().out
    assert "experiment fits: 2 runs" in text and text.count("FINISHED") == 2
    assert "objective" in text and "ari" in text


@pytest.mark.parametrize(
    "uri, msg",
    [
        ("./mlruns", "file store"),
        ("file:///tmp/mlruns", "file store"),
        ("sqlite://", "not a SQLite file"),
        ("sqlite:////no/such/folder/mlflow.db", "does not exist"),
        ("sqlite:////tmp", "is not a file"),
    ],
)
def test_bad_tracking_uri_is_one_clear_error_before_any_work(tmp_path, inp, capsys, uri, msg):
    out = tmp_path / "out.h5ad"
    assert main(["fit", str(inp), "--out", str(out), "--mlflow-uri", uri]) == 2
    root = tmp_path / "runs"
    assert main(["tune", str(inp), "--mlflow-uri", uri, "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.count(msg) == 2 and "Traceback" not in err
    assert not out.exists() and not root.exists()  # nothing started, nothing left behind


def test_relative_sqlite_path_becomes_absolute(tmp_path, monkeypatch):
    """Ray workers run in their own folders: a relative store path must not follow them."""
    monkeypatch.chdir(tmp_path)
    assert resolve_mlflow_uri("sqlite:///m.db", Path("unused")) == f"sqlite:///{tmp_path}/m.db"
    default = resolve_mlflow_uri(None, tmp_path / "runs")  # created when first used
    assert default == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    with pytest.raises(CICLError, match="No MLflow store"):
        resolve_mlflow_uri(None, tmp_path / "runs", must_exist=True)


def test_python_api_logs_a_fit_new_run_or_the_active_one(tmp_path, tiny_cfg):
    """`cicl.log_fit` after `cicl.fit`: the notebook path to the same runs the CLI logs."""
    import mlflow

    adata = synthetic_adata(n_cells=150, n_genes=120, n_clusters=3, seed=1)
    with pytest.raises(CICLError, match="Run cicl.fit first"):
        cicl.log_fit(adata, uri=f"sqlite:///{tmp_path / 'm.db'}")
    cicl.fit(adata, 3, config=tiny_cfg, progress=False)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    with pytest.raises(CICLError, match="not an obs column"):
        cicl.log_fit(adata, uri=uri, label_key="no_such_column")
    got = cicl.log_fit(adata, uri=uri, experiment="nb", label_key="cell_type", figure=False)
    client = mlflow_client(uri)
    run = client.get_run(got["run_id"])
    assert run.info.status == "FINISHED" and got["experiment"] == "nb"
    assert run.data.params["cluster.n_clusters"] == "3"
    assert float(run.data.params["pca_weight"]) == 2.0  # the rule's weight at 150 cells
    assert run.data.params["matrix"] == "X"  # which matrix was read (--layer auto)
    assert run.data.params["threads"] == str(adata.uns["cicl"]["threads"])
    m = run.data.metrics
    assert m["final_metric_shrinkage"] == pytest.approx(adata.uns["cicl"]["metric"]["shrinkage"])
    assert m["final_objective"] == pytest.approx(adata.uns["cicl"]["silhouette_pca"])
    assert m["final_ari"] == pytest.approx(
        cicl.score(adata.obs["cicl"], adata.obs["cell_type"])["ari"]
    )
    arts = {a.path for a in client.list_artifacts(got["run_id"])}
    assert arts == {"config.yaml", "labels.csv", "reference.h5ad"}

    mlflow.set_tracking_uri(uri)  # a run the user opened: logged into, its status left alone
    try:
        with mlflow.start_run(experiment_id=client.get_experiment_by_name("nb").experiment_id) as r:
            mlflow.log_param("notebook", "yes")
            into = cicl.log_fit(adata, uri=uri, run_id=r.info.run_id, figure=False)
            assert into["run_id"] == r.info.run_id and into["experiment"] == "nb"
            assert client.get_run(r.info.run_id).info.status == "RUNNING"
    finally:
        mlflow.set_tracking_uri(None)
    run = client.get_run(r.info.run_id)
    assert run.info.status == "FINISHED" and run.data.params["notebook"] == "yes"
    assert "final_objective" in run.data.metrics and run.data.tags["cicl.kind"] == "fit"


def test_streamed_fit_is_logged_with_its_labels(tmp_path, inp, tiny_cfg, capsys):
    cfg = tmp_path / "cfg.yaml"
    tiny_cfg.to_yaml(cfg)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    out = tmp_path / "s.h5ad"
    assert _fit(inp, out, cfg, "--stream", "--mlflow-uri", uri, "--json") == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    client = mlflow_client(uri)
    run = client.get_run(line["mlflow_run"]["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == f"fit-in-seed{tiny_cfg.seed}"
    assert run.data.metrics["final_seconds"] == pytest.approx(line["seconds"])
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert arts == {"config.yaml", "labels.csv", "reference.h5ad"}
    table = pd.read_csv(client.download_artifacts(run.info.run_id, "labels.csv", str(tmp_path)))
    assert (table["cluster"].astype(str) == ad.read_h5ad(out).obs["cicl"].to_numpy()).all()
