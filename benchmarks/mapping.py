"""Mapping new cells (`cicl predict`): are held-out cells clustered as well as fitted ones?

Per dataset and seed: a random 30 % of the cells is held out, CICL is fitted on the other 70 %
(default config, true K, that seed) and the held-out cells are mapped onto it with
``cicl.predict``. Reports ARI against the true labels (scored only) on the fitted cells and on
the mapped ones, and for an ``ingest``-style alternative: a 15-NN majority vote of the
reference's CICL labels in the reference PCA. Mapped cells' ``dist_pct`` (distance to their
centroid as a percentile of the reference cells of that cluster) is checked for calibration: for
held-out cells of known types about 1 % should lie above 99.

A second fit per dataset and seed holds out one whole cell type (the one of median size) from
the reference (K - 1 clusters) and maps it with the held-out cells: how well do ``dist_pct``
and the Student's t confidence tell the unseen type from known ones (AUROC), and what share of
its cells is flagged (``dist_pct`` > 99)? Writes mapping.csv / mapping.md and novel.csv.

    python benchmarks/mapping.py --datasets baron_mouse1,pbmc_10x,mouse_bladder,pollen --seeds 2
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd


def run_one(path: Path, label_key: str, seed: int, held_frac: float) -> dict:
    import anndata as ad
    from sklearn.metrics import adjusted_rand_score
    from sklearn.neighbors import KNeighborsClassifier

    import cicl
    from cicl.reference import query_transform

    a = ad.read_h5ad(path)
    y = a.obs[label_key].astype(str).to_numpy()
    held = np.random.default_rng(seed).random(a.n_obs) < held_frac
    ref, query = a[~held].copy(), a[held].copy()
    t0 = time.perf_counter()
    cicl.fit(ref, len(set(y)), config=cicl.load_config(None, {"seed": seed}), progress=False)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cicl.predict(query, ref, key_added="mapped")
    predict_s = time.perf_counter() - t0
    model = ref.uns["cicl"]["model"]
    _, ref_pcs = query_transform(ref, model)(ref.X, np.arange(ref.n_obs))
    _, query_pcs = query_transform(query, model)(query.X, np.arange(query.n_obs))
    ref_labels = ref.obs["cicl"].astype(str).to_numpy()
    knn = KNeighborsClassifier(15).fit(ref_pcs, ref_labels).predict(query_pcs)
    mapped = query.obs["mapped"].astype(str).to_numpy()
    pct = query.obs["mapped_dist_pct"].to_numpy()
    return {
        "dataset": path.stem,
        "seed": seed,
        "cells_fitted": int((~held).sum()),
        "cells_mapped": int(held.sum()),
        "ari_fitted": adjusted_rand_score(y[~held], ref_labels),
        "ari_mapped": adjusted_rand_score(y[held], mapped),
        "ari_knn_vote": adjusted_rand_score(y[held], knn),
        "agreement_with_knn": float(np.mean(knn == mapped)),
        "median_dist_pct": float(np.median(pct)),
        "share_above_99": float(np.mean(pct > 99)),
        "fit_s": fit_s,
        "predict_s": predict_s,
    }


def novel_one(path: Path, label_key: str, seed: int, held_frac: float) -> dict:
    """Hold out the median-sized cell type entirely; map it with the held-out known cells."""
    import anndata as ad
    from sklearn.metrics import roc_auc_score

    import cicl

    a = ad.read_h5ad(path)
    y = a.obs[label_key].astype(str).to_numpy()
    sizes = pd.Series(y).value_counts().sort_values(kind="stable")
    novel = str(sizes.index[len(sizes) // 2])
    held = (np.random.default_rng(seed).random(a.n_obs) < held_frac) | (y == novel)
    ref, query = a[~held].copy(), a[held].copy()
    k = len(set(y)) - 1
    cicl.fit(ref, k, config=cicl.load_config(None, {"seed": seed}), progress=False)
    cicl.predict(query, ref, key_added="mapped")
    is_new = y[held] == novel
    pct = query.obs["mapped_dist_pct"].to_numpy()
    conf = query.obs["mapped_confidence"].to_numpy()
    return {
        "dataset": path.stem,
        "seed": seed,
        "novel_type": novel,
        "novel_cells": int(is_new.sum()),
        "auroc_dist_pct": roc_auc_score(is_new, pct),
        "auroc_confidence": roc_auc_score(is_new, -conf),
        "novel_flagged": float(np.mean(pct[is_new] > 99)),
        "known_flagged": float(np.mean(pct[~is_new] > 99)),
    }


def _table(df: pd.DataFrame, cols: list[str]) -> list[str]:
    g = df.groupby("dataset", sort=False)[cols]
    table = g.mean().round(3).astype(str) + " ± " + g.std(ddof=1).round(3).astype(str)
    table.loc["mean"] = df[cols].mean().round(3).astype(str)
    lines = ["| dataset | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    return lines + [f"| {i} | " + " | ".join(r) + " |" for i, r in table.iterrows()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--datasets", default="baron_mouse1,pbmc_10x,mouse_bladder,pollen")
    ap.add_argument("--label-key", default="cell_type")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--held-frac", type=float, default=0.3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    rows, novel = [], []
    for name in args.datasets.split(","):
        path = Path(args.data) / f"{name}.h5ad"
        for seed in range(args.seeds):
            r = run_one(path, args.label_key, seed, args.held_frac)
            print(
                f"{name} seed {seed}: ARI fitted {r['ari_fitted']:.3f} mapped "
                f"{r['ari_mapped']:.3f} kNN vote {r['ari_knn_vote']:.3f}",
                flush=True,
            )
            rows.append(r)
            v = novel_one(path, args.label_key, seed, args.held_frac)
            print(
                f"{name} seed {seed}: unseen type {v['novel_type']}: AUROC dist_pct "
                f"{v['auroc_dist_pct']:.3f} confidence {v['auroc_confidence']:.3f}",
                flush=True,
            )
            novel.append(v)
    df, nv = pd.DataFrame(rows), pd.DataFrame(novel)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "mapping.csv", index=False)
    nv.to_csv(out / "novel.csv", index=False)
    cols = ["ari_fitted", "ari_mapped", "ari_knn_vote", "agreement_with_knn"]
    cols += ["median_dist_pct", "share_above_99", "predict_s"]
    ncols = ["auroc_dist_pct", "auroc_confidence", "novel_flagged", "known_flagged"]
    lines = [
        f"Held-out mapping: {args.held_frac:.0%} of the cells held out, CICL fitted on the rest "
        f"(default config, true K), {args.seeds} seeds; ARI vs true labels, scored only. "
        "`median_dist_pct` / `share_above_99`: the mapped cells' distance percentiles "
        "(calibrated: 50 / 0.01).",
        "",
        *_table(df, cols),
        "",
        "Unseen cell type: the median-sized type left out of the reference (K - 1 clusters) and "
        "mapped with the held-out cells. AUROC for telling its cells from known ones by "
        "`dist_pct` and by (1 - Student's t confidence); share of its cells and of known cells "
        "with `dist_pct` > 99 (flagged).",
        "",
        *_table(nv, ncols),
    ]
    (out / "mapping.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
