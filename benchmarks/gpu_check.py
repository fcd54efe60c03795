"""GPU check: cicl's own training step at atlas scale (no Ray, no AnnData needed).

Generates a clustered synthetic atlas directly on the device (``--cells`` x ``--genes``:
Poisson counts per cluster and their scaled log profile), builds cicl's ``TrainingPlan`` for
``--config`` (``default``: one augmented view, MLP encoder, count decoder with the negative
binomial loss, AdamW; ``contrastive``: two views, encoder + projection, instance + cluster-aware
loss with the cells' clusters as pseudo-labels) and times its ``step``: the augmentation with
mixing neighbours (here: random cells of the same cluster) and ``train_step`` in the precision
``train.precision`` gives it (``--precision``; auto: bf16 on a CUDA GPU). Reports training
cells/s, the step's FLOPs (``torch.utils.flop_counter``: forward and backward, the encoder's
share) and MFU against the GPU's dense bf16 peak, embedding throughput (cicl's ``embed``, fp32,
eval mode) and one distributed-ready K-means Lloyd pass over every cell. TF32 stays off, as
in cicl.

    python benchmarks/gpu_check.py --cells 1000000 --batch 8192 --out benchmarks/results
    python benchmarks/gpu_check.py --device cpu --cells 4000 --genes 256 --batch 256  # smoke
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

# dense bf16 tensor-core peak (no sparsity), FLOP/s
PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 70e12}


def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAKS.items() if k in name), None)


def synthetic(
    n: int, g: int, k: int, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scaled log profile, counts, cluster of each cell): each cluster draws its genes'
    expression shares, each cell a library size (log-normal, median ~2,000 counts) and Poisson
    counts around its cluster's shares; the profile is log1p of counts per 10,000, z-scored
    per gene."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shares = torch.softmax(torch.randn(k, g, generator=gen, device=device) * 1.5, dim=1)
    lab = torch.randint(k, (n,), generator=gen, device=device)
    counts = torch.empty(n, g, device=device)
    for i in range(0, n, 65536):
        sl = slice(i, min(i + 65536, n))
        lib = torch.exp(
            7.6 + 0.5 * torch.randn(sl.stop - sl.start, 1, generator=gen, device=device)
        )
        counts[sl] = torch.poisson(shares[lab[sl]] * lib, generator=gen)
    x = torch.log1p(counts / counts.sum(1, keepdim=True).clamp_min(1) * 1e4)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    for i in range(0, n, 65536):
        x[i : i + 65536] = ((x[i : i + 65536] - mean) / std).clamp_(-10, 10)
    return x, counts, lab


def same_cluster_neighbours(lab: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """(n, k) random cells of each cell's cluster: the mixing neighbours a step draws from (the
    kNN graph of a real fit costs more than this check is about)."""
    order = torch.argsort(lab)
    sizes = torch.bincount(lab)
    start = torch.cumsum(sizes, 0) - sizes
    u = torch.rand(len(lab), k, generator=gen, device=lab.device)
    return order[start[lab, None] + (u * sizes[lab, None]).long()]


def timer(device: torch.device):
    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    return now


def args_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", type=int, default=1_000_000)
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--clusters", type=int, default=20)
    ap.add_argument(
        "--batch",
        type=int,
        default=8192,
        help="cells per step (two views each for a contrastive step)",
    )
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument(
        "--config",
        default="default",
        choices=["default", "contrastive"],
        help="whose training step: the default (count decoder) or the contrastive preset",
    )
    ap.add_argument("--encoder", default=None, choices=["transformer", "mlp"])
    ap.add_argument("--d-model", type=int, default=None, help="override model.transformer.d_model")
    ap.add_argument(
        "--precision", default="auto", choices=["auto", "bf16", "fp32"], help="train.precision"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--out", default=None, help="folder for gpu_check.json / .md")
    return ap


def build_plan(args: argparse.Namespace, x: torch.Tensor, lab: torch.Tensor):
    """cicl's ``TrainingPlan`` for ``--config`` on this device, the cells' clusters as its
    pseudo-labels (the cluster-aware term's input once warm-up is over)."""
    from cicl.comm import Comm
    from cicl.config import CICLConfig, preset
    from cicl.model.modules import balanced_gene_groups
    from cicl.train.loop import gene_loadings
    from cicl.train.plan import TrainingPlan

    over = {
        "train.batch_size": args.batch,
        "train.device": args.device,
        "train.precision": args.precision,
    }
    if args.encoder:
        over["model.encoder"] = args.encoder
    if args.d_model:
        over["model.transformer.d_model"] = args.d_model
    base = preset("contrastive") if args.config == "contrastive" else CICLConfig()
    cfg = base.with_overrides(over)
    groups = None
    if cfg.model.encoder == "transformer":
        sample = x[: min(20000, args.cells)].float().cpu().numpy()
        sc = sample - sample.mean(0)
        pcs = sc @ np.linalg.svd(sc[:5000], full_matrices=False)[2][:50].T
        groups = balanced_gene_groups(gene_loadings(sample, pcs), cfg.model.transformer.n_tokens)
    plan = TrainingPlan(args.clusters, cfg, Comm(), (args.cells, args.genes), True, groups)
    plan.labels, plan.conf = lab, torch.ones(args.cells, device=lab.device)
    if args.compile:
        plan.model.encoder = torch.compile(plan.model.encoder)
    return plan


def step_flops(plan, batch, cluster_term: bool) -> tuple[int, int]:
    """FLOPs of one training step (forward and backward) and the encoder's part of them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        plan.step(batch, cluster_term)
    per_module = fc.get_flop_counts()
    encoder = sum(
        sum(ops.values()) for name, ops in per_module.items() if name.endswith(".encoder")
    )
    return fc.get_total_flops(), encoder


def main() -> None:
    args = args_parser().parse_args()
    from cicl.cluster.kmeans import lloyd
    from cicl.train.loop import embed
    from cicl.train.plan import Batch, autocast_dtype

    device = torch.device(args.device)
    now = timer(device)
    t = now()
    x, counts, lab = synthetic(args.cells, args.genes, args.clusters, device)
    lib = counts.sum(1)
    t_gen = now() - t
    plan = build_plan(args, x, lab)
    cfg, b = plan.cfg, args.batch
    nbr = same_cluster_neighbours(lab, cfg.augment.n_neighbors, plan.gen)
    cluster_term = cfg.loss.lam > 0  # after warm-up, as most of a run's steps

    def batch() -> Batch:
        idx = torch.randint(args.cells, (b,), device=device, generator=plan.gen)
        return Batch(idx, idx, x, nbr, counts, lib)

    plan.model.train()
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            t = now()
        plan.step(batch(), cluster_term)
    t_step = (now() - t) / args.steps
    flops, enc_flops = step_flops(plan, batch(), cluster_term)

    # embedding pass over every cell (cicl's embed: eval mode, fp32) + one K-means Lloyd pass
    t = now()
    emb = embed(plan.model, x, batch=65536)
    t_embed = now() - t
    emb = torch.nn.functional.normalize(emb, dim=1)
    t = now()
    lloyd(emb, emb[: args.clusters].clone(), max_iter=1)
    t_lloyd = now() - t

    peak = peak_flops(device, args.peak_tflops)
    rate = flops / t_step
    dtype = autocast_dtype(cfg.train.precision, device)
    res = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "config": args.config,
        "encoder": cfg.model.encoder,
        "precision": cfg.train.precision,
        "forward_dtype": "fp32" if dtype is None else str(dtype).removeprefix("torch."),
        "cells": args.cells,
        "genes": args.genes,
        "batch": b,
        "params_M": round(sum(p.numel() for p in plan.model.parameters()) / 1e6, 3),
        "generate_s": round(t_gen, 2),
        "step_ms": round(t_step * 1e3, 2),
        "train_cells_per_s": round(b / t_step),
        "step_gflop": round(flops / 1e9, 2),
        "encoder_flop_share": round(enc_flops / flops, 3) if flops else None,
        "step_tflops": round(rate / 1e12, 3),
        "mfu": round(rate / peak, 4) if peak else None,
        "embed_cells_per_s": round(args.cells / t_embed),
        "kmeans_lloyd_pass_s": round(t_lloyd, 3),
    }
    print(json.dumps(res, indent=1))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.json").write_text(json.dumps(res, indent=1))
        keys = list(res)
        md = "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n"
        md += "| " + " | ".join(str(res[k]) for k in keys) + " |\n"
        (out / "gpu_check.md").write_text(md)


if __name__ == "__main__":
    main()
