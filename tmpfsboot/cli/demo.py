"""`tmpfsboot demo [--debian]`: build, serve and boot a disk-less node in QEMU
(tmpfsboot.host.demo, tmpfsboot.host.demo_debian)."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from ..boot.errors import UsageError
from ..boot.identity import normalize_id128
from ..host.demo import DEMO_UUID, run_demo


def cmd_demo(args: argparse.Namespace) -> int:
    """`tmpfsboot demo` (and `--debian`)."""
    start = time.monotonic()
    if normalize_id128(args.uuid) is None:
        raise UsageError(f"--uuid {args.uuid}: not a UUID (e.g. {DEMO_UUID})")

    def run(workdir: Path) -> None:
        if args.debian:
            from ..host.demo_debian import run_debian_demo

            # a real root under TCG takes minutes, more on a loaded machine
            run_debian_demo(workdir, hostname=args.hostname, uuid=args.uuid,
                            kernel=args.kernel, timeout=max(args.timeout, 900.0))
        else:
            run_demo(workdir, hostname=args.hostname, kernel=args.kernel,
                     timeout=args.timeout)

    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        run(workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="tmpfsboot-demo.") as tmp:
            run(Path(tmp))
    print(f"tmpfsboot demo: done in {time.monotonic() - start:.1f} s")
    return 0


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `tmpfsboot demo`."""
    p = subparsers.add_parser("demo", help="build, serve and boot a disk-less node in QEMU",
                              description="A disk-less boot, end to end, on this machine: build "
                              "an image, serve it on loopback, build an initramfs, boot "
                              "Debian's kernel in QEMU into the tmpfs root.")
    p.add_argument("--debian", action="store_true",
                   help="boot a real Debian 12 with systemd (debootstrapped once, cached "
                   "under ~/.cache/tmpfsboot) instead of the busybox root")
    p.add_argument("--hostname", default="node1", help="the node's DHCP hostname (node1)")
    p.add_argument("--uuid", default=DEMO_UUID,
                   help=f"the node's SMBIOS UUID, with --debian ({DEMO_UUID})")
    p.add_argument("--kernel", metavar="VERSION", help="default: the newest in /boot")
    p.add_argument("--workdir", metavar="DIR", help="keep images and initramfs in DIR")
    p.add_argument("--timeout", type=float, default=300.0, metavar="S",
                   help="give up on the VM after S seconds (300)")
    p.set_defaults(func=cmd_demo)
