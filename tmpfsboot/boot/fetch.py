"""Streaming HTTP(S) downloads: mirrors, jittered exponential back-off, resume, stalls.

A download hands each chunk to a sink as it arrives; nothing is kept whole in memory.
A broken transfer resumes with Range + If-Range; a server that ignores Range is read
from the start with the bytes already seen skipped; a file that changed on the server
cannot be continued and raises RestartRoot.
"""

from __future__ import annotations

import email.utils
import http.client
import logging
import os
import random
import socket
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

from .contract import CA_BUNDLES
from .errors import FetchError, PermanentHTTPError, RestartRoot, TransientFetchError
from .log import Progress
from .policy import Wait

log = logging.getLogger("tmpfsboot")

CHUNK = 1 << 20
MAX_REDIRECTS = 5
USER_AGENT = "tmpfsboot/0.1"

# Answers that will not change by asking again: go to the next mirror.
PERMANENT = frozenset({400, 401, 403, 404, 405, 410, 414, 451, 501})
RETRY_AFTER_STATUSES = frozenset({429, 503})

Sink = Callable[[memoryview], None]


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass
class RetryBudget:
    """Retries shared by every download of one root, and the back-off between them.

    The delay after the k-th failure in a row is drawn from [d, 4d] with d = BACKOFF * 2**k,
    at most 30 * BACKOFF (the boot default, 10 s, gives the seed's 10-39 s at first). When
    the server said when to come back (Retry-After), that time is used instead, stretched
    by up to half so that a fleet told the same time does not return all at once (and at
    least min(BACKOFF, 1 s), whatever the server said).
    """

    retries: int | None
    backoff: float
    wait: Wait = time.sleep
    used: int = 0
    streak: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, retry_after: float | None = None) -> float:
        """The next back-off delay in seconds."""
        if retry_after is not None:
            # floored: "Retry-After: 0" (or a past date) must not become a tight loop
            return max(retry_after, min(self.backoff, 1.0)) * self.rng.uniform(1.0, 1.5)
        base = self.backoff * (2 ** min(self.streak, 16))
        return min(self.rng.uniform(base, 4 * base), 30 * self.backoff)

    def fail(self, error: Exception, *, retry_after: float | None = None) -> None:
        """Count a failure: wait before the retry, or raise FetchError when none are left."""
        if self.retries is not None and self.used >= self.retries:
            raise FetchError(f"{error} (gave up after {self.used} retries)") from error
        self.used += 1
        delay = self.delay(retry_after)
        self.streak += 1
        log.warning("%s; retry %d in %.1f s", error, self.used, delay)
        self.wait(delay)

    def progressed(self) -> None:
        """Bytes arrived: the next failure starts the back-off from the beginning."""
        self.streak = 0


@dataclass(frozen=True)
class Validator:
    """What identifies one version of a file on a server, to resume it safely."""

    etag: str | None
    last_modified: str | None
    size: int | None

    def if_range(self) -> str | None:
        """The If-Range value: a strong ETag, else the Last-Modified date."""
        if self.etag and not self.etag.startswith("W/"):
            return self.etag
        return self.last_modified

    def same(self, other: Validator) -> bool:
        """Whether OTHER is evidently the same file version."""
        if self.size is not None and other.size is not None and self.size != other.size:
            return False
        if self.etag and other.etag:
            return self.etag == other.etag
        if self.last_modified and other.last_modified:
            return self.last_modified == other.last_modified
        return self.size is not None and self.size == other.size


@dataclass
class DownloadResult:
    """What a finished download did."""

    url: str
    size: int
    requests: int


def _connection(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        import ssl  # only loaded for https: it costs start-up time in the initramfs

        # SSL_CERT_FILE as OpenSSL reads it, else the bundle the hook copied in
        cafile = os.environ.get("SSL_CERT_FILE") or next(
            (c for c in CA_BUNDLES if os.path.exists(c)), None)
        context = ssl.create_default_context(cafile=cafile)
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            parts.hostname or "", parts.port, timeout=timeout, context=context
        )
    else:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return conn, path


def _describe(error: BaseException) -> str:
    if isinstance(error, socket.gaierror):
        return f"cannot resolve host name ({error.strerror})"
    if isinstance(error, TimeoutError | socket.timeout):
        return "stalled (no data within the timeout)"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, ConnectionResetError):
        return "connection reset"
    return str(error) or type(error).__name__


def open_url(
    url: str, *, timeout: float, headers: dict[str, str] | None = None
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse, str]:
    """GET URL (following redirects); the caller reads and closes the response.

    Raises TransientFetchError for failures worth retrying and PermanentHTTPError for
    permanent answers; returns 2xx answers (and 416) to the caller.
    """
    for _ in range(MAX_REDIRECTS + 1):
        conn, path = _connection(url, timeout)
        try:
            conn.request("GET", path, headers={"User-Agent": USER_AGENT, **(headers or {})})
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise TransientFetchError(f"{url}: {_describe(e)}") from e
        status = resp.status
        if status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
            location = urllib.parse.urljoin(url, resp.getheader("Location", ""))
            conn.close()
            if urllib.parse.urlsplit(location).scheme not in ("http", "https"):
                raise PermanentHTTPError(f"{url}: redirected to a non-HTTP URL {location}")
            url = location
            continue
        if 200 <= status < 300 or status == 416:
            return conn, resp, url
        reason = f"{url}: HTTP {status} {resp.reason}".rstrip()
        retry_after = parse_retry_after(resp.getheader("Retry-After"))
        conn.close()
        if status in PERMANENT:
            raise PermanentHTTPError(reason)
        raise TransientFetchError(
            reason, retry_after=retry_after if status in RETRY_AFTER_STATUSES else None
        )
    raise PermanentHTTPError(f"{url}: more than {MAX_REDIRECTS} redirects")


def _content_range(resp: http.client.HTTPResponse) -> tuple[int, int | None] | None:
    """(first byte, total size) from a 206's Content-Range."""
    value = resp.getheader("Content-Range", "")
    unit, _, rest = value.partition(" ")
    span, _, total = rest.partition("/")
    first, _, _last = span.partition("-")
    if unit != "bytes" or not first.isdigit():
        return None
    return int(first), int(total) if total.isdigit() else None


def _read_some(resp: http.client.HTTPResponse,
               view: memoryview) -> tuple[int, OSError | http.client.HTTPException | None]:
    """Fill VIEW from RESP as far as the data goes: (bytes read, the error that stopped it).

    Bytes that arrived before a stall or a reset are kept, so the resume starts after
    them: readinto() loses what its buffered reader had gathered when the error comes,
    and a link that stalls every few hundred kB would never get past its first MiB.
    """
    got = 0
    while got < len(view):
        try:
            n = resp.readinto1(view[got:])
        except (OSError, http.client.HTTPException) as e:
            return got, e
        if n == 0:
            break
        got += n
    return got, None


class Download:
    """One file fetched from a list of mirror URLs into a sink, across failures.

    While it runs it keeps where the transfer is (OFFSET bytes handed to the sink, the
    VALIDATOR of the file version they came from) so that a retry resumes there.
    """

    def __init__(self, urls: list[str], *, budget: RetryBudget, timeout: float,
                 label: str, progress: bool = True) -> None:
        self.urls = urls
        self.budget = budget
        self.timeout = timeout
        self.label = label
        self.show_progress = progress
        self.dead: dict[str, str] = {}
        self.requests = 0
        self.offset = 0
        self.validator: Validator | None = None
        self.progress: Progress | None = None
        self.view = memoryview(bytearray(CHUNK))

    def _next_url(self, current: int) -> int:
        alive = [i for i, u in enumerate(self.urls) if u not in self.dead]
        if not alive:
            raise PermanentHTTPError("; ".join(self.dead.values()))
        later = [i for i in alive if i > current]
        return later[0] if later else alive[0]

    def run(self, sink: Sink) -> DownloadResult:
        """Stream the file into SINK, chunk by chunk, exactly once from byte 0 to the end.

        Raises PermanentHTTPError when every mirror answered permanently, FetchError when
        the retry budget is spent, RestartRoot when the file changed under a resume.
        Exceptions from SINK propagate unchanged.
        """
        self.offset, self.validator, self.progress = 0, None, None
        index = self._next_url(-1)
        while True:
            url = self.urls[index]
            try:
                return self._attempt(url, sink)
            except PermanentHTTPError as e:
                self.dead[url] = str(e)
                index = self._next_url(index)
                log.warning("%s; trying the next mirror", e)
            except TransientFetchError as e:
                self.budget.fail(e, retry_after=e.retry_after)
                index = self._next_url(index)

    def _resume_headers(self) -> dict[str, str]:
        """Range (and If-Range) to continue after the bytes already handed on, if any."""
        headers: dict[str, str] = {}
        if self.offset and self.validator is not None:
            headers["Range"] = f"bytes={self.offset}-"
            if self.validator.if_range():
                headers["If-Range"] = self.validator.if_range() or ""
        return headers

    def _attempt(self, url: str, sink: Sink) -> DownloadResult:
        """One request to URL, its answer checked and its body streamed into SINK."""
        self.requests += 1
        conn, resp, final_url = open_url(url, timeout=self.timeout,
                                         headers=self._resume_headers())
        try:
            skip, total, self.validator = self._check_answer(
                final_url, resp, self.offset, self.validator)
            if self.progress is None:
                self.progress = Progress(self.label, total)
                if not self.show_progress:
                    self.progress.interval = float("inf")
            self._stream(final_url, resp, sink, skip=skip, total=total)
        finally:
            conn.close()
        return DownloadResult(url=final_url, size=self.offset, requests=self.requests)

    def _stream(self, url: str, resp: http.client.HTTPResponse, sink: Sink, *,
                skip: int, total: int | None) -> None:
        """RESP's body into SINK up to TOTAL bytes (or its end), its first SKIP bytes
        dropped; TransientFetchError, after handing on what arrived, when it breaks."""
        remaining = None if total is None else total - self.offset
        got_any = False
        while remaining is None or remaining > 0:
            want = CHUNK if remaining is None else min(CHUNK, remaining + skip)
            n, failure = _read_some(resp, self.view[:want])
            if n == 0 and failure is None and remaining is None:
                break  # the end of a body of unknown length
            if n == 0 and failure is None:
                raise TransientFetchError(
                    f"{url}: connection closed after {self.offset} of {total} bytes")
            dropped = min(skip, n)
            skip -= dropped
            chunk = self.view[dropped:n]
            if chunk:
                self._deliver(chunk, sink)
                if remaining is not None:
                    remaining -= len(chunk)
                if not got_any:
                    got_any = True
                    self.budget.progressed()
            if failure is not None:
                raise TransientFetchError(
                    f"{url}: {_describe(failure)} after {self.offset} bytes") from failure

    def _deliver(self, chunk: memoryview, sink: Sink) -> None:
        sink(chunk)
        self.offset += len(chunk)
        assert self.progress is not None
        self.progress.update(len(chunk))

    def _check_answer(self, url: str, resp: http.client.HTTPResponse, offset: int,
                      validator: Validator | None) -> tuple[int, int | None, Validator]:
        """(bytes to skip, total size, validator) for an answer at OFFSET."""
        length = resp.getheader("Content-Length")
        size = int(length) if length and length.isdigit() else None
        if resp.status == 206:
            span = _content_range(resp)
            total = span[1] if span else None
        else:
            total = size
        seen = Validator(resp.getheader("ETag"), resp.getheader("Last-Modified"), total)
        if resp.status == 416:
            raise RestartRoot(f"{url}: the server refused to resume at byte {offset}; "
                              "the file changed")
        if validator is None or offset == 0:
            if resp.status == 206:
                raise TransientFetchError(f"{url}: unexpected partial answer")
            return 0, total, seen
        if not validator.same(seen):
            raise RestartRoot(f"{url} changed on the server during the download "
                              f"(ETag {validator.etag} -> {seen.etag}); starting again")
        if resp.status == 206:
            if span is None or span[0] != offset:
                raise RestartRoot(f"{url}: resumed at the wrong byte ({span}); starting again")
            return 0, total, validator
        log.info("%s: the server ignored Range; skipping %d bytes", url, offset)
        return offset, total, validator


def fetch_bytes(urls: list[str], *, budget: RetryBudget, timeout: float, label: str,
                limit: int = 16 << 20) -> tuple[bytes, str]:
    """A small file (SHA256SUMS, a signature, a manifest) in memory, and the URL it came from."""
    parts: list[bytes] = []
    size = 0

    def collect(chunk: memoryview) -> None:
        nonlocal size
        size += len(chunk)
        if size > limit:
            raise FetchError(f"{label}: larger than {limit} bytes")
        parts.append(bytes(chunk))

    result = Download(urls, budget=budget, timeout=timeout, label=label,
                      progress=False).run(collect)
    return b"".join(parts), result.url


def sibling_urls(urls: list[str], name: str) -> list[str]:
    """The URL of file NAME in the same directory as each of URLS."""
    return [urllib.parse.urljoin(u, name) for u in urls]


def image_name(url: str) -> str:
    """The file name at the end of an image URL, percent-decoded."""
    return urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])

