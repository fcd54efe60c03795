"""Variants of the shared datasets for checks on data the defaults were not chosen on.

The twelve shared sets confound size with kind (the small ones are mostly deep plate-based
data, the large ones shallow droplet data), so a rule fitted to them, such as the hybrid space's
PCA weight by cell count, can be checked here against the same biology at another size or
depth:

- ``NAME_N``: N cells drawn at random (seeded) from NAME, labels kept;
- ``NAME_thin``: NAME's counts thinned binomially to a median of ``--median`` counts per cell.

Then run the quality benchmark on the folder (it takes any folder of labelled ``.h5ad``)::

    .venv/bin/python benchmarks/variants.py --out /tmp/variants \\
        --subsample pbmc_10x,young_kidney,worm_neuron --sizes 800,2000 \\
        --thin baron_mouse1,pollen --median 300
    .venv/bin/python benchmarks/quality.py --data /tmp/variants --seeds 5 \\
        --methods cicl,kmeans_pca --out /tmp/variants/results
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import scipy.sparse as sp


def subsample(adata, n: int, seed: int = 0):
    """``n`` cells drawn without replacement, in their original order; the label categories
    are re-derived so that classes absent from the sample do not count towards K."""
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(adata.n_obs, n, replace=False))
    out = adata[idx].copy()
    out.obs["cell_type"] = out.obs["cell_type"].astype(str).astype("category")
    return out


def thin(adata, median: float, seed: int = 0):
    """Keep each molecule with one probability p, chosen so the median total is ``median``:
    the same cells sequenced shallower. Cells left with no counts are dropped."""
    import anndata as ad

    from cicl.data.preprocess import detect_values

    x = sp.csr_matrix(adata.X)
    if detect_values(x) != "counts":
        raise ValueError("thinning needs raw counts (non-negative integers) in X")
    totals = np.asarray(x.sum(1)).ravel()
    median_before = float(np.median(totals))
    p = min(1.0, median / median_before)
    x = x.astype(np.int64)
    x.data = np.random.default_rng(seed).binomial(x.data, p)
    x.eliminate_zeros()
    keep = np.asarray(x.sum(1)).ravel() > 0
    out = ad.AnnData(x.astype(np.float32), obs=adata.obs.copy(), var=adata.var.copy())
    out = out[keep].copy()
    out.uns["thinned"] = {"p": p, "median_before": median_before}
    return out


def main(argv: list[str] | None = None) -> int:
    import anndata as ad

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "../shared/data"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--subsample", default="", help="comma-separated dataset names")
    ap.add_argument("--sizes", default="800,2000")
    ap.add_argument("--thin", default="", help="comma-separated dataset names (raw counts)")
    ap.add_argument("--median", type=float, default=300.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    for name in filter(None, args.subsample.split(",")):
        a = ad.read_h5ad(Path(args.data) / f"{name}.h5ad")
        for n in (int(s) for s in args.sizes.split(",")):
            if n < a.n_obs:
                subsample(a, n, args.seed).write_h5ad(out / f"{name}_{n}.h5ad")
                written += 1
    for name in filter(None, args.thin.split(",")):
        a = ad.read_h5ad(Path(args.data) / f"{name}.h5ad")
        thin(a, args.median, args.seed).write_h5ad(out / f"{name}_thin.h5ad")
        written += 1
    print(f"wrote {written} datasets to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
