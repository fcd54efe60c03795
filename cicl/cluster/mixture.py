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

The "full" mixture (``refine_full``) goes one step further: each cluster gets its own
covariance, the posterior-mean estimate under an inverse-Wishart prior centred on the shared
covariance with ``prior * d`` pseudo-cells (a cluster of few cells keeps the shared metric; a
large one earns its own shape), never less than ``floor`` of it (so the rule stays a
refinement of the shared one however many cells a cluster has), and each cluster's log-
determinant enters the rule. A broad population then keeps its far cells instead of losing
them to a tight neighbour whose centroid happens to be nearer.

Only per-cluster sums, counts and scatter matrices (and the pooled scatter) are needed, each
reduced by ``comm.sum``: the same code runs in one process and on shards across Ray workers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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

    def scores(self, x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
        """(n, k) squared distances in the metric (what Student's t confidence is taken on)."""
        x = x.to(torch.float64)
        return torch.cdist(self.transform(x), self.transform(centroids.to(x))).pow(2)


@dataclass
class FullMetric:
    """The per-cluster mixture's rule: cell x goes to the cluster j with the lowest
    ``|(x - mu_j) @ whiten[j]|^2 + logdet[j]`` (a Gaussian's -2 log-likelihood, equal
    proportions, constants dropped)."""

    whiten: torch.Tensor  # (k, d, d): cov_j^-1 = W_j W_j^T
    logdet: torch.Tensor  # (k,): log det cov_j
    shrinkage: float  # Ledoit-Wolf weight of the isotropic target in the shared covariance
    n_iter: int
    prior: float  # pseudo-cells per dimension of the shared covariance in each cluster's
    floor: float  # least weight of the shared covariance in each cluster's

    def scores(self, x: torch.Tensor, centroids: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
        """(n, k) scores, offset so the best possible is 0: Mahalanobis distance squared plus
        the log-determinant's excess over the smallest one (the rule's own ranking, >= 0, so
        Student's t on it keeps the assigned cluster the most probable). k d x d products per
        cell: k times the shared rule's cost."""
        x = x.to(torch.float64)
        w = self.whiten.to(device=x.device, dtype=x.dtype)
        c = centroids.to(x)
        extra = (self.logdet - self.logdet.min()).to(x)
        out = x.new_empty(x.shape[0], len(c))
        for a in range(0, x.shape[0], chunk):  # memory O(chunk * d), whatever the cell count
            xb = x[a : a + chunk]
            for j in range(len(c)):
                out[a : a + chunk, j] = ((xb - c[j]) @ w[j]).pow(2).sum(1) + extra[j]
        return out

    def assign(self, x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
        """The best-scoring cluster for every row of ``x`` (none for an empty shard)."""
        return self.scores(x, centroids).argmin(1)


Metric = TiedMetric | FullMetric  # a final partition's assignment rule


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


def _centred(
    x: torch.Tensor, labels: torch.Tensor, k: int, comm: Comm
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global counts and means of a partition, this shard's rows centred on their cluster's
    mean (float64), and the global sum of their squared norms squared (Ledoit-Wolf's term)."""
    xd = x.to(torch.float64)
    counts = comm.sum(torch.bincount(labels, minlength=k).to(torch.float64))
    sums = comm.sum(xd.new_zeros(k, x.shape[1]).index_add_(0, labels, xd))
    cents = sums / counts.clamp_min(1)[:, None]
    r = xd - cents[labels]
    fourth = comm.sum(((r * r).sum(1) ** 2).sum())
    return counts, cents, r, fourth


def _metric(
    x: torch.Tensor, labels: torch.Tensor, k: int, comm: Comm
) -> tuple[torch.Tensor, TiedMetric]:
    """Centroids and the shared-covariance metric of a partition."""
    counts, cents, r, fourth = _centred(x, labels, k, comm)
    cov, s = ledoit_wolf(comm.sum(r.T @ r), fourth, float(counts.sum()))
    return cents, TiedMetric(_whitening(cov)[0], s, 0)


def _whitening(cov: torch.Tensor) -> tuple[torch.Tensor, float]:
    """W with cov^-1 = W W^T (inverse Cholesky factor, transposed), jittered if need be, and
    log det of the covariance W stands for; the identity (K-means' metric) when the clusters
    have no scatter at all (duplicated cells)."""
    d = cov.shape[0]
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    scale = float(torch.trace(cov)) / d
    if not scale > 0:
        return eye, 0.0
    for jitter in (1e-9, 1e-6, 1e-3):
        chol, info = torch.linalg.cholesky_ex(cov + jitter * scale * eye)
        if int(info) == 0:
            logdet = 2.0 * float(torch.log(torch.diagonal(chol)).sum())
            return torch.linalg.solve_triangular(chol, eye, upper=False).T, logdet
    return eye / scale**0.5, d * math.log(scale)


def shared_weight(prior: float, floor: float, d: int, n_k: float) -> float:
    """Weight of the shared covariance in a cluster's: ``prior * d`` pseudo-cells of it
    against the cluster's ``n_k`` cells (the inverse-Wishart posterior mean), at least
    ``floor``."""
    pseudo = prior * d
    w = 1.0 if pseudo + n_k <= 0 else pseudo / (pseudo + n_k)
    return max(floor, w)


def _full_metric(
    x: torch.Tensor, labels: torch.Tensor, k: int, prior: float, floor: float, comm: Comm
) -> tuple[torch.Tensor, FullMetric]:
    """Centroids and the per-cluster metric of a partition: every cluster's scatter is
    reduced (k d x d matrices), the shared covariance is their Ledoit-Wolf-shrunk sum."""
    counts, cents, r, fourth = _centred(x, labels, k, comm)
    d = x.shape[1]
    scatter = r.new_zeros(k, d, d)
    for j in range(k):
        rj = r[labels == j]
        scatter[j] = rj.T @ rj
    scatter = comm.sum(scatter)
    shared, s = ledoit_wolf(scatter.sum(0), fourth, float(counts.sum()))
    whiten, logdet = r.new_empty(k, d, d), r.new_empty(k)
    for j in range(k):
        n_k = float(counts[j])
        a = shared_weight(prior, floor, d, n_k)
        own = scatter[j] / n_k if n_k > 0 else shared
        whiten[j], logdet[j] = _whitening((1.0 - a) * own + a * shared)
    return cents, FullMetric(whiten, logdet, s, 0, prior, floor)


def _cem(
    x: torch.Tensor, labels: torch.Tensor, k: int, fit: Callable, max_iter: int, comm: Comm
) -> tuple[KMeansResult, Metric]:
    """Classification EM from ``labels``: ``fit`` the means and the metric, reassign, until no
    cell moves. A step that would empty a cluster is not taken (K clusters always come back).
    The result's centroids are the clusters' means and its inertia the Euclidean one, as
    K-means reports; the metric is the one fitted to the returned labels, which are its own
    assignment once no cell moves (not after a refused step or ``max_iter``)."""
    lab = labels.to(torch.long)
    cents, metric = fit(lab)
    n_iter = 0
    for n_iter in range(1, max_iter + 1):  # noqa: B007 - n_iter is reported
        new = metric.assign(x, cents)
        counts = comm.sum(torch.bincount(new, minlength=k).to(torch.float64))
        if bool((counts == 0).any()):
            break
        if int(comm.sum((new != lab).sum().to(torch.float64))) == 0:
            break  # converged: the metric is already the one fitted to these labels
        lab = new
        cents, metric = fit(lab)
    return fit_labels(x, lab, k, comm), replace(metric, n_iter=n_iter)


def refine_tied(
    x: torch.Tensor, labels: torch.Tensor, k: int, *, max_iter: int = 100, comm: Comm = LOCAL
) -> tuple[KMeansResult, TiedMetric]:
    """Classification EM of the shared-covariance mixture (``TiedMetric``), started from
    ``labels`` (``_cem``)."""
    return _cem(x, labels, k, lambda lab: _metric(x, lab, k, comm), max_iter, comm)


def refine_full(
    x: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    *,
    prior: float = 30.0,
    floor: float = 0.5,
    max_iter: int = 100,
    comm: Comm = LOCAL,
) -> tuple[KMeansResult, FullMetric]:
    """Classification EM of the per-cluster-covariance mixture (``FullMetric``), started from
    ``labels`` (``_cem``)."""
    return _cem(
        x, labels, k, lambda lab: _full_metric(x, lab, k, prior, floor, comm), max_iter, comm
    )
