"""HTTPS: a loopback server with a certificate from a private CA, trusted or not."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.https import https_server, make_ca_and_cert

pytestmark = pytest.mark.integration


@pytest.fixture
def https(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(base URL, CA file) of an HTTPS server on 127.0.0.1 serving one image."""
    www = tmp_path / "www"
    www.mkdir()
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/motd").write_text("over https\n")
    with tarfile.open(www / "root.tar.gz", "w:gz") as tar:
        tar.add(tree, arcname=".")
    with https_server(www, tmp_path) as served:
        yield served


def fetch(url: str, target: Path, ca: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tmpfsboot", "fetch", "--retries", "0", "--backoff", "0.01",
         url, str(target)],
        env={"PATH": "/usr/bin:/bin", "SSL_CERT_FILE": str(ca)},
        capture_output=True, text=True, check=False)


def test_fetch_over_https_with_a_trusted_ca(https: tuple[str, Path], tmp_path: Path) -> None:
    base, ca = https
    target = tmp_path / "root"
    target.mkdir()
    proc = fetch(base + "root.tar.gz", target, ca)
    assert proc.returncode == 0, proc.stderr
    assert (target / "etc/motd").read_text() == "over https\n"


def test_fetch_over_https_refuses_an_untrusted_certificate(https: tuple[str, Path],
                                                           tmp_path: Path) -> None:
    base, _ = https
    target = tmp_path / "root"
    target.mkdir()
    other = tmp_path / "other"
    other.mkdir()
    other_ca, _, _ = make_ca_and_cert(other)
    proc = fetch(base + "root.tar.gz", target, other_ca)
    assert proc.returncode == 1
    assert "CERTIFICATE_VERIFY_FAILED" in proc.stderr and base in proc.stderr
    assert list(target.iterdir()) == []
