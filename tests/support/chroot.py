"""A fresh Debian chroot for package tests: the Debian tree the demo and the VM tests boot
(host.debootstrap.cached_root: debootstrapped once from the mirror apt already uses),
unpacked anew for each test module."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tmpfsboot.host.debootstrap import cache_dir, extract_root, remove_tree

CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
              "DEBIAN_FRONTEND": "noninteractive", "HOME": "/root"}


class Chroot:
    """A root unpacked from a cached tarball, with /proc and /dev, and the host's
    resolv.conf so apt reaches the mirror."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """ARGV inside the chroot, output captured; a failure shows its output."""
        proc = subprocess.run(["chroot", str(self.root), *argv], env=CHROOT_ENV,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)}: exit {proc.returncode}\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def path(self, rel: str) -> Path:
        """The host path of REL (absolute inside the chroot)."""
        return self.root / rel.lstrip("/")

    def bind(self, source: Path, rel: str, *, readonly: bool = False) -> None:
        """Bind-mount SOURCE on REL inside the chroot (created if missing)."""
        target = self.path(rel)
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "--bind", str(source), str(target)], check=True)
        if readonly:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True)


@contextlib.contextmanager
def fresh_chroot(tarball: Path, root: Path) -> Iterator[Chroot]:
    """TARBALL unpacked into ROOT, mounted for use; unmounted and removed afterwards.

    apt's downloads go to a cache directory that outlives the chroot."""
    root.mkdir(parents=True)
    try:
        extract_root(tarball, root)
        chroot = Chroot(root)
        shutil.copyfile("/etc/resolv.conf", chroot.path("/etc/resolv.conf"))
        subprocess.run(["mount", "-t", "proc", "proc", str(chroot.path("/proc"))], check=True)
        chroot.bind(Path("/dev"), "/dev")
        archives = cache_dir() / "deb-chroot-apt-archives"
        (archives / "partial").mkdir(parents=True, exist_ok=True)
        chroot.bind(archives, "/var/cache/apt/archives")
        yield chroot
    finally:
        remove_tree(root)
