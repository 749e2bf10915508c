"""A fresh Debian chroot for package tests: debootstrap from the mirror apt already uses
(read from /etc/apt/sources.list* at run time), cached as a tarball under the project's
cache directory, unpacked anew for each test module."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path

from tmpfsboot.host.debootstrap import remove_tree

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tmpfsboot"
CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
              "DEBIAN_FRONTEND": "noninteractive", "HOME": "/root"}
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))


def parse_apt_mirror(files: Iterable[tuple[str, str]], suite: str) -> str | None:
    """The first `deb` URI with SUITE and main among (file name, text) pairs of one-line
    .list and deb822 .sources files; other files (e.g. *.disabled) are ignored."""
    for name, text in files:
        if name.endswith(".sources"):
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line:
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
                if (fields.get("enabled", "yes") != "no"
                        and "deb" in fields.get("types", "").split()
                        and suite in fields.get("suites", "").split()
                        and "main" in fields.get("components", "").split()):
                    return fields.get("uris", "").split()[0]
        elif name.endswith(".list"):
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", " ", line.split("#")[0]).split()
                if len(words) >= 4 and words[0] == "deb" and words[2] == suite \
                        and "main" in words[3:]:
                    return words[1]
    return None


def host_apt_mirror(suite: str) -> str:
    """The mirror this machine's apt uses for SUITE."""
    files: list[tuple[str, str]] = []
    for path in APT_SOURCES:
        paths = sorted(path.iterdir()) if path.is_dir() else [path]
        files += [(p.name, p.read_text()) for p in paths if p.is_file()]
    mirror = parse_apt_mirror(files, suite)
    assert mirror, f"no deb line for {suite} main in /etc/apt/sources.list*"
    return mirror


def host_codename() -> str:
    """VERSION_CODENAME of this machine (bookworm on Debian 12)."""
    text = Path("/etc/os-release").read_text()
    match = re.search(r"^VERSION_CODENAME=\"?([a-z]+)\"?$", text, re.M)
    assert match, "no VERSION_CODENAME in /etc/os-release"
    return match.group(1)


def cached_base(suite: str) -> Path:
    """A tarball of `debootstrap --variant=minbase SUITE`, made once."""
    mirror = host_apt_mirror(suite)
    tag = hashlib.sha256(mirror.encode()).hexdigest()[:12]
    tarball = CACHE / f"deb-chroot-{suite}-minbase-{tag}.tar.zst"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{tarball.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if tarball.exists():
            return tarball
        scratch = CACHE / f".{tarball.name}.root"
        if scratch.exists():
            remove_tree(scratch)
        try:
            subprocess.run(["debootstrap", "--variant=minbase", suite, str(scratch), mirror],
                           check=True, capture_output=True)
            for name in ("etc/hostname", "etc/resolv.conf"):
                (scratch / name).unlink(missing_ok=True)
            partial = tarball.with_suffix(".partial")
            subprocess.run(["tar", "-C", str(scratch), "--zstd", "--numeric-owner", "-cf",
                            str(partial), "."], check=True)
            partial.rename(tarball)
        finally:
            remove_tree(scratch)
    return tarball


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
        subprocess.run(["tar", "-C", str(root), "--zstd", "--numeric-owner", "-xf",
                        str(tarball)], check=True)
        chroot = Chroot(root)
        shutil.copyfile("/etc/resolv.conf", chroot.path("/etc/resolv.conf"))
        subprocess.run(["mount", "-t", "proc", "proc", str(chroot.path("/proc"))], check=True)
        chroot.bind(Path("/dev"), "/dev")
        archives = CACHE / "deb-chroot-apt-archives"
        (archives / "partial").mkdir(parents=True, exist_ok=True)
        chroot.bind(archives, "/var/cache/apt/archives")
        yield chroot
    finally:
        remove_tree(root)
