"""One preparation for every entry point (``cicl.fit``, a streamed fit, ``cicl tune``).

Choosing the matrix, preprocessing, choosing K, the K cap and the checks that need the data
happen here and nowhere else, so the entry points differ only in what they do with the
``Plan``: train in this process, over Ray workers, or in a sweep's trials.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np

from cicl.config import CICLConfig, ConfigError
from cicl.data.io import check_matrix
from cicl.data.preprocess import Prepared, choose_matrix, preprocess, record_matrix
from cicl.errors import InputError
from cicl.train.loop import main_k

if TYPE_CHECKING:
    from cicl.data.stream import BlockTransform

CAP_MAX_CELLS = 50_000  # the cap's Leiden needs an exact kNN graph: minutes beyond this


@dataclass(frozen=True)
class Plan:
    """What training needs besides the cells themselves."""

    cfg: CICLConfig  # with ``cluster.n_resolved`` filled when ``cluster.cap_k`` applies
    prep: Prepared  # the preprocessed cells (a streamed fit: its random sample's)
    k: int
    source: str  # how K was chosen (``uns[key]["n_clusters_source"]``)
    n_cells: int  # the cells to cluster: kept cells in memory, every row of a streamed file
    transform: BlockTransform | None = None  # streamed: how each block of the file is prepared


def prepare(adata: ad.AnnData, cfg: CICLConfig, layer: str | None = "auto") -> Plan:
    """Preprocess ``adata`` (its matrix as ``layer`` picks; never modified) and plan the fit.
    With a batch key ComBat's map is kept: stored with the model, ``predict`` applies it."""
    mat = choose_matrix(adata, layer)
    check_matrix(mat.source, mat.layer)
    keep_map = cfg.preprocess.batch_key is not None
    prep = preprocess(mat.source, cfg.preprocess, layer=mat.layer, keep_combat_map=keep_map)
    record_matrix(prep.info, mat)
    n_kept = prep.x.shape[0]
    dropped = adata.n_obs - n_kept
    where = f", after preprocessing dropped {dropped}" if dropped else ""
    return _plan(cfg, prep, n_kept, prep.counts is not None, f"{n_kept}{where}")


def prepare_file(
    path: str | Path, cfg: CICLConfig, layer: str | None = "auto", n_sample: int = 20_000
) -> Plan:
    """Plan a streamed fit of an ``.h5ad`` file: preprocessing is fitted on ``n_sample`` cells
    (``fit_on_sample``: random ones, or a density-balanced sketch of a large file, so that
    rare types reach the HVGs, the PCs and the count of Leiden communities), K is chosen on
    them."""
    from cicl.data.sketch import SKETCH_FROM
    from cicl.data.stream import fit_on_sample

    transform, prep, n, _ = fit_on_sample(
        path, cfg.preprocess, n_sample, seed=cfg.seed, layer=layer
    )
    plan = _plan(cfg, prep, n, transform.kind == "counts", str(n))
    if cfg.cluster.n_clusters is None:
        kind = "density-balanced sketch" if n > SKETCH_FROM else "sample"
        plan = replace(plan, source=f"{plan.source} of a {prep.x.shape[0]}-cell {kind}")
    return replace(plan, transform=transform)


def _plan(cfg: CICLConfig, prep: Prepared, n_cells: int, has_counts: bool, cells: str) -> Plan:
    given = cfg.cluster.n_clusters
    if given is not None and given > n_cells:
        raise InputError(
            f"--n-clusters {given} exceeds the number of cells ({cells}). Use fewer clusters."
        )
    check_recon(cfg, has_counts, prep.info["values"])
    k, source = choose_k(cfg, prep.pcs)
    cfg = resolve_cap(cfg, prep.pcs, k, estimated=given is None)
    return Plan(cfg, prep, k, cap_note(cfg, k, source), n_cells)


def check_device(cfg: CICLConfig) -> None:
    """``train.device`` names a device this process has (checked before any work; Ray workers
    check their own: a driver without a GPU may run workers with one)."""
    import torch

    name = cfg.train.device
    if name in ("auto", "cpu"):
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"train.device={name} is not a device name. Use auto, cpu, cuda or cuda:N."
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index is not None and device.index >= count):
            raise ConfigError(
                f"train.device={name}, but this machine has {count} CUDA GPU(s) visible to "
                "torch. Use train.device=auto (a GPU when there is one) or cpu."
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"train.device={name}, but MPS is not available here. Use auto or cpu.")
    elif device.type not in ("cuda", "mps"):
        raise ConfigError(f"train.device={name} is not supported. Use auto, cpu, cuda or cuda:N.")


def check_recon(cfg: CICLConfig, has_counts: bool, values: str) -> None:
    """``loss.recon: nb`` models raw counts: refuse it, with what to do, on other input."""
    if cfg.loss.recon == "nb" and cfg.loss.recon_weight > 0 and not has_counts:
        raise InputError(
            f"loss.recon=nb reconstructs raw counts, but X holds {values} values. Give raw "
            "counts (e.g. --layer counts) or set loss.recon to auto or gaussian."
        )


def choose_k(cfg: CICLConfig, pcs: np.ndarray) -> tuple[int, str]:
    """K as given, or estimated without labels (scanpy's default Leiden on the PCA)."""
    k = cfg.cluster.n_clusters
    if k is None:
        from cicl.data.estimate import estimate_n_clusters

        return estimate_n_clusters(pcs, seed=cfg.seed), "estimated: Leiden(resolution=1.0) on PCA"
    return k, "given"


def resolve_cap(cfg: CICLConfig, pcs: np.ndarray, k: int, *, estimated: bool) -> CICLConfig:
    """Fill ``cluster.n_resolved`` for ``cluster.cap_k: leiden``: the number of communities
    scanpy's default Leiden finds on the PCA (``k`` itself when K was ``estimated``, which is
    that count). Skipped above ``CAP_MAX_CELLS`` cells unless set by hand."""
    c = cfg.cluster
    if c.cap_k == "off" or c.n_resolved is not None:
        return cfg
    if estimated:
        n_res = k
    elif pcs.shape[0] > CAP_MAX_CELLS:
        return cfg
    else:
        from cicl.data.estimate import estimate_n_clusters

        n_res = estimate_n_clusters(pcs, seed=cfg.seed)
    return cfg.with_overrides({"cluster.n_resolved": int(n_res)})


def cap_note(cfg: CICLConfig, k: int, source: str) -> str:
    """``n_clusters_source`` plus, when the cap applies, how the K clusters were formed."""
    k_main = main_k(cfg, k)
    if k_main >= k:
        return source
    return (
        f"{source}; the data resolve {k_main} (Leiden), the other {k - k_main} are minority "
        "sub-groups split off them (cluster.cap_k)"
    )
