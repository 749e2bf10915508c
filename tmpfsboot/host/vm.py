"""Boot a kernel and an initramfs in QEMU, with user-mode networking to a loopback server.

The guest sees exactly one server: GUEST_SERVER:80, which QEMU forwards (guestfwd, one
`busybox nc` per connection) to a port on the host's 127.0.0.1. `restrict=on` keeps the
guest away from everything else, so a boot never sends traffic beyond loopback. Every run
ends by itself: `panic=5` plus `-no-reboot` turns initramfs-tools' panic into an exit,
`poweroff -f` in the guest ends QEMU, and a hard timeout kills it otherwise.
"""

from __future__ import annotations

import logging
import os
import selectors
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..boot.errors import UsageError
from ..boot.run import require_program, spawn

log = logging.getLogger("tmpfsboot")

# The address and port under which the guest reaches the host's loopback server.
GUEST_SERVER = "10.0.2.100"
GUEST_PORT = 80
BASE_APPEND = ("console=ttyS0", "panic=5", "net.ifnames=0")


@dataclass(frozen=True)
class BootResult:
    """What one boot printed on its serial console, and how it ended."""

    console: str
    returncode: int | None
    seconds: float
    timed_out: bool

    def has_line(self, text: str) -> bool:
        """True if some console line contains TEXT."""
        return any(text in line for line in self.console.splitlines())


def can_use_kvm(cpuinfo: str, *, kvm_device: bool) -> bool:
    """KVM only where the CPU flags show vmx or svm.

    A nested "PVM" /dev/kvm without them aborts, hangs or crawls with Debian's kernel.
    """
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return kvm_device and bool(flags & {"vmx", "svm"})


def choose_accel() -> str:
    """"kvm" where it works, else "tcg"."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "tcg"
    return "kvm" if can_use_kvm(cpuinfo, kvm_device=os.path.exists("/dev/kvm")) else "tcg"


def qemu_argv(
    kernel: Path,
    initrd: Path,
    *,
    append: Sequence[str],
    server_port: int | None,
    hostname: str | None = None,
    uuid: str | None = None,
    memory: str = "1G",
    accel: str | None = None,
    qemu: str = "qemu-system-x86_64",
    busybox: str = "/bin/busybox",
) -> list[str]:
    """The QEMU command line for one boot (see the module docstring). UUID sets the
    SMBIOS system UUID the guest reads in /sys/class/dmi/id/product_uuid."""
    netdev = "user,id=n0,restrict=on"
    if hostname:
        netdev += f",hostname={hostname}"
    if server_port is not None:
        netdev += (f",guestfwd=tcp:{GUEST_SERVER}:{GUEST_PORT}-"
                   f"cmd:{busybox} nc 127.0.0.1 {server_port}")
    smbios = ["-uuid", uuid] if uuid else []
    return [
        qemu, "-accel", accel or choose_accel(), "-smp", "1", "-m", memory, *smbios,
        "-nodefaults", "-display", "none", "-serial", "stdio", "-no-reboot",
        "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", " ".join([*BASE_APPEND, *append]),
        "-netdev", netdev, "-device", "virtio-net-pci,netdev=n0",
    ]


def boot_vm(
    kernel: Path,
    initrd: Path,
    *,
    append: Sequence[str] = (),
    server_port: int | None = None,
    hostname: str | None = None,
    uuid: str | None = None,
    timeout: float = 120.0,
    memory: str = "1G",
    echo: Callable[[str], None] | None = None,
) -> BootResult:
    """Boot KERNEL with INITRD until the guest powers off, panics or TIMEOUT passes.

    APPEND adds kernel parameters; SERVER_PORT is the host's 127.0.0.1 port the guest
    reaches as http://GUEST_SERVER/. ECHO, if given, receives each console line as it comes.
    """
    for path in (kernel, initrd):
        if not path.exists():
            raise UsageError(f"{path}: no such file")
    argv = qemu_argv(kernel, initrd, append=append, server_port=server_port, hostname=hostname,
                     uuid=uuid, memory=memory, qemu=require_program("qemu-system-x86_64"),
                     busybox=require_program("busybox"))
    start = time.monotonic()
    proc = spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    chunks: list[bytes] = []
    pending = b""
    timed_out = False
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            left = start + timeout - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            if not sel.select(min(left, 1.0)):
                continue
            data = proc.stdout.read()
            if not data:
                break
            chunks.append(data)
            if echo is not None:
                pending += data
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    echo(line.decode(errors="replace").rstrip("\r"))
    if timed_out:
        proc.kill()
    returncode = proc.wait()
    if echo is not None and pending:
        echo(pending.decode(errors="replace").rstrip("\r"))
    console = b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")
    seconds = time.monotonic() - start
    log.debug("QEMU exited with %s after %.1f s", returncode, seconds)
    return BootResult(console=console, returncode=None if timed_out else returncode,
                      seconds=seconds, timed_out=timed_out)


def guest_url(path: str) -> str:
    """The URL under which the guest fetches PATH from the loopback server."""
    return f"http://{GUEST_SERVER}/{path.lstrip('/')}"
