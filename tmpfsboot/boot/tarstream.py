"""A tar stream read into one reused buffer, so headers are parsed where they lie.

The extractor and the header parser share one `Reader`: the parser looks at headers in
`buf` between `pos` and `end` (`ensure` makes room for a whole header group first), the
extractor writes small files straight from the buffer and streams large ones through it.
A fresh 1 MiB per read would cost page faults and copies; this buffer is filled in place.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable

from .errors import ArchiveError

READ_SIZE = 1 << 20


class Reader:
    """Exact reads from a stream (a pipe) through one buffer, with as few copies as
    possible. `buf[pos:end]` holds the bytes read but not yet consumed."""

    def __init__(self, readinto: Callable[[memoryview], int], size: int = READ_SIZE) -> None:
        self.readinto = readinto
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.pos = 0
        self.end = 0

    @classmethod
    def from_fd(cls, fd: int) -> Reader:
        return cls(lambda view: os.readv(fd, [view]))

    @classmethod
    def over(cls, data: bytes | bytearray) -> Reader:
        """A reader of DATA, already in memory."""
        return cls(io.BytesIO(data).readinto, max(len(data), 1))

    def _fill(self) -> bool:
        """Refill the (consumed) buffer from its start; False at the end of the stream."""
        self.end = self.readinto(self.view)
        self.pos = 0
        return self.end > 0

    def ensure(self, n: int) -> int:
        """Make N bytes (at most the buffer's size) readable at `pos`, unless the stream
        ends first; returns how many are. Moves the unread rest to the buffer's start."""
        have = self.end - self.pos
        if have >= n:
            return have
        view = self.view
        view[:have] = view[self.pos : self.end]
        self.pos, self.end = 0, have
        size = len(view)
        while self.end < n and self.end < size:
            got = self.readinto(view[self.end :])
            if not got:
                break
            self.end += got
        return self.end

    def read(self, n: int) -> bytes:
        """Exactly N bytes; b'' at a clean end of stream; ArchiveError if cut short."""
        pos = self.pos
        if self.end - pos >= n:
            self.pos = pos + n
            return bytes(self.view[pos : pos + n])
        parts = [bytes(self.view[pos : self.end])]
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

    def copy(self, fd: int, n: int, name: str, *, pad: int = 0) -> None:
        """Write the next N bytes to FD, then skip PAD bytes (a member's block padding)."""
        pos = self.pos
        if pos + n + pad <= self.end:  # the common case: all in the buffer, one write
            written = os.write(fd, self.view[pos : pos + n])
            self.pos = pos + written
            n -= written
            if not n:
                self.pos += pad
                return
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
        if pad:
            self.skip(pad)

    def skip(self, n: int) -> None:
        while n > 0:
            if self.pos >= self.end and not self._fill():
                raise ArchiveError("truncated archive: the stream ended inside a member")
            take = min(n, self.end - self.pos)
            self.pos += take
            n -= take
