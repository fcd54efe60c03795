"""cluster.yaml, validated offline with Ray's own checks, and the cluster path end to end on a
real local 2-node Ray cluster: `ray start` head (with the TRAIN_DRIVER resource) + worker on
loopback, the MLflow server started as the head's setup starts it, a `cicl tune` submitted as a
Ray Job through the Jobs API, the runs checked in MLflow."""

from __future__ import annotations

import copy
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _load() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _validate(cfg: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))


def test_cluster_yaml_passes_rays_validation():
    _validate(_load())


@pytest.mark.parametrize(
    "break_it",
    [
        lambda d: d.update(head_node_type="no_such_type"),
        lambda d: d.update(max_workers="many"),
        lambda d: d.update(unknown_top_level_key=1),
        lambda d: d["available_node_types"]["gpu_1x"].pop("node_config"),
        lambda d: d.pop("provider"),
    ],
    ids=[
        "bad-head-type",
        "non-integer-max-workers",
        "unknown-key",
        "no-node-config",
        "no-provider",
    ],
)
def test_broken_cluster_yaml_is_rejected(break_it):
    cfg = _load()
    break_it(cfg)
    with pytest.raises(Exception):  # noqa: B017 - ValueError, KeyError or jsonschema's error
        _validate(cfg)


def test_cluster_yaml_content():
    cfg = _load()
    text = (ROOT / "cluster.yaml").read_text()
    assert cfg["provider"]["type"] == "aws"
    assert cfg["docker"]["image"] == "rayproject/ray:2.60.0-py311-gpu"
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert "TRAIN_DRIVER" in head["resources"] and head["max_workers"] == 0
    gpu = {t["node_config"]["InstanceType"] for n, t in types.items() if n != cfg["head_node_type"]}
    assert {"g5.xlarge", "p4d.24xlarge"} <= gpu
    assert all(t["min_workers"] == 0 for n, t in types.items() if n != cfg["head_node_type"])
    assert cfg["file_mounts"]["/home/ray/cicl"] == "."
    assert any("pip install" in c and "/home/ray/cicl" in c for c in cfg["setup_commands"])
    server = " ".join(cfg["head_setup_commands"])
    assert "mlflow server" in server and "--host 127.0.0.1" in server and "sqlite:////" in server
    assert "--dashboard-host=127.0.0.1" in " ".join(cfg["head_start_ray_commands"])
    assert cfg["idle_timeout_minutes"] > 0
    for secret in (r"AKIA[0-9A-Z]{12,}", r"aws_secret_access_key", r"BEGIN .*PRIVATE KEY"):
        assert not re.search(secret, text, re.I)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlflow_command(db: Path, port: int) -> list[str]:
    """The head's MLflow server command, from cluster.yaml, with a local db path and port."""
    cmd = " ".join(_load()["head_setup_commands"][1].split())
    cmd = re.search(r"nohup (mlflow server .*?) >", cmd).group(1)
    cmd = cmd.replace("sqlite:////home/ray/mlflow/mlflow.db", f"sqlite:///{db}")
    cmd = re.sub(
        r"--artifacts-destination \S+", f"--artifacts-destination {db.parent / 'art'}", cmd
    )
    cmd = cmd.replace("--port 5000", f"--port {port}")
    return [str(BIN / "mlflow"), *cmd.split()[1:]]


def _wait_http(url: str, timeout: float) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(1)
    raise TimeoutError(url)


def test_tune_job_on_a_local_two_node_cluster(data_dir, tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}"}
    gcs, dash, mlf = _free_port(), _free_port(), _free_port()
    ray = str(BIN / "ray")
    # head: 2 CPUs (0.5 go to the trial driver), second node: 1 CPU; 1-CPU workers then cannot
    # both fit on one node, so every trial's two ranks run on different nodes
    common = ["--node-ip-address", "127.0.0.1"]
    server = None
    try:
        # the MLflow server starts while the two Ray nodes come up (each takes seconds)
        db = tmp_path / "mlflow" / "mlflow.db"
        db.parent.mkdir()
        server = subprocess.Popen(
            _mlflow_command(db, mlf),
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        subprocess.run(
            [ray, "start", "--head", "--port", str(gcs), "--dashboard-port", str(dash)]
            + ["--dashboard-host", "127.0.0.1", "--resources", '{"TRAIN_DRIVER": 2}']
            + ["--num-cpus", "2", *common],
            env=env,
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [ray, "start", "--address", f"127.0.0.1:{gcs}", "--num-cpus", "1", *common],
            env=env,
            check=True,
            capture_output=True,
        )
        _wait_http(f"http://127.0.0.1:{mlf}/health", 60)
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(f"http://127.0.0.1:{dash}")
        # one trial: sweeps of several trials are checked on local Ray (test_tune.py); here
        # what is checked is the job, the remote MLflow server and ranks on two nodes
        entry = (
            f"{sys.executable} -m cicl.cli tune {data_dir / 'biase.h5ad'} --trials 1 "
            f"--space small --label-key cell_type --address auto --experiment cluster-job "
            f"--mlflow-uri http://127.0.0.1:{mlf} --root {tmp_path / 'shared'} "
            "--workers-per-trial 2 --cpus-per-worker 1 --no-asha --set cluster.final_n_init=4"
        )
        job = client.submit_job(
            entrypoint=entry, runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}}
        )
        deadline = time.time() + 900
        status = client.get_job_status(job)
        while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            assert time.time() < deadline, "job did not finish"
            time.sleep(5)
            status = client.get_job_status(job)
        assert status == JobStatus.SUCCEEDED, client.get_job_logs(job)[-3000:]

        from mlflow.tracking import MlflowClient

        mc = MlflowClient(tracking_uri=f"http://127.0.0.1:{mlf}")
        exp = mc.get_experiment_by_name("cluster-job")
        runs = mc.search_runs([exp.experiment_id])
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        assert len(runs) == 2 and len(children) == 1
        assert all(r.info.status == "FINISHED" for r in runs)
        assert all("final_objective" in r.data.metrics for r in children)
        assert {a.path for a in mc.list_artifacts(children[0].info.run_id)} >= {"labels.csv"}
        shard_dirs = list((tmp_path / "shared").rglob("trial_id=*/shards"))
        assert len(shard_dirs) == 1
        for d in shard_dirs:  # the trial's two ranks ran on different nodes
            assert len({(d / f"node_rank{r}.txt").read_text() for r in (0, 1)}) == 2
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True)
