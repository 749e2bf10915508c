"""`tmpfsboot demo`: build, serve and boot a disk-less node in QEMU (tmpfsboot.host.demo)."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from ..host.demo import run_demo


def cmd_demo(args: argparse.Namespace) -> int:
    """`tmpfsboot demo`."""
    start = time.monotonic()
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        run_demo(workdir, hostname=args.hostname, kernel=args.kernel, timeout=args.timeout)
    else:
        with tempfile.TemporaryDirectory(prefix="tmpfsboot-demo.") as tmp:
            run_demo(Path(tmp), hostname=args.hostname, kernel=args.kernel,
                     timeout=args.timeout)
    print(f"tmpfsboot demo: done in {time.monotonic() - start:.1f} s")
    return 0


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `tmpfsboot demo`."""
    p = subparsers.add_parser("demo", help="build, serve and boot a disk-less node in QEMU",
                              description="A disk-less boot, end to end, on this machine: build "
                              "an image, serve it on loopback, build an initramfs, boot "
                              "Debian's kernel in QEMU into the tmpfs root.")
    p.add_argument("--hostname", default="node1", help="the node's DHCP hostname (node1)")
    p.add_argument("--kernel", metavar="VERSION", help="default: the newest in /boot")
    p.add_argument("--workdir", metavar="DIR", help="keep images and initramfs in DIR")
    p.add_argument("--timeout", type=float, default=300.0, metavar="S",
                   help="give up on the VM after S seconds (300)")
    p.set_defaults(func=cmd_demo)
