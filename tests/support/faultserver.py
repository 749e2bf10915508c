"""The tests' one HTTP(S) server, on loopback, that fails on purpose when told to.

Files live in memory (`FaultServer.files`, path -> bytes) or, with `serve(root=DIR)`, are
read from DIR at each request (a plain directory server). Each path has a script: the
behaviour of its 1st, 2nd, ... request (`Act`), then `Act()` (a correct answer) for
every request after the script ends. Every request is recorded (path, Range, If-Range,
the status sent and how many body bytes went out) so tests assert on request counts
and resume offsets.

Correct answers carry a strong ETag (the content's hash) and Last-Modified and honour
`Range: bytes=N-` with `If-Range`, as nginx does. One connection per request
(`Connection: close`): the engine opens one per request anyway. `serve(host="::1")`
listens on IPv6, `serve(tls=CONTEXT)` speaks HTTPS, `serve(ignore_range=True)` answers
every request with the whole file (as python's http.server does), and
`FaultServer.redirect(PREFIX, TO)` redirects every path under PREFIX.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

LAST_MODIFIED = "Wed, 01 Jan 2025 00:00:00 GMT"


@dataclass(frozen=True)
class Act:
    """What the server does with one request. The default is a correct answer.

    status: answer with this error status (and Retry-After if retry_after is set).
    cut_after / cut: after this many body bytes, "reset" (TCP RST), "close" (a clean
    close before Content-Length bytes: a short body) or "stall" (send nothing more for
    stall seconds, then close).
    flip: XOR these body offsets with 0xFF (the bytes change in transit).
    ignore_range: answer 200 with the whole file even when asked for a Range.
    swap: before answering, replace these files on the server (new content, new ETag).
    location: the Location header of a redirect (status 3xx).
    """

    status: int = 200
    retry_after: str | None = None
    cut_after: int | None = None
    cut: str = "reset"
    stall: float = 0.0
    flip: tuple[int, ...] = ()
    ignore_range: bool = False
    swap: tuple[tuple[str, bytes], ...] = ()
    location: str | None = None


OK = Act()


def error(status: int, retry_after: str | None = None) -> Act:
    """An error answer, optionally with Retry-After."""
    return Act(status=status, retry_after=retry_after)


def redirect(location: str, status: int = 302) -> Act:
    """A redirect to LOCATION."""
    return Act(status=status, location=location)


def reset(after: int) -> Act:
    """Send AFTER body bytes, then reset the connection."""
    return Act(cut_after=after, cut="reset")


def short(after: int) -> Act:
    """Promise the whole Content-Length, send AFTER bytes, close cleanly."""
    return Act(cut_after=after, cut="close")


def stall(after: int, seconds: float) -> Act:
    """Send AFTER bytes, then nothing for SECONDS, then close."""
    return Act(cut_after=after, cut="stall", stall=seconds)


def flip(*offsets: int) -> Act:
    """A correct answer whose body has the bytes at OFFSETS inverted."""
    return Act(flip=offsets)


def ignore_range() -> Act:
    """A correct 200 answer with the whole file, whatever Range asked for."""
    return Act(ignore_range=True)


def swap(files: dict[str, bytes], then: Act = OK) -> Act:
    """Replace FILES on the server (as a mirror being updated), then act as THEN."""
    return Act(status=then.status, retry_after=then.retry_after, cut_after=then.cut_after,
               cut=then.cut, stall=then.stall, flip=then.flip,
               ignore_range=then.ignore_range, swap=tuple(files.items()))


@dataclass(frozen=True)
class Hit:
    """One request as the server saw it."""

    path: str
    range: str | None
    if_range: str | None
    status: int
    sent: int


def etag_of(data: bytes) -> str:
    """The strong ETag the server gives DATA."""
    return '"' + hashlib.sha256(data).hexdigest()[:16] + '"'


@dataclass
class FaultServer:
    """The server's state: files, per-path scripts, and the log of requests."""

    files: dict[str, bytes] = field(default_factory=dict)
    scripts: dict[str, list[Act]] = field(default_factory=dict)
    hits: list[Hit] = field(default_factory=list)
    port: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    root: Path | None = None
    host: str = "127.0.0.1"
    scheme: str = "http"
    ignore_range: bool = False
    redirects: dict[str, tuple[str, int]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """The base URL, ending in '/'."""
        netloc = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{netloc}:{self.port}/"

    @property
    def paths(self) -> list[str]:
        """The path of every request so far, in order."""
        with self.lock:
            return [h.path for h in self.hits]

    def redirect(self, prefix: str, to: str, status: int = 302) -> None:
        """Answer every path under PREFIX with STATUS, to TO + the rest of the path."""
        self.redirects[prefix] = (to, status)

    def script(self, path: str, *acts: Act) -> None:
        """The behaviour of the next requests of PATH, in order; correct answers after."""
        self.scripts[path] = list(acts)

    def count(self, path: str) -> int:
        """How many requests PATH got."""
        return sum(1 for h in self.hits if h.path == path)

    def requests_for(self, path: str) -> list[Hit]:
        """The requests of PATH, in order."""
        return [h for h in self.hits if h.path == path]

    def _next_act(self, path: str) -> tuple[Act, bytes | None]:
        with self.lock:
            queue = self.scripts.get(path)
            act = queue.pop(0) if queue else self._default_act(path)
            for name, content in act.swap:
                self.files[name] = content
            data = self.files.get(path)
            return act, data if data is not None else self._from_root(path)

    def _default_act(self, path: str) -> Act:
        for prefix, (to, status) in self.redirects.items():
            if path.startswith(prefix):
                return redirect(to + path.removeprefix(prefix), status)
        return Act(ignore_range=True) if self.ignore_range else OK

    def _from_root(self, path: str) -> bytes | None:
        if self.root is None:
            return None
        file = (self.root / path.lstrip("/")).resolve()
        if not file.is_relative_to(self.root.resolve()) or not file.is_file():
            return None
        return file.read_bytes()

    def _record(self, hit: Hit) -> None:
        with self.lock:
            self.hits.append(hit)


def _parse_range(value: str | None, size: int) -> int | None:
    """The first byte of `bytes=N-` (the only form the engine sends), if satisfiable."""
    if not value or not value.startswith("bytes=") or not value.endswith("-"):
        return None
    first = value[len("bytes="):-1]
    if not first.isdigit() or int(first) >= size:
        return None
    return int(first)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: the tests read FaultServer.hits instead

    def do_GET(self) -> None:
        state = self.server.state
        path = self.path.split("?", 1)[0]
        act, data = state._next_act(path)
        range_header = self.headers.get("Range")
        if_range = self.headers.get("If-Range")

        def record(status: int, sent: int) -> None:
            # before the body goes out: a stalled answer is on record while it stalls
            state._record(Hit(path, range_header, if_range, status, sent))

        self._answer(act, data, range_header, if_range, record)

    def _send_head(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.flush()

    def _answer(self, act: Act, data: bytes | None, range_header: str | None,
                if_range: str | None, record: Callable[[int, int], None]) -> None:
        if act.status != 200 or data is None:
            status = act.status if act.status != 200 else 404
            body = f"{status}\n".encode()
            headers = {"Content-Length": str(len(body)), "Content-Type": "text/plain"}
            if act.retry_after is not None:
                headers["Retry-After"] = act.retry_after
            if act.location is not None:
                headers["Location"] = act.location
            record(status, len(body))
            self._send_head(status, headers)
            self.wfile.write(body)
            return
        etag = etag_of(data)
        first = _parse_range(range_header, len(data))
        if if_range is not None and if_range not in (etag, LAST_MODIFIED):
            first = None  # the file changed: send all of it (RFC 9110 If-Range)
        if act.ignore_range:
            first = None
        headers = {"ETag": etag, "Last-Modified": LAST_MODIFIED, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if first is None:
            status, body = 200, data
        else:
            status, body = 206, data[first:]
            headers["Content-Range"] = f"bytes {first}-{len(data) - 1}/{len(data)}"
        headers["Content-Length"] = str(len(body))
        if act.flip:
            flipped = bytearray(body)
            for at in act.flip:
                flipped[at] ^= 0xFF
            body = bytes(flipped)
        if act.cut_after is None:
            record(status, len(body))
            self._send_head(status, headers)
            self.wfile.write(body)
            return
        part = body[: act.cut_after]
        record(status, len(part))
        self._send_head(status, headers)
        self.wfile.write(part)
        self.wfile.flush()
        # let the client read what was sent before the cut, so resume offsets are exact
        time.sleep(act.stall if act.cut == "stall" else 0.2)
        if act.cut == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
        self.close_connection = True


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a stalling answer must not hold up the end of a test
    state: FaultServer


class _HTTPServerV6(_HTTPServer):
    address_family = socket.AF_INET6


@contextlib.contextmanager
def serve(files: dict[str, bytes] | None = None, *, root: Path | None = None,
          host: str = "127.0.0.1", tls: ssl.SSLContext | None = None,
          ignore_range: bool = False) -> Iterator[FaultServer]:
    """A FaultServer on HOST (loopback, a free port) in a background thread, for a `with`:
    FILES in memory, then what ROOT holds; HTTPS with TLS."""
    state = FaultServer(files=dict(files or {}), root=root, host=host,
                        scheme="https" if tls else "http", ignore_range=ignore_range)
    httpd = (_HTTPServerV6 if ":" in host else _HTTPServer)((host, 0), _Handler)
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    httpd.state = state
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, name="faultserver", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
