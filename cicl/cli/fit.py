"""``cicl fit``: in memory, over Ray workers, or streamed from an atlas file."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from cicl.cli.parser import STREAM_MIN_CELLS, check_key_added, parse_set, positive_int
from cicl.cli.summary import json_line, print_summary, result_fields
from cicl.config import load_config
from cicl.errors import CICLError


def wants_stream(args: argparse.Namespace) -> bool:
    p = Path(args.input)
    if p.suffix.lower() != ".h5ad" or not p.is_file():
        if args.stream:
            raise CICLError("--stream reads .h5ad files only; convert the input first.")
        return False
    if args.stream:
        return True
    import h5py

    try:
        with h5py.File(p, "r") as f:
            shape = f["X"].attrs.get("shape", getattr(f["X"], "shape", (0,)))
        return int(shape[0]) > STREAM_MIN_CELLS
    except Exception:  # noqa: BLE001 - unreadable files get their error from the reader
        return False


def ray_options_from(args: argparse.Namespace):
    ray_flags = (args.gpus_per_worker, args.address, args.run_name, args.cpus_per_worker)
    if args.workers is None:
        if any(ray_flags):
            raise CICLError("--gpus-per-worker/--address/--run-name need --workers N.")
        return None
    try:
        n = int(args.workers)
    except ValueError:
        raise CICLError(f"--workers must be an integer, got '{args.workers}'.") from None
    if n < 1:
        raise CICLError(f"--workers must be >= 1, got {n}.")
    if args.cpus_per_worker is not None and args.cpus_per_worker <= 0:
        raise CICLError("--cpus-per-worker must be > 0.")
    if args.max_failures < 0:
        raise CICLError("--max-failures must be >= 0.")
    from cicl.data.io import check_folder
    from cicl.distributed import RayOptions

    if args.run_dir is not None:
        check_folder(args.run_dir, "--run-dir")

    return RayOptions(
        workers=n,
        gpus_per_worker="auto" if args.gpus_per_worker is None else args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker,
        address=args.address,
        storage=args.run_dir,
        name=args.run_name,
        max_failures=args.max_failures,
    )


def gpu_fields(device: str, ray_opts, train_device: str) -> dict:
    """The --json/summary fields of a fit that trained on the CPU while GPUs were there
    (``unused_gpus_note`` says why): how many (the Ray cluster's after the run, or torch's in
    one process), ``train.device`` and, under Ray, ``--gpus-per-worker`` as given."""
    if device != "cpu":
        return {}
    if ray_opts is None:
        import torch

        seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
    else:
        import ray

        seen = int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0
    if seen == 0:
        return {}
    out: dict = {"gpus_unused": seen, "train_device": train_device}
    if ray_opts is not None:
        out["gpus_per_worker"] = ray_opts.gpus_per_worker
    return out


def cmd_fit(args: argparse.Namespace) -> int:
    from cicl.api import fit
    from cicl.data.io import check_output, figure_formats, read_input, write_h5ad_atomic
    from cicl.objective import truth_scores as score

    overrides = parse_set(args.set)
    if args.preset:
        overrides = {"preset": args.preset, **overrides}
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.time_budget is not None:
        overrides["train.time_budget"] = args.time_budget
    if args.batch_key is not None:
        overrides["preprocess.batch_key"] = args.batch_key
    cfg = load_config(args.config, overrides)
    k = positive_int("--n-clusters", args.n_clusters)
    ray_opts = ray_options_from(args)
    check_key_added(
        args.key_added, ("--label-key", args.label_key), ("--batch-key", cfg.preprocess.batch_key)
    )
    out = check_output(args.input, args.out, args.force)
    if args.plot:
        check_output(
            (args.input, out), args.plot, args.force, suffixes=figure_formats(), flag="--plot"
        )
    track = None
    if args.mlflow or args.mlflow_uri:
        from cicl.tracking import resolve_mlflow_uri

        track = resolve_mlflow_uri(args.mlflow_uri, Path("runs").resolve())
    t0 = time.perf_counter()
    if wants_stream(args):
        return fit_stream(args, cfg, k, ray_opts, out, t0, track)
    adata = read_input(args.input)
    check_label_key(adata, args.label_key)
    with warnings.catch_warnings():  # preprocessing warnings are printed as one line each
        warnings.simplefilter("ignore")
        fit(
            adata,
            k,
            config=cfg,
            layer=args.layer,
            key_added=args.key_added,
            progress=not args.quiet and sys.stderr.isatty(),
            ray_options=ray_opts,
        )
    for w in adata.uns[args.key_added]["preprocess"].get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)
    result = result_fields(adata.uns[args.key_added], adata.n_obs, adata.n_vars)
    result.update(gpu_fields(result["device"], ray_opts, cfg.train.device))
    if args.label_key is not None:
        result.update(score(adata.obs[args.key_added].to_numpy(), adata.obs[args.label_key]))
    if args.plot:  # before the output: a figure that fails leaves nothing behind
        from cicl.plotting import plot_fit

        result["plot"] = str(
            plot_fit(adata, args.plot, key=args.key_added, label_key=args.label_key)
        )
    write_h5ad_atomic(adata, out)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    result["output"] = str(out)
    if track is not None:
        result["mlflow_run"] = log_fit_run(args, track, adata, result, result.get("plot"))
    print_summary(adata.obs, args.key_added, result)
    if args.json:
        print(json_line(result))
    return 0


def open_on_disk(path: str, parts: tuple[str, ...] = ("obs", "var"), *, check: bool = True):
    """The .h5ad's annotations only (``read_annotations``): its matrices stay on disk, read
    block by block by streamed fits and ``predict(..., file=path)``. ``check``: the whole
    file's layout first (``check_h5ad_layout``; off for the output this run wrote)."""
    from cicl.data.io import check_h5ad_layout, read_annotations

    try:
        if check:
            check_h5ad_layout(path)
        return read_annotations(path, parts)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets one clear line
        raise CICLError(f"cannot read '{path}' as .h5ad ({e}).") from None


def check_label_key(adata, key: str | None) -> None:
    if key is None:
        return
    if key not in adata.obs:
        raise CICLError(
            f"--label-key '{key}' is not an obs column; "
            f"available: {', '.join(map(str, adata.obs.columns)) or 'none'}."
        )
    if adata.obs[key].isna().any():
        raise CICLError(f"--label-key '{key}' has missing values.")


def log_fit_run(args, uri: str, adata, result: dict, figure: str | bool | None) -> dict[str, str]:
    """Log a finished fit to MLflow (after the output is written: tracking never costs the
    result); ``cicl.tracking.log_fit`` does the work, as it does for the Python API."""
    from cicl.tracking import log_fit

    stem = Path(args.input).stem
    source = str(Path(args.input).resolve())
    try:
        return log_fit(
            adata,
            args.key_added,
            uri=uri,
            experiment=args.experiment or f"fit-{stem}",
            run_name=f"fit-{stem}-seed{int(adata.uns[args.key_added]['params']['seed'])}",
            label_key=args.label_key,
            figure=figure,
            params={"input": source, "output": str(args.out)},
            metrics={"seconds": result["seconds"]},
            tags={"cicl.input": source},
        )
    except Exception as exc:  # noqa: BLE001 - MLflow/SQL/HTTP errors alike: one clear line
        raise CICLError(
            f"The result was written to {args.out}, but logging it to MLflow ({uri}) failed: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
            "Check the store or server and run again with another --out."
        ) from None


def fit_stream(args, cfg, k, ray_opts, out: Path, t0: float, track: str | None = None) -> int:
    """``cicl fit --stream``: the atlas is never loaded; the output is a copy of the input
    file with the results added."""
    from cicl.api import fit_h5ad_stream
    from cicl.objective import truth_scores as score

    if args.plot:
        raise CICLError("--plot is not supported with --stream (an atlas UMAP is too slow).")
    annotations = open_on_disk(args.input, ("obs",))
    check_label_key(annotations, args.label_key)
    obs = annotations.obs
    with warnings.catch_warnings():  # as in memory: preprocessing's warnings, one line each
        warnings.simplefilter("ignore")
        info = fit_h5ad_stream(
            args.input,
            out,
            k,
            config=cfg,
            ray_options=ray_opts,
            key_added=args.key_added,
            progress=not args.quiet and sys.stderr.isatty(),
            layer=args.layer,
        )
    pre = info["preprocess"]
    for w in pre.get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)
    result = {**result_fields(info, pre["n_cells"], pre["n_genes_input"]), "streamed": True}
    result.update(gpu_fields(result["device"], ray_opts, cfg.train.device))
    res = open_on_disk(str(out), ("obs", "uns"), check=False)  # not the atlas' embedding
    if args.label_key is not None:
        result.update(score(res.obs[args.key_added].to_numpy(), obs[args.label_key]))
    result["seconds"] = round(time.perf_counter() - t0, 2)
    result["output"] = str(out)
    if track is not None:
        result["mlflow_run"] = log_fit_run(args, track, res, result, figure=False)  # no atlas UMAP
    print_summary(res.obs, args.key_added, result)
    if args.json:
        print(json_line(result))
    return 0
