"""`tmpfsboot serve DIR`: the embedded default image server.

A small HTTP/1.1 file server for a directory of images, made for many booting nodes on
a modest host: one asyncio loop in one thread, raw non-blocking sockets and
os.sendfile, so a slow client costs a coroutine and a file descriptor, not a thread,
and the bytes never pass through Python. GET and HEAD, one `Range` per request with
strong `ETag`, `Last-Modified` and `If-Range`; nothing outside DIR is ever served.

Past `max_streams` concurrent large transfers a request gets `503` with `Retry-After`,
which the boot engine honours, instead of every node crawling. Small files (SHA256SUMS,
manifests, signatures) do not count against the cap: they fit in the socket buffers and
a node needs them before it can even start its download.

Production can use any HTTP server instead: docs/nginx.md has a tested nginx setup.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.utils
import logging
import os
import resource
import signal
import socket
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import NamedTuple
from urllib.parse import unquote_to_bytes

from . import __version__
from .boot.errors import TmpfsbootError, UsageError

log = logging.getLogger("tmpfsboot.serve")

SERVER = f"tmpfsboot/{__version__}"
# A request head larger than this is refused (431): ours are a few hundred bytes.
MAX_HEAD = 16 * 1024
# Bodies this small go out in one write into the socket buffer: no stream slot needed.
SMALL_BODY = 256 * 1024
# Bytes per sendfile call: big enough for few wake-ups on fast links.
SENDFILE_CHUNK = 4 << 20
# Pending connections the kernel queues for us: a rack of nodes powering on at once.
LISTEN_BACKLOG = 4096

CONTENT_TYPES = {".json": "application/json", ".gpg": "application/pgp-signature",
                 ".asc": "application/pgp-signature"}
REASONS = {200: "OK", 206: "Partial Content", 400: "Bad Request", 403: "Forbidden",
           404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
           416: "Range Not Satisfiable", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 503: "Service Unavailable",
           505: "HTTP Version Not Supported"}


class Request(NamedTuple):
    """One answered request, as tests assert on it."""

    method: str
    path: str
    status: int


class HTTPError(Exception):
    """A request answered with an error status and a short text body."""

    def __init__(self, status: int, text: str = "", *, close: bool = False,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(text or REASONS.get(status, ""))
        self.status = status
        self.close = close
        self.headers = headers or {}


class UnsatisfiableRange(Exception):
    """The Range header names no byte of the file (416)."""


@dataclass(frozen=True)
class ByteRange:
    """An inclusive byte range of a file of SIZE bytes."""

    start: int
    end: int
    size: int

    @property
    def length(self) -> int:
        """Bytes in the range."""
        return self.end - self.start + 1

    def content_range(self) -> str:
        """The Content-Range header value of a 206 answer."""
        return f"bytes {self.start}-{self.end}/{self.size}"


@dataclass(frozen=True)
class RequestHead:
    """A parsed request line and header fields (names lower-cased)."""

    method: str
    target: str
    version: str
    headers: dict[str, str]

    @property
    def keep_alive(self) -> bool:
        """Whether the client wants the connection kept after the answer."""
        conn = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.1":
            return "close" not in conn
        return "keep-alive" in conn


def parse_request_head(data: bytes) -> RequestHead:
    """Parse a request head (without the blank line); HTTPError 400 if malformed."""
    try:
        text = data.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes anything
        raise HTTPError(400, close=True) from None
    lines = text.replace("\r\n", "\n").split("\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[2].startswith("HTTP/"):
        raise HTTPError(400, "bad request line", close=True)
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise HTTPError(505, close=True)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HTTPError(400, "bad header line", close=True)
        key = name.lower()
        value = value.strip()
        # Repeated fields fold into one list, except where that would hide a conflict.
        if key in headers:
            if key in ("content-length", "host", "range", "if-range"):
                raise HTTPError(400, f"repeated {name}", close=True)
            headers[key] += ", " + value
        else:
            headers[key] = value
    return RequestHead(method, target, version, headers)


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The byte range a `Range` header asks of a SIZE-byte file.

    None means "send the whole file": no header, a syntax we ignore as RFC 9110 allows,
    or several ranges (nodes never ask for them). UnsatisfiableRange for a valid range
    that names no byte of the file.
    """
    if header is None:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash or not (first.isdigit() or first == "") or not (last.isdigit() or last == ""):
        return None
    if first == "":
        if last == "":
            return None
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise UnsatisfiableRange(header)
        return ByteRange(max(size - suffix, 0), size - 1, size)
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise UnsatisfiableRange(header)
    end = min(int(last), size - 1) if last else size - 1
    return ByteRange(start, end, size)


def make_etag(st: os.stat_result) -> str:
    """A strong entity tag: changes whenever the file is replaced or rewritten."""
    return f'"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"'


def is_if_range_fresh(value: str, st: os.stat_result) -> bool:
    """Whether an If-Range validator (entity tag or HTTP date) matches the file."""
    value = value.strip()
    if value.startswith('"'):
        return value == make_etag(st)
    if value.startswith("W/"):
        return False  # weak tags never validate a range
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return False
    return int(when.timestamp()) == int(st.st_mtime)


def resolve_target(root: Path, target: str) -> Path:
    """The file under ROOT (a resolved path) that a request target names.

    Refuses, before touching the file system, anything that could name a place outside
    ROOT: `..` segments (also %-encoded), NUL bytes, non-origin targets; and after
    resolving symlinks, any path that lands outside ROOT (403). Hidden names (a leading
    dot) are 404: the image tools write their temporary files under such names.
    """
    if not target.startswith("/"):
        raise HTTPError(400, "request target must be a path", close=True)
    raw = unquote_to_bytes(target.split("?", 1)[0].split("#", 1)[0])
    if b"\0" in raw:
        raise HTTPError(400, "NUL in path")
    parts: list[str] = []
    for segment in raw.decode("utf-8", "surrogateescape").split("/"):
        if segment in ("", "."):
            continue
        if segment == ".." or "\\" in segment:
            raise HTTPError(403, "path escapes the image directory")
        if segment.startswith("."):
            raise HTTPError(404)
        parts.append(segment)
    candidate = root.joinpath(*parts)
    resolved = Path(os.path.realpath(candidate))
    if resolved != root and not resolved.is_relative_to(root):
        raise HTTPError(403, "path escapes the image directory")
    return resolved


def guess_content_type(path: Path) -> str:
    """The Content-Type of a served file."""
    if path.name.startswith("SHA256SUMS") and not path.suffix:
        return "text/plain; charset=utf-8"
    return CONTENT_TYPES.get(path.suffix, "application/octet-stream")


def escape_for_log(text: str) -> str:
    """TEXT with control characters escaped: a request target cannot forge log lines."""
    return text.encode("unicode_escape", "backslashreplace").decode("ascii")


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

    `.port`, `.url`, `.requests` (every answered request, in order) and `.stop()`; also
    a context manager that stops it on exit.
    """

    def __init__(self, root: Path, listener: socket.socket, *, max_streams: int,
                 retry_after: int, access_log: bool, timeout: float) -> None:
        self.root = Path(os.path.realpath(root))
        self.listener = listener
        self.max_streams = max_streams
        self.retry_after = retry_after
        self.access_log = access_log
        self.timeout = timeout
        self.requests: list[Request] = []
        self.streams = 0
        self.peak_streams = 0
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
        tasks: set[asyncio.Task[None]] = set()
        acceptor = asyncio.create_task(self._accept(tasks))
        self._ready.set()
        await self._stop.wait()
        acceptor.cancel()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(acceptor, *tasks, return_exceptions=True)

    async def _accept(self, tasks: set[asyncio.Task[None]]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(self.listener)
            except OSError as e:
                # Out of file descriptors: let the backlog wait rather than die.
                log.warning("accept: %s", e)
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = asyncio.create_task(self._serve_connection(conn, addr))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    # -- one connection -----------------------------------------------------------

    async def _serve_connection(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        client = f"{addr[0]}:{addr[1]}"
        buf = b""
        try:
            while True:
                try:
                    head, buf = await self._read_head(conn, buf)
                except HTTPError as e:
                    await self._send_error(conn, client, None, e, time.monotonic())
                    return
                if head is None:
                    return
                if not await self._answer(conn, client, head):
                    return
        except (ConnectionError, TimeoutError, OSError):
            pass  # the client went away or stalled: nothing to answer
        except Exception:
            # A bug must cost one connection, never the server.
            log.exception("%s: internal error", client)
        finally:
            conn.close()

    async def _read_head(self, conn: socket.socket, buf: bytes) -> tuple[bytes | None, bytes]:
        """The next request head on CONN (None at a clean end of connection).

        The whole head must arrive within `timeout`: a client sending a byte now and then
        cannot hold a connection for ever.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                return buf[:end], buf[end + 4:]
            if len(buf) > MAX_HEAD:
                raise HTTPError(431, close=True)
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(conn, 65536),
                                               max(deadline - loop.time(), 0))
            except TimeoutError:
                if buf:
                    raise HTTPError(408, close=True) from None
                return None, b""  # an idle keep-alive connection
            if not chunk:
                return None, b""
            buf += chunk

    async def _answer(self, conn: socket.socket, client: str, head_bytes: bytes) -> bool:
        """Answer one request; returns whether to keep the connection."""
        started = time.monotonic()
        head: RequestHead | None = None
        try:
            head = parse_request_head(head_bytes)
            if "transfer-encoding" in head.headers or head.headers.get(
                    "content-length", "0") not in ("", "0"):
                raise HTTPError(400, "request bodies are not accepted", close=True)
            if head.method not in ("GET", "HEAD"):
                raise HTTPError(405, headers={"Allow": "GET, HEAD"})
            path = resolve_target(self.root, head.target)
            return await self._send_file(conn, client, head, path, started)
        except HTTPError as e:
            return await self._send_error(conn, client, head, e, started)

    async def _send_error(self, conn: socket.socket, client: str, head: RequestHead | None,
                          err: HTTPError, started: float) -> bool:
        body = f"{err.status} {REASONS.get(err.status, '')}: {err}\n".encode()
        keep = head is not None and head.keep_alive and not err.close
        headers = {**err.headers, "Content-Type": "text/plain; charset=utf-8",
                   "Content-Length": str(len(body))}
        send_body = head is None or head.method != "HEAD"
        data = self._format_head(err.status, headers, keep) + (body if send_body else b"")
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.sock_sendall(conn, data), self.timeout)
        finally:
            self._record(client, head, err.status, len(body) if send_body else 0, started)
        return keep

    async def _send_file(self, conn: socket.socket, client: str, head: RequestHead,
                         path: Path, started: float) -> bool:
        try:
            # O_NONBLOCK: opening a FIFO would otherwise wait for a writer, and stall
            # every client of this loop. It changes nothing for a regular file.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise HTTPError(404) from None
        except OSError:
            raise HTTPError(403) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise HTTPError(404)
            return await self._send_open_file(conn, client, head, path, fd, st, started)
        finally:
            os.close(fd)

    async def _send_open_file(self, conn: socket.socket, client: str, head: RequestHead,
                              path: Path, fd: int, st: os.stat_result,
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
        with self._stream_slot(length) as granted:
            if not granted:
                raise HTTPError(503, "too many transfers; retry later",
                                headers={"Retry-After": str(self.retry_after)})
            sent = 0
            try:
                await asyncio.wait_for(
                    loop.sock_sendall(conn, self._format_head(status, headers, keep)),
                    self.timeout)
                sent = await self._sendfile(conn, fd, offset, length)
            finally:
                self._record(client, head, status, sent, started)
            if sent < length:
                return False  # the file shrank under us: the length we promised is a lie
        return keep

    @contextlib.contextmanager
    def _stream_slot(self, length: int) -> Iterator[bool]:
        """A slot for a large body while the cap allows one (runs on the loop thread)."""
        if length <= SMALL_BODY:
            yield True
            return
        if self.streams >= self.max_streams:
            yield False
            return
        self.streams += 1
        self.peak_streams = max(self.peak_streams, self.streams)
        try:
            yield True
        finally:
            self.streams -= 1

    async def _sendfile(self, conn: socket.socket, fd: int, offset: int, length: int) -> int:
        """Send LENGTH bytes of FD from OFFSET; returns the bytes sent. A client that
        takes no bytes for `timeout` seconds raises TimeoutError."""
        sent = 0
        out = conn.fileno()
        while sent < length:
            try:
                n = os.sendfile(out, fd, offset + sent, min(length - sent, SENDFILE_CHUNK))
            except BlockingIOError:
                await self._wait_writable(out)
                continue
            if n == 0:
                break
            sent += n
        return sent

    async def _wait_writable(self, fileno: int) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_writer(fileno, wake)
        try:
            await asyncio.wait_for(ready, self.timeout)
        finally:
            loop.remove_writer(fileno)

    def _format_head(self, status: int, headers: dict[str, str], keep: bool) -> bytes:
        lines = [f"HTTP/1.1 {status} {REASONS.get(status, '')}",
                 f"Date: {email.utils.formatdate(usegmt=True)}",
                 f"Server: {SERVER}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        lines.append("Connection: keep-alive" if keep else "Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _record(self, client: str, head: RequestHead | None, status: int, sent: int,
                started: float) -> None:
        method = head.method if head else "-"
        target = head.target if head else "-"
        self.requests.append(Request(method, target, status))
        if self.access_log:
            log.info('%s "%s %s" %d %d %.3fs', client, escape_for_log(method),
                     escape_for_log(target), status, sent, time.monotonic() - started)


def start_server(root: Path, *, bind: str = "127.0.0.1", port: int = 0, max_streams: int = 64,
                 retry_after: int = 1, access_log: bool = True,
                 timeout: float = 60.0) -> ImageServer:
    """Serve the directory ROOT over HTTP on BIND:PORT (0: a free port) in a background
    thread; returns the running server.

    At most MAX_STREAMS large bodies are sent at once; further requests for them get 503
    with `Retry-After: RETRY_AFTER`. A client that sends or takes nothing for TIMEOUT
    seconds is dropped.
    """
    if not root.is_dir():
        raise UsageError(f"{root}: not a directory")
    if max_streams < 1:
        raise UsageError(f"--max-streams {max_streams}: must be at least 1")
    raise_fd_limit()
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    try:
        listener = socket.create_server((bind, port), family=family,
                                        backlog=LISTEN_BACKLOG)
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise TmpfsbootError(f"cannot listen on {bind}:{port}: {reason}") from e
    listener.setblocking(False)
    server = ImageServer(root, listener, max_streams=max_streams, retry_after=retry_after,
                         access_log=access_log, timeout=timeout)
    server.start()
    return server


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve DIR until SIGINT or SIGTERM."""
    # Blocked before the server thread starts, so it inherits the mask and the signals
    # reach only the sigwait below.
    signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        server = start_server(Path(args.dir), bind=args.bind, port=args.port,
                              max_streams=args.max_streams, retry_after=args.retry_after,
                              timeout=args.timeout)
        logging.getLogger("tmpfsboot").info("Serving %s at %s (at most %d streams)",
                                            server.root, server.url, args.max_streams)
        signal.sigwait(signals)
        server.stop()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(text)
    return value


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `serve`."""
    p = subparsers.add_parser("serve", help="serve a directory of images over HTTP",
                              description="The embedded image server: GET and HEAD with "
                              "Range, ETag and If-Range, an access log, and 503 + "
                              "Retry-After past --max-streams concurrent transfers.")
    p.add_argument("dir", metavar="DIR", help="directory of images")
    p.add_argument("--bind", default="127.0.0.1", help="address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="TCP port (default: 8080)")
    p.add_argument("--max-streams", type=_positive_int, default=64, metavar="N",
                   help="concurrent image transfers before 503 (default: 64)")
    p.add_argument("--retry-after", type=_positive_int, default=1, metavar="S",
                   help="Retry-After seconds in 503 answers (default: 1)")
    p.add_argument("--timeout", type=_positive_float, default=60.0, metavar="S",
                   help="drop a client idle this long (default: 60)")
    p.set_defaults(func=cmd_serve)
