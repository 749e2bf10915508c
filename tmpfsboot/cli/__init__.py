"""`tmpfsboot VERB ...`: the host-side command line.

Exit codes: 0 success, 1 failure, 2 bad usage or invalid input. Errors are one line
naming the cause; tracebacks only with --debug.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from .. import __version__
from ..boot.errors import TmpfsbootError, UsageError
from ..boot.log import setup_logging

log = logging.getLogger("tmpfsboot")

# Every verb, each a module of this package defining add_parser(subparsers). Only the one
# the command line names is imported: `fetch` starts without the image tools, the server
# and the VM code (about 60 ms of imports it does not need).
VERBS = ("fetch", "cmdline", "image", "serve", "initramfs", "demo")


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad usage as UsageError (exit 2, one line)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def build_parser(argv: Sequence[str] = ()) -> ArgumentParser:
    """The parser; with ARGV, only the verb module ARGV names is imported."""
    parser = ArgumentParser(prog="tmpfsboot", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"tmpfsboot {__version__}")
    parser.add_argument("--debug", action="store_true", help="debug logging and tracebacks")
    parser.add_argument("--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    verb = next((a for a in argv if not a.startswith("-")), None)
    for name in VERBS if verb not in VERBS else (verb,):
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one verb; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    setup_logging(debug=debug, quiet="--quiet" in argv)
    try:
        args = build_parser(argv).parse_args(argv)
        code: int = args.func(args)
        return code
    except TmpfsbootError as e:
        if debug:
            log.exception("failed")
        print(f"tmpfsboot: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("tmpfsboot: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if debug:
            log.exception("failed")
        print(f"tmpfsboot: error: {e}", file=sys.stderr)
        return 1
