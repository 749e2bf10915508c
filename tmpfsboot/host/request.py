"""What `tmpfsboot serve` reads from a client: the request head, its Range, its target.

Every byte a client sends goes through these parsers, and their only failure is an
`HTTPError` carrying the status to answer: a malformed request costs the client a 4xx,
never the server a traceback. Where HTTP leaves a choice, the answer is nginx's (a
minimal configuration), unless docs/reliability.md ("Server under hostile clients") says
why not; the tests compare both servers on the same bytes.
"""

from __future__ import annotations

import email.utils
import os
import re
from dataclasses import dataclass
from pathlib import Path

# Caps on what a client may send before its request is answered: memory per connection
# is bounded by these, not by the client. nginx: large_client_header_buffers 4 8k.
MAX_REQUEST_LINE = 8 * 1024
MAX_HEADER_LINE = 8 * 1024
MAX_HEAD = 16 * 1024
# off_t: the largest byte position a Range can name (nginx refuses beyond it, as we do).
MAX_OFFSET = (1 << 63) - 1

REASONS = {200: "OK", 206: "Partial Content", 400: "Bad Request", 403: "Forbidden",
           404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
           414: "URI Too Long", 416: "Range Not Satisfiable",
           431: "Request Header Fields Too Large", 500: "Internal Server Error",
           501: "Not Implemented", 503: "Service Unavailable",
           505: "HTTP Version Not Supported"}
CONTENT_TYPES = {".json": "application/json", ".gpg": "application/pgp-signature",
                 ".asc": "application/pgp-signature"}

_METHOD = re.compile(r"[A-Z_-]{1,32}")
_VERSION = re.compile(r"HTTP/(\d)\.(\d)")
_FIELD_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_ABSOLUTE_FORM = re.compile(r"https?://[^/?#]*", re.IGNORECASE)
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_DIGITS = re.compile(r"[0-9]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class HTTPError(Exception):
    """A request answered with an error status and a short text body.

    CLOSE: the connection ends after the answer (with a lingering close: the client's
    unread bytes are drained first, so the answer is not lost to a reset).
    """

    def __init__(self, status: int, text: str = "", *, close: bool = False,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(text or REASONS.get(status, ""))
        self.status = status
        self.close = close
        self.headers = headers or {}


class UnsatisfiableRange(Exception):
    """The Range header is malformed or names no byte of the file (416, as nginx)."""


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
class RequestLine:
    """The first line of a request."""

    method: str
    target: str
    version: str


@dataclass(frozen=True)
class RequestHead:
    """A parsed request line and header fields (names lower-cased)."""

    method: str
    target: str
    version: str
    headers: dict[str, str]

    @property
    def keep_alive(self) -> bool:
        """Whether the client wants the connection kept after the answer (a request
        with a body never keeps it: the body is not read, so the next request would
        start inside it)."""
        if self.has_body:
            return False
        conn = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.1":
            return "close" not in conn
        return "keep-alive" in conn

    @property
    def has_body(self) -> bool:
        """Whether a body follows the head (we never read one)."""
        return "transfer-encoding" in self.headers or self.headers.get(
            "content-length", "0") != "0"


def find_head_end(buf: bytes | bytearray) -> tuple[int, int] | None:
    """Where the head in BUF ends: (end of the head, start of what follows), or None
    while the blank line has not arrived. Bare LF line ends count, as nginx reads them."""
    at = buf.find(b"\n")
    while at >= 0:
        if buf[at + 1:at + 2] == b"\n":
            return at, at + 2
        if buf[at + 1:at + 3] == b"\r\n":
            return at, at + 3
        at = buf.find(b"\n", at + 1)
    return None


def strip_leading_blank_lines(buf: bytes) -> bytes:
    """BUF without the empty lines a client may send before a request (RFC 9112 2.2)."""
    return buf.lstrip(b"\r\n")


def check_request_line(buf: bytes | bytearray) -> RequestLine | None:
    """The request line at the start of BUF once it is complete (None before), so that a
    bad one is answered at once rather than after a wait for headers that never come.
    HTTPError 414 past MAX_REQUEST_LINE, 400 for anything malformed."""
    end = buf.find(b"\n")
    if end < 0:
        if len(buf) > MAX_REQUEST_LINE:
            raise HTTPError(414, "request line too long", close=True)
        return None
    if end > MAX_REQUEST_LINE:
        raise HTTPError(414, "request line too long", close=True)
    return parse_request_line(buf[:end].rstrip(b"\r").decode("latin-1"))


def parse_request_line(line: str) -> RequestLine:
    """Method, target and version of a request line; HTTPError 400 or 505."""
    parts = line.split()
    if len(parts) == 2 and _METHOD.fullmatch(parts[0]):
        raise HTTPError(400, "HTTP/0.9 requests are not served", close=True)
    if len(parts) != 3 or not _METHOD.fullmatch(parts[0]):
        raise HTTPError(400, "bad request line", close=True)
    method, target, version = parts
    match = _VERSION.fullmatch(version)
    if not match:
        raise HTTPError(400, "bad HTTP version", close=True)
    if match.group(1) != "1":
        raise HTTPError(505, close=True)
    # HTTP/1.2..1.9 are read as the newest 1.x we know, as nginx does.
    version = "HTTP/1.0" if match.group(2) == "0" else "HTTP/1.1"
    if _CONTROL.search(target):
        raise HTTPError(400, "control character in the request target", close=True)
    return RequestLine(method, target, version)


def parse_request_head(data: bytes) -> RequestHead:
    """Parse a request head (without the blank line); HTTPError 400 (or 414, 431, 501,
    505) if malformed, with the field named."""
    text = data.decode("latin-1")
    lines = text.split("\n")
    first = parse_request_line(lines[0].rstrip("\r"))
    headers: dict[str, str] = {}
    for raw in lines[1:]:
        if len(raw) > MAX_HEADER_LINE:
            raise HTTPError(431, "header field too long", close=True)
        line = raw.rstrip("\r")
        name, sep, value = line.partition(":")
        if not sep or not _FIELD_NAME.fullmatch(name):
            raise HTTPError(400, "bad header line", close=True)
        key = name.lower()
        value = value.strip(" \t")
        if "\0" in value or "\r" in value:
            raise HTTPError(400, f"bad {name} value", close=True)
        # Repeated fields fold into one list, except where that would hide a conflict.
        if key in headers:
            if key in ("content-length", "host", "range", "if-range", "transfer-encoding"):
                raise HTTPError(400, f"repeated {name}", close=True)
            headers[key] += ", " + value
        else:
            headers[key] = value
    head = RequestHead(first.method, first.target, first.version, headers)
    check_framing(head)
    return head


def check_framing(head: RequestHead) -> None:
    """Refuse what nginx refuses about Host and a body's framing (400, 501)."""
    host = head.headers.get("host")
    if host is None and head.version == "HTTP/1.1":
        raise HTTPError(400, "HTTP/1.1 request without Host", close=True)
    if host is not None and (host == "" or any(c in host for c in "/\\ \t\0")
                             or host.startswith(".") or ".." in host):
        raise HTTPError(400, "bad Host", close=True)
    length = head.headers.get("content-length")
    coding = head.headers.get("transfer-encoding")
    if length is not None and not _DIGITS.fullmatch(length):
        raise HTTPError(400, "bad Content-Length", close=True)
    if coding is not None:
        if length is not None:
            raise HTTPError(400, "both Content-Length and Transfer-Encoding", close=True)
        if coding.lower() != "chunked":
            raise HTTPError(501, f"Transfer-Encoding {coding[:40]} not implemented",
                            close=True)


def _parse_offset(text: str) -> int:
    """A decimal byte position; UnsatisfiableRange past off_t (ASCII digits only)."""
    if not _DIGITS.fullmatch(text) or len(text) > 19 or int(text) > MAX_OFFSET:
        raise UnsatisfiableRange(text[:40])
    return int(text)


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The byte range a `Range` header asks of a SIZE-byte file, read as nginx reads it.

    None means "send the whole file": no header, another unit than `bytes=`, or several
    ranges (nodes never ask for them; docs/nginx.md sets `max_ranges 1`).
    UnsatisfiableRange (416) for a malformed `bytes=` set, as nginx answers, and for a
    range that names no byte of the file.
    """
    if header is None or header[:6].lower() != "bytes=":
        return None
    specs = header[6:].split(",")
    ranges = [_parse_one_range(spec, size, header) for spec in specs]
    satisfiable = [r for r in ranges if r is not None]
    if not satisfiable:
        raise UnsatisfiableRange(header[:80])
    if len(specs) > 1:
        return None
    return satisfiable[0]


def _parse_one_range(spec: str, size: int, header: str) -> ByteRange | None:
    """One `first-last` or `-suffix` of a Range header; None if it names no byte."""
    first, dash, last = spec.strip(" ").partition("-")
    first, last = first.strip(" "), last.strip(" ")
    if not dash:
        raise UnsatisfiableRange(header[:80])
    if first == "":
        suffix = _parse_offset(last)
        if suffix == 0 or size == 0:
            return None
        return ByteRange(max(size - suffix, 0), size - 1, size)
    start = _parse_offset(first)
    end = _parse_offset(last) if last else size - 1
    if end < start:
        raise UnsatisfiableRange(header[:80])
    if start >= size:
        return None
    return ByteRange(start, min(end, size - 1), size)


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
    except (TypeError, ValueError, IndexError, OverflowError):
        return False
    try:
        return int(when.timestamp()) == int(st.st_mtime)
    except (OverflowError, ValueError, OSError):
        return False


def resolve_target(root: Path, target: str) -> str:
    """The file under ROOT (a resolved path) that a request target names.

    Refuses, before touching the file system, anything that could name a place outside
    ROOT: `..` segments (also %-encoded), NUL bytes, targets that are not paths; and
    after resolving symlinks, any path that lands outside ROOT (403). Hidden names (a
    leading dot) are 404: the image tools write their temporary files under such names.
    The absolute form (`http://host/path`) is read as its path, as RFC 9112 asks.
    Plain strings, not Path objects: pathlib interns every component of every name a
    client invents.
    """
    absolute = _ABSOLUTE_FORM.match(target)
    if absolute:
        target = target[absolute.end():] or "/"
    if not target.startswith("/"):
        raise HTTPError(400, "request target must be a path", close=True)
    path = target.split("?", 1)[0].split("#", 1)[0]
    if _BAD_PERCENT.search(path):
        raise HTTPError(400, "bad %-escape in the path")
    decoded = _unquote(path)
    if b"\0" in decoded:
        raise HTTPError(400, "NUL in path")
    parts: list[str] = []
    for segment in decoded.decode("utf-8", "surrogateescape").split("/"):
        if segment in ("", "."):
            continue
        if segment == ".." or "\\" in segment:
            raise HTTPError(403, "path escapes the image directory")
        if segment.startswith("."):
            raise HTTPError(404)
        parts.append(segment)
    top = str(root)
    resolved = os.path.realpath(os.path.join(top, *parts))
    if resolved != top and not resolved.startswith(top.rstrip("/") + "/"):
        raise HTTPError(403, "path escapes the image directory")
    return resolved


def _unquote(path: str) -> bytes:
    """PATH with %XX escapes decoded (already checked to be well formed)."""
    pieces = path.split("%")
    out = bytearray(pieces[0].encode("latin-1"))
    for piece in pieces[1:]:
        out.append(int(piece[:2], 16))
        out += piece[2:].encode("latin-1")
    return bytes(out)


def guess_content_type(path: str) -> str:
    """The Content-Type of a served file."""
    name = os.path.basename(path)
    suffix = os.path.splitext(name)[1]
    if name.startswith("SHA256SUMS") and not suffix:
        return "text/plain; charset=utf-8"
    return CONTENT_TYPES.get(suffix, "application/octet-stream")


def escape_for_log(text: str, limit: int = 256) -> str:
    """TEXT with control characters escaped and cut at LIMIT characters: a request
    target can neither forge log lines nor make one megabytes long."""
    shown = text.encode("unicode_escape", "backslashreplace").decode("ascii")
    return shown if len(shown) <= limit else shown[:limit] + "..."
