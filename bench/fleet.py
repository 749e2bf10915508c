"""Fleet storms: thousands of simulated nodes boot at once through a tier of caching nginx.

The topology is real (tests/support/tier.py): `tmpfsboot serve` as the origin, N nginx caches
configured from docs/nginx.md, and the nodes (bench/swarm.py, asyncio tasks), each in its
own network namespace on a private bridge. Every node verifies the SHA-256 of its image.
The standard set (`make fleet`, `--write` puts it into docs/benchmarks.md under
`## Fleet through caching nginx`): 1,000 nodes with the mirrors as written, the same
spread (tmpfs.mirrors=spread), the same with one cache killed halfway, and 10,000 nodes.

    .venv/bin/python bench/fleet.py [--nodes 1000] [--caches 3] [--size-mib 4] [--write]
    .venv/bin/python bench/storm.py --caches 3 --nodes 10000 [--kill-cache] [--order ordered]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# tests/support holds the tier (the fleet test uses it too): made importable
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from storm import BENCHMARKS, MIB, build_image
from support.report import write_section
from support.tier import StormResult, run_storm

SECTION = "## Fleet through caching nginx"


@dataclass(frozen=True)
class Run:
    """One storm of the set."""

    label: str
    nodes: int
    caches: int
    order: str
    kill: int | None
    result: StormResult


def storm(images: Path, image: str, work: Path, label: str, *, nodes: int, caches: int,
          order: str, kill: int | None, timeout: float) -> Run:
    """One storm through a fresh tier (cold caches); printed as it ends."""
    result = run_storm(images, image, work / label.replace(" ", "-"), nodes=nodes,
                       caches=caches, order=order, kill=kill, timeout=timeout)
    run = Run(label, nodes, caches, order, kill, result)
    print(render_row(run), flush=True)
    for n in [n for n in result.nodes if not n.ok][:5]:
        print(f"  failed node {n.mac}: {n.error}", file=sys.stderr)
    return run


def pct(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, int(p / 100 * len(values)))] if values else 0.0


HEADER = ("| storm | nodes verified | time to the last node (median) | origin sent "
          "| each cache's share of the image bytes | 503 + Retry-After |\n"
          "|---|---|---|---|---|---|")


def render_row(run: Run) -> str:
    r = run.result
    times = r.times()
    shares = ", ".join(f"{s:.1%}" for s in r.shares())
    if run.kill is not None:
        shares += f" (cache {run.kill + 1} killed)"
    busy = sum(n.busy for n in r.nodes)
    return (f"| {run.label} | {r.ok:,} of {run.nodes:,} | {r.wall:.1f} s "
            f"({statistics.median(times) if times else 0:.1f} s) | "
            f"{r.origin_image_bytes / MIB:,.0f} MiB = {r.origin_image_bytes / r.size:.2f} "
            f"copies | {shares} | {busy:,} |")


def render_kill(run: Run) -> str:
    r = run.result
    assert run.kill is not None and r.killed_at is not None
    dead = run.kill
    late = r.late_nodes()
    moved = r.moved()
    own_second = sum(1 for n in late if n.last == n.order[1])
    resumed = sum(1 for n in late if n.received[dead] and n.received[n.last])
    others = [n for n in r.nodes if n.order[0] != dead]
    touched = [n for n in others if n.received[dead]]
    sent = sum(1 for n in touched if n.busy)
    where = ", ".join(f"cache {c + 1}: {moved[c]}" for c in range(run.caches) if c != dead)
    return (f"Cache {dead + 1} was killed and unplugged {r.killed_at:.1f} s after the "
            f"power-on, when half of all image bytes had arrived. It was first for "
            f"{r.firsts()[dead]} nodes; {len(late)} of them were not done. They finished at "
            f"{where}; {own_second} of {len(late)} at their own second choice, the "
            f"{len(late) - own_second} others further down their own order (their second "
            f"turned them away with 503 or stalled); {resumed} "
            f"resumed mid-image (Range + If-Range) after their connection stalled for the "
            f"stall timeout, the others had no image bytes from it yet. Of the "
            f"{len(others)} nodes of the other caches, {len(touched)} had bytes from the "
            f"dead cache ({sent} of them sent there by a 503 from their own full cache "
            f"before it died). Every node verified its image: {r.ok} of {run.nodes}.")


def render(runs: list[Run], size: int, timeout: float) -> str:
    rows = "\n".join(render_row(r) for r in runs)
    kills = "\n\n".join(render_kill(r) for r in runs if r.kill is not None)
    firsts = [r for r in runs if r.order == "spread" and r.kill is None]
    first_line = "; ".join(
        f"{r.nodes:,} nodes: " + ", ".join(str(r.result.firsts()[c]) for c in range(r.caches))
        for r in firsts)
    return f"""How reproduced: `make fleet` (`.venv/bin/python bench/fleet.py --write`). The
topology is real and stays on this machine: `tmpfsboot serve` as the origin
(`--max-streams 64`), {runs[0].caches} nginx caches with docs/nginx.md's caching
configuration as it stands (slice 8m, `proxy_cache_lock`, 256 streams per cache,
`Retry-After: 5` past them), and the nodes, each role in its own network namespace with its
own address on a private bridge. The nodes are asyncio tasks in one process
(`bench/swarm.py`) running the engine's mirror order (`spread_urls`), `RetryBudget`,
`Validator` and SHA256SUMS parsing; each fetches SHA256SUMS and a
{size / MIB:.1f} MiB zstd image of random bytes (the last storm: as labelled) and checks
its SHA-256. They do not
extract. Each storm starts with cold caches. Node identities are consecutive MACs
(52-54-00-00-00-00 up), as one vendor's rack has them. Back-off after failures other
than 503 is scaled down to 0.05 s and the stall timeout to {timeout:.0f} s (the boot's: 10 s
and 60 s). Origin, caches and nodes share the 2 cores: the times are this machine's
(the nodes' Python hashing and nginx's copies are the limit) and vary by a third between
runs on this shared machine; the shares and the origin's copies do not.

{HEADER}
{rows}

Nodes whose first choice each cache was ({first_line}): rendezvous hashing of the
node's identity. With the mirrors as written every node asks cache 1 first: it takes
what its 256-stream cap allows and answers the rest 503 + Retry-After, and those move on
to cache 2, then cache 3. The load still ends up on all three, but by turning nodes away
(several times the 503s of the spread storm), and a node lands wherever there was room,
not on the cache that served it last time. Spread, each cache gets its third from the
start. Either way the origin sends one copy of the image per cache that serves it:
`proxy_cache_lock` holds a cache's other requests while the first request for each
8 MiB slice goes to the origin.

{kills}

Measured {datetime.date.today().isoformat()} on the project's build machine (2 cores).
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--big", type=int, default=10_000,
                        help="nodes of the last storm (0: skip it)")
    parser.add_argument("--caches", type=int, default=3)
    parser.add_argument("--size-mib", type=int, default=4, help="image size (MiB)")
    parser.add_argument("--big-size-mib", type=int, default=1,
                        help="image size of the last storm (MiB): its bytes are what "
                        "takes time on 2 cores")
    parser.add_argument("--timeout", type=float, default=10.0, help="stall timeout (s)")
    parser.add_argument("--write", action="store_true",
                        help="write the figures into docs/benchmarks.md")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tmpfsboot-fleet.") as tmp:
        work = Path(tmp)
        image = build_image(work / "std", args.size_mib)
        images = work / "std" / "images"
        size = (images / image).stat().st_size
        print(HEADER)
        plan = [(f"{args.nodes:,} nodes, mirrors as written", args.nodes, "ordered", None),
                (f"{args.nodes:,} nodes, spread", args.nodes, "spread", None),
                (f"{args.nodes:,} nodes, spread, a cache killed halfway", args.nodes,
                 "spread", 1)]
        runs = [storm(images, image, work, label, nodes=nodes, caches=args.caches,
                      order=order, kill=kill, timeout=args.timeout)
                for label, nodes, order, kill in plan]
        if args.big:
            big = build_image(work / "big", args.big_size_mib)
            runs.append(storm(work / "big" / "images", big, work,
                              f"{args.big:,} nodes, spread, {args.big_size_mib} MiB image",
                              nodes=args.big, caches=args.caches, order="spread", kill=None,
                              timeout=args.timeout))
    for run in runs:
        if run.kill is not None:
            print(render_kill(run))
    if args.write:
        write_section(BENCHMARKS, SECTION, render(runs, size, args.timeout))
    return 0 if all(r.result.ok == r.nodes for r in runs) else 1


def one_storm(*, nodes: int, caches: int, order: str, kill: bool, size_mib: int,
              timeout: float) -> int:
    """`bench/storm.py --caches N`: one storm through a tier, its figures printed."""
    with tempfile.TemporaryDirectory(prefix="tmpfsboot-fleet.") as tmp:
        work = Path(tmp)
        image = build_image(work, size_mib)
        print(HEADER)
        run = storm(work / "images", image, work, f"{nodes:,} nodes, {order}", nodes=nodes,
                    caches=caches, order=order, kill=1 if kill else None, timeout=timeout)
    busiest = Counter(n.order[0] for n in run.result.nodes).most_common(1)
    print(f"most first choices: {busiest}")
    if kill:
        print(render_kill(run))
    return 0 if run.result.ok == nodes else 1


if __name__ == "__main__":
    sys.exit(main())
