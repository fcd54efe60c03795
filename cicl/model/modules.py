"""Encoders and heads.

``GeneModuleTransformer`` (default): genes are grouped into co-expression modules (balanced
K-means on their PCA loadings, computed once from the data); each module becomes one token
(its genes' expression times a per-module weight matrix plus a module embedding), a CLS token is
prepended, and a pre-norm Transformer lets modules attend to each other. Attention therefore
mixes many distinct tokens, unlike the official single-token encoder, where softmax over one key
is identically 1 and Q/K are dead.

``ReferenceEncoder``: the official code's encoder written as what it computes (method.md 2.2):
residual MLP blocks at width G with a non-learnable LayerNorm, so the embedding dimension is G.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cicl.comm import Comm
from cicl.config import ModelConfig


def balanced_gene_groups(loadings: np.ndarray, n_groups: int, seed: int = 0) -> np.ndarray:
    """Split genes into ``n_groups`` co-expression modules of (almost) equal size.

    K-means on the cosine-normalised gene loadings gives module centres; genes are then
    assigned greedily, nearest pair first, to centres with free capacity ceil(G / n_groups).
    Returns an index matrix (n_groups, capacity) into genes, padded with G (a zero column).
    """
    from cicl.cluster.kmeans import kmeans

    g = loadings.shape[0]
    n_groups = min(n_groups, g)
    cap = -(-g // n_groups)
    v = loadings / np.maximum(np.linalg.norm(loadings, axis=1, keepdims=True), 1e-12)
    vt = torch.from_numpy(v.astype(np.float32))
    res = kmeans(vt, n_groups, n_init=3, seed=seed)
    d = torch.cdist(vt, res.centroids).numpy()
    order = np.argsort(d, axis=None, kind="stable")
    owner = np.full(g, -1)
    fill = np.zeros(n_groups, dtype=int)
    for flat in order:
        gene, grp = divmod(int(flat), n_groups)
        if owner[gene] >= 0 or fill[grp] >= cap:
            continue
        owner[gene] = grp
        fill[grp] += 1
    idx = np.full((n_groups, cap), g, dtype=np.int64)
    for grp in range(n_groups):
        members = np.flatnonzero(owner == grp)
        idx[grp, : len(members)] = members
    return idx


RESIDUAL_INIT = 0.1  # the PCA residual branch's output layer starts at this scale


def pca_skip(
    n_genes: int, cfg: ModelConfig, pca_init: tuple[np.ndarray, np.ndarray] | None, out: nn.Linear
) -> nn.Linear | None:
    """Optional PCA residual path (``model.pca_residual``): h = PCA(x) + branch(x), with the
    branch's output layer ``out`` shrunk (``RESIDUAL_INIT``) so training starts near the PCA
    embedding."""
    if pca_init is None:
        return None
    w, b = pca_init
    skip = nn.Linear(n_genes, cfg.embed_dim)
    with torch.no_grad():
        skip.weight.copy_(torch.as_tensor(w, dtype=torch.float32))
        skip.bias.copy_(torch.as_tensor(b, dtype=torch.float32))
        out.weight.mul_(RESIDUAL_INIT)
        out.bias.zero_()
    return skip


class GeneModuleTransformer(nn.Module):
    def __init__(
        self,
        n_genes: int,
        groups: np.ndarray,
        cfg: ModelConfig,
        pca_init: tuple[np.ndarray, np.ndarray] | None = None,
    ):
        super().__init__()
        t, s = groups.shape
        tc = cfg.transformer
        self.register_buffer("groups", torch.as_tensor(groups, dtype=torch.long))
        self.tok_w = nn.Parameter(torch.randn(t, s, tc.d_model) / np.sqrt(s))
        self.tok_b = nn.Parameter(torch.zeros(t, tc.d_model))  # module identity embedding
        nn.init.normal_(self.tok_b, std=0.02)
        self.cls = nn.Parameter(torch.zeros(1, 1, tc.d_model))
        layer = nn.TransformerEncoderLayer(
            tc.d_model,
            tc.n_heads,
            tc.ffn_dim,
            tc.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, tc.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(tc.d_model)
        self.readout = tc.readout
        d_out = tc.d_model * (t if tc.readout == "tokens" else 1)
        self.out = nn.Linear(d_out, cfg.embed_dim)
        self.embed_dim = cfg.embed_dim
        self.skip = pca_skip(n_genes, cfg, pca_init, self.out)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        xp = F.pad(x, (0, 1))  # column G is the zero padding gene
        xg = xp[:, self.groups]  # (B, T, S)
        return torch.einsum("bts,tsd->btd", xg, self.tok_w) + self.tok_b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tok = self.tokens(x)
        cls = self.cls.expand(x.shape[0], -1, -1)
        h = torch.cat([cls, tok], dim=1)
        h = self.norm(self.blocks(h))
        h = h[:, 1:].flatten(1) if self.readout == "tokens" else h[:, 0]
        out = self.out(h)
        return out if self.skip is None else out + self.skip(x)


class _RefBlock(nn.Module):
    def __init__(self, g: int, hidden: int, dropout: float):
        super().__init__()
        self.v = nn.Linear(g, hidden, bias=False)
        self.o = nn.Linear(hidden, g, bias=False)
        self.ln1 = nn.LayerNorm(g)
        self.ln2 = nn.LayerNorm(g)
        self.ff = nn.Sequential(
            nn.Linear(g, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, g)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.layer_norm(self.o(self.v(x)) + x, x.shape[-1:])  # fresh, non-learnable LN
        s = self.ln1(x + self.drop(a))
        return self.ln2(s + self.drop(self.ff(s)))


class ReferenceEncoder(nn.Module):
    def __init__(self, n_genes: int, cfg: ModelConfig):
        super().__init__()
        self.blocks = nn.Sequential(
            *[
                _RefBlock(n_genes, cfg.reference.hidden, cfg.reference.dropout)
                for _ in range(cfg.reference.layers)
            ]
        )
        self.norm = nn.LayerNorm(n_genes)
        self.embed_dim = n_genes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(x))


def mlp(dims: list[int], batch_norm: bool, last_act: bool = False) -> nn.Sequential:
    """Linear layers through ``dims``, each but the last followed by BatchNorm (optional) and
    ReLU; ``last_act`` puts them after the last one too."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if last_act or i < len(dims) - 2:
            layers += [nn.BatchNorm1d(b)] if batch_norm else []
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm whose training statistics are the global batch's (every rank's cells), as
    in one process. torch's SyncBatchNorm runs only on GPUs; this one all-reduces the per-feature
    sums through ``comm`` (gloo or NCCL) with gradients. Only gradient-taking training
    forwards synchronise (every rank makes the same number of optimiser steps); other forwards
    use local statistics or, in eval mode, the running ones, as BatchNorm1d. Also used on CPU
    in one process: torch's CPU BatchNorm kernel splits its per-feature sums by thread, so the
    same seed trained other weights at another thread count; ``x.sum(0)`` does not."""

    def __init__(self, bn: nn.BatchNorm1d, comm: Comm):
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        self.load_state_dict(bn.state_dict())
        self.to(bn.weight.device if bn.affine else bn.running_mean.device)
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return super().forward(x)
        x = x.float()  # the sums in fp32 under autocast (a bf16 count or variance is off)
        d = x.shape[1]
        n = torch.full((1,), float(x.shape[0]), dtype=x.dtype, device=x.device)
        s = self.comm.sum_grad(torch.cat([x.sum(0), (x * x).sum(0), n]))
        total = s[-1]
        mean = s[:d] / total
        var = (s[d : 2 * d] / total - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum  # None: cumulative average, as BatchNorm1d
                m = 1.0 / float(self.num_batches_tracked) if m is None else m
                unbiased = var * total / (total - 1).clamp_min(1)
                self.running_mean.mul_(1 - m).add_(m * mean)
                self.running_var.mul_(1 - m).add_(m * unbiased)
        out = (x - mean) / torch.sqrt(var + self.eps)
        return out * self.weight + self.bias if self.affine else out


def global_batch_norm(model: nn.Module, comm: Comm) -> nn.Module:
    """Swap every BatchNorm1d in ``model`` for a ``GlobalBatchNorm1d`` over ``comm`` (same
    weights and statistics; the state dict keeps its keys, so saved models load either way):
    across ranks, and on CPU (thread-count-independent sums); one GPU keeps torch's kernel."""
    first = next(model.parameters(), None)
    if comm.world == 1 and first is not None and first.is_cuda:
        return model
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.BatchNorm1d) and not isinstance(child, GlobalBatchNorm1d):
                setattr(parent, name, GlobalBatchNorm1d(child, comm))
    return model


class MLPEncoder(nn.Module):
    """MLP encoder G -> mlp_hidden -> mlp_bottleneck -> embed_dim (the default). BatchNorm
    mattered (docs/model.md)."""

    def __init__(self, n_genes: int, cfg: ModelConfig, pca_init=None):
        super().__init__()
        dims = [n_genes, cfg.mlp_hidden, cfg.mlp_bottleneck, cfg.embed_dim]
        self.net = mlp(dims, cfg.batch_norm)
        self.embed_dim = cfg.embed_dim
        self.skip = pca_skip(n_genes, cfg, pca_init, self.net[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out if self.skip is None else out + self.skip(x)


class Decoder(nn.Module):
    """Reconstruction head: embedding -> mlp_bottleneck -> mlp_hidden -> one value per gene.
    ``nb``: the values are logits of each gene's share of the cell's counts (softmax), so the
    negative binomial mean is share x library size, with one learned dispersion per gene (as in
    scVI). ``gaussian``: the values predict the scaled input directly."""

    def __init__(self, d_in: int, n_genes: int, cfg: ModelConfig, kind: str):
        super().__init__()
        self.kind = kind
        dims = [d_in, cfg.mlp_bottleneck, cfg.mlp_hidden]
        self.net = mlp(dims, cfg.batch_norm, last_act=True)
        self.out = nn.Linear(cfg.mlp_hidden, n_genes)
        self.log_theta = nn.Parameter(torch.zeros(n_genes)) if kind == "nb" else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.net(h))


class ProjectionHead(nn.Module):
    def __init__(self, d_in: int, hidden: int, d_out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)  # the loss' kernel normalises (cosine) or not (Student's t)


def pca_projection(x: np.ndarray, pcs: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Weights (dim, G) and bias (dim,) of the linear map x -> top-``dim`` PC scores, scaled so
    the mean per-dimension variance is 1 (relative PC scales, and so K-means on it, unchanged)."""
    dim = min(dim, pcs.shape[1])
    p = pcs[:, :dim].astype(np.float64)
    mu = x.mean(0).astype(np.float64)
    v = ((x - mu).T.astype(np.float64) @ p) / np.maximum((p * p).sum(0), 1e-12)  # (G, dim)
    scale = np.sqrt(np.maximum(p.var(0).mean(), 1e-12))
    w = (v / scale).T
    b = -(mu @ v) / scale
    return w.astype(np.float32), b.astype(np.float32)


def student_t(h: torch.Tensor, centroids: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Soft assignment q_ik ∝ (1 + ||h_i - mu_k||^2 / alpha)^(-(alpha+1)/2) (DEC / the paper)."""
    return student_t_q(torch.cdist(h, centroids).pow(2), alpha)


def student_t_q(d2: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Student's t soft assignment from (n, k) squared distances, in whatever metric."""
    q = (1.0 + d2 / alpha).pow(-(alpha + 1.0) / 2.0)
    return q / q.sum(1, keepdim=True)


class CICLModel(nn.Module):
    """Encoder + projection head (for the contrastive terms) + decoder (reconstruction,
    ``recon`` = "nb" / "gaussian"; None: no decoder); the clustering head's centroids live in
    the training loop (they are re-fitted by K-means, not learned by gradient)."""

    def __init__(
        self,
        n_genes: int,
        cfg: ModelConfig,
        groups: np.ndarray | None = None,
        pca_init: tuple[np.ndarray, np.ndarray] | None = None,
        recon: str | None = None,
    ):
        super().__init__()
        if cfg.encoder == "transformer":
            if groups is None:
                raise ValueError("the transformer encoder needs gene groups")
            self.encoder: nn.Module = GeneModuleTransformer(n_genes, groups, cfg, pca_init)
        elif cfg.encoder == "mlp":
            self.encoder = MLPEncoder(n_genes, cfg, pca_init)
        else:
            self.encoder = ReferenceEncoder(n_genes, cfg)
        self.head = ProjectionHead(self.encoder.embed_dim, cfg.proj_hidden, cfg.proj_dim)
        self.decoder = (
            Decoder(self.encoder.embed_dim, n_genes, cfg, recon) if recon is not None else None
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Embedding, projection and (with a decoder) the reconstruction of every row.
        One call does all three, so under DDP every parameter is in the graph."""
        h = self.encoder(x)
        rec = self.decoder(h) if self.decoder is not None else None
        return h, self.head(h), rec
