"""Assign new cells to a fitted CICL clustering (``cicl.predict``, ``cicl predict``).

A fit stores in ``uns[key]["model"]`` what maps raw cells into its clustering space: the genes
it used, the preprocessing fitted on its cells (normalisation kind, scaling means and SDs, PCA
loadings, ComBat's per-batch map), the trained encoder's weights and the hybrid space's PCA
centre and scale. New cells go through exactly that, with no refitting (as scanpy's ``ingest``
maps onto a reference's PCA), and each gets the cluster of its nearest final centroid, with the
Student's t probability of that cluster as its confidence. The fit also stores, per cluster, the
quantiles of its own cells' distances to the centroid in the encoder's embedding, so each new
cell's distance can be read as a percentile of the reference's: a cell farther out than 99 % of
the cells its cluster was fitted on is flagged as possibly a state the reference does not hold
(the Student's t probability cannot say this: it only compares centroids with each other).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import torch

from cicl._keys import DEFAULT_KEY, embedding_key
from cicl.cluster.kmeans import distance_percentile, distance_quantiles
from cicl.config import CICLConfig
from cicl.data.io import check_axes, check_finite, check_matrix, read_annotations
from cicl.data.preprocess import Prepared, choose_matrix, detect_values
from cicl.data.stream import BlockTransform, FileMatrix, choose_file_matrix
from cicl.errors import InputError
from cicl.model.modules import student_t_q
from cicl.train.loop import TrainResult, embed_new, load_encoder, load_metric

FORMAT = "cicl-model/1"
MIN_GENE_SHARE = 0.5  # fewer of the model's genes than this in the new cells: refuse
ATYPICAL_PCT = 99.0  # distance percentile above which a mapped cell is counted as atypical
# below this median cluster size the encoder has seen too few cells per cluster for its
# distances to carry over: held-out pollen cells (about 19 per cluster) got a median percentile
# of 77, not 50 (benchmarks/mapping.py)
MIN_CALIBRATED_SIZE = 50


def model_record(res: TrainResult, prep: Prepared, max_value: float) -> dict:
    """What ``predict`` needs, for ``uns[key]["model"]`` (h5ad-storable: arrays and numbers)."""
    return {**prep_record(prep, max_value), **fit_record(res, prep.pcs.shape[1])}


def prep_record(prep: Prepared, max_value: float) -> dict:
    """The model's preprocessing half: genes, normalisation kind, scaling, PCA, ComBat map."""
    rec: dict = {
        "format": FORMAT,
        "genes": np.asarray(prep.genes).astype(str),
        "values": prep.info["values"],
        "max_value": float(max_value),
        "pca_mean": np.asarray(prep.pca_mean, dtype=np.float32),
        "pca_components": np.asarray(prep.pca_components, dtype=np.float32),
    }
    if prep.scale_mean is not None:
        rec["scale_mean"] = np.asarray(prep.scale_mean, dtype=np.float32)
        rec["scale_sd"] = np.asarray(prep.scale_sd, dtype=np.float32)
    if prep.batch_names is not None:
        rec["batch_key"] = str(prep.info.get("batch_key"))
        rec["batch_names"] = np.asarray(prep.batch_names).astype(str)
        rec["batch_slope"] = np.asarray(prep.batch_slope, dtype=np.float32)
        rec["batch_shift"] = np.asarray(prep.batch_shift, dtype=np.float32)
    return rec


def fit_record(res: TrainResult, n_pcs: int) -> dict:
    """The model's trained half: encoder weights, the hybrid space's PCA centre and scale, and
    per cluster the quantiles of its cells' distances to the centroid (``n_pcs``: the width of
    the space's PCA block)."""
    rec: dict = {
        "pca_scale": float(res.pca_scale),
        "encoder": {k: np.asarray(v) for k, v in res.encoder_state.items()},
    }
    if len(res.labels) and len(res.centroids):
        # the encoder's block only: in-sample PCA scores are inflated relative to new cells'
        # (PCA fits its cells' noise), so hybrid-space distances would flag too few new cells
        dims = res.embedding.shape[1] - (n_pcs if res.pca_center is not None else 0)
        rec["dist_dims"] = int(dims)
        rec["cluster_sizes"] = np.bincount(res.labels, minlength=len(res.centroids))
        rec["dist_quantiles"] = distance_quantiles(
            np.asarray(res.embedding[:, :dims], dtype=np.float64),
            np.asarray(res.labels, dtype=int),
            np.asarray(res.centroids[:, :dims], dtype=np.float64),
        )
    if res.pca_center is not None:
        rec["pca_center"] = np.asarray(res.pca_center, dtype=np.float64)
    if res.metric is not None:  # the final partition's assignment rule (``cluster.metric``)
        rec["metric"] = dict(res.metric)
    return rec


REFERENCE_FIELDS = ("params", "n_clusters", "n_clusters_source", "centroids", "model")


def reference_adata(adata: ad.AnnData, key: str = DEFAULT_KEY) -> ad.AnnData | None:
    """A cell-free AnnData holding only what ``predict`` reads from ``adata.uns[key]`` (about
    1.4 MB for the default model): a fit's model to keep or share without its cells (MLflow
    logs it as ``reference.h5ad``). None when the fit stored no model."""
    uns = adata.uns.get(key, {})
    if "model" not in uns:
        return None
    return ad.AnnData(uns={key: {f: uns[f] for f in REFERENCE_FIELDS if f in uns}})


def load_reference(reference: ad.AnnData | str | Path, key: str = DEFAULT_KEY) -> dict:
    """``uns[key]`` of a fitted AnnData (or ``.h5ad`` path), checked to hold a model."""
    if not isinstance(reference, ad.AnnData):
        path = Path(reference)
        if not path.is_file():
            raise InputError(f"reference '{path}' does not exist. Give the .h5ad `cicl fit` wrote.")
        try:  # uns only: a fitted atlas' layers and embedding stay on disk
            uns = read_annotations(path, ("uns",)).uns.get(key)
        except Exception as e:  # noqa: BLE001 - any unreadable file gets one clear line
            raise InputError(f"cannot read reference '{path}' as .h5ad ({e}).") from None
    else:
        uns = reference.uns.get(key)
    if uns is None:
        raise InputError(
            f"the reference has no uns['{key}']: it was not fitted by cicl under that key. "
            "Give the output of `cicl fit` (and --key if it used --key-added)."
        )
    if "model" not in uns or uns["model"].get("format") != FORMAT:
        what = "a `cicl predict` output" if "reference_key" in uns else "written by an older cicl"
        raise InputError(
            f"uns['{key}'] of the reference holds no stored model ({what}). Give what "
            "`cicl fit` or `cicl tune --out` wrote with this version."
        )
    return uns


def predict(
    adata: ad.AnnData,
    reference: ad.AnnData | str | Path | dict,
    *,
    key: str = DEFAULT_KEY,
    key_added: str | None = None,
    layer: str | None = "auto",
    batch_key: str | None = None,
    copy: bool = False,
    block: int = 50_000,
    file: str | Path | None = None,
) -> ad.AnnData | None:
    """Assign the cells of ``adata`` to the clusters of a fitted ``reference`` (an AnnData or
    ``.h5ad`` path that ``cicl.fit`` / ``cicl fit`` wrote under ``key``), without refitting.

    ``layer`` picks the matrix as in ``cicl.fit`` (``"auto"``: X, or the raw counts a
    log-normalised object keeps). Genes are matched by name; genes the model uses that ``adata`` lacks are set to the
    reference cells' mean (at most half may be missing). If the reference was batch-corrected,
    cells whose ``batch_key`` value (default: the reference's key) is a reference batch get that
    batch's ComBat map; other cells are left uncorrected, with a warning.

    Writes ``obs[key_added]`` (categorical, the reference's clusters), ``obs[key_added +
    "_confidence"]`` (Student's t probability of that cluster, on the fit's metric's
    distances when it has one), ``obs[key_added +
    "_dist_pct"]`` (the percentile, 0-100, of the cell's distance to its centroid among the
    reference cells of that cluster; above 99: farther out than nearly all of them, a state the
    reference may lack), ``obsm["X_" + key_added]`` (the reference's clustering space) and
    ``uns[key_added]`` (what was matched, and ``n_cells_atypical``: cells above 99). ``key_added``
    defaults to ``key``. ``reference`` may also be ``load_reference``'s result. Cells are
    mapped ``block`` at a time; a backed AnnData (``read_h5ad(..., backed="r")``) is read
    one block at a time and never loaded (its values kind is judged on the first 50,000
    cells), with the results in its in-memory obs/obsm/uns. ``file``: the ``.h5ad`` the cells
    are read from instead (``adata`` then only needs its obs and var, as ``cicl predict
    --stream`` passes them, so no layer is loaded); on disk, layers and raw/X are read block
    by block like X. Returns ``adata`` if ``copy`` else None.
    """
    key_added = key_added or key
    if reference is adata and key_added == key:
        raise InputError(
            f"adata is the reference: writing to '{key}' would replace its fit. "
            "Pass key_added=... (another name)."
        )
    ref = reference if isinstance(reference, dict) else load_reference(reference, key)
    model = ref["model"]
    cfg = CICLConfig.from_dict(_from_h5(ref["params"]))
    path = Path(file) if file is not None else (adata.filename if adata.isbacked else None)
    if path is not None and copy:
        raise InputError("copy=True needs cells in memory; cells on disk are annotated in place.")
    adata = adata.copy() if copy else adata
    # the same choice as the fit's (raw counts if kept); on disk judged on the first cells
    src = _query_matrix(adata, layer, path)
    t = query_transform(src.var_names, src.sample, model)
    genes = np.asarray(model["genes"])
    n_missing = int((t.gene_idx < 0).sum())
    kind = t.kind
    n_uncorrected = _batches(t, model, adata, batch_key)
    state = {k: np.asarray(v) for k, v in model["encoder"].items()}
    enc = load_encoder(cfg, state, len(genes))
    center = model.get("pca_center")
    cents = torch.from_numpy(np.asarray(ref["centroids"], dtype=np.float32))
    parts = []
    with _block_reader(src) as read:
        for a in range(0, adata.n_obs, block):  # blocks: a large query never densifies at once
            rows = np.arange(a, min(a + block, adata.n_obs))
            xb = read(a, a + len(rows))  # a contiguous slice: one read when X is on disk
            if src.file is not None:
                check_finite(xb)
            x, pcs = t(xb, rows)
            parts.append(embed_new(enc, x, pcs, cfg, center, float(model["pca_scale"])))
    h = np.concatenate(parts)
    metric = load_metric(model.get("metric"))
    hq = torch.from_numpy(h)
    # the fit's metric (nearest centroid and Student's t on its scores) or Euclidean
    d2 = torch.cdist(hq, cents).pow(2) if metric is None else metric.scores(hq, cents)
    conf, lab = student_t_q(d2, cfg.cluster.alpha).max(1)
    conf = conf.float()
    k = int(ref["n_clusters"])
    adata.obs[key_added] = pd.Categorical.from_codes(
        lab.numpy(), categories=[str(i) for i in range(k)]
    )
    adata.obs[key_added + "_confidence"] = conf.numpy().astype(np.float32)
    n_atypical = None
    adata.obs.drop(columns=[key_added + "_dist_pct"], errors="ignore", inplace=True)  # stale
    if "dist_quantiles" in model:  # models stored by earlier versions lack the table
        dims = int(model["dist_dims"])
        pct = distance_percentile(
            h[:, :dims].astype(np.float64),
            lab.numpy(),
            cents.numpy()[:, :dims].astype(np.float64),
            np.asarray(model["dist_quantiles"], dtype=np.float64),
        )
        adata.obs[key_added + "_dist_pct"] = pct
        n_atypical = int((pct > ATYPICAL_PCT).sum())
        sizes = np.asarray(model.get("cluster_sizes", []))
        if sizes.size and np.median(sizes) < MIN_CALIBRATED_SIZE:
            warnings.warn(
                f"the reference's clusters are small (median {np.median(sizes):.0f} cells): "
                f"distance percentiles run high for new cells; read obs['{key_added}_dist_pct'] "
                "as a ranking, not as a share of the reference.",
                UserWarning,
                stacklevel=2,
            )
    adata.obsm[embedding_key(key_added)] = h.astype(np.float32)
    adata.uns[key_added] = {
        "reference_key": key,
        "n_clusters": k,
        "values": kind,
        "matrix": src.name,
        "n_genes_input": int(len(src.var_names)),  # of the matrix read (raw/X has its own)
        "n_genes_model": int(len(genes)),
        "n_genes_missing": n_missing,
        "n_cells_uncorrected": int(n_uncorrected),
        "params": ref["params"],
    }
    if n_atypical is not None:
        adata.uns[key_added]["n_cells_atypical"] = n_atypical
    if n_missing:
        warnings.warn(
            f"{n_missing} of the reference's {len(genes)} genes are not in these cells; "
            "they were set to the reference mean.",
            UserWarning,
            stacklevel=2,
        )
    return adata if copy else None


@dataclass(frozen=True)
class _Query:
    """Where a query's cells are read from: gene names, the values their kind is judged on,
    the name for the record, and (in memory) the matrix or (on disk) the file's matrix."""

    var_names: np.ndarray
    sample: object
    name: str
    X: object = None
    file: FileMatrix | None = None


def _query_matrix(adata: ad.AnnData, layer: str | None, path: Path | None) -> _Query:
    """``choose_matrix`` in memory, ``choose_file_matrix`` for cells on disk (``path``: X,
    layers and raw/X read from the file block by block, like a streamed fit's)."""
    if path is not None:
        check_axes(adata)
        fm = choose_file_matrix(path, adata.var_names, layer)
        check_finite(fm.sample)  # numeric, no NaN: before its values are judged
        if fm.n_obs != adata.n_obs:
            raise InputError(
                f"'{path}' holds {fm.n_obs} cells but adata has {adata.n_obs}. "
                "Pass the AnnData read from that file."
            )
        return _Query(fm.var_names, fm.sample, fm.name, file=fm)
    mat = choose_matrix(adata, layer)
    check_matrix(mat.source, mat.layer, min_cells=1)
    return _Query(np.asarray(mat.source.var_names), mat.X, mat.name, X=mat.X)


@contextmanager
def _block_reader(src: _Query):
    """``read(start, stop)``: rows of the query's matrix, from memory or the file."""
    if src.file is None:
        yield lambda a, b: src.X[a:b]
        return
    with h5py.File(src.file.path, "r") as f:
        yield lambda a, b: src.file.read(f, a, b)


def query_transform(var_names, sample, model: dict) -> BlockTransform:
    """The reference's preprocessing for cells with genes ``var_names`` (matched by name; no
    batch map yet), their values' kind judged on ``sample``: ``t(X[rows], rows)`` gives their
    model input and reference PCs."""
    genes = np.asarray(model["genes"]).astype(str)
    pos = {g: i for i, g in enumerate(np.asarray(var_names).astype(str))}
    gene_idx = np.array([pos.get(g, -1) for g in genes])
    n_missing = int((gene_idx < 0).sum())
    if n_missing > MIN_GENE_SHARE * len(genes):
        raise InputError(
            f"only {len(genes) - n_missing} of the reference's {len(genes)} genes are in the "
            "new cells' var_names. Use the same gene identifiers as the reference (symbols vs "
            "Ensembl IDs) or fit these cells with `cicl fit`."
        )
    return BlockTransform(
        kind=_query_kind(sample, str(model["values"])),
        gene_idx=gene_idx,
        scale_mean=model.get("scale_mean"),
        scale_sd=model.get("scale_sd"),
        max_value=float(model["max_value"]),
        pca_mean=np.asarray(model["pca_mean"]),
        pca_components=np.asarray(model["pca_components"]),
    )


def _query_kind(X, ref_kind: str) -> str:
    """How to normalise the new cells: by what their own values are (counts are normalised
    and logged, log values kept). Only scaled vs unscaled cannot be bridged: the reference's
    scaling means and SDs apply to unscaled log values."""
    kind = detect_values(X)
    if (kind == "scaled") != (ref_kind == "scaled"):
        raise InputError(
            f"the new cells hold {kind} values but the reference was fitted on {ref_kind} "
            "values. Give the new cells in the same form as the reference's input (e.g. raw "
            "counts, or log-normalised values; --layer picks another matrix)."
        )
    return kind


def _batches(t: BlockTransform, model: dict, adata: ad.AnnData, batch_key: str | None) -> int:
    """Per cell, the reference batch whose ComBat map applies (-1: none). Returns how many
    cells stay uncorrected."""
    if "batch_names" not in model:
        return 0
    key = batch_key or str(model["batch_key"])
    pos = {str(b): i for i, b in enumerate(np.asarray(model["batch_names"]))}
    if key in adata.obs:
        codes = np.array([pos.get(str(b), -1) for b in adata.obs[key].astype(str)])
    else:
        codes = np.full(adata.n_obs, -1)
    t.batch_codes = codes
    t.batch_slope = np.asarray(model["batch_slope"])
    t.batch_shift = np.asarray(model["batch_shift"])
    n = int((codes < 0).sum())
    if n:
        where = f"obs['{key}']" if key in adata.obs else f"no obs['{key}']"
        warnings.warn(
            f"{n} cells are not in a batch the reference was corrected over ({where}); "
            "they are mapped without batch correction.",
            UserWarning,
            stacklevel=3,
        )
    return n


def _from_h5(d):
    """Undo ``api._h5_safe`` ('none' for None) and numpy scalars from an h5ad round trip."""
    if isinstance(d, dict):
        return {k: _from_h5(v) for k, v in d.items()}
    if isinstance(d, str) and d == "none":
        return None
    if isinstance(d, np.generic):
        return d.item()
    if isinstance(d, np.ndarray):
        return [_from_h5(v) for v in d.tolist()]
    return d
