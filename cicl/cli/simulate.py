"""``cicl simulate``: a labelled scale-up of a real dataset."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cicl.cli.fit import check_label_key, open_on_disk
from cicl.cli.parser import int_at_least, positive_int
from cicl.errors import CICLError

SEED_MAX = 2**32 - 1


def cmd_simulate(args: argparse.Namespace) -> int:
    from cicl.data.io import check_output
    from cicl.data.simulate import check_like, check_options, proportions_line, simulate

    n = positive_int("--cells", args.cells)
    int_at_least("--genes", str(args.genes), 2)
    check_options(args.mode, args.proportions, args.order)
    if not 0 <= args.seed <= SEED_MAX:  # numpy's seeds; the seed is also stored in the output
        raise CICLError(f"--seed must be between 0 and {SEED_MAX}, got {args.seed}.")
    if not Path(args.like).is_file():
        raise CICLError(f"--like '{args.like}' does not exist.")
    # its labels, before the whole file is read: an unreadable file or unusable labels are
    # one clear line (the model's fit trusts them)
    check_label_key(open_on_disk(args.like, ("obs",)), args.label_key)
    check_like(args.like, args.label_key, args.batch_key)
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
        mode=args.mode,
        proportions=args.proportions,
        order=args.order,
        batch_key=args.batch_key,
    )
    print(
        f"wrote {out}: {n} cells ({args.mode}, {args.order}), obs['cell_type'] = true cluster "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    print(proportions_line(out))
    return 0
