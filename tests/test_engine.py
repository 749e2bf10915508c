"""The engine end to end over a real loopback HTTP server: formats, layers, the event log."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_image import mounted_tmpfs

from tmpfsboot.boot.cmdline import NetFacts, parse_root, resolve_layers
from tmpfsboot.boot.engine import fetch_root
from tmpfsboot.boot.errors import CommandError, PermanentHTTPError, UsageError
from tmpfsboot.boot.log import NO_EVENTS, EventLog
from tmpfsboot.boot.policy import FetchPolicy, Verify

pytestmark = pytest.mark.integration


REQUESTS: list[str] = []


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        REQUESTS.append(self.path)
        if self.path.startswith("/moved/"):  # a redirect to the same file elsewhere
            self.send_response(302)
            self.send_header("Location", self.path.removeprefix("/moved"))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path.startswith("/to-ftp/"):
            self.send_response(301)
            self.send_header("Location", "ftp://127.0.0.1/" + self.path.removeprefix("/to-ftp/"))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()


class _ServerV6(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


@contextlib.contextmanager
def _serve(root: Path, host: str) -> Iterator[str]:
    handler = functools.partial(_QuietHandler, directory=str(root))
    server_class = _ServerV6 if ":" in host else http.server.ThreadingHTTPServer
    server = server_class((host, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        netloc = f"[{host}]" if ":" in host else host
        yield f"http://{netloc}:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(params=["127.0.0.1"])
def served(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Path, str]]:
    """A directory served over HTTP on loopback, and its base URL."""
    root = tmp_path / "www"
    root.mkdir()
    REQUESTS.clear()
    with _serve(root, request.param) as base:
        yield root, base


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "target") as path:
        yield path


def make_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def publish(www: Path, name: str, tree: Path, compressor: list[str] | None) -> None:
    """NAME in WWW: a GNU tar of TREE piped through COMPRESSOR, listed in SHA256SUMS."""
    tar = subprocess.run(["tar", "--format=pax", "--numeric-owner", "-C", str(tree), "-c", "."],
                         check=True, capture_output=True).stdout
    data = subprocess.run(compressor, input=tar, check=True,
                          capture_output=True).stdout if compressor else tar
    (www / name).write_bytes(data)
    with open(www / "SHA256SUMS", "a") as f:
        f.write(f"{hashlib.sha256(data).hexdigest()}  {name}\n")


FORMATS = [
    # (file, compressor, decompressed by (tools on PATH), decompressed by (stdlib only))
    ("root.tar", None, "uncompressed", "uncompressed"),
    ("root.tar.gz", ["gzip", "-c"], "gzip by pigz", "gzip by python"),
    ("root.tar.pigz", ["pigz", "-c"], "gzip by pigz", "gzip by python"),
    ("root.tar.xz", ["xz", "-c", "-T2"], "xz by pixz", "xz by python"),
    ("root.tar.pixz", ["pixz"], "xz by pixz", "xz by python"),
    ("root.tar.zst", ["zstd", "-c", "-q"], "zstd", None),  # no stdlib decoder: see below
    ("root.tar.bz2", ["bzip2", "-c"], "bzip2", "bzip2 by python"),
]
CASES = [(name, compressor, tools, how)
         for name, compressor, with_tools, stdlib in FORMATS
         for tools, how in (("tools", with_tools), ("stdlib", stdlib)) if how]


def fetch(url: str, target: Path, *, facts: NetFacts | None = None,
          verify: Verify = Verify.CHECKSUM, retries: int = 0, events: EventLog = NO_EVENTS,
          image_mounts: str | None = None) -> None:
    """The engine on URL (what follows root=), by default without retries; short back-off."""
    policy = FetchPolicy(verify=verify, retries=retries, timeout=5.0, backoff=0.01)
    fetch_root(resolve_layers(parse_root(url), facts or NetFacts()), str(target), policy,
               events=events, image_mounts=image_mounts)


@pytest.mark.parametrize(("name", "compressor", "tools", "how"), CASES,
                         ids=[f"{c[2]}-{c[0]}" for c in CASES])
def test_fetch_decompresses_by_magic_bytes(served: tuple[Path, str], target: Path,
                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture, name: str,
                                           compressor: list[str] | None, tools: str,
                                           how: str) -> None:
    www, base = served
    files = {"etc/motd": b"hello\n", "usr/lib/big.bin": os.urandom(3 << 20)}
    publish(www, name, make_tree(tmp_path / "tree", files), compressor)
    if tools == "stdlib":
        monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    with caplog.at_level(logging.INFO, logger="tmpfsboot"):
        fetch(base + name, target)
    for rel, data in files.items():
        assert (target / rel).read_bytes() == data
    assert f" in ({how})," in caplog.text


def test_zstd_image_without_zstd_binary_is_a_clear_error(
        served: tuple[Path, str], target: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    www, base = served
    publish(www, "root.tar.zst", make_tree(tmp_path / "tree", {"a": b"a"}), ["zstd", "-q"])
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    with pytest.raises(CommandError, match=r"zstd: not found.*zstd"):
        fetch(base + "root.tar.zst", target)
    assert os.listdir(target) == []


def test_layers_extract_in_order_with_hostname_substitution(
        served: tuple[Path, str], target: Path, tmp_path: Path) -> None:
    www, base = served
    publish(www, "base.tar.zst", make_tree(tmp_path / "base", {
        "etc/hostname": b"generic\n", "etc/motd": b"base\n"}), ["zstd", "-q"])
    publish(www, "node7.tar.gz", make_tree(tmp_path / "node7", {
        "etc/hostname": b"node7\n"}), ["gzip"])
    log_path = tmp_path / "events.jsonl"
    events = EventLog(str(log_path))
    fetch(f"{base}base.tar.zst,{base}%hostname.tar.gz", target,
          facts=NetFacts(hostname="node7"), events=events)
    events.close()
    assert (target / "etc/hostname").read_bytes() == b"node7\n"
    assert (target / "etc/motd").read_bytes() == b"base\n"
    # one SHA256SUMS serves both layers of the directory
    assert sorted(REQUESTS) == ["/SHA256SUMS", "/base.manifest.json", "/base.tar.zst",
                                "/node7.manifest.json", "/node7.tar.gz"]
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    layers = [r for r in records if r["event"] == "phase" and "layer" in r]
    assert [r["layer"] for r in layers] == [1, 2]
    assert all(r["ok"] and r["verified"] and r["bytes"] > 0 for r in layers)
    assert layers[1]["url"] == f"{base}node7.tar.gz"
    assert records[-1]["event"] == "root" and records[-1]["ok"]


def test_fetch_verb_exits_0_and_prints_progress_phases(
        served: tuple[Path, str], target: Path, tmp_path: Path) -> None:
    www, base = served
    publish(www, "root.tar.zst", make_tree(tmp_path / "tree", {"etc/motd": b"hi\n"}),
            ["zstd", "-q"])
    proc = subprocess.run([sys.executable, "-m", "tmpfsboot", "fetch", "--backoff", "0.01",
                           base + "root.tar.zst", str(target)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "layer 1/1" in proc.stderr and "SHA-256 verified" in proc.stderr
    assert (target / "etc/motd").read_bytes() == b"hi\n"


def test_boot_package_imports_with_standard_library_only(tmp_path: Path) -> None:
    """tmpfsboot.boot must work in the initramfs: python3.11 -I -S, nothing else around."""
    package = Path(__file__).resolve().parent.parent / "tmpfsboot"
    shutil.copy(package / "__init__.py", tmp_path / "__init__.py")
    (tmp_path / "pkg" / "tmpfsboot").mkdir(parents=True)
    shutil.copy(package / "__init__.py", tmp_path / "pkg" / "tmpfsboot" / "__init__.py")
    shutil.copytree(package / "boot", tmp_path / "pkg" / "tmpfsboot" / "boot",
                    ignore=shutil.ignore_patterns("__pycache__"))
    modules = sorted(p.stem for p in (package / "boot").glob("*.py") if p.stem != "__init__")
    code = ("import sys, importlib; sys.path[:0] = [sys.argv[1]]\n"
            "for m in sys.argv[2:]: importlib.import_module('tmpfsboot.boot.' + m)\n"
            "bad = [n for n in sys.modules if n.split('.')[0] not in sys.stdlib_module_names"
            " and n.split('.')[0] not in ('tmpfsboot', '__main__')]\n"
            "print(bad)")
    proc = subprocess.run(["/usr/bin/python3.11", "-I", "-S", "-c", code,
                           str(tmp_path / "pkg"), *modules],
                          capture_output=True, text=True, check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_fetch_refuses_the_host_root_as_target() -> None:
    with pytest.raises(UsageError, match="onto / itself"):
        fetch("http://127.0.0.1:9/root.tar", Path("/"))


@pytest.mark.parametrize("served", ["::1"], indirect=True)
def test_fetch_from_an_ipv6_literal_url(served: tuple[Path, str], target: Path,
                                        tmp_path: Path) -> None:
    www, base = served
    assert base.startswith("http://[::1]:")
    publish(www, "root.tar.zst", make_tree(tmp_path / "tree", {"etc/motd": b"v6\n"}),
            ["zstd", "-q"])
    fetch(base + "root.tar.zst", target)
    assert (target / "etc/motd").read_bytes() == b"v6\n"


def test_fetch_follows_redirects_and_refuses_non_http_ones(served: tuple[Path, str],
                                                           target: Path, tmp_path: Path) -> None:
    www, base = served
    publish(www, "root.tar.zst", make_tree(tmp_path / "tree", {"etc/motd": b"moved\n"}),
            ["zstd", "-q"])
    fetch(base + "moved/root.tar.zst", target, verify=Verify.NO)
    assert (target / "etc/motd").read_bytes() == b"moved\n"
    assert "/moved/root.tar.zst" in REQUESTS and "/root.tar.zst" in REQUESTS
    with pytest.raises(PermanentHTTPError, match="redirected to a non-HTTP URL ftp://"):
        fetch(base + "to-ftp/root.tar.zst", target, verify=Verify.NO)
