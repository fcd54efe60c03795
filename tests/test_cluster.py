"""cluster.yaml, validated offline with Ray's own checks, and the cluster path end to end on a
real local 2-node Ray cluster: `ray start` head (with the TRAIN_DRIVER resource) + worker on
loopback, the MLflow server started as the head's setup starts it, a `cicl tune` submitted as a
Ray Job through the Jobs API, the runs checked in MLflow."""

from __future__ import annotations

import contextlib
import copy
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def _start_node(args: list[str], env: dict, temp: Path) -> subprocess.Popen:
    """One Ray node in the foreground (``--block``), its own process group and temp dir: the
    test stops its nodes alone (``_stop_nodes``) and leaves other Ray instances on this machine
    alone; its temp dir keeps ``ray.init()`` elsewhere from finding this cluster."""
    temp.mkdir(parents=True)
    return subprocess.Popen(
        [str(BIN / "ray"), "start", "--block", "--temp-dir", str(temp), *args],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _stop_nodes(nodes: list[subprocess.Popen]) -> None:
    """SIGTERM makes a blocking ``ray start`` stop its node's processes; SIGKILL if it hangs."""
    for node in reversed(nodes):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGTERM)
        try:
            node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()


def _alive_nodes(dashboard: str) -> list:
    from ray.util.state import list_nodes

    try:
        return list_nodes(address=dashboard, filters=[("state", "=", "ALIVE")])
    except Exception:  # noqa: BLE001 - the dashboard is not up yet
        return []


def _wait_nodes(dashboard: str, n: int, timeout: float) -> list:
    deadline = time.time() + timeout
    while len(nodes := _alive_nodes(dashboard)) < n:
        assert time.time() < deadline, f"{n} Ray node(s) did not come up"
        time.sleep(1)
    return nodes


@dataclass
class ClusterJob:
    """A finished ``cicl tune`` Ray Job on the local 2-node cluster, and where to look."""

    status: Any
    logs: str
    mlflow_uri: str
    root: Path
    head: str  # node ids
    worker: str


@pytest.fixture(scope="module")
def cluster_job(data_dir, tmp_path_factory) -> Iterator[ClusterJob]:
    """A real local 2-node Ray cluster: a head (2 CPUs, the ``TRAIN_DRIVER`` resource) and a
    second node (2 CPUs) on loopback, the MLflow server started as cluster.yaml's head setup
    starts it, and one ``cicl tune`` (one trial of two ranks of 1.25 CPUs) submitted as a Ray
    Job through the Jobs API, its own driver on the head holding 0.25 CPU. Slow: run once for
    the module's tests.

    The CPUs are chosen so that where the trial's driver (0.5 CPU) runs decides the test. Ray
    places it on the node with the largest share of CPUs left after it: the second node
    (1.5 of 2 over 1.25 of 1.75), unless ``TRAIN_DRIVER`` pins it to the head. On the head it
    leaves 1.25 CPUs, so the two ranks run one per node."""
    tmp_path = tmp_path_factory.mktemp("cluster")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash, mlf = _free_port(), _free_port(), _free_port()
    dashboard = f"http://127.0.0.1:{dash}"
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths
    common = ["--node-ip-address", "127.0.0.1"]
    server, nodes = None, []
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
        nodes.append(
            _start_node(
                ["--head", "--port", str(gcs), "--dashboard-port", str(dash)]
                + ["--dashboard-host", "127.0.0.1", "--resources", '{"TRAIN_DRIVER": 2}']
                + ["--num-cpus", "2", *common],
                env,
                temp / "head",
            )
        )
        _wait_nodes(dashboard, 1, 120)
        nodes.append(
            _start_node(
                ["--address", f"127.0.0.1:{gcs}", "--num-cpus", "2", *common], env, temp / "node"
            )
        )
        alive = _wait_nodes(dashboard, 2, 120)
        head = next(n.node_id for n in alive if n.is_head_node)
        worker = next(n.node_id for n in alive if not n.is_head_node)
        _wait_http(f"http://127.0.0.1:{mlf}/health", 60)
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(dashboard)
        # one trial: sweeps of several trials are checked on local Ray (test_tune.py); here
        # what is checked is the job, the remote MLflow server and where the trial ran
        entry = (
            f"{sys.executable} -m cicl.cli tune {data_dir / 'biase.h5ad'} --trials 1 "
            f"--space small --label-key cell_type --address auto --experiment cluster-job "
            f"--mlflow-uri http://127.0.0.1:{mlf} --root {tmp_path / 'shared'} "
            "--workers-per-trial 2 --cpus-per-worker 1.25 --no-asha --set cluster.final_n_init=4"
        )
        job = client.submit_job(
            entrypoint=entry,
            entrypoint_num_cpus=0.25,
            entrypoint_resources={"TRAIN_DRIVER": 1},  # the sweep's driver on the head
            runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}},
        )
        deadline = time.time() + 900
        status = client.get_job_status(job)
        while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            assert time.time() < deadline, "job did not finish"
            time.sleep(5)
            status = client.get_job_status(job)
        yield ClusterJob(
            status=status,
            logs=client.get_job_logs(job),
            mlflow_uri=f"http://127.0.0.1:{mlf}",
            root=tmp_path / "shared",
            head=head,
            worker=worker,
        )
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
        _stop_nodes(nodes)
        shutil.rmtree(temp, ignore_errors=True)


def _trial_runs(job: ClusterJob) -> tuple[list, list]:
    """All the job's MLflow runs, and the trials' (children of the sweep's run)."""
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobStatus

    assert job.status == JobStatus.SUCCEEDED, job.logs[-3000:]
    mc = MlflowClient(tracking_uri=job.mlflow_uri)
    runs = mc.search_runs([mc.get_experiment_by_name("cluster-job").experiment_id])
    return runs, [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def test_tune_job_on_a_local_two_node_cluster(cluster_job):
    from mlflow.tracking import MlflowClient

    runs, children = _trial_runs(cluster_job)
    assert len(runs) == 2 and len(children) == 1
    assert all(r.info.status == "FINISHED" for r in runs)
    assert all("final_objective" in r.data.metrics for r in children)
    mc = MlflowClient(tracking_uri=cluster_job.mlflow_uri)
    assert {a.path for a in mc.list_artifacts(children[0].info.run_id)} >= {"labels.csv"}


def test_trial_driver_runs_on_the_head(cluster_job):
    """The trial's driver asks for the head's TRAIN_DRIVER, so it (and Ray Train's controller,
    which logs the rounds to MLflow) ran on the head, while its two ranks ran one per node."""
    from cicl.sweep.trial import CONTROLLER_NODE, DRIVER_NODE

    _, children = _trial_runs(cluster_job)
    tags = children[0].data.tags
    assert tags[DRIVER_NODE] == cluster_job.head
    assert tags[CONTROLLER_NODE] == cluster_job.head
    (shards,) = cluster_job.root.rglob("trial_id=*/shards")
    ranks = sorted((shards / f"node_rank{r}.txt").read_text() for r in (0, 1))
    assert ranks == sorted([cluster_job.head, cluster_job.worker])


def test_trial_driver_asks_for_the_head_only_where_offered():
    from cicl.sweep.trial import DRIVER_RESOURCE, driver_resources

    assert driver_resources(0.5, {"CPU": 4.0}) == {"cpu": 0.5}
    pinned = driver_resources(0.5, {"CPU": 4.0, DRIVER_RESOURCE: 8.0})
    assert pinned["cpu"] == 0.5 and 0 < pinned[DRIVER_RESOURCE] < 1  # many trials a unit
