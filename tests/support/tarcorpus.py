"""The tar-parity corpus: archives GNU tar makes at test time in each of its formats, and
public test archives of other projects kept in tests/data/tar (see PROVENANCE there)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from support import TESTS

DATA = TESTS / "data" / "tar"
GNU_EXTRACT = ["tar", "--xattrs", "--xattrs-include=*", "--acls", "--selinux",
               "--numeric-owner", "-xpf"]
GNU_CREATE = ["tar", "--numeric-owner"]
GNU_METADATA = ["--xattrs", "--xattrs-include=*", "--acls", "--selinux"]  # pax only

# (archive name, GNU tar options): every --format, and every sparse flavour.
GNU_FORMATS = [
    ("gnu-v7.tar", ["--format=v7"]),
    ("gnu-ustar.tar", ["--format=ustar"]),
    ("gnu-oldgnu.tar", ["--format=oldgnu"]),
    ("gnu-gnu.tar", ["--format=gnu"]),
    ("gnu-posix.tar", ["--format=posix"]),
    ("gnu-oldgnu-sparse.tar", ["--format=oldgnu", "--sparse"]),
    ("gnu-gnu-sparse.tar", ["--format=gnu", "--sparse"]),
    ("gnu-posix-sparse-0.0.tar", ["--format=posix", "--sparse", "--sparse-version=0.0"]),
    ("gnu-posix-sparse-0.1.tar", ["--format=posix", "--sparse", "--sparse-version=0.1"]),
    ("gnu-posix-sparse-1.0.tar", ["--format=posix", "--sparse", "--sparse-version=1.0"]),
]

OLD_NS = -2_100_000_000 * 10**9 + 250  # 1903: negative, base-256 or a pax record
FUTURE_NS = 16_725_225_600 * 10**9 + 999_999_999  # 2500: beyond 11 octal digits
FIXED_NS = 1_600_000_000 * 10**9 + 123_456_789
BIG_ID = 3_000_000  # beyond 7 octal digits


def _sparse(path: Path, size: int, *pieces: tuple[int, bytes]) -> None:
    with open(path, "wb") as f:
        for offset, data in pieces:
            f.seek(offset)
            f.write(data)
        f.truncate(size)


def make_corpus_tree(root: Path) -> None:
    """Fill ROOT (on tmpfs) with what the formats must carry: every kind of entry, owners
    beyond octal, xattrs in each namespace, ACLs, hard-link groups, long names, old and
    future and nanosecond mtimes, sparse files with leading, inner and trailing holes."""
    long_dir = root / ("d" * 90) / ("e" * 90) / ("f" * 60)
    for d in ("etc", "srv/acl", "dev", "sparse", str(long_dir.relative_to(root))):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "etc/hostname").write_text("node\n")
    (root / "etc/empty").write_bytes(b"")
    (root / "etc/blob").write_bytes(os.urandom(70_000))
    (root / "etc/caf\u00e9").write_text("utf-8 name\n")
    (long_dir / ("g" * 120)).write_text("long name\n")
    os.symlink("/usr/lib/" + "t" * 150, root / "etc/long-link")
    os.symlink("hostname", root / "etc/short-link")
    for i, name in enumerate(("a", "b", "c")):
        path = root / f"etc/link-{name}"
        if i == 0:
            path.write_text("linked\n")
        else:
            os.link(root / "etc/link-a", path)
    os.mknod(root / "dev/null", 0o20666, os.makedev(1, 3))
    os.mknod(root / "dev/loop0", 0o60660, os.makedev(7, 0))
    os.mkfifo(root / "dev/fifo", 0o600)
    (root / "etc/suid").write_bytes(b"#!/bin/sh\n")
    os.chown(root / "etc/suid", 0, 0)
    os.chmod(root / "etc/suid", 0o4755)
    (root / "etc/owned").write_text("odd owner\n")
    os.chown(root / "etc/owned", BIG_ID, BIG_ID + 1)
    os.chown(root / "srv/acl", 1234, 5678)
    os.setxattr(root / "etc/hostname", "trusted.origin", b"corpus")
    os.setxattr(root / "etc/hostname", "user.comment", b"\x00binary\xff")
    os.setxattr(root / "etc/hostname", "security.selinux", b"system_u:object_r:etc_t:s0\0")
    subprocess.run(["setcap", "cap_net_raw=ep", str(root / "etc/blob")], check=True)
    (root / "srv/acl/file").write_text("acl\n")
    subprocess.run(["setfacl", "-m", "u:1234:rw,g:5678:r,m::rw", str(root / "srv/acl/file")],
                   check=True)
    subprocess.run(["setfacl", "-d", "-m", "u:1234:rwx", str(root / "srv/acl")], check=True)
    _sparse(root / "sparse/inner", 3 << 20, (0, b"head"), (1 << 20, b"x" * 5000))
    _sparse(root / "sparse/trailing-hole", 2 << 20, (4096, b"data"))
    _sparse(root / "sparse/all-hole", 1 << 20)
    for path, ns in (("etc/hostname", OLD_NS), ("etc/empty", FUTURE_NS),
                     ("etc/blob", FIXED_NS)):
        os.utime(root / path, ns=(ns, ns))
    # directory mtimes last, fixed: a fresh one could not be told from an implicit one
    for dirpath, dirnames, _ in os.walk(root, topdown=False):
        for d in dirnames:
            os.utime(Path(dirpath) / d, ns=(FIXED_NS, FIXED_NS), follow_symlinks=False)


def make_gnu_archives(tree: Path, out: Path) -> list[Path]:
    """One archive of TREE per GNU_FORMATS entry, in OUT. A format that cannot hold some
    entry (a long name in v7) makes GNU tar leave it out and warn: kept as it is."""
    made = []
    for name, options in GNU_FORMATS:
        archive = out / name
        if "--format=posix" in options:
            options = [*options, *GNU_METADATA]
        subprocess.run([*GNU_CREATE, *options, "-C", str(tree), "-cf", str(archive), "."],
                       check=False, capture_output=True)
        assert archive.stat().st_size > 0, name
        made.append(archive)
    return made


def vendored_archives() -> list[Path]:
    """The public test archives under tests/data/tar, by project."""
    return sorted(DATA.glob("*/*.tar"))
