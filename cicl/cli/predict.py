"""``cicl predict``: new cells mapped onto a fitted model."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from cicl.cli.fit import check_label_key, open_on_disk, wants_stream
from cicl.cli.parser import check_key_added
from cicl.cli.summary import json_line


def cmd_predict(args: argparse.Namespace) -> int:
    from cicl._keys import embedding_key
    from cicl.data.io import check_output, read_input, write_h5ad_atomic
    from cicl.objective import truth_scores as score
    from cicl.reference import ATYPICAL_PCT, load_reference, predict

    ref_path = Path(args.reference)
    key = args.key_added or args.key
    for name in (key, f"{key}_confidence", f"{key}_dist_pct"):  # the columns predict writes
        check_key_added(name, ("--label-key", args.label_key), ("--batch-key", args.batch_key))
    out = check_output((args.input, ref_path), args.out, args.force)
    t0 = time.perf_counter()
    ref = load_reference(ref_path, args.key)  # checked before the (maybe large) input is read
    stream = wants_stream(args)
    adata = open_on_disk(args.input) if stream else read_input(args.input)
    check_label_key(adata, args.label_key)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        predict(
            adata,
            ref,
            key=args.key,
            key_added=key,
            layer=args.layer,
            batch_key=args.batch_key,
            file=args.input if stream else None,
        )
    for w in caught:
        if issubclass(w.category, UserWarning):
            print(f"warning: {w.message}", file=sys.stderr)
    info = adata.uns[key]
    conf = adata.obs[key + "_confidence"].to_numpy()
    r: dict[str, Any] = {
        "n_cells": int(adata.n_obs),
        "n_genes": int(info["n_genes_input"]),
        "values": info["values"],
        "matrix": str(info["matrix"]),
        "n_genes_model": int(info["n_genes_model"]),
        "n_genes_missing": int(info["n_genes_missing"]),
        "n_clusters": int(info["n_clusters"]),
        "median_confidence": round(float(np.median(conf)), 4),
        "reference": str(ref_path),
    }
    if info["n_cells_uncorrected"]:
        r["n_cells_uncorrected"] = int(info["n_cells_uncorrected"])
    if "n_cells_atypical" in info:
        r["n_cells_atypical"] = int(info["n_cells_atypical"])
    if args.label_key is not None:
        r.update(score(adata.obs[key].to_numpy(), adata.obs[args.label_key]))
    if stream:  # a copy of the input file plus the results; X is never loaded
        from cicl.data.io import annotate_h5ad_copy

        cols = [c for c in adata.obs if c == key or c.startswith(key + "_")]
        emb = embedding_key(key)
        annotate_h5ad_copy(
            args.input,
            out,
            obs={c: adata.obs[c].values for c in cols},
            obsm={emb: adata.obsm[emb]},
            uns={key: adata.uns[key]},
            drop_obs=(key + "_dist_pct",),  # stale when this reference has no distance table
        )
        r["streamed"] = True
    else:
        write_h5ad_atomic(adata, out)
    r["seconds"] = round(time.perf_counter() - t0, 2)
    r["output"] = str(out)
    sizes = adata.obs[key].value_counts().sort_index()
    lines = [
        f"CICL predict: {r['n_cells']} cells x {r['n_genes']} genes ({r['values']}; "
        f"{r['n_genes_model'] - r['n_genes_missing']} of the reference's {r['n_genes_model']} "
        "genes present)",
        f"  assigned to the reference's {r['n_clusters']} clusters; sizes "
        f"{', '.join(f'{c}:{n}' for c, n in sizes.items())}",
        f"  median confidence {r['median_confidence']:.3f} (Student's t probability of the "
        f"assigned cluster); {r['seconds']:.1f} s",
    ]
    if "n_cells_atypical" in r:
        n_a = r["n_cells_atypical"]
        lines.append(
            f"  {n_a} cells ({100 * n_a / max(r['n_cells'], 1):.1f} %) lie farther from their "
            f"centroid than {ATYPICAL_PCT:.0f} % of the reference's cells of that cluster: "
            f"possibly states the reference lacks (obs['{key}_dist_pct'] > {ATYPICAL_PCT:.0f})"
        )
    if "ari" in r:
        lines.append(f"  vs labels (scored only): ARI {r['ari']:.3f}  NMI {r['nmi']:.3f}")
    extra = f"obs['{key}_dist_pct'], " if "n_cells_atypical" in r else ""
    lines.append(
        f"  wrote {out}: obs['{key}'], obs['{key}_confidence'], {extra}obsm['X_{key}'], "
        f"uns['{key}']"
    )
    print("\n".join(lines), file=sys.stderr)
    if args.json:
        print(json_line(r))
    return 0
