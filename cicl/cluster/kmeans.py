"""K-means in torch with seeded k-means++ and a pluggable reduction.

Shaped after faiss' map-reduce K-means: ``partial_stats`` turns a shard of points and the
current centroids into per-cluster sums, counts and inertia; ``comm.sum`` combines partials (the
identity in one process, an all-reduce across Ray workers). Update, empty-cluster refill
and convergence are the same functions everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cicl.comm import Comm

LOCAL = Comm()


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
    """Nearest centroid and its squared distance, in chunks so memory stays O(chunk * k).
    An empty shard (a rank holding none of a cluster's cells) gives empty results."""
    if x.shape[0] == 0:
        return x.new_zeros(0, dtype=torch.long), x.new_zeros(0)
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


def fit_labels(x: torch.Tensor, labels: torch.Tensor, k: int, comm: Comm = LOCAL) -> KMeansResult:
    """Centroids and inertia of a given partition (K-means' update step for fixed labels),
    summed over all shards; ``n_iter`` 0. An empty cluster's centroid is 0."""
    xd = x.to(torch.float64)
    sums = comm.sum(
        torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device).index_add_(0, labels, xd)
    )
    counts = comm.sum(torch.bincount(labels, minlength=k).to(torch.float64))
    cents = sums / counts.clamp_min(1)[:, None]
    inertia = float(comm.sum(((xd - cents[labels]) ** 2).sum()))
    return KMeansResult(cents.to(x.dtype), labels, inertia, 0)


def _offset(n_local: int, comm: Comm) -> int:
    """Global index of this rank's first row when shards are concatenated in rank order."""
    sizes = comm.gather(torch.tensor([n_local], dtype=torch.long))
    return int(sizes[: comm.rank].sum())


def _rows(x: torch.Tensor, gidx: torch.Tensor, offset: int, comm: Comm) -> torch.Tensor:
    """Rows at global indices ``gidx`` of the rank-ordered concatenation of all shards: each
    owner fills its rows, a sum-reduce hands them to everyone."""
    local = gidx - offset
    mine = (local >= 0) & (local < x.shape[0])
    out = torch.zeros(len(gidx), x.shape[1], dtype=torch.float64, device=x.device)
    out[mine] = x[local[mine]].to(torch.float64)
    return comm.sum(out).to(x.dtype)


def kmeans_pp(
    x: torch.Tensor, k: int, generator: torch.Generator, comm: Comm = LOCAL
) -> torch.Tensor:
    """Greedy k-means++ (2 + log k candidates per step, as sklearn), seeded.

    Distributed: every rank draws the same random numbers from a generator seeded alike, and
    candidates are found in the rank-ordered concatenation of the shards, so all ranks agree on
    every centre and the result equals the single-process run on the concatenated data."""
    n_local = x.shape[0]
    n = int(comm.sum(torch.tensor(n_local, dtype=torch.long)))
    offset = _offset(n_local, comm)
    n_trials = 2 + int(torch.log(torch.tensor(float(k))).item())
    first = torch.randint(n, (1,), generator=generator)
    c0 = _rows(x, first.to(x.device), offset, comm)
    centers = [c0[0]]
    closest = sq_dists(x, c0).squeeze(1)
    for _ in range(1, k):
        part = closest.double().sum()
        totals = comm.gather(part.reshape(1))  # per-rank potentials, rank order
        total = float(totals.sum())
        if total <= 0:  # all remaining points coincide with centres
            idx = torch.randint(n, (n_trials,), generator=generator)
        else:
            u = torch.rand(n_trials, generator=generator, dtype=torch.float64) * total
            before = float(totals[: comm.rank].sum())
            cum = torch.cumsum(closest.double(), 0).cpu() + before
            local = torch.searchsorted(cum, u)  # position within this shard's stretch
            inside = (u >= before) & (u < before + float(part)) & (local < n_local)
            idx = torch.where(inside, local + offset, torch.zeros_like(local))
            idx = comm.sum(idx).clamp_max(n - 1)
        cand = _rows(x, idx.to(x.device), offset, comm)  # (trials, d)
        d_cand = sq_dists(x, cand)  # (n_local, trials)
        pot = comm.sum(torch.minimum(closest[:, None], d_cand).double().sum(0))
        best = int(pot.argmin())
        centers.append(cand[best])
        closest = torch.minimum(closest, d_cand[:, best])
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
    x: torch.Tensor, c: torch.Tensor, empty: torch.Tensor, dist: torch.Tensor, comm: Comm = LOCAL
) -> torch.Tensor:
    """Move each empty centroid onto one of the points currently farthest from their centroid
    (over all shards: each rank offers its farthest points, all ranks pick the same ones)."""
    n_empty = int(empty.sum())
    if n_empty == 0:
        return c
    c = c.clone()
    m = min(n_empty, x.shape[0])
    top = torch.topk(dist, m).indices
    d_off = torch.full((n_empty,), -1.0, dtype=torch.float64, device=x.device)
    p_off = torch.zeros(n_empty, x.shape[1], dtype=x.dtype, device=x.device)
    d_off[:m], p_off[:m] = dist[top].double(), x[top]
    d_all, p_all = comm.gather(d_off), comm.gather(p_off)
    order = torch.argsort(d_all, descending=True, stable=True)
    for j, e in enumerate(torch.nonzero(empty).flatten().tolist()):
        c[e] = p_all[order[j % len(order)]]
    return c


def _mean_variance(x: torch.Tensor, comm: Comm) -> float:
    """Mean per-feature variance over all shards: sklearn's scale for the tolerance."""
    xd = x.to(torch.float64)
    n = comm.sum(torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device))
    s1, s2 = comm.sum(xd.sum(0)), comm.sum(xd.pow(2).sum(0))
    return float((s2 / n - (s1 / n) ** 2).mean())


def lloyd(
    x: torch.Tensor,
    init: torch.Tensor,
    *,
    max_iter: int = 100,
    tol: float = 1e-4,
    comm: Comm = LOCAL,
) -> KMeansResult:
    """Lloyd iterations from ``init``; ``comm.sum`` adds partial statistics across shards."""
    c = init.clone()
    tol_abs = tol * _mean_variance(x, comm)
    n_iter = 0
    for n_iter in range(1, max_iter + 1):  # noqa: B007 - n_iter is reported
        sums, counts, _, _, dist = partial_stats(x, c)
        sums, counts = comm.sum(sums), comm.sum(counts)
        new, empty = update(sums, counts, c)
        new = refill_empty(x, new, empty, dist, comm)
        shift = (new - c).pow(2).sum().item()
        c = new
        if shift <= tol_abs:
            break
    _, _, inertia, lab, _ = partial_stats(x, c)
    return KMeansResult(c, lab, float(comm.sum(inertia).item()), n_iter)


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    n_init: int = 10,
    max_iter: int = 100,
    seed: int = 0,
    comm: Comm = LOCAL,
) -> KMeansResult:
    """Best of ``n_init`` seeded k-means++ + Lloyd runs, by inertia (``x`` is this rank's
    shard; every rank gets the same centroids)."""
    n = int(comm.sum(torch.tensor(x.shape[0], dtype=torch.long)))
    if k > n:
        raise ValueError(f"cannot form {k} clusters from {n} points")
    gen = torch.Generator().manual_seed(seed)
    best: KMeansResult | None = None
    for _ in range(n_init):
        init = kmeans_pp(x, k, gen, comm)
        res = lloyd(x, init, max_iter=max_iter, comm=comm)
        if best is None or res.inertia < best.inertia:
            best = res
    assert best is not None
    return best


N_QUANTILES = 101  # percentiles 0, 1, ..., 100


def distance_quantiles(
    x: np.ndarray, labels: np.ndarray, centroids: np.ndarray, n_q: int = N_QUANTILES
) -> np.ndarray:
    """(K, n_q) quantiles of each cluster's member-to-centroid distances (NaN rows for empty
    clusters): the reference against which a new cell's distance is judged typical or not."""
    d = np.linalg.norm(x - centroids[labels], axis=1)
    q = np.linspace(0.0, 1.0, n_q)
    out = np.full((len(centroids), n_q), np.nan, dtype=np.float32)
    for c in range(len(centroids)):
        dc = d[labels == c]
        if dc.size:
            out[c] = np.quantile(dc, q)
    return out


def distance_percentile(
    x: np.ndarray, labels: np.ndarray, centroids: np.ndarray, table: np.ndarray
) -> np.ndarray:
    """Per cell, the share (0-100) of its cluster's reference cells that lie closer to the
    centroid than it does, interpolated in ``distance_quantiles``' table. Near 100: farther
    out than almost every cell the cluster was fitted on, i.e. a state the reference may not
    hold. NaN where the cluster had no reference cells."""
    d = np.linalg.norm(x - centroids[labels], axis=1)
    q = np.linspace(0.0, 100.0, table.shape[1])
    out = np.full(len(x), np.nan, dtype=np.float32)
    for c in np.unique(labels):
        row = table[c]
        if np.isnan(row).any():
            continue
        m = labels == c
        out[m] = _interp_increasing(d[m], row, q)
    return out


def _interp_increasing(v: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """np.interp over quantiles that may repeat (ties): for a run of equal quantiles, the
    highest percentile of the run (a cell at that distance is not farther than any of them)."""
    xp_u, last = np.unique(xp[::-1], return_index=True)  # last occurrence of each value
    return np.interp(v, xp_u, fp[::-1][last], left=fp[0])  # below every member: 0


def split_minorities(
    x: torch.Tensor,
    labels: torch.Tensor,
    n_have: int,
    k: int,
    *,
    seed: int = 0,
    min_size: int = 3,
    max_frac: float = 0.10,
    n_init: int = 10,
    comm: Comm = LOCAL,
) -> torch.Tensor:
    """Raise a partition with labels ``0 .. n_have-1`` to ``k`` clusters by splitting off minority sub-groups, one at a time.

    K-means asked for more clusters than the data resolve cuts large populations in halves
    (ARI and biology both suffer); this spends the extra clusters on small distinct groups
    (rare cells) instead, moving as few cells as it can. Candidates are the smaller sides of
    ``n_init`` single-start 2-means runs of every cluster (different starts find different
    sub-groups; the best-inertia one is often a halving). A candidate of at least
    ``min_size`` cells and at most ``max_frac`` of its cluster qualifies; the qualifying one
    that lowers the inertia most is taken. When none qualifies, the smallest candidate of at
    least ``min_size`` cells is (the fewest cells moved), so there are always ``k`` clusters.
    Distributed: every 2-means and count runs through ``comm``, all ranks agree."""
    labels = labels.clone()
    cache: dict[int, list[_Split]] = {}
    for new in range(n_have, k):
        for c in range(new):
            if c not in cache:
                cache[c] = _split_candidates(x, labels, c, seed + n_init * c, n_init, comm)
        found = [s for c in range(new) for s in cache[c]]
        if not found:
            break
        good = [s for s in found if min_size <= s.size <= max_frac * s.n_parent]
        if good:
            pick = max(good, key=lambda s: s.gain)
        else:
            big_enough = [s for s in found if s.size >= min_size] or found
            pick = min(big_enough, key=lambda s: (s.size, -s.gain))
        labels[torch.nonzero(pick.mask).flatten()[pick.minor]] = new
        cache.pop(pick.parent)  # the two changed clusters get new candidates
    return labels


@dataclass
class _Split:
    """One candidate sub-group: the smaller side of a 2-means run of cluster ``parent``."""

    gain: float  # inertia removed by splitting it off
    size: int  # its cells, over all shards
    n_parent: int
    parent: int
    mask: torch.Tensor  # the parent's cells (this shard)
    minor: torch.Tensor  # which of them form the sub-group


def _split_candidates(
    x: torch.Tensor, labels: torch.Tensor, parent: int, seed: int, n_init: int, comm: Comm
) -> list[_Split]:
    """The sub-groups ``n_init`` single-start 2-means runs of cluster ``parent`` find."""
    mask = labels == parent
    n_c = int(comm.sum(mask.sum().to(torch.long)))
    if n_c < 2:
        return []
    xc = x[mask]
    sse = fit_labels(xc, torch.zeros(len(xc), dtype=torch.long, device=x.device), 1, comm).inertia
    out = []
    for i in range(n_init):
        two = kmeans(xc, 2, n_init=1, seed=seed + i, comm=comm)
        sizes = comm.sum(torch.bincount(two.labels, minlength=2).to(torch.float64))
        small = int(sizes.argmin())
        out.append(
            _Split(sse - two.inertia, int(sizes[small]), n_c, parent, mask, two.labels == small)
        )
    return out
