"""Reading any input scanpy understands, and writing results without ever leaving a
half-written file or overwriting the user's data."""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cicl.errors import InputError, InputWarning

READERS = {
    ".h5ad": "h5ad",
    ".h5": "10x_h5",
    ".loom": "loom",
    ".csv": "csv",
    ".tsv": "tsv",
    ".txt": "tsv",
    ".mtx": "10x_mtx",
}


def read_input(path: str | Path) -> ad.AnnData:
    """Read ``.h5ad``, 10x ``.h5``, ``.loom``, ``.csv``/``.tsv`` (cells x genes, first column
    = cell names) or a 10x matrix folder, dense or sparse."""
    import scanpy as sc

    p = Path(path)
    if not p.exists():
        raise InputError(f"Input '{p}' does not exist. Check the path.")
    kind = "10x_mtx" if p.is_dir() else READERS.get(p.suffix.lower())
    if p.suffix.lower() == ".gz" and len(p.suffixes) >= 2:
        kind = READERS.get(p.suffixes[-2].lower())
    if kind is None:
        raise InputError(
            f"Cannot read '{p}': unknown format '{p.suffix}'. "
            "Give an .h5ad, 10x .h5, .loom, .csv/.tsv file or a 10x matrix folder."
        )
    try:
        with warnings.catch_warnings():  # readers' warnings (duplicate names...) become our errors
            warnings.simplefilter("ignore")
            if kind == "h5ad":
                adata = ad.read_h5ad(p)
            elif kind == "10x_h5":
                adata = sc.read_10x_h5(p)
            elif kind == "loom":
                adata = sc.read_loom(p)
            elif kind in ("csv", "tsv"):
                adata = sc.read_csv(
                    p, delimiter="," if kind == "csv" else "\t", first_column_names=True
                )
            else:
                adata = sc.read_10x_mtx(p if p.is_dir() else p.parent)
            if kind in ("10x_h5", "10x_mtx", "loom"):  # gene symbols repeat here: scanpy's fix
                adata.var_names_make_unique()
    except Exception as exc:  # noqa: BLE001 - any reader failure is the same user problem
        raise InputError(
            f"Could not read '{p}' as {kind}: {type(exc).__name__}: {exc}. "
            "Check that the file is complete and in the format its extension says."
        ) from None
    for X in (adata.X, *adata.layers.values(), adata.raw.X if adata.raw is not None else None):
        check_sparse_structure(X)  # also those the fit does not read: all are written back
    if kind in ("csv", "tsv") and _looks_transposed(adata):
        warnings.warn(
            f"'{p}' looks like genes x cells (its row names look like genes or its column names "
            f"like cells): cicl reads rows as cells, so these are {adata.n_obs} 'cells' of "
            f"{adata.n_vars} 'genes'. Transpose the file if rows are genes.",
            InputWarning,
            stacklevel=2,
        )
    return adata


_GENE_ID = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")  # Ensembl gene ids (human, mouse, ...)
_CELL_NAME = re.compile(r"^([ACGTN]{8,}([-_.]\w+)?|[SED]RR\d+|.*cell.*)$", re.IGNORECASE)


def _looks_transposed(adata: ad.AnnData) -> bool:
    """Most row names are Ensembl gene ids, or most column names are barcodes, run accessions
    or contain "cell": a text table written genes x cells."""

    def share(names, pattern: re.Pattern) -> float:
        names = list(map(str, names[:1000]))
        return sum(bool(pattern.match(n)) for n in names) / max(len(names), 1)

    return share(adata.obs_names, _GENE_ID) > 0.5 or share(adata.var_names, _CELL_NAME) > 0.5


def read_annotations(path: str | Path, parts: tuple[str, ...] = ("obs", "var")) -> ad.AnnData:
    """An ``.h5ad``'s annotations (``parts`` of obs, var, obsm, uns) without its matrices: what
    streamed runs read from an atlas, whose X, layers and raw/X stay on disk (anndata's backed
    mode would load every layer and obsm into memory)."""
    import h5py
    from anndata.io import read_elem

    with h5py.File(path, "r") as f:
        return ad.AnnData(**{p: read_elem(f[p]) for p in parts if p in f})


def check_h5ad_layout(path: str | Path) -> None:
    """The file read as anndata reads it, its matrices left on disk: obs and var present (and
    raw's), every element's encoding one anndata knows, every matrix the shape of its axes. Streamed runs
    read the matrices with h5py and write a copy of the file: a file anndata cannot open would
    give an output it cannot open either."""
    import h5py
    from anndata.experimental import read_dispatched
    from anndata.io import sparse_dataset

    def lazy(read, name, elem, iospec):
        if iospec.encoding_type in ("csr_matrix", "csc_matrix"):
            _check_sparse_lengths(elem, iospec.encoding_type)
            return sparse_dataset(elem)
        if isinstance(elem, h5py.Dataset) and elem.ndim == 2:
            return elem
        return read(elem)

    with h5py.File(path, "r") as f:
        parts = ("obs", "var", *(("raw/X", "raw/var") if "raw" in f else ()))
        missing = [part for part in parts if part not in f]
        if missing:
            raise InputError(f"'{path}' has no {' and no '.join(missing)}: not an .h5ad file.")
        read_dispatched(f, lazy)


def _check_sparse_lengths(group, encoding: str) -> None:
    """A sparse matrix on disk whose index arrays cannot describe it (read before any block:
    a streamed run would fail on its first block, or read garbage)."""
    shape = tuple(int(n) for n in group.attrs["shape"])
    indptr, indices, data = group["indptr"], group["indices"], group["data"]
    major = shape[0] if encoding == "csr_matrix" else shape[1]
    ok = (
        len(shape) == 2
        and indptr.shape == (major + 1,)
        and indices.ndim == data.ndim == 1
        and indices.shape == data.shape
        and np.issubdtype(indptr.dtype, np.integer)
        and np.issubdtype(indices.dtype, np.integer)
        and int(indptr[0]) == 0
        and int(indptr[-1]) == data.shape[0]
    )
    if not ok:
        raise InputError(
            f"the sparse matrix '{group.name}' is corrupt (its index arrays do not fit)"
        )


def check_matrix(adata: ad.AnnData, layer: str | None = None, min_cells: int = 10) -> None:
    """Refuse inputs that cannot be clustered, with a message that says what to do.
    ``layer``: an existing layer (``choose_matrix`` resolves and checks the user's name)."""
    check_axes(adata)
    X = adata.layers[layer] if layer is not None else adata.X
    if X is None:
        raise InputError("The input has no expression matrix (X is empty). Store counts in X.")
    if adata.isbacked:  # on disk: the dtype here, the values block by block (check_finite)
        _check_numeric(X.dtype)
    else:
        check_sparse_structure(X)
        check_finite(X)
    if adata.n_obs < min_cells:
        raise InputError(f"Only {adata.n_obs} cells: clustering needs at least {min_cells}.")


def check_axes(adata: ad.AnnData) -> None:
    """Cells and genes: some of each, and unique names (genes are matched by name, cells
    written back)."""
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InputError(
            f"The input has {adata.n_obs} cells and {adata.n_vars} genes; both must be > 0."
        )
    for axis, names, fix in (
        ("cell", adata.obs_names, "obs_names_make_unique"),
        ("gene", adata.var_names, "var_names_make_unique"),
    ):
        if not names.is_unique:
            dup = names[names.duplicated()]
            raise InputError(
                f"{len(dup)} duplicate {axis} names (e.g. '{dup[0]}'). Make them unique first, "
                f"e.g. adata.{fix}() in Python, then save and rerun."
            )


def check_sparse_structure(X) -> None:
    """A sparse matrix whose index arrays are broken (column indices out of range, pointers not
    increasing, lengths that disagree): refused here, since scipy's kernels trust them and a
    broken file would crash the process, not raise. The pointers are checked to rise from 0
    first: scipy's full check cuts the arrays at the last pointer and skips its checks when
    that is negative, and the next kernel read out of bounds (a segfault)."""
    if not sp.issparse(X) or X.format not in ("csr", "csc"):
        return
    try:
        ptr = np.asarray(X.indptr)
        if ptr.ndim != 1 or not ptr.size or ptr[0] != 0 or (np.diff(ptr) < 0).any():
            raise ValueError("the index pointers do not rise from 0")
        with warnings.catch_warnings():  # scipy's notes on odd dtypes: the error says it all
            warnings.simplefilter("ignore")
            X.check_format(full_check=True)
    except (ValueError, IndexError, TypeError) as exc:
        raise InputError(
            f"The expression matrix is corrupt ({exc}). Rewrite the file from its source."
        ) from None


def _check_numeric(dtype) -> None:
    if not np.issubdtype(dtype, np.number):
        raise InputError(f"The expression matrix has non-numeric dtype {dtype}.")


def check_finite(X) -> None:
    """Refuse a non-numeric matrix or one with NaN / infinite values (dense or sparse)."""
    v = X.data if sp.issparse(X) else np.asarray(X)
    _check_numeric(v.dtype)
    if not np.all(np.isfinite(v)):
        raise InputError(
            "The expression matrix contains NaN or infinite values. Remove or impute them first."
        )


TMP_NAME_EXTRA = len(".") + len(".XXXXXXXX.tmp")  # what the temporary name adds to a name


def new_file_mode(path: Path) -> int:
    """The mode a written file gets: an existing file keeps its own (``--force``), a new one
    gets what the umask allows, as any Unix tool's output (a temporary file is made 0600)."""
    if path.exists():
        return path.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(out: str | Path) -> Iterator[Path]:
    """A temporary path next to ``out`` to write to; renamed to ``out`` (with ``new_file_mode``)
    when the block ends without error, removed otherwise: readers never see a truncated file,
    and a failed run leaves the old file (if any) as it was."""
    out = Path(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, new_file_mode(out))
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_h5ad_atomic(adata: ad.AnnData, out: str | Path) -> None:
    """``adata`` written to ``out`` through ``atomic_path``."""
    with atomic_path(out) as tmp:
        adata.write_h5ad(tmp, compression="gzip")


def check_output(
    inputs: str | Path | tuple[str | Path, ...],
    out: str | Path,
    force: bool,
    *,
    suffixes: tuple[str, ...] = (".h5ad",),
    flag: str = "--out",
) -> Path:
    """Everything about an output path that can be checked before any work: its suffix, not a
    folder, not one of the ``inputs``, not an existing file without ``force``, a writable folder,
    a name short enough for its temporary name."""
    o = Path(out)
    if o.is_dir():
        raise InputError(f"{flag} '{o}' is a folder. Name a file in it, e.g. '{o / 'out'}'.")
    if o.suffix.lower() not in suffixes:
        raise InputError(f"{flag} '{o}' must end in {', '.join(suffixes)}.")
    for inp in (inputs,) if isinstance(inputs, (str, Path)) else inputs:
        if o.exists() and Path(inp).exists() and o.resolve() == Path(inp).resolve():
            raise InputError(f"{flag} '{o}' is the input file '{inp}'. Choose another {flag} path.")
    if o.exists() and not force:
        raise InputError(f"{flag} '{o}' already exists. Pass --force to overwrite it.")
    parent = o.parent if str(o.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"Folder '{parent}' for {flag} does not exist. Create it first.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"Folder '{parent}' for {flag} is not writable.")
    name_max = os.pathconf(parent, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
    if len(o.name.encode()) + TMP_NAME_EXTRA > name_max:
        raise InputError(
            f"{flag} file name is too long ({len(o.name.encode())} bytes; at most "
            f"{name_max - TMP_NAME_EXTRA} here). Choose a shorter name."
        )
    return o


def check_folder(path: str | Path, flag: str) -> Path:
    """A folder cicl will create files under (``--run-dir``, ``--root``): a folder if it
    exists, else creatable (its nearest existing parent a writable folder)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InputError(f"{flag} '{p}' is a file, not a folder. Name a folder.")
    probe = p.resolve()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"{flag} '{p}' cannot be written ('{probe}' is not a writable folder).")
    return p


def figure_formats() -> tuple[str, ...]:
    """The suffixes matplotlib can write (``.png``, ``.pdf``, ``.svg``, ...)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return tuple(f".{k}" for k in FigureCanvasAgg(Figure()).get_supported_filetypes())


def annotate_h5ad_copy(
    src: str | Path,
    out: str | Path,
    obs: dict,
    obsm: dict,
    uns: dict[str, dict],
    drop_obs: tuple[str, ...] = (),
) -> None:
    """Write ``out`` = the ``src`` file plus new obs columns, obsm arrays and uns entries (and
    without the ``drop_obs`` columns, e.g. stale results), without loading X (for atlases):
    copy to a temporary name, edit in place, rename."""
    import shutil

    import h5py

    with atomic_path(out) as tmp:
        shutil.copyfile(src, tmp)
        with h5py.File(tmp, "a") as f:
            frame = ad.io.read_elem(f["obs"]).drop(columns=list(drop_obs), errors="ignore")
            for k, v in obs.items():
                frame[k] = v
            del f["obs"]
            ad.io.write_elem(f, "obs", frame)
            for group, items in (("obsm", obsm), ("uns", uns)):
                if group not in f:
                    ad.io.write_elem(f, group, {})
                for k, v in items.items():
                    if k in f[group]:
                        del f[group][k]
                    ad.io.write_elem(f[group], k, v)


def npy_rows(path: str | Path, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a 2-D ``.npy`` file, read with one seek (no memory map: mapped
    pages would count towards the reader's resident memory)."""
    with open(path, "rb") as f:
        fmt = np.lib.format
        version = fmt.read_magic(f)
        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = read_header(f)
        row = int(np.prod(shape[1:])) * dtype.itemsize
        f.seek(f.tell() + start * row)
        data = np.fromfile(f, dtype=dtype, count=(stop - start) * row // dtype.itemsize)
    return data.reshape((stop - start, *shape[1:]))


def write_result_file(
    src: str | Path,
    out: str | Path,
    key: str,
    labels: pd.Categorical,
    uns: dict,
    embedding: list[tuple[int, int, Path, int]],
    chunk: int = 65_536,
) -> None:
    """A streamed fit's result without the atlas' matrices: the input's cell names and genes,
    ``obs[key]``, ``obsm["X_" + key]`` (copied from ``embedding``: (start, stop, .npy file,
    offset): file rows [start, stop) are that .npy's rows from offset on; ``chunk`` rows at a
    time) and ``uns[key]``; no X. Memory: the labels and
    one chunk. Cell names are copied from the input dataset to dataset, never loaded."""
    import h5py
    from anndata.io import read_elem, write_elem

    with atomic_path(out) as tmp, h5py.File(src, "r") as f_in, h5py.File(tmp, "w") as f:
        f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        index_name = f_in["obs"].attrs["_index"]
        write_elem(f, "obs", pd.DataFrame({key: labels}, index=pd.RangeIndex(len(labels))))
        del f["obs"][f["obs"].attrs["_index"]]
        f_in.copy(f_in["obs"][index_name], f["obs"], name="_index")
        f["obs"].attrs["_index"] = "_index"
        write_elem(f, "var", read_elem(f_in["var"]))
        write_elem(f, "uns", {key: uns})
        write_elem(f, "obsm", {})
        d = int(npy_rows(embedding[0][2], 0, 0).shape[1])
        ds = f["obsm"].create_dataset(
            f"X_{key}",
            shape=(len(labels), d),
            dtype=np.float32,
            chunks=(max(1, min(chunk, 4096, len(labels))), d),
        )
        ds.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
        for a, block in embedding_windows(embedding, len(labels), d, chunk):
            ds[a : a + len(block)] = block


def embedding_windows(
    parts: list[tuple[int, int, Path, int]], n: int, d: int, size: int
) -> Iterator[tuple[int, np.ndarray]]:
    """Rows [a, a + size) of a streamed fit's embedding, in file order, assembled from its
    ``parts`` (see ``write_result_file``): one window in memory at a time."""
    parts = sorted(parts, key=lambda p: p[0])
    i = 0
    for a in range(0, n, size):
        b = min(a + size, n)
        block = np.empty((b - a, d), np.float32)
        while i < len(parts) and parts[i][1] <= a:
            i += 1
        j = i
        while j < len(parts) and parts[j][0] < b:
            start, stop, path, at = parts[j]
            lo, hi = max(start, a), min(stop, b)
            block[lo - a : hi - a] = npy_rows(path, at + lo - start, at + hi - start)
            j += 1
        yield a, block
