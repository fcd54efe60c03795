"""The command line's arguments: ``build_parser`` and the checks of option values."""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

import yaml

from cicl.config import PRESETS, ConfigError
from cicl.errors import CICLError
from cicl.objective import OBJECTIVES

STREAM_MIN_CELLS = 200_000  # larger .h5ad files are streamed without --stream

LAYER_HELP = (
    "which matrix to read: 'auto' (default) reads X, or the raw counts a log-normalised "
    "object keeps in layers['counts'] (or a similar name) or .raw; 'X', 'raw' or a layer name "
    "pick one"
)


BATCH_HELP = (
    "obs column naming each cell's batch (sample/donor/run): HVGs within batches and "
    "scanpy's ComBat before scaling"
)


def parse_set(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got '{item}'.")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError:
            raise ConfigError(
                f"--set {item}: the value is not valid YAML (quote a string, e.g. "
                f"{k.strip()}='\"{v}\"')."
            ) from None
    return out


def check_key_added(key: str, *others: tuple[str, str | None]) -> str:
    """``--key-added`` names obs/obsm/uns entries: not empty, no '/' (h5ad groups), and not a
    column the run reads (``others``: (flag, value) pairs such as ``--label-key``), which the
    result would replace."""
    if not key or "/" in key or key != key.strip() or not key.isprintable():
        raise CICLError(
            f"--key-added {key!r} is not a usable name: give a non-empty name without '/', "
            "control characters or surrounding spaces."
        )
    for flag, value in others:
        if value is not None and value == key:
            raise CICLError(
                f"--key-added '{key}' is also {flag}: the result would replace that column. "
                "Choose another --key-added."
            )
    return key


def positive_int(name: str, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        k = int(value)
    except ValueError:
        raise CICLError(f"{name} must be an integer, got '{value}'.") from None
    if k < 2:
        raise CICLError(f"{name} must be >= 2, got {k}.")
    return k


def int_at_least(name: str, value: str, low: int) -> int:
    try:
        v = int(value)
    except ValueError:
        raise CICLError(f"{name} must be an integer, got '{value}'.") from None
    if v < low:
        raise CICLError(f"{name} must be >= {low}, got {v}.")
    return v


GPUS_HELP = (
    "GPUs each worker reserves: 'auto' (default) one each when the Ray cluster has a GPU for "
    "every worker, else none; or a number (0: train on the CPUs)"
)


def gpus_per_worker(value: str) -> float | str:
    """``--gpus-per-worker``: ``auto`` or a finite number >= 0 (argparse refuses anything
    else in one line)."""
    if value.strip().lower() == "auto":
        return "auto"
    try:
        g = float(value)
    except ValueError:
        g = float("nan")
    if not (g >= 0 and g != float("inf")):
        raise argparse.ArgumentTypeError(f"must be 'auto' or a number >= 0, got '{value}'")
    return g


class _Parser(argparse.ArgumentParser):
    """argparse's own refusals (a bad choice, a missing or unknown option) as every other
    refusal: one ``error: ...`` line and exit 2, instead of the usage block first."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see `{self.prog} -h`).\n")


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
    p = _Parser(
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
    f.add_argument(
        "--time-budget",
        default=None,
        metavar="SECONDS",
        help="stop training after this many seconds, then partition as at the schedule's "
        "end (train.time_budget; default: the schedule, at least one pass over every cell)",
    )
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
        "simulate",
        help="write a synthetic atlas like a real one (fitted negative binomial, or resampled "
        "real cells)",
    )
    s.add_argument("--like", required=True, help="real .h5ad to fit (counts or log values)")
    s.add_argument("--cells", required=True, help="number of cells to generate")
    s.add_argument("--out", "-o", required=True, help="output .h5ad (CSR counts)")
    s.add_argument("--label-key", default="cell_type", help="obs column with the clusters")
    s.add_argument("--genes", type=int, default=2000, help="keep the N most variable genes")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--mode",
        default="nb",
        help="nb (default): a fitted per-type negative binomial; resample: real cells of the "
        "type, binomially thinned (keeps each type's real structure); mix: two real cells of "
        "the type, thinned and summed (no copies of one cell when scaling far up)",
    )
    s.add_argument(
        "--proportions",
        default="real",
        help="type frequencies: real (default, as in --like), equal, or zipf (long tail, "
        "rarest type 0.2%% of cells)",
    )
    s.add_argument(
        "--order",
        default="shuffled",
        help="row order: shuffled (default) or sorted by type (by batch then type with "
        "--batch-key), as real atlases are stored",
    )
    s.add_argument(
        "--batch-key",
        default=None,
        help="obs column of --like: each cell's batch kept in the atlas (and sorted on)",
    )
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
    t.add_argument("--gpus-per-worker", type=gpus_per_worker, default="auto", help=GPUS_HELP)
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
    a = t.add_argument_group("atlases (files larger than memory)")
    a.add_argument(
        "--stream",
        action="store_true",
        help="never load the .h5ad: trials run on a random sample of --sample-cells cells read "
        "from it, then the best configuration is fitted on every cell, streamed, into --out "
        f"(automatic above {STREAM_MIN_CELLS:,} cells)",
    )
    a.add_argument(
        "--sample-cells",
        default=None,
        metavar="N",
        help="cells the trials run on with --stream (default 50,000: a cell type of 0.1%% "
        "still has ~50 cells in it, and K's Leiden estimate, the K cap and the exact PCA stay "
        "within their in-memory limits); drawn at random over the whole file, seeded by the "
        "config's seed, without labels",
    )
    a.add_argument(
        "--final-workers",
        default=None,
        metavar="W",
        help="Ray Train workers of the final streamed fit on every cell (default: "
        "--workers-per-trial)",
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
    g.add_argument(
        "--gpus-per-worker", type=gpus_per_worker, default=None, metavar="G", help=GPUS_HELP
    )
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
