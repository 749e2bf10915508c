"""The image server behind `tmpfsboot serve DIR`.

A small HTTP/1.1 file server for a directory of images, made for many booting nodes on
a modest host: one asyncio loop in one thread, raw non-blocking sockets and
os.sendfile, so a slow client costs a coroutine and a file descriptor, not a thread,
and the bytes never pass through Python. GET and HEAD, one `Range` per request with
strong `ETag`, `Last-Modified` and `If-Range`; nothing outside DIR is ever served.

Past `max_streams` concurrent large transfers a request gets `503` with `Retry-After`,
which the boot engine honours, instead of every node crawling. Small files (SHA256SUMS,
manifests, signatures) do not count against the cap: they fit in the socket buffers and
a node needs them before it can even start its download. A stream slower than
`min_rate` over `rate_window` seconds is closed, so slow readers cannot keep every slot.
Running out of descriptors or memory is a `503` too: nodes slow down instead of leaving
this mirror for good. Memory is bounded by configuration (servestats.py, request.py).

Production can use any HTTP server instead: docs/nginx.md has a tested nginx setup.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import errno
import logging
import os
import resource
import socket
import stat
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from .. import __version__
from .request import (
    MAX_HEAD,
    REASONS,
    HTTPError,
    RequestHead,
    UnsatisfiableRange,
    check_request_line,
    escape_for_log,
    find_head_end,
    guess_content_type,
    is_if_range_fresh,
    make_etag,
    parse_range,
    parse_request_head,
    resolve_target,
)
from .servestats import RING_SIZE, ServerStats, Snapshot
from .transfer import Pace, SlowClientError, linger_close, open_reserve, send_file_body

log = logging.getLogger("tmpfsboot.serve")

SERVER = f"tmpfsboot/{__version__}"
# Files this small go out in one write into the socket buffer: no stream slot needed.
SMALL_BODY = 256 * 1024
# Pending connections the kernel queues for us: a rack of nodes powering on at once.
LISTEN_BACKLOG = 4096
# Default slowest stream kept: 64 KiB/s over 30 s. A 1 Gbit/s link shared by 64 streams
# gives each about 2 MB/s; a node below this rate holds a slot another could use.
MIN_RATE = 64 * 1024
RATE_WINDOW = 30.0
# Seconds a client refused for want of descriptors has to send its request head.
REFUSE_READ_TIME = 1.0
# open() failures that mean "this server is short of something right now", not "this
# file is forbidden": answered 503 + Retry-After, which nodes retry.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS,
                             errno.EAGAIN, errno.EINTR})
NOT_FOUND_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG})
FORBIDDEN_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.ELOOP})


def raise_fd_limit() -> int:
    """Raise this process' open-file limit to its hard limit: each client holds a socket
    and a file. Returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


class ImageServer:
    """A running image server: an asyncio loop in a background thread.

    `.port`, `.url`, `.snapshot()` (counters and recent requests, taken on the server's
    thread) and `.stop()`; also a context manager that stops it on exit.
    """

    def __init__(self, root: Path, listener: socket.socket, *, max_streams: int,
                 retry_after: int, access_log: bool, timeout: float,
                 min_rate: int = MIN_RATE, rate_window: float = RATE_WINDOW,
                 max_streams_per_client: int | None = None,
                 ring_size: int = RING_SIZE) -> None:
        self.root = Path(os.path.realpath(root))
        self.listener = listener
        self.max_streams = max_streams
        self.max_streams_per_client = max_streams_per_client
        self.retry_after = retry_after
        self.access_log = access_log
        self.timeout = timeout
        self.min_rate = min_rate
        self.pace = Pace(timeout, min_rate, rate_window)
        self.stats = ServerStats(ring_size)
        self._client_streams: dict[str, int] = {}
        self._reserve_fd: int | None = None
        self.port: int = listener.getsockname()[1]
        host = listener.getsockname()[0]
        shown = f"[{host}]" if listener.family == socket.AF_INET6 else host
        self.url = f"http://{shown}:{self.port}/"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"serve:{self.port}",
                                        daemon=True)

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Start serving in a background thread; returns once the loop accepts."""
        self._thread.start()
        self._ready.wait()

    def stop(self) -> None:
        """Stop accepting, drop open connections, and wait for the thread to end."""
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread.is_alive():
            self._thread.join()
        self.listener.close()

    def snapshot(self, *, reset_peak: bool = False) -> Snapshot:
        """The counters and recent requests, copied on the server's own thread (or
        directly once it has stopped); RESET_PEAK starts a new peak of streams there."""
        loop = self._loop
        if loop is None or not self._thread.is_alive() or loop.is_closed():
            return self.stats.snapshot(reset_peak=reset_peak)

        async def take() -> Snapshot:
            return self.stats.snapshot(reset_peak=reset_peak)

        try:
            return asyncio.run_coroutine_threadsafe(take(), loop).result(timeout=30)
        except RuntimeError:  # the loop closed between the check and the call
            return self.stats.snapshot(reset_peak=reset_peak)

    def __enter__(self) -> ImageServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        finally:
            self._ready.set()  # never leave start() waiting

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._reserve_fd = open_reserve()
        tasks: set[asyncio.Task[None]] = set()
        acceptor = asyncio.create_task(self._accept(tasks))
        self._ready.set()
        await self._stop.wait()
        acceptor.cancel()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(acceptor, *tasks, return_exceptions=True)
        if self._reserve_fd is not None:
            os.close(self._reserve_fd)

    def _spawn(self, tasks: set[asyncio.Task[None]],
               coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _accept(self, tasks: set[asyncio.Task[None]]) -> None:
        loop = asyncio.get_running_loop()
        failing = False
        while True:
            try:
                conn, addr = await loop.sock_accept(self.listener)
            except OSError as e:
                if e.errno in RESOURCE_ERRNOS and self._reserve_fd is not None:
                    # Out of descriptors: spend the one kept in reserve to tell the next
                    # client to come back, instead of leaving it in the backlog.
                    os.close(self._reserve_fd)
                    self._reserve_fd = None
                    with contextlib.suppress(OSError):
                        conn, addr = self.listener.accept()
                        self._spawn(tasks, self._refuse_connection(conn, addr))
                        continue
                    self._reserve_fd = open_reserve()
                if not failing:  # once per spell, not ten lines a second
                    log.warning("accept: %s; new clients wait in the backlog", e)
                    failing = True
                await asyncio.sleep(0.1)
                if self._reserve_fd is None:
                    self._reserve_fd = open_reserve()
                continue
            if failing:
                log.warning("accept: working again")
                failing = False
            self._spawn(tasks, self._serve_connection(conn, addr))

    async def _refuse_connection(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        """Answer 503 + Retry-After on a connection accepted with the reserve descriptor,
        then take the reserve back."""
        client = f"{addr[0]}:{addr[1]}"
        started = time.monotonic()
        self.stats.out_of_resources += 1
        try:
            conn.setblocking(False)
            head = None
            with contextlib.suppress(HTTPError, TimeoutError, OSError):
                data = await self._read_head(conn, bytearray(), timeout=REFUSE_READ_TIME)
                head = parse_request_head(data) if data is not None else None
            err = HTTPError(503, "out of file descriptors; retry later", close=True,
                            headers={"Retry-After": str(self.retry_after)})
            with contextlib.suppress(OSError, TimeoutError):
                await self._send_error(conn, client, head, err, started)
            await linger_close(conn)
        finally:
            conn.close()
            if self._reserve_fd is None:
                self._reserve_fd = open_reserve()

    # -- one connection -----------------------------------------------------------

    async def _serve_connection(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        client = f"{addr[0]}:{addr[1]}"
        buf = bytearray()
        linger = False
        try:
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:
                try:
                    head = await self._read_head(conn, buf, timeout=self.timeout)
                except HTTPError as e:
                    await self._send_error(conn, client, None, e, time.monotonic())
                    linger = True
                    return
                if head is None:
                    return
                keep, linger = await self._answer(conn, client, head)
                if not keep:
                    return
        except (ConnectionError, TimeoutError, OSError, SlowClientError):
            linger = False  # the client went away or stalled: nothing to answer
        except Exception as e:
            # A bug must cost one connection, never the server, nor a traceback per
            # request in the log: one line, and a counter the tests watch.
            self.stats.internal_errors += 1
            log.error("%s: internal error: %s: %s", client, type(e).__name__, e)
            linger = False
        finally:
            if linger:
                with contextlib.suppress(Exception):
                    await linger_close(conn)
            conn.close()

    async def _read_head(self, conn: socket.socket, buf: bytearray, *,
                         timeout: float) -> bytes | None:
        """The next request head on CONN (None at a clean end of connection), taken from
        the front of BUF, which keeps what follows it (pipelined requests).

        The whole head must arrive within TIMEOUT: a client sending a byte now and then
        cannot hold a connection for ever. A bad request line is refused as soon as it
        is complete; a head past MAX_HEAD is refused (431) without reading further.
        Nothing more is read while BUF holds a whole head, so BUF stays within
        MAX_HEAD plus one read.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if buf[:1] in (bytearray(b"\r"), bytearray(b"\n")):  # empty lines may come first
                del buf[:len(buf) - len(buf.lstrip(b"\r\n"))]
            if buf:
                check_request_line(buf)
                end = find_head_end(buf)
                if end is not None:
                    if end[0] > MAX_HEAD:
                        raise HTTPError(431, close=True)
                    head = bytes(buf[:end[0]])
                    del buf[:end[1]]  # cheap: a bytearray drops its front in place
                    return head
                if len(buf) > MAX_HEAD:
                    raise HTTPError(431, close=True)
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(conn, 65536),
                                               max(deadline - loop.time(), 0))
            except TimeoutError:
                if buf:
                    raise HTTPError(408, close=True) from None
                return None  # an idle keep-alive connection
            if not chunk:
                return None
            buf += chunk

    async def _answer(self, conn: socket.socket, client: str,
                      head_bytes: bytes) -> tuple[bool, bool]:
        """Answer one request: (keep the connection, linger before closing it)."""
        started = time.monotonic()
        head: RequestHead | None = None
        try:
            head = parse_request_head(head_bytes)
            path = resolve_target(self.root, head.target)
            if head.method not in ("GET", "HEAD"):
                raise HTTPError(405, headers={"Allow": "GET, HEAD"})
            keep = await self._send_file(conn, client, head, path, started)
            return keep, head.has_body
        except HTTPError as e:
            keep = await self._send_error(conn, client, head, e, started)
            return keep, not keep

    async def _send_error(self, conn: socket.socket, client: str, head: RequestHead | None,
                          err: HTTPError, started: float) -> bool:
        body = f"{err.status} {REASONS.get(err.status, '')}: {err}\n".encode()
        keep = head is not None and head.keep_alive and not err.close
        headers = {**err.headers, "Content-Type": "text/plain; charset=utf-8",
                   "Content-Length": str(len(body))}
        send_body = head is None or head.method != "HEAD"
        data = self._format_head(err.status, headers, keep) + (body if send_body else b"")
        loop = asyncio.get_running_loop()
        sent = 0
        try:
            await asyncio.wait_for(loop.sock_sendall(conn, data), self.timeout)
            sent = len(body) if send_body else 0
        finally:
            self._record(client, head, err.status, sent, started,
                         "" if sent or not send_body else "interrupted")
        return keep

    async def _send_file(self, conn: socket.socket, client: str, head: RequestHead,
                         path: str, started: float) -> bool:
        try:
            # O_NONBLOCK: opening a FIFO would otherwise wait for a writer, and stall
            # every client of this loop. It changes nothing for a regular file.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            raise self._open_error(e) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise HTTPError(404)
            return await self._send_open_file(conn, client, head, path, fd, st, started)
        finally:
            os.close(fd)

    def _open_error(self, e: OSError) -> HTTPError:
        """The answer to a failed open: 404, 403 only for what is forbidden, 503 with
        Retry-After for a server short of descriptors or memory, else 500."""
        if e.errno in NOT_FOUND_ERRNOS:
            return HTTPError(404)
        if e.errno in FORBIDDEN_ERRNOS:
            return HTTPError(403)
        if e.errno in RESOURCE_ERRNOS:
            self.stats.out_of_resources += 1
            log.warning("open: %s: answering 503", os.strerror(e.errno or 0))
            return HTTPError(503, "server short of resources; retry later",
                             headers={"Retry-After": str(self.retry_after)})
        return HTTPError(500, os.strerror(e.errno) if e.errno else "open failed")

    async def _send_open_file(self, conn: socket.socket, client: str, head: RequestHead,
                              path: str, fd: int, st: os.stat_result,
                              started: float) -> bool:
        size = st.st_size
        headers = {
            "Content-Type": guess_content_type(path),
            "Accept-Ranges": "bytes",
            "ETag": make_etag(st),
            "Last-Modified": email.utils.formatdate(st.st_mtime, usegmt=True),
        }
        range_header = head.headers.get("range")
        if range_header is not None and "if-range" in head.headers and not is_if_range_fresh(
                head.headers["if-range"], st):
            range_header = None  # the file changed since the client's first part
        try:
            wanted = parse_range(range_header, size)
        except UnsatisfiableRange:
            raise HTTPError(416, headers={**headers, "Content-Range": f"bytes */{size}"}
                            ) from None
        status, offset, length = 200, 0, size
        if wanted is not None:
            status, offset, length = 206, wanted.start, wanted.length
            headers["Content-Range"] = wanted.content_range()
        headers["Content-Length"] = str(length)
        keep = head.keep_alive
        loop = asyncio.get_running_loop()
        if head.method == "HEAD":
            await asyncio.wait_for(
                loop.sock_sendall(conn, self._format_head(status, headers, keep)),
                self.timeout)
            self._record(client, head, status, 0, started)
            return keep
        # The slot goes by the file's size, not the answer's: small ranges of a large
        # image are counted too, or a client could hold many without a slot.
        with self._stream_slot(size, client) as refusal:
            if refusal:
                raise HTTPError(503, refusal,
                                headers={"Retry-After": str(self.retry_after)})
            progress = [0]
            outcome = "interrupted"
            try:
                await asyncio.wait_for(
                    loop.sock_sendall(conn, self._format_head(status, headers, keep)),
                    self.timeout)
                await send_file_body(conn, fd, offset, length, self.pace, progress)
                outcome = "" if progress[0] == length else "file shrank"
            except SlowClientError:
                self.stats.slow_closed += 1
                outcome = f"below --min-rate {self.min_rate} B/s"
                raise
            except TimeoutError:
                outcome = "client stalled"
                raise
            finally:
                if outcome:
                    self.stats.interrupted += 1
                self._record(client, head, status, progress[0], started, outcome)
            if progress[0] < length:
                return False  # the file shrank under us: the length we promised is a lie
        return keep

    @contextlib.contextmanager
    def _stream_slot(self, size: int, client: str) -> Iterator[str]:
        """A slot for a large file while the caps allow one (runs on the loop thread);
        yields "" when granted, else why not."""
        if size <= SMALL_BODY:
            yield ""
            return
        if self.stats.streams >= self.max_streams:
            yield "too many transfers; retry later"
            return
        ip = client.rsplit(":", 1)[0]
        mine = self._client_streams.get(ip, 0)
        if self.max_streams_per_client is not None and mine >= self.max_streams_per_client:
            yield "too many transfers from this client; retry later"
            return
        self.stats.open_stream()
        self._client_streams[ip] = mine + 1
        try:
            yield ""
        finally:
            self.stats.close_stream()
            left = self._client_streams[ip] - 1
            if left:
                self._client_streams[ip] = left
            else:
                del self._client_streams[ip]

    def _format_head(self, status: int, headers: dict[str, str], keep: bool) -> bytes:
        lines = [f"HTTP/1.1 {status} {REASONS.get(status, '')}",
                 f"Date: {email.utils.formatdate(usegmt=True)}",
                 f"Server: {SERVER}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        lines.append("Connection: keep-alive" if keep else "Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _record(self, client: str, head: RequestHead | None, status: int, sent: int,
                started: float, outcome: str = "") -> None:
        """Count the answer and write its access log line: the status sent and the body
        bytes the client really got, with why a transfer ended early."""
        method = head.method if head else "-"
        target = head.target if head else "-"
        self.stats.record(method, target, status, sent)
        if self.access_log:
            log.info('%s "%s %s" %d %d %.3fs%s', client, escape_for_log(method),
                     escape_for_log(target), status, sent, time.monotonic() - started,
                     f" ({outcome})" if outcome else "")

