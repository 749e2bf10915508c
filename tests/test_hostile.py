"""The fault matrix, archives: hostile and broken images, published with a correct hash.

The bytes arrive intact and verified; what they contain is the attack. Each case is
either refused with a message naming the member (the target emptied), or contained:
extracted, with the hostile path landed inside the root, as it resolves after
switch_root. A sentinel directory beside the target, and the absolute paths the
archives name, must never change.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from support.archives import (
    Member,
    claims_huge_size,
    compress,
    corrupt_middle,
    directory,
    file,
    hardlink,
    publish,
    snapshot,
    symlink,
    tar_of,
    truncated,
)
from support.faults import Root, Scene, fetch
from support.faultserver import FaultServer, serve
from support.reliability import Matrix

from tmpfsboot.boot.errors import ArchiveError, UnsafeMemberError

pytestmark = pytest.mark.integration


def layer_url(srv: FaultServer, name: str, kind: str = "zstd") -> str:
    return f"{srv.url}img/{name}" + {"zstd": ".tar.zst", "xz": ".tar.xz", "gzip": ".tar.gz",
                                     "none": ".tar"}[kind]


def fetch_image(scene: Scene, image: bytes, *, kind: str = "zstd") -> FaultServer:
    """Publish IMAGE (with its true hash) and fetch it into the scene; the server."""
    files: dict[str, bytes] = {}
    publish(files, "img", "evil", image, kind=kind)
    with serve(files) as srv:
        fetch(layer_url(srv, "evil", kind), scene, retries=0)
    return srv


def refused(scene: Scene, image: bytes, error: type[Exception], *,
            kind: str = "zstd") -> str:
    """Fetch IMAGE expecting ERROR; the message. The target is left empty."""
    with pytest.raises(error) as e:
        fetch_image(scene, image, kind=kind)
    scene.assert_empty()
    scene.assert_outside_untouched()
    return shorten(str(e.value).replace(str(scene.target.parent), "…"))


def inside(scene: Scene, path: str) -> Path:
    """Where absolute PATH lands in the root (as seen after switch_root)."""
    return scene.target / path.lstrip("/")


def test_dotdot_member_is_refused_naming_it(matrix: Matrix, scene: Scene) -> None:
    matrix.case("Archive", "member `../escape`", "refused")
    message = refused(scene, compress(tar_of(file("ok"), file("../escape"))),
                      UnsafeMemberError)
    assert "'../escape'" in message
    assert not (scene.target.parent / "escape").exists()
    matrix.evidence(f"`{message}`")


def test_dotdot_inside_a_path_is_refused(matrix: Matrix, scene: Scene) -> None:
    matrix.case("Archive", "member `a/../../escape`", "refused")
    message = refused(scene, compress(tar_of(directory("a"), file("a/../../escape"))),
                      UnsafeMemberError)
    assert "'a/../../escape'" in message
    matrix.evidence(f"`{message}`")


def test_dotdot_in_a_pax_path_is_refused(matrix: Matrix, scene: Scene) -> None:
    matrix.case("Archive", "pax `path=` record with `..` (ustar name harmless)", "refused")
    name = "x" * 120 + "/../../../escape"  # too long for ustar: tarfile writes a pax path
    message = refused(scene, compress(tar_of(file(name), fmt=tarfile.PAX_FORMAT)),
                      UnsafeMemberError)
    assert name in message
    matrix.evidence("`refusing tar member 'xxx…/../../../escape': it contains '..'`")


def test_absolute_member_lands_inside_the_root(matrix: Matrix, scene: Scene) -> None:
    matrix.case("Archive", "absolute member `/ABS/sentinel/planted`", "contained")
    planted = f"{scene.sentinel}/planted"
    fetch_image(scene, compress(tar_of(file(planted))))
    assert inside(scene, planted).read_bytes() == b"hostile\n"
    scene.assert_outside_untouched()
    assert not Path(planted).exists()
    matrix.evidence("leading `/` stripped: written to DIR/ABS/sentinel/planted; the real "
                    "path untouched")


def test_symlink_to_slash_then_a_file_through_it_stays_inside(matrix: Matrix,
                                                             scene: Scene) -> None:
    matrix.case("Archive", "symlink `esc -> /`, then `esc/ABS/sentinel/planted`", "contained")
    planted = f"{scene.sentinel}/planted"
    fetch_image(scene, compress(tar_of(symlink("esc", "/"), file("esc" + planted))))
    assert inside(scene, planted).read_bytes() == b"hostile\n"
    assert os.readlink(scene.target / "esc") == "/"
    scene.assert_outside_untouched()
    matrix.evidence("`/` resolves to DIR: the file is DIR/ABS/sentinel/planted")


def test_symlink_to_an_outside_directory_then_a_file_through_it(matrix: Matrix,
                                                               scene: Scene) -> None:
    matrix.case("Archive", "symlink `esc -> /ABS/sentinel`, then `esc/secret` (overwrite)",
                "contained")
    fetch_image(scene, compress(tar_of(symlink("esc", str(scene.sentinel)),
                                       file("esc/secret", b"overwritten\n"))))
    assert inside(scene, f"{scene.sentinel}/secret").read_bytes() == b"overwritten\n"
    scene.assert_outside_untouched()
    matrix.evidence("written to DIR/ABS/sentinel/secret; the real secret unchanged")


def test_relative_symlink_climbing_out_stays_inside(matrix: Matrix, scene: Scene) -> None:
    matrix.case("Archive", "symlink `up -> ../../../../../..`, then `up/ABS/sentinel/planted`",
                "contained")
    planted = f"{scene.sentinel}/planted"
    fetch_image(scene, compress(tar_of(symlink("up", "../" * 6),
                                       file("up" + planted))))
    assert inside(scene, planted).read_bytes() == b"hostile\n"
    scene.assert_outside_untouched()
    matrix.evidence("`..` stops at the root, as in a chroot: DIR/ABS/sentinel/planted")


def test_symlink_of_layer_1_written_through_by_layer_2(matrix: Matrix, scene: Scene) -> None:
    matrix.case("Archive", "layer 1: `esc -> /ABS/sentinel`; layer 2: `esc/planted`",
                "contained")
    files: dict[str, bytes] = {}
    publish(files, "l1", "evil", compress(tar_of(symlink("esc", str(scene.sentinel)))))
    publish(files, "l2", "evil", compress(tar_of(file("esc/planted"))))
    with serve(files) as srv:
        fetch(f"{srv.url}l1/evil.tar.zst,{srv.url}l2/evil.tar.zst", scene, retries=0)
    assert inside(scene, f"{scene.sentinel}/planted").read_bytes() == b"hostile\n"
    scene.assert_outside_untouched()
    matrix.evidence("(GNU tar writes ABS/sentinel/planted on the host here) layer 2 "
                    "follows the symlink as if DIR were `/`: DIR/ABS/sentinel/planted")


def test_hard_link_to_an_outside_absolute_path_is_refused(matrix: Matrix,
                                                          scene: Scene) -> None:
    matrix.case("Archive", "hard link `stolen` -> `/ABS/sentinel/secret`", "refused")
    secret = f"{scene.sentinel}/secret"
    message = refused(scene, compress(tar_of(hardlink("stolen", secret))), ArchiveError)
    assert "'stolen'" in message and "No such file" in message
    assert os.stat(secret).st_nlink == 1
    matrix.evidence(f"the link source resolves inside DIR, where it does not exist; "
                    f"`{message}`; the real file's link count stays 1")


def test_hard_link_with_dotdot_is_refused(matrix: Matrix, scene: Scene) -> None:
    matrix.case("Archive", "hard link `stolen` -> `../sentinel/secret`", "refused")
    message = refused(scene, compress(tar_of(hardlink("stolen", "../sentinel/secret"))),
                      UnsafeMemberError)
    assert "../sentinel/secret" in message
    assert os.stat(scene.sentinel / "secret").st_nlink == 1
    matrix.evidence(f"`{message}`")


def test_hard_link_through_a_symlink_to_outside_is_refused(matrix: Matrix,
                                                           scene: Scene) -> None:
    matrix.case("Archive", "symlink `esc -> /ABS/sentinel`, hard link `stolen` -> "
                "`esc/secret`", "refused")
    message = refused(scene, compress(tar_of(symlink("esc", str(scene.sentinel)),
                                             hardlink("stolen", "esc/secret"))),
                      ArchiveError)
    assert "'stolen'" in message
    assert os.stat(scene.sentinel / "secret").st_nlink == 1
    matrix.evidence(f"`{message}`")


def test_symlink_loop_is_refused(matrix: Matrix, scene: Scene) -> None:
    matrix.case("Archive", "symlink loop `a -> b`, `b -> a`, then `a/file`", "refused")
    message = refused(scene, compress(tar_of(symlink("a", "b"), symlink("b", "a"),
                                             file("a/file"))), UnsafeMemberError)
    assert "'a/file'" in message and "too many levels of symlinks" in message
    matrix.evidence(f"`{message}`")


def test_whiteout_of_dotdot_is_refused(matrix: Matrix, scene: Scene) -> None:
    matrix.case("Archive", "OCI whiteout `etc/.wh...` (deletes `..`)", "refused")
    message = refused(scene, compress(tar_of(directory("etc"), file("etc/.wh..."))),
                      UnsafeMemberError)
    assert "etc/.wh..." in message
    matrix.evidence(f"`{message}`")


def test_member_claiming_a_huge_size_fails_fast(matrix: Matrix, scene: Scene) -> None:
    matrix.case("Archive", "member header claiming 1 TiB, 4 KiB of data follow", "refused")
    started = time.monotonic()
    message = refused(scene, compress(claims_huge_size("huge", 1 << 40)), ArchiveError)
    elapsed = time.monotonic() - started
    assert "truncated archive" in message and "'huge'" in message
    assert elapsed < 5
    matrix.evidence(f"nothing allocated up front, refused in {elapsed:.2f} s: `{message}`")


def test_truncated_archive_is_refused(matrix: Matrix, good: Root, scene: Scene) -> None:
    matrix.case("Archive", "tar cut inside a member (compressed whole, hash correct)",
                "refused")
    message = refused(scene, compress(truncated(good.tar, 1_500_000)), ArchiveError)
    assert "truncated archive" in message and "blob.bin" in message
    matrix.evidence(f"`{message}`")


def test_compressed_stream_cut_short_is_refused(matrix: Matrix, good: Root,
                                                scene: Scene) -> None:
    matrix.case("Archive", "zstd stream cut short (hash of the short file published)",
                "refused")
    message = refused(scene, good.image[: len(good.image) // 2], ArchiveError)
    assert "truncated archive" in message or "decompression failed" in message
    matrix.evidence(f"`{shorten(message)}`")


def test_garbage_after_a_valid_zstd_stream_is_refused(matrix: Matrix, good: Root,
                                                      scene: Scene) -> None:
    matrix.case("Archive", "random bytes after a complete zstd frame", "refused")
    garbage = random.Random(7).randbytes(5000)
    message = refused(scene, good.image + garbage, ArchiveError)
    assert "zstd" in message
    matrix.evidence(f"the tar ended well, but zstd rejects the trailer: `{shorten(message)}`")


def test_garbage_after_the_tar_end_inside_the_stream_is_ignored(matrix: Matrix, good: Root,
                                                                scene: Scene) -> None:
    matrix.case("Archive", "bytes after tar's end-of-archive blocks, inside the zstd stream",
                "survived")
    fetch_image(scene, compress(good.tar + b"\xde\xad" * 3000))
    assert snapshot(scene.target) == good.snapshot
    scene.assert_outside_untouched()
    matrix.evidence("as GNU tar: extraction stops at the end-of-archive blocks, the rest is "
                    "drained; the hash covered every byte; tree equal")


@pytest.mark.parametrize("kind", ["zstd", "xz", "gzip"])
def test_stream_corrupt_in_its_middle_is_refused(matrix: Matrix, good: Root, scene: Scene,
                                                 kind: str) -> None:
    matrix.case("Archive", f"{kind} stream corrupt in its middle (hash of the corrupt "
                "file published)", "refused")
    message = refused(scene, corrupt_middle(compress(good.tar, kind)), ArchiveError,
                      kind=kind)
    matrix.evidence(f"`{shorten(message)}`")


def test_not_an_archive_at_all_is_refused(matrix: Matrix, scene: Scene) -> None:
    matrix.case("Archive", "an HTML page where the image should be", "refused")
    message = refused(scene, b"<html><body>Not here</body></html>\n" * 40, ArchiveError,
                      kind="zstd")
    assert "not a tar archive" in message
    matrix.evidence(f"`{shorten(message)}`")


def test_gnu_tar_writes_through_a_layer_1_symlink(tmp_path: Path) -> None:
    """The reason for our own extractor, kept true: GNU tar, layer after layer, writes
    outside its directory. (Not a matrix case: a fact about the alternative.)"""
    target, outside = tmp_path / "root", tmp_path / "outside"
    target.mkdir()
    outside.mkdir()
    layer1, layer2 = tmp_path / "l1.tar", tmp_path / "l2.tar"
    layer1.write_bytes(tar_of(symlink("esc", str(outside))))
    layer2.write_bytes(tar_of(Member("esc/planted", data=b"x")))
    for layer in (layer1, layer2):
        subprocess.run(["tar", "-C", str(target), "-xf", str(layer)], check=True)
    assert (outside / "planted").exists()


def shorten(message: str) -> str:
    """MESSAGE on one line, its loopback URLs without the (random) port."""
    return re.sub(r"http://127\.0\.0\.1:\d+/", "http://H/", message).split("\n")[0][:300]
