"""The embedded image server on a directory: `start_server`, what `tmpfsboot serve` runs.

The server itself is `imageserver.ImageServer` (one asyncio loop in one thread, sendfile,
a stream cap with 503 + Retry-After, a minimum rate, bounded memory); what it reads from
clients is parsed in request.py. Production can use any HTTP server instead:
docs/nginx.md has a tested nginx setup.
"""

from __future__ import annotations

import os
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

__all__ = ["ImageServer", "start_server"]


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
