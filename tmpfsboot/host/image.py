"""`tmpfsboot image build|layer`: root images as the boot engine expects them.

An image is a compressed pax tarball made by GNU tar (numeric owners, every mode bit, hard
links, device nodes, FIFOs, xattrs and POSIX ACLs, members in name order), published in a
directory beside one SHA256SUMS covering every image there, an optional detached gpg
signature of it (SHA256SUMS.gpg), and NAME.manifest.json with the figures the engine's
RAM preflight needs.

Every file is written under a temporary name in the output directory and renamed into
place when complete, so a failed or interrupted build never leaves a half image (or a
SHA256SUMS naming one) under a final name.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ..boot.compression import Compression
from ..boot.contract import (
    MANIFEST_SUFFIX,
    NAME_RE,
    SIGNATURE_NAME,
    SUMS_NAME,
    Manifest,
    parse_sums,
    render_sums,
)
from ..boot.errors import TmpfsbootError, UsageError
from ..boot.log import Progress, format_bytes, phase
from ..boot.run import require_program, run, spawn, wait_stage
from .fsimage import FsFormat, parse_format, write_fs_image
from .scrub import scrubbed_tree

log = logging.getLogger("tmpfsboot")

# tmpfs allocates whole pages; the manifest's unpacked size counts in these.
PAGE = 4096
# tmpfs keeps a symlink target this long or shorter inside the inode, longer ones in a page.
INLINE_SYMLINK_MAX = 60
# Bytes of tar stream moved per read between tar and the compressor.
CHUNK = 1 << 20

# GNU tar options that make the tarball the engine expects. Pax keeps high-resolution
# mtimes, long names, xattrs (SCHILY.xattr.*) and ACLs; the exthdr.name and delete
# options drop the pid, atime and ctime pax records, so the same tree gives the same bytes.
# ACLs go in twice, on purpose: --acls writes SCHILY.acl.* text for other tools, but with
# user names looked up on the build host (even with --numeric-owner); --xattrs-include=*
# also keeps the raw system.posix_acl_* values with numeric ids, which the engine prefers.
TAR_OPTIONS = (
    "--format=pax",
    "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
    "--numeric-owner",
    "--xattrs",
    "--xattrs-include=*",
    "--acls",
    "--sort=name",
    "--one-file-system",
    # `-C DIR .` names members ./etc/...; strip the ./ but keep ./ for the root itself
    # (its mode and owner matter). S: never rewrite symlink targets.
    "--transform=s,^\\./\\(.\\),\\1,S",
)


@dataclass(frozen=True)
class Compressor:
    """How `image build` writes one compression: the parallel tool and its levels.

    The compression itself is the engine's vocabulary (tmpfsboot.boot.compression), which
    reads it back by magic bytes.
    """

    compression: Compression
    suffix: str
    argv_template: tuple[str, ...]  # "{level}" stands for the level
    default_level: int
    levels: range

    @property
    def program(self) -> str:
        """The compressor program."""
        return self.argv_template[0]

    def compress_argv(self, level: int | None = None) -> list[str]:
        """The compressor's argv: reads a tar stream on stdin, writes to stdout."""
        lvl = self.default_level if level is None else level
        if lvl not in self.levels:
            raise UsageError(f"--level {lvl}: {self.compression.value} takes "
                             f"{self.levels.start}-{self.levels.stop - 1}")
        return [a.replace("{level}", str(lvl)) for a in self.argv_template]


# zstd 9 by default: measured on 400 MB of /usr on this 2-core machine, 4.6 s against
# 128 s for -19 (which makes it 12 % smaller) and 1.1 s for -3 (11 % larger);
# decompression is as fast. No --long, so the decompressor at boot needs a few MiB of RAM
# rather than 130. xz is made by pixz (parallel, indexed), gzip by pigz (parallel), at
# their own default levels.
COMPRESSORS = {
    c.compression.value: c
    for c in (
        Compressor(Compression.ZSTD, ".tar.zst", ("zstd", "-q", "-T0", "-{level}", "-c"), 9,
                   range(1, 20)),
        Compressor(Compression.XZ, ".tar.xz", ("pixz", "-{level}"), 6, range(0, 10)),
        Compressor(Compression.GZIP, ".tar.gz", ("pigz", "-c", "-{level}"), 6, range(1, 10)),
    )
}


def parse_compression(text: str) -> Compressor:
    """The compressor for zstd, xz or gzip; UsageError naming the value otherwise."""
    try:
        return COMPRESSORS[text]
    except KeyError:
        raise UsageError(f"compression {text!r}: choose one of "
                         f"{', '.join(COMPRESSORS)}") from None


def check_format(fmt: str, compression: str | None) -> None:
    """UsageError naming FMT or COMPRESSION unless build_image can make that image."""
    if fmt == "tar":
        parse_compression(compression or "zstd")
    else:
        parse_format(fmt, compression)


@dataclass(frozen=True)
class TreeFigures:
    """What a source tree will need once unpacked in a tmpfs."""

    unpacked_size: int
    entries: int
    content_bytes: int


def check_name(name: str) -> str:
    """NAME if it is usable as an image name; UsageError naming it otherwise."""
    if not NAME_RE.fullmatch(name) or name.endswith(".manifest"):
        raise UsageError(f"image name {name!r}: use letters, digits and . _ + -, "
                         "starting with a letter or digit")
    return name


def check_source(src: Path, outdir: Path) -> Path:
    """SRC resolved, if it is a directory and OUTDIR is not inside it; UsageError otherwise."""
    if not src.is_dir():
        raise UsageError(f"{src}: not a directory")
    src = src.resolve()
    if outdir.resolve() == src or outdir.resolve().is_relative_to(src):
        raise UsageError(f"{outdir}: the output directory is inside the source tree {src}")
    return src


def prepare_output(outdir: Path) -> None:
    """Create OUTDIR (and its parents) unless it exists, as mkosi does; UsageError if it
    is something else than a directory."""
    if outdir.exists() and not outdir.is_dir():
        raise UsageError(f"{outdir}: not a directory")
    outdir.mkdir(parents=True, exist_ok=True)


def round_up_to_pages(n: int) -> int:
    """N rounded up to whole tmpfs pages."""
    return -(-n // PAGE) * PAGE


def measure_tree(src: Path, *, include_root: bool = True) -> TreeFigures:
    """Size a tmpfs needs for SRC and how many tar members it makes.

    Counts what GNU tar archives: every entry of SRC's file system but sockets (tar skips
    them), the root itself with INCLUDE_ROOT. Regular files are counted once per inode,
    as hard links share their pages.
    """
    root_dev = os.lstat(src).st_dev
    seen: set[int] = set()
    size = entries = content = 0

    def account(st: os.stat_result, path: str) -> None:
        nonlocal size, entries, content
        mode = st.st_mode
        if stat.S_ISSOCK(mode):
            return
        entries += 1
        if stat.S_ISDIR(mode):
            size += PAGE
        elif stat.S_ISREG(mode):
            if st.st_nlink > 1:
                if st.st_ino in seen:
                    return
                seen.add(st.st_ino)
            size += round_up_to_pages(st.st_size)
            content += st.st_size
        elif stat.S_ISLNK(mode) and len(os.readlink(path)) > INLINE_SYMLINK_MAX:
            size += PAGE

    def walk(path: str) -> None:
        with os.scandir(path) as it:
            children = list(it)
        for entry in children:
            st = entry.stat(follow_symlinks=False)
            account(st, entry.path)
            # --one-file-system: tar archives a mount point but not what is under it.
            if stat.S_ISDIR(st.st_mode) and st.st_dev == root_dev:
                walk(entry.path)

    if include_root:
        account(os.lstat(src), str(src))
    walk(str(src))
    return TreeFigures(unpacked_size=size, entries=entries, content_bytes=content)


@contextlib.contextmanager
def lock_directory(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on directory PATH: builds into one directory take turns
    updating its SHA256SUMS, so none loses another's line."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    """Write DATA to PATH through a temporary file in the same directory and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def gpg_argv(gpg_homedir: Path | None) -> list[str]:
    """gpg in batch mode (no questions: a key with a passphrase needs it cached in
    gpg-agent), with GPG_HOMEDIR if given."""
    argv = ["gpg", "--batch", "--yes", "--no-tty"]
    if gpg_homedir is not None:
        argv += ["--homedir", str(gpg_homedir)]
    return argv


def check_signing_key(key: str, gpg_homedir: Path | None) -> None:
    """UsageError unless gpg has a secret key KEY: checked before a build, so a typo
    costs nothing and never leaves SHA256SUMS updated but unsigned."""
    require_program("gpg")
    found = run([*gpg_argv(gpg_homedir), "--list-secret-keys", "--with-colons", key],
                check=False, capture=True)
    if found.returncode != 0 or b"\nsec:" not in b"\n" + found.stdout:
        where = f" in {gpg_homedir}" if gpg_homedir else ""
        raise UsageError(f"--sign {key}: no such secret key{where}")


def sign_file(path: Path, signature: Path, *, key: str, gpg_homedir: Path | None) -> None:
    """Write SIGNATURE, a detached binary gpg signature of PATH made with KEY."""
    argv = gpg_argv(gpg_homedir)
    tmp = signature.with_name(f".{signature.name}.tmp")
    argv += ["--local-user", key, "--detach-sign", "--output", str(tmp), str(path)]
    try:
        run(argv, capture=True)
        os.chmod(tmp, 0o644)
        os.replace(tmp, signature)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def update_sums(outdir: Path, file: str, digest: str, *, sign: str | None,
                gpg_homedir: Path | None) -> None:
    """Set FILE's line in OUTDIR/SHA256SUMS to DIGEST, keeping every other line, and sign
    the result with SIGN if given. The caller holds the directory lock."""
    sums_path = outdir / SUMS_NAME
    try:
        sums = parse_sums(sums_path.read_text(encoding="utf-8"), strict=True)
    except FileNotFoundError:
        sums = {}
    sums[file] = digest
    write_atomically(sums_path, render_sums(sums).encode())
    signature = outdir / SIGNATURE_NAME
    if sign is not None:
        try:
            sign_file(sums_path, signature, key=sign, gpg_homedir=gpg_homedir)
        except BaseException:
            # The old signature no longer matches: better none than a wrong one.
            with contextlib.suppress(FileNotFoundError):
                signature.unlink()
            raise
    elif signature.exists():
        # A signature of the old SHA256SUMS would only fail later, at boot.
        signature.unlink()
        log.warning("Removed %s: it signed the previous %s (use --sign to re-sign)",
                    signature, SUMS_NAME)


def copy_stream(src: IO[bytes], dst: IO[bytes], progress: Progress) -> None:
    """Copy SRC to DST (tar to compressor), counting progress; closes DST at the end."""
    try:
        while chunk := src.read(CHUNK):
            dst.write(chunk)
            progress.update(len(chunk))
    except BrokenPipeError:
        pass  # the compressor died: wait_stage reports it
    finally:
        with contextlib.suppress(BrokenPipeError):
            dst.close()


def list_tar_operands(src: Path, *, include_root: bool) -> list[str]:
    """What tar archives from `-C SRC`: `.` (the root and all below it), or each top-level
    entry in the byte order --sort=name uses below them. The ./ prefix keeps a name
    starting with - from reading as an option; the transform strips it."""
    if include_root:
        return ["."]
    names = sorted(os.listdir(src), key=os.fsencode)
    return [f"./{n}" for n in names]


def write_tarball(src: Path, out: IO[bytes], compression: Compressor, *,
                  level: int | None, figures: TreeFigures, label: str,
                  include_root: bool = True) -> str:
    """Stream SRC as a compressed tarball into OUT; returns its sha256 hex digest.

    tar -> (Python, counting progress) -> compressor -> (Python, hashing) -> OUT. Every
    stage is waited for; a failure in any fails the build naming the stage.
    """
    compress_argv = compression.compress_argv(level)
    require_program("tar")
    require_program(compression.program)
    # tar's stream is a little larger than the content: headers and padding.
    estimate = figures.content_bytes + 1536 * figures.entries
    progress = Progress(label, estimate)
    digest = hashlib.sha256()
    # tar's stderr goes to ours: its warnings are for the operator, and a pipe nobody
    # reads until the end could fill up and stall the build.
    operands = list_tar_operands(src, include_root=include_root)
    # An empty layer is still a valid (empty) archive, which tar makes from no list.
    selection = ["--", *operands] if operands else ["--files-from=/dev/null"]
    tar = spawn(["tar", "-c", "-f", "-", *TAR_OPTIONS, "-C", str(src), *selection],
                stdout=subprocess.PIPE)
    comp = spawn(compress_argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE)
    assert tar.stdout is not None and comp.stdin is not None and comp.stdout is not None
    feeder = threading.Thread(target=copy_stream, args=(tar.stdout, comp.stdin, progress),
                              name="tar-feeder", daemon=True)
    feeder.start()
    ok = False
    try:
        while chunk := comp.stdout.read(CHUNK):
            digest.update(chunk)
            out.write(chunk)
        ok = True
    finally:
        if not ok:
            # Nobody reads the compressor any more: stop both, or the feeder never ends.
            comp.kill()
            tar.kill()
        feeder.join()
        tar.stdout.close()
        comp.stdout.close()
        if ok:
            try:
                wait_stage(tar, "tar")
            finally:
                wait_stage(comp, compression.program)
        else:
            tar.wait()
            comp.wait()
    return digest.hexdigest()


def build_image(src: Path, outdir: Path, name: str, *, compression: str | None = None,
                sign: str | None = None, gpg_homedir: Path | None = None,
                level: int | None = None, include_root: bool = True,
                fmt: str = "tar", identity: dict[str, object] | None = None) -> Path:
    """Build OUTDIR/NAME.tar.<zst|xz|gz> from the tree SRC; returns the image's path.
    With FMT squashfs or erofs: OUTDIR/NAME.squashfs or NAME.erofs (see fsimage).

    With INCLUDE_ROOT (a root image) the archive's first member is `./`, SRC itself, whose
    mode and owner become the node's /. A layer (INCLUDE_ROOT false) leaves / as the
    layers below made it: it is often built from a scratch directory with mode 0700.

    Also writes OUTDIR/NAME.manifest.json, sets the image's line in OUTDIR/SHA256SUMS
    (other images' lines are kept) and, with SIGN (a gpg key id), re-signs SHA256SUMS as
    OUTDIR/SHA256SUMS.gpg. Nothing appears under a final name before it is complete.
    IDENTITY, what was scrubbed of the build machine, goes into the manifest.
    """
    check_name(name)
    fs: FsFormat | None = None
    if fmt == "tar":
        compression = compression or "zstd"
        comp = parse_compression(compression)
    else:
        fs, compression = parse_format(fmt, compression)
    src = check_source(src, outdir)
    prepare_output(outdir)
    if sign is not None:
        check_signing_key(sign, gpg_homedir)
    file = name + (comp.suffix if fs is None else fs.suffix)
    image = outdir / file
    with phase(f"Measuring {src}"):
        figures = measure_tree(src, include_root=include_root)
    log.info("%s: %d entries, %s unpacked", src, figures.entries,
             format_bytes(figures.unpacked_size))
    fd, tmp_name = tempfile.mkstemp(dir=outdir, prefix=f".{file}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with (phase(f"Writing {image} ({fmt}, {compression})") as figs,
              os.fdopen(fd, "wb") as out):
            try:
                if fs is None:
                    sha256 = write_tarball(src, out, comp, level=level, figures=figures,
                                           label=f"Archiving {src}", include_root=include_root)
                else:
                    sha256 = write_fs_image(src, tmp, fs, compression, level=level)
                out.flush()
                os.fsync(out.fileno())
            except OSError as e:
                raise TmpfsbootError(f"{image}: cannot write: {e.strerror}") from e
            size = tmp.stat().st_size
            figs["bytes"] = size
        os.chmod(tmp, 0o644)
        manifest = Manifest(name=name, file=file, compression=compression,
                            size=size, sha256=sha256, unpacked_size=figures.unpacked_size,
                            entries=figures.entries, format=fmt, identity=identity)
        with lock_directory(outdir):
            os.replace(tmp, image)
            write_atomically(outdir / f"{name}{MANIFEST_SUFFIX}",
                             manifest.render())
            update_sums(outdir, file, sha256, sign=sign, gpg_homedir=gpg_homedir)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    log.info("Built %s: %s, sha256 %s", image, format_bytes(size), sha256)
    return image


def build_tree_image(src: Path, outdir: Path, name: str, *, keep_identity: bool = False,
                     compression: str | None = None, sign: str | None = None,
                     gpg_homedir: Path | None = None, level: int | None = None,
                     include_root: bool = True, fmt: str = "tar") -> Path:
    """build_image of the tree SRC with the build machine's identity left out (unless
    KEEP_IDENTITY): SRC itself is never changed, the image is made from a scrubbed view."""
    if keep_identity:
        return build_image(src, outdir, name, compression=compression, sign=sign,
                           gpg_homedir=gpg_homedir, level=level, include_root=include_root,
                           fmt=fmt)
    check_name(name)
    check_format(fmt, compression)
    check_source(src, outdir)
    with scrubbed_tree(src, in_place=False) as (tree, scrub):
        return build_image(tree, outdir, name, compression=compression, sign=sign,
                           gpg_homedir=gpg_homedir, level=level, include_root=include_root,
                           fmt=fmt, identity=scrub.to_json())
