"""Ray Tune + Optuna sweeps over CICL, every trial a Ray Train run, all logged to MLflow.

Shape (the Ray 2.60 pattern): a Tune *function* trainable per trial builds a ``TorchTrainer``
(named after the trial, so a restarted trial resumes its own checkpoints) whose rank 0 reports
every reclustering round; ``TuneReportCallback`` forwards those reports to Tune, so ASHA can stop
weak trials at round boundaries and Optuna's TPE (seeded) learns from them. The trial then scores
its final labels, logs artifacts and reports the final objective.

MLflow: one experiment per sweep, a parent run for the sweep and one child run per trial, both
found again by tag on ``--resume`` (never created twice), written with ``MlflowClient`` and an
explicit run id (no global active run shared between trials).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cicl.config import CICLConfig
from cicl.errors import CICLError
from cicl.objective import SUPERVISED, resolve, score_labels, truth_scores
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

TUNE_DIR = Path(__file__).resolve().parents[1] / "tune"
AUG_KINDS = ("noise_std", "mask_frac", "neighbor_prob")  # the strength that turns each kind on
AUG_TYPES = {
    "noise": ("noise_std",),
    "mask": ("mask_frac",),
    "neighbor": ("neighbor_prob",),
    "noise+mask": ("noise_std", "mask_frac"),
    "all": AUG_KINDS,
}


# ---------------------------------------------------------------- search spaces


@dataclass(frozen=True)
class Space:
    """A search space: ``params`` (dotted config key -> distribution spec) and ``fixed``
    overrides applied to every trial."""

    name: str
    params: dict[str, dict]
    fixed: dict[str, Any] = field(default_factory=dict)


def load_space(spec: str | Path) -> Space:
    """``spec`` is a path to a YAML file or the name of one in ``tune/``."""
    p = Path(spec)
    if not p.suffix:
        p = TUNE_DIR / f"{spec}.yaml"
    if not p.is_file():
        known = ", ".join(sorted(f.stem for f in TUNE_DIR.glob("*.yaml")))
        raise CICLError(f"Search space '{spec}' not found. Give a YAML path or one of: {known}.")
    data = yaml.safe_load(p.read_text()) or {}
    params = data.get("params") or {}
    if not params:
        raise CICLError(f"Search space '{p}' has no 'params'.")
    probe = CICLConfig()
    for key, dist in params.items():
        if key != "augment.type":
            probe.with_overrides({key: _probe_value(dist)})  # unknown keys: "did you mean"
        if dist.get("type") not in ("loguniform", "uniform", "int", "choice", "k_around_estimate"):
            raise CICLError(f"{p}: '{key}' has unknown type '{dist.get('type')}'.")
    CICLConfig().with_overrides(data.get("fixed") or {})
    return Space(p.stem, params, data.get("fixed") or {})


def _probe_value(dist: dict) -> Any:
    t = dist.get("type")
    if t == "choice":
        return dist["values"][0]
    if t == "k_around_estimate":
        return 5
    return dist["low"]


def k_range(dist: dict, k_est: int, n_cells: int) -> tuple[int, int]:
    d = int(dist.get("delta", 4))
    return max(2, k_est - d), min(n_cells - 1, k_est + d)


def tune_space(space: Space, k_est: int, n_cells: int) -> dict[str, Any]:
    """Ray Tune param space (Optuna converts these distributions)."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, d in space.params.items():
        t = d["type"]
        if t == "loguniform":
            out[key] = tune.loguniform(float(d["low"]), float(d["high"]))
        elif t == "uniform":
            out[key] = tune.uniform(float(d["low"]), float(d["high"]))
        elif t == "int":
            out[key] = tune.randint(int(d["low"]), int(d["high"]) + 1)
        elif t == "choice":
            out[key] = tune.choice(list(d["values"]))
        else:
            lo, hi = k_range(d, k_est, n_cells)
            out[key] = tune.randint(lo, hi + 1)
    return out


def base_point(space: Space, base: CICLConfig, k_est: int, n_cells: int) -> dict[str, Any]:
    """The sweep's first trial: the base configuration itself (the default, unless the user
    gave a config), each value put inside the space's range. Without it a space whose ranges
    merely contain the default almost never samples it: on young_kidney none of 12 trials
    came near the default's ARI (the contrastive weights drawn from U(0, 1) are never 0)."""
    from cicl.train.loop import cluster_pca_weight

    cfg = base.with_overrides(space.fixed)
    flat = cfg.flat()
    point: dict[str, Any] = {}
    for key, d in space.params.items():
        t = d["type"]
        if key == "augment.type":
            on = tuple(k for k in AUG_KINDS if flat[f"augment.{k}"] > 0)
            names = [n for n, kinds in AUG_TYPES.items() if kinds == on]
            point[key] = names[0] if names and names[0] in d["values"] else d["values"][0]
            continue
        value = flat[key]
        if value is None and key == "cluster.n_clusters":
            value = k_est
        elif value is None and key == "cluster.pca_weight":
            value = cluster_pca_weight(cfg, n_cells)
        if t == "choice":
            point[key] = value if value in d["values"] else d["values"][0]
        elif t == "k_around_estimate":
            point[key] = k_est
        else:
            lo, hi = d["low"], d["high"]
            v = lo if value is None else min(max(value, lo), hi)
            point[key] = int(v) if t == "int" else float(v)
    return point


def trial_config(base: CICLConfig, space: Space, params: dict[str, Any]) -> CICLConfig:
    """The config of one trial: base + fixed + sampled params (``augment.type`` switches
    augmentation kinds off by zeroing their strength)."""
    over = dict(space.fixed)
    for key, v in params.items():
        if key == "augment.type":
            on = AUG_TYPES[v]
            for kind in AUG_KINDS:
                if kind not in on:
                    over[f"augment.{kind}"] = 0.0
        else:
            over[key] = v.item() if hasattr(v, "item") else v
    return base.with_overrides(over)


# ---------------------------------------------------------------- the trial


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
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    label_key: str | None
    plots: bool = True
    # the fitted preprocessing half of a stored model (``reference.prep_record``): with it,
    # each trial logs ``reference.h5ad``, so any trial's model maps new cells
    model_base: dict | None = None
    counts: np.ndarray | None = None  # raw counts for the negative binomial decoder


def _round_logger(uri: str, run_id: str):
    """A Ray Train callback that logs rank 0's per-round metrics to the trial's MLflow run.
    It runs in the Train controller, which Ray pins to the trial driver's node (the head on a
    cluster), so an MLflow server bound to the head's 127.0.0.1 is reachable."""
    from ray.train import UserCallback

    class MLflowRounds(UserCallback):
        def after_report(self, run_context, metrics, checkpoint) -> None:
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
    import ray
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from cicl.distributed import _collect, model_init, put_shards, shard_indices

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(setup.base, setup.space, config)
    k = int(cfg.cluster.n_clusters or 2)
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
    out_dir = trial_dir / "shards"
    out_dir.mkdir(parents=True, exist_ok=True)
    groups, pca_init = model_init(setup.x, setup.pcs, cfg)
    parts = shard_indices(setup.x.shape[0], setup.workers, cfg.seed)
    shards = put_shards(setup.x, setup.pcs, setup.counts, parts)
    truth_shards = None
    if setup.truth is not None:
        truth_shards = [setup.truth[p] for p in parts]
    loop_config = {
        "cfg": cfg,
        "k": k,
        "shards": shards,
        "groups": groups,
        "pca_init": pca_init,
        "out_dir": str(out_dir),
        "threads": max(1, int(setup.cpus_per_worker)),
        "objective": setup.objective,
        "truth": truth_shards,
        "fail_at_epoch": None,
        "marker": str(trial_dir / "failed_once"),
    }
    resources = {"CPU": setup.cpus_per_worker}
    if setup.gpus_per_worker:
        resources["GPU"] = setup.gpus_per_worker
    from cicl.distributed import _worker_loop, build_trainer

    trainer = build_trainer(
        _worker_loop,
        loop_config,
        workers=setup.workers,
        resources=resources,
        name=f"train-trial_id={trial_id}",
        storage=Path(setup.storage) / "train",
        keep=1,
        # MLflow first: a round ASHA stops the trial at is still in the trial's run
        callbacks=[_round_logger(setup.mlflow_uri, run_id), TuneReportCallback()],
    )
    result = trainer.fit()
    res = _collect(out_dir, parts, setup.x.shape[0])
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
    _trial_artifacts(setup, cfg, res, k, run_id, trial_dir, result)
    client.set_terminated(run_id, "FINISHED")
    ray.tune.report({**final, "final": 1.0, "trial_dir": str(trial_dir)})


def _trial_artifacts(
    setup: SweepSetup, cfg: CICLConfig, res, k: int, run_id: str, trial_dir: Path, result
) -> None:
    """Config, labels table, model checkpoint, the trial's model as ``reference.h5ad``,
    UMAP + curves figure."""
    import pandas as pd

    client = mlflow_client(setup.mlflow_uri)
    art = trial_dir / "artifacts"
    art.mkdir(exist_ok=True)
    cfg.to_yaml(art / "config.yaml")
    table = pd.DataFrame({"cell": np.arange(len(res.labels)), "cluster": res.labels})
    if setup.truth is not None:
        table[setup.label_key or "label"] = setup.truth
    table.to_csv(art / "labels.csv", index=False)
    if result is not None and result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            import shutil

            shutil.copy(Path(d) / "state.pt", art / "checkpoint.pt")
    if setup.model_base is not None and res.encoder_state:
        _write_reference(setup, cfg, res, k, art / "reference.h5ad")
    if setup.plots:
        try:
            _plot_trial(res, setup, art / "umap_curves.png")
        except Exception as exc:  # noqa: BLE001 - a figure must never fail a trial
            (art / "plot_error.txt").write_text(f"{type(exc).__name__}: {exc}")
    client.log_artifacts(run_id, str(art))


def _write_reference(setup: SweepSetup, cfg: CICLConfig, res, k: int, path: Path) -> None:
    """A cell-free reference for ``cicl predict``, as ``cicl.reference.reference_adata``
    writes for a fit: the config, centroids and the whole model (preprocessing + trained)."""
    import anndata as ad

    from cicl.api import model_uns
    from cicl.reference import fit_record

    uns = model_uns(cfg, k, "sweep trial", res.centroids)
    uns["model"] = {**setup.model_base, **fit_record(res, setup.pcs.shape[1])}
    ad.AnnData(uns={"cicl": uns}).write_h5ad(path)


def _plot_trial(res, setup: SweepSetup, path: Path) -> None:
    import anndata as ad
    import pandas as pd

    from cicl.plotting import plot_fit

    obs = pd.DataFrame({"cicl": pd.Categorical(res.labels.astype(str))})
    if setup.truth is not None:
        obs["label"] = pd.Categorical(np.asarray(setup.truth).astype(str))
    a = ad.AnnData(obs=obs)
    a.obsm["X_cicl"] = res.embedding
    a.uns["cicl"] = {"history": pd.DataFrame(res.history).to_dict(orient="list")}
    plot_fit(a, path, label_key="label" if setup.truth is not None else None)


# ---------------------------------------------------------------- the sweep


@dataclass(frozen=True)
class SweepOptions:
    trials: int = 12
    space: str = "default"
    objective: str = "auto"
    mlflow_uri: str | None = None
    experiment: str | None = None
    workers_per_trial: int = 1
    gpus_per_worker: float = 0.0
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
    its model as ``reference.h5ad``."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from cicl.distributed import ensure_ray

    objective = resolve(opts.objective)
    if objective in SUPERVISED and truth is None:
        raise CICLError(f"--objective {objective} needs --label-key.")
    space = load_space(opts.space)
    root = Path(opts.root).resolve()
    sweeps = root / "tune"
    sweeps.mkdir(parents=True, exist_ok=True)
    experiment = opts.experiment or _experiment_name(sweeps, name_hint, opts.resume)
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
    total = float(ray.cluster_resources().get("CPU", 2.0))
    driver_cpu = 0.5
    cpw = opts.cpus_per_worker or max(
        0.25,
        min(
            1.0, (total - driver_cpu * opts.concurrent) / (opts.concurrent * opts.workers_per_trial)
        ),
    )
    cpw = float(np.floor(cpw * 4) / 4) or 0.25
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
        workers=opts.workers_per_trial,
        cpus_per_worker=cpw,
        gpus_per_worker=opts.gpus_per_worker,
        label_key=label_key,
        plots=opts.plots,
        model_base=model_base,
        counts=counts,
    )
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, setup=setup), {"cpu": driver_cpu}
    )
    rounds = _max_rounds(base, space, x.shape[0])
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
    if opts.resume and tune.Tuner.can_restore(tuner_path):
        tuner = tune.Tuner.restore(
            tuner_path, trainable=trainable, resume_unfinished=True, resume_errored=True
        )
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
                callbacks=[_trial_bar(opts.trials)] if opts.progress else None,
            ),
        )
    # Tune prints its experiment box and results path to stdout whatever the verbosity: send
    # them to stderr with the rest of the progress output, so stdout holds only cicl's result
    # (less one raylet warning about fractional CPUs, see _DropNoise)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in memory"
    with contextlib.redirect_stdout(_DropNoise(sys.stderr)), _quiet_tune(not opts.tune_tables):
        grid = tuner.fit()
    if grid.num_terminated + grid.num_errors < opts.trials:  # Ctrl-C: Tune saved its state
        trials = [{"trial_id": (r.metrics or {}).get("trial_id"), "error": r.error} for r in grid]
        _close_orphans(setup, trials)
        mlflow_client(uri).set_terminated(parent, "KILLED")
        raise SweepInterrupted(
            f"Sweep '{experiment}' interrupted after {grid.num_terminated} of {opts.trials} "
            f"trials. Continue it with: cicl tune ... --resume --experiment {experiment}"
        )
    return _finish(grid, setup, space, k_est, experiment, path, opts)


class _DropNoise(io.TextIOBase):
    """The sweep's stdout, sent to ``sink`` (stderr) less one raylet warning: "N PYTHON worker
    processes have been started ... 4x the maximum expected startup concurrency". Ray prints it
    when tasks with fractional CPU requests start many worker processes; cicl requests
    fractional CPUs on purpose (trial drivers share cores with their workers), so on a small
    machine every sweep repeated it to the user, with nothing for them to do about it."""

    NOISE = ("maximum expected startup concurrency",)

    def __init__(self, sink) -> None:
        self.sink = sink
        self._dropped = False  # print() writes the line's "\n" separately: drop it too

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:  # what is asked of stdout is answered as the sink would
        return self.sink.isatty()

    def fileno(self) -> int:
        return self.sink.fileno()

    def write(self, s: str) -> int:
        if any(n in s for n in self.NOISE):
            self._dropped = not s.endswith("\n")
            return len(s)
        if self._dropped and s == "\n":
            self._dropped = False
            return len(s)
        self._dropped = False
        return self.sink.write(s)

    def flush(self) -> None:
        self.sink.flush()


@contextlib.contextmanager
def _quiet_tune(quiet: bool):
    """Without Tune's tables, Tune stays silent: its experiment box, "View detailed results
    here" and TensorBoard hint (printed by its new output engine at every verbosity; the
    legacy reporter it falls back to honours ``verbose=0``) and its closing INFO lines ("Wrote
    the latest version of all result files ...", "Total run time ..."). The trial bar and
    cicl's summary say what matters; ``--tune-tables`` brings Tune's own output back."""
    import logging

    log = logging.getLogger("ray.tune.tune")
    level, engine = log.level, os.environ.get("RAY_AIR_NEW_OUTPUT")
    if quiet:
        log.setLevel(logging.WARNING)
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # read by Tune when fit() starts
    try:
        yield
    finally:
        log.setLevel(level)
        os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        if engine is not None:
            os.environ["RAY_AIR_NEW_OUTPUT"] = engine


def _trial_bar(total: int):
    """A Tune callback drawing one progress bar over trials on the driver: finished trials
    (ASHA-stopped and errored ones count as done) and the best final objective. Replaces Tune's
    periodic status tables, which repeat every trial's parameters many times per sweep."""
    from ray import tune

    class TrialBar(tune.Callback):
        def __init__(self) -> None:
            self.bar = None
            self.best: float | None = None

        def setup(self, **info: Any) -> None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="trials", unit="trial", file=sys.stderr)

        def _done(self) -> None:
            if self.bar is not None:
                self.bar.update(1)

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            obj = (trial.last_result or {}).get("objective")  # the trial's final report
            if self.bar is not None and obj is not None and np.isfinite(obj):
                self.best = obj if self.best is None else max(self.best, obj)
                self.bar.set_postfix(best_objective=f"{self.best:.4f}")
            self._done()

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self._done()

        def on_experiment_end(self, trials, **info) -> None:
            if self.bar is not None:
                self.bar.close()

    return TrialBar()


class SweepInterrupted(CICLError):
    """The sweep stopped early (Ctrl-C); its state is saved for ``--resume``."""


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


def _max_rounds(cfg: CICLConfig, space: Space, n: int) -> int:
    """Reclustering rounds of the longest trial (ASHA's max_t): from the trials' config (the
    space's fixed values win over the base), or a trial would be stopped before its end."""
    from cicl.train.loop import auto_epochs

    cfg = cfg.with_overrides(space.fixed)
    b = space.params.get("train.batch_size")  # larger batches: fewer steps per epoch, more epochs
    sizes = b["values"] if b and b["type"] == "choice" else [int(b["high"])] if b else []
    epochs = cfg.train.epochs or max(
        auto_epochs(n, min(bs, n), cfg.train.auto_epochs, cfg.train.min_steps, cfg.train.max_steps)
        for bs in [cfg.train.batch_size, *sizes]
    )
    e = space.params.get("train.epochs")
    if e:
        epochs = max(e["values"]) if e["type"] == "choice" else int(e["high"])
    every = [cfg.cluster.recluster_every or 5]
    d = space.params.get("cluster.recluster_every")
    if d and d["type"] == "choice":
        every = [v for v in d["values"] if v]
    elif d:
        every = [int(d["low"])]
    return max(1, int(np.ceil(epochs / max(1, min(every)))))


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
    _close_orphans(setup, trials)
    if best is None:
        client.set_terminated(setup.parent_run_id, "FAILED")
        raise CICLError("No trial finished; see the Ray logs under " + str(path))
    tdir = Path(best["trial_dir"])
    labels, emb = np.load(tdir / "labels.npy"), np.load(tdir / "embedding.npy")
    from cicl.distributed import load_result

    shards = tdir / "shards"
    best_res = load_result(shards, labels, emb) if (shards / "meta.json").exists() else None
    best_cfg = trial_config(setup.base, space, best["params"])
    metrics = {f"best_{k}": best[k] for k in ("objective", "ari", "nmi") if best[k] is not None}
    metrics["trials_finished"] = float(sum(t["finished"] for t in trials))
    log_metrics(setup.mlflow_uri, setup.parent_run_id, metrics, 0)
    client.set_tag(setup.parent_run_id, "cicl.best_trial", str(best["trial_id"]))
    _sweep_artifacts(setup, space, k_est, trials, best, path)
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


def _close_orphans(setup: SweepSetup, trials: list[dict]) -> int:
    """Leave no child run RUNNING and none that is not a trial of this sweep.

    Runs still RUNNING (a trial ASHA stopped, or one that errored) are closed: KILLED when
    stopped early, FAILED on error. A run whose trial Tune no longer knows is a trial the
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


def _sweep_artifacts(
    setup: SweepSetup, space: Space, k_est: int, trials: list[dict], best: dict, path: Path
) -> None:
    """Trials table, best trial, Optuna parameter importances and parallel coordinates."""
    import pandas as pd

    art = path / "sweep_artifacts"
    art.mkdir(exist_ok=True)
    rows = [
        {
            **{f"param.{k}": v for k, v in t["params"].items()},
            **{k: v for k, v in t.items() if k != "params"},
        }
        for t in trials
    ]
    pd.DataFrame(rows).to_csv(art / "trials.csv", index=False)
    (art / "best_trial.json").write_text(json.dumps(best, default=str, indent=1))
    try:
        _optuna_plots(space, k_est, setup.x.shape[0], trials, art)
    except Exception as exc:  # noqa: BLE001 - plots never fail a sweep
        (art / "plot_error.txt").write_text(f"{type(exc).__name__}: {exc}")
    mlflow_client(setup.mlflow_uri).log_artifacts(setup.parent_run_id, str(art))


def _optuna_plots(space: Space, k_est: int, n: int, trials: list[dict], art: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    dists = {}
    for key, d in space.params.items():
        t = d["type"]
        if t in ("loguniform", "uniform"):
            dists[key] = FloatDistribution(float(d["low"]), float(d["high"]), log=t == "loguniform")
        elif t == "int":
            dists[key] = IntDistribution(int(d["low"]), int(d["high"]))
        elif t == "choice":
            dists[key] = CategoricalDistribution(list(d["values"]))
        else:
            lo, hi = k_range(d, k_est, n)
            dists[key] = IntDistribution(lo, hi)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    for t in trials:
        if t["finished"] and t["objective"] is not None:
            params = {
                k: (v.item() if hasattr(v, "item") else v)
                for k, v in t["params"].items()
                if k in dists
            }
            study.add_trial(
                optuna.trial.create_trial(
                    params=params, distributions=dists, value=float(t["objective"])
                )
            )
    if len(study.trials) < 2:
        return
    imp = optuna.importance.get_param_importances(study)
    (art / "param_importance.json").write_text(json.dumps(imp, indent=1))
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(imp) + 1.5))
    ax.barh(list(imp)[::-1], list(imp.values())[::-1])
    ax.set_xlabel("importance for the objective (fANOVA)")
    ax.set_title("Optuna parameter importance")
    fig.tight_layout()
    fig.savefig(art / "param_importance.png", dpi=110)
    plt.close(fig)
    from optuna.visualization.matplotlib import plot_parallel_coordinate

    with warnings.catch_warnings():  # "experimental" and constant-axis warnings: not for users
        warnings.simplefilter("ignore")
        ax = plot_parallel_coordinate(study)
    ax.figure.set_size_inches(10, 5)
    ax.figure.tight_layout()
    ax.figure.savefig(art / "parallel_coordinates.png", dpi=110)
    plt.close(ax.figure)
