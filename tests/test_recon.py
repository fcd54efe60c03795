"""The decoder head: its losses against reference formulas, the counts it reconstructs, when
it trains (count input or not), and the clustering space's PCA weight by cell count."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import nbinom

from cicl.config import CICLConfig, ConfigError, preset
from cicl.data.preprocess import preprocess
from cicl.data.synthetic import synthetic_adata
from cicl.model.losses import gaussian_nll, nb_nll
from cicl.train.loop import cluster_pca_weight, recon_kind, train


def test_nb_nll_matches_scipy():
    g = torch.Generator().manual_seed(0)
    counts = torch.poisson(torch.rand(6, 5, generator=g) * 20)
    logits = torch.randn(6, 5, generator=g)
    library = counts.sum(1) + 1.0
    log_theta = torch.randn(5, generator=g)
    got = float(nb_nll(counts, logits, library, log_theta))
    mu = (torch.softmax(logits, 1) * library[:, None]).numpy().astype(np.float64)
    theta = log_theta.exp().numpy().astype(np.float64)
    ref = -nbinom.logpmf(counts.numpy(), theta, theta / (theta + mu)).mean()
    assert abs(got - ref) < 1e-4 * max(1.0, abs(ref))


def test_nb_nll_is_lowest_at_the_true_mean():
    """The loss is a proper likelihood: the logits of the true shares beat shifted ones."""
    share = torch.tensor([[0.5, 0.3, 0.2]]).repeat(400, 1)
    library = torch.full((400,), 50.0)
    counts = torch.poisson(share * library[:, None], generator=torch.Generator().manual_seed(1))
    theta = torch.full((3,), 2.0).log()
    best = nb_nll(counts, share.log(), library, theta)
    worse = nb_nll(counts, torch.tensor([[0.2, 0.3, 0.5]]).log().repeat(400, 1), library, theta)
    assert best < worse


def test_gaussian_nll_is_mean_squared_error():
    a, b = torch.zeros(2, 3), torch.ones(2, 3) * 2
    assert float(gaussian_nll(a, b)) == pytest.approx(4.0)


def test_preprocess_keeps_the_raw_counts_of_the_genes_used():
    a = synthetic_adata(n_cells=120, n_genes=300, seed=2)
    prep = preprocess(a, CICLConfig().with_overrides({"preprocess.n_top_genes": 50}).preprocess)
    cols = a.var_names.get_indexer(prep.genes)
    assert prep.counts.shape == (120, 50)
    assert np.array_equal(prep.counts, a.X[:, cols].toarray())
    logged = a.copy()
    logged.X = logged.X.log1p()
    assert preprocess(logged, CICLConfig().preprocess).counts is None


def test_recon_kind_follows_the_input():
    cfg = CICLConfig()
    assert recon_kind(cfg, has_counts=True) == "nb"
    assert recon_kind(cfg, has_counts=False) == "gaussian"
    assert recon_kind(cfg.with_overrides({"loss.recon": "off", "loss.lam": 1.0}), True) is None
    with pytest.raises(ValueError, match="raw counts"):
        recon_kind(cfg.with_overrides({"loss.recon": "nb"}), has_counts=False)
    assert recon_kind(preset("reference"), True) is None  # the official code has no decoder


def test_a_loss_without_any_term_is_refused():
    with pytest.raises(ConfigError, match="no term"):
        CICLConfig().with_overrides({"loss.recon": "off"})


def test_pca_weight_falls_with_the_cell_count():
    cfg = CICLConfig()
    assert cluster_pca_weight(cfg, 56) == 2.0 and cluster_pca_weight(cfg, 1000) == 2.0
    assert cluster_pca_weight(cfg, 5000) == pytest.approx(0.5)
    assert cluster_pca_weight(cfg, 1_000_000) == pytest.approx(0.5)
    assert cluster_pca_weight(cfg, int(np.sqrt(1000 * 5000))) == pytest.approx(1.0, abs=1e-3)
    ws = [cluster_pca_weight(cfg, n) for n in (800, 1500, 3000, 4500, 6000)]
    assert ws == sorted(ws, reverse=True)
    assert cluster_pca_weight(cfg.with_overrides({"cluster.pca_weight": 3.0}), 9000) == 3.0


def _prepared(seed: int = 0):
    a = synthetic_adata(n_cells=240, n_genes=120, n_clusters=3, seed=seed)
    prep = preprocess(a, CICLConfig().with_overrides({"preprocess.n_pcs": 10}).preprocess)
    y = a.obs["cell_type"].cat.codes.to_numpy()
    return prep, y


def test_training_lowers_the_count_likelihood_loss_and_clusters(tiny_cfg):
    from sklearn.metrics import adjusted_rand_score

    prep, y = _prepared()
    cfg = tiny_cfg.with_overrides({"train.epochs": 12})
    res = train(prep.x, prep.pcs, 3, cfg, counts=prep.counts)
    rec = [r["recon_loss"] for r in res.history]
    assert rec[-1] < rec[0]
    assert all(r["instance_loss"] == 0.0 for r in res.history)  # default: no contrastive term
    assert adjusted_rand_score(y, res.labels) > 0.9


def test_the_gaussian_decoder_trains_without_counts(tiny_cfg):
    prep, _ = _prepared(1)
    res = train(prep.x, prep.pcs, 3, tiny_cfg.with_overrides({"train.epochs": 8}))
    rec = [r["recon_loss"] for r in res.history]
    assert rec[-1] < rec[0] and rec[0] > 0
