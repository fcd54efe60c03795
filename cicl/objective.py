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


RARE_SHARE = 0.01  # a type below this share of the (labelled, kept) cells counts as rare


def _labelled(labels: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cluster labels (as strings) and true labels of the cells that have a cluster label."""
    import pandas as pd

    labels = np.asarray(labels, dtype=object)
    keep = ~pd.isna(labels)
    return labels[keep].astype(str), np.asarray(truth, dtype=object)[keep]


def type_scores(labels: np.ndarray, truth: np.ndarray) -> dict[str, tuple[float, float]]:
    """Per true type: its share of the cells and the F1 of its best-matching cluster (the
    highest ``2 |type ∩ cluster| / (|type| + |cluster|)`` over clusters). ARI and NMI weigh
    cells, so a type of 0.1 % can vanish into a neighbour without moving them; this says, type
    by type, whether some cluster is that type. Cells without a cluster label are left out."""
    from sklearn.metrics.cluster import contingency_matrix

    lab, tru = _labelled(labels, truth)
    if not len(lab):
        return {}
    types, t_codes = np.unique(tru.astype(str), return_inverse=True)
    _, c_codes = np.unique(lab, return_inverse=True)
    both = contingency_matrix(t_codes, c_codes, sparse=True).tocoo()  # types x clusters
    n_type = np.bincount(t_codes, minlength=len(types))
    n_clu = np.bincount(c_codes)
    f1 = 2.0 * both.data / (n_type[both.row] + n_clu[both.col])
    best = np.zeros(len(types))
    np.maximum.at(best, both.row, f1)
    share = n_type / len(lab)
    return {str(t): (float(share[i]), float(best[i])) for i, t in enumerate(types)}


def truth_scores(labels: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """ARI and NMI of ``labels`` against the true labels, and ``rare_f1``: the mean over the
    types below ``RARE_SHARE`` of the cells of their best cluster's F1 (``type_scores``; NaN
    when no type is that rare), with ``n_rare`` those types. Reported only, never used to
    choose anything unless asked for by name (``--objective ari|nmi``). Cells without a label
    (dropped by preprocessing: missing in ``labels``) are left out. The one place cicl scores
    truth."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    lab, tru = _labelled(labels, truth)
    rare = [f1 for share, f1 in type_scores(labels, truth).values() if share < RARE_SHARE]
    return {
        "ari": float(adjusted_rand_score(tru, lab)),
        "nmi": float(normalized_mutual_info_score(tru, lab)),
        "rare_f1": float(np.mean(rare)) if rare else float("nan"),
        "n_rare": len(rare),
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
