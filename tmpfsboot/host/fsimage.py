"""squashfs and erofs root images: what `image build --format squashfs|erofs` writes.

The boot engine keeps such an image in RAM as it is and mounts it under an overlay
(tmpfsboot.boot.imagelayer), so a root costs its compressed size in RAM, not its
unpacked one. The images are reproducible: the same tree gives the same bytes, so
SHA256SUMS and the manifest only change when the tree does. Owners, modes, device nodes,
hard links and xattrs (capabilities included) are kept, as in the tarballs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..boot.errors import UsageError
from ..boot.imagelayer import LayerKind
from ..boot.run import require_program, run

# erofs has no per-file mtime in its compact inodes and erofs-utils 1.5 writes its build
# time into the superblock: a fixed time (SOURCE_DATE_EPOCH's meaning) makes the same
# tree the same image, at the price of every file carrying that time.
EROFS_EPOCH = 0
# A fixed UUID: a random one would make every build differ.
EROFS_UUID = "00000000-0000-0000-0000-000000000000"
CHUNK = 1 << 20


@dataclass(frozen=True)
class FsFormat:
    """How one image format is written: its program, file suffix and compressors."""

    kind: LayerKind
    suffix: str
    program: str
    compressions: tuple[str, ...]  # the first is the default

    def argv(self, src: Path, out: Path, compression: str, level: int | None) -> list[str]:
        """The command that writes OUT from the tree SRC."""
        if self.kind is LayerKind.SQUASHFS:
            # squashfs keeps each file's mtime; -mkfs-time fixes the superblock's.
            argv = ["mksquashfs", str(src), str(out), "-noappend", "-comp", compression,
                    "-mkfs-time", "0", "-one-file-system", "-no-progress", "-quiet"]
            if level is not None:
                argv += ["-Xcompression-level", str(level)]
            return argv
        z = compression if level is None else f"{compression},{level}"
        return ["mkfs.erofs", "--quiet", f"-z{z}", f"-T{EROFS_EPOCH}",
                f"-U{EROFS_UUID}", str(out), str(src)]


FORMATS = {
    f.kind.value: f
    for f in (
        # zstd: as fast to read as the tarballs' zstd, smaller than lz4 (Debian's 6.1
        # kernel reads squashfs with zstd, xz, gzip, lz4, lzo).
        FsFormat(LayerKind.SQUASHFS, ".squashfs", "mksquashfs", ("zstd", "xz", "gzip", "lz4")),
        # Debian's 6.1 kernel reads erofs with lz4 only (no CONFIG_EROFS_FS_ZIP_LZMA).
        FsFormat(LayerKind.EROFS, ".erofs", "mkfs.erofs", ("lz4hc", "lz4")),
    )
}
FORMAT_CHOICES = ("tar", *FORMATS)


def parse_format(fmt: str, compression: str | None) -> tuple[FsFormat, str]:
    """The image format FMT and its compression (default: the format's first);
    UsageError naming the value otherwise."""
    try:
        image = FORMATS[fmt]
    except KeyError:
        raise UsageError(f"--format {fmt}: choose one of {', '.join(FORMAT_CHOICES)}") from None
    if compression is None:
        return image, image.compressions[0]
    if compression not in image.compressions:
        raise UsageError(f"--compression {compression}: {fmt} images take "
                         f"{', '.join(image.compressions)}")
    return image, compression


def write_fs_image(src: Path, out: Path, image: FsFormat, compression: str, *,
                   level: int | None = None) -> str:
    """Write the tree SRC as an image file OUT (replaced); returns its sha256 hex digest."""
    require_program(image.program)
    out.unlink(missing_ok=True)  # mkfs.erofs would write into it, mksquashfs append
    run(image.argv(src, out, compression, level))
    digest = hashlib.sha256()
    with out.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
