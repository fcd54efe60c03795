"""The sweep itself: Ray Tune's Tuner over the space (Optuna's TPE, seeded, the base
configuration first; ASHA stopping weak trials at reclustering rounds), ``--resume`` of a saved
sweep, the MLflow parent run, and the best trial picked by the objective."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cicl._logging import quieted
from cicl.config import CICLConfig
from cicl.distributed import ensure_ray, load_result, plan_workers
from cicl.errors import CICLError
from cicl.objective import SUPERVISED, resolve
from cicl.sweep.artifacts import sweep_artifacts
from cicl.sweep.console import DropNoise, quiet_lost_trials, quiet_tune, trial_bar
from cicl.sweep.spaces import Space, base_point, load_space, max_rounds, trial_config, tune_space
from cicl.sweep.trial import (
    SweepSetup,
    TrackingLost,
    driver_resources,
    run_trial,
    server_gone,
)
from cicl.tracking import (
    child_runs,
    default_mlflow_uri,
    ensure_experiment,
    find_or_create_run,
    log_metrics,
    log_params,
    mlflow_client,
)
from cicl.train.loop import TrainResult

TRIAL_DRIVER_CPU = 0.5  # what Tune reserves for each trial's driver (the trainable)
FINAL_KIND = "final"  # ``cicl.kind`` of the run fitting the best config on a whole atlas


@dataclass(frozen=True)
class SweepOptions:
    trials: int = 12
    space: str = "default"
    objective: str = "auto"
    mlflow_uri: str | None = None
    experiment: str | None = None
    workers_per_trial: int = 1
    gpus_per_worker: float | str = "auto"  # a number, or "auto" (``worker_gpus``)
    cpus_per_worker: float | None = None
    concurrent: int = 1
    resume: bool = False
    root: str = "runs"  # sweeps under ROOT/tune/<experiment>, MLflow store ROOT/mlflow.db
    address: str | None = None
    seed: int = 0
    asha: bool = True
    plots: bool = True
    progress: bool = True  # one bar over trials (best final objective so far) on stderr
    tune_tables: bool = False  # Ray Tune's own periodic trial-status tables instead


@dataclass
class SweepResult:
    experiment: str
    experiment_id: str
    parent_run_id: str
    mlflow_uri: str
    best_params: dict[str, Any]
    best_metrics: dict[str, float]
    best_labels: np.ndarray
    best_embedding: np.ndarray
    best_config: CICLConfig
    best_result: TrainResult | None  # centroids, history, trained encoder (None: not on disk)
    trials: list[dict]  # one record per trial: params, metrics, status
    path: str


def run_sweep(
    x: np.ndarray,
    pcs: np.ndarray,
    k_est: int,
    base: CICLConfig,
    opts: SweepOptions,
    *,
    truth: np.ndarray | None = None,
    label_key: str | None = None,
    name_hint: str = "cicl",
    model_base: dict | None = None,
    counts: np.ndarray | None = None,
) -> SweepResult:
    """Run (or ``resume``) a sweep; returns the best trial by the objective. With
    ``model_base`` (``reference.prep_record`` of the preprocessing), every finished trial logs
    its model as ``reference.h5ad``.

    A tracking server that stops answering ends the sweep with ``TrackingLost``: Tune's state
    and the finished trials' folders are kept, and the message gives the ``--resume`` command
    (finished trials are not run again)."""
    import dataclasses

    objective = resolve(opts.objective)
    if objective in SUPERVISED and truth is None:
        raise CICLError(f"--objective {objective} needs --label-key.")
    space = load_space(opts.space)
    root = Path(opts.root).resolve()
    sweeps = root / "tune"
    sweeps.mkdir(parents=True, exist_ok=True)
    experiment = opts.experiment or _experiment_name(sweeps, name_hint, opts.resume)
    opts = dataclasses.replace(opts, experiment=experiment, objective=objective)
    uri = opts.mlflow_uri or default_mlflow_uri(root)
    try:
        return _run_sweep(x, pcs, k_est, base, opts, space, truth, label_key, model_base, counts)
    except CICLError:
        raise
    except Exception:  # a driver-side MLflow call: before the trials, or closing the sweep
        if not server_gone(uri):
            raise
        raise TrackingLost(lost_message(uri, opts, None)) from None


def lost_message(uri: str, opts: SweepOptions, finished: int | None) -> str:
    """What the user reads when the tracking server went away: what is kept, how to go on."""
    name = opts.experiment
    path = Path(opts.root).resolve() / "tune" / name
    if not (path / "tuner").exists():  # Tune never started: there is nothing to resume
        return (
            f"The MLflow tracking server at {uri} stopped answering before the sweep started; "
            "nothing was run. Start the server again and rerun the command."
        )
    done = "" if finished is None else f" after {finished} of {opts.trials} trials finished"
    return (
        f"The MLflow tracking server at {uri} stopped answering; sweep '{name}' stopped{done}. "
        f"Its state and finished trials are kept under {path}. Once the server answers again, "
        f"continue with: cicl tune ... --resume --experiment {name} "
        "(finished trials are not run again)"
    )


def _run_sweep(
    x: np.ndarray,
    pcs: np.ndarray,
    k_est: int,
    base: CICLConfig,
    opts: SweepOptions,  # its experiment named, its objective resolved
    space: Space,
    truth: np.ndarray | None,
    label_key: str | None,
    model_base: dict | None,
    counts: np.ndarray | None,
) -> SweepResult:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    objective, experiment = opts.objective, str(opts.experiment)
    root = Path(opts.root).resolve()
    sweeps = root / "tune"
    path = sweeps / experiment
    if opts.resume and not path.exists():
        raise CICLError(f"No sweep '{experiment}' to resume under {sweeps}.")
    if not opts.resume and path.exists():
        raise CICLError(
            f"Sweep '{experiment}' already exists under {sweeps}. "
            "Pass --resume to continue it, or another --experiment name."
        )
    uri = opts.mlflow_uri or default_mlflow_uri(root)
    exp_id = ensure_experiment(uri, experiment, root / "mlartifacts" / experiment)
    parent, created = find_or_create_run(
        uri, exp_id, {"cicl.sweep": experiment}, f"sweep-{experiment}"
    )
    if created:
        log_params(
            uri,
            parent,
            {
                "space": space.name,
                "objective": objective,
                "trials": opts.trials,
                "workers_per_trial": opts.workers_per_trial,
                "k_estimate": k_est,
                **{f"fixed.{k}": v for k, v in space.fixed.items()},
            },
        )
    ensure_ray(opts.address)
    total = ray.cluster_resources()
    plan = plan_workers(
        opts.workers_per_trial,
        float(total.get("CPU", 2.0)),
        cpus=opts.cpus_per_worker,
        gpus=opts.gpus_per_worker,
        total_gpu=float(total.get("GPU", 0.0)),
        concurrent=opts.concurrent,
        driver_cpu=TRIAL_DRIVER_CPU,
    )
    setup = SweepSetup(
        base=base,
        space=space,
        x=x,
        pcs=pcs,
        truth=truth,
        objective=objective,
        mlflow_uri=uri,
        experiment_id=exp_id,
        parent_run_id=parent,
        storage=str(path),
        plan=plan,
        k_est=k_est,
        label_key=label_key,
        plots=opts.plots,
        model_base=model_base,
        counts=counts,
    )
    trainable = tune.with_resources(  # on a cluster.yaml cluster: drivers on the head
        tune.with_parameters(run_trial, setup=setup),
        driver_resources(TRIAL_DRIVER_CPU, ray.cluster_resources()),
    )
    rounds = max_rounds(base, space, x.shape[0])
    scheduler = (
        ASHAScheduler(
            time_attr="training_iteration",
            max_t=rounds + 1,
            grace_period=max(1, rounds // 3),
            reduction_factor=2,
        )
        if opts.asha
        else FIFOScheduler()
    )
    tuner_path = str(path / "tuner")
    watch = tracking_watch()
    LOST.clear()
    if opts.resume and tune.Tuner.can_restore(tuner_path):
        tuner = tune.Tuner.restore(
            tuner_path, trainable=trainable, resume_unfinished=True, resume_errored=True
        )
        # it runs the callbacks saved with the sweep: their TrackingWatch sets LOST all the same
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=tune_space(space, k_est, x.shape[0]),
            tune_config=tune.TuneConfig(
                metric="objective",
                mode="max",
                search_alg=OptunaSearch(
                    seed=opts.seed,
                    points_to_evaluate=[base_point(space, base, k_est, x.shape[0])],
                ),
                scheduler=scheduler,
                num_samples=opts.trials,
                max_concurrent_trials=opts.concurrent,
            ),
            run_config=tune.RunConfig(
                name="tuner",
                storage_path=str(path),
                failure_config=tune.FailureConfig(max_failures=1),
                verbose=None if opts.tune_tables else 0,  # None: Tune's default tables
                callbacks=[*([trial_bar(opts.trials)] if opts.progress else []), watch],
            ),
        )
    # Tune prints its experiment box and results path to stdout whatever the verbosity: send
    # them to stderr with the rest of the progress output, so stdout holds only cicl's result
    # (less one raylet warning about fractional CPUs, see DropNoise)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in memory"
    with (
        contextlib.redirect_stdout(DropNoise(sys.stderr)),
        quiet_tune(not opts.tune_tables),
        quiet_lost_trials(LOST),
    ):
        grid = tuner.fit()
    stopped = grid.num_terminated + grid.num_errors < opts.trials  # Tune saved its state
    if LOST.is_set() or ((stopped or grid.num_errors) and server_gone(uri)):
        finished = sum(bool((r.metrics or {}).get("final")) for r in grid)
        raise TrackingLost(lost_message(uri, opts, finished))
    if stopped:  # Ctrl-C
        trials = [{"trial_id": (r.metrics or {}).get("trial_id"), "error": r.error} for r in grid]
        close_orphans(setup, trials)
        mlflow_client(uri).set_terminated(parent, "KILLED")
        raise SweepInterrupted(
            f"Sweep '{experiment}' interrupted after {grid.num_terminated} of {opts.trials} "
            f"trials. Continue it with: cicl tune ... --resume --experiment {experiment}"
        )
    return _finish(grid, setup, space, k_est, experiment, path, opts)


class SweepInterrupted(CICLError):
    """The sweep stopped early (Ctrl-C); its state is saved for ``--resume``."""


# Set while a sweep runs once a trial failed on the tracking server. Module state, not the
# callback's: a resumed Tuner runs the callbacks saved with the sweep (copies), not new ones.
LOST = threading.Event()


def tracking_watch():
    """A Tune callback that stops the sweep the first time a trial fails with
    ``TrackingLost`` (``LOST`` then says so). Every later trial would fail the same way, each
    after MLflow's timeouts and a retry; so Tune is stopped as Ctrl-C stops it: its state
    saved with the running and failed trials unfinished, which ``--resume`` runs again."""
    from ray import tune

    class TrackingWatch(tune.Callback):
        def on_trial_recover(self, iteration, trials, trial, **info) -> None:
            _on_trial_failure(trial)

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            _on_trial_failure(trial)

    return TrackingWatch()


def _on_trial_failure(trial) -> None:
    if not LOST.is_set() and _failed_on_tracking(trial):
        LOST.set()
        _stop_tune()


def _failed_on_tracking(trial) -> bool:
    """Whether the trial's latest failure (the last one in Tune's error file) was
    ``TrackingLost``."""
    try:
        text = Path(trial.error_file).read_text()
    except (TypeError, OSError):  # no error file
        return False
    return TrackingLost.__name__ in text.rpartition("Failure #")[2]


def _stop_tune() -> bool:
    """Stop the running ``Tuner.fit`` the way Ctrl-C does, through the handler Tune installs
    for SIGUSR1 while it runs (in the main thread): the loop ends, the state is saved, the
    trials are stopped. Returns False where no such handler is installed; the remaining
    trials then fail one by one and the sweep ends all the same."""
    import logging
    import signal

    handler = signal.getsignal(signal.SIGUSR1)
    if not callable(handler) or not getattr(handler, "__module__", "").startswith("ray.tune"):
        return False
    with quieted("ray.tune.tune", logging.ERROR):  # "Stop signal received (e.g. via SIGINT)"
        handler(signal.SIGUSR1, None)
    return True


def _experiment_name(sweeps: Path, hint: str, resume: bool) -> str:
    if resume:
        found = sorted(
            (p for p in sweeps.glob(f"{hint}-*") if (p / "tuner").exists()),
            key=lambda p: p.stat().st_mtime,
        )
        if not found:
            raise CICLError(f"No sweep of '{hint}' to resume under {sweeps}.")
        return found[-1].name
    return f"{hint}-{time.strftime('%Y%m%d-%H%M%S')}"


def _finish(
    grid, setup: SweepSetup, space: Space, k_est: int, experiment: str, path: Path, opts
) -> SweepResult:
    """Pick the best finished trial, close runs, log the sweep's summary and plots."""
    trials = []
    best = None
    for r in grid:
        m = r.metrics or {}
        rec = {
            "trial_id": m.get("trial_id"),
            "params": {k.removeprefix("config/"): v for k, v in (r.config or {}).items()},
            "objective": m.get("objective"),
            "ari": m.get("ari"),
            "nmi": m.get("nmi"),
            "finished": bool(m.get("final")),
            "trial_dir": m.get("trial_dir"),
            "error": str(r.error) if r.error else None,
        }
        trials.append(rec)
        if rec["finished"] and rec["objective"] is not None:
            if best is None or rec["objective"] > best["objective"]:
                best = rec
    client = mlflow_client(setup.mlflow_uri)
    close_orphans(setup, trials)
    if best is None:
        client.set_terminated(setup.parent_run_id, "FAILED")
        raise CICLError("No trial finished; see the Ray logs under " + str(path))
    tdir = Path(best["trial_dir"])
    labels, emb = np.load(tdir / "labels.npy"), np.load(tdir / "embedding.npy")
    shards = tdir / "shards"
    best_res = load_result(shards, labels, emb) if (shards / "meta.json").exists() else None
    best_cfg = trial_config(setup.base, space, best["params"])
    metrics = {f"best_{k}": best[k] for k in ("objective", "ari", "nmi") if best[k] is not None}
    metrics["trials_finished"] = float(sum(t["finished"] for t in trials))
    log_metrics(setup.mlflow_uri, setup.parent_run_id, metrics, 0)
    client.set_tag(setup.parent_run_id, "cicl.best_trial", str(best["trial_id"]))
    sweep_artifacts(setup, space, k_est, trials, best, path)
    client.set_terminated(setup.parent_run_id, "FINISHED")
    return SweepResult(
        experiment=experiment,
        experiment_id=setup.experiment_id,
        parent_run_id=setup.parent_run_id,
        mlflow_uri=setup.mlflow_uri,
        best_params=best["params"],
        best_metrics={
            k: v for k, v in best.items() if k in ("objective", "ari", "nmi") and v is not None
        },
        best_labels=labels,
        best_embedding=emb,
        best_config=best_cfg,
        best_result=best_res,
        trials=trials,
        path=str(path),
    )


def close_orphans(setup: SweepSetup, trials: list[dict]) -> int:
    """Leave no child run RUNNING and none that is not a trial of this sweep.

    The final fit of a streamed sweep (tag ``cicl.kind`` = ``FINAL_KIND``) is no trial: left
    as it is. Runs still RUNNING (a trial ASHA stopped, or one that errored) are closed:
    KILLED when stopped early, FAILED on error. A run whose trial Tune no longer knows is a trial the
    driver started after Tune last saved its state (Tune saves every 10 s or more) and then
    died; on ``--resume`` the searcher draws a new trial in its place, so that run would be a
    phantom next to the sweep's trials. Unfinished, it is deleted (MLflow's soft delete:
    ``mlflow runs restore`` brings it back); finished, its result is real and it stays, tagged
    ``cicl.lost``. Returns how many runs were deleted.
    """
    client = mlflow_client(setup.mlflow_uri)
    status = {t["trial_id"]: t for t in trials}
    deleted = 0
    for run in child_runs(client, setup.experiment_id, setup.parent_run_id):
        if run.data.tags.get("cicl.kind") == FINAL_KIND:  # the best config on the whole atlas
            continue
        t = status.get(run.data.tags.get("cicl.trial_id"))
        if t is None:
            client.set_tag(run.info.run_id, "cicl.lost", "true")
            if run.info.status != "FINISHED":
                client.set_terminated(run.info.run_id, "KILLED")
                client.delete_run(run.info.run_id)
                deleted += 1
        elif run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "FAILED" if t["error"] else "KILLED")
    if deleted:
        print(
            f"{deleted} trial run(s) the interrupted driver had started after Tune's last saved "
            "state were deleted from MLflow (Tune drew new trials in their place).",
            file=sys.stderr,
        )
    return deleted
