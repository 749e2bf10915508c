#!/usr/bin/env python3
"""Benchmark: the whole `tmpfsboot fetch` against `curl | zstd -d | tar -x`, on two roots.

Fetches each root (bench/roots.py: "small-file", 45,000 entries averaging a few KB, and
"large-file", files of MiBs; made once under --cache) from `tmpfsboot serve` on
127.0.0.1 into a fresh tmpfs with each method:

- stream-zstd: curl | zstd -d | tar -x
- stream-zstd-sha: the same with `tee >(openssl dgst -sha256)` and the digest checked
  against SHA256SUMS at the end (bash): the native pipeline that verifies, as tmpfsboot
  does (with OpenSSL's SHA-256, as tmpfsboot's hashlib)
- tmpfsboot-zstd: `tmpfsboot fetch` (SHA-256 verified while streaming)
- with --all, on the large-file (and mixed) root only, the seed's way and xz: seed
  (download to a file in RAM, then tar -Ipixz -xf), stream-xz (curl | pixz -d | tar -x)
  and tmpfsboot-xz

Every method runs under `taskset` on the first N CPUs for each N of --cpus; roots,
methods and CPU counts take turns round by round in one run (this VM returns freed RAM
to its host and the machine is shared: only ratios within one run mean something).
Prints medians and ratios to the native pipelines on the same CPUs, and with --write puts
them in docs/benchmarks.md under `## Fetch`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the shared helpers: tests/support

from extract import pinned  # noqa: E402
from roots import ROOTS, Root  # noqa: E402
from support.mounts import mounted_tmpfs  # noqa: E402
from support.report import write_section  # noqa: E402
from support.serve import free_port  # noqa: E402

from tmpfsboot.boot.contract import parse_sums  # noqa: E402
from tmpfsboot.host.image import build_image  # noqa: E402

TAR_X = ["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-x"]
XZ_ROOTS = ("large-file", "mixed")  # where --all adds the seed and xz: not worth it for small files
NATIVE, NATIVE_SHA, ENGINE = "stream-zstd", "stream-zstd-sha", "tmpfsboot-zstd"
GOAL_RATIO, GOAL_RSS = 1.10, 160 * 2**20


@dataclass
class Run:
    """One extraction: wall seconds, CPU seconds (user + system, all its processes) and
    the peak of the pipeline's summed RSS."""

    seconds: float
    cpu: float
    peak_rss: int


def descendants(pid: int) -> list[int]:
    """PID and all its descendants, from /proc/PID/task/*/children."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return found


def rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(argv: Sequence[str]) -> Run:
    """Run ARGV; sample the summed RSS of its process tree every 10 ms."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, sum(rss(p) for p in descendants(proc.pid)))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    seconds = time.monotonic() - start
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{argv[0]} failed ({proc.returncode}): {err.decode()[-500:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Run(seconds, cpu, peak)


@dataclass(frozen=True)
class Images:
    """A root's images as served: directory, file sizes by name, SHA-256 by name, and
    what the manifest and the tree say of it."""

    www: Path
    sizes: dict[str, int]
    sha256: dict[str, str]
    entries: int
    unpacked: int
    files: int
    file_bytes: int


def build_images(root: Root, cache: Path, compressions: Sequence[str]) -> Images:
    """ROOT's tree and its images in COMPRESSIONS under CACHE, each made once."""
    tree, www = root.ensure_tree(cache), root.www(cache)
    www.mkdir(parents=True, exist_ok=True)
    for compression in compressions:
        name = f"root.tar.{'zst' if compression == 'zstd' else compression}"
        if not (www / name).exists():
            print(f"building {root.name}/{name} ...", flush=True)
            build_image(tree, www, "root", compression=compression)
    manifest = json.loads((www / "root.manifest.json").read_text())
    inodes = {}  # a hard link's file counts once
    for dirpath, _, names in os.walk(tree):
        for st in (os.lstat(os.path.join(dirpath, n)) for n in names):
            if stat.S_ISREG(st.st_mode):
                inodes[st.st_ino] = st.st_size
    return Images(www, {p.name: p.stat().st_size for p in www.glob("root.tar.*")},
                  parse_sums((www / "SHA256SUMS").read_text()), manifest["entries"],
                  manifest["unpacked_size"], len(inodes), sum(inodes.values()))


def methods(base: str, images: Images, target: Path, ramdir: Path,
            with_xz: bool) -> dict[str, list[str]]:
    """The commands that fetch the root served at BASE into TARGET, by method."""
    tar_x = shlex.join([*TAR_X, "-C", str(target)])
    tmpfsboot = [sys.executable, "-m", "tmpfsboot", "--quiet", "fetch"]
    digest = ramdir / "sha256"
    found = {
        NATIVE: ["sh", "-c", f"curl -sf {base}root.tar.zst | zstd -dcq | {tar_x}"],
        # bash does not wait for a process substitution: `wait $!` does. OpenSSL's SHA-256,
        # as tmpfsboot's hashlib: coreutils' sha256sum has no SHA-NI (a fifth of the speed).
        NATIVE_SHA: ["bash", "-c", "set -o pipefail; "
                     f"curl -sf {base}root.tar.zst | tee >(openssl dgst -sha256 -r > {digest}) "
                     f"| zstd -dcq | {tar_x} && wait $! && "
                     f"test \"$(cut -d' ' -f1 {digest})\" = {images.sha256['root.tar.zst']}"],
        ENGINE: [*tmpfsboot, f"{base}root.tar.zst", str(target)],
    }
    if not with_xz:
        return found
    seed_file = ramdir / "root.tar.xz"
    return {
        "seed": ["sh", "-c", f"curl -sf -o {seed_file} {base}root.tar.xz && "
                 f"tar -Ipixz --xattrs --xattrs-include='*' -xf {seed_file} -C {target} && "
                 f"rm {seed_file}"],
        "stream-xz": ["sh", "-c", f"curl -sf {base}root.tar.xz | pixz -d | {tar_x}"],
        **found,
        "tmpfsboot-xz": [*tmpfsboot, f"{base}root.tar.xz", str(target)],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--roots", default="small-file,large-file",
                        help=f"which roots, of {', '.join(ROOTS)}")
    parser.add_argument("--cpus", default="1,2",
                        help="N,M,...: run every method on the first N CPUs (taskset)")
    parser.add_argument("--all", action="store_true",
                        help="also the seed and xz, on the large-file (and mixed) root")
    parser.add_argument("--cache", type=Path, default=Path("/var/tmp/tmpfsboot-bench"))
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/fetch.py mounts tmpfs: run it as root")
    names = args.roots.split(",")
    if unknown := [n for n in names if n not in ROOTS]:
        raise SystemExit(f"--roots: no root {', '.join(unknown)}; there are {', '.join(ROOTS)}")
    xz = {n: args.all and n in XZ_ROOTS for n in names}
    images = {n: build_images(ROOTS[n], args.cache, ("zstd", "xz") if xz[n] else ("zstd",))
              for n in names}
    load = [os.getloadavg()[0]]
    servers, results = [], {n: dict[str, list[Run]]() for n in names}
    work = Path(tempfile.mkdtemp(prefix="tmpfsboot-bench."))
    target, ramdir = work / "root", work / "ram"
    started = time.monotonic()
    try:
        commands = {}
        for n in names:
            port = free_port()
            servers.append(subprocess.Popen(
                [sys.executable, "-m", "tmpfsboot", "--quiet", "serve", str(images[n].www),
                 "--port", str(port), "--max-streams", "16"], stderr=subprocess.DEVNULL))
            commands[n] = pinned(methods(f"http://127.0.0.1:{port}/", images[n], target,
                                         ramdir, xz[n]), args.cpus)
        time.sleep(1.0)
        with mounted_tmpfs(ramdir, size="2g"):
            # This VM hands freed RAM back to its host: the first fetch into a tmpfs pays
            # for getting it back. One fetch per root, not measured, takes that.
            for n in names:
                with mounted_tmpfs(target, size="4g"):
                    measure(commands[n][next(iter(commands[n]))])
            for round_ in range(1, args.rounds + 1):
                for n in names:
                    for name, argv in commands[n].items():
                        with mounted_tmpfs(target, size="4g"):
                            run = measure(argv)
                        results[n].setdefault(name, []).append(run)
                        print(f"round {round_} {n:10s} {name:20s} {run.seconds:6.2f} s  "
                              f"CPU {run.cpu:5.2f} s  peak RSS {run.peak_rss / 2**20:6.1f} MiB",
                              flush=True)
    finally:
        for server in servers:
            server.terminate()
            server.wait()
        shutil.rmtree(work, ignore_errors=True)
    load.append(os.getloadavg()[0])
    print(f"{time.monotonic() - started:.0f} s, {args.rounds} round(s)", flush=True)
    body = report(images, results, args, load)
    print(body)
    if args.write:
        write_section(args.output, "## Fetch", body)
    return 0


def report(images: dict[str, Images], results: dict[str, dict[str, list[Run]]],
           args: argparse.Namespace, load: list[float]) -> str:
    """The `## Fetch` section: how it was run, the roots, a table per root, the goals."""
    rounds = f"{args.rounds} round{'s' if args.rounds > 1 else ''}"
    xz = any("root.tar.xz" in im.sizes for im in images.values())
    rows = [
        f"How reproduced: `.venv/bin/python bench/fetch.py --write` (`make bench`; {rounds}"
        f"{', --all' if args.all else ''}). Each root is served by `tmpfsboot serve` on "
        "127.0.0.1 (its own process, not pinned) and fetched into a fresh tmpfs by each "
        "method under `taskset -c 0-(N-1)` for N CPUs: `stream-zstd` is `curl | zstd -dcq | "
        "tar -x`; `stream-zstd-sha` the same with `tee >(openssl dgst -sha256)` and the digest "
        "checked against SHA256SUMS at the end (tmpfsboot hashes while it streams, with "
        "OpenSSL's SHA-256 too; coreutils' `sha256sum` has no SHA-NI and hashes at a fifth "
        "of its speed on this machine); "
        "`tmpfsboot-zstd` is `tmpfsboot fetch` (SHA256SUMS and manifest, then the image, "
        "verified)"
        + ("; `seed` downloads the xz image to a file in a tmpfs, then `tar -Ipixz -xf`, "
           "`stream-xz` is `curl | pixz -d | tar -x`" if xz else "")
        + ". Roots, methods and CPU counts take turns round by round, after one unmeasured "
        "fetch per root; medians of the walls and of the CPU seconds (user + system of all "
        "the pipeline's processes); peak RSS is the most over the rounds of the pipeline's "
        "summed RSS, sampled every 10 ms. Images by `tmpfsboot image build` (zstd at its "
        f"default level{', xz by pixz' if xz else ''}).",
        "",
    ]
    for n, im in images.items():
        zst = im.sizes["root.tar.zst"]
        xz_size = (f", xz image {im.sizes['root.tar.xz'] / 1e6:.1f} MB"
                   if "root.tar.xz" in im.sizes else "")
        rows.append(
            f"- {n}: {ROOTS[n].about}. {im.entries:,} entries, {im.files:,} of them "
            f"distinct files of {im.file_bytes / 1e6:.0f} MB, "
            f"{im.file_bytes / im.files / 1e3:,.1f} KB on average "
            f"({im.unpacked / 2**20:.0f} MiB unpacked in tmpfs pages); zstd image "
            f"{zst / 1e6:.1f} MB ({im.file_bytes / zst:.1f}x){xz_size}.")
    for n, runs in results.items():
        rows += ["", f"### {n}", "", *root_report(runs, args.cpus,
                                                  images[n].sizes.get("root.tar.xz", 0))]
    rows += ["", f"Measured {time.strftime('%Y-%m-%d')} ({os.cpu_count()} cores), load "
             f"average {load[0]:.1f} at the start and {load[1]:.1f} at the end."]
    return "\n".join(rows)


def root_report(runs: dict[str, list[Run]], cpus: str, xz_size: int) -> list[str]:
    """One root's table (each CPU count's methods together) and its goals; XZ_SIZE is
    the xz image's, which the seed holds in RAM besides its processes."""
    wall = {k: statistics.median(r.seconds for r in v) for k, v in runs.items()}
    cpu = {k: statistics.median(r.cpu for r in v) for k, v in runs.items()}
    peak = {k: max(r.peak_rss for r in v) for k, v in runs.items()}
    rows = ["| method | CPUs | median wall | vs stream-zstd | vs stream-zstd-sha "
            "| CPU (user+sys) | CPU / wall | peak RSS |",
            "|---|---|---|---|---|---|---|---|"]
    goals = []
    for n in cpus.split(",") if cpus else [""]:
        # pinned() names a method "stream-zstd 2cpu"; without --cpus it keeps the name.
        def key(method: str, n: str = n) -> str:
            return f"{method} {n}cpu" if n else method

        native, sha, engine = key(NATIVE), key(NATIVE_SHA), key(ENGINE)
        for name in [k for k in runs if k == key(k.split(" ")[0])]:
            rows.append(
                f"| {name.split(' ')[0]} | {n or 'all'} | {wall[name]:.2f} s "
                f"| {wall[name] / wall[native]:.2f}x | {wall[name] / wall[sha]:.2f}x "
                f"| {cpu[name]:.2f} s | {cpu[name] / wall[name]:.2f} "
                f"| {peak[name] / 2**20:.0f} MiB"
                f"{f' + {xz_size / 2**20:.0f} MiB file in RAM' if name == key('seed') else ''} |")
        ratio = wall[engine] / wall[native]
        line = (f"{n + ' CPU' + ('s' if n != '1' else '') if n else 'All CPUs'}: "
                f"tmpfsboot-zstd / stream-zstd **{ratio:.2f}x** (goal: at most "
                f"{GOAL_RATIO:.2f}x, {'met' if ratio <= GOAL_RATIO else 'not met'}), / "
                f"stream-zstd-sha {wall[engine] / wall[sha]:.2f}x; tmpfsboot spends "
                f"{cpu[engine] - cpu[native]:+.2f} CPU-s against stream-zstd, "
                f"{cpu[engine] - cpu[sha]:+.2f} against stream-zstd-sha")
        if key("seed") in wall:
            line += (f"; tmpfsboot-xz / stream-xz "
                     f"{wall[key('tmpfsboot-xz')] / wall[key('stream-xz')]:.2f}x, "
                     f"seed / tmpfsboot-zstd {wall[key('seed')] / wall[engine]:.1f}x")
        goals.append(f"- {line}.")
    counts = cpus.split(",") if cpus else []
    if len(counts) > 1:
        few, many = counts[0], counts[-1]
        gains = ", ".join(f"{m} {wall[f'{m} {few}cpu'] / wall[f'{m} {many}cpu']:.2f}x"
                          for m in (NATIVE, NATIVE_SHA, ENGINE))
        goals.append(f"- {many} CPUs against {few}, wall {few} / wall {many}: {gains}.")
    for method in (ENGINE, "tmpfsboot-xz"):
        if tops := [peak[k] for k in runs if k.split(" ")[0] == method]:
            goals.append(f"- Peak RSS of {method}: at most {max(tops) / 2**20:.0f} MiB (goal: "
                         f"at most {GOAL_RSS // 2**20} MiB, "
                         f"{'met' if max(tops) <= GOAL_RSS else 'not met'}).")
    return [*rows, "", *goals]


if __name__ == "__main__":
    sys.exit(main())
