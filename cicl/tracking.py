"""MLflow tracking shared by sweeps and single fits: the store, runs, params/metrics, the
comparison table, and the check that a tracking URI is one MLflow 3.17 will take (and that
its server answers, or its SQLite file is an MLflow store).

Runs are written with ``MlflowClient`` and explicit run ids (no global active run), so trials
running side by side in one process never log into each other's runs.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from cicl._logging import quieted
from cicl.errors import CICLError


def default_mlflow_uri(root: Path) -> str:
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


_STORES_READY: set[str] = set()


def mlflow_client(uri: str):
    """An MLflow client whose store is ready to use.

    MLflow creates and migrates a new SQLite store on its first use, and processes doing that
    at once break each other's migration (three processes opening one fresh store together:
    10 of 15 failed with "table already exists" / alembic errors), e.g. `cicl runs` or a test
    polling while a sweep starts. So each process' first use of a SQLite store holds an
    exclusive lock on the store's folder (no lock file is left behind).
    """
    import fcntl
    import os

    from mlflow.tracking import MlflowClient

    if uri.startswith(("http://", "https://")):
        fail_fast_http()
    if not uri.startswith("sqlite:///") or uri in _STORES_READY:
        return MlflowClient(tracking_uri=uri)
    try:
        fd = os.open(Path(uri.removeprefix("sqlite:///")).parent, os.O_RDONLY)
    except OSError:  # no such folder: MLflow's own error says so
        return MlflowClient(tracking_uri=uri)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without locks (some NFS mounts): go on unlocked
            pass
        with quieted("mlflow.store.db.utils", logging.WARNING):  # "Creating initial ... tables"
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)  # creates / migrates the tables
    finally:
        os.close(fd)  # releases the lock
    _STORES_READY.add(uri)
    return client


# MLflow's own defaults retry a request 7 times with growing waits and wait 120 s for each
# answer: minutes before a server that went away is reported. A user's own values are kept.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
HEALTH_TIMEOUT_S = 5.0  # how long the check before any work waits for a tracking server


def fail_fast_http() -> None:
    """Make this process' MLflow HTTP calls give up soon when a server goes away: 4 tries of
    at most 20 s each, not 8 of 120 s (each variable only where the user has not set it)."""
    import os

    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)


def http_status(url: str, timeout: float) -> int:
    """The HTTP status a GET of ``url`` answers with; ``OSError`` if nothing answers. The
    certificate is not checked: nothing is sent, and MLflow checks it itself."""
    import http.client
    import ssl
    import urllib.error
    import urllib.request

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code
    except urllib.error.URLError as exc:
        raise OSError(str(exc.reason)) from None
    except (http.client.HTTPException, ValueError) as exc:  # not HTTP, not a URL
        raise OSError(str(exc) or type(exc).__name__) from None


def check_server(uri: str, timeout: float = HEALTH_TIMEOUT_S) -> None:
    """Raise ``CICLError`` unless an MLflow server answers at ``uri`` within ``timeout``
    seconds each for at most two GETs: its ``/health``, and if that is not found, its
    experiment search (a gateway may route the API only). Any other answer counts, an error
    status too (a login, a proxy, an overloaded server): MLflow's own message says more."""
    import contextlib
    import urllib.parse

    parts = urllib.parse.urlsplit(uri)
    netloc = parts.netloc.rpartition("@")[2]  # credentials: not needed, never shown
    base = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    try:
        if http_status(f"{base}/health", timeout) != 404:
            return
        api = f"{base}/api/2.0/mlflow/experiments/search?max_results=1"
        if http_status(api, timeout) != 404:
            return
    except OSError as exc:  # refused, no such host, timed out
        host, port = parts.hostname or "127.0.0.1", 443 if parts.scheme == "https" else 80
        with contextlib.suppress(ValueError):  # a port that is not a number
            port = parts.port or port
        raise CICLError(
            f"The MLflow server at {base} does not answer ({exc or type(exc).__name__}). "
            f"Start it, e.g. `mlflow server --backend-store-uri sqlite:////abs/path/mlflow.db "
            f"--host {host} --port {port}`, or leave out --mlflow-uri to use the local SQLite "
            "store."
        ) from None
    raise CICLError(
        f"{base} answers but is not an MLflow tracking server (HTTP 404 on /health and on "
        "/api/2.0/mlflow/experiments/search). Check the host, port and path of --mlflow-uri."
    )


MLFLOW_TABLES = {"experiments", "runs"}  # in every MLflow database


def check_sqlite_store(db: Path) -> None:
    """Raise ``CICLError`` if ``db`` exists but is not an MLflow store.

    MLflow would add its tables to any SQLite file it is given, and fail with a traceback on
    a file that is not a database. A file that is absent, empty or has no tables yet is a new
    store. Read-only: the file is never changed here."""
    import sqlite3

    if not db.is_file() or db.stat().st_size == 0:
        return
    try:
        con = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=2)
        try:
            tables = {
                r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
        finally:
            con.close()
    except sqlite3.OperationalError:  # locked by a writer, or unreadable: MLflow decides
        return
    except sqlite3.DatabaseError as exc:  # "file is not a database"
        raise CICLError(
            f"--mlflow-uri points at '{db}', which is not a SQLite database ({exc}). "
            "Name an MLflow store or a new file."
        ) from None
    if tables - {"alembic_version"} and not MLFLOW_TABLES <= tables:
        raise CICLError(
            f"--mlflow-uri points at '{db}', a SQLite database that is not an MLflow store "
            f"(tables: {', '.join(sorted(tables)[:5])}{', ...' if len(tables) > 5 else ''}). "
            "Name an MLflow store or a new file; this one is left unchanged."
        )


def check_tracking(uri: str) -> None:
    """Check before any work that ``uri`` can be used: a server answers, a SQLite file is an
    MLflow store or new. Other databases are left to MLflow."""
    if uri.startswith(("http://", "https://")):
        check_server(uri)
    elif uri.startswith("sqlite:///"):
        check_sqlite_store(Path(uri.removeprefix("sqlite:///")))


def ensure_experiment(uri: str, name: str, artifact_root: Path | None = None) -> str:
    """The experiment's id, created if new. With a SQLite store its artifacts go under
    ``artifact_root`` (default: ``mlartifacts/<name>`` next to the store); a tracking server
    decides that itself."""
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    if not uri.startswith("sqlite:///"):
        return client.create_experiment(name)
    store = Path(uri.removeprefix("sqlite:///"))
    artifact_root = artifact_root or store.parent / "mlartifacts" / name
    artifact_root.mkdir(parents=True, exist_ok=True)
    return client.create_experiment(name, artifact_location=artifact_root.resolve().as_uri())


def find_or_create_run(
    uri: str, exp_id: str, tags: dict[str, str], name: str, parent: str | None = None
) -> tuple[str, bool]:
    """The run carrying ``tags`` (resume), else a new one. Returns (run id, created)."""
    client = mlflow_client(uri)
    filt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    found = client.search_runs([exp_id], filter_string=filt, max_results=1)
    if found:
        return found[0].info.run_id, False
    all_tags = dict(tags)
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    run = client.create_run(exp_id, tags=all_tags, run_name=name)
    return run.info.run_id, True


def child_runs(client, exp_id: str, parent: str, page_size: int = 1000) -> list:
    """Every run whose parent is ``parent``, page by page (one search returns at most 1,000)."""
    runs, token = [], None
    while True:
        page = client.search_runs(
            [exp_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent}'",
            max_results=page_size,
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    client = mlflow_client(uri)
    items = [Param(k, str(v)[:500]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [
        Metric(k, float(v), ts, step)
        for k, v in metrics.items()
        if isinstance(v, (int, float, np.floating, np.integer, bool)) and np.isfinite(float(v))
    ]
    if items:
        mlflow_client(uri).log_batch(run_id, metrics=items)


def runs_table(uri: str, experiment: str | None, sort: str | None) -> tuple[Any, str]:
    """Trial and fit runs of an experiment (the latest one if not named) as a DataFrame, and
    its name."""
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(uri)
    client = mlflow_client(uri)
    exps = [e for e in client.search_experiments() if e.name != "Default"]
    if not exps:
        raise CICLError(f"No experiments in {uri}. Run `cicl tune` or `cicl fit --mlflow` first.")
    if experiment is None:
        experiment = max(exps, key=lambda e: e.creation_time or 0).name
    elif experiment not in {e.name for e in exps}:
        raise CICLError(
            f"No experiment '{experiment}' in {uri}; have: {', '.join(e.name for e in exps)}."
        )
    df = mlflow.search_runs(experiment_names=[experiment])
    if df.empty:
        return df, experiment
    parent_col = "tags.mlflow.parentRunId"  # sweep parents are left out; trials and fits stay
    parents = set(df[parent_col].dropna()) if parent_col in df else set()
    children = df[~df["run_id"].isin(parents)]
    params = [c for c in children.columns if c.startswith("params.search.")]
    varied = [c for c in params if children[c].nunique(dropna=True) > 1]
    out = pd.DataFrame({"run": children.get("tags.mlflow.runName"), "status": children["status"]})
    for c in varied:
        out[c.removeprefix("params.search.")] = children[c].map(short_param)
    for m in ("objective", "ari", "nmi"):
        col = f"metrics.final_{m}"
        if col in children:
            out[m] = children[col].round(4)
    dur = (children["end_time"] - children["start_time"]).dt.total_seconds()
    if "metrics.final_seconds" in children:  # a fit's own time (its run is logged afterwards)
        dur = children["metrics.final_seconds"].fillna(dur)
    out["seconds"] = dur.round(1)
    key = sort or "objective"
    if key in out:
        out = out.sort_values(key, ascending=False, na_position="last")
    return out.reset_index(drop=True), experiment


def short_param(value: Any) -> Any:
    """MLflow stores params as strings: show sampled floats with 4 significant digits."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return value
    return value if f.is_integer() or not np.isfinite(f) else f"{f:.4g}"


def mlflow_ui_command(uri: str) -> str:
    """How to see the runs: a tracking server shows them itself, a store needs an MLflow UI."""
    if uri.startswith(("http://", "https://")):
        return uri
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


def resolve_mlflow_uri(uri: str | None, root: Path, must_exist: bool = False) -> str:
    """The tracking URI to use: ``uri`` made usable, or the default store under ``root``.

    MLflow 3.17 refuses the file store, and a relative SQLite path would point somewhere else
    in every Ray worker (they run in their own folders), so a relative ``sqlite:///`` path is
    made absolute against the current folder. Checked before any work starts (a server
    must answer, an existing SQLite file must be an MLflow store), so a bad URI costs
    nothing, leaves nothing behind and fails within seconds."""
    if uri is None:
        uri = default_mlflow_uri(root)
    elif "://" not in uri or uri.startswith("file:"):
        raise CICLError(
            f"--mlflow-uri '{uri}' is a file store, which MLflow 3.17 refuses. Give a SQLite "
            "store (sqlite:////absolute/path/mlflow.db) or a tracking server (http://host:5000)."
        )
    if not uri.startswith("sqlite:"):
        check_tracking(uri)  # a tracking server answers; another database: MLflow checks it
        return uri
    path = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else ""
    if path in ("", ":memory:"):
        raise CICLError(
            f"--mlflow-uri '{uri}' is not a SQLite file. Give sqlite:////absolute/path/mlflow.db."
        )
    db = (Path.cwd() / path).resolve()
    if db.exists() and not db.is_file():
        raise CICLError(f"--mlflow-uri points at '{db}', which is not a file. Name a .db file.")
    if must_exist and not db.is_file():
        raise CICLError(
            f"No MLflow store at sqlite:///{db}. Run `cicl tune` or `cicl fit --mlflow` first, "
            "or pass --mlflow-uri."
        )
    if not must_exist and not db.parent.is_dir() and uri != default_mlflow_uri(root):
        raise CICLError(
            f"Folder '{db.parent}' for the MLflow store does not exist. Create it first."
        )
    check_sqlite_store(db)
    return f"sqlite:///{db}"


def log_run(
    uri: str,
    experiment: str,
    run_name: str,
    *,
    params: dict[str, Any],
    history: list[dict[str, Any]],
    final: dict[str, float],
    files: list[Path],
    tags: dict[str, str] | None = None,
    run_id: str | None = None,
) -> str:
    """Log one finished fit as an MLflow run: params, per-round metrics, ``final_*`` metrics
    (the names sweep trials use, so ``cicl runs`` and the MLflow UI compare fits and trials
    side by side) and artifact files. Into ``run_id`` if given (its status is left to its
    owner), else a new run. Returns the run id."""
    client = mlflow_client(uri)
    own = run_id is None
    if own:
        if uri.startswith("sqlite:///"):  # the default store's folder may not exist yet
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        exp_id = ensure_experiment(uri, experiment)
        run_id = client.create_run(
            exp_id, run_name=run_name, tags={"cicl.kind": "fit", **(tags or {})}
        ).info.run_id
    else:
        for k, v in {"cicl.kind": "fit", **(tags or {})}.items():
            client.set_tag(run_id, k, v)
    try:
        log_params(uri, run_id, params)
        for rec in history:
            log_metrics(uri, run_id, rec, int(rec.get("epoch", 0)))
        last = int(history[-1].get("epoch", 0)) if history else 0
        log_metrics(uri, run_id, {f"final_{k}": v for k, v in final.items()}, last)
        for f in files:
            client.log_artifact(run_id, str(f))
    except BaseException:
        if own:
            client.set_terminated(run_id, "FAILED")
        raise
    if own:
        client.set_terminated(run_id, "FINISHED")
    return run_id


FIGURE_MAX_CELLS = 50_000  # default figure only up to here: a UMAP of more cells takes minutes


def log_fit(
    adata: Any,
    key: str = "cicl",
    *,
    uri: str | None = None,
    experiment: str = "cicl",
    run_name: str | None = None,
    label_key: str | None = None,
    figure: str | Path | bool | None = None,
    run_id: str | None = None,
    params: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
    tags: dict[str, str] | None = None,
) -> dict[str, str]:
    """Log a finished ``cicl.fit`` (what it wrote to ``adata``) as an MLflow run.

    Params: the resolved config (K as used) plus ``params``; metrics: the per-round history
    and ``final_n_clusters`` / ``final_seconds`` / ``final_objective`` (the label-free
    silhouette) and, with ``label_key``, ``final_ari`` / ``final_nmi`` (scored only);
    artifacts: ``config.yaml``, ``labels.csv``, the UMAP + curves figure and, when the fit
    stored its model, ``reference.h5ad`` (the model without cells, a reference for
    ``cicl predict``). ``figure``: a
    PNG already drawn, ``False`` for none, default drawn when ``adata`` is in memory and has
    at most 50,000 cells. ``uri`` defaults to ``runs/mlflow.db`` like the CLI. With
    ``run_id`` (e.g. ``mlflow.active_run().info.run_id``) the fit is logged into that run.
    Returns ``{"uri", "experiment", "run_id"}``."""
    import tempfile

    import pandas as pd

    from cicl.config import CICLConfig
    from cicl.objective import truth_scores as score
    from cicl.reference import reference_adata

    if key not in adata.uns or "params" not in adata.uns[key]:
        raise CICLError(f"adata.uns['{key}'] holds no cicl.fit result. Run cicl.fit first.")
    if label_key is not None and label_key not in adata.obs:
        raise CICLError(f"label_key '{label_key}' is not an obs column.")
    uri = resolve_mlflow_uri(uri, Path("runs").resolve())
    if run_id is not None:  # report the experiment the run is in
        client = mlflow_client(uri)
        experiment = client.get_experiment(client.get_run(run_id).info.experiment_id).name
    info = adata.uns[key]
    used = CICLConfig.from_dict(info["params"]).with_overrides(
        {"cluster.n_clusters": int(info["n_clusters"])}
    )
    all_params = {
        **used.flat(),
        "n_clusters_source": info["n_clusters_source"],
        "values": info["preprocess"]["values"],
        "matrix": str(info["preprocess"].get("matrix", "X")),  # X, layers['counts'], raw.X
        "n_genes_used": int(info["preprocess"]["n_genes_used"]),
        "workers": int(info.get("workers", 1)),
        # torch's CPU threads per process: what its seconds were measured with
        **({"threads": int(info["threads"])} if "threads" in info else {}),
        # the hybrid space's PCA weight as used (``cluster.pca_weight`` is None under the rule)
        **({"pca_weight": float(info["pca_weight"])} if "pca_weight" in info else {}),
        **(params or {}),
    }
    hist = info.get("history")
    rows = pd.DataFrame(dict(hist)).to_dict(orient="records") if len(hist or {}) else []
    final = {"n_clusters": int(info["n_clusters"]), "seconds": float(info["seconds"])}
    if "silhouette_pca" in info:
        final["objective"] = float(info["silhouette_pca"])  # the sweeps' default objective
    if "shrinkage" in info.get("metric", {}):  # the final mixture's Ledoit-Wolf shrinkage
        final["metric_shrinkage"] = float(info["metric"]["shrinkage"])
    labels = adata.obs[key]
    if label_key is not None:
        final.update(score(labels.to_numpy(), adata.obs[label_key]))
    final.update(metrics or {})
    with tempfile.TemporaryDirectory() as tmp:
        files = [Path(tmp) / "config.yaml"]
        used.to_yaml(files[0])
        table = pd.DataFrame({"cell": adata.obs_names, "cluster": labels.to_numpy()})
        if label_key is not None:
            table[label_key] = adata.obs[label_key].to_numpy()
        files.append(Path(tmp) / "labels.csv")
        table.to_csv(files[-1], index=False)
        if figure is None:
            figure = not adata.isbacked and adata.n_obs <= FIGURE_MAX_CELLS
        if figure is True:
            from cicl.plotting import plot_fit

            figure = plot_fit(adata, Path(tmp) / "umap_curves.png", key=key, label_key=label_key)
        if figure:
            files.append(Path(figure))
        ref = reference_adata(adata, key)  # the model alone: `cicl predict --reference` takes it
        if ref is not None:
            files.append(Path(tmp) / "reference.h5ad")
            ref.write_h5ad(files[-1])
        run_id = log_run(
            uri,
            experiment,
            run_name or f"{experiment}-seed{used.seed}",
            params=all_params,
            history=rows,
            final=final,
            files=files,
            tags=tags,
            run_id=run_id,
        )
    return {"uri": uri, "experiment": experiment, "run_id": run_id}


def log_child_run(
    uri: str,
    experiment_id: str,
    parent_run_id: str,
    run_name: str,
    *,
    params: dict[str, Any],
    history: list[dict[str, Any]],
    final: dict[str, float],
    files: list[Path],
    tags: dict[str, str],
) -> str:
    """Log a finished fit as a new run under ``parent_run_id`` (a sweep's fit of its best
    configuration on the whole atlas beside its trials), with ``log_run``'s params, metrics
    and artifacts; ``tags`` should set ``cicl.kind``. Always a new run (never found again by
    tag: a second final fit is a second run). Returns its id."""
    client = mlflow_client(uri)
    run_id = client.create_run(
        experiment_id, run_name=run_name, tags={"mlflow.parentRunId": parent_run_id, **tags}
    ).info.run_id
    try:
        log_run(
            uri,
            "",
            run_name,
            params=params,
            history=history,
            final=final,
            files=files,
            tags=tags,
            run_id=run_id,
        )
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id
