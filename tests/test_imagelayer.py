"""Image layers on this host: real squashfs and erofs images, real loop devices, a real
overlay on a real tmpfs, served over loopback HTTP; and `image build --format`."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import faultserver
from support.archives import write_tree
from support.faults import fetch_url
from support.mounts import MOUNT, UMOUNT, mounted_tmpfs
from support.trees import Entry, diff_trees, make_full_tree, snapshot_tree

from tmpfsboot.boot.errors import SpaceError, UsageError, VerificationError
from tmpfsboot.boot.imagelayer import LayerKind, check_order
from tmpfsboot.boot.log import EventLog
from tmpfsboot.host.image import build_image

pytestmark = pytest.mark.integration

Served = tuple[Path, str, faultserver.FaultServer]  # the directory, its URL, the server
MIB = 1 << 20


def mount_table() -> list[list[str]]:
    """/proc/self/mountinfo as fields: [4] the mount point, after "-": type, source."""
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return [line.split() for line in f]


def mounts_under(path: Path) -> dict[str, str]:
    """Mount point -> file-system type, for mounts at or below PATH."""
    found = {}
    for fields in mount_table():
        point = fields[4]
        if point == str(path) or point.startswith(f"{path}/"):
            found[point] = fields[fields.index("-") + 1]
    return found


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Served]:
    """A directory served over HTTP on loopback (which ignores Range), its URL, the server."""
    root = tmp_path / "www"
    root.mkdir()
    with faultserver.serve(root=root, ignore_range=True) as server:
        yield root, server.url, server


@dataclasses.dataclass
class Node:
    """Where a boot happens: the tmpfs root mount point and where its layers move to."""

    target: Path
    layers: Path


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    """A private tmpfs (a mount can only be moved under a private parent) holding the
    root's own tmpfs; everything mounted below is unmounted afterwards."""
    with mounted_tmpfs(tmp_path / "node") as scratch:
        subprocess.run([MOUNT, "--make-private", str(scratch)], check=True)
        with mounted_tmpfs(scratch / "root", size="64m") as target:
            try:
                yield Node(target=target, layers=scratch / "run/tmpfsboot/layers")
            finally:
                for point in sorted(mounts_under(scratch), key=len, reverse=True):
                    if point not in (str(scratch), str(target)):
                        subprocess.run([UMOUNT, "--lazy", point], check=False)


def base_tree(root: Path) -> Path:
    tree = write_tree(root, {"etc/os-release": b"ID=test\n", "usr/bin/tool": b"tool\n",
                            "etc/old.conf": b"from the image\n",
                            "var/cache/a": b"a\n", "var/cache/b": b"b\n"})
    os.chmod(tree, 0o755)
    return tree


@pytest.mark.parametrize("fmt", ["squashfs", "erofs"])
def test_image_base_and_tar_host_layer_boot_an_overlay(site: Served, node: Node,
                                                       tmp_path: Path, fmt: str) -> None:
    www, base, _ = site
    build_image(base_tree(tmp_path / "base"), www, "base", fmt=fmt)
    host = write_tree(tmp_path / "host", {"etc/hostname": b"node1\n", ".wh.var": b"",
                                         "etc/.wh.old.conf": b""})
    build_image(host, www, "host-node1", include_root=False)
    log = tmp_path / "boot.jsonl"
    events = EventLog(str(log))
    fetch_url(f"{base}base.{fmt},{base}host-node1.tar.zst", node.target,
              image_mounts=str(node.layers), events=events)
    events.close()
    mounts = mounts_under(node.target.parent)
    assert mounts[str(node.target)] == "overlay"
    assert mounts[str(node.layers)] == "tmpfs"
    assert mounts[f"{node.layers}/lower/1"] == fmt
    root = node.target
    assert (root / "etc/os-release").read_bytes() == b"ID=test\n"  # from the image
    assert (root / "etc/hostname").read_bytes() == b"node1\n"  # from the tar layer
    # the tar layer's whiteouts hid a file and a directory of the image
    assert not (root / "etc/old.conf").exists() and not (root / "var").exists()
    upper = node.layers / "upper"
    assert (upper / "etc/hostname").exists()  # the tar layer landed in the upper layer
    whiteout = os.lstat(upper / "etc/old.conf")  # overlayfs' own whiteout: a 0/0 device
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
    assert (node.layers / "lower/1/etc/old.conf").exists()  # the image itself untouched
    assert list((node.layers / "images").iterdir()) == [node.layers / f"images/1-base.{fmt}"]
    events_by_layer = {e.get("layer"): e for e in map(json.loads, log.read_text().splitlines())
                       if e.get("ok") and "layer" in e}
    assert events_by_layer[1]["kind"] == fmt and events_by_layer[2]["kind"] == "tar"


def test_tampered_image_is_never_mounted(site: Served, node: Node, tmp_path: Path) -> None:
    www, base, _ = site
    image = build_image(base_tree(tmp_path / "base"), www, "base", fmt="squashfs")
    data = bytearray(image.read_bytes())
    data[200] ^= 0xFF
    image.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="SHA-256 mismatch: expected"):
        fetch_url(f"{base}base.squashfs", node.target, image_mounts=str(node.layers))
    assert mounts_under(node.target.parent) == {str(node.target.parent): "tmpfs",
                                                str(node.target): "tmpfs"}
    assert not any("loop" in " ".join(f) and str(node.layers) in " ".join(f)
                   for f in mount_table())
    assert os.listdir(node.target) == []  # the tmpfs is back on the target, empty


def test_image_after_tar_layer_is_refused_before_any_download(site: Served, node: Node,
                                                               tmp_path: Path) -> None:
    www, base, server = site
    build_image(base_tree(tmp_path / "base"), www, "base", fmt="erofs")
    build_image(write_tree(tmp_path / "host", {"etc/x": b"x"}), www, "host",
                include_root=False)
    with pytest.raises(UsageError) as e:
        fetch_url(f"{base}host.tar.zst,{base}base.erofs", node.target,
                  image_mounts=str(node.layers))
    assert str(e.value) == (f"layer 2 ({base}base.erofs) is an erofs image after tar layer 1: "
                            "image layers must come first in root=")
    assert "/host.tar.zst" not in server.paths  # the tar layer was never asked for
    assert os.listdir(node.target) == []


def test_preflight_counts_the_image_file(site: Served, tmp_path: Path) -> None:
    www, base, server = site
    tree = base_tree(tmp_path / "base")
    (tree / "blob").write_bytes(os.urandom(3 << 20))  # incompressible: a 3 MiB image
    build_image(tree, www, "base", fmt="squashfs")
    with mounted_tmpfs(tmp_path / "small", size="2m") as target, \
            pytest.raises(SpaceError, match="image files and unpacked tar layers"):
        fetch_url(f"{base}base.squashfs", target, image_mounts=str(tmp_path / "layers"))
    assert server.paths.count("/base.squashfs") == 1  # the probe of its first bytes, no more


def test_host_fetch_stores_verified_images_as_files(site: Served, tmp_path: Path) -> None:
    www, base, _ = site
    image = build_image(base_tree(tmp_path / "base"), www, "base", fmt="squashfs")
    build_image(write_tree(tmp_path / "host", {"etc/hostname": b"h\n"}), www, "host",
                include_root=False)
    out = tmp_path / "out"
    out.mkdir()
    fetch_url(f"{base}base.squashfs,{base}host.tar.zst", out)
    assert sorted(os.listdir(out)) == ["base.squashfs", "etc"]
    assert (out / "base.squashfs").read_bytes() == image.read_bytes()
    assert (out / "etc/hostname").read_bytes() == b"h\n"


@pytest.mark.parametrize("fmt", ["squashfs", "erofs"])
def test_image_build_is_reproducible_and_keeps_metadata(tmp_path: Path, fmt: str) -> None:
    with mounted_tmpfs(tmp_path / "src") as src:
        make_full_tree(src)
        first, second = tmp_path / "a", tmp_path / "b"
        first.mkdir(), second.mkdir()
        a = build_image(src, first, "root", fmt=fmt)
        b = build_image(src, second, "root", fmt=fmt)
        assert a.read_bytes() == b.read_bytes()
        assert (first / "SHA256SUMS").read_text() == (second / "SHA256SUMS").read_text()
        manifest = json.loads((first / "root.manifest.json").read_text())
        assert (manifest["format"], manifest["size"]) == (fmt, a.stat().st_size)
        assert LayerKind.from_magic(a.read_bytes()[:4096]) is LayerKind(fmt)
        want = snapshot_tree(src)
        with loop_mounted(a, tmp_path / "mnt") as mnt:
            got = snapshot_tree(mnt)
    assert diff_trees(as_format_keeps(want, fmt), as_format_keeps(got, fmt)) == []


def as_format_keeps(tree: dict[str, Entry], fmt: str) -> dict[str, Entry]:
    """What a format can hold of a tree. erofs: one fixed time for every file
    (erofs-utils 1.5, see fsimage). squashfs: mtimes in whole seconds from 1970 to 2106,
    and no POSIX ACLs (it has none)."""
    out = {}
    for path, e in tree.items():
        if fmt == "squashfs" and path == "etc/hostname":
            e = dataclasses.replace(e, mtime_ns=-1)  # before 1970: squashfs wraps it
        if fmt == "erofs":
            e = dataclasses.replace(e, mtime_ns=None if e.mtime_ns is None else 0)
        else:
            mtime = e.mtime_ns
            e = dataclasses.replace(
                e, mtime_ns=None if mtime is None or mtime < 0 else mtime // 10**9,
                acl="", xattrs=tuple(x for x in e.xattrs if "posix_acl" not in x[0]))
        out[path] = e
    return out


@contextlib.contextmanager
def loop_mounted(image: Path, mnt: Path) -> Iterator[Path]:
    mnt.mkdir()
    subprocess.run([MOUNT, "-o", "ro,loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run([UMOUNT, str(mnt)], check=True)


EROFS_HEAD = bytes(1024) + (0xE0F5E1E2).to_bytes(4, "little")
MAGIC_CASES = [
    (b"hsqs" + bytes(100), LayerKind.SQUASHFS),
    (EROFS_HEAD, LayerKind.EROFS),
    (b"\x28\xb5\x2f\xfd" + bytes(2000), LayerKind.TAR),  # zstd: a tar layer's business
    (bytes(1024) + b"hsqs", LayerKind.TAR),  # squashfs' magic only counts at 0
    (b"", LayerKind.TAR),
]


@pytest.mark.unit
@pytest.mark.parametrize(("head", "kind"), MAGIC_CASES)
def test_layer_kind_from_magic(head: bytes, kind: LayerKind) -> None:
    assert LayerKind.from_magic(head) is kind


S, E, T = LayerKind.SQUASHFS, LayerKind.EROFS, LayerKind.TAR
ORDER_CASES = [
    ([S], None), ([S, E, T, T], None), ([T, T], None), ([E, S], None),
    ([T, S], "layer 2 (u2) is a squashfs image after tar layer 1"),
    ([S, T, T, E], "layer 4 (u4) is an erofs image after tar layer 2"),
]


@pytest.mark.unit
@pytest.mark.parametrize(("kinds", "message"), ORDER_CASES)
def test_image_layers_must_come_first(kinds: list[LayerKind], message: str | None) -> None:
    urls = [[f"u{i}"] for i in range(1, len(kinds) + 1)]
    if message is None:
        check_order(kinds, urls)
    else:
        with pytest.raises(UsageError, match=re.escape(message)):
            check_order(kinds, urls)


def fault_site(tmp_path: Path) -> dict[str, bytes]:
    """A squashfs root of a little over 3 MiB (incompressible), for the fault server."""
    www = tmp_path / "www-faults"
    www.mkdir()
    tree = base_tree(tmp_path / "base")
    (tree / "blob").write_bytes(os.urandom(3 << 20))
    build_image(tree, www, "base", fmt="squashfs")
    return {f"/{f.name}": f.read_bytes() for f in www.iterdir()}


def test_image_download_resumes_after_a_reset(node: Node, tmp_path: Path) -> None:
    files = fault_site(tmp_path)
    with faultserver.serve(files) as srv:
        # the probe, then the download: reset after 1 MiB, resumed
        srv.script("/base.squashfs", faultserver.OK, faultserver.reset(MIB))
        fetch_url(f"{srv.url}base.squashfs", node.target, image_mounts=str(node.layers),
                  retries=2)
    assert [h.range for h in srv.requests_for("/base.squashfs")] == [
        "bytes=0-4095", None, f"bytes={MIB}-"]
    assert (node.layers / "images/1-base.squashfs").read_bytes() == files["/base.squashfs"]
    assert mounts_under(node.target.parent)[str(node.target)] == "overlay"
    assert (node.target / "etc/os-release").read_bytes() == b"ID=test\n"


def test_image_flipped_in_transit_is_fetched_again_before_any_mount(node: Node,
                                                                    tmp_path: Path) -> None:
    files = fault_site(tmp_path)
    with faultserver.serve(files) as srv:
        srv.script("/base.squashfs", faultserver.OK, faultserver.flip(2 * MIB))
        fetch_url(f"{srv.url}base.squashfs", node.target, image_mounts=str(node.layers),
                  retries=1)
    # probe + bad download, then the root again: probe + good download
    assert srv.count("/base.squashfs") == 4
    assert srv.count("/SHA256SUMS") == 2
    assert list(mounts_under(node.layers)) == [str(node.layers), f"{node.layers}/lower/1"]
    assert (node.target / "blob").stat().st_size == 3 << 20
