"""A Gaussian mixture with one shared covariance, fitted by classification EM from a partition.

K-means scores a cell by its Euclidean distance to each centroid: every cluster is a ball of
the same radius. A population stretched along a direction that does not separate types
(sequencing depth, the cell cycle) is then cut across that direction, or loses its far cells to
a neighbour. The shared-covariance mixture learns those directions from the clusters' own
scatter: distances are Mahalanobis in the pooled within-cluster covariance (K-means in a
learned metric; LDA's metric, fitted without labels). The covariance is shrunk towards the
isotropic one by Ledoit-Wolf, so with few cells per dimension the metric stays close to
K-means' own and the partition barely moves. Mixing proportions are equal, as in K-means: with
each cluster's share as a prior, classification EM lets large clusters absorb small ones
step by step (a synthetic case lost a 300-cell type that way), and rare populations matter here.

Only per-cluster sums, counts and the pooled scatter are needed, each reduced by ``comm.sum``:
the same code runs in one process and on shards across Ray workers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from cicl.cluster.kmeans import LOCAL, KMeansResult, fit_labels
from cicl.cluster.kmeans import assign as assign_nearest
from cicl.comm import Comm


@dataclass
class TiedMetric:
    """The fitted mixture's assignment rule: ``x @ whiten`` has the identity as within-cluster
    covariance, and a cell goes to the nearest centroid there."""

    whiten: torch.Tensor  # (d, d)
    shrinkage: float  # Ledoit-Wolf weight of the isotropic target, in [0, 1]
    n_iter: int

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Cells (or centroids) in the whitened space, where the metric is Euclidean."""
        return x @ self.whiten.to(device=x.device, dtype=x.dtype)

    def assign(self, x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
        """Nearest centroid in the metric, for every row of ``x``."""
        x = x.to(torch.float64)
        return assign_nearest(self.transform(x), self.transform(centroids.to(x)))[0]


def ledoit_wolf(
    scatter: torch.Tensor, fourth: torch.Tensor, n: float
) -> tuple[torch.Tensor, float]:
    """Ledoit-Wolf shrunk covariance from sums over centred rows r: ``scatter`` = sum r r^T,
    ``fourth`` = sum |r|^4 (sklearn's ``ledoit_wolf`` formula, written on sums so shards can
    add theirs). Returns the covariance and the shrinkage towards mu * I."""
    d = scatter.shape[0]
    emp = scatter / n
    mu = torch.trace(emp) / d
    delta_ = (scatter**2).sum() / n**2
    beta = (fourth / n - delta_) / (d * n)
    delta = (delta_ - 2.0 * mu * torch.trace(emp) + d * mu**2) / d
    beta = torch.minimum(beta, delta)
    s = 0.0 if float(delta) <= 0 else float(beta / delta)
    s = min(max(s, 0.0), 1.0)
    eye = torch.eye(d, dtype=emp.dtype, device=emp.device)
    return (1.0 - s) * emp + s * mu * eye, s


def _metric(
    x: torch.Tensor, labels: torch.Tensor, k: int, comm: Comm
) -> tuple[torch.Tensor, TiedMetric]:
    """Centroids and the shared-covariance metric of a partition."""
    xd = x.to(torch.float64)
    counts = comm.sum(torch.bincount(labels, minlength=k).to(torch.float64))
    sums = comm.sum(xd.new_zeros(k, x.shape[1]).index_add_(0, labels, xd))
    cents = sums / counts.clamp_min(1)[:, None]
    r = xd - cents[labels]
    scatter = comm.sum(r.T @ r)
    fourth = comm.sum(((r * r).sum(1) ** 2).sum())
    n = float(counts.sum())
    cov, s = ledoit_wolf(scatter, fourth, n)
    return cents, TiedMetric(_whitening(cov), s, 0)


def _whitening(cov: torch.Tensor) -> torch.Tensor:
    """W with cov^-1 = W W^T (inverse Cholesky factor, transposed), jittered if need be; the
    identity (K-means' metric) when the clusters have no scatter at all (duplicated cells)."""
    d = cov.shape[0]
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    scale = float(torch.trace(cov)) / d
    if not scale > 0:
        return eye
    for jitter in (1e-9, 1e-6, 1e-3):
        chol, info = torch.linalg.cholesky_ex(cov + jitter * scale * eye)
        if int(info) == 0:
            return torch.linalg.solve_triangular(chol, eye, upper=False).T
    return eye / scale**0.5


def refine_tied(
    x: torch.Tensor, labels: torch.Tensor, k: int, *, max_iter: int = 100, comm: Comm = LOCAL
) -> tuple[KMeansResult, TiedMetric]:
    """Classification EM of the shared-covariance mixture, started from ``labels``: refit the
    means and the shrunk covariance, reassign, until no cell moves. A step that would
    empty a cluster is not taken (K clusters always come back). The result's centroids are the
    clusters' means and its inertia the Euclidean one, as K-means reports; the metric is refitted
    to the returned labels, which are its own assignment once no cell moves (not after a refused
    step or ``max_iter``)."""
    lab = labels.to(torch.long)
    cents, metric = _metric(x, lab, k, comm)
    n_iter = 0
    for n_iter in range(1, max_iter + 1):  # noqa: B007 - n_iter is reported
        new = metric.assign(x, cents)
        counts = comm.sum(torch.bincount(new, minlength=k).to(torch.float64))
        if bool((counts == 0).any()):
            break
        if int(comm.sum((new != lab).sum().to(torch.float64))) == 0:
            break  # converged: the metric is already the one fitted to these labels
        lab = new
        cents, metric = _metric(x, lab, k, comm)
    return fit_labels(x, lab, k, comm), replace(metric, n_iter=n_iter)
