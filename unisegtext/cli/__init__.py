"""The `unisegtext` command line: one parser, one module per subcommand."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from unisegtext import __version__

# subcommand modules; each defines add_parser(subparsers) and sets args.func(args) -> int
COMMANDS = ["segment", "batch", "info", "knowledge", "data", "eval", "train", "mcp"]


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
    from unisegtext.io.output import RunTerminated

    try:
        return int(args.func(args) or 0)
    except RunTerminated as exc:
        print(f"unisegtext {args.command}: {exc}", file=sys.stderr)
        return 143
    except UniSegError as exc:
        print(f"unisegtext {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a missing or unreadable file, a full disk: the message says which
        print(f"unisegtext {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"unisegtext {args.command}: error: out of memory; use a smaller scan or fewer prompts, "
              "or lower --max-memory so the run is refused up front", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    """An error message on one line (a multi-line message would look like a traceback)."""
    return " ".join(str(exc).split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
