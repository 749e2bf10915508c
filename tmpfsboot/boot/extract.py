"""A lean, safe tar extractor: ustar, pax and GNU headers, streamed from a pipe.

Why not tarfile or GNU tar: Python 3.11.2's tarfile is about twice as slow here (its
header parsing and buffer copies dominate) and restores no xattrs; GNU tar writes through
a symlink that an earlier layer left behind. This extractor resolves every path as if
the target directory were `/` (as it will be after switch_root), so an absolute symlink
points inside the root and no member, of this layer or a later one, can write outside it.

It assumes it is the only writer in the target while it runs (true in the initramfs).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass

from .errors import ArchiveError, SpaceError, UnsafeMemberError
from .filewrite import POOL_FILE_MAX, WriteFailed, WritePool, finish_file, write_all
from .tarfields import read_sparse_map
from .tarheader import (
    BLOCKDEV,
    CHAR,
    DIRECTORY,
    FIFO,
    HARDLINK,
    REGULAR,
    SYMLINK,
    FastRun,
    HeaderParser,
    Member,
)
from .tarstream import Reader
from .xattrs import XattrSetter

MAX_SYMLINK_DEPTH = 40

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"

_O_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DEVICE_FORMAT = {CHAR: stat.S_IFCHR, BLOCKDEV: stat.S_IFBLK, FIFO: stat.S_IFIFO}
_NEW_ENTRY_KINDS = frozenset((REGULAR, DIRECTORY, SYMLINK, CHAR, BLOCKDEV, FIFO))


@dataclass
class ExtractStats:
    """What one layer's extraction did."""

    members: int = 0
    files: int = 0
    bytes: int = 0
    whiteouts: int = 0
    writers: int = 0  # worker processes that wrote small files beside the extractor


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


class Extractor:
    """Extracts tar streams into ROOT, one layer after another, never writing outside it."""

    def __init__(self, root: str, *, writers: int | None = None, busy_cpus: int = 1) -> None:
        """WRITERS: processes writing small files beside the parsing one (0: none); by
        default one per CPU beyond BUSY_CPUS, the CPUs the extraction's pipeline keeps
        busy without them (the parser; and the decompressor, when there is one)."""
        self.root = os.path.abspath(root)
        self.writers, self.busy_cpus = writers, busy_cpus
        self.same_owner = os.geteuid() == 0
        # logical directory path -> real path relative to root, known to be a directory
        self._dirs: dict[str, str] = {"": ""}
        self._layer_paths: set[str] = set()
        self._deferred_dirs: list[tuple[str, str, Member]] = []
        self._xattrs = XattrSetter(lambda rel: self._real(rel))
        self._euid, self._egid = os.geteuid(), os.getegid()
        self._root_fd = -1  # open while a layer is extracted: files are created under it
        self._pool: WritePool | None = None  # workers writing files, while a layer is
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
            self._layer_paths.add(candidate)  # made by this layer, as its members are
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
        self._dirs.clear()
        self._dirs[""] = ""

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
        self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return self._extract(fd, label)
        finally:
            os.close(self._root_fd)
            self._root_fd = -1
            os.umask(umask)

    def _extract(self, fd: int, label: str) -> ExtractStats:
        reader = Reader.from_fd(fd)
        parser = HeaderParser(reader)
        stats = ExtractStats()
        self._layer_paths = set()
        self._deferred_dirs = []
        # Workers only where this layer is the first thing in the root: then every path
        # that exists is one this layer made, and the layer's path set says which.
        self._pool = (WritePool.sized(self.writers, self._root_fd, _O_CREATE,
                                      busy=self.busy_cpus)
                      if not os.listdir(self._root_fd) else None)
        stats.writers = self._pool.size if self._pool is not None else 0
        ok = False
        try:
            self._members(parser, reader, stats, label)
            ok = True
        finally:
            if self._pool is not None:
                self._pool.close(ok=ok)
                self._pool = None
        self._finish_dirs()
        stats.members = parser.count
        return stats

    def _members(self, parser: HeaderParser, reader: Reader, stats: ExtractStats,
                 label: str) -> None:
        """Every member up to the end-of-archive block: the parser's fast runs (most of
        a root) through `_fast_files`, the rest one by one."""
        fast_run, name = parser.fast_run, ""
        try:
            while True:
                if run := fast_run():
                    self._fast_files(run, reader, stats, label)
                elif (m := parser.next_general()) is None:
                    break
                else:
                    name = m.name
                    self._general_member(m, reader, stats)
            if self._pool is not None:
                self._pool.sync()
        except WriteFailed as e:
            raise _member_error(e.error, e.name, label) from e.error
        except OSError as e:
            raise _member_error(e, name, label) from e

    def _fast_files(self, run: list[FastRun], reader: Reader, stats: ExtractStats,
                    label: str) -> None:
        """The plain files of RUN, written from the reader's buffer where they lie; the
        rest of its members, and files in odd places, through `_general_member`. Each step
        here is paid for each file of a root."""
        dirs, layer_paths, setgid_dirs = self._dirs, self._layer_paths, self._setgid_dirs
        pool, root_fd, buf, view = self._pool, self._root_fd, reader.buf, reader.view
        same_owner, euid, egid = self.same_owner, self._euid, self._egid
        create, write, utime, close, flags = os.open, os.write, os.utime, os.close, _O_CREATE
        files = nbytes = 0
        name = ""
        try:
            for name, kind, mode, uid, gid, size, mtime_ns, at in run:
                parent, _, base = name.rpartition("/")
                real_parent = dirs.get(parent)
                # (a whiteout's name has a "/." or starts with ".": it goes the general way)
                if (kind != REGULAR or real_parent is None or name.startswith(("/", "."))
                        or "//" in name or "/." in name):
                    data = Reader.over(buf[at : at + size + (-size % 512)])
                    self._general_member(Member(name, kind, mode, uid, gid, size, mtime_ns),
                                         data, stats)
                    continue
                rel = name if real_parent == parent else f"{real_parent}/{base}"
                files += 1
                nbytes += size
                chown = same_owner and (uid != euid or gid != egid or real_parent in setgid_dirs)
                if pool is not None:
                    if rel in layer_paths:
                        pool.sync()  # the same path again: the first one may be in flight
                    elif size <= POOL_FILE_MAX:
                        layer_paths.add(rel)
                        pool.submit(rel, view[at : at + size], name, chown, uid, gid, mode,
                                    mtime_ns)
                        continue
                layer_paths.add(rel)
                try:
                    fd = create(rel, flags, mode, dir_fd=root_fd)
                except FileExistsError:
                    fd = self._create(rel, mode)
                try:
                    if size and (done := write(fd, view[at : at + size])) < size:
                        write_all(fd, view[at + done : at + size])
                    if chown:
                        finish_file(fd, chown, uid, gid, mode, mtime_ns)
                    else:
                        utime(fd, ns=(mtime_ns, mtime_ns))
                finally:
                    close(fd)
            if pool is not None:
                pool.flush()  # its views of the buffer, before the buffer is read into again
        except OSError as e:
            raise _member_error(e, name, label) from e
        finally:
            stats.files += files
            stats.bytes += nbytes

    def _general_member(self, m: Member, reader: Reader, stats: ExtractStats) -> None:
        if self._pool is not None and self._may_meet_pool(m):
            self._pool.sync()
        if m.sparse_map_in_data:
            read_sparse_map(reader.read, m)
        if m.kind != REGULAR and m.size:  # data no file takes (dumpdirs, labels)
            reader.skip(m.size + (-m.size % 512))
        self._extract_member(m, reader, stats)

    def _may_meet_pool(self, m: Member) -> bool:
        """Could member M touch a path a worker still holds? Only a new entry in a known
        directory cannot (conservative: anything unusual says yes)."""
        if m.kind not in _NEW_ENTRY_KINDS:
            return True  # a hard link's source may be in flight; the rest is rare
        name = normalize_name(m.name)
        parent, _, base = name.rpartition("/")
        real_parent = self._dirs.get(parent)
        if not name or real_parent is None or base.startswith(WHITEOUT):
            return True  # resolving a new directory walks paths that may be in flight
        return (f"{real_parent}/{base}" if real_parent else base) in self._layer_paths

    def _extract_member(self, m: Member, reader: Reader, stats: ExtractStats) -> None:
        name = normalize_name(m.name)
        kind = m.kind
        if not name:
            if kind == DIRECTORY:  # "./": the root directory itself
                self._deferred_dirs.append(("", self.root, m))
                self._set_owner_xattrs(self.root, m, follow=True)
                return
            raise UnsafeMemberError(f"refusing tar member {m.name!r}: it names the root")
        parent, _, base = name.rpartition("/")
        if base.startswith(WHITEOUT):
            if m.size:
                reader.skip(m.size + (-m.size % 512))
            self._whiteout(parent, base, m.name)
            stats.whiteouts += 1
            return
        real_parent = self._dirs.get(parent)
        if real_parent is None:
            real_parent = self._resolve_dir(parent, m.name)
        rel = f"{real_parent}/{base}" if real_parent else base
        self._layer_paths.add(rel)
        if kind == REGULAR:  # the hot path: opened relative to the root, no path built
            self._write_file(rel, real_parent, m, reader)
            stats.files += 1
            stats.bytes += m.size
            return
        path = self._real(rel)
        if kind == DIRECTORY:
            self._make_dir(name, rel, path, m)
        elif kind == SYMLINK:
            self._replace(path, lambda: os.symlink(m.linkname, path))
            self._set_owner_xattrs(path, m, follow=False)
            os.utime(path, ns=(m.mtime_ns, m.mtime_ns), follow_symlinks=False)
        elif kind == HARDLINK:
            target = normalize_name(m.linkname)
            if not target:
                raise UnsafeMemberError(f"refusing hard link {m.name!r} to the root directory")
            _, source = self._place(target, m.name)
            if os.path.isdir(source) and not os.path.islink(source):
                raise UnsafeMemberError(f"refusing hard link {m.name!r} to directory {target!r}")
            self._replace(path, lambda: os.link(source, path, follow_symlinks=False))
        elif kind in _DEVICE_FORMAT:
            fmt = _DEVICE_FORMAT[kind]
            dev = os.makedev(m.devmajor, m.devminor)
            self._replace(path, lambda: os.mknod(path, fmt | 0o600, dev))
            self._set_owner_xattrs(path, m, follow=False)
            os.chmod(path, m.mode)
            os.utime(path, ns=(m.mtime_ns, m.mtime_ns))
        # anything else (volume labels, multi-volume continuations) has nothing to extract

    def _replace(self, path: str, create: Callable[[], None]) -> None:
        """Run CREATE(); if something is in the way, remove it first (as tar does)."""
        try:
            create()
        except FileExistsError:
            self._remove(path)
            create()

    def _create(self, rel: str, mode: int) -> int:
        """A new file at REL with MODE (the umask is 0 while extracting), replacing what
        is there; most files of a root belong to root, so neither fchown nor fchmod is
        needed - the hot path."""
        try:
            return os.open(rel, _O_CREATE, mode, dir_fd=self._root_fd)
        except FileExistsError:
            self._remove(self._real(rel))
            return os.open(rel, _O_CREATE, mode, dir_fd=self._root_fd)

    def _write_file(self, rel: str, real_parent: str, m: Member, reader: Reader) -> None:
        fd = self._create(rel, m.mode)
        try:
            if m.sparse is not None:
                self._write_sparse(fd, m, reader)
                reader.skip(-m.size % 512)
            elif m.size:
                reader.copy(fd, m.size, m.name, pad=-m.size % 512)
            chown = self.same_owner and (m.uid != self._euid or m.gid != self._egid
                                         or real_parent in self._setgid_dirs)
            finish_file(fd, chown, m.uid, m.gid, m.mode, m.mtime_ns)
            if m.xattrs or m.acls:
                self._xattrs.set(fd, m, follow=True)  # after chown and data: both clear caps
        finally:
            os.close(fd)

    @staticmethod
    def _write_sparse(fd: int, m: Member, reader: Reader) -> None:
        """The pieces at their offsets; the holes between them stay holes."""
        assert m.sparse is not None
        left = m.size
        for offset, length in m.sparse:
            if length > left:
                raise ArchiveError(f"tar member {m.name!r}: sparse map needs {length} bytes "
                                   f"but only {left} are stored")
            if length:
                os.lseek(fd, offset, os.SEEK_SET)
                reader.copy(fd, length, m.name)
                left -= length
        if left:
            reader.skip(left)  # stored bytes no map entry claims (GNU tar skips them too)
        os.ftruncate(fd, m.realsize)

    def _make_dir(self, name: str, rel: str, path: str, m: Member) -> None:
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

    def _set_owner_xattrs(self, target: int | str, m: Member, *, follow: bool) -> None:
        if self.same_owner:
            os.chown(target, m.uid, m.gid, follow_symlinks=follow)
        self._xattrs.set(target, m, follow=follow)

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


def _member_error(e: OSError, name: str, label: str) -> Exception:
    """What an OSError at member NAME means: a full root, or a member that cannot be."""
    if e.errno == errno.ENOSPC:
        return SpaceError(f"the root file system is full at tar member {name!r} "
                          f"({label or 'layer'}); give it more room (rootsize=)")
    return ArchiveError(f"tar member {name!r}: {e.strerror or e}")
