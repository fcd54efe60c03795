"""What a fit prints: the ``--json`` fields and the readable summary on stderr."""

from __future__ import annotations

import sys
from typing import Any


def result_fields(info: dict, n_cells: int, n_genes: int) -> dict[str, Any]:
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
        "time_budget_hit": bool(info.get("time_budget_hit", False)),
        "precision": str(info.get("precision", "fp32")),
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


def unused_gpus_note(r: dict[str, Any]) -> str | None:
    """One summary line when a fit trained on the CPU while GPUs were there (``gpus_unused``:
    how many), with why and what would use them; None otherwise."""
    n = r.get("gpus_unused", 0)
    if not n:
        return None
    asked = r.get("gpus_per_worker")  # present for Ray fits: the option as given
    if r.get("train_device") == "cpu":
        why = "train.device=cpu; `--set train.device=auto` trains on them"
    elif asked is None:
        why = "`--set train.device=cuda` trains on them"
    elif asked == "auto":
        why = (
            f"--gpus-per-worker auto found fewer GPUs than the {r['workers']} workers when the "
            "run started; `--gpus-per-worker 1` asks for them"
        )
    else:
        why = f"--gpus-per-worker {asked:g}; auto gives each worker one"
    where = "torch sees" if asked is None else "the Ray cluster has"
    return f"  GPUs unused: {where} {n} GPU(s), this fit trained on the CPU ({why})"


def print_summary(obs, key: str, r: dict[str, Any]) -> None:
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
        f"  training: {r['epochs']} epochs, {r['steps']} steps"
        + (" (stopped at --time-budget)" if r.get("time_budget_hit") else "")
        + f", {r['workers']} worker(s) on "
        f"{r['device']}"
        + (f", {r['threads']} threads each" if r["device"] == "cpu" else "")
        + (f", {r['precision']}" if r.get("precision", "fp32") != "fp32" else "")
        + "; "
        + (f"decoder {r['decoder']}; " if r.get("decoder", "off") != "off" else "")
        + f"total {r['seconds']:.1f} s",
    ]
    note = unused_gpus_note(r)
    if note is not None:
        lines.append(note)
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
        rare = r.get("rare_f1")
        lines.append(
            f"  vs labels (scored only): ARI {r['ari']:.3f}  NMI {r['nmi']:.3f}"
            + (
                f"  rare-type F1 {rare:.3f} ({r['n_rare']} types < 1 %)"
                if rare is not None and rare == rare
                else ""
            )
        )
    lines.append(f"  wrote {r['output']}: obs['{key}'], obsm['X_{key}'], uns['{key}']")
    if "plot" in r:
        lines.append(f"  figure: {r['plot']}")
    if "mlflow_run" in r:
        m = r["mlflow_run"]
        lines.append(f"  MLflow: run {m['run_id']} in experiment '{m['experiment']}' ({m['uri']})")
    print("\n".join(lines), file=sys.stderr)


def json_line(record: dict) -> str:
    """``--json``'s line: strict JSON (a score that is not a number, e.g. ``rare_f1`` with no
    rare type, is null)."""
    import json
    import math

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v

    return json.dumps(clean(record), allow_nan=False)
