"""Label-free sweep objectives (and the supervised ones, which must be asked for by name).

Default (``auto``) = silhouette of the labels in the input's PCA space, on a fixed seeded
sample of cells. Why there and not in the learned embedding: every trial learns a different
embedding, so scores in it are not comparable across trials, and the cluster-aware loss can
raise an embedding silhouette by collapsing clusters whatever they contain. The PCA space is
the same for every trial and every K, so the score ranks labelings, not geometries. The
embedding silhouette stays available by name, ARI/NMI need the true labels and an explicit
``--objective ari|nmi``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

LABEL_FREE = ("silhouette_pca", "silhouette_embedding", "calinski_pca")
SUPERVISED = ("ari", "nmi")
OBJECTIVES = ("auto", *LABEL_FREE, *SUPERVISED)


def resolve(name: str) -> str:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective '{name}'; choose one of {', '.join(OBJECTIVES)}")
    return "silhouette_pca" if name == "auto" else name


def _sample(n: int, max_cells: int, seed: int) -> np.ndarray:
    if n <= max_cells:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_cells, replace=False))


def truth_scores(labels: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """ARI and NMI of ``labels`` against the true labels: reported only, never used to choose
    anything unless asked for by name (``--objective ari|nmi``). Cells without a label (dropped
    by preprocessing: missing in ``labels``) are left out. The one place cicl scores truth."""
    import pandas as pd
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    labels = np.asarray(labels, dtype=object)
    keep = ~pd.isna(labels)
    lab, tru = labels[keep].astype(str), np.asarray(truth, dtype=object)[keep]
    return {
        "ari": float(adjusted_rand_score(tru, lab)),
        "nmi": float(normalized_mutual_info_score(tru, lab)),
    }


def score_labels(
    name: str,
    labels: np.ndarray,
    pcs: np.ndarray,
    embedding: Callable[[], np.ndarray] | np.ndarray | None = None,
    truth: np.ndarray | None = None,
    max_cells: int = 3000,
    seed: int = 0,
) -> float:
    """Value of objective ``name`` (higher is better) for ``labels``."""
    from sklearn.metrics import calinski_harabasz_score, silhouette_score

    name = resolve(name)
    if name in SUPERVISED:
        if truth is None:
            raise ValueError(f"objective '{name}' needs true labels (--label-key)")
        return truth_scores(labels, truth)[name]
    if len(np.unique(labels)) < 2:
        return -1.0
    idx = _sample(len(labels), max_cells, seed)
    if name == "silhouette_embedding":
        emb = embedding() if callable(embedding) else embedding
        if emb is None:
            raise ValueError("silhouette_embedding needs the embedding")
        space = np.asarray(emb)[idx]
    else:
        space = np.asarray(pcs)[idx]
    lab = labels[idx]
    if len(np.unique(lab)) < 2:
        return -1.0
    if name == "calinski_pca":
        return float(np.log(calinski_harabasz_score(space, lab)))
    return float(silhouette_score(space, lab))
