"""A real Debian root booted disk-less: image size, entries, and the boot's timeline.

Builds the Debian demo's images (bookworm minbase + systemd-sysv, udev, procps, from the
cached debootstrap tree; the build machine's identity left out), then boots them in QEMU
(TCG, -m 2G, one vCPU) ROUNDS times as node1 and reports, per round and as medians: time
from QEMU's start until tmpfsboot's root is ready and until systemd reached
multi-user.target (host clock), and the RAM used after boot (MemTotal - MemAvailable)
with the tmpfs root's share. The load average is printed beside: this machine is shared,
and a TCG guest slows with it; so each round also boots the peer, the busybox demo root
(same kernel, initramfs, server), and the ratio of the two says what the real root
costs over the tiny one under the same conditions (it still moves with the load).
With --write the table goes to docs/benchmarks.md between the debian markers.

    .venv/bin/python bench/debian.py [--rounds 3] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tmpfsboot.boot.log import format_bytes, setup_logging
from tmpfsboot.host.demo import build_demo_root, build_layer
from tmpfsboot.host.demo_debian import DebianBoot, boot_debian, build_debian_base, build_host_layer
from tmpfsboot.host.image import build_image
from tmpfsboot.host.initramfs import build_initramfs, default_kernel, kernel_image
from tmpfsboot.host.serve import start_server
from tmpfsboot.host.vm import boot_vm, guest_url

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
BEGIN = "<!-- debian:begin -->"
END = "<!-- debian:end -->"
UUID = "7a3f0c1e-0001-4000-8000-000000000001"


def median(values: list[float]) -> str:
    return f"{statistics.median(values):.1f}" if values else "n/a"


def replace_section(text: str, body: str) -> str:
    """TEXT with what lies between the debian markers replaced by BODY (appended if none)."""
    if BEGIN not in text or END not in text:
        return text.rstrip("\n") + "\n\n" + BEGIN + "\n" + body + "\n" + END + "\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return head + BEGIN + "\n" + body + "\n" + END + tail


def boot_busybox(kernel: Path, initrd: Path, images: Path, nonce: str) -> float:
    """Seconds from QEMU's start until the busybox demo root printed NONCE."""
    marks: dict[str, float] = {}
    start = time.monotonic()

    def watch(line: str) -> None:
        if f"NONCE: {nonce}" in line and "nonce" not in marks:
            marks["nonce"] = time.monotonic() - start

    root = ",".join(guest_url(f"{n}.tar.zst") for n in ("base", "host-%hostname"))
    with start_server(images, access_log=False) as server:
        boot_vm(kernel, initrd, append=[f"root={root}", "loglevel=4"], server_port=server.port,
                hostname="node1", timeout=600, echo=watch)
    return marks.get("nonce", float("nan"))


def report(manifest: dict[str, object], image_size: int, boots: list[DebianBoot],
           loads: list[float], peers: list[float]) -> str:
    rows = []
    for i, b in enumerate(boots, 1):
        mem = int(b.report.get("mem-used-kib", "0") or 0)
        root_used = int([*b.report.get("root", "0 0").split(), "0"][1])
        ratio = (b.multi_user or 0) / peers[i - 1]
        rows.append(f"| {i} | {b.root_ready or 0:.1f} | {b.multi_user or 0:.1f} | "
                    f"{peers[i - 1]:.1f} | {ratio:.1f}x | "
                    f"{mem / 1024:.0f} | {root_used / 1024:.0f} | {b.report.get('state')} | "
                    f"{loads[i - 1]:.1f} |")
    ratios = [(b.multi_user or 0) / p for b, p in zip(boots, peers, strict=True)]
    unpacked = manifest["unpacked_size"]
    assert isinstance(unpacked, int)
    return "\n".join([
        f"Image `base.tar.zst` (zstd 9): {format_bytes(image_size)}, "
        f"{manifest['entries']} entries, {format_bytes(unpacked)} unpacked; "
        "the per-host layer with the report unit: 14 entries, 2 KiB.",
        "",
        "| round | QEMU start to root ready (s) | to multi-user.target (s) | peer: busybox "
        "root to its init (s) | ratio | RAM used after boot (MiB) | of it the tmpfs root "
        "(MiB) | systemd | load average |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        f"| median | {median([b.root_ready for b in boots if b.root_ready])} | "
        f"{median([b.multi_user for b in boots if b.multi_user])} | {median(peers)} | "
        f"{statistics.median(ratios):.1f}x | | | | |",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    setup_logging()
    with tempfile.TemporaryDirectory(prefix="tmpfsboot-bench-debian.") as tmp:
        work = Path(tmp)
        images = work / "images"
        base = build_debian_base(images, work)
        build_host_layer(images, work, "node1", nonce=secrets.token_hex(8))
        peer_images = work / "peer"
        peer_nonce = secrets.token_hex(8)
        build_image(build_demo_root(work / "peer-base", nonce=peer_nonce), peer_images, "base")
        build_image(build_layer(work / "peer-host", {"etc/motd": "node1\n"}), peer_images,
                    "host-node1", include_root=False)
        version = default_kernel()
        initrd = build_initramfs(work / "initrd.img", kernel=version, modules="list")
        boots: list[DebianBoot] = []
        loads: list[float] = []
        peers: list[float] = []
        for _ in range(args.rounds):
            # interleaved: the peer and the Debian root share each round's load
            peers.append(boot_busybox(kernel_image(version), initrd, peer_images, peer_nonce))
            loads.append(os.getloadavg()[0])
            with start_server(images, access_log=False) as server:
                boot = boot_debian(kernel_image(version), initrd, server.port,
                                   hostname="node1", uuid=UUID, timeout=1200)
                print(f"root ready {boot.root_ready}, multi-user {boot.multi_user}, "
                      f"report {boot.report}", file=sys.stderr)
                boots.append(boot)
        manifest = json.loads((images / "base.manifest.json").read_text())
        body = report(manifest, base.stat().st_size, boots, loads, peers)
    print(body)
    if args.write:
        DOCS.write_text(replace_section(DOCS.read_text(), body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
