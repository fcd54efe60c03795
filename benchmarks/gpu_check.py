"""GPU check: the pure-torch CICL training step at atlas scale (no Ray, no AnnData needed).

Generates a clustered synthetic atlas directly on the device (``--cells`` x ``--genes``:
Poisson counts per cluster and their scaled log profile), then times the real
training step (``cicl.train.loop.train_step``) of ``--config``: ``default`` (one augmented
view, MLP encoder, count decoder with the negative binomial loss, AdamW) or ``contrastive``
(two views, encoder + projection, cluster-aware + instance loss), with bf16 autocast and TF32,
and reports: training cells/s, the step split (encoder forward+backward, loss forward+backward
-- the decoder and its likelihood, or the contrastive terms -- and the rest), encoder FLOP/s
and MFU (FLOPs counted by ``torch.utils.flop_counter``), embedding throughput and one
distributed-ready K-means Lloyd pass over every cell.

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
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scaled log profile, counts): each cluster draws its genes' expression shares, each cell
    a library size (log-normal, median ~2,000 counts) and Poisson counts around its cluster's
    shares; the profile is log1p of counts per 10,000, z-scored per gene."""
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
    return x, counts


def timer(device: torch.device):
    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    return now


def main() -> None:
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
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--out", default=None, help="folder for gpu_check.json / .md")
    args = ap.parse_args()

    from cicl.cluster.kmeans import lloyd
    from cicl.comm import Comm
    from cicl.config import CICLConfig, preset
    from cicl.model.augment import augment
    from cicl.model.losses import CLUSTER_LOSSES, INSTANCE_LOSSES
    from cicl.model.modules import balanced_gene_groups
    from cicl.train.loop import (
        build_model,
        gene_loadings,
        needs_two_views,
        recon_kind,
        recon_loss,
        train_step,
    )

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    over = {"train.batch_size": args.batch}
    if args.encoder:
        over["model.encoder"] = args.encoder
    if args.d_model:
        over["model.transformer.d_model"] = args.d_model
    base = preset("contrastive") if args.config == "contrastive" else CICLConfig()
    cfg = base.with_overrides(over)
    recon = recon_kind(cfg, has_counts=True)
    two = needs_two_views(cfg, cluster_term=cfg.loss.lam > 0)  # as train_step encodes them
    now = timer(device)

    t = now()
    x, counts = synthetic(args.cells, args.genes, args.clusters, device)
    lib = counts.sum(1)
    t_gen = now() - t
    sample = x[: min(20000, args.cells)].float().cpu().numpy()
    sc = sample - sample.mean(0)
    pcs = sc @ np.linalg.svd(sc[:5000], full_matrices=False)[2][:50].T
    groups = None
    if cfg.model.encoder == "transformer":
        groups = balanced_gene_groups(gene_loadings(sample, pcs), cfg.model.transformer.n_tokens)
    torch.manual_seed(0)
    model, net, opt = build_model(args.genes, cfg, groups, None, device, Comm(), recon)
    if args.compile:
        model.encoder = torch.compile(model.encoder)
    gen = torch.Generator(device=device).manual_seed(0)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    b = args.batch
    labels = torch.randint(args.clusters, (args.cells,), device=device)
    conf = torch.ones(args.cells, device=device)

    def views(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xb = x[idx]
        nb = x[torch.randint(args.cells, (b,), device=device, generator=gen)]
        return augment(xb, nb, cfg.augment, gen), augment(xb, nb, cfg.augment, gen)

    def batch_idx() -> torch.Tensor:
        return torch.randint(args.cells, (b,), device=device, generator=gen)

    # whole training step
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            t = now()
        idx = batch_idx()
        v1, v2 = views(idx)
        pseudo = (labels[idx], conf[idx]) if cfg.loss.lam > 0 else None
        target = (counts[idx], lib[idx]) if recon == "nb" else None
        with amp:
            train_step(net, opt, v1, v2, pseudo, cfg, Comm(), target)
    t_step = (now() - t) / args.steps

    # encoder forward + backward alone (same batch shape: the views a step encodes)
    v = torch.cat(views(batch_idx())) if two else views(batch_idx())[0]
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            t = now()
        with amp:
            h = model.encoder(v)
        h.float().sum().backward()
    t_enc = (now() - t) / args.steps
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        with amp:
            h = model.encoder(v)
        h.float().sum().backward()
    enc_flops = fc.get_total_flops()

    # loss forward + backward alone: the decoder and its likelihood, or the contrastive terms
    tau, kern = cfg.loss.temperature, cfg.loss.kernel
    lab_b = labels[:b]
    valid = torch.ones(b, dtype=torch.bool, device=device)
    width = cfg.model.proj_dim if two else cfg.model.embed_dim
    z = torch.randn((2 if two else 1) * b, width, device=device, requires_grad=True)
    idx = batch_idx()
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            t = now()
        with amp:
            if two:
                loss = INSTANCE_LOSSES[cfg.loss.instance_loss](z[:b], z[b:], tau, kern)
                loss = loss + CLUSTER_LOSSES[cfg.loss.cluster_loss](
                    z[:b], z[b:], lab_b, tau, valid, kern
                )
            else:
                loss = recon_loss(model.decoder, model.decoder(z), (counts[idx], lib[idx]))
        loss.backward()
    t_loss = (now() - t) / args.steps

    # embedding pass over every cell + one K-means Lloyd pass on it
    model.eval()
    t = now()
    with torch.no_grad(), amp:
        emb = torch.cat(
            [model.encoder(x[i : i + 65536]).float() for i in range(0, args.cells, 65536)]
        )
    t_embed = now() - t
    emb = torch.nn.functional.normalize(emb, dim=1)
    t = now()
    lloyd(emb, emb[: args.clusters].clone(), max_iter=1)
    t_lloyd = now() - t

    peak = peak_flops(device, args.peak_tflops)
    enc_rate = enc_flops / t_enc
    res = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "config": args.config,
        "encoder": cfg.model.encoder,
        "dtype": args.dtype,
        "cells": args.cells,
        "genes": args.genes,
        "batch": b,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "generate_s": round(t_gen, 2),
        "step_ms": round(t_step * 1e3, 2),
        "train_cells_per_s": round(b / t_step),
        "encoder_fwd_bwd_ms": round(t_enc * 1e3, 2),
        "loss_fwd_bwd_ms": round(t_loss * 1e3, 2),
        "other_ms": round(max(t_step - t_enc - t_loss, 0.0) * 1e3, 2),
        "encoder_tflops": round(enc_rate / 1e12, 2),
        "encoder_mfu": round(enc_rate / peak, 4) if peak else None,
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
