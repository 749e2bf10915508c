"""`tmpfsboot image build|layer`: root images and per-host layers (tmpfsboot.host.image)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..boot.errors import UsageError
from ..host.debootstrap import build_debootstrap_image, parse_packages
from ..host.fsimage import FORMAT_CHOICES, FORMATS
from ..host.image import COMPRESSORS, build_tree_image


def cmd_image_build(args: argparse.Namespace) -> int:
    """`image build` and `image layer`: one code path."""
    outdir = Path(args.output)
    gpg_homedir = Path(args.gpg_homedir) if args.gpg_homedir else None
    if getattr(args, "debootstrap", None):
        build_debootstrap_image(args.debootstrap, outdir, args.name, variant=args.variant,
                                include=parse_packages(args.include), mirror=args.mirror,
                                compression=args.compression, sign=args.sign,
                                gpg_homedir=gpg_homedir, level=args.level,
                                fmt=args.format, keep_identity=args.keep_identity)
    else:
        if getattr(args, "variant", None) or getattr(args, "include", None) or getattr(
                args, "mirror", None):
            raise UsageError("--variant, --include and --mirror go with --debootstrap")
        # `image layer` keeps its tree as it is: a host's layer names its host
        build_tree_image(Path(args.source), outdir, args.name,
                         keep_identity=args.keep_identity, compression=args.compression,
                         sign=args.sign, gpg_homedir=gpg_homedir, level=args.level,
                         include_root=args.include_root, fmt=args.format)
    return 0


def _add_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True, metavar="OUTDIR",
                   help="directory of images (created if missing): gets NAME.tar.*, "
                   "NAME.manifest.json, SHA256SUMS (and SHA256SUMS.gpg with --sign)")
    p.add_argument("--name", required=True, help="image name (file name without .tar.*)")
    p.add_argument("--compression", metavar="NAME",
                   help=f"tar: {', '.join(COMPRESSORS)}; squashfs: "
                   f"{', '.join(FORMATS['squashfs'].compressions)}; erofs: "
                   f"{', '.join(FORMATS['erofs'].compressions)} (default: the first)")
    p.add_argument("--level", type=int, metavar="N",
                   help="compression level (default: zstd 9, xz 6, gzip 6)")
    p.add_argument("--sign", metavar="KEYID", help="sign SHA256SUMS with this gpg key")
    p.add_argument("--gpg-homedir", metavar="DIR", help="gpg home directory for --sign")
    p.set_defaults(func=cmd_image_build)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `image build` and `image layer`."""
    image = subparsers.add_parser("image", help="build root images and per-host layers")
    verbs = image.add_subparsers(dest="image_verb", required=True, metavar="VERB")

    p = verbs.add_parser("build", help="build a root image from a directory or debootstrap",
                         description="Build a compressed root image, its manifest and "
                         "SHA256SUMS line, from a directory or a fresh debootstrap.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from", dest="source", metavar="DIR", help="the root tree")
    src.add_argument("--debootstrap", metavar="SUITE", help="debootstrap this suite")
    p.add_argument("--variant", help="debootstrap --variant (e.g. minbase)")
    p.add_argument("--include", metavar="PKGS", help="debootstrap --include (comma-separated)")
    p.add_argument("--mirror", metavar="URL",
                   help="debootstrap mirror (default: the one apt on this machine uses)")
    p.add_argument("--keep-identity", action="store_true",
                   help="archive the tree as it is: keep the build machine's machine-id, "
                   "hostname, resolv.conf, SSH host keys, random seed and apt's lists and "
                   "caches (by default they are left out; the source tree is never changed)")
    _add_output_options(p)
    p.add_argument("--format", choices=FORMAT_CHOICES, default="tar",
                   help="tar (a compressed tarball, extracted at boot), or squashfs or "
                   "erofs (kept in RAM and mounted under an overlay); default: tar")
    p.set_defaults(include_root=True)

    p = verbs.add_parser("layer", help="build a small layer (e.g. per host) from a directory",
                         description="Build a layer image from a small tree of files: the "
                         "same outputs as `image build`.")
    p.add_argument("--from", dest="source", metavar="DIR", required=True, help="the tree")
    _add_output_options(p)
    p.set_defaults(include_root=False, format="tar", keep_identity=True)
