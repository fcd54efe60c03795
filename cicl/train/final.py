"""The final partition of the clustering space, and how a cell is assigned to it.

K-means with K (or fewer when the data resolve fewer, the rest split off as minority
sub-groups), the best of many restarts and a Ward start, then (``cluster.metric``) refined as a
Gaussian mixture whose fitted metric assigns cells: the same step for cells in memory, a
streamed sample, and cells mapped later (``predict``).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from cicl.cluster.kmeans import KMeansResult, fit_labels, kmeans, lloyd, split_minorities
from cicl.cluster.mixture import FullMetric, Metric, TiedMetric, refine_full, refine_tied
from cicl.cluster.ward import ward_seeds
from cicl.comm import Comm
from cicl.config import CICLConfig


def main_k(cfg: CICLConfig, k: int) -> int:
    """Clusters the final K-means forms: K, or fewer when ``cluster.cap_k`` is on and the data
    resolve fewer (``cluster.n_resolved``); the rest are split off as minority sub-groups."""
    if cfg.cluster.cap_k == "off" or cfg.cluster.n_resolved is None:
        return k
    return max(1, min(k, cfg.cluster.n_resolved))


def final_restarts(cfg: CICLConfig, n_cells: int) -> int:
    """Restarts of the final K-means (``cluster.final_n_init``; None: about 200,000
    cell-restarts, between ``cluster.n_init`` and 100). Restarts are cheap on small sets, where
    K-means' local optima differ most."""
    if cfg.cluster.final_n_init is not None:
        return cfg.cluster.final_n_init
    return int(min(100, max(cfg.cluster.n_init, 200_000 // max(n_cells, 1))))


def final_kmeans(h: torch.Tensor, k: int, cfg: CICLConfig, n: int, comm: Comm) -> KMeansResult:
    """The final partition: K-means with ``main_k`` clusters, then, if that is fewer than
    ``k``, minority sub-groups split off until there are ``k`` (``split_minorities``)."""
    k_main = main_k(cfg, k)
    res = _final_kmeans(h, k_main, cfg, n, comm)
    if k_main >= k:
        return res
    labels = split_minorities(h, res.labels, k_main, k, seed=cfg.seed, comm=comm)
    return replace(fit_labels(h, labels, k, comm), n_iter=res.n_iter)


def _final_kmeans(h: torch.Tensor, k: int, cfg: CICLConfig, n: int, comm: Comm) -> KMeansResult:
    """The lowest-inertia of ``final_restarts`` k-means++ restarts and (``cluster.ward_start``)
    one Lloyd run from Ward's centroids. One objective, more starts: nothing here looks at
    anything but the inertia."""
    best = kmeans(
        h, k, n_init=final_restarts(cfg, n), max_iter=cfg.cluster.max_iter, seed=cfg.seed, comm=comm
    )
    if cfg.cluster.ward_start:
        seeds = ward_seeds(h, k, seed=cfg.seed, comm=comm)
        if seeds is not None:
            warm = lloyd(h, seeds, max_iter=cfg.cluster.max_iter, comm=comm)
            if warm.inertia < best.inertia:
                best = warm
    return best


def final_partition(
    h: torch.Tensor, k: int, cfg: CICLConfig, n: int, comm: Comm
) -> tuple[KMeansResult, Metric | None]:
    """``final_kmeans``, then (``cluster.metric: tied`` / ``full``) refined as a shared-
    covariance Gaussian mixture (``refine_tied``) and (``full``) then as one with a covariance
    per cluster (``refine_full``); the metric says how cells are assigned."""
    c = cfg.cluster
    res = final_kmeans(h, k, cfg, n, comm)
    if c.metric == "euclidean":
        return res, None
    refined, metric = refine_tied(h, res.labels, k, max_iter=c.max_iter, comm=comm)
    if c.metric == "full":
        refined, metric = refine_full(
            h,
            refined.labels,
            k,
            prior=c.full_prior,
            floor=c.full_floor,
            max_iter=c.max_iter,
            comm=comm,
        )
    return replace(refined, n_iter=res.n_iter), metric


def metric_record(metric: Metric | None) -> dict[str, np.ndarray | float] | None:
    """A fitted metric as arrays (what ``TrainResult.metric``, ``uns`` and Ray's meta hold);
    a per-cluster one has a (k, d, d) ``whiten`` and its ``logdet``."""
    if metric is None:
        return None
    rec: dict[str, np.ndarray | float] = {
        "whiten": metric.whiten.cpu().numpy(),
        "shrinkage": float(metric.shrinkage),
        "iterations": int(metric.n_iter),
    }
    if isinstance(metric, FullMetric):
        rec |= {
            "logdet": metric.logdet.cpu().numpy(),
            "prior": float(metric.prior),
            "floor": float(metric.floor),
        }
    return rec


def load_metric(rec: dict | None) -> Metric | None:
    """The inverse of ``metric_record`` (None stays None: Euclidean assignment)."""
    if rec is None or "whiten" not in rec:
        return None
    whiten = torch.as_tensor(np.asarray(rec["whiten"], dtype=np.float64))
    shrinkage, n_iter = float(rec.get("shrinkage", 0.0)), int(rec.get("iterations", 0))
    if "logdet" in rec:
        logdet = torch.as_tensor(np.asarray(rec["logdet"], dtype=np.float64))
        prior, floor = float(rec.get("prior", 0.0)), float(rec.get("floor", 0.0))
        return FullMetric(whiten, logdet, shrinkage, n_iter, prior, floor)
    return TiedMetric(whiten=whiten, shrinkage=shrinkage, n_iter=n_iter)


def assign_cells(h: torch.Tensor, centroids: torch.Tensor, metric: Metric | None) -> torch.Tensor:
    """Nearest centroid: Euclidean, or under the final partition's fitted metric."""
    if metric is None:
        return torch.cdist(h, centroids.to(h.dtype)).argmin(1)
    return metric.assign(h, centroids)
