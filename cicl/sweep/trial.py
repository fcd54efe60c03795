"""One trial of a sweep: a Ray Tune function trainable that runs the fit's own Ray Train
driver (``cicl.distributed.train_sharded``, Ray's Train-inside-Tune pattern) with the trial's
config, adding per-round scoring and callbacks that forward each round to Tune (ASHA) and to the
trial's MLflow run; then scores the final labels and logs the trial's artifacts."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cicl.config import CICLConfig
from cicl.distributed import RayRun, WorkerPlan, train_sharded
from cicl.errors import CICLError
from cicl.objective import score_labels, truth_scores
from cicl.sweep.artifacts import trial_artifacts
from cicl.sweep.spaces import Space, trial_config
from cicl.tracking import (
    check_server,
    find_or_create_run,
    log_metrics,
    log_params,
    mlflow_client,
)


class TrackingLost(CICLError):
    """The MLflow tracking server stopped answering during a sweep. A trial raises it (Tune
    records it as the trial's error, which the driver looks for); the driver raises it to the
    user with the ``--resume`` command."""


def server_gone(uri: str) -> bool:
    """Whether ``uri`` is a tracking server that no longer answers (a store on disk is never
    gone this way). Asked only after a failure: one GET of its health page."""
    if not uri.startswith(("http://", "https://")):
        return False
    try:
        check_server(uri)
    except CICLError:
        return True
    return False


@contextlib.contextmanager
def tracking_guard(uri: str) -> Iterator[None]:
    """A failure inside the block while the tracking server does not answer becomes
    ``TrackingLost``: whichever MLflow call met the dead server (a search, a metric logged
    by the Train controller's callback, an artifact upload), the driver sees one kind of
    error and stops the sweep instead of failing every remaining trial the same way."""
    try:
        yield
    except TrackingLost:
        raise
    except Exception as exc:
        if server_gone(uri):
            raise TrackingLost(
                f"the MLflow tracking server at {uri} stopped answering "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
            ) from exc
        raise


@dataclass
class SweepSetup:
    """Everything a trial needs besides its sampled params (shipped once with
    ``tune.with_parameters``)."""

    base: CICLConfig
    space: Space
    x: np.ndarray
    pcs: np.ndarray
    truth: np.ndarray | None
    objective: str
    mlflow_uri: str
    experiment_id: str
    parent_run_id: str
    storage: str
    plan: WorkerPlan  # each trial's Ray Train workers
    k_est: int  # K of a trial whose config leaves it open: the fit's label-free estimate
    label_key: str | None
    plots: bool = True
    # the fitted preprocessing half of a stored model (``reference.prep_record``): with it,
    # each trial logs ``reference.h5ad``, so any trial's model maps new cells
    model_base: dict | None = None
    counts: np.ndarray | None = None  # raw counts for the negative binomial decoder


# cluster.yaml gives this custom resource to the head node only (where MLflow listens)
DRIVER_RESOURCE = "TRAIN_DRIVER"
# what each trial driver takes of it: enough to pin the driver to the head, too little to be
# the limit on concurrent trials (their CPUs are)
DRIVER_SHARE = 0.01
# MLflow tags of a trial's run: the Ray node ids its driver and its Train controller ran on
DRIVER_NODE = "cicl.driver_node"
CONTROLLER_NODE = "cicl.controller_node"


def driver_resources(cpu: float, cluster: dict[str, float]) -> dict[str, float]:
    """What Tune reserves for a trial's driver (the trainable: the first bundle of its
    placement group): ``cpu`` CPUs and, where the cluster offers ``DRIVER_RESOURCE``
    (``ray.cluster_resources()``), a share of it. That pins the driver to the head, where an
    MLflow server bound to 127.0.0.1 is reachable and preemption of GPU nodes cannot kill
    it; Ray Train's controller follows (Ray places it on the node of the process that calls
    ``fit``). Without the resource (local Ray, CI) it is the CPUs alone."""
    out = {"cpu": cpu}
    if cluster.get(DRIVER_RESOURCE, 0.0) >= DRIVER_SHARE:
        out[DRIVER_RESOURCE] = DRIVER_SHARE
    return out


def _round_logger(uri: str, run_id: str):
    """A Ray Train callback that logs rank 0's per-round metrics to the trial's MLflow run.
    It runs in the Train controller, which Ray pins to the trial driver's node (the head on a
    cluster, see ``driver_resources``), so an MLflow server bound to the head's 127.0.0.1 is
    reachable. Its first round tags the run with the controller's node (``CONTROLLER_NODE``)."""
    import ray
    from ray.train import UserCallback

    class MLflowRounds(UserCallback):
        tagged = False

        def after_report(self, run_context, metrics, checkpoint) -> None:
            if not self.tagged:
                node = ray.get_runtime_context().get_node_id()
                mlflow_client(uri).set_tag(run_id, CONTROLLER_NODE, node)
                self.tagged = True
            if metrics:
                log_metrics(uri, run_id, metrics[0], int(metrics[0].get("epoch", 0)))

    return MLflowRounds()


def finished_result(client, run_id: str) -> dict[str, float] | None:
    """The final metrics of a trial whose MLflow run has FINISHED, else None.

    A trial marks its run FINISHED just before it reports to Tune, so a Ctrl-C in between
    leaves Tune's saved state a step behind MLflow's; on resume such a trial must not train
    (and rewrite its run) again.
    """
    run = client.get_run(run_id)
    final = {
        k.removeprefix("final_"): v for k, v in run.data.metrics.items() if k.startswith("final_")
    }
    return final if run.info.status == "FINISHED" and "objective" in final else None


def run_trial(config: dict[str, Any], setup: SweepSetup) -> None:
    """Tune function trainable: one Ray Train run of CICL with this trial's params."""
    with tracking_guard(setup.mlflow_uri):
        _run_trial(config, setup)


def _run_trial(config: dict[str, Any], setup: SweepSetup) -> None:
    import ray
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(setup.base, setup.space, config)
    k = int(cfg.cluster.n_clusters or setup.k_est)
    run_id, created = find_or_create_run(
        setup.mlflow_uri,
        setup.experiment_id,
        {"cicl.trial_id": trial_id},
        f"trial-{trial_id}",
        parent=setup.parent_run_id,
    )
    client = mlflow_client(setup.mlflow_uri)
    trial_dir = Path(setup.storage) / "trials" / f"trial_id={trial_id}"
    if created:
        log_params(
            setup.mlflow_uri,
            run_id,
            {**cfg.flat(), **{f"search.{k_}": v for k_, v in config.items()}},
        )
    else:  # a restarted trial (resume, failure) reopens its own run ...
        done = finished_result(client, run_id)
        if done is not None:  # ... unless it had finished: report that, do not train again
            ray.tune.report({**done, "final": 1.0, "trial_dir": str(trial_dir)})
            return
        client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, DRIVER_NODE, ray.get_runtime_context().get_node_id())
    out_dir = trial_dir / "shards"
    out_dir.mkdir(parents=True, exist_ok=True)
    run = RayRun(Path(setup.storage) / "train", f"train-trial_id={trial_id}", out_dir)
    res, result = train_sharded(
        setup.x,
        setup.pcs,
        k,
        cfg,
        setup.plan,
        run,
        counts=setup.counts,
        truth=setup.truth,
        objective=setup.objective,
        keep=1,
        # MLflow first: a round ASHA stops the trial at is still in the trial's run
        callbacks=[_round_logger(setup.mlflow_uri, run_id), TuneReportCallback()],
    )
    final = {
        "objective": score_labels(
            setup.objective, res.labels, setup.pcs, res.embedding, setup.truth
        ),
        "n_clusters": float(k),
    }
    if setup.truth is not None:
        final.update(truth_scores(res.labels, setup.truth))
    steps = int(res.history[-1]["epoch"]) + 1 if res.history else 1
    log_metrics(setup.mlflow_uri, run_id, {f"final_{k_}": v for k_, v in final.items()}, steps)
    np.save(trial_dir / "labels.npy", res.labels)
    np.save(trial_dir / "embedding.npy", res.embedding)
    trial_artifacts(setup, cfg, res, k, run_id, trial_dir, result)
    client.set_terminated(run_id, "FINISHED")
    ray.tune.report({**final, "final": 1.0, "trial_dir": str(trial_dir)})
