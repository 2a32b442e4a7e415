"""``graytune``: the command line. Each subcommand is one file with ``add_parser`` and ``run``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from graytune.errors import GraytuneError

SUBCOMMANDS = ("info", "methods", "train", "eval", "generate", "plot", "transfer", "serve", "audit", "demo",
               "bench")  # transfer.py adds extract + transfer


def build_parser() -> argparse.ArgumentParser:
    import importlib

    from graytune.artifact_files import library_version

    parser = argparse.ArgumentParser(prog="graytune", description="Adapt foundation models you cannot see inside.")
    parser.add_argument("--version", action="version", version=f"graytune {library_version()}",
                        help="print graytune's version (the one every artifact records) and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"graytune.cli.{name}")
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a usage or input error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args) or 0)
    except GraytuneError as err:
        print(f"graytune {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (| head): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"graytune {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
