"""initramfs-tools integration: installing the files, and what the real mkinitramfs builds."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from support.https import https_server

from tmpfsboot.boot.imagelayer import MODULES
from tmpfsboot.host.initramfs import (
    INSTALLED,
    build_initramfs,
    data_dir,
    install_files,
    remove_files,
    render_hook,
    set_conf,
)

SHELL_FILES = ["hooks/tmpfsboot", "scripts/tmpfs", "conf.d/tmpfsboot"]

SET_CONF_CASES = [
    ("MODULES=most\nBUSYBOX=auto\n", {"MODULES": "list"}, "MODULES=list\nBUSYBOX=auto\n"),
    ("MODULES=most\n", {"TMPFS": "y"}, "MODULES=most\nTMPFS=y\n"),
    ("# MODULES=dep\nMODULES=most\n", {"MODULES": "dep"}, "# MODULES=dep\nMODULES=dep\n"),
    ("", {"ROOTSIZE": "25%", "TMPFS": "y"}, "ROOTSIZE=25%\nTMPFS=y\n"),
]


@pytest.mark.unit
@pytest.mark.parametrize(("text", "values", "expected"), SET_CONF_CASES)
def test_set_conf(text: str, values: dict[str, str], expected: str) -> None:
    assert set_conf(text, values) == expected


@pytest.mark.unit
@pytest.mark.parametrize("rel", SHELL_FILES)
def test_shipped_shell_is_posix_and_shellcheck_clean(rel: str, tmp_path: Path) -> None:
    path = data_dir() / rel
    if rel.startswith("hooks/"):
        path = tmp_path / "hook"
        path.write_text(render_hook("/usr/bin/python3"))
    out = subprocess.run(["shellcheck", "-s", "sh", str(path)], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stdout


@pytest.mark.unit
def test_hook_names_the_python_that_runs_tmpfsboot() -> None:
    hook = render_hook("/opt/venv/bin/python")
    assert 'TMPFSBOOT_PYTHON="/opt/venv/bin/python"' in hook
    assert "@PYTHON@" not in hook


@pytest.mark.unit
def test_install_is_idempotent_and_remove_undoes_it(tmp_path: Path) -> None:
    (tmp_path / "scripts" / "tmpfs-top").mkdir(parents=True)
    (tmp_path / "scripts" / "tmpfs-top" / "mine").write_text("#!/bin/sh\n")
    first = install_files(tmp_path, python="/usr/bin/python3")
    assert sorted(str(p.relative_to(tmp_path)) for p in first) == sorted(INSTALLED)
    assert os.access(tmp_path / "hooks" / "tmpfsboot", os.X_OK)
    assert install_files(tmp_path, python="/usr/bin/python3") == []
    assert remove_files(tmp_path) == [tmp_path / rel for rel in INSTALLED]
    assert not any((tmp_path / rel).exists() for rel in INSTALLED)
    assert (tmp_path / "scripts" / "tmpfs-top" / "mine").exists()  # the admin's hook stays
    assert not (tmp_path / "scripts" / "tmpfs-bottom").exists()


@pytest.mark.unit
def test_install_into_missing_confdir_is_usage_error(tmp_path: Path) -> None:
    from tmpfsboot.boot.errors import UsageError

    with pytest.raises(UsageError, match="not a directory"):
        install_files(tmp_path / "absent")


def listing(initrd: Path) -> set[str]:
    out = subprocess.run(["lsinitramfs", str(initrd)], capture_output=True, text=True,
                         check=True)
    return set(out.stdout.split())


@pytest.mark.integration
def test_initramfs_carries_python_engine_and_tools(initrd: Path) -> None:
    files = listing(initrd)
    for want in ("usr/bin/python3.11", "usr/lib/python3.11/os.pyc",
                 "usr/lib/python3.11/encodings/utf_8.pyc", "usr/lib/python3.11/lib-dynload",
                 "usr/lib/python3.11/tmpfsboot/__init__.pyc",
                 "usr/lib/python3.11/tmpfsboot/boot/main.pyc",
                 "usr/lib/python3.11/tmpfsboot/boot/engine.pyc",
                 "usr/bin/zstd", "usr/bin/xz", "etc/ssl/certs/ca-certificates.crt",
                 "scripts/tmpfs", "conf/conf.d/tmpfsboot", "conf/conf.d/zz-tmpfsboot",
                 "scripts/tmpfs-top/tmpfsboot-test"):
        assert want in files, want
    python = [f for f in files if f.startswith("usr/lib/python3.11/")]
    assert not [f for f in python if f.endswith(".py")]  # sourceless
    assert "usr/lib/python3.11/unittest/__init__.pyc" not in files  # only what the engine needs
    assert "usr/bin/pixz" not in files  # it would drag in 30 MB of ICU data


@pytest.mark.integration
def test_initramfs_carries_the_image_layer_modules_the_kernel_lacks(
        initrd: Path, kernel_version: str) -> None:
    files = listing(initrd)
    modules = Path("/lib/modules", kernel_version)
    builtin = (modules / "modules.builtin").read_text().split()
    for name in MODULES:
        if any(b.endswith(f"/{name}.ko") for b in builtin):
            continue  # built in: nothing to carry
        found = [f for f in files if re.search(rf"/{name}\.ko(\.[a-z]+)?$", f)]
        assert found, f"{name}.ko missing"
    assert "usr/bin/mksquashfs" not in files  # the build tools stay on the host


@pytest.mark.integration
def test_initramfs_python_imports_the_engine_from_its_own_tree(initrd: Path,
                                                               tmp_path: Path) -> None:
    subprocess.run(["unmkinitramfs", str(initrd), str(tmp_path)], check=True)
    root = tmp_path / "main" if (tmp_path / "main").is_dir() else tmp_path
    code = ("import sys, tmpfsboot.boot.engine, tmpfsboot.boot.main, hashlib, ssl, lzma, bz2; "
            "print(sys.prefix, len(sys.modules))")
    out = subprocess.run(["chroot", str(root), "/usr/bin/python3.11", "-I", "-S", "-c", code],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("/usr ")


@pytest.mark.integration
def test_initramfs_engine_fetches_over_https_with_its_own_tools(initrd: Path,
                                                               tmp_path: Path) -> None:
    """The initramfs' python3.11, _ssl, _hashlib and zstd, chrooted into its own tree,
    fetch and verify a zstd image from an HTTPS server on 127.0.0.1."""
    subprocess.run(["unmkinitramfs", str(initrd), str(tmp_path / "initramfs")], check=True)
    root = tmp_path / "initramfs"
    root = root / "main" if (root / "main").is_dir() else root
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/motd").write_text("fetched inside the initramfs\n")
    www = tmp_path / "www"
    www.mkdir()
    tar = subprocess.run(["tar", "-C", str(tree), "-c", "."], check=True,
                         capture_output=True).stdout
    (www / "root.tar.zst").write_bytes(
        subprocess.run(["zstd", "-q"], input=tar, check=True, capture_output=True).stdout)
    (root / "target").mkdir()
    with https_server(www, tmp_path) as (base, ca):
        shutil.copy(ca, root / "test-ca.pem")
        code = ("import sys; from tmpfsboot.boot.cmdline import NetFacts, parse_root, "
                "resolve_layers; from tmpfsboot.boot.engine import fetch_root; "
                "from tmpfsboot.boot.policy import FetchPolicy, Verify; "
                "from tmpfsboot.boot.log import setup_logging; setup_logging(); "
                "fetch_root(resolve_layers(parse_root(sys.argv[1]), NetFacts()), '/target', "
                "FetchPolicy(Verify.CHECKSUM, retries=0, timeout=10))")
        out = subprocess.run(["chroot", str(root), "/usr/bin/python3.11", "-I", "-S", "-c",
                              code, base + "root.tar.zst"],
                             env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                  "SSL_CERT_FILE": "/test-ca.pem"},
                             capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert "in (zstd)" in out.stderr and "SHA-256 verified" in out.stderr
    assert (root / "target/etc/motd").read_text() == "fetched inside the initramfs\n"


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p).encode())
        if p.is_file() and not p.is_symlink():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.integration
def test_build_without_tmpfs_adds_nothing_and_leaves_etc_untouched(
        tmp_path: Path, kernel_version: str) -> None:
    before = tree_digest(Path("/etc/initramfs-tools"))
    plain = build_initramfs(tmp_path / "plain.img", kernel=kernel_version, modules="list",
                            enable=False)
    assert tree_digest(Path("/etc/initramfs-tools")) == before
    files = listing(plain)
    assert "usr/bin/python3.11" not in files
    assert "scripts/tmpfs" in files  # the boot script is there, inert without the engine


@pytest.mark.unit
def test_mirror_order_goes_into_the_config_and_a_bad_one_stops_the_build(
        tmp_path: Path) -> None:
    from tmpfsboot.boot.errors import UsageError
    from tmpfsboot.host.initramfs import prepare_confdir, stage_engine

    prepare_confdir(tmp_path / "conf", source=tmp_path / "none", mirrors="spread")
    assert "TMPFS_MIRRORS=spread\n" in (tmp_path / "conf/initramfs.conf").read_text()
    with pytest.raises(UsageError, match=r"TMPFS_MIRRORS=shuffle: expected ordered\|spread"):
        prepare_confdir(tmp_path / "conf2", source=tmp_path / "none", mirrors="shuffle")
    # what the hook runs with the admin's TMPFS_MIRRORS, before anything is staged
    with pytest.raises(UsageError, match="TMPFS_MIRRORS=shuffle"):
        stage_engine(tmp_path, mirrors="shuffle")
    # and the boot script hands the setting to the engine, as it does ROOTSIZE
    script = (data_dir() / "scripts/tmpfs").read_text()
    assert 'TMPFS_MIRRORS="${TMPFS_MIRRORS-}"' in script
