#!/usr/bin/env python3
"""Benchmark: a dracut-built initramfs against initramfs-tools', size and boot time.

Builds, for this host's newest kernel: dracut without systemd (network-legacy) with and
without tmpfsboot, dracut with its systemd module with and without tmpfsboot, and
initramfs-tools (MODULES=list) with tmpfsboot. Then boots the demo's two layers from the
embedded server on 127.0.0.1 with each tmpfsboot initramfs, interleaved round by round
(A B C, A B C, ...: this VM's speed drifts with its neighbours' load, so only ratios
within one run mean something), and measures QEMU start to the image's init printing the
nonce. Prints medians and ratios and writes them to docs/benchmarks.md under `## dracut`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the shared helpers: tests/support

from support.report import write_section  # noqa: E402

from tmpfsboot.host.demo import build_demo_root, build_layer  # noqa: E402
from tmpfsboot.host.dracut import COMPRESS, build_dracut  # noqa: E402
from tmpfsboot.host.image import build_image  # noqa: E402
from tmpfsboot.host.initramfs import build_initramfs, default_kernel, kernel_image  # noqa: E402
from tmpfsboot.host.serve import start_server  # noqa: E402
from tmpfsboot.host.vm import boot_vm, guest_url  # noqa: E402

HOSTNAME = "node7"
SECTION = "## dracut"


def timed_build(build: Callable[[], Path]) -> tuple[Path, float]:
    start = time.monotonic()
    path = build()
    return path, time.monotonic() - start


def boot_seconds(kernel: Path, initrd: Path, port: int, root: str, nonce: str) -> float | None:
    """QEMU start to the nonce line; None if the boot did not get there."""
    start = time.monotonic()
    seen: list[float] = []

    def echo(line: str) -> None:
        if f"NONCE: {nonce}" in line and not seen:
            seen.append(time.monotonic() - start)

    boot_vm(kernel, initrd, append=[f"root={root}", "rd.shell=0", "rd.emergency=reboot"],
            server_port=port, hostname=HOSTNAME, timeout=400, echo=echo)
    return seen[0] if seen else None


def mb(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.2f} MB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/")
    args = parser.parse_args()
    version = default_kernel()
    kernel = kernel_image(version)
    with tempfile.TemporaryDirectory(prefix="tmpfsboot-bench-dracut.") as tmp_name:
        tmp = Path(tmp_name)
        builds = {
            "dracut, no systemd": (
                lambda: build_dracut(tmp / "d.img", kernel=version),
                lambda: build_dracut(tmp / "d0.img", kernel=version, enable=False)),
            "dracut, systemd": (
                lambda: build_dracut(tmp / "ds.img", kernel=version, systemd=True),
                lambda: build_dracut(tmp / "ds0.img", kernel=version, systemd=True,
                                     enable=False)),
            "initramfs-tools, MODULES=list": (
                lambda: build_initramfs(tmp / "it.img", kernel=version, modules="list"),
                lambda: build_initramfs(tmp / "it0.img", kernel=version, modules="list",
                                        enable=False)),
        }
        sizes: list[str] = []
        initrds: dict[str, Path] = {}
        for name, (with_, without) in builds.items():
            img, secs = timed_build(with_)
            plain, _ = timed_build(without)
            initrds[name] = img
            added = (img.stat().st_size - plain.stat().st_size) / 1e6
            sizes.append(f"| {name} | {mb(plain)} | {mb(img)} | +{added:.2f} MB | {secs:.0f} s |")
            print(sizes[-1], flush=True)

        images = tmp / "images"
        images.mkdir()
        nonce = "bench" + str(int(time.time()))
        build_image(build_demo_root(tmp / "base", nonce=nonce), images, "base")
        build_image(build_layer(tmp / "host", {"etc/tmpfsboot-demo/layers": "base\nhost\n"}),
                    images, f"host-{HOSTNAME}")
        root = ",".join(guest_url(f"{n}.tar.zst") for n in ("base", "host-%hostname"))
        times: dict[str, list[float]] = {name: [] for name in initrds}
        failed: dict[str, int] = {name: 0 for name in initrds}
        with start_server(images, access_log=False) as server:
            for rnd in range(args.rounds):
                for name, initrd in initrds.items():
                    took = boot_seconds(kernel, initrd, server.port, root, nonce)
                    if took is None:
                        failed[name] += 1
                    else:
                        times[name].append(took)
                    print(f"round {rnd + 1} {name}: {took}", flush=True)
    ref = statistics.median(times["initramfs-tools, MODULES=list"] or [float("nan")])
    rows = []
    for name, values in times.items():
        med = statistics.median(values) if values else float("nan")
        spread = f"{min(values):.1f}-{max(values):.1f} s" if values else "-"
        rows.append(f"| {name} | {med:.1f} s | {spread} | {med / ref:.2f} | {failed[name]} |")
    text = "\n".join([
        SECTION,
        "",
        f"How reproduced: `bench/dracut.py --rounds {args.rounds}` (kernel {version}, dracut "
        "059,",
        f"`--compress '{COMPRESS}'`, `--no-hostonly`, network-legacy; the initramfs-tools "
        "build is",
        "`MODULES=list`). Boots interleaved round by round, the demo's two layers (base +",
        "`host-%hostname`), QEMU start to the image's init printing the nonce, `-accel tcg "
        "-smp 1",
        "-m 1G`, on 2 cores shared with other work.",
        "",
        "### Initramfs size and build time",
        "",
        "| generator | without tmpfsboot | with tmpfsboot | added | build with |",
        "|---|---|---|---|---|",
        *sizes,
        "",
        "### Boot time (QEMU start to the nonce)",
        "",
        "| initramfs | median | range | ratio to initramfs-tools | failed boots |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ])
    print(text)
    if not args.no_write:
        write_section(REPO / "docs" / "benchmarks.md", SECTION, text.removeprefix(SECTION))
    return 0


if __name__ == "__main__":
    sys.exit(main())
