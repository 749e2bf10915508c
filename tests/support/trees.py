"""Test helpers for images: a tree holding every kind of member, and a metadata snapshot
to compare trees entry by entry."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

# Mode bits and owners the full tree is built with (checked in the tests).
SETUID_MODE = 0o4755
SETGID_MODE = 0o2755
STICKY_DIR_MODE = 0o1777
ODD_UID, ODD_GID = 1234, 5678
CAPABILITY = "cap_net_raw=ep"
LONG_TARGET = "/usr/lib/" + "a-very-long-symlink-target-" * 4 + "end"


def _set_mtime(path: Path, ns: int) -> None:
    os.utime(path, ns=(ns, ns), follow_symlinks=False)


def make_full_tree(root: Path) -> None:
    """Fill ROOT (an empty directory, ideally on tmpfs) with every kind of tar member:
    setuid/setgid/sticky, numeric owners, capability, trusted.* and user.* xattrs, ACLs,
    hard links, symlinks absolute/relative/dangling/long, char and block devices, a FIFO,
    odd mtimes, odd names."""
    os.chmod(root, 0o755)
    for d in ("etc", "usr/bin", "usr/lib", "srv/shared", "srv/acl", "var/spool", "dev"):
        (root / d).mkdir(parents=True)
    (root / "etc/hostname").write_text("node\n")
    (root / "etc/empty").write_bytes(b"")
    (root / "usr/lib/blob.bin").write_bytes(os.urandom(300_000))
    (root / "usr/lib/text.txt").write_text("hello tmpfs\n" * 1000)
    # Owners first: chown clears setuid bits and capabilities.
    for name, mode in (("usr/bin/suid", SETUID_MODE), ("usr/bin/sgid", SETGID_MODE),
                       ("usr/bin/ping", 0o755)):
        (root / name).write_bytes(b"\x7fELF fake " + name.encode())
        os.chmod(root / name, mode)
    owned = root / "srv/owned"
    owned.write_text("owned by 1234:5678\n")
    os.chown(owned, ODD_UID, ODD_GID)
    os.chown(root / "srv/shared", ODD_UID + 1, ODD_GID + 1)
    os.chmod(root / "srv/shared", 0o2775)
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", STICKY_DIR_MODE)
    setcap = shutil.which("setcap")
    assert setcap, "setcap (libcap2-bin) is needed to make a capability"
    subprocess.run([setcap, CAPABILITY, str(root / "usr/bin/ping")], check=True)
    os.setxattr(root / "etc/hostname", "trusted.tmpfsboot", b"trusted value")
    os.setxattr(root / "etc/hostname", "user.tmpfsboot", b"user value \x00\xff")
    os.setxattr(root / "etc/hostname", "security.selinux", b"system_u:object_r:etc_t:s0\x00")
    # ACLs: an access ACL on a file, access + default ACLs on a directory.
    acl_file = root / "srv/acl/file"
    acl_file.write_text("acl\n")
    subprocess.run(["setfacl", "-m", f"u:{ODD_UID}:rw-,g:{ODD_GID}:r--", str(acl_file)],
                   check=True)
    subprocess.run(["setfacl", "-m", f"u:{ODD_UID}:rwx", "-d", "-m", f"g:{ODD_GID}:r-x",
                    str(root / "srv/acl")], check=True)
    # Hard links: three names of one inode across directories, and a second pair.
    os.link(root / "usr/lib/text.txt", root / "etc/text-link")
    os.link(root / "usr/lib/text.txt", root / "srv/text-link2")
    os.link(root / "usr/bin/suid", root / "usr/bin/suid-link")
    # Symlinks.
    os.symlink("/etc/hostname", root / "etc/abs-link")
    os.symlink("../etc/hostname", root / "usr/rel-link")
    os.symlink("/nonexistent/target", root / "etc/dangling")
    os.symlink(LONG_TARGET, root / "usr/long-link")
    os.symlink("usr/bin", root / "bin")
    # Device nodes and a FIFO.
    os.mknod(root / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "dev/loop9", 0o660 | stat.S_IFBLK, os.makedev(7, 9))
    os.chown(root / "dev/loop9", 0, 6)
    os.mkfifo(root / "var/spool/fifo")
    # The umask trims mknod's and mkfifo's modes: set them as meant.
    for name, mode in (("dev/null", 0o666), ("dev/loop9", 0o660), ("var/spool/fifo", 0o620)):
        os.chmod(root / name, mode)
    # Odd names: spaces, UTF-8, and a path longer than ustar's 100 bytes.
    (root / "srv/name with spaces é").write_text("odd\n")
    deep = root / "srv" / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    (deep / ("f" * 80)).write_text("deep\n")
    # Odd mtimes last (writing into a directory changes its mtime): before the epoch,
    # nanoseconds, far future.
    _set_mtime(root / "etc/hostname", -86_400 * 365 * 10 * 10**9)
    _set_mtime(root / "usr/lib/blob.bin", 1_234_567_890_123_456_789)
    _set_mtime(root / "srv/owned", 4_102_444_800 * 10**9)
    _set_mtime(root / "etc/abs-link", 1_000_000_000 * 10**9)
    _set_mtime(root / "var/spool/fifo", 1 * 10**9)


@dataclass(frozen=True)
class Entry:
    """One entry's metadata as a root's user sees it."""

    kind: str
    mode: int
    uid: int
    gid: int
    size: int | None
    sha256: str | None
    target: str | None
    rdev: int | None
    mtime_ns: int | None
    xattrs: tuple[tuple[str, bytes], ...]
    acl: str
    links: tuple[str, ...]
    # only in strict snapshots: directory mtimes and where a file's data (not holes) lies
    dir_mtime_ns: int | None = None
    data_map: tuple[tuple[int, int], ...] | None = None


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "link"),
                       (stat.S_ISCHR, "char"), (stat.S_ISBLK, "block"),
                       (stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "unknown"


def _acl_text(path: Path) -> str:
    out = subprocess.run(["getfacl", "--absolute-names", "--omit-header", "--numeric",
                          "--physical", str(path)], check=True, capture_output=True)
    return out.stdout.decode()


def _data_map(path: Path) -> tuple[tuple[int, int], ...]:
    """(start, end) of each data extent: holes left out, as SEEK_DATA/SEEK_HOLE see them."""
    extents = []
    fd = os.open(path, os.O_RDONLY)
    try:
        end = os.fstat(fd).st_size
        pos = 0
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break  # ENXIO: only a hole is left
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            extents.append((start, pos))
    finally:
        os.close(fd)
    return tuple(extents)


def _file_digest(path: Path, *, strict: bool) -> str:
    """SHA-256 of the contents; STRICT hashes holes by their length, without reading them
    (a sparse test file may be many GiB; strict snapshots compare the layout anyway)."""
    h = hashlib.sha256()
    if not strict:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()
    zeros = bytes(1 << 20)
    pos = 0
    with open(path, "rb") as f:
        for start, end in (*_data_map(path), (os.fstat(f.fileno()).st_size, -1)):
            h.update(f"hole {start - pos}".encode() if start > pos else b"")
            if end < 0:
                break
            f.seek(start)
            while start < end:
                chunk = f.read(min(end - start, len(zeros)))
                h.update(chunk)
                start += len(chunk)
            pos = end
    return h.hexdigest()


def snapshot_tree(root: Path, *, strict: bool = False) -> dict[str, Entry]:
    """Every entry under ROOT (ROOT itself as '.') with its metadata, for comparison.

    STRICT adds directory mtimes and the data/hole layout of files (both tar and
    tmpfsboot set them; image tools need not)."""
    paths = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            paths.append(Path(dirpath) / name)
    inodes: dict[int, list[str]] = {}
    stats: dict[str, os.stat_result] = {}
    for p in paths:
        rel = "." if p == root else str(p.relative_to(root))
        st = os.lstat(p)
        stats[rel] = st
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            inodes.setdefault(st.st_ino, []).append(rel)
    result: dict[str, Entry] = {}
    for rel, st in stats.items():
        p = root / rel
        kind = _kind(st.st_mode)
        digest = None
        if kind == "file":
            digest = _file_digest(p, strict=strict)
        xattrs = tuple(sorted(
            (name, os.getxattr(p, name, follow_symlinks=False))
            for name in os.listxattr(p, follow_symlinks=False)))
        result[rel] = Entry(
            kind=kind,
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            size=st.st_size if kind == "file" else None,
            sha256=digest,
            target=os.readlink(p) if kind == "link" else None,
            rdev=st.st_rdev if kind in ("char", "block") else None,
            mtime_ns=None if kind == "dir" else st.st_mtime_ns,
            xattrs=xattrs,
            acl="" if kind == "link" else _acl_text(p),
            links=tuple(sorted(inodes.get(st.st_ino, []))) if kind == "file" else (),
            dir_mtime_ns=st.st_mtime_ns if strict and kind == "dir" else None,
            data_map=_data_map(p) if strict and kind == "file" else None,
        )
    return result


def diff_trees(want: dict[str, Entry], got: dict[str, Entry]) -> list[str]:
    """Human-readable differences between two snapshots (empty when equal)."""
    problems = [f"missing: {p}" for p in sorted(want.keys() - got.keys())]
    problems += [f"extra: {p}" for p in sorted(got.keys() - want.keys())]
    for p in sorted(want.keys() & got.keys()):
        a, b = want[p], got[p]
        for field in a.__dataclass_fields__:
            va, vb = getattr(a, field), getattr(b, field)
            if va != vb:
                problems.append(f"{p}: {field}: want {va!r}, got {vb!r}")
    return problems
