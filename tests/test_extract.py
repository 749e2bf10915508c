"""The extractor: fidelity against GNU tar's archives, layers, whiteouts, merged /usr."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.mounts import mounted_tmpfs
from support.trees import diff_trees, make_full_tree, snapshot_tree

from tmpfsboot.boot.acl import acl_text_to_xattr
from tmpfsboot.boot.errors import ArchiveError
from tmpfsboot.boot.extract import Extractor, normalize_name
from tmpfsboot.boot.tarfields import parse_pax

GNU_TAR = ["tar", "--format=pax", "--numeric-owner", "--xattrs", "--xattrs-include=*",
           "--acls"]


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """Two fresh tmpfs mounts: a source tree and an extraction target."""
    with mounted_tmpfs(tmp_path / "src") as src, mounted_tmpfs(tmp_path / "dst") as dst:
        yield src, dst


def gnu_tar_of(src: Path, out: Path, *members: str) -> Path:
    subprocess.run([*GNU_TAR, "-C", str(src), "-cf", str(out), *(members or (".",))],
                   check=True)
    return out


def extract_file(archive: Path | bytes, target: Path, extractor: Extractor | None = None) -> None:
    ex = extractor or Extractor(str(target))
    if isinstance(archive, bytes):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child feeds the pipe, as a decompressor would
            os.close(r)
            os.write(w, archive)
            os._exit(0)
        os.close(w)
        try:
            ex.extract(r)
        finally:
            os.close(r)
            os.waitpid(pid, 0)
        return
    fd = os.open(archive, os.O_RDONLY)
    try:
        ex.extract(fd)
    finally:
        os.close(fd)


def tar_bytes(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes | None = None, *,
           linkname: str = "", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.linkname = linkname
    info.mtime = 1_700_000_000
    if data is not None:
        info.size = len(data)
    return info, data


@pytest.mark.integration
def test_extract_restores_every_kind_of_member_as_gnu_tar_made_it(
        mounts: tuple[Path, Path], tmp_path: Path) -> None:
    src, dst = mounts
    make_full_tree(src)
    extract_file(gnu_tar_of(src, tmp_path / "full.tar"), dst)
    assert diff_trees(snapshot_tree(src), snapshot_tree(dst)) == []


@pytest.mark.integration
def test_extract_matches_gnu_tar_on_a_real_system_tree(tmp_path: Path) -> None:
    archive = gnu_tar_of(Path("/usr/lib/python3.11"), tmp_path / "py.tar", "json", "email",
                         "encodings", "os.py")
    with mounted_tmpfs(tmp_path / "ours") as ours, mounted_tmpfs(tmp_path / "gnu") as gnu:
        extract_file(archive, ours)
        subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--acls", "-C", str(gnu),
                        "-xf", str(archive)], check=True)
        assert diff_trees(snapshot_tree(gnu), snapshot_tree(ours)) == []


@pytest.mark.integration
def test_later_layer_replaces_files_dirs_and_symlinks_of_earlier_layer(tmp_path: Path) -> None:
    layer1 = tar_bytes(member("etc/", tarfile.DIRTYPE, mode=0o755),
                       member("etc/motd", data=b"layer 1\n"),
                       member("opt/", tarfile.DIRTYPE, mode=0o755),
                       member("opt/old", data=b"old\n"),
                       member("link", tarfile.SYMTYPE, linkname="etc/motd"))
    layer2 = tar_bytes(member("etc/motd", data=b"layer 2\n", mode=0o600),
                       member("opt", data=b"now a file\n"),
                       member("link/", tarfile.DIRTYPE, mode=0o700))
    with mounted_tmpfs(tmp_path / "root") as root:
        ex = Extractor(str(root))
        extract_file(layer1, root, ex)
        extract_file(layer2, root, ex)
        assert (root / "etc/motd").read_bytes() == b"layer 2\n"
        assert (root / "etc/motd").stat().st_mode & 0o777 == 0o600
        assert (root / "opt").read_bytes() == b"now a file\n"
        assert (root / "link").is_dir() and not (root / "link").is_symlink()


@pytest.mark.integration
def test_layer_whiteout_removes_file_of_earlier_layer(tmp_path: Path) -> None:
    layer1 = tar_bytes(member("etc/", tarfile.DIRTYPE, mode=0o755),
                       member("etc/secret", data=b"x"), member("etc/keep", data=b"k"),
                       member("var/", tarfile.DIRTYPE, mode=0o755),
                       member("var/cache/", tarfile.DIRTYPE, mode=0o755),
                       member("var/cache/a", data=b"a"), member("var/cache/b", data=b"b"))
    layer2 = tar_bytes(member("etc/.wh.secret", data=b""),
                       member("var/cache/new", data=b"n"),
                       member("var/cache/.wh..wh..opq", data=b""))
    with mounted_tmpfs(tmp_path / "root") as root:
        ex = Extractor(str(root))
        extract_file(layer1, root, ex)
        extract_file(layer2, root, ex)
        assert not (root / "etc/secret").exists()
        assert not (root / "etc/.wh.secret").exists()
        assert (root / "etc/keep").read_bytes() == b"k"
        # the opaque whiteout empties what earlier layers wrote, not this layer's entries
        assert sorted(os.listdir(root / "var/cache")) == ["new"]


@pytest.mark.integration
def test_whiteout_with_data_skips_its_data_and_the_next_member_survives(tmp_path: Path) -> None:
    layer1 = tar_bytes(member("etc/", tarfile.DIRTYPE, mode=0o755), member("etc/old", data=b"o"))
    layer2 = tar_bytes(member("etc/.wh.old", data=b"junk" * 300),
                       member("etc/after", data=b"after"))
    with mounted_tmpfs(tmp_path / "root") as root:
        ex = Extractor(str(root))
        extract_file(layer1, root, ex)
        extract_file(layer2, root, ex)
        assert sorted(os.listdir(root / "etc")) == ["after"]
        assert (root / "etc/after").read_bytes() == b"after"


@pytest.mark.integration
def test_later_layer_writes_through_merged_usr_symlink_inside_root(tmp_path: Path) -> None:
    layer1 = tar_bytes(member("usr/", tarfile.DIRTYPE, mode=0o755),
                       member("usr/bin/", tarfile.DIRTYPE, mode=0o755),
                       member("bin", tarfile.SYMTYPE, linkname="usr/bin"),
                       member("sbin", tarfile.SYMTYPE, linkname="/usr/bin"))
    layer2 = tar_bytes(member("bin/", tarfile.DIRTYPE, mode=0o755),
                       member("bin/tool", data=b"#!/bin/sh\n", mode=0o755),
                       member("sbin/admin", data=b"#!/bin/sh\n", mode=0o700))
    with mounted_tmpfs(tmp_path / "root") as root:
        ex = Extractor(str(root))
        extract_file(layer1, root, ex)
        extract_file(layer2, root, ex)
        assert os.readlink(root / "bin") == "usr/bin"  # the directory entry kept the link
        assert (root / "usr/bin/tool").read_bytes() == b"#!/bin/sh\n"
        assert (root / "usr/bin/admin").stat().st_mode & 0o777 == 0o700


@pytest.mark.integration
def test_extract_restores_directory_modes_after_filling_them(tmp_path: Path) -> None:
    archive = tar_bytes(member("ro/", tarfile.DIRTYPE, mode=0o555),
                        member("ro/file", data=b"inside a read-only dir"))
    with mounted_tmpfs(tmp_path / "root") as root:
        extract_file(archive, root)
        assert (root / "ro").stat().st_mode & 0o7777 == 0o555
        assert (root / "ro/file").read_bytes() == b"inside a read-only dir"
        assert (root / "ro").stat().st_mtime == 1_700_000_000


@pytest.mark.integration
def test_truncated_archive_is_an_error_naming_the_member(tmp_path: Path) -> None:
    archive = tar_bytes(member("big", data=b"x" * 100_000))[:50_000]
    with mounted_tmpfs(tmp_path / "root") as root, pytest.raises(ArchiveError, match="'big'"):
        extract_file(archive, root)


NAMES = [("/etc/passwd", "etc/passwd"), ("./a/./b/", "a/b"), ("//x", "x"), (".", ""),
         ("a//b", "a/b")]


@pytest.mark.unit
@pytest.mark.parametrize(("name", "normal"), NAMES)
def test_normalize_name_strips_leading_slash_and_dots(name: str, normal: str) -> None:
    assert normalize_name(name) == normal


@pytest.mark.unit
def test_parse_pax_keeps_binary_values() -> None:
    record = b"SCHILY.xattr.security.capability=\x01\x00\x00\x02\n"
    data = str(len(record) + 3).encode() + b" " + record
    assert parse_pax(data + b"12 path=a/b\n") == [
        ("SCHILY.xattr.security.capability", b"\x01\x00\x00\x02"), ("path", b"a/b")]


@pytest.mark.unit
def test_acl_text_encodes_as_the_kernel_xattr() -> None:
    value = acl_text_to_xattr("user::rw-\nuser:bob:r--\ngroup::r--\ngroup:7:rw-\nmask::rw-\n"
                              "other::---", users={"bob": 1001}, groups={})
    # version 2, then (tag, perm, id) sorted by tag and id
    assert value == bytes.fromhex(
        "02000000" "0100" "0600" "ffffffff" "0200" "0400" "e9030000" "0400" "0400" "ffffffff"
        "0800" "0600" "07000000" "1000" "0600" "ffffffff" "2000" "0000" "ffffffff")


@pytest.mark.integration
def test_xattrs_the_file_system_refuses_are_skipped_not_fatal(tmp_path: Path) -> None:
    """Debian 12's tmpfs refuses user.*; ramfs, used here, refuses every xattr."""
    info, data = member("etc/motd", data=b"motd\n")
    info.pax_headers = {"SCHILY.xattr.user.origin": "layer"}
    archive = tar_bytes(member("etc/", tarfile.DIRTYPE, mode=0o755), (info, data))
    root = tmp_path / "ramfs"
    root.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(root)], check=True)
    try:
        extract_file(archive, root)
        assert (root / "etc/motd").read_bytes() == b"motd\n"
    finally:
        subprocess.run(["umount", str(root)], check=True)


@pytest.mark.integration
@pytest.mark.parametrize("acl", ["user::rw-,user:1234:r--,group::r--,other::---",
                                 "user::rw-,user:nosuchuser:r--,group::r--,mask::r--,other::---"])
def test_acl_the_file_system_refuses_is_one_warning_naming_the_member(
        acl: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """As GNU tar: an ACL without a mask entry, or naming a user the root does not know,
    is skipped with a warning; the file and the members after it are extracted."""
    info, data = member("srv/file", data=b"acl\n")
    info.pax_headers = {"SCHILY.acl.access": acl}
    archive = tar_bytes(member("srv/", tarfile.DIRTYPE, mode=0o755), (info, data),
                        member("srv/after", data=b"after\n"))
    with mounted_tmpfs(tmp_path / "dst") as dst:
        extract_file(archive, dst)
        assert (dst / "srv/file").read_bytes() == b"acl\n"
        assert (dst / "srv/after").read_bytes() == b"after\n"
        assert "system.posix_acl_access" not in os.listxattr(dst / "srv/file")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "'srv/file'" in warnings[0], warnings
