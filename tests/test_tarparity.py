"""Tar parity, differentially: GNU tar and `tmpfsboot fetch` extract the same archive into
two tmpfs mounts, and the trees are compared entry by entry. Where GNU tar fails, or the
archive is invalid input on purpose, tmpfsboot must fail cleanly: exit 1, one error line,
no traceback, an empty target."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.mounts import mounted_tmpfs
from support.tarcorpus import (
    GNU_EXTRACT,
    GNU_FORMATS,
    make_corpus_tree,
    make_gnu_archives,
    vendored_archives,
)
from support.trees import Entry, diff_trees, snapshot_tree

from tmpfsboot.host.serve import ImageServer, start_server

pytestmark = pytest.mark.integration

# Archives GNU tar extracts that tmpfsboot refuses on purpose: invalid pax values
# (docs/reliability.md lists them beside what GNU tar does).
REFUSED = {
    "go/pax-bad-mtime-file.tar": "pax mtime",
    "go/pax-nul-path.tar": "pax path contains a NUL byte",
    "libarchive/test_read_format_tar_pax_timestamps.tar": "pax mtime",
}

# Archives that end without the end-of-archive zero blocks. GNU tar extracts what is
# there; tmpfsboot calls them truncated (a stream cut at a member boundary looks just
# so) - and extracts the same tree as GNU tar once they are terminated.
UNTERMINATED = {
    "go/gnu-incremental.tar", "go/gnu-multi-hdrs.tar", "go/nil-uid.tar",
    "go/pax-multi-hdrs.tar", "go/pax-pos-size-file.tar", "go/ustar-file-reg.tar",
    "go/pax-path-hdr.tar", "libarchive/test_compat_tar_hardlink_1.tar",
}

# Valid archives GNU tar 1.34 fails on, that tmpfsboot extracts as Go's archive/tar and
# Python's tarfile read them (an old GNU sparse map of 95 entries: GNU tar stops early).
BEYOND_GNU = {"go/sparse-formats.tar"}

# Where tmpfsboot restores more than GNU tar 1.34, which ignores LIBARCHIVE.xattr records.
EXTRA_XATTRS = {"libarchive/test_pax_xattr_header_libarchive.tar"}

STARTED_NS = time.time_ns()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, ImageServer]]:
    """Every archive of the corpus, in one directory served on loopback."""
    www = tmp_path_factory.mktemp("www")
    for archive in vendored_archives():
        (www / archive.parent.name).mkdir(exist_ok=True)
        shutil.copy(archive, www / archive.parent.name / archive.name)
    for name in UNTERMINATED:
        (www / f"{name}.terminated").write_bytes((www / name).read_bytes() + bytes(1024))
    bad_uid = tarfile.TarInfo("etc/bad")
    bad_uid.pax_headers = {"uid": "abc"}
    with tarfile.open(www / "bad-uid.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(bad_uid)
    (www / "gnu").mkdir()
    with mounted_tmpfs(tmp_path_factory.mktemp("tree")) as tree:
        make_corpus_tree(tree)
        make_gnu_archives(tree, www / "gnu")
    server = start_server(www, access_log=False)
    try:
        yield www, server
    finally:
        server.stop()


def _names() -> list[str]:
    return [f"gnu/{name}" for name, _ in GNU_FORMATS] + [
        f"{p.parent.name}/{p.name}" for p in vendored_archives()]


def _comparable(tree: Path) -> dict[str, Entry]:
    """A strict snapshot, with the mtimes of directories tar made on its own (not in the
    archive, so stamped "now" by each tool at a different moment) left out."""
    snap = snapshot_tree(tree, strict=True)
    for rel, entry in snap.items():
        if entry.dir_mtime_ns is not None and (rel == "." or entry.dir_mtime_ns >= STARTED_NS):
            snap[rel] = dataclasses.replace(entry, dir_mtime_ns=None)
    return snap


def _without_user_xattrs(snap: dict[str, Entry]) -> dict[str, Entry]:
    return {rel: dataclasses.replace(e, xattrs=tuple(x for x in e.xattrs
                                                     if not x[0].startswith("user.")))
            for rel, e in snap.items()}


def fetch(url: str, target: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tmpfsboot", "fetch", "--verify", "no",
                           "--retries", "0", "--timeout", "20", url, str(target)],
                          capture_output=True, text=True, timeout=120, check=False)


def assert_failed_cleanly(proc: subprocess.CompletedProcess[str], target: Path) -> str:
    """Exit 1, one error line naming a member, no traceback, nothing left in TARGET."""
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, proc.stderr
    assert list(target.iterdir()) == []
    return errors[0]


@pytest.mark.parametrize("name", _names())
def test_fetch_extracts_the_tree_gnu_tar_extracts(
        name: str, corpus: tuple[Path, ImageServer], tmp_path: Path) -> None:
    www, server = corpus
    with mounted_tmpfs(tmp_path / "gnu") as gnu, mounted_tmpfs(tmp_path / "ours") as ours:
        ref = subprocess.run([*GNU_EXTRACT, str(www / name), "-C", str(gnu)],
                             capture_output=True, text=True, check=False)
        proc = fetch(f"{server.url}{name}", ours)
        if name in REFUSED:
            assert ref.returncode == 0, "GNU tar now refuses it too: move it out of REFUSED"
            assert REFUSED[name] in assert_failed_cleanly(proc, ours)
        elif name in BEYOND_GNU:
            assert ref.returncode != 0, "GNU tar now extracts it: move it out of BEYOND_GNU"
            assert proc.returncode == 0, proc.stderr
            assert_same_files_as_tarfile(www / name, ours)
        elif ref.returncode != 0:
            assert_failed_cleanly(proc, ours)
        else:
            if name in UNTERMINATED:
                assert "truncated archive" in assert_failed_cleanly(proc, ours)
                proc = fetch(f"{server.url}{name}.terminated", ours)
            assert proc.returncode == 0, proc.stderr
            want, got = _comparable(gnu), _comparable(ours)
            if name.startswith("gnu/"):
                assert len(want) > 15, "the corpus tree did not make it into the archive"
            if name in EXTRA_XATTRS:
                assert want != got  # the xattrs GNU tar drops are there
                want, got = _without_user_xattrs(want), _without_user_xattrs(got)
            assert diff_trees(want, got) == []


def assert_same_files_as_tarfile(archive: Path, tree: Path) -> None:
    """Each regular file holds what Python's tarfile reads for it (holes included)."""
    with tarfile.open(archive) as tar:
        files = [m for m in tar.getmembers() if m.isfile()]
        assert files
        for m in files:
            data = tar.extractfile(m)
            assert data is not None
            assert (tree / m.name).read_bytes() == data.read(), m.name


def test_bad_pax_value_in_layer_2_empties_layer_1_and_names_member_and_field(
        corpus: tuple[Path, ImageServer], tmp_path: Path) -> None:
    _, server = corpus
    with mounted_tmpfs(tmp_path / "ours") as ours:
        proc = fetch(f"{server.url}gnu/gnu-posix.tar,{server.url}bad-uid.tar", ours)
        line = assert_failed_cleanly(proc, ours)
    assert line.endswith("bad-uid.tar: tar member 'etc/bad': pax uid 'abc' is not a number")
