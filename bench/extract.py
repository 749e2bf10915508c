#!/usr/bin/env python3
"""Benchmark: the engine's extractor against GNU tar, a plain tar from the page cache.

Builds a small-file root (40,000 files of 0-8 KiB in 400 directories, made here so every
run extracts the same thing), archives it as `tmpfsboot image build` does (GNU tar,
pax, a pax header on every member), keeps the tar in a tmpfs (so in the page cache) and
extracts it into a fresh tmpfs with each method, interleaved round by round:

- gnu-tar: `tar -x --xattrs --xattrs-include=* --numeric-owner -f ROOT.tar`
- engine: `Extractor(target).extract(fd)` in a fresh python3.11 (start-up included,
  about 40 ms; the CPU of its writer processes included), from the tree given by
  --engine NAME=DIR (default: this checkout), so a change can be measured against the
  code before it (`--engine before=/tmp/old`); run with -P, so the current directory
  does not shadow DIR. The same command on an empty archive, in the same rounds, gives
  its start-up, so the report can say what each member costs without it.

With --cpus 1,2 every method runs under `taskset` on 1, then 2 CPUs (each CPU count a
method of its own in the same interleaved rounds). Prints medians, ratios to GNU tar on
the same CPUs and microseconds per member (wall and user CPU), and with --write puts them
in docs/benchmarks.md under `## Extraction`. CPU times move with the machine's load (a
busy neighbour slows every instruction); --instructions also counts each method's
instructions per member under valgrind's callgrind, on one CPU, which the load does not
move.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the shared helpers: tests/support

from support.mounts import mounted_tmpfs  # noqa: E402
from support.report import write_section  # noqa: E402

from tmpfsboot.host.image import TAR_OPTIONS  # noqa: E402

FILES, DIRS, MAX_SIZE = 40_000, 400, 8192
COUNTED_DIRS = 100  # --instructions counts on the first quarter of the root (callgrind is slow)
START = "-start"  # the suffix of an engine's run on an empty archive
GNU_TAR = ["tar", "-x", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-f"]
ENGINE = ("import os, sys; from tmpfsboot.boot.extract import Extractor; "
          "fd = os.open(sys.argv[1], os.O_RDONLY); Extractor(sys.argv[2]).extract(fd)")


def make_root(root: Path) -> int:
    """The small-file tree; returns the number of tar members it makes."""
    rng = random.Random(13)
    for d in range(DIRS):
        (root / f"d{d:03}").mkdir()
    payload = rng.randbytes(MAX_SIZE)
    for i in range(FILES):
        (root / f"d{i % DIRS:03}" / f"f{i:05}").write_bytes(payload[: rng.randrange(MAX_SIZE)])
    return 1 + DIRS + FILES


def instructions(argv: list[str], env: dict[str, str] | None = None) -> int:
    """The instructions ARGV runs in user space on one CPU (so with no writer process), as
    callgrind counts them: the same on a busy machine as on an idle one, where CPU times
    move with the load."""
    done = subprocess.run(["taskset", "-c", "0", "valgrind", "--tool=callgrind",
                           "--callgrind-out-file=/dev/null", *argv],
                          check=True, capture_output=True, text=True,
                          env={**os.environ, **(env or {}), "PYTHONHASHSEED": "0"})
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise SystemExit(f"no instruction count from valgrind: {done.stderr[-300:]}")
    return int(found.group(1))


def counted(engines: dict[str, str], src: Path, empty: Path, target: Path) -> str:
    """Instructions per member of each engine and of GNU tar, from an archive of the first
    COUNTED_DIRS directories of the root at SRC less the same command on EMPTY."""
    dirs = sorted(p.name for p in src.iterdir() if p.is_dir())[:COUNTED_DIRS]
    archive = src / "counted.tar"
    subprocess.run(["tar", "-c", "-f", str(archive), *TAR_OPTIONS, "-C", str(src), *dirs],
                   check=True)
    members = len(dirs) * (1 + FILES // DIRS)

    def engine(tar: Path) -> list[str]:
        return [sys.executable, "-P", "-c", ENGINE, str(tar), str(target)]

    commands: dict[str, tuple[Callable[[Path], list[str]], dict[str, str] | None]] = {
        "gnu-tar": (lambda tar: [*GNU_TAR, str(tar), "-C", str(target)], None)}
    commands.update((name, (engine, {"PYTHONPATH": tree})) for name, tree in engines.items())
    lines = ["", f"Instructions per member in user space (callgrind; {members:,} members, less "
             "an empty archive's: start-up excluded, and the same whatever the load):", "",
             "| method | instructions per member | x GNU tar |", "|---|---|---|"]
    per_member = {}
    for name, (argv, env) in commands.items():
        counts = []
        for tar in (archive, empty):
            with mounted_tmpfs(target, size="2g"):
                counts.append(instructions(argv(tar), env))
        per_member[name] = (counts[0] - counts[1]) / members
        lines.append(f"| {name} | {per_member[name]:,.0f} | "
                     f"{per_member[name] / per_member['gnu-tar']:.1f} |")
    return "\n".join(lines)


def timed(argv: list[str]) -> tuple[float, float, float]:
    """(wall, user, system) seconds of ARGV run to completion."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL)
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--engine", action="append", default=[],
                        help="NAME=DIR: a tree holding tmpfsboot/ to measure (repeatable)")
    parser.add_argument("--cpus", default="",
                        help="N,M,...: run every method on the first N CPUs (taskset)")
    parser.add_argument("--instructions", action="store_true",
                        help="also count instructions per member with valgrind")
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    engines = dict(e.split("=", 1) for e in args.engine) or {"engine": str(REPO)}
    with tempfile.TemporaryDirectory(prefix="tmpfsboot-bench-") as tmp:
        work = Path(tmp)
        src, target = work / "src", work / "target"
        with mounted_tmpfs(src, size="2g"):
            members = make_root(src)
            archive = src / "root.tar"
            subprocess.run(["tar", "-c", "-f", str(archive), *TAR_OPTIONS, "-C", str(src),
                            *sorted(p.name for p in src.iterdir() if p.name != "root.tar")],
                           check=True)
            empty = work / "empty.tar"  # the end-of-archive blocks alone: start-up
            subprocess.run(["tar", "-c", "-f", str(empty), "-T", "/dev/null"], check=True)
            plain = {"gnu-tar": [*GNU_TAR, str(archive), "-C", str(target)]}
            for name, tree in engines.items():
                for tar, method in ((archive, name), (empty, name + START)):
                    plain[method] = ["env", f"PYTHONPATH={tree}", sys.executable, "-P", "-c",
                                     ENGINE, str(tar), str(target)]
            methods = pinned(plain, args.cpus)
            runs: dict[str, list[tuple[float, float, float]]] = {m: [] for m in methods}
            for _ in range(args.rounds):
                for name, argv in methods.items():
                    with mounted_tmpfs(target, size="2g"):
                        runs[name].append(timed(argv))
            size = archive.stat().st_size
            body = report(runs, members, size, args.rounds)
            if args.instructions:
                body += "\n" + counted(engines, src, empty, target)
    print(body)
    if args.write:
        write_section(REPO / "docs" / "benchmarks.md", "## Extraction", body)
    return 0


def pinned(methods: dict[str, list[str]], cpus: str) -> dict[str, list[str]]:
    """METHODS once per CPU count in CPUS ("1,2"), each under taskset; as they are if
    CPUS is empty. Names get a suffix: "gnu-tar 2cpu"."""
    if not cpus:
        return methods
    return {f"{name} {n}cpu": ["taskset", "-c", f"0-{int(n) - 1}", *argv]
            for n in cpus.split(",") for name, argv in methods.items()}


def report(runs: dict[str, list[tuple[float, float, float]]], members: int, size: int,
           rounds: int) -> str:
    lines = [
        f"How reproduced: `python bench/extract.py` ({rounds} interleaved rounds, medians):",
        f"a {size / 1e6:.0f} MB pax tar of {members:,} members (40,000 files of 0-8 KiB,",
        "made as `image build` makes images) in a tmpfs, extracted into a fresh tmpfs.",
        "",
        "The last column takes off the user CPU of the same command on an empty archive",
        "(python's start-up and the imports), timed in the same rounds.",
        "",
        "| method | wall | x GNU tar | members/s | user CPU | system CPU | wall per member "
        "| user CPU per member | the same, start-up excluded |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rs in runs.items():
        method, _, suffix = name.partition(" ")
        if method.endswith(START):
            continue
        gnu = statistics.median(r[0] for r in runs[" ".join(("gnu-tar", suffix)).strip()])
        wall = statistics.median(r[0] for r in rs)
        user = statistics.median(r[1] for r in rs)
        system = statistics.median(r[2] for r in rs)
        start = runs.get(" ".join((method + START, suffix)).strip())
        excluded = (f"{(user - statistics.median(r[1] for r in start)) / members * 1e6:.1f} us"
                    if start else "-")
        lines.append(f"| {name} | {wall:.2f} s | {wall / gnu:.2f} | {members / wall:,.0f} | "
                     f"{user:.2f} s | "
                     f"{system:.2f} s | {wall / members * 1e6:.1f} us | "
                     f"{user / members * 1e6:.1f} us | {excluded} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
