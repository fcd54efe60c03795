"""K-means in torch with seeded k-means++ and a pluggable reduction.

Shaped after faiss' map-reduce K-means: ``partial_stats`` turns a shard of points and the
current centroids into per-cluster sums, counts and inertia; ``reduce`` combines partials (the
identity in one process, an all-reduce across Ray workers later). Update, empty-cluster refill
and convergence are the same functions everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]


def identity(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # (k, d)
    labels: torch.Tensor  # (n,) long
    inertia: float
    n_iter: int


def sq_dists(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (n, k), clamped at 0 (the expansion can go slightly negative)."""
    d = (x * x).sum(1, keepdim=True) - 2 * x @ c.T + (c * c).sum(1)[None]
    return d.clamp_min_(0)


def assign(
    x: torch.Tensor, c: torch.Tensor, chunk: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid and its squared distance, in chunks so memory stays O(chunk * k)."""
    labs, dists = [], []
    for i in range(0, x.shape[0], chunk):
        d = sq_dists(x[i : i + chunk], c)
        m, lab = d.min(1)
        labs.append(lab)
        dists.append(m)
    return torch.cat(labs), torch.cat(dists)


def partial_stats(
    x: torch.Tensor, c: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-cluster sums (k, d), counts (k,), inertia (scalar) of a shard; plus labels, dists."""
    lab, dist = assign(x, c)
    k = c.shape[0]
    sums = torch.zeros_like(c, dtype=torch.float64).index_add_(0, lab, x.to(torch.float64))
    counts = torch.bincount(lab, minlength=k).to(torch.float64)
    return sums, counts, dist.sum().to(torch.float64), lab, dist


def kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ (2 + log k candidates per step, as sklearn), seeded."""
    n = x.shape[0]
    n_trials = 2 + int(torch.log(torch.tensor(float(k))).item())
    first = torch.randint(n, (1,), generator=generator).item()
    centers = [x[first]]
    closest = sq_dists(x, x[first : first + 1]).squeeze(1)
    for _ in range(1, k):
        total = closest.sum()
        if total <= 0:  # all remaining points coincide with centres
            idx = torch.randint(n, (n_trials,), generator=generator)
        else:
            u = (
                torch.rand(n_trials, generator=generator, dtype=torch.float64).to(x.device)
                * total.item()
            )
            idx = torch.searchsorted(torch.cumsum(closest.double(), 0), u).clamp_max(n - 1)
        cand = sq_dists(x, x[idx])  # (n, trials)
        pot = torch.minimum(closest[:, None], cand).sum(0)
        best = int(pot.argmin())
        centers.append(x[idx[best]])
        closest = torch.minimum(closest, cand[:, best])
    return torch.stack(centers)


def update(
    sums: torch.Tensor, counts: torch.Tensor, old: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """New centroids = sums / counts; returns them and the mask of empty clusters."""
    empty = counts == 0
    new = (sums / counts.clamp_min(1)[:, None]).to(old.dtype)
    new[empty] = old[empty]
    return new, empty


def refill_empty(
    x: torch.Tensor, c: torch.Tensor, empty: torch.Tensor, dist: torch.Tensor
) -> torch.Tensor:
    """Move each empty centroid onto the point currently farthest from its centroid."""
    if not empty.any():
        return c
    c = c.clone()
    far = torch.argsort(dist, descending=True)
    for j, e in enumerate(torch.nonzero(empty).flatten().tolist()):
        c[e] = x[far[j % len(far)]]
    return c


def _mean_variance(x: torch.Tensor, reduce: Reduce) -> float:
    """Mean per-feature variance over all shards: sklearn's scale for the tolerance."""
    xd = x.to(torch.float64)
    n = reduce(torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device))
    s1, s2 = reduce(xd.sum(0)), reduce(xd.pow(2).sum(0))
    return float((s2 / n - (s1 / n) ** 2).mean())


def lloyd(
    x: torch.Tensor,
    init: torch.Tensor,
    *,
    max_iter: int = 100,
    tol: float = 1e-4,
    reduce: Reduce = identity,
) -> KMeansResult:
    """Lloyd iterations from ``init``; ``reduce`` sums partial statistics across shards."""
    c = init.clone()
    tol_abs = tol * _mean_variance(x, reduce)
    n_iter = 0
    for n_iter in range(1, max_iter + 1):  # noqa: B007 - n_iter is reported
        sums, counts, _, _, dist = partial_stats(x, c)
        sums, counts = reduce(sums), reduce(counts)
        new, empty = update(sums, counts, c)
        new = refill_empty(x, new, empty, dist)
        shift = (new - c).pow(2).sum().item()
        c = new
        if shift <= tol_abs:
            break
    _, _, inertia, lab, _ = partial_stats(x, c)
    return KMeansResult(c, lab, float(reduce(inertia).item()), n_iter)


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    n_init: int = 10,
    max_iter: int = 100,
    seed: int = 0,
    reduce: Reduce = identity,
) -> KMeansResult:
    """Best of ``n_init`` seeded k-means++ + Lloyd runs, by inertia."""
    if k > x.shape[0]:
        raise ValueError(f"cannot form {k} clusters from {x.shape[0]} points")
    gen = torch.Generator().manual_seed(seed)
    best: KMeansResult | None = None
    for _ in range(n_init):
        init = kmeans_pp(x, k, gen)
        res = lloyd(x, init, max_iter=max_iter, reduce=reduce)
        if best is None or res.inertia < best.inertia:
            best = res
    assert best is not None
    return best
