"""The Debian package: `make deb` builds it, lintian accepts it, apt installs it into a
fresh debootstrap chroot, update-initramfs there builds an initramfs that boots the demo
root in QEMU, and `dpkg --purge` leaves no file of it behind."""

from __future__ import annotations

import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import REPO
from support.chroot import Chroot, fresh_chroot

from tmpfsboot import __version__
from tmpfsboot.host.debootstrap import cached_root
from tmpfsboot.host.demo import build_demo_root
from tmpfsboot.host.dracut import render_module
from tmpfsboot.host.image import build_image
from tmpfsboot.host.initramfs import LIST_MODULES, PACKAGED_HOOK, render_hook
from tmpfsboot.host.serve import start_server
from tmpfsboot.host.vm import boot_vm, guest_url

pytestmark = pytest.mark.vm

HOOK = str(PACKAGED_HOOK)
# What a tmpfsboot initramfs holds and one without it must not (lsinitramfs paths).
TMPFSBOOT_FILES = ("usr/bin/python3.11", "scripts/tmpfs", "conf/conf.d/zz-tmpfsboot",
                   "usr/lib/python3.11/tmpfsboot/boot/main.pyc")


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """dist/tmpfsboot_VERSION_all.deb as `make deb` builds it (into a scratch DIST)."""
    out = tmp_path_factory.mktemp("deb")
    proc = subprocess.run(["make", "-C", str(REPO), "deb", f"DIST={out}",
                           f"DEBBUILD={out}/build"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    path = out / f"tmpfsboot_{__version__}_all.deb"
    assert path.is_file(), sorted(p.name for p in out.iterdir())
    return path


def lsinitramfs(initrd: Path) -> set[str]:
    out = subprocess.run(["lsinitramfs", str(initrd)], capture_output=True, text=True,
                         check=True).stdout
    return set(out.split())


def test_changelog_version_is_the_package_version() -> None:
    proc = subprocess.run(["dpkg-parsechangelog", "-l", str(REPO / "debian/changelog"),
                           "-S", "Version"], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == __version__


def test_lintian_reports_no_error_and_no_warning(deb: Path) -> None:
    proc = subprocess.run(["lintian", "--fail-on", "error,warning", str(deb)],
                          capture_output=True, text=True, check=False)
    tags = [line for line in proc.stdout.splitlines() if line[:2] in ("E:", "W:")]
    assert proc.returncode == 0 and not tags, proc.stdout + proc.stderr


def test_package_ships_hook_man_pages_and_trigger_but_nothing_in_etc(deb: Path) -> None:
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                             check=True).stdout.splitlines()
    modes = {line.split()[-1].removeprefix("."): line.split()[0] for line in listing}
    assert modes[HOOK] == "-rwxr-xr-x"
    assert modes["/usr/bin/tmpfsboot"] == "-rwxr-xr-x"
    for page in ("man8/tmpfsboot.8.gz", "man7/tmpfsboot-cmdline.7.gz",
                 "man5/tmpfsboot.conf.5.gz"):
        assert f"/usr/share/man/{page}" in modes
    assert not [p for p in modes if p.startswith("/etc/")]
    # dracut's module, where dracut looks; only included in an initramfs when asked for
    module = "/usr/lib/dracut/modules.d/90tmpfsboot"
    assert modes[f"{module}/module-setup.sh"] == "-rwxr-xr-x"
    assert modes[f"{module}/tmpfsroot.sh"] == "-rwxr-xr-x"
    triggers = subprocess.run(["dpkg-deb", "-I", str(deb), "triggers"], capture_output=True,
                              text=True, check=True).stdout
    assert "activate-noawait update-initramfs" in triggers.splitlines()


def test_packaged_hook_is_the_one_initramfs_install_writes(deb: Path, tmp_path: Path) -> None:
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp_path)], check=True)
    assert (tmp_path / HOOK.lstrip("/")).read_text() == render_hook("/usr/bin/python3")
    rendered = tmp_path / "rendered"
    render_module(rendered, python="/usr/bin/python3")
    packaged = tmp_path / "usr/lib/dracut/modules.d/90tmpfsboot"
    assert {f.name: f.read_text() for f in packaged.iterdir()} == {
        f.name: f.read_text() for f in rendered.iterdir()}


def test_pip_install_dot_still_gives_the_command_and_its_data(tmp_path: Path) -> None:
    # The other way in, for distributions without the package: a venv, no index (setuptools
    # and wheel from the system, python3-setuptools and python3-wheel).
    venv = tmp_path / "venv"
    subprocess.run(["/usr/bin/python3.11", "-m", "venv", "--system-site-packages", str(venv)],
                   check=True)
    proc = subprocess.run([str(venv / "bin/pip"), "install", "-q", "--no-index",
                           "--no-build-isolation", str(REPO)], capture_output=True, text=True,
                          check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    version = subprocess.run([str(venv / "bin/tmpfsboot"), "--version"], capture_output=True,
                             text=True, check=True).stdout
    assert version.strip() == f"tmpfsboot {__version__}"
    out = tmp_path / "man"
    subprocess.run([str(venv / "bin/python"), "-m", "tmpfsboot.cli.manpage", str(out)], check=True,
                   capture_output=True)
    assert (out / "tmpfsboot.8").is_file()
    hook = subprocess.run([str(venv / "bin/python"), "-c", "from tmpfsboot.host.initramfs import "
                           "data_dir; print(data_dir() / 'scripts' / 'tmpfs')"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert Path(hook).is_file()


@dataclass(frozen=True)
class Installed:
    """The chroot with tmpfsboot installed by apt, and what apt printed doing it."""

    chroot: Chroot
    apt_output: str


@pytest.fixture(scope="module")
def installed(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    tarball = cached_root()
    with fresh_chroot(tarball, tmp_path_factory.mktemp("chroot") / "root") as chroot:
        shutil.copyfile(deb, chroot.path(f"/tmp/{deb.name}"))
        chroot.run("apt-get", "update")  # a cached base's lists may be behind the mirror
        # man-db: the administrator's reader of the pages; apt resolves the rest from Depends.
        proc = chroot.run("apt-get", "install", "-y", "--no-install-recommends",
                          f"/tmp/{deb.name}", "man-db")
        yield Installed(chroot, proc.stdout)


def test_apt_installs_the_package_and_its_dependencies(installed: Installed) -> None:
    c = installed.chroot
    status = c.run("dpkg-query", "-W", "-f", "${Status}", "tmpfsboot").stdout
    assert status == "install ok installed"
    for dependency in ("python3.11", "zstd", "xz-utils", "gpgv", "initramfs-tools"):
        assert c.run("dpkg-query", "-W", "-f", "${Status}", dependency).stdout.endswith(
            " installed")
    assert "Processing triggers for initramfs-tools" in installed.apt_output


def test_command_and_manual_pages_work_in_the_chroot(installed: Installed) -> None:
    c = installed.chroot
    assert c.run("tmpfsboot", "--version").stdout.strip() == f"tmpfsboot {__version__}"
    assert c.run("man", "-w", "tmpfsboot").stdout.strip() == \
        "/usr/share/man/man8/tmpfsboot.8.gz"
    assert c.run("man", "-w", "7", "tmpfsboot-cmdline").stdout.strip().endswith(".7.gz")
    assert c.run("man", "-w", "5", "tmpfsboot.conf").stdout.strip().endswith(".5.gz")
    page = c.run("man", "-P", "cat", "tmpfsboot").stdout
    assert "tmpfsboot initramfs build" in page


def test_initramfs_install_refuses_a_second_hook_beside_the_package(installed: Installed) -> None:
    c = installed.chroot
    proc = c.run("tmpfsboot", "initramfs", "install", check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"tmpfsboot: error: {HOOK}: the tmpfsboot package's hook")
    assert not c.path("/etc/initramfs-tools/hooks/tmpfsboot").exists()


@dataclass(frozen=True)
class Initrds:
    """Initramfs images update-initramfs built in the chroot, before and after TMPFS=y."""

    default: Path
    tmpfs: Path


@pytest.fixture(scope="module")
def initrds(installed: Installed, kernel_version: str,
            tmp_path_factory: pytest.TempPathFactory) -> Initrds:
    """The host's kernel in the chroot (image and config copied, modules bound read-only);
    MODULES=list plus the QEMU NIC drivers, set as an administrator would, in /etc."""
    c = installed.chroot
    for name in (f"vmlinuz-{kernel_version}", f"config-{kernel_version}"):
        shutil.copyfile(Path("/boot") / name, c.path(f"/boot/{name}"))
    c.bind(Path("/lib/modules") / kernel_version, f"/lib/modules/{kernel_version}",
           readonly=True)
    c.path("/etc/initramfs-tools/conf.d/test").write_text("MODULES=list\n")
    with c.path("/etc/initramfs-tools/modules").open("a") as f:
        f.write("".join(f"{m}\n" for m in LIST_MODULES))
    out = tmp_path_factory.mktemp("chroot-initrd")
    initrd = c.path(f"/boot/initrd.img-{kernel_version}")
    c.run("update-initramfs", "-c", "-k", kernel_version)
    shutil.copyfile(initrd, out / "default.img")
    c.path("/etc/initramfs-tools/conf.d/tmpfsboot").write_text("TMPFS=y\n")
    c.run("update-initramfs", "-u", "-k", kernel_version)
    shutil.copyfile(initrd, out / "tmpfs.img")
    return Initrds(default=out / "default.img", tmpfs=out / "tmpfs.img")


def test_installing_changes_no_initramfs_until_tmpfs_y(initrds: Initrds) -> None:
    default, tmpfs = lsinitramfs(initrds.default), lsinitramfs(initrds.tmpfs)
    assert not [f for f in default if f in TMPFSBOOT_FILES or "python" in f], default
    for path in TMPFSBOOT_FILES:
        assert path in tmpfs


def test_initramfs_built_in_the_chroot_boots_the_demo_root(
        initrds: Initrds, kernel: Path, tmp_path: Path) -> None:
    nonce = secrets.token_hex(8)
    images = tmp_path / "images"
    images.mkdir()
    build_image(build_demo_root(tmp_path / "base", nonce=nonce), images, "base")
    with start_server(images, access_log=False) as server:
        result = boot_vm(kernel, initrds.tmpfs, append=[f"root={guest_url('base.tar.zst')}"],
                         server_port=server.port, hostname="node1", timeout=150.0)
    assert not result.timed_out, result.console[-3000:]
    assert f"NONCE: {nonce}" in result.console, result.console[-3000:]
    assert result.has_line("root:        tmpfs tmpfs rw")


def test_upgrade_rebuilds_the_initramfs_through_the_trigger(
        installed: Installed, initrds: Initrds, deb: Path, kernel_version: str) -> None:
    # dpkg -i over the installed version is the upgrade path: unpack, then configure.
    c = installed.chroot
    initrd = c.path(f"/boot/initrd.img-{kernel_version}")
    before = initrd.stat().st_mtime_ns
    proc = c.run("dpkg", "-i", f"/tmp/{deb.name}")
    assert "Processing triggers for initramfs-tools" in proc.stdout
    assert f"update-initramfs: Generating /boot/initrd.img-{kernel_version}" in proc.stdout
    assert initrd.stat().st_mtime_ns != before
    assert "usr/lib/python3.11/tmpfsboot/boot/main.pyc" in lsinitramfs(initrd)


def test_purge_leaves_no_file_and_rebuilds_the_initramfs_without_it(
        installed: Installed, initrds: Initrds, kernel_version: str) -> None:
    c = installed.chroot
    owned = [p for p in c.run("dpkg", "-L", "tmpfsboot").stdout.splitlines() if p.strip()]
    files = [p for p in owned if not c.path(p).is_dir()]
    assert HOOK in files and "/usr/bin/tmpfsboot" in files
    proc = c.run("dpkg", "--purge", "tmpfsboot")
    assert "Processing triggers for initramfs-tools" in proc.stdout
    assert f"update-initramfs: Generating /boot/initrd.img-{kernel_version}" in proc.stdout
    assert c.run("dpkg-query", "-W", "-f", "${Status}", "tmpfsboot", check=False).stdout in (
        "", "unknown ok not-installed")
    assert [p for p in files if c.path(p).exists() or c.path(p).is_symlink()] == []
    # byte-compiled modules (py3compile's, not in the file list) went as well
    for directory in ("/usr/lib/python3/dist-packages/tmpfsboot", "/usr/share/doc/tmpfsboot"):
        assert not c.path(directory).exists()
    # the trigger rebuilt the initramfs: TMPFS=y is still set, but the hook is gone
    rebuilt = lsinitramfs(c.path(f"/boot/initrd.img-{kernel_version}"))
    assert not [f for f in TMPFSBOOT_FILES if f in rebuilt]
