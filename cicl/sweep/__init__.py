"""Ray Tune + Optuna sweeps over CICL, every trial a Ray Train run, all logged to MLflow.

Shape (the Ray 2.60 pattern): a Tune *function* trainable per trial builds a ``TorchTrainer``
(named after the trial, so a restarted trial resumes its own checkpoints) whose rank 0 reports
every reclustering round; ``TuneReportCallback`` forwards those reports to Tune, so ASHA can stop
weak trials at round boundaries and Optuna's TPE (seeded) learns from them. The trial then scores
its final labels, logs artifacts and reports the final objective.

MLflow: one experiment per sweep, a parent run for the sweep and one child run per trial, both
found again by tag on ``--resume`` (never created twice), written with ``MlflowClient`` and an
explicit run id (no global active run shared between trials).

Modules: ``spaces`` (search spaces), ``trial`` (one trial), ``artifacts`` (what trials and the
sweep log to MLflow besides metrics), ``console`` (progress and quiet output), ``tuner`` (the
sweep).
"""

from cicl.sweep.spaces import (
    AUG_KINDS,
    AUG_TYPES,
    TUNE_DIR,
    Space,
    base_point,
    builtin_spaces,
    k_range,
    load_space,
    max_rounds,
    spaces_dir,
    trial_config,
    tune_space,
)
from cicl.sweep.trial import (
    SweepSetup,
    TrackingLost,
    finished_result,
    run_trial,
    server_gone,
    tracking_guard,
)
from cicl.sweep.tuner import (
    SweepInterrupted,
    SweepOptions,
    SweepResult,
    close_orphans,
    run_sweep,
)

__all__ = [
    "AUG_KINDS",
    "AUG_TYPES",
    "TUNE_DIR",
    "Space",
    "SweepInterrupted",
    "SweepOptions",
    "SweepResult",
    "SweepSetup",
    "TrackingLost",
    "base_point",
    "builtin_spaces",
    "close_orphans",
    "finished_result",
    "k_range",
    "load_space",
    "max_rounds",
    "run_sweep",
    "run_trial",
    "server_gone",
    "spaces_dir",
    "trial_config",
    "tracking_guard",
    "tune_space",
]
