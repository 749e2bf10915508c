"""`tmpfsboot VERB ...`: the host-side command line.

Exit codes: 0 success, 1 failure, 2 bad usage or invalid input. Errors are one line
naming the cause; tracebacks only with --debug.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import sys
from collections.abc import Sequence

from . import __version__
from .boot.cmdline import (
    MirrorOrder,
    NetFacts,
    choose_mirror_order,
    node_identity,
    order_layers,
    parse_cmdline,
    parse_root,
    parse_timeout,
    resolve_layers,
)
from .boot.contract import DEFAULT_BACKOFF, DEFAULT_TIMEOUT
from .boot.engine import fetch_root
from .boot.errors import TmpfsbootError, UsageError
from .boot.log import EventLog, setup_logging
from .boot.policy import FetchPolicy, Verify

log = logging.getLogger("tmpfsboot")

# Host modules that add a verb of the same name: each defines add_parser(subparsers).
# Only the one asked for is imported, so `fetch` starts without the server and the VM code.
VERB_MODULES: tuple[str, ...] = ("image", "serve", "initramfs", "demo")
OWN_VERBS = ("cmdline", "fetch")


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad usage as UsageError (exit 2, one line)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def cmd_cmdline(args: argparse.Namespace) -> int:
    """Print the boot plan of a kernel command line as JSON."""
    if args.text is None:
        with open("/proc/cmdline", encoding="utf-8") as f:
            text = f.read()
    else:
        text = args.text
    plan = parse_cmdline(text)
    order = choose_mirror_order(plan, args.mirrors)
    identity = node_identity(NetFacts(hostname=args.hostname, mac=args.mac, uuid=args.uuid))
    spread = order is MirrorOrder.SPREAD and any(len(la.mirrors) > 1 for la in plan.layers)
    if spread and identity is None:
        raise UsageError("cmdline: mirrors are spread per node: name it with --hostname, "
                         "--mac or --uuid")
    plan = dataclasses.replace(plan, layers=order_layers(plan.layers, order, identity))
    data = plan.to_json()
    data.update(mirror_order=order.value, node=identity)
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    """Download, verify and extract every layer of ROOT into DIR."""
    layers = parse_root(args.root)
    facts = NetFacts(hostname=args.hostname, fqdn=args.fqdn, mac=args.mac, ip=args.ip,
                     arch=args.arch, uuid=args.uuid)
    policy = FetchPolicy.choose(Verify.parse(args.verify) if args.verify else None,
                                keyring=args.keyring, retries=args.retries,
                                timeout=args.timeout, backoff=args.backoff)
    events = EventLog(args.log)
    try:
        fetch_root(resolve_layers(layers, facts), args.dir, policy, events=events)
    finally:
        events.close()
    return 0


def _positive_float(text: str) -> float:
    return parse_timeout(text, key="value")


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def build_parser(argv: Sequence[str] = ()) -> ArgumentParser:
    """The parser; with ARGV, only the verb module ARGV names is imported."""
    parser = ArgumentParser(prog="tmpfsboot", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"tmpfsboot {__version__}")
    parser.add_argument("--debug", action="store_true", help="debug logging and tracebacks")
    parser.add_argument("--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("cmdline", help="parse a kernel command line, print the plan as JSON",
                       description="Print the boot plan of a kernel command line as JSON; "
                       "for a node named by --hostname, --mac or --uuid, each layer's "
                       "mirrors in the order that node tries them.")
    p.add_argument("text", nargs="?", help="the command line (default: /proc/cmdline)")
    p.add_argument("--hostname", help="the node's host name (spreads mirrors without "
                   "--mac and --uuid)")
    p.add_argument("--mac", help="the node's boot MAC (spreads mirrors without --uuid)")
    p.add_argument("--uuid", help="the node's SMBIOS UUID (spreads mirrors if usable)")
    p.add_argument("--mirrors", choices=[m.value for m in MirrorOrder],
                   help="TMPFS_MIRRORS of the initramfs: the order without tmpfs.mirrors= "
                   "(default: ordered)")
    p.set_defaults(func=cmd_cmdline)

    p = sub.add_parser("fetch", help="download, verify and extract a root into DIR",
                       description="Run the boot engine's fetch, verify and extract steps "
                       "on this host. ROOT is exactly what follows root= on a kernel "
                       "command line; DIR an existing directory. Exit 0 only when every "
                       "layer is in and verified; when the root fails for good, DIR is "
                       "emptied rather than left half-done. squashfs and erofs layers are "
                       "not mounted here: each is verified and stored in DIR as a file "
                       "under its own name, tar layers extracted beside them.")
    p.add_argument("root", metavar="ROOT")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--hostname", help="value of %%hostname")
    p.add_argument("--fqdn", help="value of %%fqdn")
    p.add_argument("--mac", help="value of %%mac (aa-bb-cc-dd-ee-ff)")
    p.add_argument("--ip", help="value of %%ip")
    p.add_argument("--arch", help="value of %%arch (dpkg architecture)")
    p.add_argument("--uuid", help="value of %%uuid")
    p.add_argument("--verify", choices=[v.value for v in Verify],
                   help="signature, checksum or no (default: signature with --keyring, "
                   "else checksum)")
    p.add_argument("--keyring", metavar="FILE", help="gpgv keyring for --verify signature")
    p.add_argument("--retries", type=_non_negative_int, metavar="N",
                   help="retries after a failure (default: unlimited)")
    p.add_argument("--timeout", type=_positive_float, default=DEFAULT_TIMEOUT, metavar="S",
                   help="a connection stalled this long counts as broken "
                   f"(default: {DEFAULT_TIMEOUT:g})")
    p.add_argument("--backoff", type=_positive_float, default=DEFAULT_BACKOFF, metavar="S",
                   help=f"first retry delay, doubled each time, jittered "
                   f"(default: {DEFAULT_BACKOFF:g})")
    p.add_argument("--log", metavar="FILE", help="append JSON-lines events to FILE")
    p.set_defaults(func=cmd_fetch)

    verb = next((a for a in argv if not a.startswith("-")), None)
    for name in VERB_MODULES:
        if verb is None or verb == name or verb not in VERB_MODULES + OWN_VERBS:
            importlib.import_module(f"tmpfsboot.{name}").add_parser(sub)
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
