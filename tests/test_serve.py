"""`tmpfsboot serve`: the embedded image server, exercised over real loopback sockets."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.serve import free_port, get, held_streams, raw_request

from tmpfsboot.boot.errors import UsageError
from tmpfsboot.host.request import (
    ByteRange,
    HTTPError,
    UnsatisfiableRange,
    parse_range,
    parse_request_head,
    resolve_target,
)
from tmpfsboot.host.serve import ImageServer, start_server

# -- unit -------------------------------------------------------------------------------



@pytest.mark.unit
@pytest.mark.parametrize(("header", "size", "expected"), [
    (None, 1000, None),
    ("bytes=0-99", 1000, ByteRange(0, 99, 1000)),
    ("bytes=100-", 1000, ByteRange(100, 999, 1000)),
    ("bytes=-100", 1000, ByteRange(900, 999, 1000)),
    ("bytes=-5000", 1000, ByteRange(0, 999, 1000)),
    ("bytes=990-5000", 1000, ByteRange(990, 999, 1000)),
    ("bytes=999-999", 1000, ByteRange(999, 999, 1000)),
    ("bytes=0-1,5-6", 1000, None),      # several ranges: whole file (nginx max_ranges 1)
    ("items=0-1", 1000, None),          # unknown unit: ignored
    ("bytes = 0-1", 1000, None),        # not `bytes=`: ignored, as nginx does
    ("BYTES=0-1", 1000, ByteRange(0, 1, 1000)),
    ("bytes= 0 - 1", 1000, ByteRange(0, 1, 1000)),
])
def test_parse_range(header: str | None, size: int, expected: ByteRange | None) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.unit
@pytest.mark.parametrize(("header", "size"), [
    ("bytes=1000-", 1000), ("bytes=5000-6000", 1000), ("bytes=-0", 1000), ("bytes=0-", 0),
    # malformed byte ranges are 416, as nginx answers them
    ("bytes=5-1", 1000), ("bytes=a-b", 1000), ("bytes=-", 1000), ("bytes=\xb2-", 1000),
    ("bytes=" + "9" * 5000 + "-", 1000), ("bytes=0-" + "9" * 5000, 1000),
    ("bytes=9223372036854775808-", 1000), ("bytes=+5-", 1000), ("bytes=0-1,", 1000),
    ("bytes=\u0661-", 1000)])
def test_parse_range_unsatisfiable(header: str, size: int) -> None:
    with pytest.raises(UnsatisfiableRange):
        parse_range(header, size)


@pytest.mark.unit
def test_byte_range_content_range() -> None:
    assert ByteRange(900, 999, 1000).content_range() == "bytes 900-999/1000"
    assert ByteRange(900, 999, 1000).length == 100


@pytest.mark.unit
def test_parse_request_head() -> None:
    head = parse_request_head(b"GET /a.tar.zst HTTP/1.1\r\nHost: x\r\nRange: bytes=1-\r\n"
                              b"Connection: close")
    assert (head.method, head.target, head.version) == ("GET", "/a.tar.zst", "HTTP/1.1")
    assert head.headers["range"] == "bytes=1-"
    assert not head.keep_alive
    assert parse_request_head(b"GET / HTTP/1.1\r\nHost: x").keep_alive
    assert not parse_request_head(b"GET / HTTP/1.0").keep_alive
    # bare LF line ends, and HTTP/1.x past 1.1 read as 1.1, as nginx reads them
    lf = parse_request_head(b"GET / HTTP/1.2\nHost: x\nRange: bytes=0-")
    assert (lf.version, lf.headers) == ("HTTP/1.1", {"host": "x", "range": "bytes=0-"})
    assert not parse_request_head(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5"
                                  ).keep_alive


@pytest.mark.unit
@pytest.mark.parametrize(("head", "status"), [
    (b"GET /", 400), (b"GET / HTTP/2.0", 505), (b"GET / HTTP/1.1\r\nbad line", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nRange: bytes=0-\r\nRange: bytes=5-", 400),
    (b"GET / HTTP/1.1", 400),  # HTTP/1.1 without Host
    (b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip", 501),
    (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: x", 400),
    (b"get / HTTP/1.1\r\nHost: x", 400), (b"GET / HTTP/x.y\r\nHost: x", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX A: b", 400)])
def test_parse_request_head_refuses_malformed(head: bytes, status: int) -> None:
    with pytest.raises(HTTPError) as e:
        parse_request_head(head)
    assert e.value.status == status


@pytest.mark.unit
@pytest.mark.parametrize(("target", "status"), [
    ("/../etc/passwd", 403), ("/a/../../etc/passwd", 403), ("/%2e%2e/etc/passwd", 403),
    ("/%2E%2E%2Fetc%2Fpasswd", 403), ("/..%2f..%2fetc/passwd", 403), ("/a\\..\\x", 403),
    ("/.tmpfile", 404), ("/x%00y", 400), ("etc/passwd", 400), ("*", 400),
    ("/%zz", 400), ("/a%2", 400), ("http://evil/../etc/passwd", 403)])
def test_resolve_target_refuses_escapes(tmp_path: Path, target: str, status: int) -> None:
    with pytest.raises(HTTPError) as e:
        resolve_target(tmp_path, target)
    assert e.value.status == status


@pytest.mark.unit
def test_resolve_target_stays_under_root(tmp_path: Path) -> None:
    assert resolve_target(tmp_path, "//etc/passwd") == str(tmp_path / "etc/passwd")
    assert resolve_target(tmp_path, "/a/./b?x=1") == str(tmp_path / "a/b")
    assert resolve_target(tmp_path, "/with%20space") == str(tmp_path / "with space")
    # the absolute form is read as its path (RFC 9112 3.2.2), as nginx does
    assert resolve_target(tmp_path, "http://h:1/a/b") == str(tmp_path / "a/b")


# -- integration ------------------------------------------------------------------------

BIG = 64 << 20      # larger than any socket buffers: a client that reads nothing holds it


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("served")
    (root / "root.tar.zst").write_bytes(os.urandom(3 << 20))
    (root / "SHA256SUMS").write_text("0" * 64 + " *root.tar.zst\n")
    with open(root / "big.img", "wb") as f:
        f.truncate(BIG)
    (root / "sub").mkdir()
    (root / "sub/host.tar.gz").write_bytes(b"layer")
    (root / ".root.tar.zst.partial.tmp").write_bytes(b"half")
    (root / "inside-link").symlink_to("root.tar.zst")
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret").write_text("secret\n")
    (root / "outside-link").symlink_to(outside / "secret")
    (root / "outside-dir").symlink_to(outside)
    os.mkfifo(root / "fifo")
    return root


@pytest.fixture(scope="module")
def server(image_dir: Path) -> Iterator[ImageServer]:
    with start_server(image_dir, max_streams=64) as srv:
        yield srv


@pytest.mark.integration
def test_get_sends_whole_file_with_validators(server: ImageServer, image_dir: Path) -> None:
    r = get(server.port, "/root.tar.zst")
    data = (image_dir / "root.tar.zst").read_bytes()
    assert r.status == 200
    assert r.body == data
    assert r.headers["content-length"] == str(len(data))
    assert r.headers["accept-ranges"] == "bytes"
    assert r.headers["etag"].startswith('"') and r.headers["etag"].endswith('"')
    mtime = email.utils.parsedate_to_datetime(r.headers["last-modified"]).timestamp()
    assert int(mtime) == int((image_dir / "root.tar.zst").stat().st_mtime)
    assert server.url == f"http://127.0.0.1:{server.port}/"


@pytest.mark.integration
def test_head_gives_sizes_without_body(server: ImageServer, image_dir: Path) -> None:
    for name in ("root.tar.zst", "big.img", "SHA256SUMS"):
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(f"HEAD /{name} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            time.sleep(0.05)
            s.sendall(b"HEAD /SHA256SUMS HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        first, second = data.split(b"\r\n\r\n")[:2]
        assert f"Content-Length: {(image_dir / name).stat().st_size}".encode() in first
        # No body after the first head: the next bytes are the second answer.
        assert second.startswith(b"HTTP/1.1 200")


@pytest.mark.integration
@pytest.mark.parametrize(("range_header", "start", "end"), [
    ("bytes=0-99", 0, 99), ("bytes=1000-", 1000, None), ("bytes=-4096", -4096, None),
    ("bytes=100-99999999999", 100, None)])
def test_range_answers_206_with_content_range(server: ImageServer, image_dir: Path,
                                              range_header: str, start: int,
                                              end: int | None) -> None:
    data = (image_dir / "root.tar.zst").read_bytes()
    want = data[start:] if end is None else data[start:end + 1]
    first = start % len(data)
    r = get(server.port, "/root.tar.zst", {"Range": range_header})
    assert r.status == 206
    assert r.body == want
    assert r.headers["content-length"] == str(len(want))
    assert r.headers["content-range"] == f"bytes {first}-{first + len(want) - 1}/{len(data)}"


@pytest.mark.integration
def test_unsatisfiable_range_is_416_with_size(server: ImageServer, image_dir: Path) -> None:
    size = (image_dir / "root.tar.zst").stat().st_size
    r = get(server.port, "/root.tar.zst", {"Range": f"bytes={size}-"})
    assert r.status == 416
    assert r.headers["content-range"] == f"bytes */{size}"


@pytest.mark.integration
def test_if_range_gives_206_only_while_the_file_is_unchanged(server: ImageServer,
                                                             image_dir: Path) -> None:
    first = get(server.port, "/root.tar.zst", {"Range": "bytes=0-9"})
    etag, date = first.headers["etag"], first.headers["last-modified"]
    for validator in (etag, date):
        r = get(server.port, "/root.tar.zst", {"Range": "bytes=10-", "If-Range": validator})
        assert r.status == 206
    stale_date = email.utils.formatdate(0, usegmt=True)
    for validator in ('"other-etag"', f"W/{etag}", stale_date):
        r = get(server.port, "/root.tar.zst", {"Range": "bytes=10-", "If-Range": validator})
        assert r.status == 200
        assert len(r.body) == (image_dir / "root.tar.zst").stat().st_size


@pytest.mark.integration
def test_etag_changes_when_an_image_is_replaced(server: ImageServer, image_dir: Path) -> None:
    path = image_dir / "sub/host.tar.gz"
    before = get(server.port, "/sub/host.tar.gz").headers["etag"]
    tmp = image_dir / "sub/.new"
    tmp.write_bytes(b"layer")   # same size and content, new file
    os.replace(tmp, path)
    after = get(server.port, "/sub/host.tar.gz")
    assert after.headers["etag"] != before
    r = get(server.port, "/sub/host.tar.gz", {"Range": "bytes=1-", "If-Range": before})
    assert (r.status, r.body) == (200, b"layer")


@pytest.mark.integration
@pytest.mark.parametrize(("target", "statuses"), [
    ("/../../../../etc/passwd", {403}),
    ("/%2e%2e/%2e%2e/%2e%2e/etc/passwd", {403}),
    ("/sub/%2E%2E/%2E%2E/%2E%2E/etc/passwd", {403}),
    ("/..%2F..%2F..%2Fetc%2Fpasswd", {403}),
    ("//etc/passwd", {404}),
    ("/etc/passwd", {404}),
    ("/outside-link", {403}),
    ("/outside-dir/secret", {403}),
    ("/.root.tar.zst.partial.tmp", {404}),
    ("/sub", {404}),
    ("/fifo", {404}),
    ("/", {404}),
    ("http://127.0.0.1/etc/passwd", {404}),
    ("*", {400}),
])
def test_path_escapes_are_refused(server: ImageServer, target: str,
                                  statuses: set[int]) -> None:
    r = raw_request(server.port, f"GET {target} HTTP/1.1\r\nHost: x\r\n"
                    f"Connection: close\r\n\r\n".encode())
    assert r.status in statuses
    assert b"root:" not in r.body and b"secret" not in r.body


@pytest.mark.integration
def test_symlink_inside_root_is_served(server: ImageServer, image_dir: Path) -> None:
    r = get(server.port, "/inside-link")
    assert (r.status, r.body) == (200, (image_dir / "root.tar.zst").read_bytes())


@pytest.mark.integration
def test_other_methods_are_405(server: ImageServer) -> None:
    r = raw_request(server.port, b"DELETE /root.tar.zst HTTP/1.1\r\nHost: x\r\n"
                    b"Connection: close\r\n\r\n")
    assert r.status == 405
    assert r.headers["allow"] == "GET, HEAD"


@pytest.mark.integration
def test_keep_alive_serves_several_requests_on_one_connection(server: ImageServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"GET /sub/host.tar.gz HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /SHA256SUMS HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.count(b"HTTP/1.1 200 OK") == 2
    assert b"\r\n\r\nlayerHTTP/1.1 200 OK" in data


@pytest.mark.integration
def test_access_log_names_client_method_path_status_bytes_duration(
        image_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="tmpfsboot.serve"), \
            start_server(image_dir) as srv:
        get(srv.port, "/sub/host.tar.gz", {"Range": "bytes=1-2"})
        get(srv.port, "/nope")
        srv.stop()
    lines = [r.getMessage() for r in caplog.records if r.name == "tmpfsboot.serve"]
    assert len(lines) == 2
    ok = lines[0].split()
    assert ok[0].startswith("127.0.0.1:")
    assert lines[0].split(" ", 1)[1].startswith('"GET /sub/host.tar.gz" 206 2 ')
    assert ok[-1].endswith("s") and float(ok[-1][:-1]) >= 0
    assert '"GET /nope" 404' in lines[1]
    assert srv.snapshot().recent == (("GET", "/sub/host.tar.gz", 206), ("GET", "/nope", 404))


@pytest.mark.integration
def test_streams_past_the_cap_get_503_with_retry_after(image_dir: Path) -> None:
    cap, clients = 4, 10
    with start_server(image_dir, max_streams=cap, retry_after=7, access_log=False) as srv:
        with held_streams(srv.port, "/big.img", clients) as answers:
            statuses = [status for status, _ in answers]
            assert statuses.count(200) == cap
            assert statuses.count(503) == clients - cap
            assert all(h["retry-after"] == "7" for s, h in answers if s == 503)
            # Small files stay available at the cap: a node needs them to start.
            assert get(srv.port, "/SHA256SUMS").status == 200
            assert srv.snapshot().streams == cap
        # Slots come back when the holders go away.
        deadline = time.monotonic() + 5
        while srv.snapshot().streams and time.monotonic() < deadline:
            time.sleep(0.02)
        assert get(srv.port, "/root.tar.zst").status == 200
        assert srv.snapshot().count(503) == clients - cap


async def _slow_download(port: int, target: str, *, chunk: int, pause: float) -> bytes:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=chunk)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    body = bytearray()
    while data := await reader.read(chunk):
        body += data
        await asyncio.sleep(pause)
    writer.close()
    return bytes(body)


async def _many_slow_downloads(port: int, target: str, count: int) -> list[bytes]:
    return await asyncio.gather(*(
        _slow_download(port, target, chunk=16384, pause=0.01) for _ in range(count)))


@pytest.mark.integration
def test_hundreds_of_concurrent_slow_clients_are_all_served(tmp_path: Path) -> None:
    clients = 400
    data = os.urandom(1 << 20)
    (tmp_path / "root.tar.zst").write_bytes(data)
    with start_server(tmp_path, max_streams=1000, access_log=False) as srv:
        started = time.monotonic()
        bodies = asyncio.run(asyncio.wait_for(
            _many_slow_downloads(srv.port, "/root.tar.zst", clients), timeout=120))
        elapsed = time.monotonic() - started
        assert len(bodies) == clients
        want = hashlib.sha256(data).hexdigest()
        assert all(hashlib.sha256(b).hexdigest() == want for b in bodies)
        snap = srv.snapshot()
        assert (snap.answered, snap.count(200)) == (clients, clients)
        # They really were in flight together, not one after another.
        assert snap.peak_streams >= clients // 2
    print(f"{clients} slow clients x 1 MiB: {elapsed:.1f} s, peak {snap.peak_streams} "
          f"concurrent streams")


# -- the command line -------------------------------------------------------------------


@pytest.mark.integration
def test_serve_verb_serves_until_sigterm(image_dir: Path) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tmpfsboot", "serve", str(image_dir),
                             "--port", str(port), "--max-streams", "2"],
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                r = get(port, "/sub/host.tar.gz")
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
        assert (r.status, r.body) == (200, b"layer")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read().decode() if proc.stderr else ""
    assert f"at http://127.0.0.1:{port}/" in err
    assert '"GET /sub/host.tar.gz" 200 5 ' in err


@pytest.mark.integration
def test_start_server_refuses_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="missing"):
        start_server(tmp_path / "missing")


@pytest.mark.integration
def test_client_trickling_its_request_is_dropped_at_the_timeout(image_dir: Path) -> None:
    with start_server(image_dir, timeout=0.5, access_log=False) as srv, \
            socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        started = time.monotonic()
        answer = b""
        for _ in range(30):
            with contextlib.suppress(BlockingIOError):
                answer = s.recv(65536, socket.MSG_DONTWAIT)
            if answer:
                break
            try:
                s.sendall(b"X")
            except OSError:
                break  # reset by the server after its answer
            time.sleep(0.1)
        elapsed = time.monotonic() - started
        # Dropped at the 0.5 s deadline although a byte came every 0.1 s.
        assert elapsed < 1.5
        assert answer.startswith(b"HTTP/1.1 408") or answer == b""
        assert srv.snapshot().recent[-1:] in ((), (("-", "-", 408),))


@pytest.mark.integration
def test_serves_on_ipv6_loopback(image_dir: Path) -> None:
    with start_server(image_dir, bind="::1", access_log=False) as srv:
        assert srv.url == f"http://[::1]:{srv.port}/"
        with socket.create_connection(("::1", srv.port), timeout=5) as s:
            s.sendall(b"GET /sub/host.tar.gz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"\r\n\r\nlayer")


@pytest.mark.unit
@pytest.mark.parametrize("argv", [["--max-streams", "0"], ["--timeout", "0"],
                                  ["--port", "x"], ["--min-rate", "fast"],
                                  ["--min-rate", "-1k"], ["--max-streams-per-client", "0"],
                                  ["--min-rate-window", "0"]])
def test_serve_verb_refuses_bad_options(tmp_path: Path, argv: list[str]) -> None:
    from tmpfsboot import cli
    assert cli.main(["serve", str(tmp_path), *argv]) == 2


@pytest.mark.unit
@pytest.mark.parametrize(("text", "rate"), [("0", 0), ("65536", 65536), ("64k", 65536),
                                            ("1M", 1 << 20), ("2g", 2 << 30)])
def test_parse_rate(text: str, rate: int) -> None:
    from tmpfsboot.cli.serve import parse_rate
    assert parse_rate(text) == rate


@pytest.mark.unit
@pytest.mark.parametrize("text", ["", "k", "1.5k", "-1", "\u0661k", "64kb"])
def test_parse_rate_refuses(text: str) -> None:
    from tmpfsboot.cli.serve import parse_rate
    with pytest.raises(ValueError):
        parse_rate(text)
