"""`pinnace` entry point: one sub-command per module in this package."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module defines `register(subparsers)`; the parser it adds sets `func(args) -> int`.
COMMANDS = ("generate", "serve", "render", "run_operator")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pinnace", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"pinnace.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError) as exc:
        # Bad input is the user's to fix: one clear line, no stack trace.
        print(f"pinnace {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
