"""The ``sparsestart`` command line.

Each subcommand lives next to the code it drives and registers itself through a
``register(subparsers)`` function listed in ``_COMMANDS`` (module path); the
function adds its parser and sets ``func`` (called with the parsed args, returns
an exit code).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

_COMMANDS = [
    "sparsestart.demo",
    "sparsestart.train.cli",
    "sparsestart.train.sweep",
    "sparsestart.train.report",
    "sparsestart.train.experiment",
    "sparsestart.init.cli",
    "sparsestart.info",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsestart", description="Sparse-from-the-start neural network training.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in _COMMANDS:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
