"""Sweeps for real: local Ray on 2 CPUs, Ray Train trials, Optuna, ASHA, an MLflow sqlite store;
the runs, params, metrics and artifacts it leaves; `cicl runs`; Ctrl-C and --resume."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cicl.sweep import close_orphans, finished_result
from cicl.tracking import child_runs, default_mlflow_uri, mlflow_client


def _client(root: Path):
    # cicl's client: a fresh store is created under a lock, so polling it while a sweep
    # starts does not race the sweep's own table creation
    return mlflow_client(default_mlflow_uri(root))


def test_fresh_mlflow_store_opened_by_several_processes_at_once(tmp_path):
    """Three processes open one new SQLite store at the same instant (a sweep starting while
    `cicl runs` or a poller reads it): all succeed. Without the lock around MLflow's table
    creation most of them fail (measured 10 of 15)."""
    code = (
        "import sys, time\n"
        "from cicl.tracking import mlflow_client\n"
        "t = float(sys.argv[2])\n"
        "while time.time() < t: time.sleep(0.001)\n"
        "mlflow_client(sys.argv[1]).search_experiments()\n"
    )
    for attempt in range(2):
        (tmp_path / f"s{attempt}").mkdir()
        uri = default_mlflow_uri(tmp_path / f"s{attempt}")
        start = time.time() + 6  # after every interpreter has imported MLflow
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, uri, str(start)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(3)
        ]
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err[-2000:]
    assert not list(tmp_path.rglob("*.lock"))


def _runs(root: Path, experiment: str):
    c = _client(root)
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return c, parents, children


def _n_children(root: Path, experiment: str) -> int:
    """Child runs so far, read while a sweep writes the store (0 if the read fails)."""
    try:
        return len(_runs(root, experiment)[2])
    except Exception:  # noqa: BLE001 - a busy store is read again on the next poll
        return 0


EXP = "s3"
# the final K-means' restarts (100 on biase by default) are not what these tests check; a
# few keep each trial's final step short (the sweep tests are the suite's longest chain)
FEW_RESTARTS = ["--set", "cluster.final_n_init=4"]


def _tune_args(data_dir: Path, root: Path, trials: int = 3) -> list[str]:
    """A 3-trial sweep of the small space on biase, one trial at a time."""
    return [
        "tune",
        str(data_dir / "biase.h5ad"),
        "--trials",
        str(trials),
        "--space",
        "small",
        "--label-key",
        "cell_type",
        "--root",
        str(root),
        "--experiment",
        EXP,
        "--concurrent",
        "1",
        "--json",
        *FEW_RESTARTS,
    ]


def _start(args: list[str], env: dict | None = None) -> subprocess.Popen:
    """The CLI in its own process group, as a user's terminal would run it."""
    return subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=env,
    )


def _wait_for_run(proc: subprocess.Popen, root: Path, finished: bool):
    """The first trial's MLflow run once it exists (``finished``: once it has FINISHED); the
    test fails if the driver exits or nothing comes within 10 minutes."""
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        time.sleep(2)
        if not (root / "mlflow.db").exists():
            continue
        try:
            _, _, children = _runs(root, EXP)
        except Exception:  # noqa: BLE001 - store being created
            continue
        found = [r for r in children if r.info.status == "FINISHED" or not finished]
        if found:
            return found[0]
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    pytest.fail(f"no trial run before the deadline (rc {proc.returncode}):\n{err[-3000:]}")


@pytest.fixture(scope="module")
def sweep(data_dir, tmp_path_factory):
    """One real 3-trial sweep run as a user would (the CLI in a subprocess, one trial at a
    time) that loses its driver and is continued with --resume; the sweep tests read what it
    leaves. The driver's whole process group is SIGKILLed (the machine running it dies) after
    the first trial finished and the second has its run. That driver saved Tune's state only
    at its start (Tune's documented save-period setting), so Tune forgets the second trial and
    draws a new one on resume: that trial's run must not stay beside the sweep's three (this
    happened by chance in CI, where Tune's save period grows past 10 s on a slow disk)."""
    root = tmp_path_factory.mktemp("tune")
    out = root / "best.h5ad"
    args = [sys.executable, "-m", "cicl.cli", *_tune_args(data_dir, root), "--out", str(out)]
    proc = _start(args, {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1000000"})
    first = _wait_for_run(proc, root, finished=True)
    deadline = time.time() + 300
    while time.time() < deadline and _n_children(root, EXP) < 2:
        time.sleep(1)  # until the second trial has its run
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return root, out, resumed, first


def test_killed_sweep_resumes_without_duplicates(sweep):
    """Three trials, exactly one MLflow child run each; the trial that had finished before the
    driver died is not rerun; the run of the trial Tune forgot is deleted, and said so."""
    root, _, resumed, first = sweep
    c, parents, children = _runs(root, EXP)
    ids = [r.data.tags["cicl.trial_id"] for r in children]
    assert len(children) == 3 and len(set(ids)) == 3
    assert parents[0].info.status == "FINISHED"
    assert "were deleted from MLflow" in resumed.stderr
    again = c.get_run(first.info.run_id)
    assert again.info.status == "FINISHED"
    assert again.info.end_time == first.info.end_time  # the finished trial was not rerun


def test_first_trial_is_the_base_configuration(sweep):
    """Trial 1 runs the configuration the sweep starts from (here the default, K = the
    estimate), so a sweep can only improve on it by the objective; later trials are drawn."""
    root, _, _, first = sweep
    _, parents, _ = _runs(root, EXP)
    p = first.data.params
    k_est = parents[0].data.params["k_estimate"]
    assert p["search.loss.instance_weight"] == "0.0"
    assert p["search.loss.temperature"] == "0.5"
    assert p["search.augment.type"] == "all"
    assert p["search.cluster.n_clusters"] == k_est


def test_a_space_without_k_gives_every_trial_the_fits_estimate(data_dir, tiny_cfg, tmp_path):
    """A space that does not search ``cluster.n_clusters`` (nor fixes it): every trial clusters
    into the K the sweep was given (the driver's label-free estimate, the rule `cicl fit` uses
    without -k), not a constant."""
    import anndata as ad
    import ray

    from cicl.data.preprocess import preprocess
    from cicl.sweep import SweepOptions, run_sweep

    space = tmp_path / "no_k.yaml"
    space.write_text("params:\n  loss.temperature: {type: choice, values: [0.5, 0.7]}\n")
    cfg = tiny_cfg.with_overrides({"train.epochs": 2, "cluster.final_n_init": 2})
    p = preprocess(ad.read_h5ad(data_dir / "biase.h5ad"), cfg.preprocess)
    k_est = 5
    root = tmp_path / "root"
    opts = SweepOptions(
        trials=2, space=str(space), root=str(root), asha=False, plots=False, progress=False
    )
    ray.shutdown()
    try:
        res = run_sweep(p.x, p.pcs, k_est, cfg, opts)
    finally:
        ray.shutdown()
    _, _, children = _runs(root, res.experiment)
    assert len(children) == 2
    assert [r.data.metrics["final_n_clusters"] for r in children] == [k_est, k_est]
    assert res.best_result is not None and res.best_result.centroids.shape[0] == k_est


def test_base_point_puts_the_base_config_inside_the_space():
    from cicl.config import CICLConfig
    from cicl.sweep import Space, base_point

    space = Space(
        "t",
        {
            "loss.lam": {"type": "uniform", "low": 0.1, "high": 1.0},  # default 0: clipped
            "train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
            "cluster.recluster_every": {"type": "choice", "values": [2, 10]},  # 5 not there
            "cluster.pca_weight": {"type": "uniform", "low": 0.25, "high": 4.0},  # None: by n
            "augment.type": {"type": "choice", "values": ["mask", "noise+mask"]},
            "cluster.n_clusters": {"type": "k_around_estimate", "delta": 2},
        },
        {"augment.neighbor_prob": 0.0},
    )
    point = base_point(space, CICLConfig(), 7, 800)
    assert point == {
        "loss.lam": 0.1,
        "train.lr": 1e-3,
        "cluster.recluster_every": 2,
        "cluster.pca_weight": 2.0,
        "augment.type": "noise+mask",  # the fixed neighbour-off makes the base noise+mask
        "cluster.n_clusters": 7,
    }


def test_sweep_leaves_one_parent_and_a_child_per_trial(sweep):
    root, _, _, _ = sweep
    c, parents, children = _runs(root, EXP)
    assert len(parents) == 1 and len(children) == 3
    assert parents[0].info.status == "FINISHED"
    # ASHA may stop weak trials at a reclustering round: KILLED, never left RUNNING
    status = [r.info.status for r in children]
    assert set(status) <= {"FINISHED", "KILLED"} and "FINISHED" in status, status
    for r in children:
        p = r.data.params
        assert "loss.temperature" in p and "search.cluster.n_clusters" in p  # flattened config
        m = r.data.metrics
        assert "objective" in m and "loss" in m  # per-round metrics, also for stopped trials
        if r.info.status == "KILLED":
            assert "final_objective" not in m
            continue
        for key in ("final_objective", "final_ari", "final_nmi"):
            assert key in m, key
        assert len(c.get_metric_history(r.info.run_id, "loss")) >= 2  # per round
        arts = {a.path for a in c.list_artifacts(r.info.run_id)}
        assert {"config.yaml", "labels.csv", "checkpoint.pt", "umap_curves.png"} <= arts
        assert "reference.h5ad" in arts  # every finished trial's model maps new cells
    parent = parents[0]
    assert {"best_objective", "best_ari", "trials_finished"} <= set(parent.data.metrics)
    assert parent.data.metrics["trials_finished"] == status.count("FINISHED")
    arts = {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "best_trial.json"} <= arts
    if status.count("FINISHED") >= 2:  # importances compare finished trials (see below)
        assert {"param_importance.png", "parallel_coordinates.png"} <= arts


def test_sweep_plots_compare_finished_trials(tmp_path):
    """Optuna importance and parallel coordinates over the finished trials; a trial ASHA
    stopped (no final objective) is left out, as Optuna leaves out pruned trials."""
    from cicl.sweep import load_space
    from cicl.sweep.artifacts import optuna_plots

    space = load_space("small")
    rng = np.random.default_rng(0)
    trials = [
        {
            "params": {
                "loss.instance_weight": [0.0, 0.5][i % 2],
                "loss.temperature": float(rng.uniform(0.2, 1.0)),
                "augment.type": ["all", "noise+mask"][i % 2],
                "cluster.n_clusters": 3 + i % 3,
            },
            "finished": i < 4,
            "objective": float(rng.uniform(0.1, 0.5)),
        }
        for i in range(5)
    ]
    optuna_plots(space, 4, 56, trials, tmp_path)
    imp = json.loads((tmp_path / "param_importance.json").read_text())
    assert set(imp) == set(space.params)
    assert (tmp_path / "param_importance.png").stat().st_size > 0
    assert (tmp_path / "parallel_coordinates.png").stat().st_size > 0
    single = tmp_path / "one"
    single.mkdir()
    optuna_plots(space, 4, 56, trials[3:], single)  # one finished trial: nothing to compare
    assert not list(single.iterdir())


def test_sweep_writes_the_best_labelling(sweep):
    import anndata as ad

    root, out, proc, _ = sweep
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    a = ad.read_h5ad(out)
    assert a.obs["cicl"].nunique() == summary["best_params"]["cluster.n_clusters"]
    assert a.uns["cicl"]["n_clusters_source"] == "sweep s3"
    # the best trial's model is stored: the output maps new cells like a `cicl fit` output
    import cicl

    b = ad.read_h5ad(out)
    del b.obs["cicl"], b.uns["cicl"]
    cicl.predict(b, out)
    assert np.array_equal(b.obs["cicl"].to_numpy(), a.obs["cicl"].to_numpy())
    # the best is chosen by the label-free objective, never by ARI
    c, _, children = _runs(root, EXP)
    done = [r for r in children if r.info.status == "FINISHED"]
    best = max(done, key=lambda r: r.data.metrics["final_objective"])
    assert abs(best.data.metrics["final_objective"] - summary["best_objective"]) < 1e-9
    # the best trial's logged reference (downloaded as from the MLflow UI) maps the cells to
    # the labels the sweep wrote
    import mlflow.artifacts

    ref = mlflow.artifacts.download_artifacts(
        run_id=best.info.run_id,
        artifact_path="reference.h5ad",
        dst_path=str(root / "dl"),
        tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
    )
    del b.obs["cicl"], b.uns["cicl"]
    cicl.predict(b, ref)
    assert np.array_equal(b.obs["cicl"].to_numpy(), a.obs["cicl"].to_numpy())


def test_cicl_runs_table(sweep, capsys):
    from cicl.cli import main

    root, _, _, _ = sweep
    assert main(["runs", "--root", str(root)]) == 0
    text = capsys.readouterr().out
    assert "experiment s3: 3 runs" in text
    assert text.count("trial-") == 3 and "FINISHED" in text
    assert not re.search(r"\d\.\d{6,}", text)  # sampled floats shown with 4 significant digits
    assert f"mlflow ui --backend-store-uri sqlite:///{root / 'mlflow.db'}" in text


def test_runs_without_store_is_a_clear_error(tmp_path, capsys):
    from cicl.cli import main

    assert main(["runs", "--root", str(tmp_path)]) == 2
    assert "No MLflow store" in capsys.readouterr().err


def test_supervised_objective_needs_labels(data_dir, tmp_path, capsys):
    from cicl.cli import main

    rc = main(["tune", str(data_dir / "biase.h5ad"), "--objective", "ari", "--root", str(tmp_path)])
    assert rc == 2 and "--label-key" in capsys.readouterr().err
    # --set values the space decides are reported, not silently dropped
    sets = ["--set", "train.epochs=3", "--set", "loss.temperature=0.3", "--set", "loss.lam=0.5"]
    rc = main(
        ["tune", str(data_dir / "biase.h5ad"), "--space", "small", *sets]
        + ["--objective", "ari", "--root", str(tmp_path)]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "space 'small' fixes train.epochs: 6" in err
    assert "space 'small' searches loss.temperature" in err and "loss.lam" not in err


def test_asha_never_stops_a_trial_before_its_last_round():
    """ASHA's max_t counts the trials' rounds: the space's fixed values win over the base."""
    from cicl.config import CICLConfig
    from cicl.sweep import Space, max_rounds

    base = CICLConfig().with_overrides({"train.epochs": 3})  # e.g. a user's --set
    fixed = {"train.epochs": 6, "cluster.recluster_every": 2}
    assert max_rounds(base, Space("s", {}, fixed), 100) == 3
    searched = {"train.epochs": {"type": "int", "low": 4, "high": 10}}
    assert max_rounds(base, Space("s", searched, fixed), 100) == 5
    # large.yaml: batches up to 2048 need up to 50 epochs of 5,685 cells (min_steps 100)
    large = {"train.batch_size": {"type": "choice", "values": [256, 2048]}}
    every1 = {"cluster.recluster_every": 1}
    assert max_rounds(CICLConfig(), Space("s", large, every1), 5685) == 50


def test_restarted_trial_reuses_a_finished_run_only(tmp_path):
    """What a restarted trial reads from its MLflow run: the logged final metrics once the run
    has FINISHED (it then reports them instead of training again), nothing while it is still
    RUNNING or FINISHED without final metrics."""
    from mlflow.entities import Metric

    c = _client(tmp_path)
    exp = c.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    finals = [Metric("final_objective", 0.4, 0, 1), Metric("final_ari", 0.9, 0, 1)]
    running = c.create_run(exp).info.run_id
    c.log_batch(running, metrics=[*finals, Metric("objective", 0.3, 0, 0)])
    assert finished_result(c, running) is None
    c.set_terminated(running, "FINISHED")
    assert finished_result(c, running) == {"objective": 0.4, "ari": 0.9}
    bare = c.create_run(exp).info.run_id
    c.log_batch(bare, metrics=[Metric("objective", 0.3, 0, 0)])
    c.set_terminated(bare, "FINISHED")
    assert finished_result(c, bare) is None


def test_runs_of_trials_tune_lost_are_not_left_beside_the_sweep(tmp_path, capsys):
    """After a sweep (or a resume), child runs are closed by what Tune knows of their trial:
    RUNNING ones KILLED (stopped early) or FAILED (errored); a run whose trial Tune lost (the
    driver died before Tune saved it; the searcher drew a new trial in its place) is deleted
    when unfinished and kept, tagged, when it finished. Nothing else is touched."""
    from types import SimpleNamespace

    c = _client(tmp_path)
    exp = c.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    parent = c.create_run(exp).info.run_id
    run = {}
    for name in ("stopped", "errored", "done", "lost", "lost_done"):
        tags = {"mlflow.parentRunId": parent, "cicl.trial_id": name}
        run[name] = c.create_run(exp, tags=tags).info.run_id
    for name in ("done", "lost_done"):
        c.set_terminated(run[name], "FINISHED")
    trials = [
        {"trial_id": "stopped", "error": None},
        {"trial_id": "errored", "error": "boom"},
        {"trial_id": "done", "error": None},
    ]
    setup = SimpleNamespace(
        mlflow_uri=default_mlflow_uri(tmp_path), experiment_id=exp, parent_run_id=parent
    )
    assert close_orphans(setup, trials) == 1
    assert "1 trial run(s)" in capsys.readouterr().err
    got = {n: c.get_run(r) for n, r in run.items()}
    assert got["stopped"].info.status == "KILLED"
    assert got["errored"].info.status == "FAILED"
    assert got["done"].info.status == "FINISHED" and "cicl.lost" not in got["done"].data.tags
    assert got["lost"].info.lifecycle_stage == "deleted"
    assert got["lost_done"].info.lifecycle_stage == "active"
    assert got["lost_done"].info.status == "FINISHED"
    assert got["lost_done"].data.tags["cicl.lost"] == "true"
    assert c.get_run(parent).info.status == "RUNNING"  # the parent is the caller's to close


def test_child_runs_reads_every_page(tmp_path):
    """A sweep's child runs are read page by page: none is missed past the first page, and
    runs of another parent are not included."""
    c = _client(tmp_path)
    exp = c.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    parent, other = c.create_run(exp).info.run_id, c.create_run(exp).info.run_id
    mine = {c.create_run(exp, tags={"mlflow.parentRunId": parent}).info.run_id for _ in range(5)}
    c.create_run(exp, tags={"mlflow.parentRunId": other})
    got = child_runs(c, exp, parent, page_size=2)
    assert len(got) == 5
    assert {r.info.run_id for r in got} == mine


def test_ctrl_c_stops_a_sweep_cleanly(data_dir, tmp_path):
    """Ctrl-C while the first trial trains: exit 130, the --resume hint, and no run left
    RUNNING, the interrupted trial's included (resuming is checked on the harder case of a
    killed driver, the ``sweep`` fixture)."""
    proc = _start([sys.executable, "-m", "cicl.cli", *_tune_args(data_dir, tmp_path)])
    _wait_for_run(proc, tmp_path, finished=False)
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "--resume" in err
    _, parents, children = _runs(tmp_path, EXP)
    assert children and all(r.info.status != "RUNNING" for r in [*parents, *children])


def test_sweep_shows_one_progress_bar_not_tune_tables(sweep):
    """The driver shows a bar over trials (with the best final objective), not Ray Tune's
    periodic trial-status tables (those stay available with --tune-tables)."""
    _, _, proc, _ = sweep
    assert "trials: 100%" in proc.stderr and "3/3" in proc.stderr
    assert "best_objective=" in proc.stderr
    assert "Trial status" not in proc.stdout + proc.stderr
    # stdout is the result only (Tune's experiment box goes to stderr with the progress)
    assert len(proc.stdout.strip().splitlines()) == 1
    assert "Creating initial MLflow database tables" not in proc.stderr
    assert "Wrote the latest version" not in proc.stderr  # Tune's closing INFO lines
    assert "Total run time" not in proc.stderr
    assert "Configuration for experiment" not in proc.stderr  # nor its experiment box
    assert "tensorboard --logdir" not in proc.stderr
    assert "Warning" not in proc.stderr  # no Optuna / matplotlib warnings from the figures


def test_sweep_output_drops_only_rays_fractional_cpu_warning():
    """The raylet's warning that many worker processes started (cicl's fractional CPU requests
    cause it on small machines) is dropped with its line end; everything else passes as is."""
    import io

    from cicl.sweep.console import DropNoise

    sink = io.StringIO()
    out = DropNoise(sink)
    print("box", file=out)
    warning = (
        "(raylet) WARNING: 8 PYTHON worker processes have been started on node: abc with "
        "address: 10.0.0.1, which is 4x the maximum expected startup concurrency (2)."
    )
    print(warning, file=out)
    print("results", file=out)
    out.write("partial")
    out.write("\n")
    out.write("\n")
    assert sink.getvalue() == "box\nresults\npartial\n\n"

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert DropNoise(Terminal()).isatty() and not out.isatty()  # asked of the sink


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlflow_server(folder: Path, port: int) -> subprocess.Popen:
    """An MLflow tracking server on ``folder``'s store, in its own process group (it starts
    workers of its own), once it answers."""
    from cicl.tracking import http_status

    folder.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}"]
    cmd += ["--artifacts-destination", str(folder / "artifacts")]
    log = open(folder / "server.log", "a")  # noqa: SIM115 - the server's, closed with it
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=log, cwd=folder, start_new_session=True, env=os.environ.copy()
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if http_status(f"http://127.0.0.1:{port}/health", 2) == 200:
                return proc
        except OSError:
            time.sleep(0.5)
    _stop_server(proc)
    pytest.fail(f"MLflow server did not start:\n{(folder / 'server.log').read_text()[-3000:]}")


def _stop_server(proc: subprocess.Popen) -> None:
    """The server and every process it started, gone at once (as when its machine dies)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


@pytest.mark.benchmark  # two sweeps and two servers started: minutes on a loaded 2-core box
def test_a_sweep_whose_tracking_server_goes_away_stops_and_resumes(data_dir, tmp_path):
    """The tracking server dies after the first of two trials finished: the sweep ends with one
    error line (exit 2) that says so and gives the --resume command, keeping Tune's state and
    the finished trial's folder; resumed with a server back on the same store, it runs the
    second trial only (the first trial's run is not written again) and finishes."""
    from ray import tune

    root, store = tmp_path / "root", tmp_path / "server"
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _mlflow_server(store, port)
    try:
        args = [sys.executable, "-m", "cicl.cli", *_tune_args(data_dir, root, trials=2)]
        t0 = time.time()
        proc = _start([*args, "--mlflow-uri", uri])
        first = None
        while first is None and proc.poll() is None and time.time() < t0 + 600:
            time.sleep(1)
            with contextlib.suppress(Exception):  # experiment not there yet
                exp = mlflow_client(uri).get_experiment_by_name(EXP)
                done = mlflow_client(uri).search_runs(
                    [exp.experiment_id], "attributes.status = 'FINISHED'"
                )
                first = next(r for r in done if "mlflow.parentRunId" in r.data.tags)
        assert first is not None, proc.communicate(timeout=60)[1][-3000:]
        _stop_server(server)
        # the server comes back on the same store (on another port: no wait for this one's)
        # while the sweep finds it gone
        port = _free_port()
        server = _mlflow_server(store, port)
        _, err = proc.communicate(timeout=300)
        stopped_s = time.time() - t0
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 2, err[-3000:]
        assert lines[-1].startswith(f"error: The MLflow tracking server at {uri} stopped"), err
        assert "after 1 of 2 trials finished" in lines[-1]
        assert f"cicl tune ... --resume --experiment {EXP}" in lines[-1]
        assert "Traceback" not in err and "Tuner.restore" not in err, err[-3000:]
        sweep = root / "tune" / EXP
        assert tune.Tuner.can_restore(str(sweep / "tuner"))
        trial = sweep / "trials" / f"trial_id={first.data.tags['cicl.trial_id']}"
        assert (trial / "labels.npy").exists()

        uri = f"http://127.0.0.1:{port}"
        resumed = subprocess.run(
            [*args, "--mlflow-uri", uri, "--resume"], capture_output=True, text=True, timeout=600
        )
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        c = mlflow_client(uri)
        runs = c.search_runs([first.info.experiment_id])
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        assert len(children) == 2 and len({r.data.tags["cicl.trial_id"] for r in children}) == 2
        assert all(r.info.status in ("FINISHED", "KILLED") for r in runs)
        assert c.get_run(first.info.run_id).info.end_time == first.info.end_time  # not rerun
        print(f"stopped after {stopped_s:.0f} s, resumed in {time.time() - t0 - stopped_s:.0f} s")
    finally:
        _stop_server(server)
