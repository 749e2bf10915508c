"""Archives for the fault matrix: a good root made with GNU tar, hostile and broken ones.

Good images come from a real tree through GNU tar and the real compressors. Hostile
members are written with tarfile (it writes what it is told, `..` and all) or from raw
header bytes where tarfile refuses (a member claiming more bytes than follow).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import stat
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

# A multiple of the engine's 1 MiB read size, so cuts at 1 MiB fall mid-image.
BLOB_SIZE = 2_500_000
MIB = 1 << 20


def make_tree(root: Path, *, seed: int = 1, blob_size: int = BLOB_SIZE) -> Path:
    """A small root: files, an incompressible blob (the image is about BLOB_SIZE bytes),
    setuid and sticky modes, numeric owners, absolute and relative symlinks, a hard link,
    a FIFO. Deterministic for a given SEED."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    for d in ("etc", "usr/bin", "usr/lib", "var/tmp", "srv"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "etc/hostname").write_text(f"node-{seed}\n")
    (root / "etc/os-release").write_text('PRETTY_NAME="tmpfsboot test root"\n' * 20)
    (root / "usr/lib/blob.bin").write_bytes(rng.randbytes(blob_size))
    (root / "usr/bin/tool").write_bytes(b"\x7fELF tool " * 100)
    os.chmod(root / "usr/bin/tool", 0o4755)
    (root / "srv/owned").write_text("owned\n")
    os.chown(root / "srv/owned", 1234, 5678)
    os.chmod(root / "var/tmp", 0o1777)
    os.symlink("/usr/lib/blob.bin", root / "etc/abs-link")
    os.symlink("../usr/bin/tool", root / "etc/rel-link")
    os.link(root / "etc/os-release", root / "usr/lib/os-release")
    os.mkfifo(root / "srv/fifo")
    os.chmod(root / "srv/fifo", 0o600)
    return root


def gnu_tar(src: Path) -> bytes:
    """SRC as a tar stream made by GNU tar (numeric owners, xattrs, sorted names)."""
    return subprocess.run(
        ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--sort=name",
         "-C", str(src), "-cf", "-", "."],
        check=True, capture_output=True).stdout


def compress(data: bytes, kind: str = "zstd") -> bytes:
    """DATA compressed with the real tool: zstd, xz, gzip, or none."""
    argv = {"zstd": ["zstd", "-q", "-c", "-3"], "xz": ["xz", "-c", "-1"],
            "gzip": ["gzip", "-c", "-1"]}.get(kind)
    if argv is None:
        return data
    return subprocess.run(argv, input=data, check=True, capture_output=True).stdout


SUFFIX = {"zstd": ".tar.zst", "xz": ".tar.xz", "gzip": ".tar.gz", "none": ".tar"}


@dataclass(frozen=True)
class Published:
    """An image put on a server: its URL path, hash and size."""

    path: str
    sha256: str
    size: int


def publish(files: dict[str, bytes], directory: str, name: str, image: bytes, *,
            kind: str = "zstd", unpacked_size: int | None = None,
            sums_sha256: str | None = None) -> Published:
    """Put IMAGE as DIRECTORY/NAME<suffix> into FILES (a server's path -> bytes), with a
    SHA256SUMS listing it (or SUMS_SHA256 instead, to lie) and, when UNPACKED_SIZE is
    given, a NAME.manifest.json declaring it."""
    base = "/" + directory.strip("/") + "/" if directory.strip("/") else "/"
    filename = name + SUFFIX[kind]
    digest = hashlib.sha256(image).hexdigest()
    files[base + filename] = image
    files[base + "SHA256SUMS"] = f"{sums_sha256 or digest}  {filename}\n".encode()
    if unpacked_size is not None:
        files[base + name + ".manifest.json"] = json.dumps(
            {"name": name, "unpacked_size": unpacked_size}).encode()
    return Published(base + filename, digest, len(image))


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    """ROOT holding FILES (relative path -> content), parents made as needed."""
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def publish_dir(www: Path, name: str, tree: Path, compressor: list[str] | None) -> None:
    """NAME in the directory WWW (for `serve(root=WWW)`): a GNU tar (pax) of TREE piped
    through the command COMPRESSOR, added to WWW/SHA256SUMS."""
    tar = subprocess.run(["tar", "--format=pax", "--numeric-owner", "-C", str(tree), "-c", "."],
                         check=True, capture_output=True).stdout
    data = subprocess.run(compressor, input=tar, check=True,
                          capture_output=True).stdout if compressor else tar
    (www / name).write_bytes(data)
    with open(www / "SHA256SUMS", "a") as f:
        f.write(f"{hashlib.sha256(data).hexdigest()}  {name}\n")


def tree_size(root: Path) -> int:
    """Bytes the tree takes on a tmpfs, roughly (file sizes rounded up to pages)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            total += -(-st.st_size // 4096) * 4096 if stat.S_ISREG(st.st_mode) else 0
    return total


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Every entry under ROOT with type, mode, owner, content hash or link target."""
    result: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            content: object = None
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    content = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            mtime = None if stat.S_ISDIR(st.st_mode) else st.st_mtime_ns
            result[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid,
                           st.st_gid, content, mtime, st.st_nlink if
                           stat.S_ISREG(st.st_mode) else None)
    return result


# -- hostile members, written with tarfile ---------------------------------------------

@dataclass(frozen=True)
class Member:
    """One tar member to write: a file, dir, symlink or hard link."""

    name: str
    kind: bytes = tarfile.REGTYPE
    data: bytes = b""
    link: str = ""
    mode: int = 0o644


def file(name: str, data: bytes = b"hostile\n") -> Member:
    return Member(name, tarfile.REGTYPE, data)


def directory(name: str) -> Member:
    return Member(name, tarfile.DIRTYPE, mode=0o755)


def symlink(name: str, target: str) -> Member:
    return Member(name, tarfile.SYMTYPE, link=target, mode=0o777)


def hardlink(name: str, target: str) -> Member:
    return Member(name, tarfile.LNKTYPE, link=target)


def tar_of(*members: Member, fmt: int = tarfile.GNU_FORMAT) -> bytes:
    """A tar stream of MEMBERS exactly as given (tarfile keeps `..` and leading `/`)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.type = m.kind
            info.mode = m.mode
            info.mtime = 1_700_000_000
            info.linkname = m.link
            info.size = len(m.data) if m.kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(m.data) if info.size else None)
    return out.getvalue()


def claims_huge_size(name: str = "huge", claimed: int = 1 << 40) -> bytes:
    """A member header claiming CLAIMED bytes (GNU base-256 size), followed by a few
    bytes of data and nothing else: the stream ends long before the claim."""
    info = tarfile.TarInfo(name)
    info.size = claimed
    info.mtime = 1_700_000_000
    header = info.tobuf(format=tarfile.GNU_FORMAT)
    return header + b"x" * 4096


def truncated(tar: bytes, keep: int) -> bytes:
    """The first KEEP bytes of TAR: a stream that ends inside a member."""
    assert keep < len(tar)
    return tar[:keep]


def corrupt_middle(data: bytes, *, span: int = 64) -> bytes:
    """DATA with SPAN bytes in its middle inverted (a compressed stream broken inside)."""
    mid = len(data) // 2
    broken = bytearray(data)
    for i in range(mid, mid + span):
        broken[i] ^= 0xFF
    return bytes(broken)
