"""Boot storm: hundreds of simulated nodes fetch one image from `tmpfsboot serve` at once.

Each node is a thread running what the boot engine runs for a layer: SHA256SUMS with
`fetch_bytes`, then the image with the real `Download` and `RetryBudget` (mirror logic,
Retry-After, back-off, resume), hashing the stream as the engine does and checking it
against SHA256SUMS. Nodes do not decompress or extract (that costs the node's CPU, not
the server's). The server is `tmpfsboot.host.serve.start_server` in a child process, with its
stream cap: past it, a node gets 503 + Retry-After and comes back later.

Time is real except the back-off of failures other than 503, which is scaled down
(--backoff, default 0.05 s instead of the boot's 10 s); the server's Retry-After (1 s)
sets a refused node's wait, as at boot. The figures go to docs/benchmarks.md under
`## Boot storm` and between the storm markers of docs/reliability.md.

    .venv/bin/python bench/storm.py [--nodes 500] [--max-streams 32] [--write]

With `--caches N` the nodes boot through a real tier instead (bench/fleet.py: origin, N
caching nginx and the nodes as asyncio tasks, each in its own network namespace):

    .venv/bin/python bench/storm.py --caches 3 --nodes 10000 [--kill-cache] [--order ordered]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # tmpfsboot, and the shared tests/support

from support.report import read_file, replace_between, write_file, write_section  # noqa: E402

from tmpfsboot.boot.fetch import Download, RetryBudget, fetch_bytes  # noqa: E402
from tmpfsboot.boot.verify import expected_hash  # noqa: E402

BENCHMARKS = REPO / "docs/benchmarks.md"
RELIABILITY = REPO / "docs/reliability.md"
STORM_BEGIN = "<!-- storm:begin -->"
STORM_END = "<!-- storm:end -->"
MIB = 1 << 20
RETRY_AFTER = 1  # seconds, the server's default
TARGET_SECONDS = 300  # a boot deadline for the extrapolation: 5 minutes
HEADER = ("| nodes | bytes served | last node done, one server | caches for <= 5 min "
          f"| 503 polls/s at most (Retry-After: {RETRY_AFTER}) |\n|---|---|---|---|---|")


def build_image(outdir: Path, size_mib: int) -> str:
    """A root image of incompressible data through the real image builder; its name."""
    from tmpfsboot.host.image import build_image as build

    src = outdir / "src"
    (src / "usr/lib").mkdir(parents=True)
    (src / "usr/lib/blob.bin").write_bytes(os.urandom(size_mib * MIB))
    (outdir / "images").mkdir()
    build(src, outdir / "images", "root", compression="zstd")
    return "root.tar.zst"


def serve_child(root: str, max_streams: int, retry_after: int,
                conn: multiprocessing.connection.Connection) -> None:
    """The server process: start, report the port; on "mark" or "stop", report the counts
    of answers by status and the peak of concurrent streams since the last report (read
    from the server's snapshot, taken and its peak restarted on the server's thread)."""
    from tmpfsboot.host.serve import start_server

    server = start_server(Path(root), max_streams=max_streams, retry_after=retry_after,
                          access_log=False)
    conn.send(server.port)
    before: Counter[int] = Counter()
    while True:
        command = conn.recv()
        # the answers and peak since the last "mark": the storm's own, not the warm-up's
        snap = server.snapshot(reset_peak=True)
        counts = Counter(snap.by_status)
        conn.send((dict(counts - before), snap.peak_streams))
        before = counts
        if command == "stop":
            break
    server.stop()


@dataclass
class Node:
    """One simulated node's boot."""

    started: float = 0.0
    finished: float = 0.0
    requests: int = 0
    retries: int = 0
    ok: bool = False
    error: str = ""


def boot_node(base: str, image: str, node: Node, *, backoff: float, timeout: float,
              go: threading.Event) -> None:
    """What one node's engine does for its layer, minus extraction."""
    go.wait()
    node.started = time.monotonic()
    budget = RetryBudget(None, backoff)
    try:
        sums, sums_url = fetch_bytes([base + "SHA256SUMS"], budget=budget, timeout=timeout,
                                     label="SHA256SUMS")
        want = expected_hash(sums.decode(), image, sums_url=sums_url)
        digest = hashlib.sha256()
        download = Download([base + image], budget=budget, timeout=timeout, label=image,
                            progress=False)
        download.run(digest.update)
        node.requests = download.requests + 1
        node.ok = digest.hexdigest() == want
        if not node.ok:
            node.error = "hash mismatch"
    except Exception as e:  # a node that fails is a finding, not a crash of the bench
        node.error = str(e)
    node.retries = budget.used
    node.finished = time.monotonic()


@dataclass(frozen=True)
class Figures:
    """What one storm measured."""

    nodes: int
    ok: int
    size: int
    max_streams: int
    peak: int
    wall: float
    requests: int
    r503: int
    r200: int
    other: dict[int, int]
    p50: float
    p95: float
    max: float
    retries_mean: float
    retries_max: int
    retries_total: int
    solo_rate: float
    ceiling: float
    storm_rate: float
    backoff: float


def run_nodes(base: str, image: str, count: int, *, backoff: float, timeout: float,
              deadline: float) -> tuple[list[Node], float]:
    """COUNT nodes powered on at once; (nodes, wall seconds until the last one finished)."""
    nodes = [Node() for _ in range(count)]
    go = threading.Event()
    threads = [threading.Thread(target=boot_node, args=(base, image, n),
                                kwargs={"backoff": backoff, "timeout": timeout, "go": go},
                                daemon=True) for n in nodes]
    for t in threads:
        t.start()
    start = time.monotonic()
    go.set()
    for t in threads:
        t.join(max(0.0, start + deadline - time.monotonic()))
    wall = max((n.finished for n in nodes if n.finished), default=start) - start
    for n in nodes:
        if not n.finished:
            n.error = f"not finished within {deadline:.0f} s"
    return nodes, wall


def solo_seconds(base: str, image: str, rounds: int) -> float:
    """Median seconds for one node alone to fetch and hash the image."""
    times = []
    for _ in range(rounds):
        nodes, wall = run_nodes(base, image, 1, backoff=0.05, timeout=30, deadline=60)
        assert nodes[0].ok, nodes[0].error
        times.append(wall)
    return statistics.median(times)


def saturated_rate(base: str, image: str, streams: int, rounds: int, size: int) -> float:
    """Bytes/s the server delivers to STREAMS nodes fetching back to back (never past the
    cap, so no 503): the server's bandwidth through this client stack."""
    done = 0
    lock = threading.Lock()

    def worker() -> None:
        nonlocal done
        for _ in range(rounds):
            digest = hashlib.sha256()
            Download([base + image], budget=RetryBudget(0, 0.05), timeout=30, label=image,
                     progress=False).run(digest.update)
            with lock:
                done += size
    threads = [threading.Thread(target=worker) for _ in range(streams)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done / (time.monotonic() - start)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=500)
    parser.add_argument("--max-streams", type=int, default=32)
    parser.add_argument("--size-mib", type=int, default=16, help="image size (MiB)")
    parser.add_argument("--backoff", type=float, default=0.05,
                        help="first back-off delay (boot default: 10 s)")
    parser.add_argument("--timeout", type=float, default=30.0, help="stall timeout (s)")
    parser.add_argument("--deadline", type=float, default=300.0,
                        help="a node not done by then counts as failed (s)")
    parser.add_argument("--write", action="store_true",
                        help="write the figures into docs/benchmarks.md and reliability.md")
    parser.add_argument("--caches", type=int, metavar="N",
                        help="boot through N caching nginx in network namespaces "
                        "(bench/fleet.py; 0: from the origin directly)")
    parser.add_argument("--order", choices=("spread", "ordered"), default="spread",
                        help="with --caches: the nodes' mirror order (tmpfs.mirrors=)")
    parser.add_argument("--kill-cache", action="store_true",
                        help="with --caches: cache 2 dies once half the bytes arrived")
    args = parser.parse_args(argv)
    if args.caches is not None:
        from fleet import one_storm

        return one_storm(nodes=args.nodes, caches=args.caches, order=args.order,
                         kill=args.kill_cache, size_mib=args.size_mib,
                         timeout=args.timeout)
    logging.getLogger("tmpfsboot").setLevel(logging.ERROR)  # 500 nodes' retry warnings
    with tempfile.TemporaryDirectory(prefix="tmpfsboot-storm.") as tmp:
        image = build_image(Path(tmp), args.size_mib)
        images = Path(tmp) / "images"
        size = (images / image).stat().st_size
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=serve_child,
                           args=(str(images), args.max_streams, RETRY_AFTER, child))
        proc.start()
        port = parent.recv()
        base = f"http://127.0.0.1:{port}/"
        solo = solo_seconds(base, image, 5)
        ceiling = saturated_rate(base, image, args.max_streams, 3, size)
        parent.send("mark")
        parent.recv()
        nodes, wall = run_nodes(base, image, args.nodes, backoff=args.backoff,
                                timeout=args.timeout, deadline=args.deadline)
        parent.send("stop")
        counts, peak = parent.recv()
        proc.join()
    failed = [n for n in nodes if not n.ok]
    done = [n.finished - n.started for n in nodes if n.ok]
    storm_rate = len(done) * size / wall if wall else 0.0
    solo_rate = size / solo
    figures = Figures(
        nodes=args.nodes, ok=len(nodes) - len(failed), size=size,
        max_streams=args.max_streams, peak=peak, wall=wall,
        requests=sum(counts.values()), r503=counts.get(503, 0), r200=counts.get(200, 0),
        other={k: v for k, v in counts.items() if k not in (200, 503)},
        p50=percentile(done, 50) if done else 0.0,
        p95=percentile(done, 95) if done else 0.0,
        max=max(done, default=0.0),
        retries_mean=statistics.mean(n.retries for n in nodes),
        retries_max=max(n.retries for n in nodes),
        retries_total=sum(n.retries for n in nodes),
        solo_rate=solo_rate, ceiling=ceiling, storm_rate=storm_rate, backoff=args.backoff,
    )
    print(render_table(figures))
    for n in failed[:5]:
        print(f"failed node: {n.error}", file=sys.stderr)
    if args.write:
        BENCHMARKS.parent.mkdir(exist_ok=True)
        write_section(BENCHMARKS, "## Boot storm", render_benchmark(figures))
        text = read_file(RELIABILITY, "# Reliability\n")
        write_file(RELIABILITY, replace_between(text, STORM_BEGIN, STORM_END,
                                                render_extrapolation(figures)))
    return 0 if not failed else 1


def mb(rate: float) -> str:
    return f"{rate / 1e6:,.0f} MB/s"


def render_table(f: Figures) -> str:
    return "\n".join([
        "| figure | value |",
        "|---|---|",
        f"| nodes powered on at once | {f.nodes} |",
        f"| nodes that finished, hash verified | {f.ok} of {f.nodes} |",
        f"| image | {f.size / MIB:.1f} MiB zstd (`tmpfsboot image build`) |",
        f"| server stream cap (`--max-streams`), peak in use | {f.max_streams}, "
        f"{f.peak} |",
        f"| time until the last node finished | {f.wall:.1f} s |",
        f"| node boot time (fetch + hash): median, p95, max | {f.p50:.1f} s, "
        f"{f.p95:.1f} s, {f.max:.1f} s |",
        f"| requests: total, 200, 503 (+ Retry-After: 1) | {f.requests}, {f.r200}, "
        f"{f.r503}{', other ' + str(f.other) if f.other else ''} |",
        f"| retries per node: mean, max | {f.retries_mean:.1f}, "
        f"{f.retries_max} |",
        f"| one node alone | {mb(f.solo_rate)} |",
        f"| server ceiling ({f.max_streams} nodes back to back, no 503) | "
        f"{mb(f.ceiling)} |",
        f"| storm throughput (all bytes / time to the last node) | "
        f"{mb(f.storm_rate)} = "
        f"{f.storm_rate / f.ceiling:.0%} of the ceiling, "
        f"{f.storm_rate / f.solo_rate:.1f}x one node alone |",
    ])


def render_benchmark(f: Figures) -> str:
    return f"""How reproduced: `.venv/bin/python bench/storm.py --write` ({f.nodes} nodes,
`--max-streams {f.max_streams}`). The server is `tmpfsboot serve` (`start_server`) in its
own process on 127.0.0.1; every node is a thread running the boot engine's own `fetch_bytes`
(SHA256SUMS), `Download` and `RetryBudget` (Retry-After from the 503, resume, back-off), and
hashes the image as the engine does, checked against SHA256SUMS. Nodes do not decompress or
extract (that is the node's CPU, not the server's). Time is real; only the back-off after
failures other than 503 is scaled down ({f.backoff} s instead of the boot's 10 s; this run
had {f.retries_total - f.r503} such failures). Server and {f.nodes} clients share the 2
cores, so the absolute rates are this machine's; the ratios are the point.

{render_table(f)}

What it shows: every node finished with a verified image; the cap held (peak streams
= the cap), every node past it got 503 + Retry-After and came back 1-1.5 s later, and the
server stayed close to the rate it reaches with exactly {f.max_streams} well-behaved
clients. See docs/reliability.md for what this means at 1,000 and 10,000 nodes.
"""


def render_extrapolation(f: Figures) -> str:
    efficiency = f.storm_rate / f.ceiling
    image_mb, link = 250.0, 1250.0  # MB, MB/s (10 Gbit/s)
    rows = []
    for n in (100, 1_000, 10_000):
        seconds = n * image_mb / (link * efficiency)
        caches = math.ceil(seconds / TARGET_SECONDS)
        rows.append(f"| {n:,} | {n * image_mb / 1000:,.0f} GB | {seconds / 60:,.1f} min | "
                    f"{'none' if caches <= 1 else caches} | {n / (1.25 * RETRY_AFTER):,.0f}/s |")
    return f"""
Measured by `bench/storm.py` (figures in docs/benchmarks.md, `## Boot storm`):
{f.ok} of {f.nodes} simulated nodes finished with a verified image in
{f.wall:.1f} s against a {f.max_streams}-stream cap; {f.r503} answers were
503 + Retry-After; the server delivered {efficiency:.0%} of its measured ceiling.

Scaled to real fleets (a 250 MB zstd root, one server on a 10 Gbit/s link, the same
{efficiency:.0%} efficiency): the time until the last node has its root is bytes / bandwidth.
A cache is a second-level server on its own 10 Gbit/s link that fetches the image once
from the origin; waiting nodes poll at most once per Retry-After x 1-1.5.

{HEADER}
{chr(10).join(rows)}
"""


if __name__ == "__main__":
    sys.exit(main())
