"""`image build` leaves the build machine's identity out of the image (tmpfsboot.host.scrub),
without touching the user's tree; `--keep-identity` and `image layer` keep everything."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from support.trees import snapshot_tree

from tmpfsboot import cli
from tmpfsboot.boot.errors import UsageError
from tmpfsboot.host.aptsources import apt_mirror
from tmpfsboot.host.scrub import find_scrub

MACHINE_ID = "0123456789abcdef0123456789abcdef\n"
OLD_TIME_NS = 1_600_000_000 * 10**9

# Everything that names the build machine, or is apt's, in a root as debootstrap leaves it.
IDENTITY = ["etc/hostname", "etc/resolv.conf", "var/lib/dbus/machine-id",
            "var/lib/systemd/random-seed", "etc/ssh/ssh_host_ed25519_key",
            "etc/ssh/ssh_host_ed25519_key.pub", "etc/ssh/ssh_host_rsa_key"]
APT = ["var/lib/apt/lists/deb.example_debian_dists_bookworm_InRelease",
       "var/lib/apt/lists/deb.example_debian_dists_bookworm_main_binary-amd64_Packages",
       "var/cache/apt/pkgcache.bin", "var/cache/apt/archives/bash_5.2_amd64.deb"]
KEPT = ["etc/ssh/sshd_config", "var/lib/apt/lists/lock", "var/lib/apt/lists/partial",
        "var/cache/apt/archives/partial", "etc/hosts", "usr/share/doc/hostname"]


def make_root(root: Path) -> Path:
    """A root holding the build machine's identity, apt's lists, and what must stay."""
    for rel in [*IDENTITY, *APT, "etc/ssh/sshd_config", "var/lib/apt/lists/lock",
                "etc/hosts", "usr/share/doc/hostname"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"{rel} of buildhost\n")
    for rel in ("var/lib/apt/lists/partial", "var/cache/apt/archives/partial"):
        (root / rel).mkdir(parents=True, exist_ok=True)
    (root / "etc/machine-id").write_text(MACHINE_ID)
    (root / "etc/machine-id").chmod(0o444)
    os.chmod(root, 0o755)
    for dirpath, _, _ in os.walk(root):
        os.utime(dirpath, ns=(OLD_TIME_NS, OLD_TIME_NS))
    return root


def members(image: Path) -> dict[str, tarfile.TarInfo]:
    raw = subprocess.run(["zstd", "-dc", str(image)], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tf:
        return {m.name.rstrip("/"): m for m in tf.getmembers()}


@pytest.mark.integration
def test_build_from_leaves_identity_out_and_the_tree_untouched(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_root(tmp_path / "root")
    before = snapshot_tree(src)
    out = tmp_path / "new" / "images"  # created, as mkosi does
    assert cli.main(["image", "build", "--from", str(src), "--output", str(out),
                     "--name", "base"]) == 0
    assert snapshot_tree(src) == before
    got = members(out / "base.tar.zst")
    for rel in [*IDENTITY, *APT]:
        assert rel not in got, rel
    for rel in KEPT:
        assert rel in got, rel
    assert got["etc/machine-id"].size == 0 and got["etc/machine-id"].mode == 0o444
    # directory times are the tree's, not those of the scrubbing
    for rel in (".", "etc", "etc/ssh", "var/lib/apt/lists", "var/cache/apt/archives"):
        assert got[rel].mtime == OLD_TIME_NS // 10**9, rel
    removed = json.loads((out / "base.manifest.json").read_text())["build_identity_removed"]
    assert removed["emptied"] == ["/etc/machine-id"]
    assert sorted(removed["removed"]) == sorted("/" + p for p in IDENTITY)
    assert sorted(removed["left_out"]) == sorted("/" + p for p in APT)
    err = capsys.readouterr().err
    assert "emptied /etc/machine-id; removed /etc/hostname, /etc/resolv.conf" in err
    assert "left out 4 files of apt's lists and caches" in err
    assert str(tmp_path / "root") not in Path("/proc/self/mountinfo").read_text()


@pytest.mark.integration
def test_keep_identity_and_layers_archive_the_tree_as_it_is(tmp_path: Path) -> None:
    src = make_root(tmp_path / "root")
    out = tmp_path / "out"
    assert cli.main(["image", "build", "--from", str(src), "--output", str(out),
                     "--name", "kept", "--keep-identity"]) == 0
    assert cli.main(["image", "layer", "--from", str(src), "--output", str(out),
                     "--name", "layer"]) == 0
    for name in ("kept", "layer"):
        got = members(out / f"{name}.tar.zst")
        for rel in [*IDENTITY, *APT, *KEPT]:
            assert rel in got, (name, rel)
        assert got["etc/machine-id"].size == len(MACHINE_ID)
        manifest = json.loads((out / f"{name}.manifest.json").read_text())
        assert "build_identity_removed" not in manifest


@pytest.mark.integration
def test_symlinks_carry_no_identity_and_are_never_followed(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "host-var-lib"  # where an absolute link would lead on the host
    (outside / "dbus").mkdir(parents=True)
    (outside / "dbus/machine-id").write_text(MACHINE_ID)
    (root / "etc").mkdir(parents=True)
    (root / "var/lib").mkdir(parents=True)
    os.symlink("../run/systemd/resolve/stub-resolv.conf", root / "etc/resolv.conf")
    os.symlink(str(outside / "dbus"), root / "var/lib/dbus")
    os.symlink("/etc/machine-id", root / "etc/machine-id")
    assert not find_scrub(root)
    out = tmp_path / "out"
    assert cli.main(["image", "build", "--from", str(root), "--output", str(out),
                     "--name", "links"]) == 0
    got = members(out / "links.tar.zst")
    assert got["etc/resolv.conf"].issym() and got["var/lib/dbus"].issym()
    assert (outside / "dbus/machine-id").read_text() == MACHINE_ID


@pytest.mark.integration
def test_output_that_is_a_file_is_refused_and_nothing_is_left(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_root(tmp_path / "root")
    (tmp_path / "file").write_text("not a directory\n")
    assert cli.main(["image", "build", "--from", str(src), "--output",
                     str(tmp_path / "file"), "--name", "base"]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert "tmpfsboot-scrub" not in Path("/proc/self/mountinfo").read_text()


FAKE_DEBOOTSTRAP = """#!{python}
# Stands in for debootstrap (the real one runs in test_debian_vm.py, once per machine):
# records its arguments and leaves what debootstrap leaves of the build machine.
import json, os, sys
args = sys.argv[1:]
target = [a for a in args if not a.startswith("--")][1]
with open({record!r}, "w") as f:
    json.dump(args, f)
for rel, text in {files!r}.items():
    os.makedirs(os.path.dirname(os.path.join(target, rel)), exist_ok=True)
    with open(os.path.join(target, rel), "w") as f:
        f.write(text)
"""


@pytest.mark.integration
def test_debootstrap_uses_apts_mirror_and_its_root_is_scrubbed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        mirror = apt_mirror("bookworm")
    except UsageError:
        pytest.skip("this machine's apt names no mirror for bookworm")
    files = {"etc/hostname": "buildhost\n", "etc/resolv.conf": "nameserver 192.0.2.1\n",
             "etc/machine-id": MACHINE_ID, "etc/os-release": "ID=debian\n",
             APT[0]: "Release\n", APT[3]: "!<arch>\n"}
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    record = tmp_path / "argv.json"
    (fakebin / "debootstrap").write_text(FAKE_DEBOOTSTRAP.format(
        python=sys.executable, record=str(record), files=files))
    (fakebin / "debootstrap").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fakebin}:{os.environ['PATH']}")
    out = tmp_path / "out"
    assert cli.main(["image", "build", "--debootstrap", "bookworm", "--variant", "minbase",
                     "--output", str(out), "--name", "deb"]) == 0
    argv = json.loads(record.read_text())
    assert argv[-1] == mirror  # no --mirror: the one apt on this machine uses
    got = members(out / "deb.tar.zst")
    assert got["etc/machine-id"].size == 0
    assert "etc/os-release" in got
    for rel in ("etc/hostname", "etc/resolv.conf", APT[0], APT[3]):
        assert rel not in got, rel
    removed = json.loads((out / "deb.manifest.json").read_text())["build_identity_removed"]
    assert removed["removed"] == ["/etc/hostname", "/etc/resolv.conf"]
