"""Command line: ``cicl fit``, ``cicl config``. ``main(argv) -> int``; user errors exit 2
with one line on stderr and no traceback."""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cicl.config import PRESETS, ConfigError, load_config
from cicl.errors import CICLError
from cicl.objective import OBJECTIVES

STREAM_MIN_CELLS = 200_000


LAYER_HELP = (
    "which matrix to read: 'auto' (default) reads X, or the raw counts a log-normalised "
    "object keeps in layers['counts'] (or a similar name) or .raw; 'X', 'raw' or a layer name "
    "pick one"
)
BATCH_HELP = (
    "obs column naming each cell's batch (sample/donor/run): HVGs within batches and "
    "scanpy's ComBat before scaling"
)


def _wants_stream(args: argparse.Namespace) -> bool:
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


def _parse_set(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got '{item}'.")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def _positive_int(name: str, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        k = int(value)
    except ValueError:
        raise CICLError(f"{name} must be an integer, got '{value}'.") from None
    if k < 2:
        raise CICLError(f"{name} must be >= 2, got {k}.")
    return k


class _Version(argparse.Action):
    """``--version``: cicl and the versions a bug report needs, read from the installed
    packages' metadata (nothing heavy is imported)."""

    def __init__(self, option_strings, dest, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        import platform
        from importlib.metadata import PackageNotFoundError, version

        from cicl import __version__

        parts = []
        for pkg in ("torch", "ray", "mlflow", "optuna", "scanpy", "anndata"):
            try:
                parts.append(f"{pkg} {version(pkg)}")
            except PackageNotFoundError:
                parts.append(f"{pkg} not installed")
        print(f"cicl {__version__} ({', '.join(parts)}; Python {platform.python_version()})")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cicl",
        description="Cluster single-cell RNA-seq data with CICL (cluster-aware iterative "
        "contrastive learning).",
    )
    p.add_argument(
        "--version",
        action=_Version,
        help="print cicl's version and its stack's (for bug reports) and exit",
    )
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fit", help="cluster one dataset and write the annotated .h5ad")
    f.add_argument("input", help=".h5ad, 10x .h5, .loom, .csv/.tsv or a 10x matrix folder")
    f.add_argument("--out", "-o", required=True, help="output .h5ad (never the input)")
    f.add_argument(
        "--n-clusters",
        "-k",
        default=None,
        help="number of clusters (default: estimated without labels)",
    )
    f.add_argument(
        "--label-key",
        default=None,
        help="obs column with known labels: ARI/NMI are reported, never used to choose",
    )
    f.add_argument("--seed", type=int, default=None)
    f.add_argument("--batch-key", default=None, help=BATCH_HELP)
    f.add_argument("--config", "-c", default=None, help="YAML config file")
    f.add_argument(
        "--preset",
        choices=PRESETS,
        default=None,
        help="'reference' reproduces the official code's behaviour",
    )
    f.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set loss.temperature=0.3",
    )
    f.add_argument("--layer", default="auto", help=LAYER_HELP)
    f.add_argument("--key-added", default="cicl")
    f.add_argument(
        "--plot",
        default=None,
        metavar="PNG",
        help="also write a figure: UMAP by cluster (and label) + training curves",
    )
    f.add_argument("--json", action="store_true", help="print one JSON line with the results")
    f.add_argument("--force", action="store_true", help="overwrite an existing output file")
    f.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    f.add_argument(
        "--mlflow",
        action="store_true",
        help="log the fit as an MLflow run (default store runs/mlflow.db, as `cicl tune`)",
    )
    f.add_argument("--mlflow-uri", default=None, help="MLflow store or server (implies --mlflow)")
    f.add_argument(
        "--experiment", default=None, help="MLflow experiment (default fit-<input name>)"
    )
    _add_ray_args(f)

    q = sub.add_parser(
        "predict",
        help="assign new cells to the clusters of a fitted .h5ad (no refitting)",
    )
    q.add_argument("input", help="new cells: .h5ad, 10x .h5, .loom, .csv/.tsv or a 10x folder")
    q.add_argument(
        "--reference", "-r", required=True, help="the .h5ad `cicl fit` wrote (its model)"
    )
    q.add_argument("--out", "-o", required=True, help="output .h5ad (never an input)")
    q.add_argument("--key", default="cicl", help="the reference's key (its --key-added)")
    q.add_argument("--key-added", default=None, help="where to write (default: --key)")
    q.add_argument(
        "--batch-key",
        default=None,
        help="obs column with the new cells' batches, for a batch-corrected reference "
        "(default: the reference's batch key)",
    )
    q.add_argument(
        "--label-key",
        default=None,
        help="obs column with known labels: ARI/NMI are reported, never used to choose",
    )
    q.add_argument("--layer", default="auto", help=LAYER_HELP)
    q.add_argument(
        "--stream",
        action="store_true",
        help=f"never load the .h5ad: read it block by block, write a copy with the results "
        f"(automatic above {STREAM_MIN_CELLS:,} cells)",
    )
    q.add_argument("--json", action="store_true", help="print one JSON line with the results")
    q.add_argument("--force", action="store_true", help="overwrite an existing output file")

    s = sub.add_parser(
        "simulate", help="write a synthetic atlas (per-cluster negative binomial) like a real one"
    )
    s.add_argument("--like", required=True, help="real .h5ad to fit (counts or log values)")
    s.add_argument("--cells", required=True, help="number of cells to generate")
    s.add_argument("--out", "-o", required=True, help="output .h5ad (CSR counts)")
    s.add_argument("--label-key", default="cell_type", help="obs column with the clusters")
    s.add_argument("--genes", type=int, default=2000, help="keep the N most variable genes")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true", help="overwrite an existing output file")
    s.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

    t = sub.add_parser(
        "tune", help="Ray Tune + Optuna sweep, every trial a Ray Train run, logged to MLflow"
    )
    t.add_argument("input", help="dataset (any format `cicl fit` reads)")
    t.add_argument("--trials", default="12", help="number of trials (default 12)")
    t.add_argument("--space", default="default", help="tune/NAME.yaml or a YAML path")
    t.add_argument(
        "--objective",
        default="auto",
        choices=list(OBJECTIVES),
        help="what Optuna maximises; auto = silhouette in PCA space (label-free)",
    )
    t.add_argument("--label-key", default=None, help="true labels: ARI/NMI logged, not used")
    t.add_argument("--mlflow-uri", default=None, help="default sqlite:///<abs>/runs/mlflow.db")
    t.add_argument("--experiment", default=None, help="MLflow experiment = sweep name")
    t.add_argument("--workers-per-trial", default="1", help="Ray Train workers per trial")
    t.add_argument("--gpus-per-worker", type=float, default=0.0)
    t.add_argument("--cpus-per-worker", type=float, default=None)
    t.add_argument("--concurrent", default="1", help="trials at a time")
    t.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    t.add_argument("--out", default=None, help="write the best labelling to this .h5ad")
    t.add_argument("--root", default="runs", help="folder for sweeps and the MLflow store")
    t.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    t.add_argument("--seed", type=int, default=0, help="Optuna sampler seed")
    t.add_argument("--no-asha", action="store_true", help="run every trial to the end")
    t.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    t.add_argument("--json", action="store_true", help="print one JSON line with the best")
    t.add_argument("--quiet", "-q", action="store_true", help="no progress bar over trials")
    t.add_argument(
        "--tune-tables", action="store_true", help="Ray Tune's own trial-status tables instead"
    )
    t.add_argument("--batch-key", default=None, help=BATCH_HELP)
    t.add_argument("--layer", default="auto", help=LAYER_HELP)
    t.add_argument("--config", "-c", default=None, help="base YAML config for every trial")
    t.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="base config override"
    )

    r = sub.add_parser("runs", help="compare the runs of a sweep (from MLflow)")
    r.add_argument("--experiment", default=None, help="default: the latest experiment")
    r.add_argument("--mlflow-uri", default=None, help="default sqlite:///<abs>/runs/mlflow.db")
    r.add_argument("--root", default="runs")
    r.add_argument("--sort", default=None, help="column to sort by (default objective)")

    c = sub.add_parser("config", help="show or validate configurations")
    c.add_argument("action", choices=["show", "validate"])
    c.add_argument("file", nargs="?", default=None)
    c.add_argument("--preset", choices=PRESETS, default=None)
    return p


def _add_ray_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray Train (distributed training)")
    g.add_argument(
        "--workers",
        default=None,
        help="train with N Ray Train workers (gloo on CPU, NCCL with GPUs); default: one process",
    )
    g.add_argument("--gpus-per-worker", type=float, default=0.0, metavar="G")
    g.add_argument("--cpus-per-worker", type=float, default=None, metavar="C")
    g.add_argument(
        "--address", default=None, help="Ray cluster address (default: start Ray locally)"
    )
    g.add_argument(
        "--run-dir",
        default=None,
        help="Ray storage for checkpoints (default ./runs/ray; shared storage on clusters)",
    )
    g.add_argument(
        "--run-name",
        default=None,
        help="name of the Ray run; re-running with the same name resumes from its checkpoint",
    )
    g.add_argument("--max-failures", type=int, default=2, help="worker-group restarts")
    g.add_argument(
        "--stream",
        action="store_true",
        help="read the .h5ad block by block instead of loading it (atlases larger than "
        f"memory; automatic above {STREAM_MIN_CELLS:,} cells)",
    )


def _ray_options(args: argparse.Namespace):
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
    if args.gpus_per_worker < 0:
        raise CICLError("--gpus-per-worker must be >= 0.")
    from cicl.distributed import RayOptions

    return RayOptions(
        workers=n,
        gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker,
        address=args.address,
        storage=args.run_dir,
        name=args.run_name,
        max_failures=args.max_failures,
    )


def cmd_fit(args: argparse.Namespace) -> int:
    from cicl.api import fit
    from cicl.data.io import check_output, read_input, write_h5ad_atomic
    from cicl.objective import truth_scores as score

    overrides = _parse_set(args.set)
    if args.preset:
        overrides = {"preset": args.preset, **overrides}
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.batch_key is not None:
        overrides["preprocess.batch_key"] = args.batch_key
    cfg = load_config(args.config, overrides)
    k = _positive_int("--n-clusters", args.n_clusters)
    ray_opts = _ray_options(args)
    out = check_output(args.input, args.out, args.force)
    if args.plot and not Path(args.plot).resolve().parent.is_dir():
        raise CICLError(f"Folder for --plot '{args.plot}' does not exist. Create it first.")
    track = None
    if args.mlflow or args.mlflow_uri:
        from cicl.tracking import resolve_mlflow_uri

        track = resolve_mlflow_uri(args.mlflow_uri, Path("runs").resolve())
    t0 = time.perf_counter()
    if _wants_stream(args):
        return _fit_stream(args, cfg, k, ray_opts, out, t0, track)
    adata = read_input(args.input)
    _check_label_key(adata, args.label_key)
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
    result = _result(adata.uns[args.key_added], adata.n_obs, adata.n_vars)
    if args.label_key is not None:
        result.update(score(adata.obs[args.key_added].to_numpy(), adata.obs[args.label_key]))
    write_h5ad_atomic(adata, out)
    if args.plot:
        from cicl.plotting import plot_fit

        result["plot"] = str(
            plot_fit(adata, args.plot, key=args.key_added, label_key=args.label_key)
        )
    result["seconds"] = round(time.perf_counter() - t0, 2)
    result["output"] = str(out)
    if track is not None:
        result["mlflow_run"] = _log_fit(args, track, adata, result, result.get("plot"))
    _summary(adata.obs, args.key_added, result)
    if args.json:
        print(json.dumps(result))
    return 0


def _open_on_disk(path: str, parts: tuple[str, ...] = ("obs", "var")):
    """The .h5ad's annotations only (``read_annotations``): its matrices stay on disk, read
    block by block by streamed fits and ``predict(..., file=path)``."""
    from cicl.data.io import read_annotations

    try:
        return read_annotations(path, parts)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets one clear line
        raise CICLError(f"cannot read '{path}' as .h5ad ({e}).") from None


def _check_label_key(adata, key: str | None) -> None:
    if key is None:
        return
    if key not in adata.obs:
        raise CICLError(
            f"--label-key '{key}' is not an obs column; "
            f"available: {', '.join(map(str, adata.obs.columns)) or 'none'}."
        )
    if adata.obs[key].isna().any():
        raise CICLError(f"--label-key '{key}' has missing values.")


def cmd_predict(args: argparse.Namespace) -> int:
    from cicl._keys import embedding_key
    from cicl.data.io import check_output, read_input, write_h5ad_atomic
    from cicl.objective import truth_scores as score
    from cicl.reference import ATYPICAL_PCT, load_reference, predict

    out = check_output(args.input, args.out, args.force)
    ref_path = Path(args.reference)
    if ref_path.exists() and out.exists() and out.resolve() == ref_path.resolve():
        raise CICLError("The output path is the reference file. Choose another --out path.")
    t0 = time.perf_counter()
    ref = load_reference(ref_path, args.key)  # checked before the (maybe large) input is read
    stream = _wants_stream(args)
    adata = _open_on_disk(args.input) if stream else read_input(args.input)
    _check_label_key(adata, args.label_key)
    key = args.key_added or args.key
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        predict(
            adata,
            ref,
            key=args.key,
            key_added=key,
            layer=args.layer,
            batch_key=args.batch_key,
            file=args.input if stream else None,
        )
    for w in caught:
        if issubclass(w.category, UserWarning):
            print(f"warning: {w.message}", file=sys.stderr)
    info = adata.uns[key]
    conf = adata.obs[key + "_confidence"].to_numpy()
    r: dict[str, Any] = {
        "n_cells": int(adata.n_obs),
        "n_genes": int(info["n_genes_input"]),
        "values": info["values"],
        "matrix": str(info["matrix"]),
        "n_genes_model": int(info["n_genes_model"]),
        "n_genes_missing": int(info["n_genes_missing"]),
        "n_clusters": int(info["n_clusters"]),
        "median_confidence": round(float(np.median(conf)), 4),
        "reference": str(ref_path),
    }
    if info["n_cells_uncorrected"]:
        r["n_cells_uncorrected"] = int(info["n_cells_uncorrected"])
    if "n_cells_atypical" in info:
        r["n_cells_atypical"] = int(info["n_cells_atypical"])
    if args.label_key is not None:
        r.update(score(adata.obs[key].to_numpy(), adata.obs[args.label_key]))
    if stream:  # a copy of the input file plus the results; X is never loaded
        from cicl.data.io import annotate_h5ad_copy

        cols = [c for c in adata.obs if c == key or c.startswith(key + "_")]
        emb = embedding_key(key)
        annotate_h5ad_copy(
            args.input,
            out,
            obs={c: adata.obs[c].values for c in cols},
            obsm={emb: adata.obsm[emb]},
            uns={key: adata.uns[key]},
            drop_obs=(key + "_dist_pct",),  # stale when this reference has no distance table
        )
        r["streamed"] = True
    else:
        write_h5ad_atomic(adata, out)
    r["seconds"] = round(time.perf_counter() - t0, 2)
    r["output"] = str(out)
    sizes = adata.obs[key].value_counts().sort_index()
    lines = [
        f"CICL predict: {r['n_cells']} cells x {r['n_genes']} genes ({r['values']}; "
        f"{r['n_genes_model'] - r['n_genes_missing']} of the reference's {r['n_genes_model']} "
        "genes present)",
        f"  assigned to the reference's {r['n_clusters']} clusters; sizes "
        f"{', '.join(f'{c}:{n}' for c, n in sizes.items())}",
        f"  median confidence {r['median_confidence']:.3f} (Student's t probability of the "
        f"assigned cluster); {r['seconds']:.1f} s",
    ]
    if "n_cells_atypical" in r:
        n_a = r["n_cells_atypical"]
        lines.append(
            f"  {n_a} cells ({100 * n_a / max(r['n_cells'], 1):.1f} %) lie farther from their "
            f"centroid than {ATYPICAL_PCT:.0f} % of the reference's cells of that cluster: "
            f"possibly states the reference lacks (obs['{key}_dist_pct'] > {ATYPICAL_PCT:.0f})"
        )
    if "ari" in r:
        lines.append(f"  vs labels (scored only): ARI {r['ari']:.3f}  NMI {r['nmi']:.3f}")
    extra = f"obs['{key}_dist_pct'], " if "n_cells_atypical" in r else ""
    lines.append(
        f"  wrote {out}: obs['{key}'], obs['{key}_confidence'], {extra}obsm['X_{key}'], "
        f"uns['{key}']"
    )
    print("\n".join(lines), file=sys.stderr)
    if args.json:
        print(json.dumps(r))
    return 0


def _log_fit(args, uri: str, adata, result: dict, figure: str | bool | None) -> dict[str, str]:
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


def _fit_stream(args, cfg, k, ray_opts, out: Path, t0: float, track: str | None = None) -> int:
    """``cicl fit --stream``: the atlas is never loaded; the output is a copy of the input
    file with the results added."""
    from cicl.api import fit_h5ad_stream
    from cicl.objective import truth_scores as score

    if args.plot:
        raise CICLError("--plot is not supported with --stream (an atlas UMAP is too slow).")
    obs = _open_on_disk(args.input, ("obs",)).obs
    if args.label_key is not None and args.label_key not in obs:
        raise CICLError(f"--label-key '{args.label_key}' is not an obs column.")
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
    result = {**_result(info, pre["n_cells"], pre["n_genes_input"]), "streamed": True}
    res = _open_on_disk(str(out), ("obs", "uns"))  # labels and record: not the atlas' embedding
    if args.label_key is not None:
        result.update(score(res.obs[args.key_added].to_numpy(), obs[args.label_key]))
    result["seconds"] = round(time.perf_counter() - t0, 2)
    result["output"] = str(out)
    if track is not None:
        result["mlflow_run"] = _log_fit(args, track, res, result, figure=False)  # no atlas UMAP
    _summary(res.obs, args.key_added, result)
    if args.json:
        print(json.dumps(result))
    return 0


def _result(info: dict, n_cells: int, n_genes: int) -> dict[str, Any]:
    """The summary/--json fields of a fit, from its ``uns`` entry."""
    return {
        "n_cells": int(n_cells),
        "n_genes": int(n_genes),
        "n_genes_used": int(info["preprocess"]["n_genes_used"]),
        **(
            {"n_batches": int(info["preprocess"]["n_batches"])}
            if "n_batches" in info["preprocess"]
            else {}
        ),
        "values": info["preprocess"]["values"],
        "matrix": str(info["preprocess"].get("matrix", "X")),
        "n_clusters": int(info["n_clusters"]),
        "n_clusters_source": info["n_clusters_source"],
        "epochs": int(info["epochs"]),
        "steps": int(info["steps"]),
        "workers": int(info["workers"]),
        "device": str(info.get("device", "cpu")),
        "threads": int(info["threads"]),  # torch threads per process (write_result records it)
        "decoder": str(info.get("decoder", "off")),
        **(
            {"pca_weight": float(info["pca_weight"]), "pca_weight_source": _weight_source(info)}
            if "pca_weight" in info
            else {}
        ),
        **_metric_fields(info),
        **({"silhouette_pca": float(info["silhouette_pca"])} if "silhouette_pca" in info else {}),
    }


def _metric_fields(info: dict) -> dict[str, Any]:
    """How the final partition assigns cells (``uns[key]["metric"]``), for --json/summary."""
    m = info.get("metric")
    if m is None:
        return {}
    if m["kind"] not in ("tied", "full"):
        return {"metric": str(m["kind"])}
    return {
        "metric": str(m["kind"]),
        "metric_shrinkage": float(m["shrinkage"]),
        "metric_iterations": int(m["iterations"]),
    }


def _weight_source(info: dict) -> str:
    """Whether the hybrid space's PCA weight was the user's or the cell-count rule's."""
    set_ = info.get("params", {}).get("cluster", {}).get("pca_weight", "none")
    return "by cell count" if set_ in (None, "none") else "as set"


def _summary(obs, key: str, r: dict[str, Any]) -> None:
    sizes = obs[key].value_counts().sort_index()
    lines = [
        f"CICL: {r['n_cells']} cells x {r['n_genes']} genes ({r['values']}"
        + (f" from {r['matrix']}" if r.get("matrix", "X") != "X" else "")
        + "; "
        f"{r['n_genes_used']} genes used"
        + (f"; ComBat over {r['n_batches']} batches" if r.get("n_batches", 1) > 1 else "")
        + ")",
        f"  clusters: {r['n_clusters']} ({r['n_clusters_source']}); "
        f"sizes {', '.join(f'{c}:{n}' for c, n in sizes.items())}",
        f"  training: {r['epochs']} epochs, {r['steps']} steps, {r['workers']} worker(s) on "
        f"{r['device']}"
        + (f", {r['threads']} threads each" if r["device"] == "cpu" else "")
        + "; "
        + (f"decoder {r['decoder']}; " if r.get("decoder", "off") != "off" else "")
        + f"total {r['seconds']:.1f} s",
    ]
    if "pca_weight" in r:
        lines.append(
            f"  clustering space: embedding + PCA block at weight {r['pca_weight']:.2f} "
            f"({r['pca_weight_source']}; "
            "`--set cluster.pca_weight=W` changes it)"
        )
    if r.get("metric") in ("tied", "full"):
        steps = f"{r['metric_iterations']} EM step{'' if r['metric_iterations'] == 1 else 's'}"
        lines.append(
            "  final partition: K-means, refined as a shared-covariance Gaussian mixture "
            + (
                f"(shrinkage {r['metric_shrinkage']:.2f}), then with a covariance per cluster "
                f"({steps}"
                if r["metric"] == "full"
                else f"(shrinkage {r['metric_shrinkage']:.2f}, {steps}"
            )
            + "; `--set cluster.metric=euclidean` keeps K-means')"
        )
    if "silhouette_pca" in r:
        lines.append(
            f"  label-free: silhouette {r['silhouette_pca']:.3f} in PCA space "
            "(the sweeps' objective; higher = better separated)"
        )
    if "ari" in r:
        lines.append(f"  vs labels (scored only): ARI {r['ari']:.3f}  NMI {r['nmi']:.3f}")
    lines.append(f"  wrote {r['output']}: obs['{key}'], obsm['X_{key}'], uns['{key}']")
    if "plot" in r:
        lines.append(f"  figure: {r['plot']}")
    if "mlflow_run" in r:
        m = r["mlflow_run"]
        lines.append(f"  MLflow: run {m['run_id']} in experiment '{m['experiment']}' ({m['uri']})")
    print("\n".join(lines), file=sys.stderr)


def cmd_simulate(args: argparse.Namespace) -> int:
    from cicl.data.io import check_output
    from cicl.data.simulate import simulate

    n = _positive_int("--cells", args.cells)
    if not Path(args.like).is_file():
        raise CICLError(f"--like '{args.like}' does not exist.")
    out = check_output(args.like, args.out, args.force)
    t0 = time.perf_counter()
    simulate(
        args.like,
        n,
        out,
        label_key=args.label_key,
        n_genes=args.genes,
        seed=args.seed,
        progress=not args.quiet and sys.stderr.isatty(),
    )
    print(
        f"wrote {out}: {n} cells, obs['cell_type'] = true cluster ({time.perf_counter() - t0:.1f} s)"
    )
    return 0


def _int_at_least(name: str, value: str, low: int) -> int:
    try:
        v = int(value)
    except ValueError:
        raise CICLError(f"{name} must be an integer, got '{value}'.") from None
    if v < low:
        raise CICLError(f"{name} must be >= {low}, got {v}.")
    return v


def cmd_tune(args: argparse.Namespace) -> int:
    from cicl.api import _choose_k, resolve_cap, write_result
    from cicl.data.io import check_matrix, check_output, read_input, write_h5ad_atomic
    from cicl.data.preprocess import choose_matrix, preprocess, record_matrix
    from cicl.reference import model_record, prep_record
    from cicl.sweep import SweepOptions, load_space, run_sweep
    from cicl.tracking import mlflow_ui_command, resolve_mlflow_uri, runs_table, short_param

    trials = _int_at_least("--trials", args.trials, 1)
    workers = _int_at_least("--workers-per-trial", args.workers_per_trial, 1)
    concurrent = _int_at_least("--concurrent", args.concurrent, 1)
    space = load_space(args.space)  # fail fast on a bad space file or config
    uri = resolve_mlflow_uri(args.mlflow_uri, Path(args.root).resolve())
    overrides = _parse_set(args.set)
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
    mat = choose_matrix(adata, args.layer)
    check_matrix(mat.source, mat.layer)
    truth = None
    _check_label_key(adata, args.label_key)
    if args.label_key is not None:
        truth = adata.obs[args.label_key].astype(str).to_numpy()
    keep_map = base.preprocess.batch_key is not None  # ComBat's map, for the stored model
    prep = preprocess(mat.source, base.preprocess, layer=mat.layer, keep_combat_map=keep_map)
    record_matrix(prep.info, mat)
    for w in prep.info.get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)
    if truth is not None:
        truth = truth[prep.cell_mask]
    k_est, source = _choose_k(base, prep.pcs)
    # every trial's K is capped alike
    base = resolve_cap(base, prep.pcs, k_est, estimated=base.cluster.n_clusters is None)
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
        f"K estimate {k_est} ({source}); {trials} trials, space '{args.space}', "
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
    table, _ = runs_table(res.mlflow_uri, res.experiment, None)
    print(table.to_string(index=False), file=sys.stderr)
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


def cmd_runs(args: argparse.Namespace) -> int:
    from cicl.tracking import mlflow_ui_command, resolve_mlflow_uri, runs_table

    uri = resolve_mlflow_uri(args.mlflow_uri, Path(args.root).resolve(), must_exist=True)
    table, exp = runs_table(uri, args.experiment, args.sort)
    print(f"experiment {exp}: {len(table)} run{'' if len(table) == 1 else 's'}")
    print(table.to_string(index=False) if len(table) else "(no runs)")
    print(f"\nopen them: {mlflow_ui_command(uri)}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    overrides = {"preset": args.preset} if args.preset else {}
    cfg = load_config(args.file, overrides)
    if args.action == "show":
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    else:
        print(f"{args.file or 'defaults'}: valid")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "fit":
            return cmd_fit(args)
        if args.command == "predict":
            return cmd_predict(args)
        if args.command == "simulate":
            return cmd_simulate(args)
        if args.command == "tune":
            return cmd_tune(args)
        if args.command == "runs":
            return cmd_runs(args)
        return cmd_config(args)
    except (CICLError, ConfigError) as exc:
        from cicl.sweep import SweepInterrupted

        if isinstance(exc, SweepInterrupted):
            print(f"interrupted: {exc}", file=sys.stderr)
            return 130
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
