"""Preprocessing with scanpy: decide what X holds, then normalise/log/HVG/scale/PCA.

The decision is recorded, because a pipeline that logs already-logged data (or normalises
RPKM as if it were counts) silently ruins clustering.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import anndata as ad
import numpy as np
import scanpy as sc
import scipy.sparse as sp

from cicl.config import PreprocessConfig
from cicl.data.io import check_finite
from cicl.errors import InputError

ValueKind = Literal["counts", "unlogged", "log", "scaled"]


@dataclass
class Prepared:
    """What the model consumes: scaled HVG matrix and its PCA, plus the decisions taken."""

    x: np.ndarray  # (n_cells, n_genes_used) float32
    pcs: np.ndarray  # (n_cells, n_pcs) float32
    genes: np.ndarray  # names of the genes used
    cell_mask: np.ndarray  # bool (n_cells_in,), cells kept
    info: dict
    # the fitted transform, to apply the same preprocessing to other cells chunk by chunk
    scale_mean: np.ndarray | None = None  # (n_genes_used,) or None when not scaled here
    scale_sd: np.ndarray | None = None
    pca_mean: np.ndarray | None = None  # (n_genes_used,)
    pca_components: np.ndarray | None = None  # (n_genes_used, n_pcs), signs fixed
    # with ``keep_combat_map``: what ComBat did, per batch and gene ``after = slope * before
    # + shift``
    batch_names: np.ndarray | None = None  # (n_batches,)
    batch_slope: np.ndarray | None = None  # (n_batches, n_genes_used)
    batch_shift: np.ndarray | None = None
    # count input: the raw counts of the genes used (cells kept x genes, float32), what the
    # negative binomial decoder reconstructs; None for non-count input
    counts: np.ndarray | None = None


def _values(X) -> np.ndarray:
    return X.data if sp.issparse(X) else np.asarray(X).ravel()


def detect_values(X, sample: int = 2_000_000) -> ValueKind:
    """Classify X: raw counts (non-negative integers), unlogged non-counts (e.g. RPKM/TPM,
    max > 50), log-scale values, or already scaled (has negatives)."""
    v = _values(X)
    if v.size > sample:
        v = v[np.random.default_rng(0).choice(v.size, sample, replace=False)]
    if v.size == 0:
        return "log"
    if v.min() < 0:
        return "scaled"
    if np.all(v == np.round(v)):
        return "counts"
    if v.max() > 50:  # log1p(1e6 CPM) ~ 13.8: values this large are not on a log scale
        return "unlogged"
    return "log"


# layers scverse tools conventionally keep raw counts in (scvi-tools, CELLxGENE: ``raw.X``)
COUNT_LAYERS = ("counts", "raw_counts", "counts_raw", "umi_counts")


@dataclass(frozen=True)
class Matrix:
    """Which matrix of an AnnData the fit reads: ``source`` (the AnnData itself, or its
    ``.raw`` as one) and ``layer`` in it; ``name`` says which, for the record."""

    source: ad.AnnData
    layer: str | None
    name: str
    note: str | None = None  # why, when chosen automatically over X
    warning: str | None = None  # a matrix "auto" passed over that the user may have meant

    @property
    def X(self):
        return self.source.layers[self.layer] if self.layer is not None else self.source.X


def count_layer_candidates(names) -> list[str]:
    """Layer names that may hold raw counts, most conventional first: ``COUNT_LAYERS``, then
    any other name containing "count" (their values are checked by the caller)."""
    names = [str(n) for n in names]
    first = [n for n in COUNT_LAYERS if n in names]
    return first + [n for n in names if "count" in n.lower() and n not in first]


def choose_matrix(adata: ad.AnnData, layer: str | None = "auto") -> Matrix:
    """The matrix to cluster. ``"X"`` / None: X; ``"raw"``: ``adata.raw.X`` (unless a layer
    has that name); another name: that layer. ``"auto"`` (the default): X, unless X holds no
    raw counts and the object keeps them elsewhere (a layer named as in ``COUNT_LAYERS`` or
    containing "count", else ``.raw``), the usual scanpy layout after normalisation. Why: the
    count decoder needs counts, and count sets held as log values cluster worse than from their
    counts (docs/benchmarks.md, ``benchmarks/input_layout.py``)."""
    if layer is None or layer == "X":
        return Matrix(adata, None, "X")
    if layer in adata.layers:
        return Matrix(adata, layer, f"layers['{layer}']")
    if layer == "raw" and adata.raw is not None:
        return Matrix(_raw(adata), None, "raw.X")
    if layer != "auto":
        raise unknown_layer(layer, adata.layers, adata.raw is not None)
    if adata.isbacked:
        return Matrix(adata, None, "X")
    kind = None if adata.X is None else detect_values(adata.X)
    if kind == "counts":
        return Matrix(adata, None, "X")
    held = "X is empty" if kind is None else f"X holds {kind} values"
    why = f"{held}, the raw counts are in "
    candidates = count_layer_candidates(adata.layers)
    for name in candidates:
        if holds_counts(adata.layers[name]):
            return Matrix(adata, name, f"layers['{name}']", why + f"layers['{name}']")
    if adata.raw is not None and holds_counts(adata.raw.X):
        return Matrix(_raw(adata), None, "raw.X", why + "raw.X")
    passed = None
    if candidates:  # named like counts, but not counts: say so rather than fall back silently
        name = candidates[0]
        passed = (
            f"layers['{name}'] is named like raw counts but does not hold them "
            f"({_not_counts(adata.layers[name])}): X was read instead. Fix the layer, or pass "
            "--layer X to silence this"
        )
    return Matrix(adata, None, "X", warning=passed)


def _not_counts(X) -> str:
    """Why a matrix is not raw counts, in a few words."""
    v = _values(X)
    if v.size == 0:
        return "it is empty"
    if not np.all(np.isfinite(v)):
        return "it has NaN or infinite values"
    if (v < 0).any():
        return "it has negative values"
    return f"it holds {detect_values(X)} values"


def _raw(adata: ad.AnnData) -> ad.AnnData:
    """``.raw`` as an AnnData over the same cells, without ``Raw.to_adata``'s copies of the
    matrix, obsm, obsp and uns (preprocessing reads it and never writes)."""
    return ad.AnnData(X=adata.raw.X, obs=adata.obs, var=adata.raw.var)


def record_matrix(info: dict, mat: Matrix) -> None:
    """Note in ``uns["cicl"]["preprocess"]`` which matrix was read, and why when not X."""
    info["matrix"] = mat.name
    if mat.warning is not None:
        info.setdefault("warnings", []).append(mat.warning)
    if mat.note is not None:
        info["steps"].insert(0, f"{mat.note}: read those (--layer X keeps X)")


def holds_counts(X) -> bool:
    """Non-empty raw counts (what ``auto`` takes from a layer or ``.raw``)."""
    return X is not None and _values(X).size > 0 and detect_values(X) == "counts"


def unknown_layer(layer: str, layers, has_raw: bool) -> InputError:
    """The one error for a ``layer`` that names no matrix, listing those there are."""
    options = ", ".join(["X", *map(str, layers), *(["raw"] if has_raw else [])])
    return InputError(f"Layer '{layer}' not found; available: {options}.")


def preprocess(
    adata: ad.AnnData,
    cfg: PreprocessConfig,
    *,
    layer: str | None = None,
    keep_combat_map: bool = False,
) -> Prepared:
    """Return the model input for ``adata`` without modifying it. ``keep_combat_map``: also
    return the map ComBat applied (streaming applies it to cells outside the sample; it costs
    a copy of the matrix, so in-memory fits skip it)."""
    X = adata.layers[layer] if layer is not None else adata.X
    with np.errstate(over="ignore"):  # beyond float32's range: inf, refused just below
        X = X.astype(np.float32) if sp.issparse(X) else np.asarray(X, dtype=np.float32)
    check_finite(X)  # a streamed fit's sample comes from the file, unchecked until here
    X = sp.csr_matrix(X)
    work = ad.AnnData(X=X)
    work.var_names = np.asarray(adata.var_names).astype(str)
    work.obs_names = np.asarray(adata.obs_names).astype(str)
    kind = _values_kind(work.X, cfg.values)
    if cfg.batch_key is not None:
        work.obs["batch"] = batches(adata, cfg.batch_key)
    steps: list[str] = [] if cfg.values == "auto" else [f"values declared '{cfg.values}'"]
    warnings: list[str] = []

    n_expr = np.asarray((work.X != 0).sum(axis=1)).ravel()
    cell_mask = n_expr >= max(1, cfg.min_genes)
    if not cell_mask.any():
        raise InputError(
            (
                f"No cell expresses at least preprocess.min_genes={cfg.min_genes} genes (the "
                f"most any cell expresses is {int(n_expr.max()) if n_expr.size else 0}). Lower "
                "preprocess.min_genes."
            )
            if cfg.min_genes > 1 and n_expr.size and n_expr.max() > 0
            else "No cell has any expressed gene: X is all zeros. Check that the expression "
            "matrix is the one you meant."
        )
    if not cell_mask.all():
        n_drop = int((~cell_mask).sum())
        why = "all-zero" if cfg.min_genes <= 1 else f"fewer than {cfg.min_genes} genes"
        msg = f"dropped {n_drop} cells with {why} expression (left unlabelled in the output)"
        warnings.append(msg)
        steps.append(msg)
        work = work[cell_mask].copy()
    if work.n_obs < 10:
        raise InputError(f"Only {work.n_obs} cells with expression: clustering needs at least 10.")

    raw = work.X.copy() if kind == "counts" else None  # the counts, for the decoder
    work.var["col"] = np.arange(work.n_vars)  # follows the gene subsetting below
    if kind == "counts":
        sc.pp.normalize_total(work, target_sum=1e4)
        sc.pp.log1p(work)
        steps += ["normalize_total(1e4)", "log1p"]
    elif kind == "unlogged":
        sc.pp.log1p(work)
        steps.append("log1p (non-count, unlogged values: not normalised as counts)")
    else:
        steps.append(f"values are {kind}: no normalisation or log")

    n_genes_in = work.n_vars
    # genes constant across cells carry nothing and break HVG / scaling
    var = (
        np.asarray(work.X.power(2).mean(axis=0)).ravel()
        - np.asarray(work.X.mean(axis=0)).ravel() ** 2
    )
    keep = var > 1e-12
    if not keep.all():
        work = work[:, keep].copy()
        msg = f"dropped {int((~keep).sum())} constant (e.g. all-zero) genes"
        steps.append(msg)
        if (~keep).sum() > 0.5 * len(keep):
            warnings.append(msg)
    if work.n_vars < 2:
        raise InputError(f"Only {work.n_vars} genes vary across cells; nothing to cluster on.")
    n_top = cfg.n_top_genes or 2000
    if cfg.n_top_genes is not None and cfg.n_top_genes > work.n_vars:
        raise InputError(
            f"preprocess.n_top_genes={cfg.n_top_genes} but only {work.n_vars} genes vary. "
            f"Ask for at most {work.n_vars} (or leave it unset to use all genes)."
        )
    n_batches = work.obs["batch"].nunique() if cfg.batch_key is not None else 1
    by_batch = {"batch_key": "batch"} if n_batches > 1 else {}
    if by_batch:
        _check_batches(work.obs["batch"], cfg.batch_key)
    if cfg.batch_key is not None and n_batches == 1:
        msg = f"batch_key '{cfg.batch_key}' has one batch among the cells kept: not corrected"
        warnings.append(msg)
        steps.append(msg)
    if kind != "scaled" and work.n_vars > n_top:
        sc.pp.highly_variable_genes(work, n_top_genes=n_top, flavor="seurat", **by_batch)
        work = work[:, work.var["highly_variable"].to_numpy()].copy()
        within = f", batch_key='{cfg.batch_key}'" if by_batch else ""
        steps.append(f"highly_variable_genes(n_top_genes={n_top}, flavor='seurat'{within})")
    elif kind == "scaled" and work.n_vars > n_top:
        v = np.asarray(work.X.toarray().var(axis=0))
        top = np.sort(np.argsort(-v)[:n_top])
        work = work[:, top].copy()
        steps.append(f"top {n_top} genes by variance")
    else:
        steps.append(f"kept all {work.n_vars} genes (<= n_top_genes={n_top})")

    combat_map: tuple = (None, None, None)
    if by_batch:
        names, codes = np.unique(work.obs["batch"].to_numpy(), return_inverse=True)
        # ComBat's map follows from each batch's moments: no dense copy of X kept beside its own
        before = _batch_moments(work.X, codes, len(names)) if keep_combat_map else None
        with np.errstate(divide="ignore", invalid="ignore"):  # its convergence test divides by 0
            sc.pp.combat(work, key="batch")  # per-gene location/scale per batch, empirical Bayes
        steps.append(f"combat(key='{cfg.batch_key}', {n_batches} batches)")
        if before is not None:
            after = _batch_moments(work.X, codes, len(names))
            combat_map = _affine_per_batch(before, after, names)
    counts = None
    if raw is not None:
        counts = raw[:, work.var["col"].to_numpy()].toarray().astype(np.float32)
    x = work.X.toarray() if sp.issparse(work.X) else np.asarray(work.X)
    x = x.astype(np.float32)
    mu = sd = None
    if cfg.scale and kind != "scaled":
        mu, sd = x.mean(0), x.std(0)
        sd[sd == 0] = 1.0
        x = np.clip((x - mu) / sd, -cfg.max_value, cfg.max_value).astype(np.float32)
        steps.append(f"scale(max_value={cfg.max_value})")
    n_pcs = int(min(cfg.n_pcs, x.shape[0] - 1, x.shape[1] - 1))
    pcs, comps = _pca(x, n_pcs)
    steps.append(f"pca(n_comps={n_pcs})")
    info = {
        "values": kind,
        "steps": steps,
        "n_cells": int(x.shape[0]),
        "n_genes_input": int(n_genes_in),
        "n_genes_used": int(x.shape[1]),
        "n_pcs": n_pcs,
        "warnings": warnings,
        **({"batch_key": cfg.batch_key, "n_batches": int(n_batches)} if cfg.batch_key else {}),
    }
    return Prepared(
        x=x,
        pcs=pcs,
        genes=np.asarray(work.var_names),
        cell_mask=cell_mask,
        info=info,
        scale_mean=mu,
        scale_sd=sd,
        pca_mean=x.mean(0),
        pca_components=comps,
        batch_names=combat_map[0],
        batch_slope=combat_map[1],
        batch_shift=combat_map[2],
        counts=counts,
    )


def batches(adata: ad.AnnData, key: str) -> np.ndarray:
    """The batch of every cell, as strings; a missing column or missing values are refused."""
    if key not in adata.obs:
        cols = ", ".join(map(str, adata.obs.columns)) or "none"
        raise InputError(f"batch_key '{key}' is not an obs column; available: {cols}.")
    col = adata.obs[key]
    if col.isna().any():
        raise InputError(
            f"batch_key '{key}' is missing for {int(col.isna().sum())} cells. Give every cell "
            "a batch (or drop those cells)."
        )
    return col.astype(str).to_numpy()


def _batch_moments(X, codes: np.ndarray, n_batches: int) -> tuple[np.ndarray, np.ndarray]:
    """Per batch and gene: mean and variance of ``X`` (dense or sparse; float64, no dense copy)."""
    mean = np.zeros((n_batches, X.shape[1]))
    var = np.zeros_like(mean)
    for b in range(n_batches):
        rows = X[codes == b].astype(np.float64)  # one batch at a time
        m = np.asarray(rows.mean(0)).ravel()
        sq = rows.multiply(rows) if sp.issparse(rows) else np.square(rows, dtype=np.float64)
        mean[b], var[b] = m, np.asarray(sq.mean(0)).ravel() - m**2
    return mean, var


def _affine_per_batch(
    before: tuple[np.ndarray, np.ndarray], after: tuple[np.ndarray, np.ndarray], names: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batch names and, per batch and gene, ``slope``/``shift`` with ``after = slope * before
    + shift``: ComBat without covariates is exactly this map (a positive scale and a shift per
    batch and gene), so it follows from each batch's means and variances before and after, and
    can be applied to cells it never saw (streamed blocks). A gene constant within a batch
    keeps slope 1."""
    (mu, var_u), (mv, var_v) = before, after
    ok = var_u > 1e-12
    slope = np.where(ok, np.sqrt(np.maximum(var_v, 0) / np.where(ok, var_u, 1.0)), 1.0)
    return names, slope.astype(np.float32), (mv - slope * mu).astype(np.float32)


def _check_batches(batch, key: str) -> None:
    """ComBat estimates a mean and variance per batch: a batch of one cell has no variance."""
    sizes = batch.value_counts()
    small = sizes[sizes < 2]
    if len(small):
        raise InputError(
            f"batch_key '{key}': batch '{small.index[0]}' has {int(small.iloc[0])} cell; "
            "ComBat needs at least 2 cells per batch. Merge or drop the smallest batches."
        )


def _values_kind(X, declared: str) -> ValueKind:
    """What X holds: detected, or declared and checked. Negative values are accepted only
    as z-scored data (per-gene means near 0); anything else negative is refused."""
    v = _values(X)
    detected = detect_values(X)
    if detected == "scaled" and not _looks_scaled(X):
        raise InputError(
            f"X has negative values (min {float(v.min()):.3g}) but is not z-scored per gene. "
            "Give raw counts or log-normalised values (e.g. --layer counts)."
        )
    if declared == "auto":
        return detected
    if declared == "counts" and detected != "counts":
        raise InputError(
            "preprocess.values=counts, but X holds non-integer or negative values. Give raw "
            "counts (e.g. --layer counts) or leave preprocess.values at auto."
        )
    if declared in ("log", "unlogged") and detected == "scaled":
        raise InputError(f"preprocess.values={declared}, but X has negative values.")
    return declared  # type: ignore[return-value]


def _looks_scaled(X, max_genes: int = 2000) -> bool:
    """Z-scored data: most genes have a mean near 0 relative to their spread."""
    d = X[: min(X.shape[0], 5000)]
    d = d.toarray() if sp.issparse(d) else np.asarray(d)
    d = d[:, : min(d.shape[1], max_genes)].astype(np.float64)
    mu, sd = d.mean(0), d.std(0)
    ok = sd > 0
    if not ok.any():
        return False
    return float(np.median(np.abs(mu[ok]) / sd[ok])) < 0.2


EXACT_PCA_MAX_CELLS = 50_000  # exact SVD up to here; above, its float64 U would not fit


def _pca(x: np.ndarray, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """PCA of ``x``: the exact SVD of the centred matrix (deterministic, no arpack seed) up to
    ``EXACT_PCA_MAX_CELLS`` cells with at most 3000 genes; beyond, a seeded randomised SVD (as
    scanpy's), whose memory is the matrix and a few (cells, n) blocks, not a float64 copy
    and a (cells, genes) U. Returns the scores and the (genes, n) loadings that map centred
    x to them."""
    xc = x - x.mean(0, keepdims=True)
    if x.shape[0] <= EXACT_PCA_MAX_CELLS and min(xc.shape) <= 3000:
        u, s, vt = np.linalg.svd(xc.astype(np.float64), full_matrices=False)
    else:
        from sklearn.utils.extmath import randomized_svd

        u, s, vt = randomized_svd(xc, n, random_state=seed)
    u, s, vt = u[:, :n], s[:n], vt[:n]
    # sign convention: largest |u| entry positive, so results do not depend on LAPACK
    signs = np.sign(u[np.abs(u).argmax(0), np.arange(n)])
    signs[signs == 0] = 1
    return (u * s * signs).astype(np.float32), (vt.T * signs).astype(np.float32)
