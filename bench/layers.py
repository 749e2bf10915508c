#!/usr/bin/env python3
"""Benchmark: one Debian root booted four ways in QEMU, side by side in one run.

- tmpfsboot, root=…/base.tar.zst (extracted into the tmpfs)
- tmpfsboot, root=…/base.squashfs (kept in RAM, mounted under an overlay)
- tmpfsboot, root=…/base.erofs (the same, erofs lz4hc)
- dracut 059's livenet, root=live:…/base.squashfs (Debian's dracut-core, dracut-network,
  dracut-live; its network-legacy module, as it needs to fetch at all)

The root is a minbase Debian (debootstrap from the mirror apt uses, cached under
~/.cache/tmpfsboot/bench-layers/) with systemd, plus a unit that waits for the boot to
finish, drops the caches, prints MemTotal - MemAvailable and powers off. Same kernel,
same QEMU settings (TCG, -smp 1, -m 2G, virtio-net, user-mode network to one loopback
server); rounds interleave the methods (A B C D, A B C D, ...).

Per boot: seconds from QEMU start to the image's init (systemd's first console line),
to the booted system (the unit's line), and the RAM in use then. Writes the medians to
docs/benchmarks.md under `## Image layers` with --write.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the shared helpers: tests/support

from support.report import write_section  # noqa: E402

from tmpfsboot.host.image import build_image  # noqa: E402
from tmpfsboot.host.initramfs import build_initramfs, default_kernel, kernel_image  # noqa: E402
from tmpfsboot.host.serve import start_server  # noqa: E402
from tmpfsboot.host.vm import boot_vm, guest_url  # noqa: E402

CACHE = Path.home() / ".cache/tmpfsboot/bench-layers"
SUITE = "bookworm"
PACKAGES = ("systemd-sysv", "udev", "procps")
MEMORY = "2G"
TIMEOUT = 400.0

REPORT = """\
#!/bin/sh
# tmpfsboot bench: once the boot is finished, report the RAM in use and power off.
systemctl is-system-running --wait >/dev/null 2>&1
sync
echo 3 >/proc/sys/vm/drop_caches
awk '/^MemTotal:/ {t = $2} /^MemAvailable:/ {a = $2} END {print "BENCH-MEM-KB", t - a}' \\
    /proc/meminfo >/dev/ttyS0
echo "BENCH-ROOT $(findmnt -n -o FSTYPE /)" >/dev/ttyS0
systemctl --no-block poweroff
"""
UNIT = """\
[Unit]
Description=tmpfsboot bench report
After=multi-user.target

[Service]
Type=simple
ExecStart=/usr/local/sbin/tmpfsboot-bench

[Install]
WantedBy=multi-user.target
"""
# systemd's first line. dracut's initramfs runs systemd too: the image's is the last one.
INIT_STARTED = re.compile(r"systemd\[1\]: systemd \d+\S* running")


def debian_mirror() -> str:
    """The Debian mirror apt uses, from /etc/apt/sources.list*."""
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in files:
        text = path.read_text() if path.is_file() else ""
        for m in re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", text, re.M):
            if "security" not in m.group(1) and "security" not in m.group(2):
                return m.group(1)
        for m in re.finditer(r"^URIs:\s*(\S+)", text, re.M):
            if "security" not in m.group(1):
                return m.group(1)
    raise SystemExit("no Debian mirror in /etc/apt/sources.list*")


def debian_root(tree: Path) -> Path:
    """A minbase Debian with systemd in TREE, from the cache (or debootstrap, then cached)."""
    key = hashlib.sha256(f"{SUITE} {PACKAGES} {REPORT} {UNIT}".encode()).hexdigest()[:12]
    cached = CACHE / f"{SUITE}-minbase-{key}.tar"
    if not cached.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            root = Path(tmp) / "root"
            subprocess.run(["debootstrap", "--variant=minbase",
                            "--include=" + ",".join(PACKAGES), SUITE, str(root),
                            debian_mirror()], check=True, stdout=subprocess.DEVNULL)
            script = root / "usr/local/sbin/tmpfsboot-bench"
            script.write_text(REPORT)
            script.chmod(0o755)
            (root / "etc/systemd/system/tmpfsboot-bench.service").write_text(UNIT)
            wants = root / "etc/systemd/system/multi-user.target.wants"
            wants.mkdir(parents=True, exist_ok=True)
            (wants / "tmpfsboot-bench.service").symlink_to(
                "/etc/systemd/system/tmpfsboot-bench.service")
            (root / "etc/hostname").write_text("bench\n")
            part = cached.with_suffix(".part")
            subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner",
                            "-C", str(root), "-cf", str(part), "."], check=True)
            part.rename(cached)
    tree.mkdir()
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner",
                    "-C", str(tree), "-xf", str(cached)], check=True)
    return tree


def dracut_initrd(out: Path, kernel: str) -> Path:
    """dracut's own livenet initramfs (the build FIELD-NOTES records), with a private
    empty configuration."""
    confdir = out.parent / "dracut.conf.d"
    confdir.mkdir(exist_ok=True)
    subprocess.run(["dracut", "--conf", "/dev/null", "--confdir", str(confdir),
                    "--no-hostonly", "--add", "livenet dmsquash-live network-legacy",
                    "--add-drivers", "virtio_net virtio_pci squashfs overlay loop",
                    "-f", str(out), kernel], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return out


@dataclass
class Boot:
    """One boot's figures."""

    init: float | None
    booted: float | None
    mem_kb: int | None
    root_fs: str | None


def boot_once(kernel: Path, initrd: Path, port: int, append: list[str]) -> Boot:
    start = time.monotonic()
    seen: dict[str, float] = {}

    def echo(line: str) -> None:
        now = time.monotonic() - start
        if "booted" not in seen and INIT_STARTED.search(line):
            seen["init"] = now
        if "booted" not in seen and "BENCH-MEM-KB" in line:
            seen["booted"] = now

    result = boot_vm(kernel, initrd, append=append, server_port=port, hostname="bench",
                     timeout=TIMEOUT, memory=MEMORY, echo=echo)
    # systemd's status lines share the console: a report may start mid-line
    mem = re.search(r"BENCH-MEM-KB (\d+)", result.console)
    fs = re.search(r"BENCH-ROOT (\S+)", result.console)
    if mem is None:
        print(result.console[-3000:], file=sys.stderr)
    return Boot(init=seen.get("init"), booted=seen.get("booted"),
                mem_kb=int(mem.group(1)) if mem else None, root_fs=fs.group(1) if fs else None)


def median(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument("--output", type=Path, default=REPO / "docs/benchmarks.md")
    args = parser.parse_args()
    version = default_kernel()
    kernel = kernel_image(version)
    with tempfile.TemporaryDirectory(prefix="tmpfsboot-bench-layers.") as tmp_name:
        tmp = Path(tmp_name)
        tree = debian_root(tmp / "tree")
        images = tmp / "images"
        images.mkdir()
        files = {}
        for fmt in ("tar", "squashfs", "erofs"):
            t0 = time.monotonic()
            files[fmt] = build_image(tree, images, "base", fmt=fmt)
            print(f"{files[fmt].name}: {files[fmt].stat().st_size / 1e6:.1f} MB, "
                  f"built in {time.monotonic() - t0:.1f} s")
        unpacked = int(subprocess.run(["du", "-sb", str(tree)], capture_output=True,
                                      text=True, check=True).stdout.split()[0])
        shutil.rmtree(tree)
        ours = build_initramfs(tmp / "initrd.img", kernel=version, modules="list")
        theirs = dracut_initrd(tmp / "dracut.img", version)
        methods = {
            "tmpfsboot tar.zst": (ours, [f"root={guest_url('base.tar.zst')}"]),
            "tmpfsboot squashfs": (ours, [f"root={guest_url('base.squashfs')}"]),
            "tmpfsboot erofs": (ours, [f"root={guest_url('base.erofs')}"]),
            "dracut livenet (squashfs)": (theirs, [
                f"root=live:{guest_url('base.squashfs')}", "rd.live.overlay.overlayfs=1",
                "ip=dhcp", "rd.neednet=1"]),
        }
        results: dict[str, list[Boot]] = {m: [] for m in methods}
        with start_server(images, access_log=False) as server:
            for r in range(args.rounds):
                for name, (initrd, append) in methods.items():
                    b = boot_once(kernel, initrd, server.port, append)
                    results[name].append(b)
                    print(f"round {r + 1} {name}: init {b.init} s, booted {b.booted} s, "
                          f"{b.mem_kb} kB in use, / is {b.root_fs}", flush=True)
        sizes = {"tmpfsboot": ours.stat().st_size, "dracut": theirs.stat().st_size}
        file_sizes = {k: v.stat().st_size for k, v in files.items()}
    body = report(results, files_sizes=file_sizes,
                  unpacked=unpacked, initrd_sizes=sizes, rounds=args.rounds, kernel=version)
    print(body)
    if args.write:
        write_section(args.output, "## Image layers", body)
    return 0


def report(results: dict[str, list[Boot]], *, files_sizes: dict[str, int], unpacked: int,
           initrd_sizes: dict[str, int], rounds: int, kernel: str) -> str:
    tar_mem = median([b.mem_kb for b in results["tmpfsboot tar.zst"]])
    tar_booted = median([b.booted for b in results["tmpfsboot tar.zst"]])
    lines = [
        "How reproduced: `.venv/bin/python bench/layers.py --write` (about 20 minutes). One "
        f"minbase Debian {SUITE} root with {', '.join(PACKAGES)} (debootstrap, cached), "
        f"{unpacked / 1e6:.0f} MB unpacked, built by `tmpfsboot image build` as "
        f"base.tar.zst ({files_sizes['tar'] / 1e6:.1f} MB), base.squashfs "
        f"({files_sizes['squashfs'] / 1e6:.1f} MB, zstd) and base.erofs "
        f"({files_sizes['erofs'] / 1e6:.1f} MB, lz4hc); booted with Debian's {kernel} "
        f"under QEMU TCG, `-smp 1 -m {MEMORY}`, virtio-net, one loopback `tmpfsboot serve`; "
        f"{rounds} interleaved rounds, medians. \"init\": QEMU start to the image's systemd "
        "announcing itself; \"booted\": to `systemctl is-system-running --wait` returning; "
        "RAM: MemTotal - MemAvailable after `drop_caches`, then. Initramfs (zstd): "
        f"tmpfsboot {initrd_sizes['tmpfsboot'] / 1e6:.1f} MB (MODULES=list), dracut "
        f"livenet {initrd_sizes['dracut'] / 1e6:.1f} MB.",
        "",
        "| method | init | booted | RAM in use | vs tar: RAM | vs tar: booted |",
        "|---|---|---|---|---|---|",
    ]
    for name, boots in results.items():
        init = median([b.init for b in boots])
        booted = median([b.booted for b in boots])
        mem = median([b.mem_kb for b in boots])
        fails = sum(b.mem_kb is None for b in boots)
        cells = [
            name + (f" ({fails} of {len(boots)} boots failed)" if fails else ""),
            "-" if init is None else f"{init:.1f} s",
            "-" if booted is None else f"{booted:.1f} s",
            "-" if mem is None else f"{mem / 1024:.0f} MiB",
            "-" if mem is None or not tar_mem else f"{mem / tar_mem:.2f}",
            "-" if booted is None or not tar_booted else f"{booted / tar_booted:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
