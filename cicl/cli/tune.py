"""``cicl tune``: a sweep over a search space, the best trial written as the output.

An atlas (``--stream``, or more cells than ``STREAM_MIN_CELLS``) is never loaded: the trials
run in memory on a random sample of its cells (``cicl.data.sample``), then the best
configuration is fitted on every cell, streamed (``fit_h5ad_stream``), into ``--out``, and
logged as its own run under the sweep's parent run.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import numpy as np

from cicl.cli.fit import check_label_key, wants_stream
from cicl.cli.parser import int_at_least, parse_set
from cicl.cli.summary import json_line
from cicl.config import load_config
from cicl.errors import CICLError

SAMPLE_CELLS = 50_000  # --sample-cells default (see its help)


def cmd_tune(args: argparse.Namespace) -> int:
    from cicl.api import write_result
    from cicl.data.io import check_folder, check_output, read_input, write_h5ad_atomic
    from cicl.pipeline import prepare
    from cicl.reference import model_record, prep_record
    from cicl.sweep import SweepOptions, load_space, run_sweep
    from cicl.tracking import mlflow_ui_command, resolve_mlflow_uri, runs_table, short_param

    trials = int_at_least("--trials", args.trials, 1)
    workers = int_at_least("--workers-per-trial", args.workers_per_trial, 1)
    concurrent = int_at_least("--concurrent", args.concurrent, 1)
    stream = wants_stream(args)
    n_sample = int_at_least("--sample-cells", args.sample_cells or str(SAMPLE_CELLS), 10)
    final_workers = int_at_least("--final-workers", args.final_workers or str(workers), 1)
    if not stream and (args.sample_cells or args.final_workers):
        print(
            "warning: --sample-cells and --final-workers apply to streamed inputs only "
            "(--stream): this input is read whole",
            file=sys.stderr,
        )
    space = load_space(args.space)  # fail fast on a bad space file or config
    check_folder(args.root, "--root")
    uri = resolve_mlflow_uri(args.mlflow_uri, Path(args.root).resolve())
    overrides = parse_set(args.set)
    for key, value in overrides.items():  # the space decides these for every trial
        if key in space.params:
            print(
                f"warning: --set {key}={value} is ignored: space '{space.name}' searches {key}",
                file=sys.stderr,
            )
        elif key in space.fixed and space.fixed[key] != value:
            print(
                f"warning: --set {key}={value} is ignored: space '{space.name}' fixes "
                f"{key}: {space.fixed[key]} (edit the space file to change it)",
                file=sys.stderr,
            )
    if args.batch_key is not None:
        overrides["preprocess.batch_key"] = args.batch_key
    base = load_config(args.config, overrides)
    out = check_output(args.input, args.out, args.force) if args.out else None
    if args.objective in ("ari", "nmi") and args.label_key is None:
        raise CICLError(f"--objective {args.objective} optimises against labels: give --label-key.")
    t0 = time.perf_counter()
    sample = None
    if stream:
        sample = read_file_sample(args.input, n_sample, base, args.layer, args.label_key)
        adata = sample.adata
    else:
        adata = read_input(args.input)
    truth = None
    check_label_key(adata, args.label_key)
    plan = prepare(adata, base, "X" if stream else args.layer)  # the sample's X: its matrix
    prep, base, k_est = plan.prep, plan.cfg, plan.k  # every trial's K is capped alike
    if sample is not None:
        note_sample(prep.info, sample)
    for w in prep.info.get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)
    if args.label_key is not None:
        truth = adata.obs[args.label_key].astype(str).to_numpy()[prep.cell_mask]
    opts = SweepOptions(
        trials=trials,
        space=args.space,
        objective=args.objective,
        mlflow_uri=uri,
        experiment=args.experiment,
        workers_per_trial=workers,
        gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker,
        concurrent=concurrent,
        resume=args.resume,
        root=args.root,
        address=args.address,
        seed=args.seed,
        asha=not args.no_asha,
        progress=not (args.quiet or args.tune_tables),
        tune_tables=args.tune_tables,
    )
    print(
        f"K estimate {k_est} ({plan.source}); {trials} trials, space '{args.space}', "
        f"objective {args.objective}",
        file=sys.stderr,
    )
    res = run_sweep(
        prep.x,
        prep.pcs,
        k_est,
        base,
        opts,
        truth=truth,
        label_key=args.label_key,
        name_hint=Path(args.input).stem,
        model_base=prep_record(prep, base.preprocess.max_value),
        counts=prep.counts,
    )
    summary = {
        "experiment": res.experiment,
        "best_params": {
            k: (v.item() if hasattr(v, "item") else v) for k, v in res.best_params.items()
        },
        **{f"best_{k}": v for k, v in res.best_metrics.items()},
        "trials": len(res.trials),
        "mlflow_uri": res.mlflow_uri,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if sample is not None:
        summary.update(n_cells=sample.n_obs, sample_cells=len(sample.rows))
        log_sample(res, sample)
        if out is None:
            print(
                "note: no --out, so the best configuration was not fitted on every cell "
                "(give --out, or run `cicl fit --stream` with the best trial's config.yaml)",
                file=sys.stderr,
            )
    if out is not None and sample is not None:
        summary["final"] = fit_final(args, res, out, final_workers, prep, sample)
        summary["output"] = str(out)
    elif out is not None:
        from cicl.train.loop import TrainResult

        k = int(res.best_config.cluster.n_clusters or len(np.unique(res.best_labels)))
        tr = res.best_result or TrainResult(
            res.best_embedding, res.best_labels, np.zeros((0, 0), np.float32)
        )
        # the best trial's model makes the output a reference for `cicl predict`
        model = model_record(tr, prep, base.preprocess.max_value) if tr.encoder_state else None
        write_result(
            adata,
            tr,
            res.best_config,
            prep.info,
            k,
            f"sweep {res.experiment}",
            "cicl",
            0.0,
            cell_mask=prep.cell_mask,
            model=model,
        )
        write_h5ad_atomic(adata, out)
        summary["output"] = str(out)
    try:  # after the output: a tracking server gone now costs the table, not the result
        table, _ = runs_table(res.mlflow_uri, res.experiment, None)
        print(table.to_string(index=False), file=sys.stderr)
    except Exception:  # noqa: BLE001 - any MLflow/HTTP error: one line
        print(f"warning: could not list the runs at {res.mlflow_uri}", file=sys.stderr)
    print(
        "best: "
        + ", ".join(f"{k}={short_param(v)}" for k, v in summary["best_params"].items())
        + f"; objective {res.best_metrics.get('objective'):.4f}"
        + (
            f", ARI {res.best_metrics['ari']:.3f} (scored only)"
            if "ari" in res.best_metrics
            else ""
        ),
        file=sys.stderr,
    )
    print(f"compare in MLflow: {mlflow_ui_command(res.mlflow_uri)}", file=sys.stderr)
    if args.json:
        print(json_line(summary))
    return 0


def read_file_sample(path: str, n: int, cfg, layer: str, label_key: str | None):
    """``n`` random cells of the ``.h5ad`` at ``path`` (seeded by the config's seed), with the
    label column (scored only) and the batch column (preprocessing) of those cells."""
    import h5py

    from cicl.data.sample import obs_columns, read_sample
    from cicl.errors import InputError

    batch_key = cfg.preprocess.batch_key
    try:
        with h5py.File(path, "r") as f:
            columns = obs_columns(f)
            if label_key is not None and label_key not in columns:
                raise CICLError(
                    f"--label-key '{label_key}' is not an obs column; "
                    f"available: {', '.join(columns) or 'none'}."
                )
            if batch_key is not None and batch_key not in columns:
                raise InputError(
                    f"batch_key '{batch_key}' is not an obs column; "
                    f"available: {', '.join(columns) or 'none'}."
                )
            keys = (label_key,) if label_key is not None else ()
            return read_sample(f, n, cfg.seed, layer=layer, obs_keys=keys, batch_key=batch_key)
    except CICLError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file gets one clear line
        raise CICLError(f"cannot read '{path}' as .h5ad ({e}).") from None


def note_sample(info: dict, sample) -> None:
    """Record which matrix the sample was read from (its X in memory) and that it is one."""
    from cicl.data.preprocess import record_matrix

    record_matrix(info, sample.matrix)
    info["steps"].insert(
        0, f"a random sample of {len(sample.rows)} of {sample.n_obs} cells (--sample-cells)"
    )
    print(
        f"trials run on a random sample of {len(sample.rows)} of {sample.n_obs} cells",
        file=sys.stderr,
    )


def log_sample(res, sample) -> None:
    """The file's and the sample's cell counts, as params of the sweep's parent run."""
    from cicl.tracking import log_params

    try:
        log_params(
            res.mlflow_uri,
            res.parent_run_id,
            {"input_cells": sample.n_obs, "sample_cells": len(sample.rows)},
        )
    except Exception:  # noqa: BLE001 - a resumed sweep with another sample keeps the first
        print("warning: could not log the sample's size to the sweep's run", file=sys.stderr)


def fit_final(args, res, out: Path, workers: int, prep, sample) -> dict:
    """The best configuration (its K) fitted on every cell of the file, streamed over
    ``workers`` Ray Train workers, into ``out``; logged as its own run under the sweep's
    parent run. Metrics: K, seconds, the label-free silhouette in the sweep's PCA space on
    the sample's cells (the trials' objective, comparable with theirs), and with
    ``--label-key`` ARI/NMI over every labelled cell (scored only)."""
    import warnings

    import h5py
    import pandas as pd

    from cicl.api import fit_h5ad_stream
    from cicl.data.sample import read_obs_column
    from cicl.distributed import RayOptions
    from cicl.objective import resolve, score_labels, truth_scores

    k = int(res.best_config.cluster.n_clusters or len(np.unique(res.best_labels)))
    cfg = res.best_config.with_overrides({"cluster.n_clusters": k})
    opts = RayOptions(
        workers=workers,
        gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker,
        address=args.address,
        storage=str(Path(args.root).resolve() / "ray"),
    )
    print(f"fitting the best configuration on all {sample.n_obs} cells (streamed)", file=sys.stderr)
    t0 = time.perf_counter()
    # Ray Train's progress lines go with the rest of the progress, stdout keeps the result
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        uns = fit_h5ad_stream(
            args.input,
            out,
            config=cfg,
            ray_options=opts,
            progress=not args.quiet and sys.stderr.isatty(),
            layer=args.layer,
        )
    seconds = time.perf_counter() - t0
    with h5py.File(out, "r") as f:
        labels = np.asarray(read_obs_column(f, "cicl").codes)
    on_sample = labels[sample.rows][prep.cell_mask]  # the sweep's cells, as its PCs hold them
    final = {
        "n_clusters": float(k),
        "seconds": seconds,
        "silhouette_pca": score_labels("silhouette_pca", on_sample, prep.pcs),
    }
    objective = resolve(args.objective)
    if objective in ("silhouette_pca", "calinski_pca"):  # same space and cells as the trials'
        final["objective"] = score_labels(objective, on_sample, prep.pcs)
    if args.label_key is not None:
        with h5py.File(args.input, "r") as f:
            truth = np.asarray(read_obs_column(f, args.label_key), dtype=object)
        known = ~pd.isna(truth)
        final.update(truth_scores(labels[known], truth[known]))
        if objective in ("ari", "nmi"):
            final["objective"] = final[objective]
    pre = uns["preprocess"]
    print(f"final fit: {k} clusters on {sample.n_obs} cells in {seconds:.1f} s", file=sys.stderr)
    run_id = log_final(args, res, cfg, uns, final, workers, sample, out)
    return {
        **{k_: round(v, 4) for k_, v in final.items()},
        "n_clusters": k,
        "matrix": pre.get("matrix"),
        "mlflow_run": run_id,
    }


def log_final(args, res, cfg, uns: dict, final: dict, workers: int, sample, out: Path) -> str:
    """The final fit as a run under the sweep's parent run (after its output is written:
    tracking never costs the result)."""
    import tempfile

    import pandas as pd

    from cicl.sweep.tuner import FINAL_KIND
    from cicl.tracking import log_child_run

    source = str(Path(args.input).resolve())
    pre = uns["preprocess"]
    params = {
        **cfg.flat(),
        "input": source,
        "output": str(out),
        "workers": workers,
        "n_cells": sample.n_obs,
        "sample_cells": len(sample.rows),
        "n_clusters_source": uns["n_clusters_source"],
        "values": pre["values"],
        "matrix": str(pre.get("matrix", "X")),
        "n_genes_used": int(pre["n_genes_used"]),
        # the best trial's searched values: `cicl runs` shows them beside the trials'
        **{f"search.{k}": v for k, v in res.best_params.items()},
    }
    hist = uns.get("history") or {}
    history = pd.DataFrame(dict(hist)).to_dict(orient="records") if len(hist) else []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "config.yaml"
            cfg.to_yaml(config)
            return log_child_run(
                res.mlflow_uri,
                res.experiment_id,
                res.parent_run_id,
                f"final-{res.experiment}",
                params=params,
                history=history,
                final=final,
                files=[config],
                tags={"cicl.kind": FINAL_KIND, "cicl.input": source, "cicl.streamed": "true"},
            )
    except Exception as exc:  # noqa: BLE001 - MLflow/SQL/HTTP errors alike: one clear line
        raise CICLError(
            f"The result was written to {out}, but logging it to MLflow ({res.mlflow_uri}) "
            f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}."
        ) from None
