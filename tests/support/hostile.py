"""Hostile clients for `tmpfsboot serve` and nginx: raw bytes in, one classified answer
out, and the "server under hostile clients" section of docs/reliability.md.

An answer is classified as the status of the first HTTP answer (`416`), `close` (the
server ended the connection without a byte), `reset`, `timeout` (nothing within the
client's patience) or `HTTP/0.9 body` (bytes without a status line).
"""

from __future__ import annotations

import contextlib
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from support.report import read_file, replace_between, write_file
from support.serve import Nginx, free_port, running_nginx

BEGIN = "<!-- hostile-server:begin -->"
END = "<!-- hostile-server:end -->"
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


@dataclass(frozen=True)
class Answer:
    """What one request got back."""

    kind: str                # a status ("416"), "close", "reset", "timeout", "HTTP/0.9 body"
    headers: dict[str, str]
    raw: bytes
    seconds: float
    clean_eof: bool          # the server's close was a FIN, not a reset


def classify(data: bytes, *, error: str = "") -> tuple[str, dict[str, str]]:
    """The kind and headers of the first answer in DATA."""
    if not data:
        return error or "close", {}
    match = _STATUS_LINE.match(data)
    if not match:
        return "HTTP/0.9 body", {}
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return match.group(1).decode(), headers


def ask(port: int, request: bytes, *, half_close: bool = False, patience: float = 3.0,
        source: str = "127.0.0.1") -> Answer:
    """Send REQUEST on a new connection; read until the server closes, or PATIENCE
    seconds pass without a byte (then `timeout` if nothing came at all). HALF_CLOSE: send
    FIN after the request, as a client with nothing more to say."""
    started = time.monotonic()
    data = b""
    error = ""
    clean = False
    with socket.socket() as s:
        s.bind((source, 0))
        s.settimeout(patience)
        s.connect(("127.0.0.1", port))
        try:
            s.sendall(request)
            if half_close:
                s.shutdown(socket.SHUT_WR)
            while chunk := s.recv(65536):
                data += chunk
            clean = True
        except TimeoutError:
            error = "timeout"
        except ConnectionResetError:
            error = "reset"
        except BrokenPipeError:
            error = "reset"
    kind, headers = classify(data, error=error)
    return Answer(kind, headers, data, time.monotonic() - started, clean)


def minimal_nginx_config(root: Path, prefix: Path, port: int) -> str:
    """nginx with a minimal configuration serving ROOT: the reference a new user compares
    against (docs/nginx.md's production setup adds a cap and `max_ranges 1`)."""
    return f"""
user root;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log {prefix}/access.log;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
"""


@contextlib.contextmanager
def minimal_nginx(root: Path, prefix: Path) -> Iterator[Nginx]:
    """nginx with minimal_nginx_config on a free loopback port."""
    port = free_port()
    with running_nginx(minimal_nginx_config(root, prefix, port), prefix, port=port) as n:
        yield n


def vm_rss(pid: int) -> int:
    """Resident set size of process PID in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def write_section(path: str, block: str) -> None:
    """Replace the text between BEGIN and END in PATH (append it if absent)."""
    write_file(path, replace_between(read_file(path), BEGIN, END, f"\n{block.strip()}\n"))
