"""The shared-covariance mixture that refines the final K-means partition."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.covariance import ledoit_wolf as sk_ledoit_wolf
from sklearn.metrics import adjusted_rand_score

from cicl.cluster.kmeans import kmeans
from cicl.cluster.mixture import FullMetric, ledoit_wolf, refine_full, refine_tied, shared_weight
from cicl.train.loop import assign_cells, load_metric, metric_record


@pytest.mark.parametrize(("n", "d"), [(30, 50), (500, 20), (90, 82)])
def test_ledoit_wolf_from_sums_matches_sklearn(n, d):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    ref, ref_s = sk_ledoit_wolf(x, assume_centered=True)
    xt = torch.from_numpy(x)
    cov, s = ledoit_wolf(xt.T @ xt, ((xt * xt).sum(1) ** 2).sum(), n)
    assert s == pytest.approx(ref_s, abs=1e-10)
    np.testing.assert_allclose(cov.numpy(), ref, atol=1e-8 * np.abs(ref).max())


def _stretched(seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Three types side by side (900 / 300 / 300 cells), every cell scattered along one shared
    slanted direction (a nuisance such as depth) much more than the types are apart."""
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((s,), i) for i, s in enumerate((900, 300, 300))])
    z = torch.randn(len(y), 2, generator=g) * torch.tensor([4.0, 0.4])
    c, s = math.cos(0.6), math.sin(0.6)
    z = z @ torch.tensor([[c, s], [-s, c]])
    means = torch.tensor([[0.0, 0.0], [4.0, 0.0], [8.0, 0.0]])
    x = torch.cat([means[y] + z, torch.randn(len(y), 3, generator=g) * 0.4], 1)
    return x, y.numpy()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_refinement_follows_a_shared_stretch_kmeans_cuts_across(seed):
    x, y = _stretched(seed)
    km = kmeans(x, 3, n_init=10, seed=seed)
    res, metric = refine_tied(x, km.labels, 3)
    before = adjusted_rand_score(y, km.labels.numpy())
    after = adjusted_rand_score(y, res.labels.numpy())
    assert before < 0.3 and after > before + 0.2
    assert metric.shrinkage < 0.05  # 1,500 cells in 5 dimensions: the covariance is trusted
    # the returned labels are the metric's own assignment (what predict and streaming use)
    again = assign_cells(x, res.centroids, load_metric(metric_record(metric)))
    assert torch.equal(again, res.labels)
    # centroids and inertia as K-means reports them: the clusters' means, Euclidean
    means = torch.stack([x[res.labels == c].mean(0) for c in range(3)])
    assert torch.allclose(res.centroids, means, atol=1e-5)


def test_few_cells_per_dimension_shrink_to_kmeans_metric():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 40, generator=g)
    km = kmeans(x, 3, seed=0)
    res, metric = refine_tied(x, km.labels, 3)
    assert metric.shrinkage > 0.7
    assert len(torch.unique(res.labels)) == 3


def test_a_step_that_would_empty_a_cluster_is_not_taken():
    """A cluster of two cells, one inside each of two large groups: both are nearer their
    group's centre than their own midpoint, so the next step would empty it; K clusters come
    back."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 2, generator=g) * 0.3 + torch.tensor([[-3.0], [3.0]]).repeat(200, 1)
    x = torch.cat([x, torch.tensor([[-3.0, -3.1], [3.0, 3.1]])])
    labels = torch.cat([torch.tensor([0, 1]).repeat(200), torch.full((2,), 2)])
    res, _ = refine_tied(x, labels, 3)
    assert torch.bincount(res.labels, minlength=3).tolist() == [200, 200, 2]


@pytest.mark.parametrize("refine", [refine_tied, refine_full])
def test_clusters_without_scatter_keep_their_cells(refine):
    """Duplicated cells: every cluster one repeated point, no within-cluster scatter at all;
    the metric falls back to K-means' and nothing moves (no Cholesky failure)."""
    x = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]]).repeat_interleave(4, 0)
    labels = torch.arange(3).repeat_interleave(4)
    res, metric = refine(x, labels, 3)
    assert torch.equal(res.labels, labels)
    eye = torch.eye(2, dtype=torch.float64)
    assert torch.equal(metric.whiten, eye if refine is refine_tied else eye.expand(3, 2, 2))


def test_full_refinement_keeps_a_one_cell_cluster():
    """A cluster of one cell has no scatter of its own: it takes the shared covariance (no
    singular matrix, no log-determinant of minus infinity pulling every cell into it)."""
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(200, 4, generator=g), torch.randn(200, 4, generator=g) + 6.0])
    x = torch.cat([x, torch.full((1, 4), 3.0)])
    labels = torch.cat([torch.zeros(200), torch.ones(200), torch.full((1,), 2)]).long()
    res, metric = refine_full(x, labels, 3)
    assert torch.bincount(res.labels, minlength=3).tolist() == [200, 200, 1]
    assert bool(torch.isfinite(metric.logdet).all())


def _broad_and_tight(seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """A broad type (1,000 cells, sd 2) with two tight ones (300 cells each, sd 0.3) beside
    it in 5 dimensions: K-means' equal balls give the tight types the broad one's near cells."""
    g = torch.Generator().manual_seed(seed)
    means = torch.zeros(3, 5)
    means[1, 0], means[2, 1] = 4.0, 6.0
    y = torch.cat([torch.full((s,), i) for i, s in enumerate((1000, 300, 300))])
    sd = torch.tensor([2.0, 0.3, 0.3])[y][:, None]
    return means[y] + sd * torch.randn(len(y), 5, generator=g), y.numpy()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_full_refinement_keeps_a_broad_population_whole(seed):
    x, y = _broad_and_tight(seed)
    km = kmeans(x, 3, n_init=10, seed=seed)
    tied, _ = refine_tied(x, km.labels, 3)
    full, metric = refine_full(x, tied.labels, 3)
    own, _ = refine_full(x, tied.labels, 3, prior=1.0, floor=0.0)  # clusters' own covariances
    tied_ari = adjusted_rand_score(y, tied.labels.numpy())
    assert tied_ari < 0.5
    assert adjusted_rand_score(y, full.labels.numpy()) > tied_ari + 0.1  # half shared, half own
    assert adjusted_rand_score(y, own.labels.numpy()) > 0.95
    # converged: the returned labels are the stored metric's own assignment
    again = assign_cells(x, full.centroids, load_metric(metric_record(metric)))
    assert torch.equal(again, full.labels)
    assert isinstance(load_metric(metric_record(metric)), FullMetric)


def test_full_rule_is_the_gaussian_likelihood_with_shrunk_covariances():
    """The rule against a brute-force one: each cluster's covariance rebuilt from its cells
    (the prior's weight, the floor, sklearn's Ledoit-Wolf shared covariance), scored by the
    Gaussian -2 log-likelihood with explicit inverses and log-determinants."""
    rng = np.random.default_rng(0)
    sizes, d = (400, 60, 25), 6
    y = np.repeat(np.arange(3), sizes)
    x = rng.normal(size=(len(y), d)) * rng.uniform(0.3, 2.0, size=(3, d))[y] + 3.0 * y[:, None]
    labels = torch.from_numpy(y)
    _, metric = refine_full(torch.from_numpy(x), labels, 3, prior=5.0, floor=0.3, max_iter=0)
    means = np.stack([x[y == j].mean(0) for j in range(3)])
    r = x - means[y]
    shared, _ = sk_ledoit_wolf(r, assume_centered=True)
    query = rng.normal(size=(200, d)) * 2.0 + 3.0
    brute = np.empty((len(query), 3))
    for j, n_j in enumerate(sizes):
        a = max(0.3, 5.0 * d / (5.0 * d + n_j))
        cov = (1 - a) * r[y == j].T @ r[y == j] / n_j + a * shared
        z = query - means[j]
        brute[:, j] = np.einsum("nd,de,ne->n", z, np.linalg.inv(cov), z) + np.linalg.slogdet(cov)[1]
    got = metric.scores(torch.from_numpy(query), torch.from_numpy(means)).numpy()
    offset = metric.logdet.min().item()  # scores drop the smallest log-determinant
    np.testing.assert_allclose(got + offset, brute, rtol=1e-8, atol=1e-8)
    nearest = metric.assign(torch.from_numpy(query), torch.from_numpy(means))
    assert np.array_equal(nearest.numpy(), brute.argmin(1))


def test_shared_weight_prior_and_floor():
    assert shared_weight(30.0, 0.5, 10, 100) == pytest.approx(0.75)  # 300 pseudo-cells, 100 own
    assert shared_weight(30.0, 0.5, 10, 10_000) == 0.5  # a large cluster: the floor holds
    assert shared_weight(0.0, 0.0, 10, 50) == 0.0  # no prior: the cluster's own covariance
    assert shared_weight(30.0, 0.0, 82, 15) > 0.99  # 15 cells in 82 dimensions: shared


def test_few_cells_per_dimension_keep_the_shared_metric():
    """30 cells in 40 dimensions: each cluster's covariance is nearly the shared one (the
    prior outweighs ten cells), so the per-cluster step moves no cell of the tied partition."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 40, generator=g)
    x[:10] += 3.0
    tied, _ = refine_tied(x, kmeans(x, 3, seed=0).labels, 3)
    full, metric = refine_full(x, tied.labels, 3)
    assert torch.equal(full.labels, tied.labels)
    assert metric.n_iter == 1


def test_tied_scores_are_whitened_squared_distances():
    """What `cicl predict` takes Student's t on for a model stored with the shared rule (the
    default before the per-cluster step; such stored models still load as ``TiedMetric``)."""
    x, _ = _stretched(0)
    res, metric = refine_tied(x, kmeans(x, 3, n_init=3, seed=0).labels, 3)
    loaded = load_metric(metric_record(metric))
    assert type(loaded) is type(metric)
    w = metric.whiten
    want = torch.cdist(x.double() @ w, res.centroids.double() @ w).pow(2)
    got = loaded.scores(x, res.centroids)
    assert torch.allclose(got, want, atol=1e-8)
    assert torch.equal(got.argmin(1), res.labels)
