"""Command line: ``cicl fit|predict|tune|simulate|runs|config``. ``main(argv) -> int``; user
errors exit 2 with one line on stderr and no traceback. One module per command."""

from __future__ import annotations

import sys
import warnings

from cicl.cli.fit import cmd_fit
from cicl.cli.parser import build_parser, parse_set
from cicl.cli.predict import cmd_predict
from cicl.cli.show import cmd_config, cmd_runs
from cicl.cli.simulate import cmd_simulate
from cicl.cli.tune import cmd_tune
from cicl.config import ConfigError
from cicl.errors import CICLError, InputWarning

__all__ = ["build_parser", "main", "parse_set"]


def _print_input_warning(message, category, filename, lineno, file=None, line=None):
    """cicl's own warnings about the input as one ``warning: ...`` line; others as Python's."""
    if issubclass(category, InputWarning):
        print(f"warning: {message}", file=sys.stderr)
    else:
        _show_warning(message, category, filename, lineno, file, line)


_show_warning = warnings.showwarning


def one_line(message: object) -> str:
    """An error's message as one line: some carry a library's multi-line text (YAML's parser
    points at the bad character on lines of their own), and a refusal is one ``error:`` line."""
    lines = (line.strip() for line in str(message).splitlines())
    return " ".join(line for line in lines if line.strip("^"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _print_input_warning
        warnings.simplefilter("always", InputWarning)
        return _run(args)


def _run(args) -> int:
    try:
        if args.command == "fit":
            return cmd_fit(args)
        if args.command == "predict":
            return cmd_predict(args)
        if args.command == "simulate":
            return cmd_simulate(args)
        if args.command == "tune":
            return cmd_tune(args)
        if args.command == "runs":
            return cmd_runs(args)
        return cmd_config(args)
    except (CICLError, ConfigError) as exc:
        from cicl.sweep import SweepInterrupted

        if isinstance(exc, SweepInterrupted):
            print(f"interrupted: {exc}", file=sys.stderr)
            return 130
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no output was written", file=sys.stderr)
        return 130
