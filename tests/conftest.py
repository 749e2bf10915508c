"""Shared fixtures: one real initramfs per session, a loopback server that fails on purpose."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tmpfsboot.initramfs import build_initramfs, default_kernel, kernel_image

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


@dataclass
class FailingServer:
    """A loopback HTTP server whose first FAIL_FIRST requests get 503."""

    port: int
    fail_first: int
    requests: list[tuple[str, int]] = field(default_factory=list)


@pytest.fixture
def serve_failing() -> Callable[..., contextlib.AbstractContextManager[FailingServer]]:
    """start_failing_server, as a fixture."""
    return start_failing_server


@contextlib.contextmanager
def start_failing_server(root: Path, *, fail_first: int,
                         retry_after: int = 1) -> Iterator[FailingServer]:
    """Serve ROOT on 127.0.0.1; the first FAIL_FIRST requests get 503 with Retry-After."""
    lock = threading.Lock()
    state = FailingServer(port=0, fail_first=fail_first)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

        def do_GET(self) -> None:
            with lock:
                failing = len(state.requests) < state.fail_first
                state.requests.append((self.path, 503 if failing else 200))
            if failing:
                self.send_response(503)
                self.send_header("Retry-After", str(retry_after))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            super().do_GET()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
