"""The parallel writer (issue 13 item 2): files written by worker processes come out
exactly as a serial extraction makes them, every ordering guarantee kept; a failure in a
worker is the member's error, and no worker outlives the extraction."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from support.faultserver import serve
from support.mounts import mounted_tmpfs
from support.trees import Entry, diff_trees, make_full_tree, snapshot_tree
from test_extract import extract_file, member, tar_bytes

from tmpfsboot.boot import filewrite
from tmpfsboot.boot.errors import SpaceError
from tmpfsboot.boot.extract import Extractor
from tmpfsboot.boot.filewrite import BATCH_FILES, POOL_FILE_MAX, WritePool
from tmpfsboot.boot.tarheader import HeaderParser
from tmpfsboot.boot.tarstream import Reader
from tmpfsboot.host.image import TAR_OPTIONS

pytestmark = pytest.mark.integration


def owned(name: str, data: bytes, *, uid: int, gid: int, mode: int) -> tuple[
        tarfile.TarInfo, bytes | None]:
    info, payload = member(name, data=data, mode=mode)
    info.uid, info.gid = uid, gid
    return info, payload


def filler(prefix: str, count: int) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    """COUNT small files: enough to fill batches and keep the pool busy between the
    members that test an ordering."""
    return [member(f"{prefix}/f{i}", data=bytes([i % 251]) * (i % 700)) for i in range(count)]


# Each ordering the serial extractor guarantees, with files still in the pool's hands
# when the member that depends on them arrives.
ORDERINGS = tar_bytes(
    member("d/", tarfile.DIRTYPE, mode=0o755),
    *filler("d", BATCH_FILES // 2),
    member("d/twice", data=b"first\n"),
    member("d/twice", data=b"second, longer\n"),  # the same path twice: the last wins
    member("d/linked", data=b"linked data\n"),
    member("d/hard", tarfile.LNKTYPE, linkname="d/linked"),  # a link to a file in flight
    member("d/was-file", data=b"a file first\n"),
    member("d/was-file/", tarfile.DIRTYPE, mode=0o700),  # then a directory there
    member("d/was-file/inner", data=b"inside\n"),
    member("d/now-link", data=b"a file first\n"),
    member("d/now-link", tarfile.SYMTYPE, linkname="twice"),  # then a symlink there
    member("d/kept", data=b"old inode\n"),
    member("d/kept-link", tarfile.LNKTYPE, linkname="d/kept"),
    member("d/kept", data=b"new inode\n"),  # replaced: the link keeps the old data
    owned("d/setuid", b"#!/bin/sh\n", uid=1234, gid=5678, mode=0o4755),
    member("d/big", data=os.urandom(POOL_FILE_MAX + 5000)),  # streamed, not pooled
    *filler("d", BATCH_FILES * 3),
    member("ro/", tarfile.DIRTYPE, mode=0o555),
    member("ro/file", data=b"in a read-only directory\n"),
)


def children() -> set[int]:
    """This process's child processes."""
    found: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            found.update(int(pid) for pid in f.read().split())
    return found


# Who writes a batch: the workers always (they are never behind), or the extractor
# itself (as when every worker is behind: a cap of 0 batches in flight).
WHO_WRITES = pytest.mark.parametrize("max_batches", [1000, 0], ids=["workers", "extractor"])


@pytest.fixture(autouse=True)
def _batches_in_flight(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if "max_batches" in request.fixturenames:
        monkeypatch.setattr(filewrite, "MAX_BATCHES", request.getfixturevalue("max_batches"))


def extract_both(archive: bytes, tmp_path: Path, *layers: bytes) -> tuple[
        dict[str, Entry], dict[str, Entry], Path]:
    """ARCHIVE (then LAYERS) extracted serially and with 3 workers (the first layer
    only: later ones go into a root that is not empty); both snapshots."""
    snaps = []
    for writers in (0, 3):
        with mounted_tmpfs(tmp_path / f"w{writers}") as root:
            ex = Extractor(str(root), writers=writers)
            for layer in (archive, *layers):
                extract_file(layer, root, ex)
            snap = snapshot_tree(root, strict=True)
            del snap["."]  # these archives have no "./": its mtime is the extraction's
            snaps.append(snap)
    return snaps[0], snaps[1], tmp_path / "w3"


def test_the_ordering_archive_takes_the_fast_path() -> None:
    """Else the pool would not see these files and the tests below would prove nothing."""
    reader = Reader(io.BytesIO(ORDERINGS).readinto)
    parser = HeaderParser(reader)
    fast = 0
    while True:
        found = parser.next_fast()
        if found is None:
            if parser.next_general() is None:
                break
            continue
        fast += 1
        reader.skip(found[5] + (-found[5] % 512))
    assert fast > BATCH_FILES * 3


@WHO_WRITES
def test_pooled_extraction_keeps_every_ordering_of_the_serial_one(tmp_path: Path,
                                                                  max_batches: int) -> None:
    serial, pooled, _ = extract_both(ORDERINGS, tmp_path)
    assert not diff_trees(serial, pooled), diff_trees(serial, pooled)[:10]
    with mounted_tmpfs(tmp_path / "check") as root:
        extract_file(ORDERINGS, root, Extractor(str(root), writers=3))
        assert (root / "d/twice").read_bytes() == b"second, longer\n"
        assert (root / "d/hard").read_bytes() == b"linked data\n"
        assert os.stat(root / "d/hard").st_ino == os.stat(root / "d/linked").st_ino
        assert (root / "d/was-file/inner").read_bytes() == b"inside\n"
        assert os.readlink(root / "d/now-link") == "twice"
        assert (root / "d/kept").read_bytes() == b"new inode\n"
        assert (root / "d/kept-link").read_bytes() == b"old inode\n"
        st = os.stat(root / "d/setuid")
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (1234, 5678, 0o4755)
        assert os.stat(root / "ro").st_mode & 0o7777 == 0o555


def test_pooled_layers_and_whiteouts_match_the_serial_ones(tmp_path: Path) -> None:
    layer2 = tar_bytes(
        member("d/", tarfile.DIRTYPE, mode=0o755),
        *filler("d", BATCH_FILES),
        member("d/.wh.twice", data=b""),
        member("d/was-file/", tarfile.DIRTYPE, mode=0o700),
        member("d/was-file/.wh..wh..opq", data=b""),
        member("d/was-file/fresh", data=b"fresh\n"),
        member("d/kept", data=b"layer 2\n"),
        member("e/", tarfile.DIRTYPE, mode=0o755),
        *filler("e", BATCH_FILES),
    )
    serial, pooled, _ = extract_both(ORDERINGS, tmp_path, layer2)
    assert not diff_trees(serial, pooled), diff_trees(serial, pooled)[:10]
    assert "d/twice" not in pooled and "d/was-file/inner" not in pooled
    assert "d/was-file/fresh" in pooled


def test_a_gnu_tar_root_extracts_the_same_with_and_without_the_pool(tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "src") as src:
        make_full_tree(src)
        for d in range(3):
            (src / f"many{d}").mkdir()
            for i in range(300):
                (src / f"many{d}" / f"f{i}").write_bytes(os.urandom(i * 13))
        archive = subprocess.run(["tar", "-c", "-f", "-", *TAR_OPTIONS, "-C", str(src), "."],
                                 check=True, capture_output=True).stdout
    serial, pooled, _ = extract_both(archive, tmp_path)
    assert len(pooled) > 900
    assert not diff_trees(serial, pooled), diff_trees(serial, pooled)[:10]


@WHO_WRITES
def test_a_full_root_fails_naming_a_member_and_ends_every_worker(tmp_path: Path,
                                                                 max_batches: int) -> None:
    archive = tar_bytes(member("d/", tarfile.DIRTYPE, mode=0o755),
                        *[member(f"d/f{i}", data=os.urandom(60_000)) for i in range(200)])
    before = children()
    with (mounted_tmpfs(tmp_path / "root", size="2m") as root,
          pytest.raises(SpaceError, match=r"tar member 'd/f\d+'.*rootsize=")):
        extract_file(archive, root, Extractor(str(root), writers=3))
    assert children() == before


def test_a_low_descriptor_limit_still_extracts_many_files(tmp_path: Path) -> None:
    """Workers hold no descriptor per file in flight: a node with a low RLIMIT_NOFILE
    still extracts a root of many files through them."""
    archive = tmp_path / "many.tar"
    archive.write_bytes(tar_bytes(member("d/", tarfile.DIRTYPE, mode=0o755),
                                  *filler("d", 3000)))
    script = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40));"
              "from tmpfsboot.boot.extract import Extractor;"
              "fd = os.open(sys.argv[1], os.O_RDONLY);"
              "print(Extractor(sys.argv[2], writers=4).extract(fd).files)")
    with mounted_tmpfs(tmp_path / "root") as root:
        proc = subprocess.run([sys.executable, "-c", script, str(archive), str(root)],
                              capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == ["3000"]
        assert len(os.listdir(root / "d")) == 3000


def test_pool_size_follows_the_cpus_this_process_may_use(tmp_path: Path) -> None:
    root_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    pool = WritePool.sized(None, root_fd, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        cpus = len(os.sched_getaffinity(0))
        assert (pool is None) == (cpus == 1)
        if pool is not None:
            assert len(pool._workers) == min(cpus - 1, 8)
    finally:
        if pool is not None:
            pool.close(ok=True)
        os.close(root_fd)
    pinned = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c",
         "from tmpfsboot.boot.filewrite import WritePool; print(WritePool.sized(None, 0, 0))"],
        capture_output=True, text=True, check=True)
    assert pinned.stdout.strip() == "None"


@pytest.fixture(scope="module")
def image_www(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root as `image build` archives it (1,500 small files and every kind of entry),
    zstd-compressed, and a copy cut short inside its members; with SHA256SUMS."""
    www = tmp_path_factory.mktemp("www")
    with mounted_tmpfs(tmp_path_factory.mktemp("src")) as src:
        make_full_tree(src)
        for d in range(3):
            (src / f"many{d}").mkdir()
            for i in range(500):
                (src / f"many{d}" / f"f{i}").write_bytes(os.urandom(i * 7))
        tar = subprocess.run(["tar", "-c", "-f", "-", *TAR_OPTIONS, "-C", str(src), "."],
                             check=True, capture_output=True).stdout
    for name, data in (("root.tar.zst", tar), ("cut.tar.zst", tar[: len(tar) // 2])):
        packed = subprocess.run(["zstd", "-q", "-c"], input=data, check=True,
                                capture_output=True).stdout
        (www / name).write_bytes(packed)
        with open(www / "SHA256SUMS", "a") as f:
            f.write(f"{hashlib.sha256(packed).hexdigest()}  {name}\n")
    return www


def fetch(url: str, target: Path, writers: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tmpfsboot", "fetch", "--writers",
                           str(writers), "--retries", "0", "--timeout", "20", url, str(target)],
                          capture_output=True, text=True, timeout=120, check=False)


def processes_naming(text: str) -> list[int]:
    """Processes whose command line holds TEXT (a forked worker keeps its parent's)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


def test_tmpfs_writers_fetch_gives_the_serial_fetchs_tree(image_www: Path,
                                                          tmp_path: Path) -> None:
    with serve(root=image_www) as server:
        snaps = []
        for writers in (0, 2):
            with mounted_tmpfs(tmp_path / f"w{writers}") as root:
                proc = fetch(f"{server.url}root.tar.zst", root, writers)
                assert proc.returncode == 0, proc.stderr
                snaps.append(snapshot_tree(root, strict=True))
                # the layer's line says who wrote it
                assert ("2 writer processes" in proc.stderr) == (writers == 2), proc.stderr
    assert len(snaps[1]) > 1500
    assert not diff_trees(snaps[0], snaps[1]), diff_trees(snaps[0], snaps[1])[:10]


def test_a_fetch_failing_while_writers_work_leaves_an_empty_root_and_no_worker(
        image_www: Path, tmp_path: Path) -> None:
    with serve(root=image_www) as server, mounted_tmpfs(tmp_path / "root") as root:
        proc = fetch(f"{server.url}cut.tar.zst", root, 2)
        assert proc.returncode == 1, proc.stderr
        assert "truncated archive" in proc.stderr and "Traceback" not in proc.stderr
        assert list(root.iterdir()) == []
        assert processes_naming(str(root)) == []
