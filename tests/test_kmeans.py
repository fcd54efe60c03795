import numpy as np
import pytest
import torch
from sklearn.cluster import AgglomerativeClustering, KMeans
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score

from cicl.cluster.kmeans import (
    distance_percentile,
    distance_quantiles,
    kmeans,
    kmeans_pp,
    lloyd,
    partial_stats,
    split_minorities,
)
from cicl.cluster.ward import ward_seeds, weighted_ward
from cicl.model.modules import student_t


def _blobs(n=600, k=5, seed=0):
    x, y = make_blobs(n_samples=n, centers=k, n_features=8, cluster_std=1.5, random_state=seed)
    return torch.tensor(x, dtype=torch.float32), y


def test_inertia_matches_sklearn():
    x, _ = _blobs()
    ours = kmeans(x, 5, n_init=10, seed=0)
    ref = KMeans(5, n_init=10, random_state=0).fit(x.numpy())
    assert ours.inertia <= ref.inertia_ * 1.001


def test_kmeans_recovers_planted_clusters_and_is_seeded():
    x, y = _blobs(seed=3)
    a = kmeans(x, 5, n_init=5, seed=7)
    b = kmeans(x, 5, n_init=5, seed=7)
    assert adjusted_rand_score(y, a.labels.numpy()) > 0.95
    assert torch.equal(a.labels, b.labels)


def test_shard_partials_sum_to_whole():
    x, _ = _blobs()
    c = kmeans_pp(x, 5, torch.Generator().manual_seed(0))
    whole = partial_stats(x, c)
    parts = [partial_stats(s, c) for s in (x[:250], x[250:])]
    for i in range(3):
        assert torch.allclose(whole[i], parts[0][i] + parts[1][i])


def test_lloyd_with_sum_reduce_over_shards_equals_single_process():
    """Two shards, stats summed by the reduce hook, give the single-process centroids."""
    x, _ = _blobs()
    init = kmeans_pp(x, 5, torch.Generator().manual_seed(1))
    single = lloyd(x, init)
    # emulate an all-reduce: each shard's partial is added to the other's in the reduce
    shards = (x[:300], x[300:])
    import cicl.cluster.kmeans as km

    def run_sharded():
        c = init.clone()
        for _ in range(100):
            stats = [km.partial_stats(s, c) for s in shards]
            sums = stats[0][0] + stats[1][0]
            counts = stats[0][1] + stats[1][1]
            new, _ = km.update(sums, counts, c)
            if torch.allclose(new, c):
                break
            c = new
        return c

    assert torch.allclose(run_sharded(), single.centroids, atol=1e-5)


def test_empty_cluster_is_refilled_with_duplicates():
    x = torch.cat([torch.zeros(50, 2), torch.ones(50, 2) * 5, torch.tensor([[20.0, 20.0]])])
    init = torch.tensor([[0.0, 0.0], [5.0, 5.0], [100.0, 100.0]])  # third starts empty
    res = lloyd(x, init)
    assert torch.bincount(res.labels, minlength=3).min() >= 1


def test_student_t_rows_sum_to_one_and_argmax_is_nearest():
    h = torch.randn(40, 4)
    c = torch.randn(3, 4)
    q = student_t(h, c, alpha=1.0)
    assert torch.allclose(q.sum(1), torch.ones(40))
    assert torch.equal(q.argmax(1), torch.cdist(h, c).argmin(1))
    q5 = student_t(h, c, alpha=5.0)
    assert not torch.allclose(q, q5)  # alpha changes the soft assignment, not the argmax
    assert torch.equal(q5.argmax(1), q.argmax(1))


def test_ward_matches_sklearn_on_points():
    x, _ = _blobs(n=200, seed=2)
    ours = weighted_ward(x.numpy(), np.ones(200), 5)  # what ward_seeds merges up to n_micro cells
    ref = AgglomerativeClustering(5).fit_predict(x.numpy())
    assert adjusted_rand_score(ref, ours) > 0.99


def test_weighted_ward_respects_weights():
    # three points on a line; a heavy middle point merges with its nearer neighbour
    c = np.array([[0.0], [1.0], [2.2]])
    assert list(weighted_ward(c, np.array([1.0, 1.0, 1.0]), 2)) == [0, 0, 1]
    assert len(set(weighted_ward(c, np.array([1.0, 50.0, 1.0]), 2))) == 2


def test_distance_percentile_reads_new_distances_against_the_cluster_members():
    # cluster 0: members at distances 0, 1, ..., 100 from its centroid; cluster 1 empty
    x = np.c_[np.arange(101.0), np.zeros(101)]
    cents = np.array([[0.0, 0.0], [500.0, 0.0]])
    table = distance_quantiles(x, np.zeros(101, dtype=int), cents)
    assert table.shape == (2, 101) and np.isnan(table[1]).all()
    new = np.array([[0.0, 0.0], [0.0, 37.5], [-99.0, 0.0], [0.0, 250.0], [500.0, 1.0]])
    pct = distance_percentile(new, np.array([0, 0, 0, 0, 1]), cents, table)
    assert np.allclose(pct[:4], [0.0, 37.5, 99.0, 100.0])
    assert np.isnan(pct[4])  # a cluster without reference cells has no scale to judge by


def test_distance_percentile_with_tied_distances():
    # every member at distance 1: a new cell at that distance is not beyond any of them
    x = np.c_[np.ones(10), np.zeros(10)]
    cents = np.zeros((1, 2))
    table = distance_quantiles(x, np.zeros(10, dtype=int), cents)
    pct = distance_percentile(
        np.array([[1.0, 0.0], [0.5, 0.0], [2.0, 0.0]]), np.zeros(3, int), cents, table
    )
    assert np.allclose(pct, [100.0, 0.0, 100.0])


@pytest.mark.parametrize("seed", [0, 3])
def test_ward_start_escapes_the_kmeans_pp_optimum_on_imbalanced_classes(seed):
    # eight classes of 300 down to 6 cells: ten k-means++ restarts all keep splitting a large
    # class; Lloyd from Ward's centroids reaches a lower inertia, which is the true partition
    from cicl.comm import Comm
    from cicl.config import CICLConfig
    from cicl.train.loop import final_kmeans

    x, y = make_blobs(
        n_samples=[300, 200, 100, 40, 20, 10, 10, 6],
        n_features=5,
        center_box=(-8, 8),
        random_state=seed,
    )
    x = torch.tensor(x, dtype=torch.float32)
    seeds = ward_seeds(x, 8)
    assert seeds is not None and seeds.shape == (8, 5)
    cfg = CICLConfig().with_overrides({"seed": seed, "cluster.final_n_init": 10})
    plain = final_kmeans(x, 8, cfg.with_overrides({"cluster.ward_start": False}), len(x), Comm())
    best = final_kmeans(x, 8, cfg, len(x), Comm())
    assert best.inertia < plain.inertia  # the one objective decides, nothing else
    assert adjusted_rand_score(y, best.labels.numpy()) == pytest.approx(1.0)
    assert adjusted_rand_score(y, plain.labels.numpy()) < 0.9


def _big_far_small(seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """A big blob, a second blob, and a small distinct group beside the big one (truth 0/1/2)."""
    g = torch.Generator().manual_seed(seed)
    big = torch.randn(500, 4, generator=g)
    other = torch.randn(300, 4, generator=g) + torch.tensor([0.0, 30.0, 0.0, 0.0])
    small = torch.randn(15, 4, generator=g) * 0.3 + torch.tensor([12.0, 0.0, 0.0, 0.0])
    truth = np.repeat([0, 1, 2], [500, 300, 15])
    return torch.cat([big, other, small]), truth


def test_split_minorities_spends_the_extra_cluster_on_the_small_distinct_group():
    x, truth = _big_far_small()
    start = torch.tensor(np.where(truth == 1, 1, 0))  # the small group hides in cluster 0
    out = split_minorities(x, start, 2, 3, seed=0)
    assert torch.equal(out, torch.tensor(truth))  # found exactly; nothing else moved
    assert torch.equal(split_minorities(x, start, 2, 3, seed=0), out)  # seeded
    assert torch.equal(split_minorities(x, start, 2, 2), start)  # already k: unchanged


def test_split_minorities_falls_back_to_the_best_split_when_no_minority_qualifies():
    """Two equal halves under one label: no side is <= max_frac, yet k clusters come back."""
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(200, 3, generator=g), torch.randn(200, 3, generator=g) + 20])
    out = split_minorities(x, torch.zeros(400, dtype=torch.long), 1, 2)
    assert adjusted_rand_score(np.repeat([0, 1], 200), out.numpy()) == 1.0
    # a minority below min_size is not taken while a qualifying one exists
    x2, truth = _big_far_small()
    two_cells = torch.tensor([[0.0, 30.0, 40.0, 0.0], [0.0, 30.0, 40.5, 0.0]])
    x2 = torch.cat([x2, two_cells])
    start = torch.tensor(np.r_[np.where(truth == 1, 1, 0), 1, 1])
    out2 = split_minorities(x2, start, 2, 3, min_size=3)
    assert out2[-2:].tolist() == [1, 1] and (out2[800:815] == 2).all()
