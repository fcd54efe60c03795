"""``cicl tune``: a sweep over a search space, the best trial written as the output."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from cicl.cli.fit import check_label_key
from cicl.cli.parser import int_at_least, parse_set
from cicl.config import load_config
from cicl.errors import CICLError


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
    adata = read_input(args.input)
    truth = None
    check_label_key(adata, args.label_key)
    plan = prepare(adata, base, args.layer)
    prep, base, k_est = plan.prep, plan.cfg, plan.k  # every trial's K is capped alike
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
    if out is not None:
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
        print(json.dumps(summary))
    return 0
