"""The boot-time entry point (tmpfsboot.boot.main): its steps on a scratch node tree."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.mounts import unmount_if_mounted

import tmpfsboot
from tmpfsboot.boot.cmdline import parse_cmdline
from tmpfsboot.boot.errors import CmdlineError, ShellRequested, TmpfsbootError
from tmpfsboot.boot.log import EventLog
from tmpfsboot.boot.main import (
    Node,
    choose_rootsize,
    finish_root,
    gather_facts,
    lookup_fqdn,
    main,
    read_net_conf,
    wait_or_shell,
    write_identity,
)
from tmpfsboot.boot.netconf import NetConf

PACKAGE = Path(tmpfsboot.__file__).parent

BACKOFF_CASES = [
    ("root=http://h/x", 10.0),
    ("root=http://h/x tmpfs.backoff=0.2", 0.2),
    ("root=http://h/x tmpfs.backoff=5 quiet tmpfs.backoff=3", 3.0),
]


@pytest.mark.unit
@pytest.mark.parametrize(("text", "expected"), BACKOFF_CASES)
def test_tmpfs_backoff_sets_first_retry_delay(text: str, expected: float) -> None:
    assert parse_cmdline(text).backoff == expected


@pytest.mark.unit
@pytest.mark.parametrize("value", ["0", "x", "-1"])
def test_tmpfs_backoff_rejects_naming_the_value(value: str) -> None:
    with pytest.raises(CmdlineError, match=rf"tmpfs\.backoff={value}"):
        parse_cmdline(f"root=http://h/x tmpfs.backoff={value}")


@pytest.mark.unit
def test_wait_or_shell_opens_shell_when_x_is_pressed() -> None:
    master, slave = os.openpty()
    try:
        os.write(master, b"x")
        started = time.monotonic()
        with pytest.raises(ShellRequested, match="Spawning shell"):
            wait_or_shell(30, fd=slave)
        assert time.monotonic() - started < 5
    finally:
        os.close(master)
        os.close(slave)


@pytest.mark.unit
def test_wait_or_shell_waits_out_other_keys() -> None:
    master, slave = os.openpty()
    try:
        os.write(master, b"q")
        started = time.monotonic()
        wait_or_shell(0.3, fd=slave)
        assert time.monotonic() - started >= 0.3
    finally:
        os.close(master)
        os.close(slave)


ROOTSIZE_CASES = [
    ("root=http://h/x rootsize=2g", "25%", "2g"),
    ("root=http://h/x", "25%", "25%"),
    ("root=http://h/x", None, "50%"),
    ("root=http://h/x", "", "50%"),
]


@pytest.mark.unit
@pytest.mark.parametrize(("cmdline", "configured", "expected"), ROOTSIZE_CASES)
def test_choose_rootsize_prefers_cmdline_then_config(cmdline: str, configured: str | None,
                                                     expected: str) -> None:
    assert choose_rootsize(parse_cmdline(cmdline), configured) == expected


@pytest.mark.unit
def test_choose_rootsize_rejects_bad_config_naming_it() -> None:
    with pytest.raises(CmdlineError, match=r"ROOTSIZE .*rootsize=12q"):
        choose_rootsize(parse_cmdline("root=http://h/x"), "12q")


@pytest.mark.unit
def test_lookup_fqdn_retries_until_a_dotted_name() -> None:
    answers = iter([OSError("no answer"), "node7", "node7.lab.example"])
    slept: list[float] = []

    def resolve(address: str) -> str:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert lookup_fqdn("10.0.2.15", retries=None, sleep=slept.append,
                       resolve=resolve) == "node7.lab.example"
    assert len(slept) == 2 and all(10 <= d <= 40 for d in slept)  # the seed's 10-39 s


@pytest.mark.unit
def test_lookup_fqdn_gives_up_after_retries_naming_the_address() -> None:
    def resolve(address: str) -> str:
        raise OSError("host not found")

    with pytest.raises(TmpfsbootError, match=r"10\.0\.2\.15: host not found"):
        lookup_fqdn("10.0.2.15", retries=1, sleep=lambda s: None, resolve=resolve)


@pytest.fixture
def node(tmp_path: Path) -> Node:
    for d in ("etc", "run", "sys/class/net/eth0", "sys/class/dmi/id"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "sys/class/net/eth0/address").write_text("52:54:00:AB:CD:EF\n")
    (tmp_path / "sys/class/dmi/id/product_uuid").write_text("4C4C4544-0000-1111\n")
    (tmp_path / "run/net-eth0.conf").write_text(
        "DEVICE='eth0'\nIPV4ADDR='10.0.2.15'\nHOSTNAME='node7'\nDNSDOMAIN='lab.example'\n"
        "IPV4DNS0='10.0.2.3'\n")
    return Node(etc=str(tmp_path / "etc"), run=str(tmp_path / "run"),
                sys=str(tmp_path / "sys"), cmdline=str(tmp_path / "cmdline"),
                set_hostname=False)


@pytest.mark.unit
def test_gather_facts_from_net_conf_sysfs_and_env(node: Node) -> None:
    plan = parse_cmdline("root=http://h/%hostname/%mac/%fqdn/%uuid/%arch/%ip")
    conf = NetConf(device="eth0", address="10.0.2.15", hostname="node7", domain="lab.example")
    facts = gather_facts(plan, conf, node, {"DPKG_ARCH": "amd64"})
    assert (facts.hostname, facts.fqdn, facts.mac, facts.ip, facts.arch, facts.uuid) == (
        "node7", "node7.lab.example", "52-54-00-ab-cd-ef", "10.0.2.15", "amd64",
        "4c4c4544-0000-1111")


@pytest.mark.unit
def test_gather_facts_takes_mac_from_bootif(node: Node) -> None:
    plan = parse_cmdline("root=http://h/%mac BOOTIF=01-AA-BB-CC-DD-EE-FF")
    facts = gather_facts(plan, NetConf(device="eth0", hostname="n"), node, {})
    assert facts.mac == "aa-bb-cc-dd-ee-ff"


@pytest.mark.unit
def test_write_identity_writes_the_initramfs_etc(tmp_path: Path) -> None:
    (tmp_path / "hosts").write_text("initramfs' own\n")
    conf = NetConf(hostname="node7", domain="lab.example", nameservers=("10.0.2.3",))
    assert write_identity(str(tmp_path), conf) == ["resolv.conf", "hostname", "hosts"]
    assert (tmp_path / "hostname").read_text() == "node7\n"
    assert "node7.lab.example" in (tmp_path / "hosts").read_text()


def build_machine_etc(root: Path) -> Path:
    """A new root's /etc as debootstrap leaves it: the build machine's names and IDs."""
    etc = root / "etc"
    etc.mkdir(parents=True)
    (etc / "hostname").write_text("buildhost\n")
    (etc / "hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\tbuildhost.corp buildhost\n"
                               "10.9.9.9\tfileserver\n")
    (etc / "machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    os.symlink("../run/systemd/resolve/stub-resolv.conf", etc / "resolv.conf")
    return etc


UUID7 = "5a1e0007-0000-4000-8000-000000000007"


@pytest.mark.unit
def test_fetch_step_gives_the_new_root_the_nodes_identity(node: Node, tmp_path: Path) -> None:
    etc = build_machine_etc(tmp_path / "newroot")
    (Path(node.sys) / "class/dmi/id/product_uuid").write_text(UUID7.upper() + "\n")
    plan = parse_cmdline("root=http://h/x")
    facts = gather_facts(plan, read_net_conf(node, "eth0"), node, {})
    finish_root(str(tmp_path / "newroot"), read_net_conf(node, "eth0"), facts, plan,
                EventLog(str(tmp_path / "boot.jsonl")))
    assert (etc / "hostname").read_text() == "node7\n"
    hosts = (etc / "hosts").read_text()
    assert "127.0.1.1\tnode7.lab.example\tnode7\n" in hosts
    assert "buildhost" not in hosts and "10.9.9.9\tfileserver" in hosts
    assert (etc / "machine-id").read_text() == UUID7.replace("-", "") + "\n"
    assert stat.S_IMODE((etc / "machine-id").stat().st_mode) == 0o444
    assert os.readlink(etc / "resolv.conf") == "../run/systemd/resolve/stub-resolv.conf"
    events = [json.loads(line) for line in (tmp_path / "boot.jsonl").read_text().splitlines()]
    logged = {e["file"]: e["written"] for e in events if e["event"] == "identity"}
    assert logged == {"/etc/hostname": True, "/etc/hosts": True, "/etc/machine-id": True,
                      "/etc/resolv.conf": False}
    for name in ("dev", "proc", "sys", "run"):
        assert (tmp_path / "newroot" / name).is_dir()


@pytest.mark.unit
def test_fetch_step_leaves_image_identity_when_asked(node: Node, tmp_path: Path) -> None:
    etc = build_machine_etc(tmp_path / "newroot")
    before = {p.name: (p.read_text() if not p.is_symlink() else os.readlink(p))
              for p in etc.iterdir()}
    plan = parse_cmdline("root=http://h/x tmpfs.hostname=image tmpfs.machine_id=image")
    facts = gather_facts(plan, read_net_conf(node, "eth0"), node, {})
    finish_root(str(tmp_path / "newroot"), read_net_conf(node, "eth0"), facts, plan)
    after = {p.name: (p.read_text() if not p.is_symlink() else os.readlink(p))
             for p in etc.iterdir()}
    assert after == before


@pytest.mark.unit
def test_fetch_step_writes_resolv_conf_over_the_images_file(node: Node, tmp_path: Path) -> None:
    etc = tmp_path / "newroot/etc"
    etc.mkdir(parents=True)
    (etc / "resolv.conf").write_text("nameserver 192.0.2.53\n")  # the build machine's
    plan = parse_cmdline("root=http://h/x tmpfs.machine_id=00112233445566778899AABBCCDDEEFF")
    facts = gather_facts(plan, read_net_conf(node, "eth0"), node, {})
    finish_root(str(tmp_path / "newroot"), read_net_conf(node, "eth0"), facts, plan)
    assert (etc / "resolv.conf").read_text() == "domain lab.example\nnameserver 10.0.2.3\n"
    assert (etc / "machine-id").read_text() == "00112233445566778899aabbccddeeff\n"
    assert (etc / "hosts").read_text().startswith("127.0.0.1\tlocalhost\n127.0.1.1\t")


@pytest.mark.unit
def test_mount_step_rejects_rootsize_before_mounting(node: Node, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    Path(node.cmdline).write_text("root=http://10.0.2.100/base.tar.zst rootsize=50x\n")
    target = tmp_path / "newroot"
    target.mkdir()
    assert main(["mount", str(target)], node=node) == 1
    error = (Path(node.run) / "tmpfsboot" / "error").read_text()
    assert error.startswith("tmpfsboot: rootsize=50x: ")
    assert "rootsize=50x" in capsys.readouterr().err
    assert not os.path.ismount(target)


@pytest.mark.unit
def test_steps_refuse_a_command_line_without_url_root(node: Node, tmp_path: Path) -> None:
    Path(node.cmdline).write_text("root=/dev/sda1 quiet\n")
    assert main(["fetch", str(tmp_path)], node=node) == 1
    assert "not a tmpfs boot" in (Path(node.run) / "tmpfsboot" / "error").read_text()


@pytest.mark.unit
def test_unknown_step_is_usage_error(node: Node) -> None:
    assert main(["dance", "/root"], node=node) == 2


@pytest.fixture
def tmpfs_target(tmp_path: Path) -> Iterator[Path]:
    target = tmp_path / "newroot"
    target.mkdir()
    yield target
    unmount_if_mounted(target)  # main() mounts it


@pytest.mark.integration
def test_mount_step_mounts_sized_tmpfs_and_writes_initramfs_etc(node: Node,
                                                                tmpfs_target: Path) -> None:
    Path(node.cmdline).write_text("root=http://10.0.2.100/base.tar.zst rootsize=16m\n")
    assert main(["mount", str(tmpfs_target)], node=node) == 0
    mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    entry = next(m for m in mounts if m[1] == str(tmpfs_target))
    assert entry[2] == "tmpfs"
    assert "size=16384k" in entry[3] and "mode=755" in entry[3]
    etc = Path(node.etc)
    assert (etc / "resolv.conf").read_text() == "domain lab.example\nnameserver 10.0.2.3\n"
    assert (etc / "hostname").read_text() == "node7\n"
    assert (Path(node.run) / "tmpfsboot" / "boot.jsonl").exists()


@pytest.mark.integration
def test_boot_side_runs_on_debian_python_with_only_the_stdlib(tmp_path: Path) -> None:
    """Only tmpfsboot/__init__.py and tmpfsboot/boot/ in reach, as in the initramfs."""
    pkg = tmp_path / "tmpfsboot"
    (pkg / "boot").mkdir(parents=True)
    (pkg / "__init__.py").write_text((PACKAGE / "__init__.py").read_text())
    for f in (PACKAGE / "boot").glob("*.py"):
        (pkg / "boot" / f.name).write_text(f.read_text())
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import tmpfsboot.boot.main, tmpfsboot.boot.netconf, tmpfsboot.boot.engine\n"
        "bad = [m.__file__ for m in list(sys.modules.values())\n"
        "       if getattr(m, '__file__', None) and not m.__file__.startswith(\n"
        "           ('/usr/lib/python3.11/', sys.argv[1] + '/tmpfsboot/'))]\n"
        "print(bad)\n"
    )
    out = subprocess.run(["/usr/bin/python3.11", "-I", "-S", "-c", code, str(tmp_path)],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
