"""Throw-away gpg signing keys (image signatures, SHA256SUMS.gpg)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GpgKey:
    """A throw-away signing key: its home, fingerprint and an exported keyring."""

    homedir: Path
    fingerprint: str
    keyring: Path

    def sign(self, data: bytes) -> bytes:
        """A detached binary signature of DATA."""
        return subprocess.run(
            ["gpg", "--homedir", str(self.homedir), "--batch", "--yes", "--detach-sign",
             "--output", "-"], input=data, capture_output=True, check=True).stdout


@contextlib.contextmanager
def throwaway_gpg_key() -> Iterator[GpgKey]:
    """A fresh ed25519 signing key in a private GNUPGHOME (short path: gpg-agent's
    socket name must fit in sun_path), removed with its agent afterwards."""
    home = Path(tempfile.mkdtemp(prefix="tbgpg", dir="/tmp"))
    os.chmod(home, 0o700)
    env = {**os.environ, "GNUPGHOME": str(home)}
    try:
        subprocess.run(["gpg", "--batch", "--homedir", str(home), "--passphrase", "",
                        "--quick-gen-key", "tmpfsboot test <test@example.invalid>",
                        "ed25519", "sign", "never"], check=True, capture_output=True, env=env)
        out = subprocess.run(["gpg", "--batch", "--homedir", str(home), "--with-colons",
                              "--list-secret-keys"], check=True, capture_output=True,
                             env=env).stdout.decode()
        fpr = next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:"))
        keyring = home / "pubring-export.gpg"
        exported = subprocess.run(["gpg", "--batch", "--homedir", str(home), "--export",
                                   fpr], check=True, capture_output=True, env=env).stdout
        keyring.write_bytes(exported)
        yield GpgKey(home, fpr, keyring)
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"],
                       check=False, capture_output=True)
        shutil.rmtree(home, ignore_errors=True)
