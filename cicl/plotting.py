"""Figures a person would rather look at than read: UMAP of the clustering space coloured by
cluster (and by known labels), and the per-round training curves."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np

from cicl._keys import embedding_key
from cicl.data.estimate import knn_graph
from cicl.data.io import atomic_path


def plot_fit(
    adata: ad.AnnData,
    path: str | Path,
    *,
    key: str = "cicl",
    label_key: str | None = None,
    seed: int = 0,
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    emb = knn_graph(np.asarray(adata.obsm[embedding_key(key)]), seed)
    for col in [key] + ([label_key] if label_key else []):
        emb.obs[col] = adata.obs[col].to_numpy()
    sc.tl.umap(emb, random_state=seed)
    hist = adata.uns[key].get("history") or {}
    panels = [key] + ([label_key] if label_key else [])
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(5.2 * (len(panels) + 1), 4.6))
    for ax, col in zip(axes, panels, strict=False):
        cats = emb.obs[col].astype("category")
        cmap = plt.get_cmap("tab20", max(len(cats.cat.categories), 1))
        xy = emb.obsm["X_umap"]
        ax.scatter(xy[:, 0], xy[:, 1], c=cats.cat.codes, cmap=cmap, s=4, linewidths=0)
        ax.set_title(f"UMAP of {embedding_key(key)}: {col} ({len(cats.cat.categories)})")
        ax.set_xticks([])
        ax.set_yticks([])
    ax = axes[-1]
    if hist and "epoch" in hist:
        ep = np.asarray(hist["epoch"])
        for name in ("loss", "recon_loss", "instance_loss", "cluster_loss"):
            if name in hist and (name == "loss" or np.any(np.asarray(hist[name]) != 0)):
                ax.plot(ep, hist[name], marker="o", ms=3, label=name)
        ax2 = ax.twinx()
        ax2.plot(ep, hist["label_change"], color="grey", ls="--", label="labels changed")
        ax2.set_ylabel("pseudo-label change since last round (1 - ARI)")
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
        ax.set_title("training, per reclustering round")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".").lower())
    plt.close(fig)
    return path
