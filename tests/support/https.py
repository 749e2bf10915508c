"""Test helpers for HTTPS: a throw-away CA, and the fault server speaking HTTPS on
127.0.0.1 with a certificate it signed."""

from __future__ import annotations

import contextlib
import hashlib
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

from support.faultserver import serve


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


@contextlib.contextmanager
def https_server(www: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(base URL, CA file) of an HTTPS server on 127.0.0.1 serving WWW (the fault server,
    Range ignored as python's http.server does), with a SHA256SUMS written for every
    file in it."""
    sums = "".join(f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.name}\n"
                   for f in sorted(www.iterdir()) if f.name != "SHA256SUMS")
    (www / "SHA256SUMS").write_text(sums)
    ca, cert, key = make_ca_and_cert(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    with serve(root=www, tls=context, ignore_range=True) as server:
        yield server.url, ca
