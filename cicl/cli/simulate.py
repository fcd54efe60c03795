"""``cicl simulate``: a labelled scale-up of a real dataset."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cicl.cli.parser import int_at_least, positive_int
from cicl.errors import CICLError


def cmd_simulate(args: argparse.Namespace) -> int:
    from cicl.data.io import check_output
    from cicl.data.simulate import simulate

    n = positive_int("--cells", args.cells)
    int_at_least("--genes", str(args.genes), 2)
    if not Path(args.like).is_file():
        raise CICLError(f"--like '{args.like}' does not exist.")
    out = check_output(args.like, args.out, args.force)
    t0 = time.perf_counter()
    simulate(
        args.like,
        n,
        out,
        label_key=args.label_key,
        n_genes=args.genes,
        seed=args.seed,
        progress=not args.quiet and sys.stderr.isatty(),
    )
    print(
        f"wrote {out}: {n} cells, obs['cell_type'] = true cluster ({time.perf_counter() - t0:.1f} s)"
    )
    return 0
