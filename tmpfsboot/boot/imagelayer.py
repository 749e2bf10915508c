"""Image layers: squashfs and erofs files kept in RAM, stacked under an overlay.

An image layer is downloaded whole into a file on the root's tmpfs (hashed as it arrives,
with the resume, mirrors and retries of every download), verified against SHA256SUMS
before the kernel parses a byte of it, then attached read-only to a loop device and
mounted. The image layers are overlayfs' lower layers in root= order; the tmpfs holds the
upper layer, so tar layers after them are extracted through the overlay (their files land
in the upper layer, and unlinking a lower file there leaves overlayfs' own whiteout).

At boot the tmpfs mounted on the root mount point moves to a directory under /run
(``layers/``: ``images/`` the files, ``lower/N`` their mounts, ``upper/``, ``work/``), and
the overlay takes its place; initramfs-tools and systemd move /run into the new root, so
the images stay mounted and visible after switch_root. On a host (``tmpfsboot fetch``)
image layers are only verified and stored as files in the target directory.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import hashlib
import logging
import os
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from .contract import TAR_SUFFIXES
from .errors import (
    ArchiveError,
    PermanentHTTPError,
    SpaceError,
    TmpfsbootError,
    TransientFetchError,
    UsageError,
    VerificationError,
)
from .fetch import Download, DownloadResult, RetryBudget, image_name, open_url
from .log import EventLog, format_bytes, phase
from .run import run

log = logging.getLogger("tmpfsboot")

# A layer whose name ends in one of TAR_SUFFIXES is not probed before the download (its
# own stream's magic bytes decide, as ever). Any other name is probed: its first HEAD_SIZE
# bytes, by a Range request, tell whether it is an image.
HEAD_SIZE = 4096

_SQUASHFS_MAGIC = b"hsqs"
_EROFS_MAGIC = (0xE0F5E1E2).to_bytes(4, "little")
_EROFS_MAGIC_OFFSET = 1024

# linux/loop.h
_LOOP_CONFIGURE = 0x4C0A
_LOOP_CTL_GET_FREE = 0x4C82
_LO_FLAGS_READ_ONLY = 1
_LO_FLAGS_AUTOCLEAR = 4
_LO_NAME_SIZE = 64


class LayerKind(enum.Enum):
    """What a layer is, by its magic bytes: a tar stream, or a file-system image."""

    TAR = "tar"
    SQUASHFS = "squashfs"
    EROFS = "erofs"

    @classmethod
    def from_magic(cls, head: bytes) -> LayerKind:
        """SQUASHFS or EROFS when HEAD starts an image of theirs, else TAR (whose own
        magic check, gzip, zstd, ..., comes when the stream is read)."""
        if head.startswith(_SQUASHFS_MAGIC):
            return cls.SQUASHFS
        if head[_EROFS_MAGIC_OFFSET:_EROFS_MAGIC_OFFSET + 4] == _EROFS_MAGIC:
            return cls.EROFS
        return cls.TAR

    @property
    def is_image(self) -> bool:
        """Whether layers of this kind are mounted rather than extracted."""
        return self is not LayerKind.TAR

    @property
    def article(self) -> str:
        """The kind with its indefinite article, for messages."""
        return f"an {self.value}" if self is LayerKind.EROFS else f"a {self.value}"


# Every kernel module an image layer may need, for the initramfs hook.
MODULES = ("loop", "squashfs", "erofs", "overlay")


def is_tar_name(name: str) -> bool:
    """Whether a layer's file name ends like a tarball's."""
    return name.endswith(TAR_SUFFIXES)


def probe_layer(urls: Sequence[str], *, budget: RetryBudget,
                timeout: float) -> tuple[LayerKind, int | None]:
    """A layer's kind from its first HEAD_SIZE bytes (a Range request), and its size.

    The bytes are not verified: they only decide the order check and the preflight; the
    kind of an image is checked again on its verified bytes before it is mounted.
    Mirrors and retries as for a download.
    """
    dead: dict[str, str] = {}
    index = 0
    while True:
        url = urls[index]
        try:
            conn, resp, final = open_url(url, timeout=timeout,
                                         headers={"Range": f"bytes=0-{HEAD_SIZE - 1}"})
            try:
                head = resp.read(HEAD_SIZE)
            except OSError as e:
                raise TransientFetchError(f"{final}: {e}") from e
            finally:
                conn.close()
            return LayerKind.from_magic(head), _total_size(resp.status,
                                                           resp.getheader("Content-Range"),
                                                           resp.getheader("Content-Length"))
        except PermanentHTTPError as e:
            dead[url] = str(e)
            alive = [i for i, u in enumerate(urls) if u not in dead]
            if not alive:
                raise PermanentHTTPError("; ".join(dead.values())) from None
            index = alive[0]
        except TransientFetchError as e:
            budget.fail(e, retry_after=e.retry_after)
            index = (index + 1) % len(urls)
            while urls[index] in dead:
                index = (index + 1) % len(urls)


def _total_size(status: int, content_range: str | None, length: str | None) -> int | None:
    if status == 206:
        total = (content_range or "").rpartition("/")[2]
        return int(total) if total.isdigit() else None
    return int(length) if length and length.isdigit() else None


def check_order(kinds: Sequence[LayerKind], urls: Sequence[Sequence[str]]) -> None:
    """UsageError when an image layer follows a tar layer: overlayfs cannot put a lower
    layer above what was extracted into the upper one."""
    first_tar = next((i for i, k in enumerate(kinds) if not k.is_image), None)
    if first_tar is None:
        return
    for i in range(first_tar + 1, len(kinds)):
        if kinds[i].is_image:
            raise UsageError(
                f"layer {i + 1} ({urls[i][0]}) is {kinds[i].article} image after tar layer "
                f"{first_tar + 1}: image layers must come first in root=")


def probe_kinds(urls: Sequence[Sequence[str]], *, budget: RetryBudget,
                timeout: float) -> list[tuple[LayerKind, int | None]]:
    """Each layer's kind and size by its first bytes (a tarball's name spares it the
    request); an image layer after a tar layer is refused before any layer is downloaded."""
    found = [
        (LayerKind.TAR, None) if is_tar_name(image_name(u[0]))
        else probe_layer(u, budget=budget, timeout=timeout)
        for u in urls
    ]
    check_order([kind for kind, _ in found], urls)
    return found


def download_image(urls: Sequence[str], path: str, *, sha256: str | None,
                   budget: RetryBudget, timeout: float,
                   label: str) -> tuple[DownloadResult, LayerKind]:
    """Stream an image into the file PATH, hashing it; verify it, then read its kind.

    Raises VerificationError (a RestartRoot) on a hash mismatch, ArchiveError when the
    verified bytes are no squashfs or erofs image, SpaceError when PATH's file system fills.
    """
    hasher = hashlib.sha256()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o400)

    def sink(chunk: memoryview) -> None:
        hasher.update(chunk)
        view = chunk
        try:
            while view:
                view = view[os.write(fd, view):]
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise SpaceError(f"the root file system is full storing the image of {label} "
                                 "in RAM; give it more room (rootsize=)") from e
            raise

    try:
        result = Download(list(urls), budget=budget, timeout=timeout, label=label).run(sink)
    finally:
        os.close(fd)
    actual = hasher.hexdigest()
    if sha256 is not None and actual != sha256:
        raise VerificationError(f"{result.url}: SHA-256 mismatch: expected {sha256}, "
                                f"got {actual}")
    with open(path, "rb") as f:
        kind = LayerKind.from_magic(f.read(HEAD_SIZE))
    if not kind.is_image:
        raise ArchiveError(f"{result.url}: not a squashfs or erofs image (its first bytes "
                           "said so when probed); image layers come first in root=")
    return result, kind


def _loop_config(fd: int, name: str) -> bytes:
    """struct loop_config: the backing fd, block size 0, loop_info64, reserved."""
    info = struct.pack("=5Q4I", 0, 0, 0, 0, 0, 0, 0, 0,
                       _LO_FLAGS_READ_ONLY | _LO_FLAGS_AUTOCLEAR)
    info += os.fsencode(name)[: _LO_NAME_SIZE - 1].ljust(_LO_NAME_SIZE, b"\0")
    info += bytes(_LO_NAME_SIZE + 32 + 16)  # crypt name, key, init
    return struct.pack("=II", fd, 0) + info + bytes(64)


def attach_loop(path: str, *, tries: int = 20) -> tuple[str, int]:
    """A free loop device backed read-only by PATH, and an open fd holding it.

    The device detaches itself (autoclear) when the last holder lets go: the fd before a
    mount, else the unmount. Retries when another process takes the same free device.
    """
    if not os.path.exists("/dev/loop-control"):
        run(["modprobe", "-q", "loop"], check=False)
    ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    backing = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for _ in range(tries):
            number = fcntl.ioctl(ctl, _LOOP_CTL_GET_FREE)
            device = f"/dev/loop{number}"
            dev = _open_device(device)
            try:
                fcntl.ioctl(dev, _LOOP_CONFIGURE, _loop_config(backing, path))
            except OSError as e:
                os.close(dev)
                if e.errno == errno.EBUSY:
                    continue  # taken between GET_FREE and CONFIGURE
                raise TmpfsbootError(f"{device}: cannot attach {path}: {e.strerror}") from e
            return device, dev
        raise TmpfsbootError(f"no free loop device for {path}")
    finally:
        os.close(backing)
        os.close(ctl)


def _open_device(device: str) -> int:
    """Open a block device node devtmpfs may create a moment after it is asked for."""
    for _ in range(50):
        try:
            return os.open(device, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            time.sleep(0.02)
    return os.open(device, os.O_RDONLY | os.O_CLOEXEC)


def mount_image(path: str, kind: LayerKind, mountpoint: str) -> str:
    """Mount the verified image file PATH read-only on MOUNTPOINT; returns the loop device."""
    device, held = attach_loop(path)
    try:
        run(["mount", "-t", kind.value, "-o", "ro", device, mountpoint])
    finally:
        os.close(held)  # the mount holds the device now; autoclear at the unmount
    return device


@dataclass
class ImageStack:
    """The image layers of one attempt at a root, and how to undo them.

    With MOUNTS (a directory) images are mounted and stacked under an overlay on TARGET;
    without, they are stored as files in TARGET (a host's `tmpfsboot fetch`).
    """

    target: str
    mounts: str | None = None
    layers: list[tuple[int, str, LayerKind]] = field(default_factory=list)
    moved: bool = False
    overlay: bool = False
    mounted: list[str] = field(default_factory=list)

    def _prepare(self) -> None:
        """Move TARGET's tmpfs to MOUNTS; what the premount hooks wrote there goes into
        upper/, the future root."""
        assert self.mounts is not None
        os.makedirs(self.mounts, mode=0o700, exist_ok=True)
        run(["mount", "-o", "move", self.target, self.mounts])
        self.moved = True
        upper = os.path.join(self.mounts, "upper")
        entries = os.listdir(self.mounts)
        for name in ("upper", "work", "images", "lower"):
            os.mkdir(os.path.join(self.mounts, name), 0o755)
        for name in entries:
            os.rename(os.path.join(self.mounts, name), os.path.join(upper, name))
        os.chmod(upper, os.stat(self.mounts).st_mode & 0o7777)

    def add(self, number: int, urls: Sequence[str], *, sha256: str | None,
            budget: RetryBudget, timeout: float, label: str) -> tuple[DownloadResult, str]:
        """Download and verify one image layer; mount it (or store it). Returns the
        download and where the image now is."""
        name = image_name(urls[0])
        if self.mounts is None:
            path = os.path.join(self.target, name)
            part = os.path.join(self.target, f".{name}.part")
            result, kind = download_image(urls, part, sha256=sha256, budget=budget,
                                          timeout=timeout, label=label)
            os.rename(part, path)
            self.layers.append((number, path, kind))
            return result, path
        if not self.moved:
            self._prepare()
        path = os.path.join(self.mounts, "images", f"{number}-{name}")
        result, kind = download_image(urls, path, sha256=sha256, budget=budget,
                                      timeout=timeout, label=label)
        mountpoint = os.path.join(self.mounts, "lower", str(number))
        os.mkdir(mountpoint, 0o755)
        device = mount_image(path, kind, mountpoint)
        self.mounted.append(mountpoint)
        self.layers.append((number, path, kind))
        log.info("%s: %s mounted read-only from %s", label, kind.value, device)
        return result, mountpoint

    def fetch(self, number: int, total: int, urls: Sequence[str], *, sha256: str | None,
              budget: RetryBudget, timeout: float, events: EventLog) -> None:
        """`add` as one phase of the boot: its console lines and its boot.jsonl event."""
        label = f"layer {number}/{total}"
        with phase(f"Fetching {label} (image): {' | '.join(urls)}", events,
                   layer=number) as figures:
            retries_before = budget.used
            result, where = self.add(number, urls, sha256=sha256, budget=budget,
                                     timeout=timeout, label=label)
            kind = self.layers[-1][2].value
            figures.update(url=result.url, bytes=result.size, requests=result.requests,
                           retries=budget.used - retries_before, kind=kind,
                           verified=sha256 is not None, path=where)
            log.info("%s: %s %s in RAM%s, at %s", label, format_bytes(result.size), kind,
                     ", SHA-256 verified" if sha256 else "", where)

    def stack(self) -> None:
        """Mount the overlay on TARGET: the images as lower layers (the last one on top),
        upper/ and work/ on the tmpfs. Nothing to do without mounted images."""
        if not self.mounted or self.overlay:
            return
        assert self.mounts is not None
        if not _has_filesystem("overlay"):
            run(["modprobe", "-q", "overlay"], check=False)
        lower = ":".join(reversed(self.mounted))
        options = (f"lowerdir={lower},upperdir={self.mounts}/upper,"
                   f"workdir={self.mounts}/work")
        run(["mount", "-t", "overlay", "-o", options, "overlay", self.target])
        self.overlay = True

    def undo(self) -> None:
        """Unmount everything this attempt mounted and give TARGET its tmpfs back (to be
        emptied by the caller). Best effort: the first failure is logged, not raised."""
        steps: list[list[str]] = []
        if self.overlay:
            steps.append(["umount", self.target])
        steps += [["umount", m] for m in reversed(self.mounted)]
        if self.moved:
            assert self.mounts is not None
            steps.append(["mount", "-o", "move", self.mounts, self.target])
        for argv in steps:
            with contextlib.suppress(TmpfsbootError):
                run(argv)
        self.overlay, self.mounted, self.moved, self.layers = False, [], False, []


def _has_filesystem(name: str) -> bool:
    try:
        with open("/proc/filesystems", encoding="ascii") as f:
            return any(line.split()[-1] == name for line in f if line.strip())
    except OSError:
        return False

