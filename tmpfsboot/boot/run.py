"""The one way tmpfsboot runs programs, on the boot side and the host side alike."""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from typing import IO, Any

from .errors import CommandError

log = logging.getLogger("tmpfsboot")

# The Debian package that provides each program we call: named in "not found" errors.
PACKAGES = {
    "tar": "tar",
    "zstd": "zstd",
    "pixz": "pixz",
    "xz": "xz-utils",
    "pigz": "pigz",
    "gzip": "gzip",
    "bzip2": "bzip2",
    "lbzip2": "lbzip2",
    "gpgv": "gpgv",
    "gpg": "gnupg",
    "mksquashfs": "squashfs-tools",
    "mkfs.erofs": "erofs-utils",
    "mkinitramfs": "initramfs-tools",
    "dracut": "dracut-core",
    "qemu-system-x86_64": "qemu-system-x86",
    "debootstrap": "debootstrap",
    "nginx": "nginx-light",
    "busybox": "busybox-static",
    "mount": "mount",
    "setfacl": "acl",
    "getfacl": "acl",
}


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A small, predictable environment for children: PATH, HOME and LANG=C.UTF-8."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "LANG": "C.UTF-8",
        "HOME": os.environ.get("HOME", "/"),
    }
    if extra:
        env.update(extra)
    return env


def find_program(name: str) -> str | None:
    """The full path of NAME on PATH, or None."""
    return shutil.which(name)


def require_program(name: str) -> str:
    """The full path of NAME, or CommandError naming the package that provides it."""
    path = find_program(name)
    if path is None:
        package = PACKAGES.get(name, name)
        raise CommandError(f"{name}: not found; install the Debian package {package}")
    return path


def _resolve(argv: Sequence[str]) -> list[str]:
    argv = [str(a) for a in argv]
    if "/" not in argv[0]:
        argv[0] = require_program(argv[0])
    return argv


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    capture: bool = False,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ARGV to completion; stdin closed unless INPUT is given.

    Raises CommandError naming the program and its exit status (and the last line of its
    stderr when captured) if it fails and CHECK is set.
    """
    full = _resolve(argv)
    log.debug("+ %s", shlex.join(full))
    try:
        proc = subprocess.run(
            full,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
            env=clean_env(env),
            cwd=cwd,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise CommandError(f"{argv[0]}: timed out after {timeout} s") from e
    if check and proc.returncode != 0:
        detail = ""
        if capture and proc.stderr:
            lines = proc.stderr.decode(errors="replace").strip().splitlines()
            detail = f": {lines[-1]}" if lines else ""
        raise CommandError(f"{argv[0]} failed with exit status {proc.returncode}{detail}")
    return proc


def spawn(
    argv: Sequence[str],
    *,
    stdin: int | IO[Any] | None = subprocess.DEVNULL,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start ARGV as one stage of a pipeline; the caller waits for it (see wait_stage)."""
    full = _resolve(argv)
    log.debug("+ %s &", shlex.join(full))
    return subprocess.Popen(
        full, stdin=stdin, stdout=stdout, stderr=stderr, env=clean_env(env), cwd=cwd
    )


def wait_stage(proc: subprocess.Popen[bytes], name: str, *, timeout: float | None = None) -> None:
    """Wait for a pipeline stage; CommandError naming the stage if it failed."""
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired as e:
        proc.kill()
        proc.wait()
        raise CommandError(f"{name}: did not finish within {timeout} s") from e
    if code != 0:
        detail = ""
        if proc.stderr is not None:
            lines = proc.stderr.read().decode(errors="replace").strip().splitlines()
            detail = f": {lines[-1]}" if lines else ""
        reason = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        raise CommandError(f"{name} failed ({reason}){detail}")
