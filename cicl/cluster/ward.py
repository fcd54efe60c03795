"""Ward agglomeration on weighted K-means micro-clusters.

Full Ward beats K-means on imbalanced cell-type data (measured on the shared datasets' PCA,
docs/development-log.md) but costs O(N^2). Ward on m weighted micro-cluster centroids (each
the mean of its cells, weighted by its size) gives the same merge costs as Ward on the points
once the micro-clusters are merged, at O(m^2) memory: exact for N <= m, scalable beyond.
"""

from __future__ import annotations

import numpy as np
import torch

from cicl.cluster.kmeans import LOCAL, kmeans
from cicl.comm import Comm


def weighted_ward(centroids: np.ndarray, sizes: np.ndarray, k: int) -> np.ndarray:
    """Merge weighted points down to ``k`` groups by Ward's criterion (Lance-Williams updates).

    Returns the group (0..k-1) of every input centroid."""
    m = centroids.shape[0]
    if k >= m:
        return np.arange(m)
    c = centroids.astype(np.float64)
    n = sizes.astype(np.float64).copy()
    sq = (c * c).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * c @ c.T, 0.0)
    cost = (n[:, None] * n[None, :] / (n[:, None] + n[None, :])) * d2
    np.fill_diagonal(cost, np.inf)
    group = np.arange(m)
    for _ in range(m - k):
        flat = int(np.argmin(cost))
        i, j = divmod(flat, m)
        if i > j:
            i, j = j, i
        ni, nj, nk = n[i], n[j], n
        new = ((ni + nk) * cost[i] + (nj + nk) * cost[j] - nk * cost[i, j]) / (ni + nj + nk)
        cost[i, :] = new
        cost[:, i] = new
        cost[i, i] = np.inf
        cost[j, :] = np.inf
        cost[:, j] = np.inf
        n[i] = ni + nj
        group[group == j] = i
    _, relabel = np.unique(group, return_inverse=True)
    return relabel


def _micro_ward(
    x: torch.Tensor, k: int, n_micro: int, seed: int, comm: Comm
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ward on the cells themselves (up to ``n_micro`` in one process) or on ``n_micro``
    weighted K-means micro-clusters (more cells; sharded, at most half the cells, and every
    rank gets the same groups). Returns the points merged (m, d, float64), their sizes and
    each point's group (each point its own when m <= k)."""
    n = int(comm.sum(torch.tensor(x.shape[0], dtype=torch.long)))
    if comm.world == 1 and n <= n_micro:
        cents = x.double()
        sizes = torch.ones(n, dtype=torch.float64, device=x.device)
    else:
        m = n_micro if comm.world == 1 else min(n_micro, max(k, n // 2))
        res = kmeans(x, m, n_init=1, max_iter=20, seed=seed, comm=comm)
        sizes = comm.sum(torch.bincount(res.labels, minlength=m).to(torch.float64))
        keep = sizes > 0
        cents, sizes = res.centroids[keep].double(), sizes[keep]
    groups = weighted_ward(cents.cpu().numpy(), sizes.cpu().numpy(), k)
    return cents, sizes.to(x.device), torch.as_tensor(groups, device=x.device)


def ward_seeds(
    x: torch.Tensor, k: int, *, n_micro: int = 1000, seed: int = 0, comm: Comm = LOCAL
) -> torch.Tensor | None:
    """Centroids (k, d) of a Ward partition of ``x``: a deterministic start for Lloyd.

    k-means++ restarts sample centres in proportion to squared distance, so on imbalanced data
    they keep spending a spare centre on a large class; Ward merges bottom-up and seeds the
    small classes. None when there are too few distinct micro-clusters for ``k`` groups."""
    cents, sizes, groups = _micro_ward(x, k, n_micro, seed, comm)
    if cents.shape[0] <= k:
        return None
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device)
    sums.index_add_(0, groups, cents * sizes[:, None])
    counts = torch.zeros(k, dtype=torch.float64, device=x.device).index_add_(0, groups, sizes)
    return (sums / counts[:, None]).to(x.dtype)
