"""Console logging, timed phases, download progress and the JSON-lines event log."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import IO, Any

log = logging.getLogger("tmpfsboot")

# Progress lines are printed at most this often (seconds).
PROGRESS_INTERVAL = 3.0


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is when a record comes, not when it was set up (a
    server thread may log after a test harness swapped stderr back and closed its own)."""

    @property
    def stream(self) -> IO[str]:
        return sys.stderr

    @stream.setter
    def stream(self, value: IO[str]) -> None:
        pass


def setup_logging(
    *, debug: bool = False, quiet: bool = False, stream: IO[str] | None = None
) -> None:
    """One handler on stderr (the console at boot): `tmpfsboot: message` lines."""
    handler = logging.StreamHandler(stream) if stream else _StderrHandler()
    handler.setFormatter(logging.Formatter("tmpfsboot: %(message)s"))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class EventLog:
    """Append-only JSON lines, one per event: phase timings, bytes, retries.

    At boot it lives in /run/tmpfsboot/, which initramfs-tools moves into the new root.
    """

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._file: IO[str] | None = None
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, event: str, **fields: Any) -> None:
        """Record EVENT with FIELDS and a wall-clock timestamp."""
        if self._file is None:
            return
        record = {"time": round(time.time(), 3), "event": event, **fields}
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


NO_EVENTS = EventLog(None)


@contextlib.contextmanager
def phase(name: str, events: EventLog = NO_EVENTS, **fields: Any) -> Iterator[dict[str, Any]]:
    """Log the start and end of a phase with its duration; record it in EVENTS.

    The caller may add figures (bytes, retries) to the yielded dict; they go to the log.
    """
    start = time.monotonic()
    log.info("%s", name)
    extra: dict[str, Any] = {}
    try:
        yield extra
    except BaseException as e:
        elapsed = time.monotonic() - start
        events.write("phase", name=name, ok=False, seconds=round(elapsed, 3),
                     error=str(e), **fields, **extra)
        raise
    elapsed = time.monotonic() - start
    events.write("phase", name=name, ok=True, seconds=round(elapsed, 3), **fields, **extra)
    log.info("%s: done in %.2f s", name, elapsed)


class Progress:
    """Download progress: bytes, percent, rate and ETA, at most every PROGRESS_INTERVAL s."""

    def __init__(
        self, label: str, total: int | None, *, interval: float = PROGRESS_INTERVAL
    ) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.interval = interval
        self.start = time.monotonic()
        self._next = self.start + interval

    def update(self, n: int) -> None:
        """Count N more bytes; print a line if the interval has passed."""
        self.done += n
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.interval
            log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        """The progress line for the bytes counted so far."""
        elapsed = max((now or time.monotonic()) - self.start, 1e-6)
        rate = self.done / elapsed
        text = f"{self.label}: {format_bytes(self.done)}"
        if self.total:
            pct = 100.0 * self.done / self.total
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            text += f" of {format_bytes(self.total)} ({pct:.0f}%), {format_bytes(rate)}/s"
            if eta != float("inf"):
                text += f", ETA {eta:.0f} s"
        else:
            text += f", {format_bytes(rate)}/s"
        return text
