"""The dracut module: its shell, install/remove, the private build, dracut's network facts."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import faultserver
from support.keys import throwaway_gpg_key
from support.vm import HOSTNAME, TIMEOUT, Images, tmpfsboot_lines

from tmpfsboot.boot.dracutnet import parse_dhcpopts, parse_override
from tmpfsboot.boot.errors import UsageError
from tmpfsboot.boot.main import SHELL_EXIT, Node, main, read_net_conf
from tmpfsboot.boot.netconf import NetConf
from tmpfsboot.host.dracut import (
    DRACUT_BASEDIR,
    MODULE_NAME,
    build_dracut,
    install_module,
    module_source,
    private_basedir,
    remove_module,
    render_conf,
)
from tmpfsboot.host.image import build_image
from tmpfsboot.host.serve import start_server
from tmpfsboot.host.vm import BootResult, boot_vm

# What dracut's dhclient-script saved in a QEMU guest (user-mode DHCP, hostname=node7):
# the shell's `set` output, new_* lines only.
QEMU_DHCPOPTS = """\
new_broadcast_address=10.0.2.255
new_dhcp_lease_time=86400
new_dhcp_message_type=5
new_dhcp_server_identifier=10.0.2.2
new_domain_name_servers=10.0.2.3
new_host_name=node7
new_ip_address=10.0.2.15
new_network_number=10.0.2.0
new_routers=10.0.2.2
new_subnet_mask=255.255.255.0
"""

PARSE_CASES = [
    (QEMU_DHCPOPTS, NetConf(device="eth0", address="10.0.2.15", hostname="node7",
                            nameservers=("10.0.2.3",))),
    # dash quotes every value; several servers, a domain and a search list
    ("new_ip_address='192.0.2.7'\nnew_domain_name='lab.example'\n"
     "new_domain_name_servers='192.0.2.1 192.0.2.2'\nnew_domain_search='lab.example example.org'\n"
     "new_host_name='n1.lab.example'\nnew_routers='192.0.2.254 192.0.2.253'\n"
     "new_filename='pxelinux.0'\n",
     NetConf(device="eth0", address="192.0.2.7", hostname="n1.lab.example",
             domain="lab.example", nameservers=("192.0.2.1", "192.0.2.2"),
             search=("lab.example", "example.org"))),
    # not new_*, not assignments, an unbalanced quote, empty values: ignored
    ("old_ip_address=1.2.3.4\ngarbage\nnew_host_name='broken\nnew_domain_name=\n",
     NetConf(device="eth0")),
    ("", NetConf(device="eth0")),
]


@pytest.mark.unit
@pytest.mark.parametrize(("text", "expected"), PARSE_CASES)
def test_parse_dhcpopts(text: str, expected: NetConf) -> None:
    assert parse_dhcpopts(text, device="eth0") == expected


@pytest.mark.unit
def test_glue_chooses_dracut_facts_over_initramfs_tools_files(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "tmp").mkdir()
    (tmp_path / "run" / "net-eth0.conf").write_text("DEVICE='eth0'\nHOSTNAME='itools'\n")
    (tmp_path / "tmp" / "dhclient.eth0.dhcpopts").write_text(QEMU_DHCPOPTS)
    node = Node(run=str(tmp_path / "run"), tmp=str(tmp_path / "tmp"))
    assert read_net_conf(node, "eth0", source="dracut").hostname == "node7"
    assert read_net_conf(node, "eth0").hostname == "itools"
    # a static ip=: the fields ifup kept; nothing at all: no facts, not initramfs-tools'
    (tmp_path / "tmp" / "net.eth1.override").write_text(STATIC_OVERRIDE)
    assert read_net_conf(node, "eth1", source="dracut").address == "192.0.2.9"
    assert read_net_conf(node, "eth2", source="dracut") == NetConf(device="eth2")


# What ifup kept of ip=192.0.2.9::192.0.2.1:255.255.255.0:n9.lab.example:eth1:none:::192.0.2.53
STATIC_OVERRIDE = """ip="192.0.2.9"
gw="192.0.2.1"
mask="255.255.255.0"
hostname="n9.lab.example"
dns1="192.0.2.53"
"""

OVERRIDE_CASES = [
    (STATIC_OVERRIDE, NetConf(device="eth1", address="192.0.2.9", hostname="n9.lab.example",
                              domain="lab.example", nameservers=("192.0.2.53",))),
    ('ip="192.0.2.9"\nhostname="n9"\ngarbage\nmtu="broken\n',
     NetConf(device="eth1", address="192.0.2.9", hostname="n9")),
    ("", NetConf(device="eth1")),
]


@pytest.mark.unit
@pytest.mark.parametrize(("text", "expected"), OVERRIDE_CASES)
def test_parse_override_of_static_ip(text: str, expected: NetConf) -> None:
    assert parse_override(text, device="eth1") == expected


@pytest.mark.integration
def test_x_while_waiting_exits_for_the_glue_shell_after_dracut_facts_named_the_layer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for d in ("etc", "run", "tmp", "sys", "root"):
        (tmp_path / d).mkdir()
    (tmp_path / "tmp" / "dhclient.eth0.dhcpopts").write_text(QEMU_DHCPOPTS)
    node = Node(etc=str(tmp_path / "etc"), run=str(tmp_path / "run"), tmp=str(tmp_path / "tmp"),
                sys=str(tmp_path / "sys"), cmdline=str(tmp_path / "cmdline"),
                set_hostname=False)
    monkeypatch.setenv("TMPFSBOOT_NETCONF", "dracut")
    monkeypatch.setenv("DEVICE", "eth0")
    master, slave = os.openpty()
    os.write(master, b"x")
    monkeypatch.setattr(sys, "stdin", os.fdopen(slave, "rb", buffering=0))
    try:
        with faultserver.serve({"/host-node7.tar.zst": b"never served"}) as server:
            server.script("/SHA256SUMS", faultserver.error(503, retry_after="2"))
            Path(node.cmdline).write_text(f"root={server.url}host-%hostname.tar.zst\n")
            assert main(["fetch", str(tmp_path / "root")], node=node) == SHELL_EXIT
        # %hostname came from dracut's dhcpopts; the 503 made the engine wait, x ended it
        assert [h.status for h in server.requests_for("/SHA256SUMS")] == [503]
        error = (tmp_path / "run" / "tmpfsboot" / "error").read_text()
        assert "Spawning shell" in error
    finally:
        os.close(master)
        sys.stdin.close()


SHELL = sorted(p.name for p in module_source().glob("*.sh"))


@pytest.mark.unit
@pytest.mark.parametrize("name", SHELL)
def test_module_shell_is_shellcheck_clean(name: str) -> None:
    # module-setup.sh is sourced by dracut (bash); the rest runs in the initramfs' /bin/sh
    shell = "bash" if name == "module-setup.sh" else "sh"
    out = subprocess.run(["shellcheck", "-x", "-s", shell, name], cwd=module_source(),
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout


@pytest.mark.unit
def test_install_is_idempotent_fills_in_python_and_remove_undoes_it(tmp_path: Path) -> None:
    first = install_module(tmp_path)
    assert sorted(p.name for p in first) == sorted(p.name for p in module_source().iterdir())
    setup = tmp_path / MODULE_NAME / "module-setup.sh"
    assert os.access(setup, os.X_OK)
    assert "@PYTHON@" not in setup.read_text()
    assert install_module(tmp_path) == []
    assert len(remove_module(tmp_path)) == len(first)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.unit
def test_install_into_missing_modules_dir_is_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="dracut-core"):
        install_module(tmp_path / "absent")


@pytest.mark.unit
def test_private_basedir_links_dracut_and_adds_the_module(tmp_path: Path) -> None:
    base = private_basedir(tmp_path / "base")
    assert (base / "dracut-init.sh").resolve() == (DRACUT_BASEDIR / "dracut-init.sh").resolve()
    assert (base / "modules.d" / "99base").is_symlink()
    ours = base / "modules.d" / MODULE_NAME
    assert ours.is_dir() and not ours.is_symlink()
    assert not (DRACUT_BASEDIR / "modules.d" / MODULE_NAME).exists()


@pytest.mark.unit
def test_render_conf_checks_values_before_dracut_runs(tmp_path: Path) -> None:
    assert render_conf(rootsize="2g", keyring=None, scripts=tmp_path) == (
        f"ROOTSIZE=2g\nTMPFS_SCRIPTS={tmp_path}\n")
    with pytest.raises(UsageError, match="no such file"):
        render_conf(rootsize=None, keyring=tmp_path / "nokey.gpg", scripts=None)


@pytest.mark.unit
@pytest.mark.parametrize("options", [
    ["--generator", "dracut", "--modules", "most"],  # initramfs-tools' own option
    ["--systemd"],  # a dracut flavour, without --generator dracut
    ["--generator", "mkinitcpio"],
])
def test_build_rejects_options_of_the_other_generator(options: list[str], tmp_path: Path) -> None:
    out = tmp_path / "initrd.img"
    proc = subprocess.run([sys.executable, "-m", "tmpfsboot", "initramfs", "build", "-o",
                           str(out), *options], capture_output=True, text=True, check=False)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 3 and "Traceback" not in proc.stderr
    assert not out.exists()


def tree_digest(root: Path) -> str:
    """A digest of every path, mode and content under ROOT (absent: empty)."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")) if root.exists() else []:
        h.update(str(path).encode())
        if path.is_file() and not path.is_symlink():
            h.update(path.read_bytes())
    return h.hexdigest()


def lsinitrd(initrd: Path) -> set[str]:
    out = subprocess.run(["lsinitrd", "--", str(initrd)], capture_output=True, text=True,
                         errors="replace",
                         check=True)
    return {line.split(" -> ")[0].split()[-1] for line in out.stdout.splitlines()
            if line.startswith(("-", "d", "l"))}


@pytest.mark.integration
def test_dracut_initramfs_carries_engine_and_leaves_dracut_config_untouched(
        dracut_initrd: Path) -> None:
    files = lsinitrd(dracut_initrd)
    for want in ("usr/bin/python3.11", "usr/lib/python3.11/os.pyc",
                 "usr/lib/python3.11/tmpfsboot/boot/main.pyc", "usr/bin/zstd",
                 "usr/sbin/tmpfsroot", "usr/lib/dracut/hooks/cmdline/90-parse-tmpfsboot.sh",
                 "usr/sbin/dhclient"):
        assert want in files, want
    # the extension modules' libraries, which dracut-install does not follow by itself
    assert any(f.endswith("/libbz2.so.1.0") for f in files)


@pytest.mark.integration
def test_dracut_build_without_tmpfsboot_adds_nothing(tmp_path: Path, kernel_version: str) -> None:
    before = [tree_digest(Path("/etc/dracut.conf.d")), tree_digest(DRACUT_BASEDIR)]
    plain = build_dracut(tmp_path / "plain.img", kernel=kernel_version, enable=False)
    assert [tree_digest(Path("/etc/dracut.conf.d")), tree_digest(DRACUT_BASEDIR)] == before
    files = lsinitrd(plain)
    assert "usr/bin/python3.11" not in files and "usr/sbin/tmpfsroot" not in files


# ----- boots of a real kernel with a dracut-built initramfs -----

# A failed boot must end by itself: no shell on the console, dracut reboots (QEMU's
# -no-reboot turns that into an exit). Without rd.emergency= dracut would halt.
ON_FAILURE = ("rd.shell=0", "rd.emergency=reboot")


@pytest.fixture(scope="module")
def signed_images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Images, Path]]:
    """(the VM tests' images, base re-signed with a throw-away key; that key's keyring)."""
    tmp = tmp_path_factory.mktemp("dracut-images")
    with throwaway_gpg_key() as key:
        images = Images(tmp)
        build_image(tmp / "base", images.dir, "base", sign=key.fingerprint,
                    gpg_homedir=key.homedir)
        keyring = tmp / "keyring.gpg"
        keyring.write_bytes(key.keyring.read_bytes())
        yield images, keyring


@pytest.fixture(scope="module")
def dracut_initrd(tmp_path_factory: pytest.TempPathFactory, kernel_version: str,
                  test_scripts: Path, signed_images: tuple[Images, Path]) -> Path:
    """dracut without systemd (network-legacy), tmpfsboot with the keyring and test hooks."""
    out = tmp_path_factory.mktemp("dracut") / "initrd.img"
    return build_dracut(out, kernel=kernel_version, keyring=signed_images[1],
                        scripts=test_scripts)


@pytest.fixture(scope="module")
def dracut_systemd_initrd(tmp_path_factory: pytest.TempPathFactory, kernel_version: str,
                          test_scripts: Path, signed_images: tuple[Images, Path]) -> Path:
    """dracut with its systemd module, tmpfsboot with the keyring and test hooks."""
    out = tmp_path_factory.mktemp("dracut-systemd") / "initrd.img"
    return build_dracut(out, kernel=kernel_version, keyring=signed_images[1],
                        scripts=test_scripts, systemd=True)


def boot(kernel: Path, initrd: Path, images_dir: Path, *append: str) -> BootResult:
    # a --no-hostonly dracut initramfs waits for udev to settle every driver it carries:
    # under TCG on a shared machine that took 70-170 s of guest time before DHCP
    with start_server(images_dir, access_log=False) as server:
        result = boot_vm(kernel, initrd, append=[*append, *ON_FAILURE], server_port=server.port,
                         hostname=HOSTNAME, timeout=TIMEOUT * 3)
    assert not result.timed_out, result.console[-3000:]
    return result


def assert_layered_boot(result: BootResult, images: Images) -> None:
    """The node reached the image's init with the %hostname, %arch and %mac layers."""
    assert f"NONCE: {images.nonce}" in result.console, "\n".join(tmpfsboot_lines(result))
    assert result.has_line(f"layers:      base common host-{HOSTNAME} ")
    assert result.has_line(f"hostname:    {HOSTNAME}")  # from dracut's DHCP facts
    assert result.has_line("root:        tmpfs tmpfs rw")
    assert result.has_line("Fetching layer 4/4: http://10.0.2.100/node-amd64-52-54-00-12-34-56")
    # /run, with the engine's log, moved into the booted root
    assert result.has_line("boot log:    /run/tmpfsboot/boot.jsonl")
    hooks = re.findall(r"TESTHOOK (tmpfs-\w+)", result.console)
    assert hooks == ["tmpfs-top", "tmpfs-premount", "tmpfs-bottom"], result.console[-3000:]


LAYERS = ("base", "common", "host-%hostname", "node-%arch-%mac")


@pytest.mark.vm
def test_dracut_boot_without_systemd_reaches_image_init_with_hostname_layer(
        kernel: Path, dracut_initrd: Path, signed_images: tuple[Images, Path]) -> None:
    images, _ = signed_images
    # common and the host layers are unsigned: checksums only (the keyring's default is
    # signature); root= alone implies DHCP
    result = boot(kernel, dracut_initrd, images.dir, f"root={images.root(*LAYERS)}",
                  "tmpfs.verify=checksum")
    assert_layered_boot(result, images)
    assert result.has_line("TESTHOOK tmpfs-bottom init=yes")


@pytest.mark.vm
def test_dracut_boot_with_systemd_reaches_image_init_with_hostname_layer(
        kernel: Path, dracut_systemd_initrd: Path, signed_images: tuple[Images, Path]) -> None:
    images, _ = signed_images
    result = boot(kernel, dracut_systemd_initrd, images.dir, f"root={images.root(*LAYERS)}",
                  "tmpfs.verify=checksum")
    assert_layered_boot(result, images)


@pytest.mark.vm
def test_dracut_forged_sha256sums_stops_the_boot_with_the_message(
        kernel: Path, dracut_initrd: Path, signed_images: tuple[Images, Path],
        tmp_path: Path) -> None:
    images, _ = signed_images
    forged = tmp_path / "images"
    forged.mkdir()
    for f in images.dir.iterdir():
        (forged / f.name).write_bytes(f.read_bytes())
    sums = (forged / "SHA256SUMS").read_text()
    real = re.search(r"^([0-9a-f]{64}) [ *]common\.tar\.zst$", sums, re.M)
    assert real is not None, sums
    wrong = "0" * 64
    (forged / "SHA256SUMS").write_text(sums.replace(real.group(1), wrong))
    result = boot(kernel, dracut_initrd, forged, f"root={images.root('base', 'common')}",
                  "tmpfs.verify=checksum", "tmpfs.retries=0")
    assert images.nonce not in result.console
    assert not result.has_line("Hello from the booted root")
    stop = [line for line in result.console.splitlines()
            if "dracut Warning: tmpfsboot:" in line and "common.tar.zst" in line and wrong in line]
    assert stop, "\n".join(tmpfsboot_lines(result))
    # dracut's emergency behaviour with rd.shell=0: no shell, the rd.emergency action
    assert result.has_line("Boot has failed")
    assert not result.has_line("Dropping to debug shell")


@pytest.mark.vm
def test_dracut_signed_image_boots_with_keyring_in_initramfs(
        kernel: Path, dracut_initrd: Path, signed_images: tuple[Images, Path]) -> None:
    images, _ = signed_images
    result = boot(kernel, dracut_initrd, images.dir, f"root={images.root('base')}")
    assert f"NONCE: {images.nonce}" in result.console, "\n".join(tmpfsboot_lines(result))
    # no tmpfs.verify=: a keyring in the initramfs makes signature the default
    assert any("SHA256SUMS: good signature" in line for line in tmpfsboot_lines(result))
