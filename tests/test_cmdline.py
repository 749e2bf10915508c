"""The kernel command line parser, from tables of inputs and expected plans."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tmpfsboot.boot.cmdline import (
    Mirror,
    NetFacts,
    Verify,
    mac_from_bootif,
    parse_cmdline,
    parse_rootsize,
    resolve_url,
    split_cmdline,
)
from tmpfsboot.boot.errors import CmdlineError
from tmpfsboot.cli import main

pytestmark = pytest.mark.unit

PLANS = [
    # (command line, layers as mirror lists, substitutions, rootsize, verify, retries, timeout)
    ("root=http://h/a.tar.zst", [["http://h/a.tar.zst"]], [], None, None, None, 60.0),
    ("quiet root=https://h:8443/r/base.tar.xz,http://h/%hostname.tar.gz ro",
     [["https://h:8443/r/base.tar.xz"], ["http://h/%hostname.tar.gz"]], ["hostname"],
     None, None, None, 60.0),
    ('root="http://a/x.tar|http://b/x.tar" rootsize=2g tmpfs.verify=no',
     [["http://a/x.tar", "http://b/x.tar"]], [], "2g", "no", None, 60.0),
    ("root=http://h/%mac/%fqdn-%uuid-%arch-%ip.tar tmpfs.retries=3 tmpfs.timeout=7.5",
     [["http://h/%mac/%fqdn-%uuid-%arch-%ip.tar"]], ["mac", "fqdn", "uuid", "arch", "ip"],
     None, None, 3, 7.5),
    ("root=http://h/a%%b%2F.tar rootsize=75% tmpfs.verify=signature",
     [["http://h/a%%b%2F.tar"]], [], "75%", "signature", None, 60.0),
    ("boot=tmpfs root=http://h/a.tar root=http://h/b.tar", [["http://h/b.tar"]], [], None,
     None, None, 60.0),
]


@pytest.mark.parametrize(("text", "layers", "subs", "rootsize", "verify", "retries", "timeout"),
                         PLANS)
def test_parse_cmdline_builds_plan(text: str, layers: list[list[str]], subs: list[str],
                                   rootsize: str | None, verify: str | None,
                                   retries: int | None, timeout: float) -> None:
    plan = parse_cmdline(text)
    assert plan.tmpfs
    assert [[m.url for m in layer.mirrors] for layer in plan.layers] == layers
    assert list(plan.substitutions) == subs
    assert plan.rootsize == rootsize
    assert (plan.verify.value if plan.verify else None) == verify
    assert plan.retries == retries
    assert plan.timeout == timeout


NOT_OURS = [
    "root=UUID=0f3e-11 ro quiet",
    "root=/dev/nfs nfsroot=10.0.0.1:/srv",
    "boot=local root=http://h/a.tar",
    "",
]


@pytest.mark.parametrize("text", NOT_OURS)
def test_parse_cmdline_leaves_other_boots_alone(text: str) -> None:
    plan = parse_cmdline(text)
    assert not plan.tmpfs
    assert plan.layers == ()


INVALID = [
    # (command line, words the one-line message must name)
    ("root=http://h/%foo.tar", ["%foo"]),
    ("root=http://h/a.tar rootsize=50x", ["rootsize=50x"]),
    ("root=http://h/a.tar rootsize=-1g", ["rootsize=-1g"]),
    ("root=http://h/a.tar rootsize=0", ["rootsize=0"]),
    ("root=http://h/a.tar rootsize=150%", ["rootsize=150%"]),
    ("root=http://h/a.tar,,http://h/b.tar", ["empty layer"]),
    ("root=http://h/a.tar|", ["empty"]),
    ("root=http://h/a.tar,ftp://h/b.tar", ["ftp://h/b.tar"]),
    ("boot=tmpfs root=/dev/sda1", ["root=/dev/sda1"]),
    ("root=http:///a.tar", ["no host"]),
    ("root=http://h/a.tar tmpfs.verify=maybe", ["tmpfs.verify=maybe"]),
    ("root=http://h/a.tar tmpfs.retries=-2", ["tmpfs.retries=-2"]),
    ("root=http://h/a.tar tmpfs.retries=many", ["tmpfs.retries=many"]),
    ("root=http://h/a.tar tmpfs.writers=-1", ["tmpfs.writers=-1"]),
    ("root=http://h/a.tar tmpfs.writers=all", ["tmpfs.writers=all"]),
    ("root=http://h/a.tar tmpfs.timeout=0", ["tmpfs.timeout=0"]),
    ("root=http://h/100%.tar", ["lone %"]),
    ('root="http://h/a.tar', ["unbalanced"]),
]


@pytest.mark.parametrize(("text", "names"), INVALID)
def test_parse_cmdline_rejects_invalid_input_naming_it(text: str, names: list[str]) -> None:
    with pytest.raises(CmdlineError) as info:
        parse_cmdline(text)
    message = str(info.value)
    assert "\n" not in message
    for name in names:
        assert name in message


SIZES = ["4096", "64k", "512M", "2g", "1t", "50%", "100%", "1%"]


@pytest.mark.parametrize("text", SIZES)
def test_rootsize_accepts_what_tmpfs_takes(text: str) -> None:
    assert parse_rootsize(text) == text
    assert parse_cmdline(f"root=http://h/a.tar rootsize={text}").rootsize == text


SPLITS = [
    ("a b\tc\n", (["a", "b", "c"], [])),
    ('root="x|y" quiet', (["root=x|y", "quiet"], [])),
    ('a="b c" d', (["a=b c", "d"], [])),
    ("ro -- single --init-arg", (["ro"], ["single", "--init-arg"])),
]


@pytest.mark.parametrize(("text", "expected"), SPLITS)
def test_split_cmdline_as_the_kernel_does(text: str, expected: tuple[list[str], list[str]]) -> None:
    assert split_cmdline(text) == expected


FACTS = NetFacts(hostname="node7", fqdn="node7.rack2.example", mac="52-54-00-12-34-56",
                 ip="10.0.2.15", arch="amd64", uuid="0e5a1c52-0000-4000-8000-000000000001")

URLS = [
    ("http://h/%hostname.tar.zst", "http://h/node7.tar.zst"),
    ("http://h/%fqdn/%arch/root.tar", "http://h/node7.rack2.example/amd64/root.tar"),
    ("http://h/%mac-%ip.tar", "http://h/52-54-00-12-34-56-10.0.2.15.tar"),
    ("http://h/%uuid.tar", "http://h/0e5a1c52-0000-4000-8000-000000000001.tar"),
    ("http://h/100%%/a%2Fb.tar", "http://h/100%/a%2Fb.tar"),
    # percent-encodings in either case pass through (presigned URLs carry them)
    ("http://h/a%2fb%ab.tar?sig=x%3d%3D", "http://h/a%2fb%ab.tar?sig=x%3d%3D"),
    ("http://h/%hostname%2Dx.tar", "http://h/node7%2Dx.tar"),
]


@pytest.mark.parametrize(("template", "expected"), URLS)
def test_resolve_url_substitutes_facts(template: str, expected: str) -> None:
    plan = parse_cmdline(f"root={template}")
    assert resolve_url(plan.layers[0].mirrors[0], FACTS) == expected


def test_resolve_url_quotes_values_so_they_cannot_add_path_segments() -> None:
    facts = NetFacts(hostname="../../etc?x=1")
    assert resolve_url(Mirror("http://h/%hostname.tar", ("hostname",)), facts) == (
        "http://h/..%2F..%2Fetc%3Fx%3D1.tar")


def test_resolve_url_names_an_unknown_fact() -> None:
    with pytest.raises(CmdlineError, match="%fqdn is unknown"):
        resolve_url(Mirror("http://h/%fqdn.tar", ("fqdn",)), NetFacts(hostname="a"))


@pytest.mark.parametrize(("bootif", "mac"), [
    ("01-52-54-00-AB-CD-EF", "52-54-00-ab-cd-ef"), ("52:54:00:ab:cd:ef", None), ("", None)])
def test_mac_from_bootif(bootif: str, mac: str | None) -> None:
    assert mac_from_bootif(bootif) == mac


def test_verify_default_follows_keyring() -> None:
    assert Verify.default_for("/etc/tmpfsboot/keyring.gpg") is Verify.SIGNATURE
    assert Verify.default_for(None) is Verify.CHECKSUM


def test_cmdline_verb_prints_plan_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cmdline", "root=http://h/a.tar|http://m/a.tar,http://h/%hostname.tar"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["layers"] == [{"mirrors": ["http://h/a.tar", "http://m/a.tar"]},
                              {"mirrors": ["http://h/%hostname.tar"]}]
    assert plan["substitutions"] == ["hostname"]
    assert plan["tmpfs"] is True


@pytest.mark.parametrize("text", ["root=http://h/%foo", "root=http://h/a rootsize=50x"])
def test_cmdline_verb_exits_2_with_one_line(text: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "tmpfsboot", "cmdline", text], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tmpfsboot: error:")
    assert "Traceback" not in proc.stderr
