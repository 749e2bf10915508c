"""SHA256SUMS files (coreutils format, as systemd-importd reads them) and gpgv signatures."""

from __future__ import annotations

import os
import tempfile

from .contract import SIGNATURE_SUFFIX, SUMS_NAME, parse_sums
from .errors import CommandError, VerificationError
from .run import run


def expected_hash(sums_text: str, filename: str, *, sums_url: str) -> str:
    """The hash SUMS_TEXT lists for FILENAME; VerificationError if it lists none."""
    sums = parse_sums(sums_text)
    if filename not in sums:
        raise VerificationError(f"{sums_url} lists no hash for {filename}")
    return sums[filename]


def check_signature(data: bytes, signature: bytes, *, keyring: str, what: str) -> None:
    """Check a detached gpg SIGNATURE of DATA against KEYRING with gpgv."""
    with tempfile.TemporaryDirectory(prefix="tmpfsboot-gpgv.") as tmp:
        data_path = os.path.join(tmp, SUMS_NAME)
        sig_path = data_path + SIGNATURE_SUFFIX
        with open(data_path, "wb") as f:
            f.write(data)
        with open(sig_path, "wb") as f:
            f.write(signature)
        try:
            run(["gpgv", "--homedir", tmp, "--keyring", os.path.abspath(keyring),
                 sig_path, data_path], capture=True)
        except CommandError as e:
            raise VerificationError(f"{what}: bad signature ({e})") from e
