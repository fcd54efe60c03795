"""What a sweep leaves in MLflow besides metrics: each trial's config, labels, checkpoint,
model (``reference.h5ad``) and figure; the sweep's trials table, best trial and Optuna's
parameter importances and parallel coordinates."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cicl.config import CICLConfig
from cicl.sweep.spaces import Space, k_range
from cicl.tracking import mlflow_client

if TYPE_CHECKING:
    from cicl.sweep.trial import SweepSetup


def trial_artifacts(
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


def sweep_artifacts(
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
        optuna_plots(space, k_est, setup.x.shape[0], trials, art)
    except Exception as exc:  # noqa: BLE001 - plots never fail a sweep
        (art / "plot_error.txt").write_text(f"{type(exc).__name__}: {exc}")
    mlflow_client(setup.mlflow_uri).log_artifacts(setup.parent_run_id, str(art))


def optuna_plots(space: Space, k_est: int, n: int, trials: list[dict], art: Path) -> None:
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
