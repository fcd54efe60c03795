"""Contrastive training across ranks is exact: with the instance and the cluster-aware terms
on, 2 gloo ranks holding one half each of a global batch get from ``train_step`` the losses
and the (DDP-averaged) gradients that one process gets on the whole batch. (Not the updated
weights: AdamW's first step is about lr x sign(gradient), and a bias before BatchNorm has a
gradient of zero up to rounding, so its step is +-lr by the rounding's sign.)
That needs the projections gathered with gradients summed back to their owner, and the
pseudo-labels and confidences gathered with them. With the gather broken (removed, without
gradients, or with gradients to the own slice only) the gradients differ: the check can fail."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from test_distributed import _spawn

from cicl.comm import Comm, TorchDistComm
from cicl.config import CICLConfig
from cicl.train.plan import build_model, recon_kind, train_step

B, G = 24, 20  # global batch (12 cells a rank), genes
SMALL = {  # small and deterministic: no dropout, so both sides draw no random numbers
    "model.transformer.dropout": 0.0,
    "model.transformer.n_tokens": 4,
    "model.transformer.d_model": 16,
    "model.transformer.n_heads": 2,
    "model.transformer.n_layers": 1,
    "model.transformer.ffn_dim": 32,
    "model.mlp_hidden": 32,
    "model.mlp_bottleneck": 16,
    "model.embed_dim": 8,
    "model.proj_hidden": 32,
    "model.proj_dim": 8,
    "train.device": "cpu",
    "loss.confidence": 0.3,  # some cells' pseudo-labels are ignored: `valid` is gathered too
}
CASES = {
    # the preset's loss terms: NT-Xent and the paper's cluster-aware loss, gene-module Transformer
    "contrastive": {"preset": "contrastive", **SMALL},
    # with the count decoder's companions: BatchNorm over the global batch and reconstruction
    "mlp_recon": {
        "preset": "contrastive",
        **SMALL,
        "model.encoder": "mlp",
        "loss.recon": "gaussian",
        "loss.instance_weight": 0.5,
        "loss.lam": 2.0,
    },
    # the official code's terms, on the Student's t kernel
    "code": {
        "preset": "contrastive",
        **SMALL,
        "loss.instance_loss": "code",
        "loss.cluster_loss": "code",
        "loss.kernel": "student_t",
    },
}


def _batch() -> tuple[torch.Tensor, ...]:
    """Two fixed views, clean profiles, pseudo-labels and confidences of the global batch.
    Label 2 lives on rank 1 only, so rank 0 needs rank 1's labels for its positives."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(B, G, generator=g)
    v1 = x + 0.5 * torch.randn(B, G, generator=g)
    v2 = x + 0.5 * torch.randn(B, G, generator=g)
    labels = torch.tensor([0, 1] * 6 + [0, 1, 2] * 4)
    conf = torch.rand(B, generator=g)
    return v1, v2, x, labels, conf


def _step(case: str, comm: Comm, rows: slice) -> dict:
    """``train_step`` on ``rows`` of the global batch, from the seeded initial model."""
    cfg = CICLConfig().with_overrides(CASES[case])
    groups = np.arange(G).reshape(4, 5)  # gene modules, the same on every rank
    torch.manual_seed(cfg.seed)
    model, net, opt = build_model(
        G, cfg, groups, None, torch.device("cpu"), comm, recon_kind(cfg, False)
    )
    v1, v2, x, labels, conf = (t[rows] for t in _batch())
    target = (x,) if model.decoder is not None else None
    li, lc, lr = train_step(net, opt, v1, v2, (labels, conf), cfg, comm, target)
    return {
        "losses": torch.tensor([li, lc, lr], dtype=torch.float64),
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
    }


class _NoGather(TorchDistComm):
    """The all-gather removed: every rank's loss over its own cells only."""

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def gather_grad(self, t: torch.Tensor) -> torch.Tensor:
        return t


class _NoGrad(TorchDistComm):
    """Gathered without gradients (``gather`` instead of ``gather_grad``)."""

    def gather_grad(self, t: torch.Tensor) -> torch.Tensor:
        return self.gather(t)


class _OwnSlice(TorchDistComm):
    """The gradient reaches the rank's own slice from its own loss only, not summed over ranks."""

    def gather_grad(self, t: torch.Tensor) -> torch.Tensor:
        parts = list(self.gather(t).split(t.shape[0]))
        parts[self.rank] = t
        return torch.cat(parts)


COMMS = {"exact": TorchDistComm, "no_gather": _NoGather, "no_grad": _NoGrad, "own": _OwnSlice}
BROKEN = ("no_gather", "no_grad", "own")


def _ranks(comm: TorchDistComm, out: str) -> None:
    half = B // comm.world
    rows = slice(comm.rank * half, (comm.rank + 1) * half)
    runs = [(case, "exact") for case in CASES] + [("contrastive", kind) for kind in BROKEN]
    got = {(case, kind): _step(case, COMMS[kind](), rows) for case, kind in runs}
    torch.save(got, os.path.join(out, f"r{comm.rank}.pt"))


@pytest.fixture(scope="module")
def ranks() -> tuple[dict, dict]:
    out = _spawn(_ranks)  # one group for every case: spawning dominates the cost
    r0, r1 = (torch.load(os.path.join(out, f"r{r}.pt")) for r in (0, 1))
    return r0, r1


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _close(a: dict, b: dict) -> bool:
    return all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_step_as_one_process_on_the_global_batch(ranks, case):
    one = _step(case, Comm(), slice(None))
    r0, r1 = (r[(case, "exact")] for r in ranks)
    li, lc, lr = one["losses"]
    assert li > 0 and lc > 0  # both contrastive terms active
    for r in (r0, r1):  # the contrastive losses are the global batch's on every rank
        assert torch.allclose(r["losses"][:2], one["losses"][:2], rtol=1e-5)
    # reconstruction: a mean over the rank's cells, the global mean over ranks (DDP's average)
    assert torch.allclose((r0["losses"][2] + r1["losses"][2]) / 2, lr, rtol=1e-5)
    assert any(float(g.abs().max()) > 1e-3 for g in one["grads"].values())
    for r in (r0, r1):
        assert _close(r["grads"], one["grads"]), _max_diff(r["grads"], one["grads"])


@pytest.mark.parametrize("kind", BROKEN)
def test_with_the_gather_broken_the_gradients_differ(ranks, kind):
    one = _step("contrastive", Comm(), slice(None))
    for r in ranks:
        assert not _close(r[("contrastive", kind)]["grads"], one["grads"])
