"""What `tmpfsboot serve` remembers of its traffic: counters and a fixed-size ring.

A long-running server holds state bounded by its configuration, never by its traffic:
the counters are integers, statuses come from a fixed set, and the ring of recent
requests keeps its last RING_SIZE entries with their paths cut short. The server's loop
thread alone writes them; other threads read a `Snapshot` taken on that thread.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import NamedTuple

RING_SIZE = 512
# Characters of a request target kept in the ring (the access log has its own cap).
RING_PATH_LIMIT = 200


class Request(NamedTuple):
    """One answered request, as tests assert on it."""

    method: str
    path: str
    status: int


@dataclass(frozen=True)
class Snapshot:
    """The server's counters and its recent requests at one moment."""

    answered: int
    by_status: dict[int, int]
    bytes_sent: int
    streams: int
    peak_streams: int
    interrupted: int
    slow_closed: int
    out_of_resources: int
    internal_errors: int
    recent: tuple[Request, ...] = field(default_factory=tuple)

    def count(self, status: int) -> int:
        """Requests answered with STATUS."""
        return self.by_status.get(status, 0)

    def statuses_of(self, path: str) -> list[int]:
        """The statuses of the recent requests for PATH, oldest first."""
        return [r.status for r in self.recent if r.path == path]


class ServerStats:
    """The live counters; touched only on the server's loop thread."""

    def __init__(self, ring_size: int = RING_SIZE) -> None:
        self.answered = 0
        self.by_status: Counter[int] = Counter()
        self.bytes_sent = 0
        self.streams = 0
        self.peak_streams = 0
        self.interrupted = 0       # bodies that ended before their last byte
        self.slow_closed = 0       # streams closed for going below --min-rate
        self.out_of_resources = 0  # 503s for want of descriptors or memory
        self.internal_errors = 0   # bugs: a connection lost to an unexpected exception
        self.recent: deque[Request] = deque(maxlen=ring_size)

    def record(self, method: str, target: str, status: int, sent: int) -> None:
        """Count one answer of STATUS with SENT body bytes."""
        self.answered += 1
        self.by_status[status] += 1
        self.bytes_sent += sent
        if len(target) > RING_PATH_LIMIT:
            target = target[:RING_PATH_LIMIT] + "..."
        self.recent.append(Request(method[:32], target, status))

    def open_stream(self) -> None:
        """A large transfer holds a slot."""
        self.streams += 1
        self.peak_streams = max(self.peak_streams, self.streams)

    def close_stream(self) -> None:
        """A large transfer gave its slot back."""
        self.streams -= 1

    def snapshot(self, *, reset_peak: bool = False) -> Snapshot:
        """A copy of everything; RESET_PEAK starts a new peak from the current streams."""
        snap = Snapshot(self.answered, dict(self.by_status), self.bytes_sent, self.streams,
                        self.peak_streams, self.interrupted, self.slow_closed,
                        self.out_of_resources, self.internal_errors, tuple(self.recent))
        if reset_peak:
            self.peak_streams = self.streams
        return snap
