"""`tmpfsboot serve DIR`: the embedded image server (tmpfsboot.host.serve)."""

from __future__ import annotations

import argparse
import logging
import signal
from pathlib import Path

from ..host.imageserver import MIN_RATE, RATE_WINDOW
from ..host.serve import start_server
from .argtypes import positive_float, positive_int


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
    p.add_argument("--max-streams", type=positive_int, default=64, metavar="N",
                   help="concurrent image transfers before 503 (default: 64)")
    p.add_argument("--max-streams-per-client", type=positive_int, default=None,
                   metavar="N", help="concurrent image transfers per client address "
                   "before 503 (default: no limit)")
    p.add_argument("--retry-after", type=positive_int, default=1, metavar="S",
                   help="Retry-After seconds in 503 answers (default: 1)")
    p.add_argument("--timeout", type=positive_float, default=60.0, metavar="S",
                   help="drop a client idle this long (default: 60)")
    p.add_argument("--min-rate", type=parse_rate, default=MIN_RATE, metavar="RATE",
                   help="close an image transfer slower than RATE bytes/s (k, m "
                   "suffixes; 0: never) over --min-rate-window, freeing its slot "
                   "(default: 64k)")
    p.add_argument("--min-rate-window", type=positive_float, default=RATE_WINDOW,
                   metavar="S", help="seconds the rate is averaged over (default: 30)")
    p.set_defaults(func=cmd_serve)
