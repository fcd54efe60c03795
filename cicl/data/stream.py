"""Reading an atlas in shards straight from its ``.h5ad`` (layout choice: backed h5ad).

Why backed h5ad and not Parquet through Ray Data: it is the file users already have (no
conversion pass, no second copy of a 50 M-cell atlas); anndata reads any run of rows of a CSR
``X`` cheaply; ownership of cells by ranks is fixed (``shard_rows``), which pseudo-labels keyed
by cell and distributed K-means need and Ray Data's ``streaming_split`` does not promise; and a
K-means round re-reads its sample, which is a plain read here. Multi-node runs need the file on
shared storage (EFS/NFS/FSx, or an S3 mount).

Row order: atlases are stored sorted (by sample, donor, annotation). Ranks hold chunks of
``train.chunk_size`` consecutive rows dealt in turn, so each holds every stretch of the file in
its share; training draws pools of random chunks (``cicl.train.stream``). A pool of a few runs
is read as slices, one of many runs (128 chunks of 32) in one scattered read (docs/distributed.md
has the measurements and why this is written here rather than taken from annbatch or
scdataset).

Preprocessing is fitted once on a random sample of cells with the same scanpy pipeline as the
in-memory path (``preprocess``), then applied per block: library normalisation and log1p are
per cell, HVG selection, scaling and PCA projection use the sample's genes, means, SDs and
loadings. With a batch key, ComBat runs on the sample (``preprocess``), which also returns the
map ComBat applied (affine per batch and gene); blocks get it by each cell's batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import scipy.sparse as sp

from cicl.config import PreprocessConfig
from cicl.data.io import check_sparse_structure, read_annotations
from cicl.data.preprocess import (
    Matrix,
    Prepared,
    batches,
    count_layer_candidates,
    detect_values,
    holds_counts,
    preprocess,
    record_matrix,
    unknown_layer,
)
from cicl.errors import InputError


@dataclass
class BlockTransform:
    """Preprocessing fitted on a sample, applied to any block of raw rows."""

    kind: str
    gene_idx: np.ndarray  # columns of the file's X used, in model order (-1: not in the file)
    scale_mean: np.ndarray | None
    scale_sd: np.ndarray | None
    max_value: float
    pca_mean: np.ndarray
    pca_components: np.ndarray  # (genes used, n_pcs)
    # with a batch key: every file row's batch, and per batch and gene the affine map that
    # ComBat applied to the sample (before scaling)
    batch_codes: np.ndarray | None = None  # (n_cells_in_file,)
    batch_slope: np.ndarray | None = None  # (n_batches, genes used)
    batch_shift: np.ndarray | None = None
    matrix: str = "X"  # the file's matrix the rows come from: "X", "layers/<name>", "raw/X"

    def __call__(self, X, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Model input and PCs of raw rows ``X`` (file rows ``rows``, needed with batches)."""
        X = sp.csr_matrix(X, dtype=np.float32)
        if self.kind == "counts":
            lib = np.asarray(X.sum(1)).ravel()
            X = sp.diags((1e4 / np.maximum(lib, 1e-12)).astype(np.float32)) @ X
            X.data = np.log1p(X.data)
        elif self.kind == "unlogged":
            X.data = np.log1p(X.data)
        missing = self.gene_idx < 0  # genes the model uses that these cells lack (predict)
        x = X[:, np.where(missing, 0, self.gene_idx)].toarray()
        if self.batch_slope is not None:  # ComBat, as fitted on the sample
            b = self.batch_codes[np.asarray(rows)]
            known = b >= 0  # predict: cells of batches ComBat never saw stay uncorrected
            x[known] = x[known] * self.batch_slope[b[known]] + self.batch_shift[b[known]]
        if missing.any():  # at the reference cells' mean: scaled to 0, no pull on any PC
            fill = self.scale_mean if self.scale_mean is not None else self.pca_mean
            x[:, missing] = fill[missing]
        if self.scale_mean is not None:
            x = np.clip((x - self.scale_mean) / self.scale_sd, -self.max_value, self.max_value)
        x = x.astype(np.float32)
        pcs = ((x - self.pca_mean) @ self.pca_components).astype(np.float32)
        return x, pcs

    def raw_counts(self, X) -> np.ndarray:
        """The raw counts of the genes used, in model order (dense float32; genes the model
        uses that these cells lack are 0): what the negative binomial decoder reconstructs."""
        X = sp.csr_matrix(X, dtype=np.float32)
        missing = self.gene_idx < 0
        c = X[:, np.where(missing, 0, self.gene_idx)].toarray()
        c[:, missing] = 0.0
        return c


def _read_rows(f: h5py.File, rows: np.ndarray, matrix: str = "X"):
    """Rows (sorted) of the file's ``matrix`` (X, a layer, raw/X), as CSR; contiguous runs read
    as slices. A matrix that cannot be read as numbers, or whose sparse structure is broken,
    is an ``InputError`` (checked on every block: an atlas is never read whole up front)."""
    try:
        block = _read_block(f[matrix], rows)
    except (ValueError, TypeError, KeyError, OSError) as exc:
        raise InputError(
            f"Cannot read rows of '{matrix}' from '{f.filename}' ({type(exc).__name__}: {exc}). "
            "Check that the file is complete and its matrix numeric."
        ) from None
    check_sparse_structure(block)
    return block


def _read_block(X, rows: np.ndarray):
    """Rows (sorted) of an on-disk matrix: one slice per run of consecutive rows, so a pool of
    a few chunks costs a few reads, not one per row."""
    rows = np.asarray(rows)
    if not len(rows):
        return sp.csr_matrix((0, _n_cols(X)), dtype=np.float32)
    dense = isinstance(X, h5py.Dataset)
    ds = X if dense else ad.io.sparse_dataset(X)
    starts, stops = runs(rows)
    if len(starts) > 16:  # many runs: one fancy read (~50 ms for 4,096 rows, a slice ~2.5 ms)
        return sp.csr_matrix(ds[rows])
    parts = [sp.csr_matrix(ds[int(a) : int(b)]) for a, b in zip(starts, stops, strict=True)]
    return parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")


def _n_cols(X) -> int:
    return int(X.shape[1] if isinstance(X, h5py.Dataset) else X.attrs["shape"][1])


def runs(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, stops) of the runs of consecutive values in sorted ``rows``."""
    rows = np.asarray(rows)
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = rows[np.r_[0, breaks]]
    stops = rows[np.r_[breaks - 1, len(rows) - 1]] + 1
    return starts, stops


@dataclass(frozen=True)
class FileMatrix:
    """The matrix of an ``.h5ad`` that cells on disk are read from: ``key`` (its h5 path:
    ``X``, ``layers/<name>`` or ``raw/X``), ``name`` for the record, its gene names (raw/X has
    its own), the rows its values were judged on, its row count and, when chosen over X, why."""

    path: Path
    key: str
    name: str
    var_names: np.ndarray
    sample: object
    n_obs: int
    note: str | None = None

    def read(self, f: h5py.File, start: int, stop: int):
        """Rows ``start:stop`` of the matrix, as CSR."""
        return _read_rows(f, np.arange(start, stop), self.key)


def _n_cells(f: h5py.File) -> int:
    """The file's cell count, from its obs index (no matrix read)."""
    return int(f["obs"][f["obs"].attrs["_index"]].shape[0])


def _choose_file_matrix(
    f: h5py.File, rows: np.ndarray, layer: str | None, var_names: np.ndarray
) -> FileMatrix:
    """``cicl.data.preprocess.choose_matrix`` for a file on disk, judged on ``rows`` (a random
    sample for a streamed fit, the first cells for ``cicl predict --stream``); ``var_names``
    are the file's (X's and the layers'), raw/X brings its own."""
    from anndata.io import read_elem

    layers = [str(k) for k in f["layers"]] if "layers" in f else []
    if layer == "auto":
        key, sample, note = _auto_choice(f, rows, layers)
    else:
        if layer in (None, "X"):
            key = "X"
        elif layer in layers:
            key = f"layers/{layer}"
        elif layer == "raw" and "raw" in f:
            key = "raw/X"
        else:
            raise unknown_layer(layer, layers, "raw" in f)
        sample, note = _read_rows(f, rows, key), None
    m = f[key]
    n = int(m.shape[0] if isinstance(m, h5py.Dataset) else m.attrs["shape"][0])
    names = read_elem(f["raw/var"]).index if key == "raw/X" else var_names
    name = {"X": "X", "raw/X": "raw.X"}.get(key, f"layers['{key.removeprefix('layers/')}']")
    return FileMatrix(Path(f.filename), key, name, np.asarray(names).astype(str), sample, n, note)


def _auto_choice(
    f: h5py.File, rows: np.ndarray, layers: list[str]
) -> tuple[str, object, str | None]:
    """``auto``: X if it holds counts, else the first counts layer or raw/X that does (and
    why), else X; with the rows read of the one chosen."""
    X = _read_rows(f, rows) if "X" in f else None
    kind = None if X is None else detect_values(X)
    if kind == "counts":
        return "X", X, None
    held = "X is empty" if kind is None else f"X holds {kind} values"
    candidates = [(f"layers/{n}", f"layers['{n}']") for n in count_layer_candidates(layers)]
    candidates += [("raw/X", "raw.X")] if "raw" in f else []
    for key, name in candidates:
        S = _read_rows(f, rows, key)
        if holds_counts(S):
            return key, S, f"{held}, the raw counts are in {name}"
    if X is None:
        raise InputError("The file has no X and no layer of raw counts. Store counts in X.")
    return "X", X, None


def choose_file_matrix(
    path: str | Path, var_names, layer: str | None = "auto", n_judge: int = 50_000
) -> FileMatrix:
    """``choose_matrix`` for cells on disk (``cicl predict --stream``), judged on the file's
    first ``n_judge`` cells: a query stored as CELLxGENE stores it (log-normalised X, counts
    in raw/X) is read from the counts its reference was fitted on."""
    with h5py.File(path, "r") as f:
        rows = np.arange(min(_n_cells(f), n_judge))
        return _choose_file_matrix(f, rows, layer, np.asarray(var_names).astype(str))


def fit_on_sample(
    path: str | Path,
    cfg: PreprocessConfig,
    n_sample: int = 20_000,
    seed: int = 0,
    layer: str | None = "auto",
) -> tuple[BlockTransform, Prepared, int, int]:
    """Fit the preprocessing on up to ``n_sample`` cells of the file, read from the matrix
    ``layer`` picks (as ``cicl.fit``'s: "auto" takes the counts a log-normalised file keeps in
    a layer or raw/X). The cells are random, or, in a file of more than ``SKETCH_FROM`` cells,
    a density-balanced sketch (``cicl.data.sketch``) in which rare types are not left at a few
    cells. Returns the transform (which remembers that matrix), the sample's ``Prepared`` and
    the file's (n_cells, n_genes)."""
    from cicl.data.sketch import SKETCH_FROM, first_pass_config, sketch_rows

    var_names = np.asarray(read_annotations(path, ("var",)).var_names).astype(str)
    with h5py.File(path, "r") as f:  # opening the file's metadata again costs milliseconds
        n = _n_cells(f)
    g = len(var_names)
    if n == 0 or g == 0:
        raise InputError(f"'{path}' has {n} cells and {g} genes; nothing to cluster.")
    rng = np.random.default_rng(seed)
    sketch = None
    if n > SKETCH_FROM:

        def fit_first(first_rows: np.ndarray, n_genes: int | None) -> BlockTransform:
            first_cfg = first_pass_config(cfg, n_genes)
            return _fit_rows(path, first_rows, first_cfg, layer, var_names, None, None, "")[0]

        sketch = sketch_rows(str(path), n, n_sample, seed, fit_first)
        rows = sketch.rows
    else:
        rows = np.sort(rng.choice(n, min(n, n_sample), replace=False))
    codes = names = None
    if cfg.batch_key is not None:
        codes, names = _batch_codes(path, cfg.batch_key)
        rows = _with_every_batch(rows, codes, rng)
    if sketch is None:
        step = f"fitted on a random sample of {len(rows)} of {n} cells"
    else:
        step = sketch.step(n)
        if len(rows) > len(sketch.rows):
            step += f", and {len(rows) - len(sketch.rows)} random cells so that every batch is in"
    t, prep, n_genes = _fit_rows(path, rows, cfg, layer, var_names, codes, names, step)
    return t, prep, n, n_genes


def _fit_rows(
    path: str | Path,
    rows: np.ndarray,
    cfg: PreprocessConfig,
    layer: str | None,
    var_names: np.ndarray,
    codes: np.ndarray | None,
    names: np.ndarray | None,
    step: str,
) -> tuple[BlockTransform, Prepared, int]:
    """``preprocess`` fitted on file rows ``rows`` (sorted), as a ``BlockTransform``, from
    the matrix ``layer`` picks (judged on those rows); ``step`` says how the rows were
    chosen. Also returns the matrix's gene count."""
    with h5py.File(path, "r") as f:
        fm = _choose_file_matrix(f, rows, layer, var_names)
    sample = ad.AnnData(X=fm.sample)
    sample.var_names = fm.var_names
    if codes is not None:
        sample.obs[cfg.batch_key] = names[codes[rows]]
    kind = detect_values(sample.X)
    prep = preprocess(sample, cfg, keep_combat_map=True)
    pos = {name: i for i, name in enumerate(fm.var_names)}
    gene_idx = np.array([pos[str(name)] for name in prep.genes])
    t = BlockTransform(
        kind=kind,
        gene_idx=gene_idx,
        scale_mean=prep.scale_mean,
        scale_sd=prep.scale_sd,
        max_value=cfg.max_value,
        pca_mean=prep.pca_mean,
        pca_components=prep.pca_components,
        matrix=fm.key,
    )
    if prep.batch_names is not None:  # the sample's ComBat map, by each file row's batch
        pos = {str(name): i for i, name in enumerate(prep.batch_names)}
        order = np.array([pos.get(str(name), -1) for name in names])
        if (order < 0).any():
            raise InputError(
                f"batch '{names[order < 0][0]}' has no expressed cell in the sample used to fit "
                "the preprocessing. Drop its cells or give it a larger share of the file."
            )
        t.batch_codes = order[codes].astype(codes.dtype)
        t.batch_slope, t.batch_shift = prep.batch_slope, prep.batch_shift
    prep.info["steps"].insert(0, step)
    record_matrix(prep.info, Matrix(sample, None, fm.name, fm.note))
    return t, prep, len(fm.var_names)


def _batch_codes(path: str | Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Every cell's batch as a small integer code, and the batch names."""
    names, codes = np.unique(batches(read_annotations(path, ("obs",)), key), return_inverse=True)
    dtype = np.int16 if len(names) < 2**15 else np.int32
    return codes.astype(dtype), names


def _with_every_batch(rows: np.ndarray, codes: np.ndarray, rng, per_batch: int = 50) -> np.ndarray:
    """The random sample, topped up so that every batch has ``per_batch`` cells in it (or all
    of its cells): ComBat and the per-batch map need each batch seen."""
    n_batches = int(codes.max()) + 1
    have = np.bincount(codes[rows], minlength=n_batches)
    short = np.flatnonzero(have < per_batch)
    if not len(short):
        return rows
    order = np.argsort(codes, kind="stable")  # cells grouped by batch, one pass for all
    start = np.r_[0, np.cumsum(np.bincount(codes, minlength=n_batches))]
    extra = []
    for b in short:
        members = order[start[b] : start[b + 1]]
        members = members[~np.isin(members, rows)]
        need = min(per_batch - have[b], len(members))
        extra.append(rng.choice(members, need, replace=False))
    return np.sort(np.concatenate([rows, *extra]))


class H5adSource:
    """One rank's rows of an ``.h5ad`` (``rows``: sorted file rows; local cell ``i`` is file
    row ``rows[i]``), read through a ``BlockTransform``. ``chunk_starts``: where each chunk of
    consecutive file rows begins among the local cells (``shard_rows``): streaming draws its
    pools from them. Picklable: the file is opened lazily in the process that reads."""

    def __init__(
        self,
        path: str | Path,
        rows: np.ndarray,
        transform: BlockTransform,
        chunk: int | None = None,
    ):
        self.path, self.transform = str(path), transform
        self.rows = np.asarray(rows, dtype=np.int64)
        self.n = len(self.rows)
        self.chunk_starts = chunk_starts(self.rows, chunk or max(self.n, 1))
        self.has_counts = transform.kind == "counts"
        self._f: h5py.File | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_f": None}

    def _raw(self, idx: np.ndarray):
        if self._f is None:
            self._f = h5py.File(self.path, "r")
        rows = self.rows[np.asarray(idx)]
        return _read_rows(self._f, rows, self.transform.matrix), rows

    def read(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        X, rows = self._raw(idx)
        return self.transform(X, rows)

    def read_counts(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``read`` plus the rows' raw counts of the genes used, from one read of the file."""
        X, rows = self._raw(idx)
        return (*self.transform(X, rows), self.transform.raw_counts(X))

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def shard_rows(n: int, world: int, chunk: int) -> list[np.ndarray]:
    """Every rank's file rows: the file cut into chunks of ``chunk`` consecutive rows, dealt
    to the ranks in turn (rank r: chunks r, r + world, ...). Whatever order the file is
    stored in (sorted by type, donor, sample), every stretch of it is shared evenly, so each
    rank holds all of its cell types in their shares, and reads stay runs of ``chunk`` rows.
    Fixed for the whole fit: pseudo-labels and K-means shards belong to a rank's cells."""
    owner = (np.arange(n) // max(1, chunk)) % world
    return [np.flatnonzero(owner == r) for r in range(world)]


def chunk_starts(rows: np.ndarray, chunk: int) -> np.ndarray:
    """Local offsets where a chunk begins: at every break in ``rows`` and every ``chunk`` rows
    within a run."""
    if not len(rows):
        return np.zeros(0, np.int64)
    starts, stops = runs(rows)
    local = np.r_[0, np.cumsum(stops - starts)[:-1]]
    return np.concatenate(
        [np.arange(o, o + (b - a), chunk) for o, a, b in zip(local, starts, stops, strict=True)]
    ).astype(np.int64)
