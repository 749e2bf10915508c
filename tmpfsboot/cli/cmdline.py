"""`tmpfsboot cmdline [TEXT]`: a kernel command line's boot plan, as a node would see it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from ..boot.cmdline import (
    MirrorOrder,
    NetFacts,
    choose_mirror_order,
    node_identity,
    order_layers,
    parse_cmdline,
)
from ..boot.errors import UsageError


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


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `cmdline`."""
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
