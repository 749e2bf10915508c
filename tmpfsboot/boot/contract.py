"""What the host side writes and the boot side reads: one definition of each.

The published image format (file names, SHA256SUMS lines, the manifest's schema), where
the initramfs keeps what the hook puts in it, and the defaults both sides fall back to.
`tmpfsboot image`, `tmpfsboot serve` and `tmpfsboot initramfs` import these names; so
does the engine. A second spelling of any of them elsewhere is a bug.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .errors import VerificationError

# -- the published format ------------------------------------------------------------

# Beside the images: one SHA256SUMS (coreutils format, as systemd-importd reads it) and,
# when signed, its detached gpg signature SHA256SUMS.gpg.
SUMS_NAME = "SHA256SUMS"
SIGNATURE_SUFFIX = ".gpg"
SIGNATURE_NAME = SUMS_NAME + SIGNATURE_SUFFIX
# NAME.manifest.json beside NAME.tar.zst: the figures the engine's preflight reads.
MANIFEST_SUFFIX = ".manifest.json"
# The endings of tarball layers, longest first so `.tar.zst` wins over `.tar`, and of
# file-system image layers (squashfs, erofs). The kind is decided by magic bytes; the name
# only spares a tarball the probe for image magic.
TAR_SUFFIXES = (".tar.zst", ".tar.xz", ".tar.gz", ".tar.bz2", ".tar",
                ".tzst", ".txz", ".tgz", ".tbz2")
IMAGE_SUFFIXES = (".squashfs", ".sqfs", ".erofs")

# Image names end up in file names, in SHA256SUMS lines and in kernel command lines.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")

_SUMS_LINE = re.compile(r"(?P<hash>[0-9a-fA-F]{64}) [ *](?P<name>.+)")
_SUMS_BSD_LINE = re.compile(r"SHA256 \((?P<name>.+)\) = (?P<hash>[0-9a-fA-F]{64})")


def image_stem(image: str) -> str:
    """NAME for NAME.tar.zst, NAME.tgz, ...; an unknown ending is kept whole."""
    for suffix in TAR_SUFFIXES + IMAGE_SUFFIXES:
        if image.endswith(suffix):
            return image[: -len(suffix)]
    return image


def manifest_name(image: str) -> str:
    """NAME.manifest.json for the image file NAME.tar.zst (or NAME.squashfs, ...)."""
    return image_stem(image) + MANIFEST_SUFFIX


def parse_sums(text: str, *, strict: bool = False) -> dict[str, str]:
    """SHA256SUMS text -> {file name: lower-case hex SHA-256}.

    Reads `HASH  NAME`, `HASH *NAME` and BSD `SHA256 (NAME) = HASH` lines, with a leading
    `./` dropped, as systemd-importd does. Other lines are skipped, or with STRICT (a file
    this project wrote and is about to rewrite) a VerificationError naming the line.
    """
    sums: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip("\r")
        m = _SUMS_LINE.fullmatch(line) or _SUMS_BSD_LINE.fullmatch(line)
        if m:
            name = m.group("name")
            sums[name[2:] if name.startswith("./") else name] = m.group("hash").lower()
        elif strict and line.strip():
            raise VerificationError(f"{SUMS_NAME} line {lineno}: not `HASH *NAME`: {line!r}")
    return sums


def render_sums(sums: dict[str, str]) -> str:
    """{file name: hex digest} -> SHA256SUMS text, sorted by name, `HASH *NAME` lines."""
    return "".join(f"{digest} *{name}\n" for name, digest in sorted(sums.items()))


@dataclass(frozen=True)
class Manifest:
    """NAME.manifest.json: what `image build` knows of an image and the engine's preflight
    reads (`unpacked_size`: bytes the tree takes in a tmpfs, in whole pages)."""

    name: str
    file: str
    compression: str
    size: int
    sha256: str
    unpacked_size: int
    entries: int
    format: str = "tar"
    # what `image build` removed of the build machine (host.scrub's record); None: kept
    identity: dict[str, object] | None = None

    def to_json(self) -> dict[str, object]:
        """The manifest as a JSON object (key order as in the file)."""
        extra = {} if self.identity is None else {"build_identity_removed": self.identity}
        return {
            "name": self.name,
            "file": self.file,
            "format": self.format,
            "compression": self.compression,
            "size": self.size,
            "sha256": self.sha256,
            "unpacked_size": self.unpacked_size,
            "entries": self.entries,
            **extra,
        }

    def render(self) -> bytes:
        """The manifest file's bytes."""
        return (json.dumps(self.to_json(), indent=2) + "\n").encode()


def parse_unpacked_size(data: bytes) -> int | None:
    """The `unpacked_size` a manifest file declares, or None when it declares none usable.

    The engine needs only this field; a manifest from another tool or an older version
    may lack the rest. ValueError when DATA is not a JSON object at all.
    """
    doc = json.loads(data)
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    value = doc.get("unpacked_size")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
        else None


# -- the initramfs layout --------------------------------------------------------------

# Where the hook puts TMPFS_KEYRING, under the initramfs' /etc.
KEYRING_NAME = "tmpfsboot/keyring.gpg"
# CA bundles, the first that exists wins: Debian's, then Fedora's.
CA_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt")

# -- defaults ----------------------------------------------------------------------------

# The tmpfs size when neither rootsize= nor ROOTSIZE says: as tmpfs' own default.
DEFAULT_ROOTSIZE = "50%"
# A connection that stalls this long counts as broken (tmpfs.timeout=).
DEFAULT_TIMEOUT = 60.0
# The first retry waits 10-40 s, as the seed's random 10-39 s; then it doubles.
DEFAULT_BACKOFF = 10.0
