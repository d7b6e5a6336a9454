"""Entry point of the ``endless`` command.

Every subcommand lives in its own module exposing ``add_parser(subparsers)``; adding one is a
line in ``COMMANDS``. User mistakes (``EndlessError``) print one line on stderr and exit 2,
never a traceback; argparse's own usage errors (``OneLineParser``) are one line and exit 2 as well.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from endless.errors import EndlessError

COMMANDS = [
    "generate",
    "chat",
    "serve",
    "verify",
    "info",
    "demo",
    "bench",
    "train",
    "eval",
    "analyze",
    "soak",
]


class UsageError(EndlessError):
    """A command line argparse refused (unknown flag, out-of-range value, bad choice)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``endless: error: argument --x: ...``) and exit 2,
    like every other user mistake; ``--help`` still prints the usage. Subcommands inherit it.

    ``error`` raises ``UsageError`` (argparse's documented hook must not return) so that ``main``
    reports it like an ``EndlessError`` and returns 2 instead of exiting inside the parser."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        raise UsageError(" ".join(message.split()))


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="endless",
        description=(
            "Run a pretrained transformer LM over an input that never ends, with constant memory "
            "and time per token: StreamingLLM attention sinks and TransformerFAM feedback memory."
        ),
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (repeat for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"endless.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        print(f"endless: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except EndlessError as e:
        print(f"endless: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("endless: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
