"""`tmpfsboot demo`: a disk-less boot, end to end, on this machine.

Builds a small busybox root image and a per-host layer chosen by %hostname, serves them
on 127.0.0.1 with the embedded server, builds an initramfs with the real mkinitramfs,
and boots Debian's kernel in QEMU with root=URL. The console streams live; the booted root
ends it by saying where it runs.
"""

from __future__ import annotations

import logging
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

from ..boot.errors import TmpfsbootError
from ..boot.run import require_program
from .initramfs import build_initramfs, default_kernel, kernel_image
from .vm import BootResult, boot_vm, guest_url

log = logging.getLogger("tmpfsboot")

# The Debian demo node's SMBIOS UUID: its machine-id is derived from it.
DEMO_UUID = "7a3f0c1e-0001-4000-8000-000000000001"

# Applets the demo root links to /bin/busybox.
APPLETS = ("sh", "cat", "echo", "hostname", "poweroff", "mount", "grep", "sed", "sleep",
           "ls", "head", "wc", "df", "uname", "cut", "tr")

# The image's /sbin/init: says where it runs, then powers the machine off.
INIT_SCRIPT = """\
#!/bin/sh
# tmpfsboot demo root: report where this root runs, then power off.
export PATH=/bin:/sbin
mount -t proc proc /proc 2>/dev/null
echo
echo "=== Hello from the booted root (its /sbin/init, PID $$) ==="
echo "hostname:    $(hostname)"
echo "root:        $(grep ' / ' /proc/mounts | cut -d' ' -f1,3,4)"
echo "size:        $(df -h / | sed -n 2p | tr -s ' ' | cut -d' ' -f2,3) (size, used)"
echo "layers:      $(cat /etc/tmpfsboot-demo/layers | tr '\\n' ' ')"
echo "kernel:      $(uname -r)"
log=/run/tmpfsboot/boot.jsonl
if [ -f $log ]; then
    echo "boot log:    $log (moved here from the initramfs), $(wc -l <$log) events; phases:"
    sed -n 's/.*"name": "\\([^"]*\\)".*"seconds": \\([0-9.]*\\).*/    \\2 s  \\1/p' $log
fi
echo "NONCE: $(cat /etc/tmpfsboot-demo/nonce)"
echo "=== No disk, no NFS: this root lives in RAM. Powering off. ==="
poweroff -f
"""


OS_RELEASE = 'NAME="tmpfsboot demo"\nID=tmpfsboot-demo\nPRETTY_NAME="tmpfsboot demo root"\n'


def write_file(path: Path, text: str, *, mode: int = 0o644) -> None:
    """Write TEXT to PATH (parents created) with MODE."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def build_demo_root(dest: Path, *, nonce: str) -> Path:
    """A minimal root in DEST: static busybox, its applets, /sbin/init (INIT_SCRIPT), NONCE."""
    busybox = Path(require_program("busybox")).resolve()
    for d in ("bin", "sbin", "etc/tmpfsboot-demo", "dev", "proc", "sys", "run", "tmp", "root"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    (dest / "tmp").chmod(0o1777)
    shutil.copy2(busybox, dest / "bin" / "busybox")
    for applet in APPLETS:
        link = dest / "bin" / applet
        if not link.is_symlink():
            link.symlink_to("busybox")
    write_file(dest / "sbin" / "init", INIT_SCRIPT, mode=0o755)
    write_file(dest / "etc" / "tmpfsboot-demo" / "nonce", nonce + "\n")
    write_file(dest / "etc" / "tmpfsboot-demo" / "layers", "base\n")
    # systemd's switch-root (dracut's systemd flavour) refuses a root without os-release
    write_file(dest / "etc" / "os-release", OS_RELEASE)
    return dest


def build_layer(dest: Path, files: dict[str, str]) -> Path:
    """A layer tree in DEST holding FILES (relative path -> text)."""
    for rel, text in files.items():
        write_file(dest / rel, text)
    return dest


def run_demo(
    workdir: Path,
    *,
    hostname: str = "node1",
    kernel: str | None = None,
    timeout: float = 300.0,
    echo: Callable[[str], None] = print,
) -> BootResult:
    """Build, serve and boot the demo in WORKDIR; returns the boot's console and outcome."""
    from .image import build_image  # host-side tools, imported when the demo runs
    from .serve import start_server

    version = kernel or default_kernel()
    images = workdir / "images"
    images.mkdir(parents=True, exist_ok=True)
    nonce = secrets.token_hex(8)
    base = build_demo_root(workdir / "base", nonce=nonce)
    build_image(base, images, "base")
    host = build_layer(workdir / f"host-{hostname}", {
        "etc/tmpfsboot-demo/layers": f"base\nhost-{hostname} (chosen by %hostname)\n",
        "etc/motd": f"{hostname}: a tmpfsboot demo node\n",
    })
    build_image(host, images, f"host-{hostname}")
    initrd = build_initramfs(workdir / "initrd.img", kernel=version, modules="list")
    root = ",".join(guest_url(f"{name}.tar.zst") for name in ("base", "host-%hostname"))
    echo(f"--- booting {kernel_image(version)} in QEMU: root={root} ---")
    with start_server(images) as server:
        result = boot_vm(kernel_image(version), initrd, append=[f"root={root}", "loglevel=4"],
                         server_port=server.port, hostname=hostname, timeout=timeout,
                         echo=echo)
        served = server.snapshot().answered
    echo(f"--- QEMU exited after {result.seconds:.1f} s; the server answered {served} requests ---")
    if result.timed_out:
        raise TmpfsbootError(f"the demo VM did not finish within {timeout:.0f} s")
    if f"NONCE: {nonce}" not in result.console:
        raise TmpfsbootError("the demo root did not come up: see the console above")
    return result
