"""A lean, safe tar extractor: ustar, pax and GNU headers, streamed from a pipe.

Why not tarfile or GNU tar: Python 3.11.2's tarfile is about twice as slow here (its
header parsing and buffer copies dominate) and restores no xattrs; GNU tar writes through
a symlink that an earlier layer left behind. This extractor resolves every path as if
the target directory were `/` (as it will be after switch_root), so an absolute symlink
points inside the root and no member, of this layer or a later one, can write outside it.

It assumes it is the only writer in the target while it runs (true in the initramfs).
"""

from __future__ import annotations

import base64
import errno
import logging
import os
import shutil
import stat
import struct
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import ArchiveError, SpaceError, UnsafeMemberError

log = logging.getLogger("tmpfsboot")

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
READ_SIZE = 1 << 20
MAX_SYMLINK_DEPTH = 40

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"

# ACL xattr encoding (linux/posix_acl_xattr.h).
_ACL_VERSION = 2
_ACL_TAGS = {"user": (0x01, 0x02), "group": (0x04, 0x08), "mask": (0x10, 0x10),
             "other": (0x20, 0x20)}
_ACL_UNDEFINED_ID = 0xFFFFFFFF

_REGULAR = (b"0", b"\0", b"7")
_O_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class ExtractStats:
    """What one layer's extraction did."""

    members: int = 0
    files: int = 0
    bytes: int = 0
    whiteouts: int = 0


@dataclass(slots=True)
class _Member:
    name: str
    type: bytes
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    linkname: str
    devmajor: int
    devminor: int
    xattrs: dict[str, bytes] = field(default_factory=dict)
    acls: dict[str, str] = field(default_factory=dict)


def _number(field_: bytes, what: str) -> int:
    """A numeric header field: octal text, or GNU base-256 when the high bit is set."""
    if field_[0] & 0x80:
        value = int.from_bytes(field_[1:], "big")
        if field_[0] & 0x40:  # negative base-256
            value -= 1 << (8 * (len(field_) - 1))
        return value
    try:
        return int(field_.strip(b" \0") or b"0", 8)
    except ValueError:
        text = field_.split(b"\0", 1)[0].strip(b" ")
        raise ArchiveError(f"corrupt tar header: bad {what} field {text!r}") from None


def _text(field_: bytes) -> str:
    return field_.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _checksum_ok(header: bytes) -> bool:
    """The header checksum, counted over unsigned bytes (or signed, as old tars did)."""
    try:
        stored = int(header[148:156].strip(b" \0") or b"0", 8)
    except ValueError:
        return False
    if sum(header) - sum(header[148:156]) + 8 * 0x20 == stored:
        return True
    signed: int = sum(struct.unpack("148b", header[:148])) + 8 * 0x20
    signed += sum(struct.unpack("356b", header[156:]))
    return signed == stored


def parse_pax(data: bytes) -> dict[str, bytes]:
    """Parse pax extended header records `LEN KEY=VALUE\\n`; values stay bytes."""
    records: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:
            break
        space = data.find(b" ", pos)
        if space < 0:
            raise ArchiveError("corrupt pax header: no length")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise ArchiveError("corrupt pax header: bad length") from None
        end = pos + length
        if length <= 0 or end > len(data) or data[end - 1] != 0x0A:
            raise ArchiveError("corrupt pax header: record overruns")
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq:
            raise ArchiveError("corrupt pax header: record without '='")
        records[key.decode("utf-8", "surrogateescape")] = value
        pos = end
    return records


def normalize_name(name: str) -> str:
    """The member's path relative to the root: leading `/` and `.` parts dropped.

    Raises UnsafeMemberError for `..` components, as tar would be tricked by them.
    """
    if not (name.startswith(("/", ".")) or "//" in name or "/." in name):
        return name.rstrip("/")  # the common case: already plain
    parts = [p for p in name.split("/") if p and p != "."]
    if ".." in parts:
        raise UnsafeMemberError(f"refusing tar member {name!r}: it contains '..'")
    return "/".join(parts)


def acl_text_to_xattr(text: str, *, users: dict[str, int], groups: dict[str, int]) -> bytes:
    """Encode a POSIX ACL in text form (as pax SCHILY.acl.*) as a system.posix_acl_* value."""
    entries = []
    for raw in text.replace(",", "\n").splitlines():
        entry = raw.split("#", 1)[0].strip()
        if not entry:
            continue
        parts = entry.split(":")
        if len(parts) < 3:
            raise ArchiveError(f"corrupt ACL entry {entry!r}")
        kind, qualifier, perms = parts[0], parts[1], parts[2]
        kind = {"u": "user", "g": "group", "m": "mask", "o": "other"}.get(kind, kind)
        if kind not in _ACL_TAGS:
            raise ArchiveError(f"corrupt ACL entry {entry!r}")
        obj_tag, named_tag = _ACL_TAGS[kind]
        if qualifier:
            # star writes the numeric id as a fourth field; GNU tar writes names or numbers
            if len(parts) > 3 and parts[3].isdigit():
                ident = int(parts[3])
            elif qualifier.isdigit():
                ident = int(qualifier)
            else:
                table = users if kind == "user" else groups
                if qualifier not in table:
                    raise ArchiveError(f"ACL entry {entry!r}: unknown {kind} {qualifier!r}")
                ident = table[qualifier]
            tag = named_tag
        else:
            tag, ident = obj_tag, _ACL_UNDEFINED_ID
        perm = sum(bit for ch, bit in zip("rwx", (4, 2, 1), strict=True) if ch in perms)
        entries.append((tag, perm, ident))
    entries.sort(key=lambda e: (e[0], e[2] if e[2] != _ACL_UNDEFINED_ID else -1))
    return struct.pack("<I", _ACL_VERSION) + b"".join(struct.pack("<HHI", *e) for e in entries)


def _read_id_table(path: str) -> dict[str, int]:
    table: dict[str, int] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split(":")
                if len(fields) > 2 and fields[2].isdigit():
                    table.setdefault(fields[0], int(fields[2]))
    except OSError:
        pass
    return table


class _Reader:
    """Exact reads from a pipe into one reused buffer (a fresh 1 MiB per read costs page
    faults), with as few copies as possible."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = bytearray(READ_SIZE)
        self.view = memoryview(self.buf)
        self.pos = 0
        self.end = 0

    def _fill(self) -> bool:
        self.end = os.readv(self.fd, [self.buf])
        self.pos = 0
        return self.end > 0

    def read(self, n: int) -> bytes:
        """Exactly N bytes; b'' at a clean end of stream; ArchiveError if cut short."""
        if self.end - self.pos >= n:
            data = bytes(self.view[self.pos : self.pos + n])
            self.pos += n
            return data
        parts = [bytes(self.view[self.pos : self.end])]
        have = len(parts[0])
        while have < n:
            if not self._fill():
                if have == 0:
                    return b""
                raise ArchiveError("truncated archive: the stream ended inside a member")
            take = min(n - have, self.end)
            parts.append(bytes(self.view[:take]))
            self.pos = take
            have += take
        return b"".join(parts)

    def copy(self, fd: int, n: int, name: str) -> None:
        """Write the next N bytes to FD."""
        while n > 0:
            if self.pos >= self.end and not self._fill():
                raise ArchiveError(f"truncated archive: the stream ended inside {name!r}")
            take = min(n, self.end - self.pos)
            chunk = self.view[self.pos : self.pos + take]
            while chunk:
                written = os.write(fd, chunk)
                chunk = chunk[written:]
            self.pos += take
            n -= take

    def skip(self, n: int) -> None:
        while n > 0:
            if self.pos >= self.end and not self._fill():
                raise ArchiveError("truncated archive: the stream ended inside a member")
            take = min(n, self.end - self.pos)
            self.pos += take
            n -= take


class Extractor:
    """Extracts tar streams into ROOT, one layer after another, never writing outside it."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.same_owner = os.geteuid() == 0
        # logical directory path -> real path relative to root, known to be a directory
        self._dirs: dict[str, str] = {"": ""}
        self._layer_paths: set[str] = set()
        self._deferred_dirs: list[tuple[str, str, _Member]] = []
        self._ids: tuple[dict[str, int], dict[str, int]] | None = None
        self._unsupported: set[str] = set()
        self._euid, self._egid = os.geteuid(), os.getegid()
        # directories (real relative paths) whose setgid bit makes new files inherit a group
        self._setgid_dirs: set[str] = set()
        if os.lstat(self.root).st_mode & stat.S_ISGID:
            self._setgid_dirs.add("")

    # -- path resolution, as if root were "/" -------------------------------------------

    def _real(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def _resolve_dir(self, logical: str, member: str, *, create: bool = True) -> str:
        """The real relative path of directory LOGICAL, following symlinks inside the root."""
        real = self._dirs.get(logical)
        if real is not None:
            return real
        parent, _, name = logical.rpartition("/")
        real_parent = self._resolve_dir(parent, member, create=create)
        real = self._walk(real_parent, name, member, depth=0, create=create)
        self._dirs[logical] = real
        return real

    def _walk(self, base: str, name: str, member: str, *, depth: int, create: bool) -> str:
        """Resolve component NAME under real directory BASE to a real directory path."""
        if name == "..":
            return base.rpartition("/")[0]  # at the root, .. is the root (as in a chroot)
        if name in ("", "."):
            return base
        candidate = f"{base}/{name}" if base else name
        try:
            st = os.lstat(self._real(candidate))
        except FileNotFoundError:
            if not create:
                raise
            os.mkdir(self._real(candidate), 0o755)
            return candidate
        if stat.S_ISDIR(st.st_mode):
            if st.st_mode & stat.S_ISGID:
                self._setgid_dirs.add(candidate)
            return candidate
        if stat.S_ISLNK(st.st_mode):
            if depth >= MAX_SYMLINK_DEPTH:
                raise UnsafeMemberError(f"tar member {member!r}: too many levels of symlinks")
            target = os.readlink(self._real(candidate))
            current = "" if target.startswith("/") else base
            for part in target.split("/"):
                current = self._walk(current, part, member, depth=depth + 1, create=create)
            return current
        raise ArchiveError(f"tar member {member!r}: {candidate!r} is not a directory")

    def _place(self, name: str, member: str) -> tuple[str, str]:
        """(real relative path, absolute path) where member NAME goes; parent resolved."""
        parent, _, base = name.rpartition("/")
        real_parent = self._resolve_dir(parent, member)
        rel = f"{real_parent}/{base}" if real_parent else base
        return rel, self._real(rel)

    def _forget_dirs(self) -> None:
        """A directory was removed or replaced: the cache may point through it."""
        self._dirs = {"": ""}

    def _remove(self, path: str) -> None:
        """Remove whatever is at PATH (never following a symlink)."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)
            self._forget_dirs()
        else:
            os.unlink(path)

    # -- the archive loop ----------------------------------------------------------------

    def extract(self, fd: int, *, label: str = "") -> ExtractStats:
        """Extract one tar stream read from FD, up to its end-of-archive blocks.

        Entries of an earlier layer are replaced; OCI whiteouts delete them. Raises
        UnsafeMemberError (naming the member) for anything that would leave the root,
        ArchiveError for a corrupt or truncated archive, SpaceError when the target fills.
        """
        umask = os.umask(0)  # files are created with their final mode
        try:
            return self._extract(fd, label)
        finally:
            os.umask(umask)

    def _extract(self, fd: int, label: str) -> ExtractStats:
        reader = _Reader(fd)
        stats = ExtractStats()
        self._layer_paths = set()
        self._deferred_dirs = []
        global_pax: dict[str, bytes] = {}
        pax: dict[str, bytes] = {}
        long_name: str | None = None
        long_link: str | None = None
        while True:
            header = reader.read(BLOCK)
            if not header:
                raise ArchiveError("truncated archive: no end-of-archive marker")
            if header == ZERO_BLOCK:
                break  # end of archive (the second zero block may be missing; tar agrees)
            if not _checksum_ok(header):
                raise ArchiveError(f"corrupt tar header after {stats.members} members "
                                   "(checksum mismatch)")
            typeflag = header[156:157]
            size = _number(header[124:136], "size")
            padded = -size % BLOCK
            if typeflag in (b"x", b"g", b"L", b"K"):
                if size > 64 << 20:
                    raise ArchiveError(f"corrupt tar: {size}-byte extended header")
                data = reader.read(size + padded)[:size]
                if len(data) < size:
                    raise ArchiveError("truncated archive inside an extended header")
                if typeflag == b"x":
                    pax.update(parse_pax(data))
                elif typeflag == b"g":
                    global_pax.update(parse_pax(data))
                elif typeflag == b"L":
                    long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                else:
                    long_link = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                continue
            records = {**global_pax, **pax} if global_pax else pax
            member = self._member(header, typeflag, size, records, long_name, long_link)
            pax, long_name, long_link = {}, None, None
            stats.members += 1
            if member.size and member.type not in _REGULAR:
                reader.skip(member.size + (-member.size % BLOCK))
                continue
            try:
                self._extract_member(member, reader, stats)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise SpaceError(
                        f"the root file system is full at tar member {member.name!r} "
                        f"({label or 'layer'}); give it more room (rootsize=)") from e
                raise ArchiveError(f"tar member {member.name!r}: {e.strerror}") from e
            if member.type in _REGULAR:
                reader.skip(-member.size % BLOCK)
        self._finish_dirs()
        return stats

    def _member(self, header: bytes, typeflag: bytes, size: int, pax: dict[str, bytes],
                long_name: str | None, long_link: str | None) -> _Member:
        if long_name is not None:
            name = long_name
        else:
            name = _text(header[0:100])
            if header[345] and header[257:263] == b"ustar\0":  # POSIX ustar prefix
                name = _text(header[345:500]) + "/" + name
        if long_link is not None:
            linkname = long_link
        else:
            linkname = _text(header[157:257]) if header[157] else ""
        mtime_ns = _number(header[136:148], "mtime") * 1_000_000_000
        uid = _number(header[108:116], "uid")
        gid = _number(header[116:124], "gid")
        xattrs: dict[str, bytes] = {}
        acls: dict[str, str] = {}
        if pax:
            if any(k.startswith("GNU.sparse.") for k in pax):
                raise ArchiveError(f"tar member {name!r}: sparse files are not supported")
            if "path" in pax:
                name = pax["path"].decode("utf-8", "surrogateescape")
            if "linkpath" in pax:
                linkname = pax["linkpath"].decode("utf-8", "surrogateescape")
            if "size" in pax:
                size = int(pax["size"])
            if "uid" in pax:
                uid = int(pax["uid"])
            if "gid" in pax:
                gid = int(pax["gid"])
            if "mtime" in pax:
                mtime_ns = _pax_time_ns(pax["mtime"])
            for key, value in pax.items():
                if key.startswith("SCHILY.xattr."):
                    xattrs[key[13:]] = value
                elif key.startswith("LIBARCHIVE.xattr."):
                    xattrs[urllib.parse.unquote(key[17:])] = base64.b64decode(value + b"==")
                elif key in ("SCHILY.acl.access", "SCHILY.acl.default"):
                    acls[key[11:]] = value.decode("utf-8", "surrogateescape")
        return _Member(
            name=name,
            type=typeflag,
            mode=_number(header[100:108], "mode") & 0o7777,
            uid=uid,
            gid=gid,
            size=size,
            mtime_ns=mtime_ns,
            linkname=linkname,
            devmajor=_number(header[329:337], "devmajor") if typeflag in (b"3", b"4") else 0,
            devminor=_number(header[337:345], "devminor") if typeflag in (b"3", b"4") else 0,
            xattrs=xattrs,
            acls=acls,
        )

    def _extract_member(self, m: _Member, reader: _Reader, stats: ExtractStats) -> None:
        name = normalize_name(m.name)
        kind = m.type
        if not name:
            if kind == b"5":  # "./": the root directory itself
                self._deferred_dirs.append(("", self.root, m))
                self._set_owner_xattrs(self.root, m, follow=True)
                return
            raise UnsafeMemberError(f"refusing tar member {m.name!r}: it names the root")
        parent, _, base = name.rpartition("/")
        if base.startswith(WHITEOUT):
            self._whiteout(parent, base, m.name)
            stats.whiteouts += 1
            return
        rel, path = self._place(name, m.name)
        self._layer_paths.add(rel)
        if kind in _REGULAR:
            self._write_file(rel, path, m, reader)
            stats.files += 1
            stats.bytes += m.size
        elif kind == b"5":
            self._make_dir(name, rel, path, m)
        elif kind == b"2":
            self._replace(path, lambda: os.symlink(m.linkname, path))
            self._set_owner_xattrs(path, m, follow=False)
            os.utime(path, ns=(m.mtime_ns, m.mtime_ns), follow_symlinks=False)
        elif kind == b"1":
            target = normalize_name(m.linkname)
            if not target:
                raise UnsafeMemberError(f"refusing hard link {m.name!r} to the root directory")
            _, source = self._place(target, m.name)
            if os.path.isdir(source) and not os.path.islink(source):
                raise UnsafeMemberError(f"refusing hard link {m.name!r} to directory {target!r}")
            self._replace(path, lambda: os.link(source, path, follow_symlinks=False))
        elif kind in (b"3", b"4", b"6"):
            fmt = {b"3": stat.S_IFCHR, b"4": stat.S_IFBLK, b"6": stat.S_IFIFO}[kind]
            dev = os.makedev(m.devmajor, m.devminor)
            self._replace(path, lambda: os.mknod(path, fmt | 0o600, dev))
            self._set_owner_xattrs(path, m, follow=False)
            os.chmod(path, m.mode)
            os.utime(path, ns=(m.mtime_ns, m.mtime_ns))
        elif kind == b"V":
            return
        else:
            raise ArchiveError(f"tar member {m.name!r}: unsupported type {kind!r}")

    def _replace(self, path: str, create: Callable[[], None]) -> None:
        """Run CREATE(); if something is in the way, remove it first (as tar does)."""
        try:
            create()
        except FileExistsError:
            self._remove(path)
            create()

    def _write_file(self, rel: str, path: str, m: _Member, reader: _Reader) -> None:
        # Created with its final mode (the umask is 0 while extracting): most files of a
        # root belong to root, so neither fchown nor fchmod is needed - the hot path.
        try:
            fd = os.open(path, _O_CREATE, m.mode)
        except FileExistsError:
            self._remove(path)
            fd = os.open(path, _O_CREATE, m.mode)
        try:
            if m.size:
                reader.copy(fd, m.size, m.name)
            if self.same_owner and (m.uid != self._euid or m.gid != self._egid
                                    or rel.rpartition("/")[0] in self._setgid_dirs):
                os.fchown(fd, m.uid, m.gid)
                if m.mode & 0o6000:
                    os.fchmod(fd, m.mode)  # chown cleared the setuid and setgid bits
            if m.xattrs or m.acls:
                self._set_xattrs(fd, m, follow=True)  # after chown and data: both clear caps
            os.utime(fd, ns=(m.mtime_ns, m.mtime_ns))
        finally:
            os.close(fd)

    def _make_dir(self, name: str, rel: str, path: str, m: _Member) -> None:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                # keep a symlink to a directory (merged /usr: bin -> usr/bin), as
                # tar --keep-directory-symlink does, if it resolves inside the root
                try:
                    self._resolve_dir(name, m.name, create=False)
                    return
                except (FileNotFoundError, ArchiveError):
                    pass
            if not stat.S_ISDIR(st.st_mode):
                self._remove(path)
                os.mkdir(path, 0o700)
            elif st.st_mode & stat.S_ISGID:
                self._setgid_dirs.add(rel)
        self._dirs[name] = rel
        self._set_owner_xattrs(path, m, follow=False)
        self._deferred_dirs.append((rel, path, m))

    def _finish_dirs(self) -> None:
        """Directory modes and mtimes last, deepest first: writing children changes them."""
        for rel, path, m in reversed(self._deferred_dirs):
            os.chmod(path, m.mode)
            os.utime(path, ns=(m.mtime_ns, m.mtime_ns))
            if m.mode & stat.S_ISGID:
                self._setgid_dirs.add(rel)
            else:
                self._setgid_dirs.discard(rel)
        self._deferred_dirs = []

    def _set_owner_xattrs(self, target: int | str, m: _Member, *, follow: bool) -> None:
        if self.same_owner:
            os.chown(target, m.uid, m.gid, follow_symlinks=follow)
        self._set_xattrs(target, m, follow=follow)

    def _set_xattrs(self, target: int | str, m: _Member, *, follow: bool) -> None:
        for key, value in m.xattrs.items():
            self._set_xattr(target, key, value, follow=follow)
        for kind, text in m.acls.items():
            key = f"system.posix_acl_{kind}"
            if key not in m.xattrs and text.strip():
                if self._ids is None:
                    self._ids = (_read_id_table(self._real("etc/passwd")),
                                 _read_id_table(self._real("etc/group")))
                users, groups = self._ids
                value = acl_text_to_xattr(text, users=users, groups=groups)
                self._set_xattr(target, key, value, follow=follow)

    def _set_xattr(self, target: int | str, key: str, value: bytes, *, follow: bool) -> None:
        """Set one xattr; one the file system does not take is skipped with a warning.

        Debian 12's tmpfs (kernel 6.1) refuses user.* xattrs; tmpfs takes them from 6.6 on.
        """
        try:
            os.setxattr(target, key, value, follow_symlinks=follow)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
            namespace = key.split(".", 1)[0]
            if namespace not in self._unsupported:
                self._unsupported.add(namespace)
                log.warning("%s does not take %s.* xattrs (first: %s): skipping them",
                            self.root, namespace, key)

    def _whiteout(self, parent: str, base: str, member: str) -> None:
        """OCI whiteouts delete what earlier layers wrote (not this layer's own entries)."""
        try:
            real_parent = self._resolve_dir(parent, member, create=False)
        except FileNotFoundError:
            return
        if base == OPAQUE:
            directory = self._real(real_parent)
            for entry in os.listdir(directory):
                rel = f"{real_parent}/{entry}" if real_parent else entry
                if rel not in self._layer_paths:
                    self._remove(f"{directory}/{entry}")
            return
        victim = base[len(WHITEOUT) :]
        if victim in ("", ".", ".."):
            raise UnsafeMemberError(f"refusing whiteout {member!r}")
        rel = f"{real_parent}/{victim}" if real_parent else victim
        if rel not in self._layer_paths:
            self._remove(self._real(rel))


def _pax_time_ns(value: bytes) -> int:
    text = value.decode("ascii")
    whole, _, frac = text.partition(".")
    sign = -1 if whole.startswith("-") else 1
    ns = abs(int(whole or "0")) * 1_000_000_000 + int((frac + "000000000")[:9] or "0")
    return sign * ns


def empty_directory(path: str) -> None:
    """Remove everything inside PATH, keeping PATH itself (the tmpfs mount point)."""
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
