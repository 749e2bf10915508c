"""Compression formats by their magic bytes, and decompressors that write into a pipe.

A parallel or native tool runs as a child when it is on PATH (pixz, xz -T0, zstd, pigz);
otherwise the standard library decompresses in-process. zstd has no standard-library
decoder: without the zstd binary a zstd image is a clear error.
"""

from __future__ import annotations

import bz2
import contextlib
import enum
import fcntl
import logging
import os
import signal
import subprocess
import zlib
from typing import Protocol

from .errors import ArchiveError, CommandError
from .run import find_program, spawn, wait_stage
from .tarfields import BLOCK, verify_checksum
from .tarheader import ZERO_BLOCK

log = logging.getLogger("tmpfsboot")

# POSIX ustar's magic ("ustar", then NUL or a space) at this offset of the first header.
_TAR_MAGIC_OFFSET = 257
_TAR_MAGIC = b"ustar"
PIPE_SIZE = 1 << 20


class Compression(enum.Enum):
    """A layer's compression, recognised by magic bytes, never by file name."""

    NONE = "tar"
    GZIP = "gzip"
    XZ = "xz"
    ZSTD = "zstd"
    BZIP2 = "bzip2"

    @classmethod
    def from_magic(cls, head: bytes, *, name: str = "image") -> Compression:
        """The compression whose magic HEAD starts with; ArchiveError if none fits."""
        for magic, kind in _MAGIC:
            if head.startswith(magic):
                return kind
        if head[_TAR_MAGIC_OFFSET:_TAR_MAGIC_OFFSET + len(_TAR_MAGIC)] == _TAR_MAGIC:
            return cls.NONE
        if len(head) >= BLOCK and (verify_checksum(head[:BLOCK]) or head[:BLOCK] == ZERO_BLOCK):
            return cls.NONE  # a v7 header (no magic) or an empty archive
        raise ArchiveError(
            f"{name}: not a tar archive nor gzip, xz, zstd or bzip2 data "
            f"(starts with {head[:8].hex()})"
        )

    def tools(self) -> tuple[tuple[str, ...], ...]:
        """Decompressor command lines, best first (each reads stdin, writes stdout)."""
        return {
            Compression.NONE: (),
            Compression.GZIP: (("pigz", "-d", "-c"), ("gzip", "-d", "-c")),
            Compression.XZ: (("pixz", "-d"), ("xz", "-d", "-c", "-T0")),
            Compression.ZSTD: (("zstd", "-d", "-c", "-q"),),
            Compression.BZIP2: (("lbzip2", "-d", "-c"), ("bzip2", "-d", "-c")),
        }[self]


_MAGIC = (
    (b"\x1f\x8b", Compression.GZIP),
    (b"\xfd7zXZ\x00", Compression.XZ),
    (b"\x28\xb5\x2f\xfd", Compression.ZSTD),
    (b"BZh", Compression.BZIP2),
)

# Enough bytes to recognise every format, tar's "ustar" at offset 257 included.
MAGIC_SIZE = 512


class ChildDecompressor:
    """A decompressor program as a pipeline stage: our stdin pipe -> its stdout = OUT_FD."""

    def __init__(self, argv: tuple[str, ...], out_fd: int) -> None:
        self.name = argv[0]
        self.proc = spawn(argv, stdin=subprocess.PIPE, stdout=out_fd, stderr=subprocess.PIPE)
        assert self.proc.stdin is not None
        self._fd = self.proc.stdin.fileno()
        with contextlib.suppress(OSError):  # fewer wake-ups than the default 64 KiB
            fcntl.fcntl(self._fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)

    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]

    def close(self) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        try:
            wait_stage(self.proc, self.name)
        except CommandError as e:
            if self.proc.returncode == -signal.SIGPIPE:
                # the extractor stopped reading first: its error is the cause, not this
                raise BrokenPipeError(f"{self.name}: the extractor stopped reading") from e
            raise ArchiveError(f"decompression failed: {e}") from e


class _Decoder(Protocol):
    """What zlib's, lzma's and bz2's decompressor objects have in common."""

    @property
    def eof(self) -> bool: ...

    @property
    def unused_data(self) -> bytes: ...

    def decompress(self, data: bytes | memoryview, /) -> bytes: ...


class InProcessDecompressor:
    """The standard library's gzip, xz or bzip2 decoder (or none, for plain tar)."""

    def __init__(self, compression: Compression, out_fd: int) -> None:
        self.name = "python"
        self.compression = compression
        self.out_fd = out_fd
        self._obj = self._new()

    def _new(self) -> _Decoder | None:
        if self.compression is Compression.GZIP:
            return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        if self.compression is Compression.XZ:
            import lzma  # lib-dynload: only loaded when no xz tool is present

            return lzma.LZMADecompressor()
        if self.compression is Compression.BZIP2:
            return bz2.BZ2Decompressor()
        return None

    def _out(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.out_fd, view)
            view = view[n:]

    def write(self, data: memoryview | bytes) -> None:
        obj = self._obj
        if obj is None:
            self._out(data)
            return
        try:
            while data:
                self._out(obj.decompress(data))
                if not obj.eof:
                    return
                # a concatenated stream (pigz -i, multi-stream xz) goes on
                data = obj.unused_data
                obj = self._obj = self._new()
                assert obj is not None
        except (zlib.error, OSError, EOFError, ValueError) as e:
            if isinstance(e, BrokenPipeError):
                raise
            raise ArchiveError(f"{self.compression.value} data is corrupt: {e}") from e

    def close(self) -> None:
        flush = getattr(self._obj, "flush", None)  # zlib keeps some output until then
        if flush is not None:
            self._out(flush())


def start_decompressor(
    compression: Compression, out_fd: int
) -> ChildDecompressor | InProcessDecompressor:
    """The best available decompressor for COMPRESSION, writing into OUT_FD."""
    for argv in compression.tools():
        if find_program(argv[0]):
            return ChildDecompressor(argv, out_fd)
    if compression is Compression.ZSTD:
        raise CommandError("zstd: not found; zstd images need it (Debian package zstd)")
    log.debug("no %s tool on PATH: decompressing in-process", compression.value)
    return InProcessDecompressor(compression, out_fd)
