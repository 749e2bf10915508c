"""SHA256SUMS files (coreutils format, as systemd-importd reads them) and gpgv signatures."""

from __future__ import annotations

import os
import re
import tempfile

from .errors import CommandError, VerificationError
from .run import run

_LINE = re.compile(r"(?P<hash>[0-9a-fA-F]{64}) [ *](?P<name>.+)")
_BSD_LINE = re.compile(r"SHA256 \((?P<name>.+)\) = (?P<hash>[0-9a-fA-F]{64})")


def parse_sha256sums(text: str) -> dict[str, str]:
    """File name -> lower-case hex SHA-256, from `HASH  NAME`, `HASH *NAME` or BSD lines."""
    sums: dict[str, str] = {}
    for line in text.splitlines():
        line = line.rstrip("\r")
        m = _LINE.fullmatch(line) or _BSD_LINE.fullmatch(line)
        if m:
            name = m.group("name")
            sums[name[2:] if name.startswith("./") else name] = m.group("hash").lower()
    return sums


def expected_hash(sums_text: str, filename: str, *, sums_url: str) -> str:
    """The hash SUMS_TEXT lists for FILENAME; VerificationError if it lists none."""
    sums = parse_sha256sums(sums_text)
    if filename not in sums:
        raise VerificationError(f"{sums_url} lists no hash for {filename}")
    return sums[filename]


def check_signature(data: bytes, signature: bytes, *, keyring: str, what: str) -> None:
    """Check a detached gpg SIGNATURE of DATA against KEYRING with gpgv."""
    with tempfile.TemporaryDirectory(prefix="tmpfsboot-gpgv.") as tmp:
        data_path = os.path.join(tmp, "SHA256SUMS")
        sig_path = data_path + ".gpg"
        with open(data_path, "wb") as f:
            f.write(data)
        with open(sig_path, "wb") as f:
            f.write(signature)
        try:
            run(["gpgv", "--homedir", tmp, "--keyring", os.path.abspath(keyring),
                 sig_path, data_path], capture=True)
        except CommandError as e:
            raise VerificationError(f"{what}: bad signature ({e})") from e
