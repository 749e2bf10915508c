"""Shared fixtures: the kernel and one real initramfs per session, with test hook scripts.

The one place the test helpers are registered: tests/ on sys.path (so `support` imports
as a package, from tests and from bench/), pytest's assertion rewriting for all of
`support` (its helpers assert), and its fixture plugins (the fault matrix and its scenes).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
pytest.register_assert_rewrite("support")

pytest_plugins = ["support.reliability", "support.faults"]

from tmpfsboot.host.initramfs import build_initramfs, default_kernel, kernel_image  # noqa: E402

# Boot scripts built into the session's initramfs: each hook directory announces itself
# with what it can see, so a boot shows the order and the state at each point.
_HOOK_HEADER = """\
#!/bin/sh
PREREQ=""
prereqs() { echo "$PREREQ"; }
case "$1" in prereqs) prereqs; exit 0 ;; esac
"""
TEST_HOOKS = {
    "tmpfs-top/tmpfsboot-test": (
        'echo "TESTHOOK tmpfs-top net=$(ls /run/net-*.conf 2>/dev/null | wc -l)"\n'
    ),
    "tmpfs-premount/tmpfsboot-test": (
        'echo "TESTHOOK tmpfs-premount root=$(grep " ${rootmnt} " /proc/mounts | cut -d" " -f3)'
        ' entries=$(ls -A "${rootmnt}" | wc -l)"\n'
    ),
    # After the last layer: Debian's tmpfs refuses user.* xattrs; security.* and
    # trusted.* must come through. busybox has no getfattr: ask the initramfs' Python.
    "tmpfs-bottom/tmpfsboot-test": (
        'echo "TESTHOOK tmpfs-bottom init=$(test -x "${rootmnt}/sbin/init" && echo yes)"\n'
        'if [ -e "${rootmnt}/xattr-probe" ]; then\n'
        '\t/usr/bin/python3.11 -I -S -c \'import os, sys; p = sys.argv[1]; '
        'print("XATTRS", " ".join(f"{n}={os.getxattr(p, n).decode()}" '
        'for n in sorted(os.listxattr(p))))\' "${rootmnt}/xattr-probe"\n'
        "fi\n"
    ),
}


@pytest.fixture(scope="session")
def kernel_version() -> str:
    """The Debian kernel the VM tests boot (the newest in /boot)."""
    return default_kernel()


@pytest.fixture(scope="session")
def kernel(kernel_version: str) -> Path:
    """/boot/vmlinuz-VERSION."""
    return kernel_image(kernel_version)


@pytest.fixture(scope="session")
def test_scripts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scripts directory with the TEST_HOOKS in tmpfs-top, tmpfs-premount, tmpfs-bottom."""
    root = tmp_path_factory.mktemp("scripts")
    for rel, body in TEST_HOOKS.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_HOOK_HEADER + body)
        path.chmod(0o755)
    return root


@pytest.fixture(scope="session")
def initrd(tmp_path_factory: pytest.TempPathFactory, kernel_version: str,
           test_scripts: Path) -> Path:
    """The session's initramfs: real mkinitramfs -d, MODULES=list, tmpfsboot, TEST_HOOKS."""
    out = tmp_path_factory.mktemp("initrd") / "initrd.img"
    return build_initramfs(out, kernel=kernel_version, modules="list", scripts=test_scripts)
