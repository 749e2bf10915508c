"""`tmpfsboot fetch ROOT DIR`: the boot engine's download, verify and extract, on a host."""

from __future__ import annotations

import argparse

from ..boot.cmdline import NetFacts, parse_root, parse_timeout, resolve_layers
from ..boot.contract import DEFAULT_BACKOFF, DEFAULT_TIMEOUT
from ..boot.engine import fetch_root
from ..boot.log import EventLog
from ..boot.policy import FetchPolicy, Verify
from .argtypes import non_negative_int


def cmd_fetch(args: argparse.Namespace) -> int:
    """Download, verify and extract every layer of ROOT into DIR."""
    layers = parse_root(args.root)
    facts = NetFacts(hostname=args.hostname, fqdn=args.fqdn, mac=args.mac, ip=args.ip,
                     arch=args.arch, uuid=args.uuid)
    policy = FetchPolicy.choose(Verify.parse(args.verify) if args.verify else None,
                                keyring=args.keyring, retries=args.retries,
                                timeout=args.timeout, backoff=args.backoff,
                                writers=args.writers)
    events = EventLog(args.log)
    try:
        fetch_root(resolve_layers(layers, facts), args.dir, policy, events=events)
    finally:
        events.close()
    return 0


def seconds(text: str) -> float:
    """A positive number of seconds, read as tmpfs.timeout= is on the kernel command line."""
    return parse_timeout(text, key="value")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `fetch`."""
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
    p.add_argument("--retries", type=non_negative_int, metavar="N",
                   help="retries after a failure (default: unlimited)")
    p.add_argument("--timeout", type=seconds, default=DEFAULT_TIMEOUT, metavar="S",
                   help="a connection stalled this long counts as broken "
                   f"(default: {DEFAULT_TIMEOUT:g})")
    p.add_argument("--backoff", type=seconds, default=DEFAULT_BACKOFF, metavar="S",
                   help=f"first retry delay, doubled each time, jittered "
                   f"(default: {DEFAULT_BACKOFF:g})")
    p.add_argument("--writers", type=non_negative_int, metavar="N",
                   help="processes writing small files beside the extracting one, for a "
                   "first tar layer (default: one per CPU beyond two; 0: none)")
    p.add_argument("--log", metavar="FILE", help="append JSON-lines events to FILE")
    p.set_defaults(func=cmd_fetch)
