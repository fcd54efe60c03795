"""``cicl simulate``: a labelled synthetic atlas of any size, made from a real dataset.

Two ways to make a cell of type c (``mode``):

- ``nb`` (per-cluster negative binomial, as used by splatter-like simulators): for each cluster
  c and gene g the relative expression p_cg (cluster mean of library-normalised counts), one
  dispersion phi_g per gene (method of moments over cells, clusters pooled), and log-normal
  library sizes per cluster. A cell of cluster c with library L gets counts
  ``Poisson(Gamma(shape=1/phi_g, scale=phi_g * L * p_cg))``: each type is one blob.
- ``resample``: a real cell of type c drawn uniformly, its counts binomially thinned:
  ``Binomial(x_g, f)`` with one library fraction per new cell, ``f ~ Uniform(THIN)``. Each
  type keeps its real within-type structure (sub-states, gradients, outliers) instead of a
  fitted blob; a type's library sizes follow its real library distribution (the source is a
  uniform draw from the type) scaled by f, so they keep their real shape and spread, a
  little shallower, and every cell loses a random tenth or more of its counts (no exact
  copies). Thinning rather than multinomial resampling at a drawn library size: a thinned
  cell is what sequencing the same cell shallower would give, so its count noise is the
  real measurement's (thinning keeps a negative binomial a negative binomial with the same
  dispersion), whereas resampling adds a second round of sampling noise on top of the
  observed counts and cannot create counts in genes the source cell lacked anyway; thinning
  also works on the stored non-zeros only. (A fraction tied to a second real cell's library,
  ``min(1, L*/L)``, was tried: it shrank and narrowed the broad library distributions.)

- ``mix``: as ``resample``, from two real cells a and b of the type drawn uniformly:
  ``Binomial(x_a, f/2) + Binomial(x_b, f/2)``. Scaled far beyond the real set (a 1 M-cell
  atlas from 8,617 cells holds each under ``resample`` about 116 times, thinned), copies of
  one cell are each other's nearest neighbours and graph methods split a type into its source
  cells (scanpy's Leiden found 177 communities on a 20 k ``resample`` atlas of cite_cbmc,
  17 on cite_cbmc itself); a pair of cells gives about n_c**2 / 2 sources per type of n_c
  cells, within the type (a cell between two of its cells), so there are no copies. The
  partner is drawn by type only (with ``batch_key``, possibly from another batch).

Type proportions (``proportions``): ``real`` (the real type frequencies), ``equal``, or
``zipf``: types ordered by real frequency (most frequent first, ties in category order) get
``p_i ∝ 1 / i**s``, with s >= 0 chosen so the rarest type gets ``ZIPF_RAREST`` of the cells
(or the share ``rarest`` asks for; s = 0, equal shares, when there are so many types that 1/C
is already below that). Cell
counts per type are the proportions times N rounded by largest remainder, at least one cell
per type when N >= the number of types.

Row order (``order``): ``shuffled`` (contiguous row ranges are fair shards) or ``sorted`` by
type, or by batch then type with ``batch_key`` (the source cell's batch is written to
``obs[batch_key]``; in ``nb`` mode the batch of a uniformly drawn real cell of the type, a
label only, the model has no batch effect), as real atlases are stored. The whole row plan
(type and source cell of every row, N integers each) is decided up front; the counts are
generated and appended in chunks to a CSR ``.h5ad``, so the atlas never has to fit in
memory. ``obs["cell_type"]`` keeps the true type; ``uns["simulate"]`` records how it was made.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cicl.data.io import atomic_path
from cicl.data.preprocess import detect_values
from cicl.errors import InputError

MODES = ("nb", "resample", "mix")
PROPORTIONS = ("real", "equal", "zipf")
ORDERS = ("shuffled", "sorted")
THIN = (0.6, 0.9)  # range of the library fraction a resampled cell keeps
ZIPF_RAREST = 0.002  # share of the rarest type under --proportions zipf


@dataclass
class NBModel:
    genes: np.ndarray  # names (G,)
    types: np.ndarray  # cluster names (C,)
    weights: np.ndarray  # cluster proportions (C,)
    profile: np.ndarray  # relative expression (C, G), rows sum to 1
    dispersion: np.ndarray  # (G,)
    log_lib: np.ndarray  # (C, 2) mean and sd of log library size


@dataclass
class RealCells:
    """The --like data as ``resample`` and the row plan need it: the labelled cells with a
    non-zero library."""

    counts: sp.csr_matrix  # (n, G) counts of the kept genes, int64
    codes: np.ndarray  # (n,) type code
    types: np.ndarray  # (C,) type names
    genes: np.ndarray  # (G,) kept gene names
    batch: pd.Categorical | None = None  # (n,) batch of each cell, if asked for

    def __post_init__(self) -> None:
        self._by_type = np.argsort(self.codes, kind="stable")
        self.sizes = np.bincount(self.codes, minlength=len(self.types))
        self._start = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])

    def draw(self, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """For each type code in ``y``, one of its real cells (index), drawn uniformly."""
        return self._by_type[self._start[y] + rng.integers(0, self.sizes[y])]


def _as_counts(adata: ad.AnnData) -> sp.csr_matrix:
    X = sp.csr_matrix(adata.X, dtype=np.float64)
    kind = detect_values(X)
    if kind == "scaled":
        raise InputError("--like needs counts or log/unlogged expression, not scaled values.")
    if kind == "log":
        X = X.expm1()
    if kind != "counts":
        X.data = np.round(X.data)
        X.eliminate_zeros()
    return X


def _obs_columns(like: str | Path) -> list[str]:
    try:
        with h5py.File(like, "r") as f:
            return list(ad.io.read_elem(f["obs"]).columns)
    except (OSError, KeyError):
        raise InputError(f"--like '{like}' is not a readable .h5ad file.") from None


def check_like(like: str | Path, label_key: str, batch_key: str | None = None) -> None:
    """The --like file's obs has the label (and batch) column: checked before any work."""
    cols = _obs_columns(like)
    for flag, key in (("--label-key", label_key), ("--batch-key", batch_key)):
        if key is not None and key not in cols:
            raise InputError(f"{flag} '{key}' is not an obs column of the --like data.")
    if batch_key == "cell_type":
        raise InputError("--batch-key may not be 'cell_type': the atlas keeps its types there.")


def check_options(mode: str, proportions: str, order: str) -> None:
    for flag, value, allowed in (
        ("--mode", mode, MODES),
        ("--proportions", proportions, PROPORTIONS),
        ("--order", order, ORDERS),
    ):
        if value not in allowed:
            raise InputError(f"{flag} must be one of {', '.join(allowed)}; got '{value}'.")


def _real_cells(
    adata: ad.AnnData, label_key: str
) -> tuple[sp.csr_matrix, np.ndarray, pd.Categorical, np.ndarray]:
    """Counts, libraries and labels of the labelled cells with a non-zero library, and the
    mask of those cells."""
    if label_key not in adata.obs:
        raise InputError(f"--label-key '{label_key}' is not an obs column of the --like data.")
    X = _as_counts(adata)
    lib = np.asarray(X.sum(1)).ravel()
    ok = (lib > 0) & adata.obs[label_key].notna().to_numpy()
    return X[ok], lib[ok], pd.Categorical(adata.obs[label_key].to_numpy()[ok]), ok


def _type_profiles(X: sp.csr_matrix, lib: np.ndarray, codes: np.ndarray, n_types: int):
    """Mean relative expression per type (C, G) and the cells per type (C,)."""
    norm = sp.diags(1.0 / lib) @ X  # relative expression per cell
    onehot = sp.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))))
    counts = np.bincount(codes, minlength=n_types).astype(float)
    return np.asarray((onehot @ norm).todense()) / counts[:, None], counts


def _top_genes(profile: np.ndarray, n_genes: int | None) -> np.ndarray:
    """Indices (sorted) of the genes most variable across types (coefficient of variation of
    the type profiles), all genes when ``n_genes`` is None or not smaller."""
    keep = np.arange(profile.shape[1])
    if n_genes is not None and n_genes < profile.shape[1]:
        score = profile.std(0) / np.maximum(profile.mean(0), 1e-12) * (profile.mean(0) > 0)
        keep = np.sort(np.argsort(-score)[:n_genes])
    return keep


def fit_nb(adata: ad.AnnData, label_key: str, n_genes: int | None = None) -> NBModel:
    """Fit the per-cluster NB model to ``adata`` grouped by ``obs[label_key]``."""
    X, lib, lab, _ = _real_cells(adata, label_key)
    codes, types = lab.codes, np.asarray(lab.categories).astype(str)
    profile, counts = _type_profiles(X, lib, codes, len(types))
    # dispersion: Var = mu + phi mu^2 around each cell's expected count
    mu = profile[codes] * lib[:, None]
    resid2 = (
        np.asarray((X.multiply(X)).sum(0)).ravel()
        - 2 * np.asarray(X.multiply(mu).sum(0)).ravel()
        + (mu * mu).sum(0)
    )
    m1, m2 = mu.sum(0), (mu * mu).sum(0)
    phi = np.clip((resid2 - m1) / np.maximum(m2, 1e-12), 0.01, 10.0)
    keep = _top_genes(profile, n_genes)
    prof = profile[:, keep]
    prof = prof / np.maximum(prof.sum(1, keepdims=True), 1e-12)
    ll = np.log(lib)
    log_lib = np.array(
        [
            [ll[codes == c].mean(), ll[codes == c].std() if (codes == c).sum() > 1 else 0.3]
            for c in range(len(types))
        ]
    )
    return NBModel(
        genes=np.asarray(adata.var_names)[keep].astype(str),
        types=types,
        weights=counts / counts.sum(),
        profile=prof,
        dispersion=phi[keep],
        log_lib=log_lib,
    )


def real_cells(
    adata: ad.AnnData, label_key: str, n_genes: int | None = None, batch_key: str | None = None
) -> RealCells:
    """The real cells to resample, on the same genes as ``fit_nb`` keeps."""
    X, lib, lab, ok = _real_cells(adata, label_key)
    codes, types = lab.codes, np.asarray(lab.categories).astype(str)
    profile, _ = _type_profiles(X, lib, codes, len(types))
    keep = _top_genes(profile, n_genes)
    batch = None
    if batch_key is not None:
        batch = pd.Categorical(adata.obs[batch_key].to_numpy()[ok])
    return RealCells(
        counts=X[:, keep].tocsr().astype(np.int64),
        codes=np.asarray(codes, dtype=np.int64),
        types=types,
        genes=np.asarray(adata.var_names)[keep].astype(str),
        batch=batch,
    )


def sample_nb(model: NBModel, y: np.ndarray, rng: np.random.Generator) -> sp.csr_matrix:
    """One NB cell per entry of ``y`` (cluster codes): CSR counts (float32)."""
    lib = np.exp(rng.normal(model.log_lib[y, 0], model.log_lib[y, 1]))
    mu = model.profile[y] * lib[:, None]
    shape = 1.0 / model.dispersion
    lam = rng.gamma(shape[None, :], mu / shape[None, :])
    return sp.csr_matrix(rng.poisson(lam).astype(np.float32))


def sample_cells(
    model: NBModel, n: int, rng: np.random.Generator
) -> tuple[sp.csr_matrix, np.ndarray]:
    """``n`` cells from the model in its proportions: CSR counts (float32) and cluster codes."""
    y = rng.choice(len(model.types), size=n, p=model.weights)
    return sample_nb(model, y, rng), y


def thin_cells(
    cells: RealCells, src: np.ndarray, frac: np.ndarray, rng: np.random.Generator
) -> sp.csr_matrix:
    """Real cells ``src``, each count thinned to ``Binomial(count, frac)`` (one fraction per
    row): CSR counts (float32)."""
    sub = cells.counts[src]
    data = rng.binomial(sub.data, np.repeat(frac, np.diff(sub.indptr)))
    out = sp.csr_matrix(
        (data.astype(np.float32), sub.indices, sub.indptr), shape=sub.shape, dtype=np.float32
    )
    out.eliminate_zeros()
    return out


def zipf_exponent(n_types: int, rarest: float = ZIPF_RAREST) -> float:
    """s >= 0 with ``p_C = rarest`` for ``p_i ∝ 1 / i**s``, i = 1..C (bisection; p_C falls
    as s grows)."""
    if n_types < 2 or 1.0 / n_types <= rarest:
        return 0.0
    i = np.arange(1, n_types + 1, dtype=float)

    def last(s: float) -> float:
        w = i**-s
        return w[-1] / w.sum()

    lo, hi = 0.0, 64.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if last(mid) > rarest else (lo, mid)
    return (lo + hi) / 2


def type_proportions(
    real_counts: np.ndarray, rule: str, rarest: float = ZIPF_RAREST
) -> tuple[np.ndarray, float | None]:
    """Target share per type (in type order) under ``rule``, and the Zipf exponent if any
    (``rarest``: the rarest type's share under ``zipf``)."""
    c = len(real_counts)
    if rule == "real":
        return real_counts / real_counts.sum(), None
    if rule == "equal":
        return np.full(c, 1.0 / c), None
    s = zipf_exponent(c, rarest)
    rank = np.empty(c, dtype=int)
    rank[np.argsort(-real_counts, kind="stable")] = np.arange(1, c + 1)
    w = rank.astype(float) ** -s
    return w / w.sum(), s


def cells_per_type(share: np.ndarray, n: int) -> np.ndarray:
    """``n * share`` rounded by largest remainder; every type gets a cell when n >= types."""
    raw = n * share
    cnt = np.floor(raw).astype(np.int64)
    rest = n - int(cnt.sum())
    cnt[np.argsort(-(raw - cnt), kind="stable")[:rest]] += 1
    if n >= len(share):
        for t in np.flatnonzero(cnt == 0):
            cnt[np.argmax(cnt)] -= 1
            cnt[t] = 1
    return cnt


def plan_rows(
    n_cells: np.ndarray, cells: RealCells, order: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Type and source real cell of every row: ``n_cells[c]`` rows of type c, in ``order``
    (``sorted``: by type, or by the source cell's batch then type when ``cells.batch``)."""
    y = np.repeat(np.arange(len(n_cells), dtype=np.int64), n_cells)
    src = cells.draw(y, rng)
    if order == "shuffled":
        perm = rng.permutation(len(y))
        return y[perm], src[perm]
    if cells.batch is not None:
        codes = np.asarray(cells.batch.codes, dtype=np.int64)
        b = np.where(codes < 0, codes.max() + 1, codes)[src]  # missing batch last
        idx = np.lexsort((y, b))
        return y[idx], src[idx]
    return y, src


def proportions_line(out: str | Path) -> str:
    """The type shares an atlas was made with (from its ``uns["simulate"]``), largest first."""
    with h5py.File(out, "r") as f:
        rec = ad.io.read_elem(f["uns/simulate"])
    types, share = np.asarray(rec["types"]).astype(str), np.asarray(rec["share"])
    s = f" (Zipf exponent {rec['zipf_exponent']:.3f})" if "zipf_exponent" in rec else ""
    top = np.argsort(-share, kind="stable")
    return f"{rec['proportions']} proportions{s}: " + ", ".join(
        f"{types[i]} {100 * share[i]:.2f}%" for i in top
    )


def simulate(
    like: str | Path,
    n_cells: int,
    out: str | Path,
    *,
    label_key: str = "cell_type",
    n_genes: int | None = 2000,
    seed: int = 0,
    chunk: int = 20_000,
    progress: bool = False,
    mode: str = "nb",
    proportions: str = "real",
    order: str = "shuffled",
    batch_key: str | None = None,
    rarest: float = ZIPF_RAREST,
) -> Path:
    """Write an ``n_cells`` synthetic atlas like ``like`` to ``out`` (.h5ad, CSR counts),
    chunk by chunk, through a temporary file renamed at the end. ``rarest``: the rarest
    type's share under ``proportions="zipf"`` (rare-type studies ask for 0.001 and below)."""
    if not 0 < rarest < 1:
        raise InputError(f"rarest must be a share in (0, 1); got {rarest}.")
    check_options(mode, proportions, order)
    check_like(like, label_key, batch_key)
    out = Path(out)
    src_data = ad.read_h5ad(like)
    cells = real_cells(src_data, label_key, n_genes, batch_key)
    model = fit_nb(src_data, label_key, n_genes) if mode == "nb" else None
    del src_data
    real_n = np.bincount(cells.codes, minlength=len(cells.types)).astype(float)
    share, s = type_proportions(real_n, proportions, rarest)
    n_per = cells_per_type(share, n_cells)
    rng = np.random.default_rng(seed)
    y, src = plan_rows(n_per, cells, order, rng)
    partner = cells.draw(y, rng) if mode == "mix" else None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_cells, desc="simulating", unit="cell")
    try:
        with atomic_path(out) as tmp:
            for a in range(0, n_cells, chunk):
                yc = y[a : a + chunk]
                if model is not None:
                    X = sample_nb(model, yc, rng)
                else:
                    frac = rng.uniform(*THIN, size=len(yc))
                    if partner is None:
                        X = thin_cells(cells, src[a : a + chunk], frac, rng)
                    else:  # mix: half the fraction from each of two real cells of the type
                        X = thin_cells(cells, src[a : a + chunk], frac / 2, rng)
                        X = X + thin_cells(cells, partner[a : a + chunk], frac / 2, rng)
                if a == 0:
                    ad.AnnData(X=X, var=pd.DataFrame(index=cells.genes)).write_h5ad(tmp)
                else:
                    with h5py.File(tmp, "a") as f:
                        ad.io.sparse_dataset(f["X"]).append(X)
                if bar is not None:
                    bar.update(len(yc))
            obs = pd.DataFrame(
                {"cell_type": pd.Categorical.from_codes(y, categories=list(cells.types))},
                index=[f"sim{i}" for i in range(n_cells)],
            )
            if cells.batch is not None:
                obs[batch_key] = pd.Categorical.from_codes(
                    cells.batch.codes[src], categories=cells.batch.categories
                )
            record = {
                "like": str(like),
                "seed": seed,
                "mode": mode,
                "model": {
                    "nb": "per-cluster negative binomial",
                    "resample": f"real cells binomially thinned (library fraction ~ Uniform{THIN})",
                    "mix": f"two real cells of the type, each thinned to half a fraction ~ "
                    f"Uniform{THIN}, summed",
                }[mode],
                "proportions": proportions,
                "order": order,
                "types": cells.types,
                "share": share,
                "cells": n_per,
            }
            if s is not None:
                record["zipf_exponent"] = s
                record["zipf_rarest"] = rarest
            if batch_key is not None:
                record["batch_key"] = batch_key
            with h5py.File(tmp, "a") as f:
                del f["obs"]
                ad.io.write_elem(f, "obs", obs)
                f["uns"].attrs["encoding-type"] = "dict"
                ad.io.write_elem(f["uns"], "simulate", record)
    finally:
        if bar is not None:
            bar.close()
    return out
