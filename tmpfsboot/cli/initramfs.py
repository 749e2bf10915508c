"""`tmpfsboot initramfs install|build|stage`: tmpfsboot in an initramfs (host.initramfs,
host.dracut)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..boot.cmdline import MirrorOrder
from ..boot.contract import DEFAULT_ROOTSIZE
from ..boot.errors import UsageError
from ..boot.log import format_bytes
from ..host import dracut
from ..host.initramfs import (
    DEFAULT_CONFDIR,
    GENERATORS,
    MODULES_CHOICES,
    PACKAGED_HOOK,
    build_initramfs,
    install_files,
    remove_files,
    stage_engine,
)

log = logging.getLogger("tmpfsboot")


def report(changed: list[Path], verb: str, *, where: Path) -> None:
    """One line per file install or remove changed, or that nothing needed doing."""
    for path in changed:
        print(f"{verb} {path}")
    if not changed and verb == "installed":
        print(f"tmpfsboot is installed in {where} already")


def cmd_install(args: argparse.Namespace) -> int:
    """`tmpfsboot initramfs install [--generator G] [--confdir DIR] [--remove]`."""
    confdir = Path(args.confdir)
    if args.generator == "dracut":
        modules_dir = (dracut.DRACUT_BASEDIR / "modules.d" if confdir == DEFAULT_CONFDIR
                       else confdir)
        if args.remove:
            report(dracut.remove_module(modules_dir), "removed", where=modules_dir)
        else:
            report(dracut.install_module(modules_dir), "installed",
                   where=modules_dir / dracut.MODULE_NAME)
        return 0
    if not args.remove and confdir == DEFAULT_CONFDIR and PACKAGED_HOOK.exists():
        raise UsageError(f"{PACKAGED_HOOK}: the tmpfsboot package's hook is installed; set "
                         f"TMPFS=y in {confdir}/conf.d instead of adding a second hook")
    if args.remove:
        report(remove_files(confdir), "removed", where=confdir)
    else:
        report(install_files(confdir), "installed", where=confdir)
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    """`tmpfsboot initramfs build [--generator G] -o FILE ...`."""
    keyring = Path(args.keyring) if args.keyring else None
    scripts = Path(args.scripts) if args.scripts else None
    if args.generator == "dracut":
        if args.modules != "list" or args.confdir != str(DEFAULT_CONFDIR):
            raise UsageError("--modules and --confdir are initramfs-tools' options; dracut "
                             "builds with a private configuration and every network driver")
        dracut.build_dracut(Path(args.output), kernel=args.kernel, rootsize=args.rootsize,
                            keyring=keyring, scripts=scripts, systemd=args.systemd)
    else:
        if args.systemd:
            raise UsageError("--systemd: a dracut flavour; add --generator dracut")
        build_initramfs(Path(args.output), kernel=args.kernel, modules=args.modules,
                        rootsize=args.rootsize, keyring=keyring, scripts=scripts,
                        source=Path(args.confdir), mirrors=args.mirrors)
    print(args.output)
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    """`tmpfsboot initramfs stage --destdir DIR`: called by the hook; prints the programs."""
    staged = stage_engine(Path(args.destdir), rootsize=args.rootsize,
                          keyring=Path(args.keyring) if args.keyring else None,
                          mirrors=args.mirrors)
    log.info("%d Python modules (%s of .pyc)", len(staged.modules),
             format_bytes(staged.pyc_bytes))
    sys.stdout.write("".join(f"{p}\n" for p in staged.programs))
    return 0


def add_generator_argument(parser: argparse.ArgumentParser) -> None:
    """--generator: initramfs-tools (the default) or dracut."""
    parser.add_argument("--generator", choices=GENERATORS, default=GENERATORS[0],
                        help="initramfs generator (default: %(default)s)")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `tmpfsboot initramfs install|build|stage`."""
    p = subparsers.add_parser("initramfs", help="install into initramfs-tools, build an initramfs",
                              description="initramfs-tools and dracut integration: install "
                              "tmpfsboot's hook and boot script or dracut module, or build "
                              "an initramfs.")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    q = sub.add_parser("install", help="put the hook, boot script and conf.d snippet into "
                       "initramfs-tools' configuration (idempotent)")
    q.add_argument("--confdir", default=str(DEFAULT_CONFDIR), metavar="DIR",
                   help=f"configuration directory (default: {DEFAULT_CONFDIR}; with "
                   "--generator dracut: dracut's modules.d)")
    q.add_argument("--remove", action="store_true", help="remove what install put there")
    add_generator_argument(q)
    q.set_defaults(func=cmd_install)

    q = sub.add_parser("build", help="build an initramfs with mkinitramfs -d on a private copy "
                       "of the configuration (/etc untouched)")
    q.add_argument("-o", "--output", required=True, metavar="FILE")
    q.add_argument("--kernel", metavar="VERSION", help="default: the newest in /boot")
    q.add_argument("--modules", choices=MODULES_CHOICES, default="list",
                   help="initramfs-tools' MODULES (default: list, plus virtio_pci virtio_net)")
    q.add_argument("--keyring", metavar="FILE", help="TMPFS_KEYRING: gpgv keyring to include")
    q.add_argument("--rootsize", metavar="SIZE", help="ROOTSIZE: default tmpfs size "
                   f"({DEFAULT_ROOTSIZE.replace('%', '%%')})")
    q.add_argument("--mirrors", choices=[m.value for m in MirrorOrder],
                   help="TMPFS_MIRRORS: default mirror order (ordered; spread: per node by "
                   "rendezvous hashing)")
    q.add_argument("--scripts", metavar="DIR", help="extra boot scripts, e.g. DIR/tmpfs-top/NAME")
    q.add_argument("--confdir", default=str(DEFAULT_CONFDIR), metavar="DIR",
                   help=f"configuration to copy (default: {DEFAULT_CONFDIR})")
    q.add_argument("--systemd", action=argparse.BooleanOptionalAction, default=False,
                   help="with --generator dracut: dracut's systemd flavour (default: without)")
    add_generator_argument(q)
    q.set_defaults(func=cmd_build)

    q = sub.add_parser("stage", help=argparse.SUPPRESS)
    q.add_argument("--destdir", required=True)
    q.add_argument("--rootsize", default=DEFAULT_ROOTSIZE)
    q.add_argument("--mirrors", default=MirrorOrder.ORDERED.value)
    q.add_argument("--keyring")
    q.set_defaults(func=cmd_stage)
