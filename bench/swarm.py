"""Simulated nodes as asyncio tasks: thousands of boots at once in one process.

Each node does what the boot engine does for one layer, minus extraction: it orders the
mirrors by its own identity with the engine's `spread_urls` (tmpfs.mirrors=spread) or
keeps them as written, fetches SHA256SUMS and then the image from the first mirror that
answers, hashes the stream and checks it against SHA256SUMS (the engine's
`expected_hash`). Failures follow the engine's rules with its own pieces: `RetryBudget`
for back-off and Retry-After, `PERMANENT` answers drop a mirror, any other failure moves
to the node's next mirror, a broken transfer resumes with Range + If-Range and the
engine's `Validator`, and a file that changed restarts the layer.

Run inside the namespace that holds the nodes (bench/tier.py starts it there):

    python bench/swarm.py --nodes 1000 --image root.tar.zst --order spread URL...

Prints `HALF SECONDS` on a line of its own once half of all image bytes arrived (a cue to
kill a cache), then one JSON document: the settings and one record per node, times in
seconds after the power-on.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import resource
import socket
import sys
import time
import urllib.parse
from dataclasses import asdict, dataclass, field

from tmpfsboot.boot.cmdline import NetFacts, node_identity, spread_urls
from tmpfsboot.boot.errors import FetchError
from tmpfsboot.boot.fetch import (
    PERMANENT,
    RETRY_AFTER_STATUSES,
    USER_AGENT,
    RetryBudget,
    Validator,
    parse_retry_after,
)
from tmpfsboot.boot.verify import expected_hash

READ = 256 * 1024
# A node's socket receive buffer. The kernel would grow it to 6 MiB, so that a node's whole
# image could sit in its kernel while the Python of a thousand simulated nodes catches
# up: bytes counted would lag the wire, and a thousand such buffers are 6 GiB of RAM.
RCVBUF = 128 * 1024


def node_mac(number: int) -> str:
    """The boot MAC of simulated node NUMBER: consecutive, as one vendor's rack has them."""
    return "52-54-00-" + "-".join(f"{number >> s & 255:02x}" for s in (16, 8, 0))


class Transient(Exception):
    """Worth asking again (at the node's next mirror)."""

    def __init__(self, text: str, retry_after: float | None = None) -> None:
        super().__init__(text)
        self.retry_after = retry_after


class Permanent(Exception):
    """This mirror will not have it: drop it."""


class Changed(Exception):
    """The file changed under a resume: the layer starts again."""


@dataclass
class NodeRecord:
    """One node's boot, as the JSON output carries it."""

    mac: str
    order: list[int]  # indices (in the given mirror list) of the mirrors, as it tries them
    last: int = -1  # the mirror the image's last byte came from
    ok: bool = False
    error: str = ""
    started: float = 0.0
    finished: float = 0.0
    requests: int = 0
    retries: int = 0
    busy: int = 0  # 503/429 answers
    restarts: int = 0
    received: list[int] = field(default_factory=list)  # image bytes per mirror


@dataclass
class Swarm:
    """What the nodes share: the mirrors, the settings, and the progress so far."""

    mirrors: list[str]
    image: str
    order: str
    backoff: float
    timeout: float
    image_size: int = 0
    received: int = 0
    half_at: int = 0
    half_sent: bool = False
    power_on: float = 0.0

    def count(self, record: NodeRecord, index: int, n: int) -> None:
        record.received[index] += n
        self.received += n
        if self.half_at and not self.half_sent and self.received >= self.half_at:
            self.half_sent = True
            print(f"HALF {time.monotonic() - self.power_on:.3f}", flush=True)


async def request(url: str, headers: dict[str, str], timeout: float
                  ) -> tuple[int, dict[str, str], asyncio.StreamReader, asyncio.StreamWriter]:
    """GET URL on a new connection; (status, lower-cased headers, reader, writer)."""
    parts = urllib.parse.urlsplit(url)
    try:
        sock = socket.socket()
    except OSError as e:  # out of descriptors: this machine's limit, not the node's
        raise Transient(f"{url}: {e}") from e
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(
            sock, (parts.hostname or "", parts.port or 80)), timeout)
        reader, writer = await asyncio.open_connection(sock=sock)
    except (OSError, TimeoutError) as e:
        sock.close()
        raise Transient(f"{url}: {e or type(e).__name__}") from e
    lines = [f"GET {parts.path or '/'} HTTP/1.1", f"Host: {parts.netloc}",
             f"User-Agent: {USER_AGENT}", "Connection: close",
             *(f"{k}: {v}" for k, v in headers.items())]
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
        writer.close()
        raise Transient(f"{url}: {e or type(e).__name__} before the answer") from e
    status_line, *rest = head.decode("latin-1").split("\r\n")
    fields = {}
    for line in rest:
        name, _, value = line.partition(":")
        if name:
            fields[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), fields, reader, writer


def check_answer(url: str, status: int, headers: dict[str, str], offset: int,
                 validator: Validator | None) -> tuple[int | None, Validator]:
    """(the file's total size, its validator) for a 2xx answer at OFFSET, as the engine
    judges it: a resume must come back as 206 at OFFSET of the same file version."""
    length = headers.get("content-length", "")
    total = int(length) if length.isdigit() else None
    first = 0
    if status == 206:
        span = headers.get("content-range", "").removeprefix("bytes ")
        start, _, size = span.partition("/")
        first = int(start.split("-")[0]) if start.split("-")[0].isdigit() else -1
        total = int(size) if size.isdigit() else None
    seen = Validator(headers.get("etag"), headers.get("last-modified"), total)
    if validator is None or offset == 0:
        if status == 206:
            raise Transient(f"{url}: unexpected partial answer")
        return total, seen
    if not validator.same(seen) or status != 206 or first != offset:
        raise Changed(f"{url}: cannot resume at {offset} (status {status}, ETag "
                      f"{validator.etag} -> {seen.etag})")
    return total, validator


async def fetch(swarm: Swarm, record: NodeRecord, order: list[int], name: str,
                budget: RetryBudget, waits: list[float], *, image: bool) -> bytes | str:
    """The file NAME from the node's mirrors in ORDER: its bytes, or for the image its
    SHA-256. Resumes across mirrors; raises FetchError when the budget is spent."""
    dead: set[int] = set()
    position, offset = 0, 0
    validator: Validator | None = None
    digest, parts = hashlib.sha256(), []
    while True:
        index = order[position]
        url = swarm.mirrors[index] + name
        writer = None
        delay = 0.0
        try:
            headers = {}
            if offset and validator is not None:
                headers["Range"] = f"bytes={offset}-"
                headers["If-Range"] = validator.if_range() or ""
            record.requests += 1
            status, fields, reader, writer = await request(url, headers, swarm.timeout)
            if status in PERMANENT:
                raise Permanent(f"{url}: HTTP {status}")
            if not 200 <= status < 300:
                if status in RETRY_AFTER_STATUSES:
                    record.busy += 1
                    raise Transient(f"{url}: HTTP {status}",
                                    parse_retry_after(fields.get("retry-after")))
                raise Transient(f"{url}: HTTP {status}")
            total, validator = check_answer(url, status, fields, offset, validator)
            while total is None or offset < total:
                try:
                    chunk = await asyncio.wait_for(reader.read(READ), swarm.timeout)
                except (OSError, TimeoutError) as e:
                    raise Transient(f"{url}: {e or type(e).__name__} after {offset}") from e
                if not chunk:
                    if total is None:
                        break
                    raise Transient(f"{url}: closed after {offset} of {total} bytes")
                budget.progressed()
                offset += len(chunk)
                if image:
                    digest.update(chunk)
                    swarm.count(record, index, len(chunk))
                else:
                    parts.append(chunk)
            record.last = index
            return digest.hexdigest() if image else b"".join(parts)
        except Permanent:
            dead.add(index)
            if len(dead) == len(order):
                raise FetchError(f"{name}: every mirror refused it") from None
        except (Transient, Changed) as e:
            if isinstance(e, Changed):
                record.restarts += 1
                offset, validator, digest, parts = 0, None, hashlib.sha256(), []
            budget.fail(e, retry_after=getattr(e, "retry_after", None))
            delay = waits.pop()
        finally:
            if writer is not None:
                writer.close()
        await asyncio.sleep(delay)  # with the connection closed, as the engine does
        # the node's next mirror that has not refused for good, as Download does
        position = next(p % len(order) for p in range(position + 1, position + 1 + len(order))
                        if order[p % len(order)] not in dead)


async def boot(swarm: Swarm, record: NodeRecord, order: list[int], go: asyncio.Event) -> None:
    """One node: SHA256SUMS, then the image, verified."""
    await go.wait()
    record.started = time.monotonic()
    waits: list[float] = []
    budget = RetryBudget(None, swarm.backoff, wait=waits.append)
    try:
        sums = await fetch(swarm, record, order, "SHA256SUMS", budget, waits, image=False)
        assert isinstance(sums, bytes)
        want = expected_hash(sums.decode(), swarm.image, sums_url="SHA256SUMS")
        got = await fetch(swarm, record, order, swarm.image, budget, waits, image=True)
        assert isinstance(got, str)
        record.ok = got == want
        record.error = "" if record.ok else f"SHA-256 mismatch: {got}"
    except Exception as e:  # a failed node is a finding, not a crash of the swarm
        record.error = f"{type(e).__name__}: {e}"
    record.retries = budget.used
    record.finished = time.monotonic()


def node_order(mirrors: list[str], mac: str, order: str) -> list[int]:
    """Indices of MIRRORS in the order the node with MAC tries them: the engine's own."""
    if order == "ordered":
        return list(range(len(mirrors)))
    identity = node_identity(NetFacts(mac=mac))
    assert identity is not None
    spread = spread_urls(mirrors, identity)
    return [mirrors.index(u) for u in spread]


async def run(swarm: Swarm, count: int, deadline: float) -> tuple[list[NodeRecord], float]:
    """COUNT nodes powered on at once; (their records, seconds until the last finished)."""
    records, tasks = [], []
    go = asyncio.Event()
    for number in range(count):
        mac = node_mac(number)
        order = node_order(swarm.mirrors, mac, swarm.order)
        record = NodeRecord(mac=mac, order=order, received=[0] * len(swarm.mirrors))
        records.append(record)
        tasks.append(asyncio.create_task(boot(swarm, record, order, go)))
    start = swarm.power_on = time.monotonic()
    go.set()
    _, pending = await asyncio.wait(tasks, timeout=deadline)
    for task in pending:
        task.cancel()
    for r in records:
        if not r.finished:
            r.error = f"not finished within {deadline:.0f} s"
    wall = max((r.finished for r in records if r.finished), default=start) - start
    for r in records:  # relative to the power-on
        r.started, r.finished = max(0.0, r.started - start), max(0.0, r.finished - start)
    return records, wall


def raise_fd_limit(nodes: int) -> None:
    """Room for a socket per node and then some (root may raise the hard limit)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(hard, 4 * nodes + 1024)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
    except (OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mirrors", nargs="+", metavar="URL",
                        help="base URL of each mirror (the directory of the image)")
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--image", default="root.tar.zst")
    parser.add_argument("--image-size", type=int, default=0,
                        help="its size in bytes: HALF is printed at half of nodes x size")
    parser.add_argument("--order", choices=("spread", "ordered"), default="spread")
    parser.add_argument("--backoff", type=float, default=0.05,
                        help="first back-off delay (boot default: 10 s)")
    parser.add_argument("--timeout", type=float, default=30.0, help="stall timeout (s)")
    parser.add_argument("--deadline", type=float, default=600.0)
    args = parser.parse_args(argv)
    logging.getLogger("tmpfsboot").setLevel(logging.ERROR)  # thousands of retry warnings
    raise_fd_limit(args.nodes)
    mirrors = [m if m.endswith("/") else m + "/" for m in args.mirrors]
    swarm = Swarm(mirrors=mirrors, image=args.image, order=args.order, backoff=args.backoff,
                  timeout=args.timeout, image_size=args.image_size,
                  half_at=args.nodes * args.image_size // 2)
    records, wall = asyncio.run(run(swarm, args.nodes, args.deadline))
    json.dump({"mirrors": mirrors, "order": args.order, "wall": wall,
               "nodes": [asdict(r) for r in records]}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
