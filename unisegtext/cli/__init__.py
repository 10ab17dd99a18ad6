"""The `unisegtext` command line: one parser, one module per subcommand."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from unisegtext import __version__

# subcommand modules; each defines add_parser(subparsers) and sets args.func(args) -> int
COMMANDS = ["segment", "info", "knowledge", "data", "eval", "train", "mcp"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unisegtext",
        description="Text-prompted universal 3D medical image segmentation (CT and MR).",
    )
    parser.add_argument("--version", action="version", version=f"unisegtext {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"unisegtext.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("unisegtext.cli."):
                continue  # a subcommand that is not part of this build
            raise
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from unisegtext.errors import UniSegError

    try:
        return int(args.func(args) or 0)
    except UniSegError as exc:
        print(f"unisegtext {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"unisegtext {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
