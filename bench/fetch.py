#!/usr/bin/env python3
"""Benchmark: tmpfsboot fetch against the seed's pipeline and native streaming pipelines.

Builds a root of about 800 MB from this host's /usr (zstd with tmpfsboot's image builder,
xz with pixz), serves it with `tmpfsboot serve` on 127.0.0.1, and extracts it into a
fresh tmpfs with each method, interleaved round by round (this VM returns freed RAM to
its host, so early runs are slower: only ratios within one run mean something):

- seed: download to a file in RAM (a tmpfs, as the initramfs' /tmp), then tar -Ipixz -xf
- stream-xz: curl | pixz -d | tar -x
- stream-zstd: curl | zstd -d | tar -x
- tmpfsboot-xz, tmpfsboot-zstd: `tmpfsboot fetch` (SHA-256 verified while streaming)

Prints medians and ratios and writes them to docs/benchmarks.md under `## Fetch`.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
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

from support.mounts import mounted_tmpfs  # noqa: E402
from support.report import write_section  # noqa: E402
from support.serve import free_port  # noqa: E402

from tmpfsboot.host.image import build_image  # noqa: E402

# Parts of this host's /usr that make a root of ~800 MB and ~25,000 entries.
SOURCES = ("usr/bin", "usr/include", "usr/share/doc", "usr/share/locale", "usr/lib/python3",
           "usr/lib/python3.11")
TAR_X = ["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-x"]


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


def build_images(cache: Path) -> tuple[Path, int, int]:
    """The tree and both images in CACHE (built once); returns (www, bytes, entries)."""
    tree, www = cache / "tree", cache / "www"
    if not (tree / ".complete").exists():
        shutil.rmtree(tree, ignore_errors=True)
        tree.mkdir(parents=True)
        for src in SOURCES:
            dest = tree / src
            dest.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["cp", "-a", f"/{src}", str(dest)], check=True)
        (tree / ".complete").write_text("")
    www.mkdir(exist_ok=True)
    for compression, name in (("zstd", "root.tar.zst"), ("xz", "root.tar.xz")):
        if not (www / name).exists():
            print(f"building {name} ...", flush=True)
            build_image(tree, www, "root", compression=compression)
    out = subprocess.run(["du", "-sb", "--exclude=.complete", str(tree)], check=True,
                         capture_output=True, text=True).stdout
    entries = sum(len(d) + len(f) for _, d, f in os.walk(tree))
    return www, int(out.split()[0]), entries


def methods(base: str, target: Path, ramdir: Path) -> dict[str, list[str]]:
    tar_x = " ".join(TAR_X[:1] + [f"'{a}'" for a in TAR_X[1:]])
    tmpfsboot = [sys.executable, "-m", "tmpfsboot", "--quiet", "fetch"]
    seed_file = ramdir / "root.tar.xz"
    return {
        "seed": ["sh", "-c", f"curl -sf -o {seed_file} {base}root.tar.xz && "
                 f"tar -Ipixz --xattrs --xattrs-include='*' -xf {seed_file} -C {target} && "
                 f"rm {seed_file}"],
        "stream-xz": ["sh", "-c", f"curl -sf {base}root.tar.xz | pixz -d | {tar_x} -C {target}"],
        "stream-zstd": ["sh", "-c",
                        f"curl -sf {base}root.tar.zst | zstd -dcq | {tar_x} -C {target}"],
        "tmpfsboot-xz": [*tmpfsboot, f"{base}root.tar.xz", str(target)],
        "tmpfsboot-zstd": [*tmpfsboot, f"{base}root.tar.zst", str(target)],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path("/var/tmp/tmpfsboot-bench"))
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/fetch.py mounts tmpfs: run it as root")
    www, size, entries = build_images(args.cache)
    sizes = {p.name: p.stat().st_size for p in www.glob("root.tar.*")}
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tmpfsboot", "--quiet", "serve", str(www),
                               "--port", str(port), "--max-streams", "16"],
                              stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    results: dict[str, list[Run]] = {}
    work = Path(tempfile.mkdtemp(prefix="tmpfsboot-bench."))
    target, ramdir = work / "root", work / "ram"
    try:
        with mounted_tmpfs(ramdir, size="1g"):
            for round_ in range(1, args.rounds + 1):
                for name, argv in methods(f"http://127.0.0.1:{port}/", target, ramdir).items():
                    with mounted_tmpfs(target, size="4g"):
                        run = measure(argv)
                    results.setdefault(name, []).append(run)
                    print(f"round {round_} {name:15s} {run.seconds:6.2f} s  "
                          f"CPU {run.cpu:5.2f} s  peak RSS {run.peak_rss / 2**20:6.1f} MiB",
                          flush=True)
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)

    median = {k: statistics.median(r.seconds for r in v) for k, v in results.items()}
    peak = {k: max(r.peak_rss for r in v) for k, v in results.items()}
    cpu = {k: statistics.median(r.cpu for r in v) for k, v in results.items()}
    rows = [
        f"Root: {size / 1e6:.0f} MB in {entries:,} entries (parts of this host's /usr); "
        f"zstd image {sizes['root.tar.zst'] / 1e6:.1f} MB (tmpfsboot image build, default "
        f"level), xz image {sizes['root.tar.xz'] / 1e6:.1f} MB (pixz). Served by "
        f"`tmpfsboot serve` on 127.0.0.1, extracted into a fresh tmpfs; {args.rounds} "
        "interleaved rounds, medians. Peak RSS is the summed RSS of the pipeline's "
        "processes (sampled every 10 ms); the seed also holds the whole compressed image "
        "in RAM.",
        "",
        "| method | median wall | vs seed | vs stream-zstd | CPU (user+sys) | peak RSS |",
        "|---|---|---|---|---|---|",
    ]
    for name in results:
        extra = (f" + {sizes['root.tar.xz'] / 2**20:.0f} MiB file in RAM"
                 if name == "seed" else "")
        rows.append(f"| {name} | {median[name]:.2f} s | {median[name] / median['seed']:.2f}x "
                    f"| {median[name] / median['stream-zstd']:.2f}x | {cpu[name]:.2f} s "
                    f"| {peak[name] / 2**20:.0f} MiB{extra} |")
    rows += [
        "",
        f"tmpfsboot-zstd / stream-zstd: **{median['tmpfsboot-zstd'] / median['stream-zstd']:.2f}x**"
        f" (aim: at most 1.10x); tmpfsboot-xz / stream-xz: "
        f"**{median['tmpfsboot-xz'] / median['stream-xz']:.2f}x** (aim: at most 1.00x); "
        f"seed / tmpfsboot-zstd: **{median['seed'] / median['tmpfsboot-zstd']:.1f}x** faster.",
        "",
        "Where the zstd gap comes from: the machine has 2 cores and both pipelines keep them "
        f"busy, so wall time follows CPU time. tmpfsboot spends "
        f"{cpu['tmpfsboot-zstd'] - cpu['stream-zstd']:.2f} CPU-s more than "
        "`curl | zstd -d | tar -x`: the SHA-256 of the image, computed while it streams "
        "(the native pipeline verifies nothing), and tar headers parsed in Python rather "
        "than C. What it buys: a root verified before it boots, paths resolved as if the "
        "target were `/` across layers (GNU tar writes through an earlier layer's "
        "symlink), whiteouts, and xattrs the file system refuses skipped rather than fatal. "
        "With xz the decompressor is the bottleneck and the two are level.",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} with `make bench` ({os.cpu_count()} cores).",
    ]
    body = "\n".join(rows)
    print(body)
    write_section(args.output, "## Fetch", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
