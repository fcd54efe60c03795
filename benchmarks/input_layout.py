"""What the input's layout costs: the shared count sets as scanpy users usually hold them.

A scanpy object after the standard recipe has log-normalised X (``normalize_total`` +
``log1p``) and its raw counts in ``layers["counts"]`` (or ``.raw``). For each count dataset in
``--data`` and each seed, ``cicl.fit`` with the true K on (a) that layout with ``layer="auto"``
(the default: the counts are found and read) and (b) the same object with ``layer="X"`` (log
values only, the Gaussian decoder: what a fit of a log-normalised object without its counts
gets). ARI against the published labels, used only to score. Writes input_layout.csv /
input_layout.md.

    python benchmarks/input_layout.py --data ../shared/data --seeds 3 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import anndata as ad
import pandas as pd
import scanpy as sc
import torch

COUNT_SETS = (
    "cite_cbmc",
    "young_kidney",
    "pbmc_10x",
    "worm_neuron",
    "mouse_bladder",
    "baron_mouse1",
    "pollen",
)


KEY = "cell_type"  # the shared datasets' labels


def layered(path: Path) -> ad.AnnData:
    """The dataset as scanpy's recipe leaves it: log-normalised X, counts in a layer."""
    a = ad.read_h5ad(path)
    b = ad.AnnData(X=a.X.copy(), obs=a.obs[[KEY]].copy(), var=a.var[[]].copy())
    b.layers["counts"] = a.X.copy()
    sc.pp.normalize_total(b, target_sum=1e4)
    sc.pp.log1p(b)
    return b


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--datasets", default=",".join(COUNT_SETS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args()
    import cicl

    torch.set_num_threads(1)  # as the quality benchmark: one thread per fit
    rows = []
    for name in args.datasets.split(","):
        a = layered(args.data / f"{name}.h5ad")
        k = a.obs[KEY].nunique()
        for seed in range(args.seeds):
            cfg = cicl.load_config(None, {"seed": seed})
            for layer in ("auto", "X"):
                t = time.perf_counter()
                out = cicl.fit(a, k, config=cfg, layer=layer, copy=True, progress=False)
                info = out.uns["cicl"]
                rows.append(
                    {
                        "dataset": name,
                        "seed": seed,
                        "layer": layer,
                        "matrix": info["preprocess"]["matrix"],
                        "decoder": info["decoder"],
                        "ari": cicl.score(out.obs["cicl"].to_numpy(), a.obs[KEY])["ari"],
                        "seconds": round(time.perf_counter() - t, 1),
                    }
                )
                print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out / "input_layout.csv", index=False)
    print(write_table(df, args.out))


def write_table(df: pd.DataFrame, out: Path) -> str:
    """input_layout.md from the per-fit rows (also for rows merged from split runs)."""
    g = df.groupby(["dataset", "layer"])["ari"].agg(["mean", "std"]).unstack("layer")
    order = [n for n in COUNT_SETS if n in g.index]
    lines = [
        "| dataset | auto: counts from layers['counts'] | X: log-normalised values only |",
        "|---|---|---|",
    ]
    for n in order:
        cells = [f"{g.loc[n, ('mean', c)]:.3f} ± {g.loc[n, ('std', c)]:.3f}" for c in ("auto", "X")]
        lines.append(f"| {n} | {' | '.join(cells)} |")
    means = df.groupby("layer")["ari"].mean()
    lines.append(f"| mean | **{means['auto']:.3f}** | **{means['X']:.3f}** |")
    seeds = sorted(df["seed"].unique())
    text = "\n".join(lines)
    (out / "input_layout.md").write_text(
        f"ARI, mean ± sd over seeds {seeds[0]}-{seeds[-1]} (1 thread per fit, true K)\n\n"
        + text
        + "\n"
    )
    return text


if __name__ == "__main__":
    main()
