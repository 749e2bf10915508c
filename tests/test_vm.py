"""A real Debian kernel and a real initramfs (mkinitramfs -d) booted in QEMU, fetching its root
from a loopback server. The guest proves success with a random nonce from the image."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import faultserver
from support.keys import throwaway_gpg_key
from support.vm import GUEST_MAC, HOSTNAME, TIMEOUT, Images, tmpfsboot_lines

from tmpfsboot.host.demo import build_demo_root, build_layer
from tmpfsboot.host.image import build_image
from tmpfsboot.host.initramfs import build_initramfs
from tmpfsboot.host.serve import start_server
from tmpfsboot.host.vm import (
    GUEST_PORT,
    GUEST_SERVER,
    BootResult,
    boot_vm,
    can_use_kvm,
    guest_url,
    qemu_argv,
)

pytestmark = pytest.mark.vm



@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    return Images(tmp_path_factory.mktemp("vm-images"))


def boot(kernel: Path, initrd: Path, port: int, *append: str) -> BootResult:
    result = boot_vm(kernel, initrd, append=list(append), server_port=port, hostname=HOSTNAME,
                     timeout=TIMEOUT)
    assert not result.timed_out, result.console[-3000:]
    return result


@pytest.fixture(scope="module")
def layered_boot(kernel: Path, initrd: Path, images: Images) -> BootResult:
    """One boot with base, common and the %hostname layer, shared by the tests below."""
    with start_server(images.dir, access_log=False) as server:
        return boot(kernel, initrd, server.port,
                    f"root={images.root('base', 'common', 'host-%hostname', 'node-%arch-%mac')}")


def test_boot_with_two_layers_and_hostname_layer_reaches_image_init(
        layered_boot: BootResult, images: Images) -> None:
    assert f"NONCE: {images.nonce}" in layered_boot.console, layered_boot.console[-3000:]
    assert layered_boot.has_line(f"layers:      base common host-{HOSTNAME} ")
    assert layered_boot.has_line(f"hostname:    {HOSTNAME}")
    assert layered_boot.has_line("root:        tmpfs tmpfs rw")


def test_hooks_run_in_order_at_their_points(layered_boot: BootResult) -> None:
    # initramfs-tools' "Begin: ... " has no newline: a hook's line may follow it.
    hooks = re.findall(r"TESTHOOK [^\n]*", layered_boot.console)
    assert hooks == [
        "TESTHOOK tmpfs-top net=0",  # before networking
        "TESTHOOK tmpfs-premount root=tmpfs entries=0",  # the empty tmpfs is mounted
        "TESTHOOK tmpfs-bottom init=yes",  # after the last layer
    ], layered_boot.console[-3000:]


def test_security_and_trusted_xattrs_reach_the_guest_tmpfs(layered_boot: BootResult) -> None:
    assert layered_boot.has_line("XATTRS security.tmpfsboot=sec-ok trusted.tmpfsboot=trusted-ok")


def test_boot_log_and_python_start_reported(layered_boot: BootResult) -> None:
    starts = re.findall(r"tmpfsboot on Python 3\.11\.\d+, started in ([0-9.]+) s",
                        layered_boot.console)
    assert len(starts) == 2  # the mount and fetch steps
    assert layered_boot.has_line("boot log:    /run/tmpfsboot/boot.jsonl")
    assert layered_boot.has_line("Fetching layer 3/4: http://10.0.2.100/host-node7.tar.zst")


def test_arch_and_mac_substitutions_resolve_in_the_guest(layered_boot: BootResult) -> None:
    # %arch from initramfs-tools' DPKG_ARCH, %mac from the boot NIC
    assert layered_boot.has_line(
        f"Fetching layer 4/4: http://10.0.2.100/node-amd64-{GUEST_MAC}.tar.zst")


def test_tampered_layer_panics_with_message_and_never_runs_init(
        kernel: Path, initrd: Path, images: Images, tmp_path: Path) -> None:
    tampered = tmp_path / "images"
    tampered.mkdir()
    for f in images.dir.iterdir():
        (tampered / f.name).write_bytes(f.read_bytes())
    sums = (tampered / "SHA256SUMS").read_text()
    real = re.search(r"^([0-9a-f]{64}) [ *]common\.tar\.zst$", sums, re.M)
    assert real is not None, sums
    wrong = "0" * 64
    (tampered / "SHA256SUMS").write_text(sums.replace(real.group(1), wrong))
    with start_server(tampered, access_log=False) as server:
        result = boot(kernel, initrd, server.port, f"root={images.root('base', 'common')}",
                      "tmpfs.retries=0")
    assert images.nonce not in result.console
    assert not result.has_line("Hello from the booted root")
    panic = [line for line in tmpfsboot_lines(result) if "common.tar.zst" in line and wrong in line]
    assert panic, "\n".join(tmpfsboot_lines(result))
    assert result.has_line("Rebooting automatically due to panic= boot argument")


def test_node_retries_after_503_and_boots(kernel: Path, initrd: Path, images: Images) -> None:
    files = {f"/{f.name}": f.read_bytes() for f in images.dir.iterdir()}
    with faultserver.serve(files) as server:
        server.script("/SHA256SUMS", *[faultserver.error(503, retry_after="1")] * 3)
        result = boot(kernel, initrd, server.port, f"root={images.root('base', 'common')}")
    assert f"NONCE: {images.nonce}" in result.console, "\n".join(tmpfsboot_lines(result))
    assert sum("HTTP 503" in line for line in tmpfsboot_lines(result)) == 3
    assert [h.status for h in server.requests_for("/SHA256SUMS")] == [503, 503, 503, 200]
    assert server.count("/base.tar.zst") == 1 and server.count("/common.tar.zst") == 1


def test_writer_processes_write_the_first_layer_in_the_initramfs(kernel: Path, initrd: Path,
                                                                 images: Images) -> None:
    """tmpfs.writers=2: the first layer's small files are written by two processes forked
    in the initramfs, as on a node with CPUs to spare, and the node boots."""
    with start_server(images.dir, access_log=False) as server:
        result = boot(kernel, initrd, server.port, f"root={images.root('base', 'common')}",
                      "tmpfs.writers=2")
    assert f"NONCE: {images.nonce}" in result.console, "\n".join(tmpfsboot_lines(result))
    written = [line for line in tmpfsboot_lines(result) if "layer 1/2" in line
               and "2 writer processes" in line]
    assert written, "\n".join(tmpfsboot_lines(result))


def test_invalid_rootsize_panics_naming_the_value(kernel: Path, initrd: Path,
                                                  images: Images) -> None:
    with start_server(images.dir, access_log=False) as server:
        result = boot(kernel, initrd, server.port, f"root={images.root('base')}",
                      "rootsize=50x")
        served = server.snapshot().answered
    assert images.nonce not in result.console
    assert any("rootsize=50x" in line for line in tmpfsboot_lines(result)), result.console[-2000:]
    assert result.has_line("Rebooting automatically due to panic= boot argument")
    assert served == 0  # rejected before anything was mounted or fetched


KVM_CASES = [
    ("flags\t\t: fpu vme de pse vmx sse\n", True, True),
    ("flags\t\t: fpu svm sse\n", True, True),
    ("flags\t\t: fpu vme de pse sse\n", True, False),  # a nested "PVM" /dev/kvm
    ("flags\t\t: fpu vmx\n", False, False),
]


@pytest.mark.unit
@pytest.mark.parametrize(("cpuinfo", "device", "expected"), KVM_CASES)
def test_kvm_only_where_cpu_shows_vmx_or_svm(cpuinfo: str, device: bool, expected: bool) -> None:
    assert can_use_kvm(cpuinfo, kvm_device=device) is expected


@pytest.mark.unit
def test_qemu_reaches_only_the_loopback_server() -> None:
    argv = qemu_argv(Path("k"), Path("i"), append=["root=x"], server_port=8080,
                     hostname="n1", accel="tcg")
    netdev = argv[argv.index("-netdev") + 1]
    assert netdev == ("user,id=n0,restrict=on,hostname=n1,"
                      "guestfwd=tcp:10.0.2.100:80-cmd:/bin/busybox nc 127.0.0.1 8080")
    assert "-no-reboot" in argv
    assert argv[argv.index("-append") + 1] == "console=ttyS0 panic=5 net.ifnames=0 root=x"


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory, kernel_version: str,
           test_scripts: Path) -> Iterator[tuple[Images, Path, Path]]:
    """(images signed with a throw-away key, an initramfs whose keyring trusts it, tmp)."""
    tmp = tmp_path_factory.mktemp("signed")
    with throwaway_gpg_key() as key:
        images = Images(tmp)
        # re-sign: Images built them unsigned; one more build with --sign signs SHA256SUMS
        build_image(tmp / "base", images.dir, "base", sign=key.fingerprint,
                    gpg_homedir=key.homedir)
        initrd = build_initramfs(tmp / "initrd.img", kernel=kernel_version, modules="list",
                                 scripts=test_scripts, keyring=key.keyring)
        yield images, initrd, tmp


def test_signed_images_boot_with_keyring_in_initramfs(kernel: Path,
                                                      signed: tuple[Images, Path, Path]) -> None:
    images, initrd, _ = signed
    with start_server(images.dir, access_log=False) as server:
        result = boot(kernel, initrd, server.port, f"root={images.root('base', 'common')}")
    assert f"NONCE: {images.nonce}" in result.console, "\n".join(tmpfsboot_lines(result))
    # no tmpfs.verify=: a keyring in the initramfs makes signature the default
    assert any("SHA256SUMS: good signature" in line for line in tmpfsboot_lines(result))


def test_bad_signature_panics_and_never_runs_init(kernel: Path,
                                                  signed: tuple[Images, Path, Path]) -> None:
    images, initrd, tmp = signed
    forged = tmp / "forged"
    forged.mkdir()
    for f in images.dir.iterdir():
        (forged / f.name).write_bytes(f.read_bytes())
    with open(forged / "SHA256SUMS", "a") as sums:
        sums.write(f"{'1' * 64}  extra.tar.zst\n")  # changed after signing
    with start_server(forged, access_log=False) as server:
        result = boot(kernel, initrd, server.port, f"root={images.root('base')}",
                      "tmpfs.retries=0")
    assert images.nonce not in result.console
    assert any("bad signature" in line for line in tmpfsboot_lines(result)), \
        "\n".join(tmpfsboot_lines(result))
    assert result.has_line("Rebooting automatically due to panic= boot argument")


def test_spread_node_takes_its_layers_from_its_own_first_mirror(kernel: Path, initrd: Path,
                                                                 images: Images) -> None:
    # Two mirrors the guest reaches through its one forwarded server: host "10.0.2.100"
    # and "10.0.2.100:80" weigh differently. QEMU without -uuid gives no usable SMBIOS
    # UUID, so the node spreads by its MAC, which puts the mirror written second first.
    from tmpfsboot.boot.cmdline import spread_urls

    mirrors = [guest_url("a/base.tar.zst"), f"http://{GUEST_SERVER}:{GUEST_PORT}/b/base.tar.zst"]
    first = spread_urls(mirrors, f"mac:{GUEST_MAC}")[0]
    assert first == mirrors[1], "pick mirror names whose spread order is not the written one"
    files = {f"/{d}/{f.name}": f.read_bytes() for f in images.dir.iterdir() for d in "ab"}
    with faultserver.serve(files) as server:
        result = boot(kernel, initrd, server.port, f"root={'|'.join(mirrors)}",
                      "tmpfs.mirrors=spread")
    assert f"NONCE: {images.nonce}" in result.console, "\n".join(tmpfsboot_lines(result))
    assert result.has_line(f"tmpfsboot: Mirrors spread by mac:{GUEST_MAC}: first {first}")
    assert server.count("/b/base.tar.zst") == 1 and server.count("/b/SHA256SUMS") == 1
    assert not [h.path for h in server.hits if h.path.startswith("/a/")]
# -- Image layers: squashfs and erofs under an overlay ---------------------------------------

# The image root's /sbin/init shows its mounts and whether the tar layer's whiteout hid
# the image's file, then goes on as the demo's init does.
IMAGE_INIT_EXTRA = """\
mount -t proc proc /proc 2>/dev/null
sed 's/^/MOUNTINFO /' /proc/self/mountinfo
if [ -e /etc/tmpfsboot-demo/hideme ]; then echo "HIDEME present"; else echo "HIDEME absent"; fi
"""


class ImageLayers:
    """base.squashfs and base.erofs of one demo root (with a file to hide), and a tar host
    layer that adds a file and hides that one with a whiteout."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "images"
        self.dir.mkdir()
        self.nonce = secrets.token_hex(8)
        base = build_demo_root(root / "base", nonce=self.nonce)
        init = base / "sbin/init"
        script = init.read_text()
        init.write_text(script.replace("echo\n", IMAGE_INIT_EXTRA + "echo\n", 1))
        (base / "etc/tmpfsboot-demo/hideme").write_text("from the image\n")
        for fmt in ("squashfs", "erofs"):
            build_image(base, self.dir, "base", fmt=fmt)
        host = build_layer(root / "host", {
            "etc/tmpfsboot-demo/layers": "image base\nhost (tar)\n",
            "etc/tmpfsboot-demo/.wh.hideme": "",
        })
        build_image(host, self.dir, "host", include_root=False)

    def mounts(self, result: BootResult) -> dict[str, tuple[str, str]]:
        """The guest's mount table after boot: mount point -> (type, source)."""
        table = {}
        for line in result.console.splitlines():
            if line.startswith("MOUNTINFO "):
                fields = line.split()[1:]
                dash = fields.index("-")
                table[fields[4]] = (fields[dash + 1], fields[dash + 2])
        return table


@pytest.fixture(scope="module")
def image_layers(tmp_path_factory: pytest.TempPathFactory) -> ImageLayers:
    return ImageLayers(tmp_path_factory.mktemp("vm-image-layers"))


@pytest.fixture(scope="module")
def squashfs_boot(kernel: Path, initrd: Path, image_layers: ImageLayers) -> BootResult:
    with start_server(image_layers.dir, access_log=False) as server:
        return boot(kernel, initrd, server.port,
                    f"root={guest_url('base.squashfs')},{guest_url('host.tar.zst')}")


def test_squashfs_base_with_tar_host_layer_boots_an_overlay(squashfs_boot: BootResult,
                                                            image_layers: ImageLayers) -> None:
    result = squashfs_boot
    assert f"NONCE: {image_layers.nonce}" in result.console, result.console[-3000:]
    assert result.has_line("layers:      image base host (tar) ")  # the tar layer's file
    mounts = image_layers.mounts(result)
    assert mounts["/"][0] == "overlay", mounts
    # the image stays mounted after switch_root, visible under /run with its tmpfs
    assert mounts["/run/tmpfsboot/layers"][0] == "tmpfs", mounts
    kind, source = mounts["/run/tmpfsboot/layers/lower/1"]
    assert kind == "squashfs" and source.startswith("/dev/loop"), mounts
    assert any("layer 1/2: " in line and "squashfs in RAM, SHA-256 verified" in line
               for line in tmpfsboot_lines(result)), "\n".join(tmpfsboot_lines(result))


def test_whiteout_in_tar_layer_hides_a_file_of_the_image(squashfs_boot: BootResult) -> None:
    assert squashfs_boot.has_line("HIDEME absent"), squashfs_boot.console[-3000:]


def test_erofs_base_boots(kernel: Path, initrd: Path, image_layers: ImageLayers) -> None:
    with start_server(image_layers.dir, access_log=False) as server:
        result = boot(kernel, initrd, server.port, f"root={guest_url('base.erofs')}")
    assert f"NONCE: {image_layers.nonce}" in result.console, result.console[-3000:]
    mounts = image_layers.mounts(result)
    assert mounts["/"][0] == "overlay" and mounts["/run/tmpfsboot/layers/lower/1"][0] == "erofs"
    assert result.has_line("HIDEME present")  # no tar layer: the image's file is there


def test_tampered_image_panics_with_checksum_message_before_mount(
        kernel: Path, initrd: Path, image_layers: ImageLayers, tmp_path: Path) -> None:
    tampered = tmp_path / "images"
    tampered.mkdir()
    for f in image_layers.dir.iterdir():
        (tampered / f.name).write_bytes(f.read_bytes())
    data = bytearray((tampered / "base.squashfs").read_bytes())
    data[300] ^= 0x01  # one bit, inside the first block
    (tampered / "base.squashfs").write_bytes(bytes(data))
    with start_server(tampered, access_log=False) as server:
        result = boot(kernel, initrd, server.port, f"root={guest_url('base.squashfs')}",
                      "tmpfs.retries=0")
    lines = tmpfsboot_lines(result)
    assert image_layers.nonce not in result.console
    assert any("base.squashfs: SHA-256 mismatch: expected" in line for line in lines), \
        "\n".join(lines)
    assert not any("mounted read-only" in line for line in lines)
    assert "squashfs: version" not in result.console  # the kernel never parsed it
    assert result.has_line("Rebooting automatically due to panic= boot argument")
