"""Losses: contrastive terms on L2-normalised projections ``z1``, ``z2`` (B, D) of two views,
and the reconstruction terms of the decoder head (negative binomial on counts, Gaussian).

``paper_cluster_loss`` is the cluster-aware loss as printed in arXiv 2312.16600: every
same-pseudo-label sample in both views is a positive (self excluded) and only different-label
samples form the denominator. ``code_cluster_loss`` is the official code's variant (twin as the
only positive, same-cluster cells removed, summed over clusters). Instance terms: symmetric
NT-Xent, or the code's one-directional cross-view InfoNCE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NEG_INF = -1e9


def similarity(a: torch.Tensor, b: torch.Tensor, kernel: str = "cosine") -> torch.Tensor:
    """Pairwise similarity logits: cosine (inputs L2-normalised) or the Student's t / Cauchy
    kernel log(1 / (1 + ||a - b||^2)), the same kernel as the clustering head, which keeps the
    embedding Euclidean (t-SimCNE-style) so K-means and PCA geometry stay meaningful."""
    if kernel == "cosine":
        return F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
    d2 = (a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None]
    return -torch.log1p(d2.clamp_min(0))


def ntxent(z1: torch.Tensor, z2: torch.Tensor, tau: float, kernel: str = "cosine") -> torch.Tensor:
    """SimCLR NT-Xent over 2B anchors: the twin is the positive, the other 2B-2 negatives."""
    z = torch.cat([z1, z2])
    n = z.shape[0]
    b = z1.shape[0]
    sim = similarity(z, z, kernel) / tau
    sim = sim.masked_fill(torch.eye(n, dtype=torch.bool, device=z.device), NEG_INF)
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(sim, target)


def code_instance_loss(
    z1: torch.Tensor, z2: torch.Tensor, tau: float, kernel: str = "cosine"
) -> torch.Tensor:
    """Official code's InfoNCE: view-1 anchors only, B cross-view candidates."""
    target = torch.arange(z1.shape[0], device=z1.device)
    return F.cross_entropy(similarity(z1, z2, kernel) / tau, target)


def _pairs(
    z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both views stacked (2B, D), their labels, validity, and the valid different-label mask."""
    z = torch.cat([z1, z2])
    lab = torch.cat([labels, labels])
    ok = torch.ones_like(lab, dtype=torch.bool) if valid is None else torch.cat([valid, valid])
    neg = (lab[:, None] != lab[None, :]) & ok[:, None] & ok[None, :]
    return z, lab, ok, neg


def paper_cluster_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    labels: torch.Tensor,
    tau: float,
    valid: torch.Tensor | None = None,
    kernel: str = "cosine",
) -> torch.Tensor:
    """Mean over anchors of -log(sum_pos exp(s/tau) / sum_neg exp(s/tau)).

    Anchors without a different-label sample in the batch (or not ``valid``) are skipped;
    invalid samples are neither positives nor negatives.
    """
    z, lab, ok, neg = _pairs(z1, z2, labels, valid)
    n = z.shape[0]
    sim = similarity(z, z, kernel) / tau
    same = (lab[:, None] == lab[None, :]) & ok[:, None] & ok[None, :]
    pos = same & ~torch.eye(n, dtype=torch.bool, device=z.device)
    anchors = ok & neg.any(1) & pos.any(1)
    if not anchors.any():
        return z.sum() * 0.0
    lpos = torch.logsumexp(sim.masked_fill(~pos, NEG_INF), dim=1)
    lneg = torch.logsumexp(sim.masked_fill(~neg, NEG_INF), dim=1)
    return (lneg - lpos)[anchors].mean()


def code_cluster_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    labels: torch.Tensor,
    tau: float,
    valid: torch.Tensor | None = None,
    kernel: str = "cosine",
) -> torch.Tensor:
    """Official code's ``CirculatePairConLoss``: per cluster c, anchors are both views of its
    cells, the positive is the twin, negatives are both views of other-label cells; the mean
    over the cluster's anchors is summed over clusters."""
    b = z1.shape[0]
    z, lab, ok, neg = _pairs(z1, z2, labels, valid)
    sim = similarity(z, z, kernel) / tau
    twin = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    s_pos = sim[torch.arange(2 * b, device=z.device), twin]
    lneg = torch.logsumexp(sim.masked_fill(~neg, NEG_INF), dim=1)
    per_anchor = torch.logaddexp(s_pos, lneg) - s_pos
    per_anchor = torch.where(neg.any(1), per_anchor, torch.zeros_like(per_anchor))
    total = z.sum() * 0.0
    for c in torch.unique(lab[ok]):
        m = (lab == c) & ok
        total = total + per_anchor[m].mean()
    return total


def nb_nll(
    counts: torch.Tensor, logits: torch.Tensor, library: torch.Tensor, log_theta: torch.Tensor
) -> torch.Tensor:
    """Negative binomial negative log-likelihood of ``counts`` (B, G), mean over cells and
    genes, with mean mu = softmax(logits) * library and per-gene dispersion theta =
    exp(log_theta) (variance mu + mu^2 / theta)."""
    mu = torch.softmax(logits, dim=1) * library[:, None]
    theta = log_theta.exp()
    log_theta_mu = torch.log(theta + mu + 1e-8)
    ll = (
        torch.lgamma(counts + theta)
        - torch.lgamma(theta)
        - torch.lgamma(counts + 1.0)
        + theta * (log_theta - log_theta_mu)
        + counts * (torch.log(mu + 1e-8) - log_theta_mu)
    )
    return -ll.mean()


def gaussian_nll(x: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """Squared error of the scaled input (a unit-variance Gaussian), mean over cells and genes."""
    return F.mse_loss(pred, x)


INSTANCE_LOSSES = {"ntxent": ntxent, "code": code_instance_loss}
CLUSTER_LOSSES = {"paper": paper_cluster_loss, "code": code_cluster_loss}
