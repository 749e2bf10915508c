"""A real Debian 12 root with systemd, debootstrapped from the mirror apt uses (once per
machine: cached), booted from tmpfsboot's initramfs as a fleet boots it: several nodes, one
image, each node with its own name and machine-id, and one node booted again."""

from __future__ import annotations

import json
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tmpfsboot.boot.identity import machine_id_from_uuid
from tmpfsboot.host.debootstrap import cached_root
from tmpfsboot.host.demo_debian import (
    DebianBoot,
    boot_debian,
    build_debian_base,
    build_host_layer,
    parse_report,
)
from tmpfsboot.host.serve import start_server

pytestmark = pytest.mark.vm

# Boots under TCG on 2 shared cores: generous, as a slow boot is load, not a failure.
TIMEOUT = 900.0
UUIDS = {
    "node7": "5a1e0007-7e57-4000-8000-000000000007",
    "node8": "5a1e0008-7e57-4000-8000-000000000008",
    "node9": "5a1e0009-7e57-4000-8000-000000000009",
}
# node8 is configured by ip= (with a DNS server, which QEMU's restricted DHCP names none
# of); the others by DHCP. 10.0.2.3 is never asked anything: the guest resolves no name.
NODE8_IP = "ip=10.0.2.15::10.0.2.2:255.255.255.0:node8:eth0:off:10.0.2.3"
# systemd units that would fail because of what tmpfsboot wrote (or left) in the root
IDENTITY_UNITS = ("systemd-machine-id-commit", "systemd-hostnamed", "systemd-journald",
                  "systemd-journal-flush", "systemd-random-seed", "systemd-resolved",
                  "systemd-networkd", "systemd-remount-fs", "tmpfsboot-report")


@pytest.fixture(scope="session")
def debian_tarball() -> Path:
    """The debootstrapped tree: at most one debootstrap per machine (then the cache)."""
    return cached_root()


class DebianImages:
    """base (the debootstrapped root, identity scrubbed) and host-NAME report layers."""

    def __init__(self, work: Path, tarball: Path) -> None:
        self.dir = work / "images"
        self.nonce = secrets.token_hex(8)
        assert tarball.exists()
        build_debian_base(self.dir, work)
        for host in UUIDS:
            build_host_layer(self.dir, work, host, nonce=self.nonce)

    def manifest(self, name: str) -> dict[str, object]:
        data: dict[str, object] = json.loads((self.dir / f"{name}.manifest.json").read_text())
        return data


@pytest.fixture(scope="module")
def debian_images(tmp_path_factory: pytest.TempPathFactory,
                  debian_tarball: Path) -> DebianImages:
    return DebianImages(tmp_path_factory.mktemp("debian"), debian_tarball)


def boot_node(kernel: Path, initrd: Path, port: int, host: str, *append: str) -> DebianBoot:
    boot = boot_debian(kernel, initrd, port, hostname=host, uuid=UUIDS[host],
                       append=append, timeout=TIMEOUT)
    assert not boot.result.timed_out, boot.result.console[-4000:]
    return boot


@pytest.fixture(scope="module")
def fleet(kernel: Path, initrd: Path, debian_images: DebianImages) -> Iterator[
        dict[str, DebianBoot]]:
    """node7, node8, then node7 again (a reboot of the same machine), from one image."""
    with start_server(debian_images.dir, access_log=False) as server:
        yield {
            "node7": boot_node(kernel, initrd, server.port, "node7"),
            "node8": boot_node(kernel, initrd, server.port, "node8", NODE8_IP),
            "node7-again": boot_node(kernel, initrd, server.port, "node7"),
        }


def test_every_boot_reached_the_report_with_this_runs_nonce(
        fleet: dict[str, DebianBoot], debian_images: DebianImages) -> None:
    for name, boot in fleet.items():
        assert f"NONCE: {debian_images.nonce}" in boot.result.console, (
            name, boot.result.console[-4000:])


def test_each_node_is_named_as_dhcp_or_ip_says_not_as_the_build_machine(
        fleet: dict[str, DebianBoot]) -> None:
    builder = socket.gethostname()
    for name, boot in fleet.items():
        host = name.removesuffix("-again")
        assert boot.report["hostname"] == host, boot.report
        assert boot.report["etc-hostname"] == host
        assert boot.report["hosts"] == f"127.0.1.1 {host}"
        assert builder not in (boot.report["etc-hostname"], boot.report["hosts"])


def test_machine_id_is_the_smbios_uuid_distinct_per_node_stable_per_node(
        fleet: dict[str, DebianBoot]) -> None:
    ids = {name: boot.report["machine-id"] for name, boot in fleet.items()}
    assert ids["node7"] == UUIDS["node7"].replace("-", "")
    assert ids["node8"] == UUIDS["node8"].replace("-", "")
    assert ids["node7"] != ids["node8"]
    assert ids["node7-again"] == ids["node7"]
    for boot in fleet.values():  # journald files its journal under the node's machine-id
        assert boot.report["journal-dir"] == boot.report["machine-id"]


def test_systemd_is_running_and_no_failed_unit_is_about_identity(
        fleet: dict[str, DebianBoot], debian_images: DebianImages) -> None:
    for name, boot in fleet.items():
        state, failed = boot.report["state"], boot.report["failed"].split()
        assert state in ("running", "degraded"), (name, boot.report)
        assert (state == "running") == (not failed), (name, boot.report)
        assert not [u for u in failed if u.startswith(IDENTITY_UNITS)], (name, failed)
        # journald works: the report's own line came back from the journal
        assert boot.report["journal-probe"] == f"tmpfsboot journal probe {debian_images.nonce}"


def test_network_configured_in_the_initramfs_stays_usable(
        fleet: dict[str, DebianBoot]) -> None:
    for name, boot in fleet.items():
        status = boot.report["network"]
        assert status.startswith("HTTP/1.") and " 200" in status, (name, status)
    # ip= named a DNS server: it is the new root's resolv.conf, not the build machine's
    assert fleet["node8"].report["resolv.conf"] == "nameserver 10.0.2.3;"


def test_identity_decisions_are_in_the_boot_log(fleet: dict[str, DebianBoot]) -> None:
    console = fleet["node7"].result.console
    assert "/etc/hostname (written: true): node name node7" in console
    uuid7 = UUIDS["node7"].replace("-", "")
    assert f"/etc/machine-id (written: true): {uuid7} from SMBIOS product UUID" in console


def test_systemd_itself_derives_the_same_machine_id_from_the_uuid(
        kernel: Path, initrd: Path, debian_images: DebianImages) -> None:
    # The reference: with the image's empty /etc/machine-id left alone, systemd makes the
    # machine-id itself, from the VM's product UUID. Ours must be the same.
    with start_server(debian_images.dir, access_log=False) as server:
        boot = boot_node(kernel, initrd, server.port, "node9", "tmpfs.machine_id=image")
    assert "/etc/machine-id (written: false): tmpfs.machine_id=image" in boot.result.console
    assert boot.report["machine-id"] == machine_id_from_uuid(UUIDS["node9"])


def test_base_image_carries_no_build_machine_identity(debian_images: DebianImages) -> None:
    removed = debian_images.manifest("base")["build_identity_removed"]
    assert isinstance(removed, dict)
    assert removed["emptied"] == ["/etc/machine-id"]
    assert {"/etc/hostname", "/etc/resolv.conf"} <= set(removed["removed"])
    assert any(p.startswith("/var/lib/apt/lists/") for p in removed["left_out"])


@pytest.mark.unit
def test_report_lines_are_read_after_a_login_prompt() -> None:
    console = ("Debian GNU/Linux 12 node7 ttyS0\n\nnode7 login: REPORT hostname: node7\r\n"
               "REPORT failed: \nREPORT state: running\nnot a REPORT\n")
    assert parse_report(console.replace("\r\n", "\n")) == {
        "hostname": "node7", "failed": "", "state": "running"}
