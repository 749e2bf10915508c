"""`tmpfsboot image build|layer`: tarball fidelity, manifest, SHA256SUMS, signatures."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.keys import throwaway_gpg_key
from support.mounts import mounted_tmpfs
from support.trees import LONG_TARGET, ODD_GID, ODD_UID, diff_trees, make_full_tree, snapshot_tree

from tmpfsboot import cli
from tmpfsboot.boot.contract import parse_sums
from tmpfsboot.boot.errors import TmpfsbootError, UsageError
from tmpfsboot.host.debootstrap import compose_debootstrap_argv, parse_packages
from tmpfsboot.host.image import (
    PAGE,
    build_image,
    check_name,
    parse_compression,
)

H1, H2 = "a" * 64, "b" * 64



# -- unit ---------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "with space", "x\ny",
                                  "root.manifest"])
def test_check_name_refuses_unsafe_names(name: str) -> None:
    with pytest.raises(UsageError, match="image name"):
        check_name(name)


@pytest.mark.unit
@pytest.mark.parametrize(("comp", "suffix", "argv0"), [
    ("zstd", ".tar.zst", "zstd"), ("xz", ".tar.xz", "pixz"), ("gzip", ".tar.gz", "pigz")])
def test_compression_names_suffix_and_parallel_compressor(comp: str, suffix: str,
                                                          argv0: str) -> None:
    c = parse_compression(comp)
    assert c.suffix == suffix
    assert c.compress_argv()[0] == argv0


@pytest.mark.unit
def test_compression_level_out_of_range_is_usage_error() -> None:
    with pytest.raises(UsageError, match="--level 30"):
        parse_compression("zstd").compress_argv(30)
    with pytest.raises(UsageError, match="'lz4'"):
        parse_compression("lz4")


@pytest.mark.unit
def test_compose_debootstrap_argv_passes_variant_include_and_mirror() -> None:
    argv = compose_debootstrap_argv("bookworm", Path("/t"), variant="minbase",
                            include=parse_packages("openssh-server, curl"),
                            mirror="http://deb.example/debian")
    assert argv == ["debootstrap", "--variant=minbase", "--include=openssh-server,curl",
                    "bookworm", "/t", "http://deb.example/debian"]
    assert compose_debootstrap_argv("sid", Path("/t"), variant=None, include=[], mirror=None) == [
        "debootstrap", "sid", "/t"]


@pytest.mark.unit
def test_parse_packages_refuses_option_injection() -> None:
    with pytest.raises(UsageError, match="--include"):
        parse_packages("curl,--foo")


# -- integration: the full tree ---------------------------------------------------------


@pytest.fixture(scope="module")
def full_tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A tmpfs holding every kind of member."""
    base = tmp_path_factory.mktemp("tree")
    with mounted_tmpfs(base / "src") as src:
        make_full_tree(src)
        yield src


@pytest.fixture(scope="module")
def built(full_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full tree built as root.tar.zst."""
    out = tmp_path_factory.mktemp("images")
    return build_image(full_tree, out, "root")


def tar_listing(image: Path) -> list[str]:
    out = subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--acls", "-tvf",
                          str(image)], check=True, capture_output=True)
    return out.stdout.decode().splitlines()


def tar_members(image: Path) -> list[tarfile.TarInfo]:
    raw = subprocess.run(["zstd", "-dc", str(image)], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=__import__("io").BytesIO(raw), mode="r:") as tf:
        return tf.getmembers()


@pytest.mark.integration
def test_build_writes_image_manifest_and_sums(built: Path) -> None:
    out = built.parent
    assert built == out / "root.tar.zst"
    assert sorted(p.name for p in out.iterdir()) == [
        "SHA256SUMS", "root.manifest.json", "root.tar.zst"]
    manifest = json.loads((out / "root.manifest.json").read_text())
    assert set(manifest) == {"name", "file", "format", "compression", "size", "sha256",
                             "unpacked_size", "entries"}
    assert manifest["name"] == "root"
    assert manifest["file"] == "root.tar.zst"
    assert manifest["compression"] == "zstd"
    assert manifest["size"] == built.stat().st_size
    assert manifest["format"] == "tar"
    subprocess.run(["sha256sum", "-c", "--strict", "SHA256SUMS"], cwd=out, check=True,
                   capture_output=True)
    assert (out / "SHA256SUMS").read_text() == f"{manifest['sha256']} *root.tar.zst\n"


@pytest.mark.integration
def test_tarball_keeps_modes_owners_links_devices(built: Path) -> None:
    # mode owner size date time name[ -> target| link to target]
    lines = {line.split(None, 5)[5]: line for line in tar_listing(built)}

    def line_of(name: str) -> str:
        return next(v for k, v in lines.items()
                    if k == name or k.startswith((name + " -> ", name + " link to ")))

    def mode_owner(name: str) -> list[str]:
        return line_of(name).split()[:2]

    assert mode_owner("usr/bin/suid") == ["-rwsr-xr-x", "0/0"]
    assert mode_owner("usr/bin/sgid") == ["-rwxr-sr-x", "0/0"]
    assert mode_owner("tmp/") == ["drwxrwxrwt", "0/0"]
    assert mode_owner("srv/shared/") == ["drwxrwsr-x", f"{ODD_UID + 1}/{ODD_GID + 1}"]
    assert mode_owner("srv/owned") == ["-rw-r--r--", f"{ODD_UID}/{ODD_GID}"]
    assert mode_owner("dev/null") == ["crw-rw-rw-", "0/0"]
    assert line_of("dev/null").split()[2] == "1,3"
    assert mode_owner("dev/loop9") == ["brw-rw----", "0/6"]
    assert line_of("dev/loop9").split()[2] == "7,9"
    assert mode_owner("var/spool/fifo") == ["prw--w----", "0/0"]
    assert line_of("etc/abs-link").endswith("etc/abs-link -> /etc/hostname")
    assert line_of("usr/rel-link").endswith("-> ../etc/hostname")
    assert line_of("usr/long-link").endswith(f"-> {LONG_TARGET}")
    # ACL'd entries are flagged with + in the mode, xattrs with *.
    assert line_of("srv/acl/file").split()[0] == "-rw-rw-r--+"
    assert line_of("srv/acl/").split()[0] == "drwxrwxr-x+"
    assert line_of("usr/bin/ping").split()[0] == "-rwxr-xr-x*"


@pytest.mark.integration
def test_tarball_names_are_relative_sorted_and_hard_links_once(built: Path) -> None:
    members = tar_members(built)
    names = [m.name for m in members]
    # tarfile strips the trailing slash; the root itself stays as ".".
    assert names[0] in (".", "./")
    assert not any(n.startswith(("/", "./")) for n in names[1:])
    assert not any(".." in n.split("/") for n in names)
    links = {m.name: m.linkname for m in members if m.islnk()}
    regular = {m.name for m in members if m.isreg()}
    # One inode with three names: one file member, two link members to it.
    text_names = {"usr/lib/text.txt", "etc/text-link", "srv/text-link2"}
    assert len(text_names & regular) == 1
    assert {links[n] for n in text_names - regular} == text_names & regular
    assert links.get("usr/bin/suid-link") == "usr/bin/suid" or links.get(
        "usr/bin/suid") == "usr/bin/suid-link"
    # GNU tar --sort=name: each directory's entries in byte order, depth first.
    for parent in {n.rsplit("/", 1)[0] for n in names if "/" in n}:
        children = [n for n in names if n.rsplit("/", 1)[0] == parent and "/" in n]
        assert children == sorted(children, key=lambda s: s.encode())


@pytest.mark.integration
def test_tarball_carries_xattrs_and_acls_as_pax_records(built: Path) -> None:
    by_name = {m.name: m for m in tar_members(built)}
    ping = by_name["usr/bin/ping"].pax_headers
    assert "SCHILY.xattr.security.capability" in ping
    host = by_name["etc/hostname"].pax_headers
    assert host["SCHILY.xattr.trusted.tmpfsboot"] == "trusted value"
    assert "SCHILY.xattr.user.tmpfsboot" in host
    assert "SCHILY.xattr.security.selinux" in host
    assert f"user:{ODD_UID}:rw-" in by_name["srv/acl/file"].pax_headers["SCHILY.acl.access"]
    acl_dir = by_name["srv/acl"].pax_headers
    assert f"group:{ODD_GID}:r-x" in acl_dir["SCHILY.acl.default"]
    # The raw values too: numeric ids, independent of the build host's user names.
    assert "SCHILY.xattr.system.posix_acl_access" in by_name["srv/acl/file"].pax_headers
    assert "SCHILY.xattr.system.posix_acl_default" in acl_dir
    # No pid or atime records: the same tree gives the same bytes.
    assert not any(k in ("atime", "ctime") for m in by_name.values() for k in m.pax_headers)


@pytest.mark.integration
def test_manifest_figures_match_the_tree_and_a_real_tmpfs(built: Path, full_tree: Path,
                                                          tmp_path: Path) -> None:
    manifest = json.loads((built.parent / "root.manifest.json").read_text())
    assert manifest["entries"] == len(tar_members(built))
    # Independent count: pages of each inode's content once, a page per directory.
    seen: set[int] = set()
    want = PAGE  # the root directory
    for dirpath, dirnames, filenames in os.walk(full_tree):
        want += PAGE * len(dirnames)
        for name in filenames + [d for d in dirnames if os.path.islink(
                os.path.join(dirpath, d))]:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode) and st.st_ino not in seen:
                seen.add(st.st_ino)
                want += -(-st.st_size // PAGE) * PAGE
            elif stat.S_ISLNK(st.st_mode) and len(os.readlink(
                    os.path.join(dirpath, name))) > 60:
                want += PAGE
    # os.walk lists a symlink to a directory among dirnames: not a directory of ours.
    want -= PAGE * sum(1 for dp, dn, _ in os.walk(full_tree) for d in dn
                       if os.path.islink(os.path.join(dp, d)))
    assert manifest["unpacked_size"] == want
    # And GNU tar's extraction into an exactly sized tmpfs fits, whatever tmpfs counts.
    size = manifest["unpacked_size"]
    with mounted_tmpfs(tmp_path / "fit", size=str(size)) as fit:
        subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--acls", "-xpf",
                        str(built), "-C", str(fit)], check=True)
        used = os.statvfs(fit)
        assert (used.f_blocks - used.f_bfree) * used.f_frsize <= size


@pytest.mark.integration
def test_gnu_tar_extraction_reproduces_the_tree_exactly(built: Path, full_tree: Path,
                                                        tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "x") as dest:
        subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--acls",
                        "--numeric-owner", "-xpf", str(built), "-C", str(dest)], check=True)
        problems = diff_trees(snapshot_tree(full_tree), snapshot_tree(dest))
    assert problems == []


@pytest.mark.integration
def test_same_tree_builds_byte_identical_image(built: Path, full_tree: Path,
                                               tmp_path: Path) -> None:
    again = build_image(full_tree, tmp_path, "root")
    assert again.read_bytes() == built.read_bytes()


# -- integration: SHA256SUMS, signatures, other compressions --------------------------------


@pytest.fixture
def small_tree(tmp_path: Path) -> Path:
    src = tmp_path / "small"
    (src / "etc").mkdir(parents=True)
    (src / "etc/hostname").write_text("host1\n")
    return src


@pytest.mark.integration
@pytest.mark.parametrize("compression", ["xz", "gzip"])
def test_other_compressions_use_their_suffix_and_unpack(small_tree: Path, tmp_path: Path,
                                                        compression: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    image = build_image(small_tree, out, "host1", compression=compression)
    assert image.name == "host1" + parse_compression(compression).suffix
    manifest = json.loads((out / "host1.manifest.json").read_text())
    assert (manifest["compression"], manifest["file"]) == (compression, image.name)
    assert "etc/hostname" in "\n".join(tar_listing(image))


@pytest.mark.integration
def test_sums_cover_every_image_and_rebuild_replaces_its_line(small_tree: Path,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    build_image(small_tree, out, "zeta", compression="gzip")
    build_image(small_tree, out, "alpha")
    first = parse_sums((out / "SHA256SUMS").read_text())
    (small_tree / "etc/hostname").write_text("changed\n")
    build_image(small_tree, out, "alpha")
    text = (out / "SHA256SUMS").read_text()
    sums = parse_sums(text)
    assert list(sums) == ["alpha.tar.zst", "zeta.tar.gz"]
    assert sums["zeta.tar.gz"] == first["zeta.tar.gz"]
    assert sums["alpha.tar.zst"] != first["alpha.tar.zst"]
    assert len(text.splitlines()) == 2
    subprocess.run(["sha256sum", "-c", "--strict", "SHA256SUMS"], cwd=out, check=True,
                   capture_output=True)


@pytest.mark.integration
def test_signed_sums_verify_with_gpgv_after_every_update(small_tree: Path,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with throwaway_gpg_key() as key:
        for name in ("root", "host1"):
            build_image(small_tree, out, name, sign=key.fingerprint,
                        gpg_homedir=key.homedir)
            subprocess.run(["gpgv", "--keyring", str(key.keyring), str(out / "SHA256SUMS.gpg"),
                            str(out / "SHA256SUMS")], check=True, capture_output=True)
        assert b"host1.tar.zst" in (out / "SHA256SUMS").read_bytes()
        # An unsigned update must not leave a signature of the old SHA256SUMS behind.
        build_image(small_tree, out, "other")
        assert not (out / "SHA256SUMS.gpg").exists()


@pytest.mark.integration
def test_failed_build_leaves_no_half_image_and_sums_unchanged(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "small").write_text("x\n")
    with mounted_tmpfs(tmp_path / "out", size="2m") as out:
        build_image(src, out, "ok")
        sums_before = (out / "SHA256SUMS").read_text()
        (src / "random").write_bytes(os.urandom(4 << 20))  # cannot fit in 2 MiB
        with pytest.raises(TmpfsbootError, match=r"big\.tar\.zst: cannot write: No space"):
            build_image(src, out, "big")
        assert sorted(p.name for p in out.iterdir()) == [
            "SHA256SUMS", "ok.manifest.json", "ok.tar.zst"]
        assert (out / "SHA256SUMS").read_text() == sums_before


# -- the command line ---------------------------------------------------------------------


@pytest.mark.integration
def test_cli_layer_builds_into_the_same_sums(small_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    assert cli.main(["image", "build", "--from", str(small_tree), "--output", str(out),
                     "--name", "root"]) == 0
    assert cli.main(["image", "layer", "--from", str(small_tree), "--output", str(out),
                     "--name", "host-node1", "--compression", "gzip", "--level", "1"]) == 0
    assert set(parse_sums((out / "SHA256SUMS").read_text())) == {
        "root.tar.zst", "host-node1.tar.gz"}


@pytest.mark.integration
@pytest.mark.parametrize("argv", [
    ["image", "build", "--from", "{src}", "--output", "{out}", "--name", "../x"],
    ["image", "build", "--from", "{src}", "--output", "{out}", "--name", "r", "--variant",
     "minbase"],
    ["image", "build", "--from", "{src}", "--debootstrap", "bookworm", "--output", "{out}",
     "--name", "r"],
    ["image", "build", "--from", "{src}/missing", "--output", "{out}", "--name", "r"],
    ["image", "build", "--from", "{src}", "--output", "{src}/etc", "--name", "r"],
    ["image", "layer", "--from", "{src}", "--output", "{out}", "--name", "r",
     "--compression", "lz4"],
])
def test_cli_bad_input_exits_2(small_tree: Path, tmp_path: Path, argv: list[str],
                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    args = [a.format(src=small_tree, out=out) for a in argv]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("tmpfsboot: error:") and len(err.strip().splitlines()) == 1
    assert list(out.iterdir()) == []


@pytest.mark.integration
def test_debootstrap_failure_names_it_and_removes_scratch_root(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A loopback port nobody listens on: debootstrap runs for real and fails fast,
    # without reaching any network.
    out = tmp_path / "out"
    out.mkdir()
    code = cli.main(["image", "build", "--debootstrap", "bookworm", "--variant", "minbase",
                     "--include", "curl", "--mirror", "http://127.0.0.1:9/debian",
                     "--output", str(out), "--name", "deb"])
    assert code == 1
    assert "debootstrap" in capsys.readouterr().err
    assert list(out.iterdir()) == []


@pytest.mark.integration
def test_layer_leaves_the_root_directory_alone(tmp_path: Path) -> None:
    # A per-host tree is typically a mktemp -d directory (0700): a node's / must not
    # become 0700 because a layer was built from one.
    host = tmp_path / "host"
    host.mkdir(mode=0o700)
    for name in ("-dash", "etc", "B-upper"):
        (host / name).mkdir()
    (host / "etc/hostname").write_text("node1\n")
    out = tmp_path / "out"
    out.mkdir()
    assert cli.main(["image", "layer", "--from", str(host), "--output", str(out),
                     "--name", "host1"]) == 0
    names = [m.name for m in tar_members(out / "host1.tar.zst")]
    assert names == ["-dash", "B-upper", "etc", "etc/hostname"]
    manifest = json.loads((out / "host1.manifest.json").read_text())
    assert manifest["entries"] == 4
    assert manifest["unpacked_size"] == 3 * PAGE + PAGE


@pytest.mark.integration
def test_empty_layer_is_a_valid_empty_archive(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    image = build_image(tmp_path / "empty", tmp_path, "nothing", include_root=False)
    assert tar_members(image) == []
    assert json.loads((tmp_path / "nothing.manifest.json").read_text())["entries"] == 0


FAKE_DEBOOTSTRAP = """#!{python}
# Stands in for debootstrap (no Debian mirror is reachable from tests): records its
# arguments, makes a tiny root, and leaves a file system mounted in it, as a failed or
# interrupted debootstrap can leave /proc.
import json, os, subprocess, sys
args = sys.argv[1:]
target = [a for a in args if not a.startswith("--")][1]
with open({record!r}, "w") as f:
    json.dump(args, f)
os.makedirs(os.path.join(target, "etc"))
with open(os.path.join(target, "etc/os-release"), "w") as f:
    f.write("ID=debian\\n")
os.makedirs(os.path.join(target, "proc"))
subprocess.run(["mount", "-t", "tmpfs", "leftover", os.path.join(target, "proc")], check=True)
with open(os.path.join(target, "proc/leftover"), "w") as f:
    f.write("must survive and not be archived\\n")
"""


@pytest.mark.integration
def test_debootstrap_root_is_built_and_scratch_removed_without_deleting_through_mounts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    record = tmp_path / "argv.json"
    script = fakebin / "debootstrap"
    script.write_text(FAKE_DEBOOTSTRAP.format(python=sys.executable, record=str(record)))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fakebin}:{os.environ['PATH']}")
    out = tmp_path / "out"
    out.mkdir()
    assert cli.main(["image", "build", "--debootstrap", "bookworm", "--variant", "minbase",
                     "--include", "openssh-server,curl", "--mirror",
                     "http://127.0.0.1:9/debian", "--output", str(out), "--name", "deb"]) == 0
    argv = json.loads(record.read_text())
    assert argv[:3] == ["--variant=minbase", "--include=openssh-server,curl", "bookworm"]
    assert argv[4] == "http://127.0.0.1:9/debian"
    scratch = Path(argv[3])
    assert scratch.parent == out and scratch.name.startswith(".deb.debootstrap.")
    names = [m.name for m in tar_members(out / "deb.tar.zst")]
    # --one-file-system: the mount point is kept, what is mounted there is not.
    assert names == ["./", "etc", "etc/os-release", "proc"] or names == [
        ".", "etc", "etc/os-release", "proc"]
    assert not scratch.exists()
    assert str(scratch) not in Path("/proc/self/mountinfo").read_text()
    assert sorted(p.name for p in out.iterdir()) == [
        "SHA256SUMS", "deb.manifest.json", "deb.tar.zst"]


@pytest.mark.integration
@pytest.mark.parametrize("compression", ["zstd", "xz", "gzip"])
def test_engine_recognises_each_compression_by_magic(small_tree: Path, tmp_path: Path,
                                                     compression: str) -> None:
    # The engine goes by magic bytes, not by name: what we write must be what it sees.
    from tmpfsboot.boot.compression import MAGIC_SIZE, Compression
    image = build_image(small_tree, tmp_path, "root", compression=compression)
    head = image.read_bytes()[:MAGIC_SIZE]
    assert Compression.from_magic(head) is parse_compression(compression).compression


@pytest.mark.integration
def test_unknown_signing_key_fails_before_building(small_tree: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with throwaway_gpg_key() as key:
        assert cli.main(["image", "build", "--from", str(small_tree), "--output", str(out),
                         "--name", "root", "--sign", "0xDEADBEEFDEADBEEF", "--gpg-homedir",
                         str(key.homedir)]) == 2
    assert "--sign 0xDEADBEEFDEADBEEF: no such secret key" in capsys.readouterr().err
    assert list(out.iterdir()) == []
