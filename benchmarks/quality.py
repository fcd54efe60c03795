"""Quality benchmark: CICL (default, reference preset) vs scanpy Leiden and K-means on PCA.

Every method gets the same preprocessed input (``cicl.data.preprocess``) and, where it takes
K, the true number of classes. Labels are used only to score. Writes
``quality.csv`` (one row per dataset x method x seed), ``quality.md`` (ARI / NMI mean ± sd per
dataset and the means) and ``quality.png`` into ``--out``.

    .venv/bin/python benchmarks/quality.py --data ../shared/data --seeds 3 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

PAPER_ARI = {"yan": 0.7989, "pollen": 0.9117, "young_kidney": 0.6578}
METHODS = [
    "cicl",
    "cicl_est_k",
    "cicl_contrastive",
    "cicl_reference",
    "kmeans_pca",
    "leiden_default",
    "leiden_at_k",
]
# cicl_est_k: `cicl fit` without --n-clusters (K estimated without labels), the label-free
# counterpart of leiden_default; cicl_contrastive: the `contrastive` preset (the earlier
# default); every other K-based method is given the true K
PRESET_OF = {"cicl_reference": "reference", "cicl_contrastive": "contrastive"}


def _prepare(path: str) -> tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    import anndata as ad

    from cicl.config import PreprocessConfig
    from cicl.data.preprocess import preprocess

    a = ad.read_h5ad(path)
    p = preprocess(a, PreprocessConfig())
    y = a.obs["cell_type"].astype("category").cat.codes.to_numpy()
    return Path(path).stem, p.x, p.pcs, y, p.counts


def _job(args: tuple) -> list[dict]:
    path, method, seed, overrides, name_as = args
    import torch
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    torch.set_num_threads(1)
    name, x, pcs, y, counts = _prepare(path)
    k = len(np.unique(y))
    t0 = time.perf_counter()
    if method.startswith("cicl"):
        from cicl.config import CICLConfig, preset
        from cicl.train.loop import train

        cfg = preset(PRESET_OF[method]) if method in PRESET_OF else CICLConfig()
        cfg = cfg.with_overrides({**overrides, "seed": seed, "train.device": "cpu"})
        from cicl.pipeline import choose_k, resolve_cap

        estimated = method == "cicl_est_k"
        # without --n-clusters `cicl fit` estimates K; either way it fills the K cap's count
        k_fit = choose_k(cfg, pcs)[0] if estimated else k
        cfg = resolve_cap(cfg, pcs, k_fit, estimated=estimated)
        labels = train(x, pcs, k_fit, cfg, counts=counts).labels
    else:
        import baselines

        if method == "kmeans_pca":
            labels = baselines.kmeans_pca(pcs, k, seed)
        elif method == "leiden_default":
            labels = baselines.leiden(pcs, seed)
        else:
            labels = baselines.leiden_at_k(pcs, k, seed)
    return [
        {
            "dataset": name,
            "n_cells": len(y),
            "k": k,
            "method": name_as or method,
            "seed": seed,
            "ari": adjusted_rand_score(y, labels),
            "nmi": normalized_mutual_info_score(y, labels),
            "n_found": len(np.unique(labels)),
            "seconds": time.perf_counter() - t0,
        }
    ]


def merge_rows(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """``old`` with the (method, dataset) pairs in ``new`` replaced by ``new``'s rows, so a
    rerun of some methods on some datasets (``--merge --datasets``) keeps everything else."""
    ran = set(zip(new.method, new.dataset, strict=True))
    keep = [pair not in ran for pair in zip(old.method, old.dataset, strict=True)]
    return pd.concat([old[keep], new], ignore_index=True)


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    g = df.groupby(["dataset", "method"])
    s = g[["ari", "nmi", "seconds"]].agg(["mean", "std"]).reset_index()
    s.columns = ["dataset", "method", "ari", "ari_sd", "nmi", "nmi_sd", "seconds", "seconds_sd"]
    return s


def to_markdown(df: pd.DataFrame, methods: list[str]) -> str:
    s = summarise(df)
    sizes = df.groupby("dataset")["n_cells"].first().sort_values(ascending=False)
    lines = []
    for metric in ("ari", "nmi"):
        head = ["dataset (cells)"] + methods + (["paper CICL"] if metric == "ari" else [])
        lines += [
            f"**{metric.upper()}** (mean ± sd over seeds)",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]
        for ds, n in sizes.items():
            row = [f"{ds} ({n})"]
            for m in methods:
                r = s[(s.dataset == ds) & (s.method == m)]
                row.append(
                    "—"
                    if r.empty
                    else f"{r[metric].iloc[0]:.3f} ± {np.nan_to_num(r[metric + '_sd'].iloc[0]):.3f}"
                )
            if metric == "ari":
                row.append(f"{PAPER_ARI[ds]:.3f}" if ds in PAPER_ARI else "")
            lines.append("| " + " | ".join(row) + " |")
        means = []
        for m in methods:
            r = s[s.method == m]
            full = r.dataset.nunique() == len(sizes)
            means.append(
                f"**{r[metric].mean():.3f}**" + ("" if full else f" ({r.dataset.nunique()} sets)")
            )
        lines.append("| mean | " + " | ".join(means) + (" | |" if metric == "ari" else " |"))
        lines.append("")
    best = (
        s[s.method.isin(["kmeans_pca", "leiden_default", "leiden_at_k"])]
        .groupby("dataset")["ari"]
        .max()
    )
    c = s[s.method == "cicl"].set_index("dataset")["ari"]
    gap = (c - best).dropna()
    if not gap.empty:  # an ablation run alone (--name) has no baselines or cicl rows
        lines.append(
            f"Best baseline per dataset, mean ARI: {best.mean():.3f}. CICL minus best baseline: "
            f"worst {gap.min():+.3f} ({gap.idxmin()}), datasets more than 0.10 below: "
            f"{', '.join(gap[gap < -0.10].index) or 'none'}."
        )
    found = df.groupby(["dataset", "method"])["n_found"].mean().unstack()
    if "cicl_est_k" in found:
        lines.append(
            "Clusters found without labels (true K / `cicl_est_k` / `leiden_default`, mean over "
            "seeds): "
            + ", ".join(
                f"{d} {df[df.dataset == d].k.iloc[0]}/{found.loc[d, 'cicl_est_k']:.0f}/"
                f"{found.loc[d].get('leiden_default', np.nan):.0f}"
                for d in sizes.index
            )
            + "."
        )
    timed = "cicl" if "cicl" in methods else methods[0]  # an ablation alone: its own times
    sec = s[s.method == timed].set_index("dataset")["seconds"]
    per_set = ", ".join(f"{d} {sec[d]:.0f}" for d in sizes.index if d in sec)
    lines.append(f"`{timed}` training seconds (1 thread, per seed): {per_set}.")
    return "\n".join(lines) + "\n"


def plot(df: pd.DataFrame, methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summarise(df)
    order = df.groupby("dataset")["n_cells"].first().sort_values(ascending=False).index
    fig, ax = plt.subplots(figsize=(12, 4.5))
    w = 0.8 / len(methods)
    for i, m in enumerate(methods):
        r = s[s.method == m].set_index("dataset").reindex(order)
        ax.bar(
            np.arange(len(order)) + i * w,
            r["ari"],
            w,
            yerr=r["ari_sd"].fillna(0),
            label=m,
            capsize=2,
        )
    ax.set_xticks(np.arange(len(order)) + 0.4 - w / 2)
    ax.set_xticklabels(order, rotation=30, ha="right")
    ax.set_ylabel("ARI (mean ± sd over seeds)")
    ax.set_ylim(0, 1.05)
    ax.legend(ncol=len(methods), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 1.12))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--datasets", default=None, help="comma-separated names (default: all)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument(
        "--reference-max-cells",
        type=int,
        default=1000,
        help="run the reference preset (51 epochs, width-G encoder) only up to this size",
    )
    ap.add_argument("--procs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for the CICL methods (an ablation); name the rows with --name",
    )
    ap.add_argument("--name", default=None, help="method name for the rows of a --set run")
    ap.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of an existing quality.csv in --out and replace only the "
        "(method, dataset) pairs run now (e.g. rerun CICL after a change)",
    )
    args = ap.parse_args(argv)
    import anndata as ad

    paths = sorted(Path(args.data).glob("*.h5ad"))
    if args.datasets:
        keep = set(args.datasets.split(","))
        paths = [p for p in paths if p.stem in keep]
    methods = args.methods.split(",")
    from cicl.cli import parse_set

    overrides = parse_set(args.set)  # as `cicl fit --set`
    if overrides and not args.name:
        ap.error("--set needs --name: the rows must not pass for the method's own")
    sizes = {p: ad.read_h5ad(p, backed="r").n_obs for p in paths}
    jobs = [
        (str(p), m, s, overrides, args.name)
        for p in sorted(paths, key=lambda p: -sizes[p])
        for m in methods
        for s in range(args.seeds)
        if not (m == "cicl_reference" and sizes[p] > args.reference_max_cells)
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    from tqdm import tqdm

    with get_context("spawn").Pool(args.procs) as pool:
        for r in tqdm(pool.imap_unordered(_job, jobs), total=len(jobs), desc="benchmark"):
            rows += r
    df = pd.DataFrame(rows)
    if args.merge and (out / "quality.csv").exists():
        old = pd.read_csv(out / "quality.csv")
        df = merge_rows(old, df)
        extra = sorted(set(df.method) - set(METHODS))  # ablation rows (--set/--name)
        methods = [m for m in METHODS if m in set(df.method)] + extra
    elif args.name:
        methods = [args.name]
    df = df.sort_values(["dataset", "method", "seed"])
    df.to_csv(out / "quality.csv", index=False)
    md = to_markdown(df, methods)
    (out / "quality.md").write_text(md)
    plot(df, methods, out / "quality.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
