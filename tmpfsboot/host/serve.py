"""`tmpfsboot serve DIR`: the embedded image server, started from the command line.

The server itself is `imageserver.ImageServer` (one asyncio loop in one thread, sendfile,
a stream cap with 503 + Retry-After, a minimum rate, bounded memory); what it reads from
clients is parsed in request.py. Production can use any HTTP server instead:
docs/nginx.md has a tested nginx setup.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
from pathlib import Path

from ..boot.errors import TmpfsbootError, UsageError
from .imageserver import (
    LISTEN_BACKLOG,
    MIN_RATE,
    RATE_WINDOW,
    ImageServer,
    raise_fd_limit,
)

__all__ = ["ImageServer", "add_parser", "cmd_serve", "parse_rate", "start_server"]


def start_server(root: Path, *, bind: str = "127.0.0.1", port: int = 0, max_streams: int = 64,
                 retry_after: int = 1, access_log: bool = True, timeout: float = 60.0,
                 min_rate: int = MIN_RATE, rate_window: float = RATE_WINDOW,
                 max_streams_per_client: int | None = None) -> ImageServer:
    """Serve the directory ROOT over HTTP on BIND:PORT (0: a free port) in a background
    thread; returns the running server.

    At most MAX_STREAMS large bodies are sent at once (MAX_STREAMS_PER_CLIENT per client
    address); further requests for them get 503 with `Retry-After: RETRY_AFTER`. A
    client that sends or takes nothing for TIMEOUT seconds is dropped, and so is a
    stream slower than MIN_RATE bytes/s over RATE_WINDOW seconds (0: no minimum).
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
                         access_log=access_log, timeout=timeout, min_rate=min_rate,
                         rate_window=rate_window,
                         max_streams_per_client=max_streams_per_client)
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
                              timeout=args.timeout, min_rate=args.min_rate,
                              rate_window=args.min_rate_window,
                              max_streams_per_client=args.max_streams_per_client)
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


def parse_rate(text: str) -> int:
    """Bytes per second from `0`, `65536`, `64k` or `1m` (binary suffixes)."""
    digits, suffix = text[:-1], text[-1:].lower()
    scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(suffix)
    if scale is None:
        digits, scale = text, 1
    if not digits.isascii() or not digits.isdigit():
        raise ValueError(text)
    return int(digits) * scale


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
    p.add_argument("--max-streams-per-client", type=_positive_int, default=None,
                   metavar="N", help="concurrent image transfers per client address "
                   "before 503 (default: no limit)")
    p.add_argument("--retry-after", type=_positive_int, default=1, metavar="S",
                   help="Retry-After seconds in 503 answers (default: 1)")
    p.add_argument("--timeout", type=_positive_float, default=60.0, metavar="S",
                   help="drop a client idle this long (default: 60)")
    p.add_argument("--min-rate", type=parse_rate, default=MIN_RATE, metavar="RATE",
                   help="close an image transfer slower than RATE bytes/s (k, m "
                   "suffixes; 0: never) over --min-rate-window, freeing its slot "
                   "(default: 64k)")
    p.add_argument("--min-rate-window", type=_positive_float, default=RATE_WINDOW,
                   metavar="S", help="seconds the rate is averaged over (default: 30)")
    p.set_defaults(func=cmd_serve)
