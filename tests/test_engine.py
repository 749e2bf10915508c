"""The engine end to end over a real loopback HTTP server: formats, layers, the event log."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.archives import publish_dir, write_tree
from support.faults import fetch_url
from support.faultserver import FaultServer, serve
from support.mounts import mounted_tmpfs

from tmpfsboot.boot.cmdline import NetFacts
from tmpfsboot.boot.errors import CommandError, PermanentHTTPError, UsageError
from tmpfsboot.boot.log import EventLog
from tmpfsboot.boot.policy import Verify

pytestmark = pytest.mark.integration


Served = tuple[Path, str, FaultServer]  # the directory, its base URL, the server


@pytest.fixture(params=["127.0.0.1"])
def served(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Served]:
    """A directory served over HTTP on loopback (Range ignored, as python's http.server
    does), its base URL and the server; /moved/X redirects to /X, /to-ftp/X to ftp://."""
    root = tmp_path / "www"
    root.mkdir()
    with serve(root=root, host=request.param, ignore_range=True) as server:
        server.redirect("/moved/", "/")
        server.redirect("/to-ftp/", "ftp://127.0.0.1/", status=301)
        yield root, server.url, server


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "target") as path:
        yield path


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


@pytest.mark.parametrize(("name", "compressor", "tools", "how"), CASES,
                         ids=[f"{c[2]}-{c[0]}" for c in CASES])
def test_fetch_decompresses_by_magic_bytes(served: Served, target: Path,
                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture, name: str,
                                           compressor: list[str] | None, tools: str,
                                           how: str) -> None:
    www, base, _ = served
    files = {"etc/motd": b"hello\n", "usr/lib/big.bin": os.urandom(3 << 20)}
    publish_dir(www, name, write_tree(tmp_path / "tree", files), compressor)
    if tools == "stdlib":
        monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    with caplog.at_level(logging.INFO, logger="tmpfsboot"):
        fetch_url(base + name, target)
    for rel, data in files.items():
        assert (target / rel).read_bytes() == data
    assert f" in ({how})," in caplog.text


def test_zstd_image_without_zstd_binary_is_a_clear_error(
        served: Served, target: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    www, base, _ = served
    publish_dir(www, "root.tar.zst", write_tree(tmp_path / "tree", {"a": b"a"}), ["zstd", "-q"])
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    with pytest.raises(CommandError, match=r"zstd: not found.*zstd"):
        fetch_url(base + "root.tar.zst", target)
    assert os.listdir(target) == []


def test_layers_extract_in_order_with_hostname_substitution(
        served: Served, target: Path, tmp_path: Path) -> None:
    www, base, server = served
    publish_dir(www, "base.tar.zst", write_tree(tmp_path / "base", {
        "etc/hostname": b"generic\n", "etc/motd": b"base\n"}), ["zstd", "-q"])
    publish_dir(www, "node7.tar.gz", write_tree(tmp_path / "node7", {
        "etc/hostname": b"node7\n"}), ["gzip"])
    log_path = tmp_path / "events.jsonl"
    events = EventLog(str(log_path))
    fetch_url(f"{base}base.tar.zst,{base}%hostname.tar.gz", target,
              facts=NetFacts(hostname="node7"), events=events)
    events.close()
    assert (target / "etc/hostname").read_bytes() == b"node7\n"
    assert (target / "etc/motd").read_bytes() == b"base\n"
    # one SHA256SUMS serves both layers of the directory
    assert sorted(server.paths) == ["/SHA256SUMS", "/base.manifest.json", "/base.tar.zst",
                                "/node7.manifest.json", "/node7.tar.gz"]
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    layers = [r for r in records if r["event"] == "phase" and "layer" in r]
    assert [r["layer"] for r in layers] == [1, 2]
    assert all(r["ok"] and r["verified"] and r["bytes"] > 0 for r in layers)
    assert layers[1]["url"] == f"{base}node7.tar.gz"
    assert records[-1]["event"] == "root" and records[-1]["ok"]


def test_fetch_verb_exits_0_and_prints_progress_phases(
        served: Served, target: Path, tmp_path: Path) -> None:
    www, base, _ = served
    publish_dir(www, "root.tar.zst", write_tree(tmp_path / "tree", {"etc/motd": b"hi\n"}),
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
        fetch_url("http://127.0.0.1:9/root.tar", Path("/"))


@pytest.mark.parametrize("served", ["::1"], indirect=True)
def test_fetch_from_an_ipv6_literal_url(served: Served, target: Path,
                                        tmp_path: Path) -> None:
    www, base, _ = served
    assert base.startswith("http://[::1]:")
    publish_dir(www, "root.tar.zst", write_tree(tmp_path / "tree", {"etc/motd": b"v6\n"}),
                ["zstd", "-q"])
    fetch_url(base + "root.tar.zst", target)
    assert (target / "etc/motd").read_bytes() == b"v6\n"


def test_fetch_follows_redirects_and_refuses_non_http_ones(served: Served,
                                                           target: Path, tmp_path: Path) -> None:
    www, base, server = served
    publish_dir(www, "root.tar.zst", write_tree(tmp_path / "tree", {"etc/motd": b"moved\n"}),
                ["zstd", "-q"])
    fetch_url(base + "moved/root.tar.zst", target, verify=Verify.NO)
    assert (target / "etc/motd").read_bytes() == b"moved\n"
    assert "/moved/root.tar.zst" in server.paths and "/root.tar.zst" in server.paths
    with pytest.raises(PermanentHTTPError, match="redirected to a non-HTTP URL ftp://"):
        fetch_url(base + "to-ftp/root.tar.zst", target, verify=Verify.NO)
