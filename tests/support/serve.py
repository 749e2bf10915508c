"""Test helpers for image servers: raw HTTP on loopback, stream-holding clients, and
Debian's nginx started from the configuration text in docs/nginx.md."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from support import REPO

NGINX = Path("/usr/sbin/nginx")
NGINX_DOC = REPO / "docs" / "nginx.md"


@dataclass(frozen=True)
class Response:
    """A parsed HTTP answer: status, headers (names lower-cased) and body."""

    status: int
    headers: dict[str, str]
    body: bytes


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def read_head(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read a response head from SOCK: status, headers, and body bytes already read."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed after {buf!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, rest


def raw_request(port: int, request: bytes, *, timeout: float = 10.0) -> Response:
    """Send REQUEST bytes exactly as given (no client-side path clean-up) on a new
    connection to 127.0.0.1:PORT and read one answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        status, headers, body = read_head(sock)
        if "content-length" in headers and not request.startswith(b"HEAD "):
            want = int(headers["content-length"])
            while len(body) < want:
                chunk = sock.recv(min(1 << 20, want - len(body)))
                if not chunk:
                    break
                body += chunk
        return Response(status, headers, body)


def get(port: int, target: str, headers: dict[str, str] | None = None, *,
        method: str = "GET") -> Response:
    """One request with Connection: close and HEADERS."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return raw_request(port, ("\r\n".join(lines) + "\r\n\r\n").encode())


class HeldStreams(list[tuple[int, dict[str, str]]]):
    """Each holding client's (status, headers), and their sockets until released."""

    def __init__(self) -> None:
        super().__init__()
        self.sockets: list[socket.socket] = []

    def release(self) -> None:
        """Close every holding connection: the server's transfers end."""
        for s in self.sockets:
            s.close()
        self.sockets.clear()


@contextlib.contextmanager
def held_streams(port: int, target: str, count: int) -> Iterator[HeldStreams]:
    """COUNT clients, one after another, each asking for TARGET and then reading nothing
    more than the answer's head (tiny receive buffers), so a granted transfer stays open.
    Yields each client's (status, headers); releases them all on exit."""
    held = HeldStreams()
    try:
        for _ in range(count):
            s = socket.socket()
            held.sockets.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.settimeout(10)
            s.connect(("127.0.0.1", port))
            s.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            status, headers, _ = read_head(s)
            held.append((status, headers))
        yield held
    finally:
        held.release()


def has_slice_module() -> bool:
    """Whether this nginx was built with the slice module (the caching proxy needs it)."""
    if not NGINX.exists():
        return False
    out = subprocess.run([str(NGINX), "-V"], capture_output=True, text=True)
    return "http_slice_module" in out.stderr


def nginx_blocks() -> list[str]:
    """The ```nginx fenced blocks of docs/nginx.md, in order."""
    text = NGINX_DOC.read_text(encoding="utf-8")
    return re.findall(r"^```nginx\n(.*?)^```$", text, flags=re.M | re.S)


def substitute(config: str, replacements: dict[str, str]) -> str:
    """CONFIG with each placeholder replaced; fails if the doc no longer has one (the
    test would otherwise silently test something else)."""
    for old, new in replacements.items():
        assert old in config, f"docs/nginx.md no longer contains {old!r}"
        config = config.replace(old, new)
    return config


@dataclass(frozen=True)
class Nginx:
    """A running nginx: its port, prefix directory and access log."""

    port: int
    prefix: Path
    access_log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"


def with_temp_paths(config: str, prefix: Path) -> str:
    """CONFIG with nginx's temporary paths inside PREFIX, not Debian's /var/lib/nginx."""
    temp = "".join(f"    {kind}_temp_path {prefix}/{kind}_temp;\n"
                   for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return config.replace("http {\n", "http {\n" + temp, 1)


@contextlib.contextmanager
def running_nginx(config: str, prefix: Path, *, port: int) -> Iterator[Nginx]:
    """Run /usr/sbin/nginx in the foreground with CONFIG (already pointing into PREFIX,
    listening on 127.0.0.1:PORT) until the block ends."""
    prefix.mkdir(parents=True, exist_ok=True)
    config = with_temp_paths(config, prefix)
    conf = prefix / "nginx.conf"
    conf.write_text(config, encoding="utf-8")
    error_log = prefix / "startup-error.log"
    proc = subprocess.Popen([str(NGINX), "-p", str(prefix), "-c", str(conf), "-e",
                             str(error_log), "-g", "daemon off;"],
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise AssertionError(f"nginx exited {proc.returncode}: {err}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield Nginx(port=port, prefix=prefix, access_log=prefix / "access.log")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def origin_config(root: Path, prefix: Path, port: int, *, streams: int = 64) -> str:
    """docs/nginx.md's origin configuration, pointed at ROOT and PREFIX on PORT."""
    return substitute(nginx_blocks()[0], {
        "user www-data;": "user root;",
        "/run/nginx-tmpfsboot.pid": f"{prefix}/nginx.pid",
        "/var/log/nginx/tmpfsboot-error.log": f"{prefix}/error.log",
        "/var/log/nginx/tmpfsboot-access.log": f"{prefix}/access.log",
        "/srv/tmpfsboot": str(root),
        "listen 8080 ": f"listen 127.0.0.1:{port} ",
        "tmpfsboot_streams 64;": f"tmpfsboot_streams {streams};",
    })


def cache_config(origin_port: int, prefix: Path, port: int, *, origin_host: str = "127.0.0.1",
                 bind: str = "127.0.0.1") -> str:
    """docs/nginx.md's caching proxy configuration on BIND:PORT in front of
    ORIGIN_HOST:ORIGIN_PORT."""
    return substitute(nginx_blocks()[1], {
        "user www-data;": "user root;",
        "/run/nginx-tmpfsboot-cache.pid": f"{prefix}/nginx.pid",
        "/var/log/nginx/tmpfsboot-cache-error.log": f"{prefix}/error.log",
        "/var/log/nginx/tmpfsboot-cache-access.log": f"{prefix}/access.log",
        "/var/cache/nginx/tmpfsboot": f"{prefix}/cache",
        "images.example.org:8080": f"{origin_host}:{origin_port}",
        "listen 8081 ": f"listen {bind}:{port} ",
    })


@contextlib.contextmanager
def nginx_origin(root: Path, prefix: Path, *, streams: int = 64) -> Iterator[Nginx]:
    """nginx serving ROOT with the doc's origin configuration on a free loopback port."""
    port = free_port()
    with running_nginx(origin_config(root, prefix, port, streams=streams), prefix,
                       port=port) as nginx:
        yield nginx
