"""A random sample of an ``.h5ad``'s cells, read from the file without loading it: what
``cicl tune`` sweeps on when the input is an atlas (trials then run in memory on the sample).

Only the sampled rows of the chosen matrix are read (``cicl.data.stream``'s row reader, which
sparse and dense X both go through), and of obs only the sampled rows of the columns asked
for: an atlas' obs can be larger than the sample itself. The rows are drawn uniformly over
the whole file (seeded), so a file stored sorted by cell type or batch is sampled alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd

from cicl.data.preprocess import Matrix
from cicl.data.stream import _choose_file_matrix, _n_cells, _with_every_batch
from cicl.errors import InputError


@dataclass(frozen=True)
class FileSample:
    """The sampled cells (``adata``: the matrix ``layer`` chose, as X; the obs columns asked
    for), their rows in the file (sorted), the file's cell count, and which matrix was read
    (for ``record_matrix``: the sample's X is that matrix, whatever its name in the file)."""

    adata: ad.AnnData
    rows: np.ndarray
    n_obs: int
    matrix: Matrix


def sample_rows(n: int, n_sample: int, seed: int) -> np.ndarray:
    """``min(n, n_sample)`` distinct rows of ``n``, uniformly at random (seeded), sorted (HDF5
    reads rows in increasing order)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, min(n, n_sample), replace=False))


def obs_columns(f: h5py.File) -> list[str]:
    """The obs column names of an open ``.h5ad`` (nothing read but the group's attributes)."""
    obs = f["obs"]
    order = [str(c) for c in obs.attrs.get("column-order", [])]
    return order or [str(k) for k in obs if k != obs.attrs.get("_index")]


def read_obs_column(f: h5py.File, key: str, rows: np.ndarray | None = None):
    """obs column ``key`` of an open ``.h5ad`` (``"_index"``: the cell names), at the sorted
    ``rows`` only (every row if None): a categorical's codes or an array's values are read at
    those rows, never the whole column. Categorical columns come back as ``pd.Categorical``,
    others as numpy arrays (strings as str)."""
    from anndata.io import read_elem

    obs = f["obs"]
    name = obs.attrs["_index"] if key == "_index" else key
    if name not in obs:
        raise InputError(
            f"obs column '{key}' is not in '{f.filename}'; available: "
            f"{', '.join(obs_columns(f)) or 'none'}."
        )
    elem = obs[name]
    pick = slice(None) if rows is None else np.asarray(rows)
    enc = elem.attrs.get("encoding-type", "")
    if enc == "categorical":
        codes = elem["codes"][pick]
        cats = read_elem(elem["categories"])
        return pd.Categorical.from_codes(codes, cats, ordered=bool(elem.attrs.get("ordered")))
    if isinstance(elem, h5py.Dataset):
        values = elem[pick]
        if values.dtype.kind in "OS":  # variable- or fixed-length strings
            values = np.array([v.decode() if isinstance(v, bytes) else v for v in values], object)
        return values
    column = read_elem(elem)  # other encodings (nullable arrays): this one column whole
    return np.asarray(column)[pick]


def read_sample(
    source: str | Path | h5py.File,
    n_sample: int,
    seed: int,
    *,
    layer: str | None = "auto",
    obs_keys: tuple[str, ...] = (),
    batch_key: str | None = None,
) -> FileSample:
    """Up to ``n_sample`` random cells of an ``.h5ad`` (a path, or an open file), read from
    the matrix ``layer`` picks (``"auto"``: X, or the counts a log-normalised file keeps in a
    layer or raw/X, judged on the sampled rows as a streamed fit judges its own sample), with
    the obs columns ``obs_keys``. With ``batch_key`` the sample is topped up so that every
    batch has cells in it (ComBat needs each batch seen), as a streamed fit's is."""
    if not isinstance(source, h5py.File):
        with h5py.File(source, "r") as f:
            return read_sample(
                f, n_sample, seed, layer=layer, obs_keys=obs_keys, batch_key=batch_key
            )
    from anndata.io import read_elem

    f = source
    n = _n_cells(f)
    var_names = np.asarray(read_elem(f["var"]).index).astype(str)
    if n == 0 or len(var_names) == 0:
        raise InputError(f"'{f.filename}' has {n} cells and {len(var_names)} genes.")
    rows = sample_rows(n, n_sample, seed)
    keys = list(dict.fromkeys([*obs_keys, *([batch_key] if batch_key else [])]))
    if batch_key is not None:  # one column read whole: which batch every cell is in
        column = np.asarray(read_obs_column(f, batch_key), dtype=object)
        if pd.isna(column).any():
            raise InputError(f"batch_key '{batch_key}' is missing for some cells.")
        _, codes = np.unique(column.astype(str), return_inverse=True)
        rows = _with_every_batch(rows, codes, np.random.default_rng([seed, 1]))
    fm = _choose_file_matrix(f, rows, layer, var_names)
    obs = pd.DataFrame(
        {key: read_obs_column(f, key, rows) for key in keys},
        index=pd.Index(np.asarray(read_obs_column(f, "_index", rows)).astype(str)),
    )
    sample = ad.AnnData(X=fm.sample, obs=obs, var=pd.DataFrame(index=fm.var_names))
    return FileSample(sample, rows, n, Matrix(sample, None, fm.name, fm.note))
