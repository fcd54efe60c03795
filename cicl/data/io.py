"""Reading any input scanpy understands, and writing results without ever leaving a
half-written file or overwriting the user's data."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

from cicl.errors import InputError

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
    return adata


def read_annotations(path: str | Path, parts: tuple[str, ...] = ("obs", "var")) -> ad.AnnData:
    """An ``.h5ad``'s annotations (``parts`` of obs, var, obsm, uns) without its matrices: what
    streamed runs read from an atlas, whose X, layers and raw/X stay on disk (anndata's backed
    mode would load every layer and obsm into memory)."""
    import h5py
    from anndata.io import read_elem

    with h5py.File(path, "r") as f:
        return ad.AnnData(**{p: read_elem(f[p]) for p in parts if p in f})


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


def write_h5ad_atomic(adata: ad.AnnData, out: str | Path) -> None:
    """Write to a temporary file in the target folder, then rename: readers never see a
    truncated file, and an interrupted run leaves the old file (if any) intact."""
    out = Path(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        adata.write_h5ad(tmp, compression="gzip")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_output(inp: str | Path, out: str | Path, force: bool) -> Path:
    """Refuse to overwrite the input, or an existing file without ``force``; check the folder."""
    o = Path(out)
    if o.suffix.lower() != ".h5ad":
        raise InputError(f"Output '{o}' must end in .h5ad.")
    if Path(inp).exists() and o.exists() and o.resolve() == Path(inp).resolve():
        raise InputError("The output path is the input file. Choose another --out path.")
    if o.exists() and not force:
        raise InputError(f"Output '{o}' already exists. Pass --force to overwrite it.")
    parent = o.parent if str(o.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"Output folder '{parent}' does not exist. Create it first.")
    if not os.access(parent, os.W_OK):
        raise InputError(f"Output folder '{parent}' is not writable.")
    return o


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

    out = Path(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
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
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
