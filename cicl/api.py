"""scanpy-style entry point: ``cicl.fit(adata, n_clusters=None, ...)``."""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd

from cicl._keys import DEFAULT_KEY, embedding_key
from cicl.config import CICLConfig
from cicl.objective import score_labels
from cicl.pipeline import check_device, prepare, prepare_file
from cicl.reference import model_record
from cicl.train.loop import TrainResult, train

if TYPE_CHECKING:
    from cicl.distributed import RayOptions


def fit(
    adata: ad.AnnData,
    n_clusters: int | None = None,
    *,
    config: CICLConfig | None = None,
    seed: int | None = None,
    layer: str | None = "auto",
    batch_key: str | None = None,
    key_added: str = DEFAULT_KEY,
    copy: bool = False,
    progress: bool = True,
    workers: int | None = None,
    ray_options: RayOptions | None = None,
) -> ad.AnnData | None:
    """Cluster cells with CICL.

    ``adata.X`` (or ``layer``) is never modified. ``layer``: ``"auto"`` reads X, or the raw
    counts a log-normalised object keeps in ``layers["counts"]`` (or a similar name) or
    ``.raw`` (``choose_matrix``); ``"X"``, ``"raw"`` or a layer name pick one.
    When ``n_clusters`` is None it is estimated
    without labels (scanpy's default Leiden on the PCA; see ``cicl.data.estimate``).
    ``batch_key`` (an obs column: sample, donor, run) selects HVGs within batches and removes
    per-batch gene shifts with scanpy's ComBat before scaling (``preprocess.batch_key``).
    ``seed`` overrides the config's ``seed`` (as ``--seed``): the same seed gives the same
    labels on the same kind of CPU, at any thread count.

    Sets the following fields:

    - ``obs[key_added]``: cluster labels, categorical of strings ``"0"``, ``"1"``, ...
    - ``obsm["X_" + key_added]``: the space the clusters live in (default "hybrid": the
      L2-normalised encoder output next to the weighted PCA block; see ``cluster.space``).
    - ``uns[key_added]``: ``params`` (the full config), ``preprocess`` (every decision taken on
      the input), ``n_clusters`` and ``n_clusters_source``, ``centroids``, ``history`` (one
      record per reclustering round), ``epochs``, ``steps``, ``seconds``.

    With ``workers`` (or ``ray_options``) training runs as a Ray Train job over that many
    workers (see ``cicl.distributed``); otherwise in this process.

    Returns ``adata`` if ``copy`` else None.
    """
    cfg = config or CICLConfig()
    if seed is not None:
        cfg = cfg.with_overrides({"seed": int(seed)})
    if n_clusters is not None:
        cfg = cfg.with_overrides({"cluster.n_clusters": int(n_clusters)})
    if batch_key is not None:
        cfg = cfg.with_overrides({"preprocess.batch_key": batch_key})
    if workers is not None and ray_options is None:
        from cicl.distributed import RayOptions

        ray_options = RayOptions(workers=workers)
    if ray_options is None:
        check_device(cfg)
    adata = adata.copy() if copy else adata
    t0 = time.perf_counter()
    plan = prepare(adata, cfg, layer)
    prep, cfg, k = plan.prep, plan.cfg, plan.k
    if ray_options is not None:
        from cicl.distributed import fit_ray

        res = fit_ray(prep.x, prep.pcs, k, cfg, ray_options, progress=progress, counts=prep.counts)
    else:
        res = train(prep.x, prep.pcs, k, cfg, progress=progress, counts=prep.counts)
    n_workers = ray_options.workers if ray_options is not None else 1
    seconds = time.perf_counter() - t0
    for w in prep.info.get("warnings", []):
        warnings.warn(w, UserWarning, stacklevel=2)
    # label-free quality of the partition, the sweeps' default objective: comparable across
    # runs, K and configs because the PCA space is the same for all of them
    sil = score_labels("silhouette_pca", res.labels, prep.pcs)  # the sweeps' fixed sample
    model = model_record(res, prep, cfg.preprocess.max_value)
    write_result(
        adata,
        res,
        cfg,
        prep.info,
        k,
        plan.source,
        key_added,
        seconds,
        n_workers,
        prep.cell_mask,
        model,
    )
    adata.uns[key_added]["silhouette_pca"] = float(sil)
    return adata if copy else None


def write_result(
    adata: ad.AnnData,
    res: TrainResult,
    cfg: CICLConfig,
    prep_info: dict,
    k: int,
    source: str,
    key_added: str,
    seconds: float,
    workers: int = 1,
    cell_mask: np.ndarray | None = None,
    model: dict | None = None,
) -> None:
    """Write labels/embedding/uns; cells outside ``cell_mask`` (dropped by preprocessing) get
    a missing label and a NaN embedding row. ``model`` (``reference.model_record``) goes to
    ``uns[key_added]["model"]``."""
    n = adata.n_obs
    mask = np.ones(n, dtype=bool) if cell_mask is None else np.asarray(cell_mask, dtype=bool)
    codes = np.full(n, -1, dtype=int)
    codes[mask] = res.labels.astype(int)
    cats = [str(i) for i in range(k)]
    adata.obs[key_added] = pd.Categorical.from_codes(codes, categories=cats)
    emb = np.full((n, res.embedding.shape[1]), np.nan, dtype=np.float32)
    emb[mask] = res.embedding
    adata.obsm[embedding_key(key_added)] = emb
    adata.uns[key_added] = result_uns(res, cfg, prep_info, k, source, seconds, workers, model)


def result_uns(
    res: TrainResult,
    cfg: CICLConfig,
    prep_info: dict,
    k: int,
    source: str,
    seconds: float,
    workers: int = 1,
    model: dict | None = None,
) -> dict:
    """``uns[key_added]``: the config, every preprocessing decision, K and how it was chosen,
    the centroids, the training record and (``model``) what ``predict`` rebuilds the model from."""
    uns = {
        **model_uns(cfg, k, source, res.centroids),
        "preprocess": _h5_safe(prep_info),
        "history": pd.DataFrame(res.history).to_dict(orient="list") if res.history else {},
        "epochs": int(res.epochs),
        "steps": int(res.steps),
        "time_budget_hit": bool(res.budget_hit),
        "precision": res.precision,
        "seconds": float(seconds),
        "workers": int(workers),
        "device": res.device,
        "threads": int(res.threads),
        "decoder": res.decoder,
        **({} if res.pca_weight is None else {"pca_weight": float(res.pca_weight)}),
        **metric_uns(res.metric),
        "timings": {k: float(v) for k, v in res.timings.items()},
    }
    if model is not None:
        uns["model"] = model
    return uns


def metric_uns(metric: dict | None) -> dict:
    """``uns[key]["metric"]``: how the final partition assigns cells ("tied": the shared-
    covariance mixture, with its Ledoit-Wolf shrinkage and EM steps; "full": a covariance per
    cluster, with its prior and floor too; "euclidean": K-means')."""
    if metric is None:
        return {"metric": {"kind": "euclidean"}}
    out = {
        "kind": "full" if "logdet" in metric else "tied",
        "shrinkage": float(metric["shrinkage"]),
        "iterations": int(metric["iterations"]),
    }
    if "logdet" in metric:
        out |= {"prior": float(metric["prior"]), "floor": float(metric["floor"])}
    return {"metric": out}


def model_uns(cfg: CICLConfig, k: int, source: str, centroids: np.ndarray) -> dict:
    """The ``uns`` fields every stored model has (a fit's output, a sweep trial's reference):
    what ``cicl predict`` reads besides ``model``."""
    return {
        "params": _h5_safe(cfg.to_dict()),
        "n_clusters": int(k),
        "n_clusters_source": source,
        "centroids": np.asarray(centroids, dtype=np.float32),
    }


def _h5_safe(d: Any) -> Any:
    """h5ad cannot store None: write it as the string 'none'."""
    if isinstance(d, dict):
        return {k: _h5_safe(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_h5_safe(v) for v in d]
    return "none" if d is None else d


def fit_h5ad_stream(
    path: str | Path,
    out: str | Path,
    n_clusters: int | None = None,
    *,
    config: CICLConfig | None = None,
    ray_options: RayOptions | None = None,
    key_added: str = DEFAULT_KEY,
    n_sample: int = 20_000,
    progress: bool = True,
    layer: str | None = "auto",
) -> dict:
    """Cluster an ``.h5ad`` atlas without loading it: preprocessing is fitted on a random
    sample, training and K-means stream blocks from the file (over Ray Train workers with
    ``ray_options``, else in this process). ``out`` holds the input's cell names and genes,
    ``obs[key_added]``, ``obsm["X_" + key_added]`` and ``uns[key_added]``, not the atlas'
    matrices (the input is untouched; join on the cell names); it is written block by block,
    so memory does not grow with the atlas beyond the labels. ``layer`` picks
    the matrix as in ``fit`` (CELLxGENE's layout, counts in raw/X, is read from them).
    Returns uns."""
    from cicl.data.io import write_result_file
    from cicl.data.stream import H5adSource
    from cicl.distributed import StreamSetup, fit_ray_stream, model_init
    from cicl.train.stream import train_stream

    cfg = config or CICLConfig()
    if n_clusters is not None:
        cfg = cfg.with_overrides({"cluster.n_clusters": int(n_clusters)})
    t0 = time.perf_counter()
    if ray_options is None:
        check_device(cfg)
    plan = prepare_file(path, cfg, layer, n_sample)
    prep, cfg, k, n, transform = plan.prep, plan.cfg, plan.k, plan.n_cells, plan.transform
    groups, pca_init = model_init(prep.x, prep.pcs, cfg)
    mean = prep.pcs.mean(0)
    rms = float(np.sqrt(((prep.pcs - mean) ** 2).sum(1).mean()))
    setup = StreamSetup(
        str(Path(path).resolve()), transform, n, prep.x.shape[1], groups, pca_init, (mean, rms)
    )
    workers = ray_options.workers if ray_options is not None else 1
    with tempfile.TemporaryDirectory(prefix=".cicl-", dir=Path(out).parent) as scratch:
        if ray_options is not None:
            res, parts = fit_ray_stream(setup, k, cfg, ray_options, progress=progress)
        else:
            blocks = BlockFile(Path(scratch) / "embedding.npy", n)
            src = H5adSource(setup.path, np.arange(n), transform, cfg.train.chunk_size)
            res = train_stream(
                src,
                k,
                cfg,
                groups=groups,
                pca_init=pca_init,
                pca_stats=(mean, rms),
                n_genes=prep.x.shape[1],
                progress=progress,
                on_block=blocks,
            )
            src.close()
            blocks.close()
            res.labels, parts = blocks.labels, [(0, n, blocks.path, 0)]
        info = dict(prep.info, n_cells=int(n))
        model = _streamed_model(res, prep, cfg, parts)
        seconds = time.perf_counter() - t0
        uns = result_uns(res, cfg, info, k, plan.source, seconds, workers, model)
        labels = pd.Categorical.from_codes(res.labels, categories=[str(i) for i in range(k)])
        write_result_file(path, out, key_added, labels, _h5_safe(uns), parts)
    return uns


MODEL_SAMPLE = 100_000  # cells a streamed model's distance quantiles are computed on


def _streamed_model(res: TrainResult, prep, cfg: CICLConfig, parts: list) -> dict:
    """``model_record`` of a streamed fit: the per-cluster distance quantiles from a seeded
    sample of ``MODEL_SAMPLE`` cells' embedding rows (every cell when fewer), read chunk by
    chunk from ``parts``; cluster sizes from every label."""
    from dataclasses import replace

    from cicl.data.io import embedding_windows, npy_rows

    n = len(res.labels)
    rows = np.arange(n)
    if n > MODEL_SAMPLE:
        rows = np.sort(np.random.default_rng(cfg.seed).choice(n, MODEL_SAMPLE, replace=False))
    d = npy_rows(parts[0][2], 0, 0).shape[1]
    picked = [
        block[rows[(rows >= a) & (rows < a + len(block))] - a]
        for a, block in embedding_windows(parts, n, d, 65_536)
    ]
    sample = replace(res, labels=res.labels[rows], embedding=np.concatenate(picked))
    model = model_record(sample, prep, cfg.preprocess.max_value)
    model["cluster_sizes"] = np.bincount(res.labels, minlength=len(res.centroids))
    return model


class BlockFile:
    """Receives a streamed fit's final blocks (``train_stream``'s ``on_block``): labels kept in
    memory (one int per cell), embedding rows written to a ``.npy`` file at their offset, so
    the embedding is never held whole."""

    def __init__(self, path: Path, n: int) -> None:
        self.path, self.n = path, n
        self.labels = np.full(n, -1, dtype=np.int64)
        self._f = None
        self._row = 0
        self._start = 0

    def __call__(self, idx: np.ndarray, labels: np.ndarray, h: np.ndarray) -> None:
        if self._f is None:
            self._f = open(self.path, "wb")  # noqa: SIM115 - closed by close()
            fmt = np.lib.format
            header = {"descr": fmt.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False}
            fmt.write_array_header_1_0(self._f, {**header, "shape": (self.n, h.shape[1])})
            self._start, self._row = self._f.tell(), h.shape[1] * 4
        if len(idx) and idx[-1] - idx[0] + 1 != len(idx):
            raise ValueError("streamed blocks must be contiguous row ranges")
        self.labels[idx] = labels
        self._f.seek(self._start + int(idx[0]) * self._row)
        self._f.write(np.ascontiguousarray(h, dtype=np.float32).tobytes())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
