"""The build machine's identity, taken out of a root before it becomes an image.

debootstrap (and any chroot built on a host) leaves the host's /etc/hostname and
/etc/resolv.conf in the tree, and a machine-id made once at build time: every node
booted from the image would share them. `image build` therefore empties /etc/machine-id
(machine-id(5): an empty file is how an image asks for one at boot) and removes
/var/lib/dbus/machine-id, /etc/hostname, /etc/resolv.conf, the SSH host keys and
/var/lib/systemd/random-seed; apt's package lists and caches are left out too (tens of
MB of RAM on every node, stale the day after). A symlink carries no identity and stays.

A tree of our own (debootstrap's scratch root) is scrubbed in place. A tree the user
passed with --from is never changed: an overlay mount (the tree as its lower layer, a
small tmpfs as the upper one) shows the scrubbed view the image is made from. Directory
times are kept as they were, so scrubbing changes only the files it names.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..boot.errors import TmpfsbootError
from ..boot.log import format_bytes
from ..boot.run import run

log = logging.getLogger("tmpfsboot")

EMPTIED = ("etc/machine-id",)
REMOVED = ("etc/hostname", "etc/resolv.conf", "var/lib/dbus/machine-id",
           "var/lib/systemd/random-seed")
REMOVED_GLOBS = (("etc/ssh", "ssh_host_*"),)
# apt's lists (named SITE_PATH_dists_..., so `lock` and `partial/` stay) and caches.
LEFT_OUT_GLOBS = (("var/lib/apt/lists", "*_*"), ("var/lib/apt/lists/partial", "*"),
                  ("var/cache/apt", "*.bin"), ("var/cache/apt/archives", "*.deb"),
                  ("var/cache/apt/archives/partial", "*"))
# The overlay's upper layer holds only copied-up directories and the emptied machine-id.
UPPER_SIZE = "64m"


@dataclass(frozen=True)
class Scrub:
    """What a tree holds of the build machine: paths (relative to the root) to empty, to
    remove, and of apt's lists and caches to leave out; with the bytes those take."""

    emptied: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    left_out: tuple[str, ...] = ()
    left_out_bytes: int = 0

    def __bool__(self) -> bool:
        return bool(self.emptied or self.removed or self.left_out)

    def to_json(self) -> dict[str, object]:
        """The manifest's record of it: absolute paths as on a node."""
        return {
            "emptied": ["/" + p for p in self.emptied],
            "removed": ["/" + p for p in self.removed],
            "left_out": ["/" + p for p in self.left_out],
        }

    def describe(self) -> str:
        """One line for the console."""
        parts = []
        if self.emptied:
            parts.append("emptied " + ", ".join("/" + p for p in self.emptied))
        if self.removed:
            parts.append("removed " + ", ".join("/" + p for p in self.removed))
        if self.left_out:
            parts.append(f"left out {len(self.left_out)} files of apt's lists and caches "
                         f"({format_bytes(self.left_out_bytes)})")
        return "; ".join(parts) or "nothing to remove"


def real_directory(root: Path, rel: str) -> Path | None:
    """ROOT/REL if every component of it is a real directory inside ROOT (no symlink
    followed: an absolute link in a root points at the build machine's own files)."""
    path = root
    for part in Path(rel).parts:
        path = path / part
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                return None
        except OSError:
            return None
    return path


def _regular(root: Path, rel: str) -> os.stat_result | None:
    parent = real_directory(root, os.path.dirname(rel))
    if parent is None:
        return None
    try:
        st = os.lstat(parent / os.path.basename(rel))
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def _matching(root: Path, globs: tuple[tuple[str, str], ...]) -> list[tuple[str, int]]:
    found = []
    for directory, pattern in globs:
        parent = real_directory(root, directory)
        if parent is None:
            continue
        for name in sorted(os.listdir(parent)):
            rel = f"{directory}/{name}"
            if fnmatch.fnmatchcase(name, pattern) and (st := _regular(root, rel)):
                found.append((rel, st.st_size))
    return found


def find_scrub(root: Path) -> Scrub:
    """What ROOT holds of the build machine (regular files only)."""
    emptied = tuple(p for p in EMPTIED if (st := _regular(root, p)) and st.st_size > 0)
    removed = tuple(p for p in REMOVED if _regular(root, p))
    removed += tuple(p for p, _ in _matching(root, REMOVED_GLOBS))
    left_out = _matching(root, LEFT_OUT_GLOBS)
    return Scrub(emptied=emptied, removed=removed, left_out=tuple(p for p, _ in left_out),
                 left_out_bytes=sum(size for _, size in left_out))


def apply_scrub(root: Path, scrub: Scrub, *, times_from: Path) -> None:
    """Empty and remove SCRUB's files under ROOT, then give every directory on their way
    (and the emptied files) the times they have under TIMES_FROM."""
    touched = [*scrub.emptied, *scrub.removed, *scrub.left_out]
    dirs = {"."}
    for rel in touched:
        parent = Path(rel).parent
        dirs.update(str(p) for p in [parent, *parent.parents])
    keep = {rel: os.lstat(times_from / rel) for rel in [*dirs, *scrub.emptied]}
    for rel in scrub.emptied:
        with open(root / rel, "r+b") as f:
            f.truncate(0)
    for rel in [*scrub.removed, *scrub.left_out]:
        os.unlink(root / rel)
    for rel, st in keep.items():
        os.utime(root / rel, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _escape_option(path: Path) -> str:
    """PATH for an overlay mount option: `\\`, `,` and `:` escaped."""
    text = str(path)
    for ch in ("\\", ",", ":"):
        text = text.replace(ch, "\\" + ch)
    return text


def _copy_root_metadata(src: Path, dest: Path) -> None:
    """Give DEST the owner, mode and xattrs of SRC (an overlay's root is its upper dir)."""
    st = os.lstat(src)
    os.chown(dest, st.st_uid, st.st_gid)
    os.chmod(dest, stat.S_IMODE(st.st_mode))
    for name in os.listxattr(src, follow_symlinks=False):
        try:
            os.setxattr(dest, name, os.getxattr(src, name, follow_symlinks=False))
        except OSError as e:
            raise TmpfsbootError(f"{src}: cannot keep its xattr {name}: {e.strerror}") from e


@contextlib.contextmanager
def overlay_view(src: Path) -> Iterator[Path]:
    """SRC seen through an overlay mount whose changes land in a private tmpfs: what is
    done to the view never reaches SRC. Unmounted and removed afterwards."""
    scratch = Path(tempfile.mkdtemp(prefix="tmpfsboot-scrub."))
    try:
        run(["mount", "-t", "tmpfs", "-o", f"size={UPPER_SIZE},mode=0700", "tmpfs",
             str(scratch)])
        try:
            upper, work, view = scratch / "upper", scratch / "work", scratch / "view"
            for d in (upper, work, view):
                d.mkdir()
            _copy_root_metadata(src, upper)
            options = (f"lowerdir={_escape_option(src)},upperdir={_escape_option(upper)},"
                       f"workdir={_escape_option(work)}")
            run(["mount", "-t", "overlay", "-o", options, "overlay", str(view)])
            try:
                yield view
            finally:
                run(["umount", str(view)])
        finally:
            run(["umount", str(scratch)])
    finally:
        scratch.rmdir()


@contextlib.contextmanager
def scrubbed_tree(src: Path, *, in_place: bool) -> Iterator[tuple[Path, Scrub]]:
    """(the tree to build the image from, what was scrubbed from it). IN_PLACE changes
    SRC itself (a tree of our own); otherwise an overlay view leaves SRC untouched."""
    src = src.resolve()
    scrub = find_scrub(src)
    log.info("Build machine's identity in %s: %s", src, scrub.describe())
    if not scrub:
        yield src, scrub
    elif in_place:
        apply_scrub(src, scrub, times_from=src)
        yield src, scrub
    else:
        with overlay_view(src) as view:
            apply_scrub(view, scrub, times_from=src)
            yield view, scrub
