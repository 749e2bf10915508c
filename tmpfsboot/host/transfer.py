"""Socket-level pieces of `tmpfsboot serve`: a file body sent with a stall timeout and a
minimum rate, and the lingering close after an error answer.

They run on the server's asyncio loop, on non-blocking sockets; the bytes go from the
page cache to the socket with os.sendfile and never pass through Python.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from dataclasses import dataclass

# Bytes per sendfile call: big enough for few wake-ups on fast links.
SENDFILE_CHUNK = 4 << 20
# Lingering close after an error answer (nginx: lingering_time 30s, lingering_timeout
# 5s): read and drop what the client still sends, so the answer is not lost to a reset.
LINGER_TIME = 5.0
LINGER_IDLE = 2.0


class SlowClientError(Exception):
    """A stream went below the minimum rate."""


@dataclass(frozen=True)
class Pace:
    """How slow a stream may be: TIMEOUT seconds without a byte taken, or fewer than
    MIN_RATE bytes a second over each WINDOW seconds (MIN_RATE 0: no minimum)."""

    timeout: float
    min_rate: int
    window: float


async def send_file_body(conn: socket.socket, fd: int, offset: int, length: int,
                         pace: Pace, progress: list[int]) -> None:
    """Send LENGTH bytes of FD from OFFSET to CONN, counting them in PROGRESS[0] as they
    go, so the caller knows what the client got even when this raises.

    TimeoutError when the client takes nothing for `pace.timeout` seconds;
    SlowClientError when it took fewer than `pace.min_rate` bytes a second over the last
    `pace.window` seconds. Returns early if the file shrank.
    """
    loop = asyncio.get_running_loop()
    out = conn.fileno()
    last_progress = window_start = loop.time()
    window_sent = progress[0]
    while progress[0] < length:
        sent = progress[0]
        try:
            n = os.sendfile(out, fd, offset + sent, min(length - sent, SENDFILE_CHUNK))
        except BlockingIOError:
            wait = last_progress + pace.timeout - loop.time()
            if pace.min_rate:
                wait = min(wait, window_start + pace.window - loop.time())
            if wait > 0:
                await wait_writable(out, wait)
        else:
            if n == 0:
                return
            progress[0] += n
            last_progress = loop.time()
        now = loop.time()
        if now - last_progress >= pace.timeout:
            raise TimeoutError("client stalled")
        if pace.min_rate and now - window_start >= pace.window:
            if progress[0] - window_sent < pace.min_rate * (now - window_start):
                raise SlowClientError
            window_start, window_sent = now, progress[0]


async def wait_writable(fileno: int, timeout: float) -> None:
    """Wait until FILENO is writable or TIMEOUT seconds passed."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(fileno, wake)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ready, timeout)
    finally:
        loop.remove_writer(fileno)


async def linger_close(conn: socket.socket) -> None:
    """Half-close CONN and drop what the client still sends, for at most LINGER_TIME
    seconds (LINGER_IDLE without a byte), as nginx's lingering close does: closing with
    unread input sends a reset, which can destroy the answer still in flight. The
    caller closes CONN."""
    loop = asyncio.get_running_loop()
    try:
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        return
    deadline = loop.time() + LINGER_TIME
    while (left := deadline - loop.time()) > 0:
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(conn, 65536),
                                           min(left, LINGER_IDLE))
        except (TimeoutError, OSError):
            return
        if not chunk:
            return


def open_reserve() -> int | None:
    """A descriptor kept in reserve, spent to answer 503 when accept runs out."""
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
