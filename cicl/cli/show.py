"""``cicl runs`` (the MLflow comparison) and ``cicl config`` (show or check a config)."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from cicl.config import load_config


def cmd_runs(args: argparse.Namespace) -> int:
    from cicl.tracking import mlflow_ui_command, resolve_mlflow_uri, runs_table

    uri = resolve_mlflow_uri(args.mlflow_uri, Path(args.root).resolve(), must_exist=True)
    table, exp = runs_table(uri, args.experiment, args.sort)
    print(f"experiment {exp}: {len(table)} run{'' if len(table) == 1 else 's'}")
    print(table.to_string(index=False) if len(table) else "(no runs)")
    print(f"\nopen them: {mlflow_ui_command(uri)}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    overrides = {"preset": args.preset} if args.preset else {}
    cfg = load_config(args.file, overrides)
    if args.action == "show":
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    else:
        print(f"{args.file or 'defaults'}: valid")
    return 0
