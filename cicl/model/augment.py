"""Augmentations, applied to a batch of scaled expression; resampled every step.

Three kinds, each with its own strength: Gaussian noise on a fraction of genes (the paper's),
gene masking (set to 0, the scaled mean), and neighbour mixing: a cell's view is moved towards
one of its k nearest neighbours in PCA space. Neighbour mixing makes "same cell type" rather
than "same cell" the invariance the encoder learns, which keeps small clusters together.
"""

from __future__ import annotations

import torch

from cicl.config import AugmentConfig


def augment(
    x: torch.Tensor,
    x_nbr: torch.Tensor | None,
    cfg: AugmentConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """One random view of ``x`` (B, G). ``x_nbr`` holds one kNN neighbour per row."""
    view = x
    b, g = x.shape
    dev = x.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, device=generator.device).to(dev)

    if x_nbr is not None and cfg.neighbor_prob > 0:
        use = (rand(b, 1) < cfg.neighbor_prob).to(x.dtype)
        view = view + use * cfg.neighbor_mix * (x_nbr - view)
    if cfg.mask_frac > 0:
        view = view * (rand(b, g) >= cfg.mask_frac).to(x.dtype)
    if cfg.noise_std > 0 and cfg.noise_frac > 0:
        where = (rand(b, g) < cfg.noise_frac).to(x.dtype)
        noise = torch.randn(b, g, generator=generator, device=generator.device).to(dev)
        view = view + where * cfg.noise_std * noise
    return view
