"""The Debian mirror apt uses, from sources.list and deb822 .sources (tmpfsboot.host.aptsources)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tmpfsboot.boot.errors import UsageError
from tmpfsboot.host.aptsources import (
    AptSource,
    apt_mirror,
    choose_mirror,
    parse_deb822_sources,
    parse_one_line_sources,
)
from tmpfsboot.host.debootstrap import DebootstrapSpec

pytestmark = pytest.mark.unit

ONE_LINE_CASES = [
    ("deb http://mirror.example/debian bookworm main contrib\n",
     [AptSource("http://mirror.example/debian", ("bookworm",), ("main", "contrib"))]),
    ("# deb http://old.example/debian buster main\n"
     "deb-src http://mirror.example/debian bookworm main\n"
     "deb [arch=amd64 signed-by=/k.gpg] https://m.example/debian/ bookworm main # fast\n",
     [AptSource("https://m.example/debian/", ("bookworm",), ("main",))]),
    ("deb [ trusted=yes ] file:/srv/mirror ./\n", [AptSource("file:/srv/mirror", ("./",), ())]),
    ("", []),
]


@pytest.mark.parametrize(("text", "expected"), ONE_LINE_CASES)
def test_parse_one_line_sources(text: str, expected: list[AptSource]) -> None:
    assert parse_one_line_sources(text) == expected


DEB822 = """\
Types: deb deb-src
# a comment inside a stanza
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main

Types: deb
Enabled: no
URIs: http://disabled.example/debian
Suites: bookworm
Components: main

Types: deb-src
URIs: http://src.example/debian
Suites: bookworm
Components: main
"""


def test_parse_deb822_sources_skips_disabled_and_source_stanzas() -> None:
    assert parse_deb822_sources(DEB822) == [
        AptSource("http://mirror.example/debian", ("bookworm", "bookworm-updates"), ("main",)),
        AptSource("http://mirror.example/debian-security", ("bookworm-security",), ("main",)),
    ]


SOURCES = parse_deb822_sources(DEB822)
CHOOSE_CASES = [
    (SOURCES, "bookworm", "http://mirror.example/debian"),
    (SOURCES, "bookworm-security", "http://mirror.example/debian-security"),
    (SOURCES, "trixie", "http://mirror.example/debian"),  # the archive serves other suites
    ([AptSource("cdrom:[Debian]/", ("bookworm",), ("main",))], "bookworm", None),
    ([AptSource("https://vendor.example/apt", ("cloud-sdk-bookworm",), ("main",))],
     "bookworm", None),
    ([], "bookworm", None),
]


@pytest.mark.parametrize(("sources", "suite", "expected"), CHOOSE_CASES)
def test_choose_mirror(sources: list[AptSource], suite: str, expected: str | None) -> None:
    assert choose_mirror(sources, suite) == expected


def test_apt_mirror_reads_list_and_sources_files_as_apt_does(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text("# emptied by the installer\n")
    (tmp_path / "sources.list.d/debian.sources").write_text(DEB822)
    (tmp_path / "sources.list.d/a.list.disabled").write_text(
        "deb http://ignored.example/debian bookworm main\n")
    assert apt_mirror("bookworm", etc=tmp_path) == "http://mirror.example/debian"
    (tmp_path / "sources.list.d/debian.sources").unlink()
    with pytest.raises(UsageError, match=r"no Debian mirror for bookworm in .*pass --mirror"):
        apt_mirror("bookworm", etc=tmp_path)


def test_debootstrap_cache_name_changes_with_every_ingredient() -> None:
    base = DebootstrapSpec("bookworm", "minbase", ("systemd-sysv", "udev"))
    names = {spec.cache_name(arch) for spec, arch in [
        (base, "amd64"), (base, "arm64"),
        (DebootstrapSpec("trixie", "minbase", ("systemd-sysv", "udev")), "amd64"),
        (DebootstrapSpec("bookworm", "buildd", ("systemd-sysv", "udev")), "amd64"),
        (DebootstrapSpec("bookworm", "minbase", ("systemd-sysv",)), "amd64")]}
    assert len(names) == 5
    assert DebootstrapSpec("bookworm", "minbase", ("udev", "systemd-sysv")).cache_name(
        "amd64") == base.cache_name("amd64")
