"""The node's identity in the new root (tmpfsboot.boot.identity): pure functions, from tables."""

from __future__ import annotations

import pytest

from tmpfsboot.boot.cmdline import parse_cmdline
from tmpfsboot.boot.errors import CmdlineError
from tmpfsboot.boot.identity import (
    HostnameFrom,
    ImageEtc,
    MachineId,
    MachineIdChoice,
    MachineIdFrom,
    derive_machine_id,
    hosts_text,
    machine_id_from_mac,
    machine_id_from_uuid,
    parse_machine_id_option,
    plan_identity,
)

pytestmark = pytest.mark.unit

# (product_uuid as /sys shows it, the machine-id systemd derives from it in a VM, or None)
UUID_CASES = [
    ("5a1e0007-0000-4000-8000-000000000007\n", "5a1e0007000040008000000000000007"),
    ("4C4C4544-0051-3010-8052-B4C04F564433", "4c4c4544005130108052b4c04f564433"),
    ("4c4c4544005130108052b4c04f564433", "4c4c4544005130108052b4c04f564433"),
    ("00000000-0000-0000-0000-000000000000", None),  # firmware set none
    ("FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF", None),
    ("03000200-0400-0500-0006-000700080009", None),  # a vendor placeholder on every board
    ("Not Settable", None),
    ("4c4c4544-0051-3010-8052", None),
    ("", None),
    (None, None),
]


@pytest.mark.parametrize(("uuid", "expected"), UUID_CASES)
def test_machine_id_from_uuid_as_systemd_does_in_a_vm(uuid: str | None,
                                                      expected: str | None) -> None:
    assert machine_id_from_uuid(uuid) == expected


MAC_CASES = [
    # every spelling of one MAC gives one ID
    ("52-54-00-12-34-56", "52:54:00:12:34:56", True),
    ("52:54:00:12:34:56", "5254.0012.3456", True),
    ("52-54-00-12-34-56", "52-54-00-12-34-57", False),
    ("52-54-00-12-34-56", "52-54-00-12-34-56".upper(), True),
]


@pytest.mark.parametrize(("a", "b", "same"), MAC_CASES)
def test_machine_id_from_mac_is_a_function_of_the_address(a: str, b: str, same: bool) -> None:
    id_a, id_b = machine_id_from_mac(a), machine_id_from_mac(b)
    assert id_a is not None and id_b is not None
    assert (id_a == id_b) is same
    assert len(id_a) == 32 and id_a[12] == "4" and id_a[16] in "89ab"  # a v4 UUID's shape


@pytest.mark.parametrize("mac", [None, "", "00-00-00-00-00-00", "ff:ff:ff:ff:ff:ff",
                                 "52-54-00-12-34", "zz-54-00-12-34-56"])
def test_machine_id_from_mac_refuses_what_names_no_nic(mac: str | None) -> None:
    assert machine_id_from_mac(mac) is None


MAC = "52-54-00-12-34-56"
ZEROS = bytes(16)
# (choice, product UUID, MAC, the machine-id or a marker, its source starts with)
DERIVE_CASES = [
    (MachineIdChoice(), "5a1e0007-0000-4000-8000-000000000007", MAC,
     "5a1e0007000040008000000000000007", "SMBIOS product UUID"),
    (MachineIdChoice(), "03000200-0400-0500-0006-000700080009", MAC, "mac",
     "MAC 52-54-00-12-34-56 (placeholder product UUID"),
    (MachineIdChoice(), "00000000-0000-0000-0000-000000000000", MAC, "mac", "MAC"),
    (MachineIdChoice(), None, MAC, "mac", "MAC 52-54-00-12-34-56 (no SMBIOS product UUID)"),
    (MachineIdChoice(), None, None, "00000000000040008000000000000000", "random"),
    (MachineIdChoice(MachineIdFrom.RANDOM), "5a1e0007-0000-4000-8000-000000000007", MAC,
     "00000000000040008000000000000000", "tmpfs.machine_id=random"),
    (MachineIdChoice(MachineIdFrom.IMAGE), "5a1e0007-0000-4000-8000-000000000007", MAC,
     None, "tmpfs.machine_id=image"),
    (MachineIdChoice(MachineIdFrom.GIVEN, "ab" * 16), None, None, "ab" * 16,
     "tmpfs.machine_id="),
]


@pytest.mark.parametrize(("choice", "uuid", "mac", "expected", "source"), DERIVE_CASES)
def test_derive_machine_id(choice: MachineIdChoice, uuid: str | None, mac: str | None,
                           expected: str | None, source: str) -> None:
    got = derive_machine_id(choice, uuid=uuid, mac=mac, randbytes=lambda n: ZEROS[:n])
    assert got.value == (machine_id_from_mac(MAC) if expected == "mac" else expected)
    assert got.source.startswith(source)


def test_nodes_get_distinct_ids_and_one_node_keeps_its_id() -> None:
    nodes = [(f"5a1e{n:04x}-0000-4000-8000-{n:012x}", f"52-54-00-00-00-{n:02x}")
             for n in range(1, 50)]
    first = [derive_machine_id(MachineIdChoice(), uuid=u, mac=m).value for u, m in nodes]
    again = [derive_machine_id(MachineIdChoice(), uuid=u, mac=m).value for u, m in nodes]
    assert first == again and len(set(first)) == len(nodes)
    by_mac = {derive_machine_id(MachineIdChoice(), uuid=None, mac=m).value for _, m in nodes}
    assert len(by_mac) == len(nodes)


OPTION_CASES = [
    ("random", MachineIdChoice(MachineIdFrom.RANDOM)),
    ("image", MachineIdChoice(MachineIdFrom.IMAGE)),
    ("node", MachineIdChoice()),
    ("0123456789ABCDEF0123456789abcdef",
     MachineIdChoice(MachineIdFrom.GIVEN, "0123456789abcdef0123456789abcdef")),
    ("01234567-89ab-cdef-0123-456789abcdef",
     MachineIdChoice(MachineIdFrom.GIVEN, "0123456789abcdef0123456789abcdef")),
]


@pytest.mark.parametrize(("text", "expected"), OPTION_CASES)
def test_parse_machine_id_option(text: str, expected: MachineIdChoice) -> None:
    assert parse_machine_id_option(text) == expected
    assert parse_cmdline(f"root=http://h/x tmpfs.machine_id={text}").machine_id == expected


@pytest.mark.parametrize("text", ["", "Random", "0" * 32, "0123", "g" * 32, "ab" * 17])
def test_bad_machine_id_option_is_refused_naming_it(text: str) -> None:
    with pytest.raises(CmdlineError, match=rf"tmpfs\.machine_id={text}: expected"):
        parse_cmdline(f"root=http://h/x tmpfs.machine_id={text}")


@pytest.mark.parametrize(("text", "expected"), [
    ("root=http://h/x", HostnameFrom.NODE),
    ("root=http://h/x tmpfs.hostname=image", HostnameFrom.IMAGE),
    ("root=http://h/x tmpfs.hostname=image tmpfs.hostname=node", HostnameFrom.NODE),
])
def test_tmpfs_hostname_option(text: str, expected: HostnameFrom) -> None:
    plan = parse_cmdline(text)
    assert plan.hostname_from is expected
    assert plan.to_json()["hostname"] == expected.value


def test_bad_tmpfs_hostname_is_refused_naming_it() -> None:
    with pytest.raises(CmdlineError, match=r"tmpfs\.hostname=dhcp: expected node or image"):
        parse_cmdline("root=http://h/x tmpfs.hostname=dhcp")


HOSTS_CASES = [
    # (the image's /etc/hosts, name, fqdn, the result)
    (None, "node7", None,
     "127.0.0.1\tlocalhost\n127.0.1.1\tnode7\n\n"
     "# The following lines are desirable for IPv6 capable hosts\n"
     "::1     localhost ip6-localhost ip6-loopback\nff02::1 ip6-allnodes\n"
     "ff02::2 ip6-allrouters\n"),
    ("127.0.0.1\tlocalhost\n127.0.1.1\tbuild.corp build\n10.1.1.1 nfs\n", "node7",
     "node7.lab", "127.0.0.1\tlocalhost\n127.0.1.1\tnode7.lab\tnode7\n10.1.1.1 nfs\n"),
    ("# hosts\n127.0.0.1 localhost\n::1 localhost\n", "n1", None,
     "# hosts\n127.0.0.1 localhost\n127.0.1.1\tn1\n::1 localhost\n"),
    ("10.1.1.1 nfs\n127.0.1.1 a\n127.0.1.1 b # twice\n", "n1", "n1",
     "127.0.1.1\tn1\n10.1.1.1 nfs\n"),
    ("", "n1", None, "127.0.1.1\tn1\n"),
]


@pytest.mark.parametrize(("existing", "name", "fqdn", "expected"), HOSTS_CASES)
def test_hosts_text_names_the_node_and_keeps_the_rest(existing: str | None, name: str,
                                                      fqdn: str | None, expected: str) -> None:
    assert hosts_text(name, fqdn, existing) == expected


UUID_ID = MachineId("5a1e0007000040008000000000000007", "SMBIOS product UUID")
# (image, hostname, resolv.conf text, machine-id, hostname_from) -> {file: written?}
PLAN_CASES = [
    (ImageEtc(), "node7", "nameserver 10.0.2.3\n", UUID_ID, HostnameFrom.NODE,
     {"hostname": True, "hosts": True, "machine-id": True, "resolv.conf": True}),
    (ImageEtc(resolv_conf_is_symlink=True), "node7", "nameserver 10.0.2.3\n", UUID_ID,
     HostnameFrom.NODE,
     {"hostname": True, "hosts": True, "machine-id": True, "resolv.conf": False}),
    (ImageEtc(), None, None, MachineId(None, "tmpfs.machine_id=image"), HostnameFrom.NODE,
     {"hostname": False, "hosts": False, "machine-id": False, "resolv.conf": False}),
    (ImageEtc(), "node7", None, UUID_ID, HostnameFrom.IMAGE,
     {"hostname": False, "hosts": False, "machine-id": True, "resolv.conf": False}),
]


@pytest.mark.parametrize(("image", "hostname", "resolv", "machine_id", "hostname_from",
                          "written"), PLAN_CASES)
def test_plan_identity_decides_each_file(image: ImageEtc, hostname: str | None,
                                         resolv: str | None, machine_id: MachineId,
                                         hostname_from: HostnameFrom,
                                         written: dict[str, bool]) -> None:
    files = plan_identity(image, hostname=hostname, fqdn=None, resolv_conf=resolv,
                          machine_id=machine_id, hostname_from=hostname_from)
    assert {f.name: f.text is not None for f in files} == written
    assert all(f.why for f in files)
    by_name = {f.name: f for f in files}
    if written["machine-id"]:
        assert by_name["machine-id"].text == f"{machine_id.value}\n"
        assert by_name["machine-id"].mode == 0o444
    if written["hostname"]:
        assert by_name["hostname"].text == f"{hostname}\n"
