"""Real tmpfs mounts for tests and benchmarks: one context manager (fixtures wrap it)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

# Resolved once, at import: tests that empty PATH must not leave mounts behind.
MOUNT = shutil.which("mount") or "/bin/mount"
UMOUNT = shutil.which("umount") or "/bin/umount"


@contextlib.contextmanager
def mounted_tmpfs(path: Path, *, size: str = "256m", mode: str = "0755") -> Iterator[Path]:
    """A fresh tmpfs mounted on PATH (created if missing), unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run([MOUNT, "-t", "tmpfs", "-o", f"size={size},mode={mode}", "tmpfs",
                    str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run([UMOUNT, "--lazy", str(path)], check=True)


def unmount_if_mounted(path: Path) -> None:
    """Unmount PATH if something (the code under test) mounted it."""
    if os.path.ismount(path):
        subprocess.run([UMOUNT, str(path)], check=True)
