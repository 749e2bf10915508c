"""`tmpfsboot demo --debian`: a real Debian 12 with systemd, booted disk-less in QEMU.

Debootstraps bookworm (minbase, systemd-sysv, udev, procps) once from the mirror apt on
this machine uses, and keeps the tree in the cache; builds the base image from it with
the build machine's identity left out, and a per-host layer holding a systemd unit that
reports how the node booted (hostname, machine-id, `systemctl is-system-running`, the
layers, the boot phases) on the serial console and powers the node off.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..boot.errors import TmpfsbootError
from .debootstrap import DebootstrapSpec, cached_root, extract_root
from .image import build_image
from .scrub import scrubbed_tree
from .vm import GUEST_SERVER, BootResult, boot_vm, guest_url

# The guest needs RAM for its tmpfs root (about 170 MiB) and for systemd.
DEBIAN_MEMORY = "2G"
# A readable console: tmpfsboot's lines, systemd's errors, the report; no spinners.
CONSOLE_APPEND = ("loglevel=4", "systemd.show_status=error")
REPORT_NAME = "tmpfsboot-report"

# The report unit and its script, shipped as package data.
DATA = Path(__file__).parent / "data" / "demo-debian"


def build_debian_base(images: Path, workdir: Path, *,
                      spec: DebootstrapSpec | None = None) -> Path:
    """images/base.tar.zst from the cached debootstrap tree (made first if missing), the
    build machine's identity left out, as `image build --debootstrap` does."""
    tree = extract_root(cached_root(spec or DebootstrapSpec()), workdir / "debian-root")
    try:
        with scrubbed_tree(tree, in_place=True) as (scrubbed, scrub):
            return build_image(scrubbed, images, "base", identity=scrub.to_json())
    finally:
        shutil.rmtree(tree)


def build_host_layer(images: Path, workdir: Path, hostname: str, *, nonce: str) -> Path:
    """images/host-HOSTNAME.tar.zst: the report unit, enabled, and the node's own files."""
    tree = workdir / f"host-{hostname}"
    files = {
        f"etc/systemd/system/{REPORT_NAME}.service": (
            (DATA / f"{REPORT_NAME}.service").read_text(), 0o644),
        f"usr/local/sbin/{REPORT_NAME}": (
            (DATA / REPORT_NAME).read_text().replace("@GUEST_SERVER@", GUEST_SERVER), 0o755),
        "etc/tmpfsboot-demo/nonce": (nonce + "\n", 0o644),
        "etc/tmpfsboot-demo/layers": (f"base\nhost-{hostname} (chosen by %hostname)\n",
                                      0o644),
        "etc/motd": (f"{hostname}: a disk-less Debian booted by tmpfsboot\n", 0o644),
    }
    for rel, (text, mode) in files.items():
        path = tree / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(mode)
    wants = tree / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / f"{REPORT_NAME}.service"
    if not link.is_symlink():
        link.symlink_to(f"/etc/systemd/system/{REPORT_NAME}.service")
    return build_image(tree, images, f"host-{hostname}", include_root=False)


def debian_root() -> str:
    """root= for the base image and the layer chosen by %hostname."""
    return ",".join(guest_url(f"{name}.tar.zst") for name in ("base", "host-%hostname"))


def parse_report(console: str) -> dict[str, str]:
    """The `REPORT key: value` lines the report unit printed. A line may start with the
    serial getty's `node7 login: ` prompt, which ends without a newline."""
    return {m.group(1): m.group(2).strip()
            for m in re.finditer(r"REPORT ([a-z.-]+): ?(.*)$", console, re.M)}


@dataclass(frozen=True)
class DebianBoot:
    """One boot of the Debian root: the console, the report, and host-side timings
    (seconds from QEMU's start)."""

    result: BootResult
    report: dict[str, str]
    root_ready: float | None
    reported: float | None

    @property
    def multi_user(self) -> float | None:
        """When multi-user.target was reached, on the host's clock: the report's time
        less what the guest's clock says passed since."""
        try:
            since = float(self.report["uptime"]) - int(self.report["multi-user-us"]) / 1e6
        except (KeyError, ValueError):
            return None
        return None if self.reported is None else self.reported - since


def boot_debian(kernel: Path, initrd: Path, port: int, *, hostname: str, uuid: str | None,
                append: Sequence[str] = (), timeout: float = 600.0,
                echo: Callable[[str], None] | None = None) -> DebianBoot:
    """Boot base + host-%hostname from the server on 127.0.0.1:PORT as node HOSTNAME with
    SMBIOS UUID; returns what it reported."""
    marks: dict[str, float] = {}
    start = time.monotonic()

    def watch(line: str) -> None:
        for key, text in (("root", "tmpfsboot: root ready in"), ("report", "REPORT hostname:")):
            if text in line and key not in marks:
                marks[key] = time.monotonic() - start
        if echo is not None:
            echo(line)

    result = boot_vm(kernel, initrd,
                     append=[f"root={debian_root()}", *CONSOLE_APPEND, *append],
                     server_port=port, hostname=hostname, uuid=uuid, timeout=timeout,
                     memory=DEBIAN_MEMORY, echo=watch)
    return DebianBoot(result, parse_report(result.console), marks.get("root"),
                      marks.get("report"))


def run_debian_demo(workdir: Path, *, hostname: str, uuid: str, kernel: str | None,
                    timeout: float, echo: Callable[[str], None] = print) -> DebianBoot:
    """Build, serve and boot the Debian demo in WORKDIR."""
    import secrets

    from .initramfs import build_initramfs, default_kernel, kernel_image
    from .serve import start_server

    version = kernel or default_kernel()
    images = workdir / "images"
    images.mkdir(parents=True, exist_ok=True)
    nonce = secrets.token_hex(8)
    build_debian_base(images, workdir)
    build_host_layer(images, workdir, hostname, nonce=nonce)
    initrd = build_initramfs(workdir / "initrd.img", kernel=version, modules="list")
    echo(f"--- booting {kernel_image(version)} in QEMU (-uuid {uuid}): root={debian_root()} ---")
    with start_server(images, access_log=False) as server:
        boot = boot_debian(kernel_image(version), initrd, server.port, hostname=hostname,
                           uuid=uuid, timeout=timeout, echo=echo)
    result = boot.result
    echo(f"--- QEMU exited after {result.seconds:.1f} s ---")
    if result.timed_out:
        raise TmpfsbootError(f"the Debian demo VM did not finish within {timeout:.0f} s")
    if f"NONCE: {nonce}" not in result.console:
        raise TmpfsbootError("the Debian root did not come up: see the console above")
    if boot.root_ready is not None and boot.multi_user is not None:
        echo(f"--- from QEMU's start: root ready after {boot.root_ready:.1f} s, "
             f"multi-user.target after {boot.multi_user:.1f} s ---")
    return boot
