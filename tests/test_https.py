"""HTTPS: a loopback server with a certificate from a private CA, trusted or not."""

from __future__ import annotations

import functools
import hashlib
import http.server
import ssl
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def make_ca_and_cert(d: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA, and a certificate it signed for 127.0.0.1: (ca, cert, key)."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"), "-days", "2",
            "-subj", "/CN=tmpfsboot test CA")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(d / "srv.key"), "-out", str(d / "srv.csr"), "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", str(d / "srv.csr"), "-CA", str(d / "ca.pem"),
            "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-out", str(d / "srv.pem"),
            "-days", "2", "-extfile", str(d / "ext.cnf"))
    return d / "ca.pem", d / "srv.pem", d / "srv.key"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def https(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(base URL, CA file) of an HTTPS server on 127.0.0.1 serving one signed-off image."""
    www = tmp_path / "www"
    www.mkdir()
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/motd").write_text("over https\n")
    with tarfile.open(www / "root.tar.gz", "w:gz") as tar:
        tar.add(tree, arcname=".")
    digest = hashlib.sha256((www / "root.tar.gz").read_bytes()).hexdigest()
    (www / "SHA256SUMS").write_text(f"{digest}  root.tar.gz\n")
    ca, cert, key = make_ca_and_cert(tmp_path)
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(www)))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/", ca
    finally:
        server.shutdown()
        server.server_close()


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
