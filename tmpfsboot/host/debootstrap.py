"""debootstrap: `image build --debootstrap` (build_debootstrap_image), and a real Debian
root debootstrapped once and cached (cached_root).

debootstrap takes about 40 s and the Debian mirror's bandwidth; the demo and the tests
need the same tree again and again. The tree is kept as a tarball (GNU tar with the image
tools' options: owners, modes, xattrs, ACLs, hard links) under the cache directory, named
by what made it: suite, variant, packages and architecture. The mirror is the one apt on
this machine uses (`aptsources`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..boot.errors import CommandError, UsageError
from ..boot.log import format_bytes, phase
from ..boot.run import require_program, run
from .aptsources import apt_mirror
from .image import TAR_OPTIONS, build_image, check_format, check_name, prepare_output
from .scrub import scrubbed_tree

log = logging.getLogger("tmpfsboot")

# What the Debian demo and the VM tests boot: systemd as init, udev, and procps for `free`.
DEBIAN_SUITE = "bookworm"
DEBIAN_VARIANT = "minbase"
DEBIAN_INCLUDE = ("systemd-sysv", "udev", "procps")


@dataclass(frozen=True)
class DebootstrapSpec:
    """What a debootstrapped tree is made of; its cache key."""

    suite: str = DEBIAN_SUITE
    variant: str = DEBIAN_VARIANT
    include: tuple[str, ...] = DEBIAN_INCLUDE

    def cache_name(self, arch: str) -> str:
        """The tarball's file name: readable, and changed by any ingredient."""
        packages = ",".join(sorted(self.include))
        digest = hashlib.sha256(packages.encode()).hexdigest()[:12]
        return f"{self.suite}-{self.variant}-{arch}-{digest}.tar.zst"


def cache_dir(env: dict[str, str] | None = None) -> Path:
    """$XDG_CACHE_HOME/tmpfsboot, else ~/.cache/tmpfsboot."""
    env = dict(os.environ) if env is None else env
    base = env.get("XDG_CACHE_HOME") or os.path.join(env.get("HOME") or "/root", ".cache")
    return Path(base) / "tmpfsboot"


def dpkg_arch() -> str:
    """This machine's Debian architecture (what debootstrap makes by default)."""
    return run(["dpkg", "--print-architecture"], capture=True).stdout.decode().strip()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on PATH: two runs wanting the same tree debootstrap it once."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def archive_tree(tree: Path, out: Path) -> None:
    """OUT: TREE as a zstd-compressed tarball made with the image tools' tar options."""
    require_program("zstd")
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        run(["tar", "-c", "-I", "zstd -q -T0 -3", "-f", str(tmp), *TAR_OPTIONS,
             "-C", str(tree), "."])
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def cached_root(spec: DebootstrapSpec | None = None, *, mirror: str | None = None,
                cache: Path | None = None) -> Path:
    """The cached tarball of SPEC's tree, debootstrapping it first if it is not there.

    SPEC defaults to DebootstrapSpec(); MIRROR to the one apt on this machine uses.
    """
    spec = spec or DebootstrapSpec()
    cache = cache_dir() if cache is None else cache
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / spec.cache_name(dpkg_arch())
    with _locked(cache / f".{tarball.name}.lock"):
        if tarball.exists():
            log.info("Debian root from the cache: %s (%s)", tarball,
                     format_bytes(tarball.stat().st_size))
            return tarball
        require_program("debootstrap")
        source = mirror or apt_mirror(spec.suite)
        target = Path(tempfile.mkdtemp(dir=cache, prefix=".debootstrap."))
        try:
            with phase(f"Debootstrapping {spec.suite} ({spec.variant}) from {source} "
                       f"into {target}"):
                run(compose_debootstrap_argv(spec.suite, target, variant=spec.variant,
                                             include=spec.include, mirror=source))
            with phase(f"Caching the tree as {tarball}"):
                archive_tree(target, tarball)
        finally:
            remove_tree(target)
    return tarball


def extract_root(tarball: Path, dest: Path) -> Path:
    """Unpack a cached tree into DEST (created) with owners, modes, xattrs and ACLs."""
    dest.mkdir(parents=True, exist_ok=True)
    run(["tar", "-x", "-I", "zstd -q -d", "-f", str(tarball), "--numeric-owner",
         "--same-permissions", "--xattrs", "--xattrs-include=*", "--acls", "-C", str(dest)])
    return dest


def debootstrap_args(spec: DebootstrapSpec) -> Sequence[str]:
    """The `tmpfsboot image build` options that make SPEC's tree."""
    return ["--debootstrap", spec.suite, "--variant", spec.variant,
            "--include", ",".join(spec.include)]


def list_mounts_under(path: Path) -> list[Path]:
    """Mount points at or below PATH, deepest first (from /proc/self/mountinfo)."""
    found: list[Path] = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            # Field 5 is the mount point, with space, tab, newline and \ octal-escaped.
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)),
                           line.split()[4])
            p = Path(point)
            if p == path or p.is_relative_to(path):
                found.append(p)
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def remove_tree(path: Path) -> None:
    """Delete a debootstrap target, unmounting what debootstrap left mounted in it first
    (a failed run can leave /proc and /sys there: never delete through a mount)."""
    for point in list_mounts_under(path):
        run(["umount", "--lazy", str(point)], check=False)
    if left := list_mounts_under(path):
        raise CommandError(f"{left[0]}: still mounted; not removing {path}")
    shutil.rmtree(path)


def compose_debootstrap_argv(suite: str, target: Path, *, variant: str | None,
                     include: Sequence[str], mirror: str | None) -> list[str]:
    """The debootstrap command that makes a root of SUITE in TARGET."""
    argv = ["debootstrap"]
    if variant:
        argv.append(f"--variant={variant}")
    if include:
        argv.append("--include=" + ",".join(include))
    argv += [suite, str(target)]
    if mirror:
        argv.append(mirror)
    return argv


def parse_packages(text: str | None) -> list[str]:
    """--include's comma- or space-separated package list."""
    if not text:
        return []
    pkgs = [p for p in re.split(r"[,\s]+", text) if p]
    for p in pkgs:
        if not re.fullmatch(r"[a-z0-9][a-z0-9.+-]*(:[a-z0-9-]+)?", p):
            raise UsageError(f"--include: {p!r} is not a Debian package name")
    return pkgs


def build_debootstrap_image(suite: str, outdir: Path, name: str, *, variant: str | None,
                            include: Sequence[str], mirror: str | None,
                            compression: str | None, sign: str | None,
                            gpg_homedir: Path | None, level: int | None,
                            fmt: str = "tar", keep_identity: bool = False) -> Path:
    """Debootstrap SUITE into a scratch directory beside OUTDIR's images, scrub the build
    machine's identity from it (unless KEEP_IDENTITY), build the image from it, and remove
    the scratch directory. MIRROR defaults to the one apt on this machine uses."""
    check_name(name)
    check_format(fmt, compression)
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]*", suite):
        raise UsageError(f"--debootstrap {suite!r}: not a suite name")
    mirror = mirror or apt_mirror(suite)
    prepare_output(outdir)
    require_program("debootstrap")
    target = Path(tempfile.mkdtemp(dir=outdir, prefix=f".{name}.debootstrap."))
    try:
        with phase(f"Debootstrapping {suite} into {target}"):
            run(compose_debootstrap_argv(suite, target, variant=variant, include=include,
                                 mirror=mirror))
        if keep_identity:
            return build_image(target, outdir, name, compression=compression, sign=sign,
                               gpg_homedir=gpg_homedir, level=level, fmt=fmt)
        with scrubbed_tree(target, in_place=True) as (tree, scrub):
            return build_image(tree, outdir, name, compression=compression, sign=sign,
                               gpg_homedir=gpg_homedir, level=level, fmt=fmt,
                               identity=scrub.to_json())
    finally:
        remove_tree(target)
