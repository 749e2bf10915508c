"""The Debian mirror this machine's apt uses, read from /etc/apt/sources.list*.

debootstrap fetches from the mirror apt is configured with, never from a host name
written into tmpfsboot. Both formats apt reads are parsed: one-line `deb URI SUITE COMP...`
(sources.list, *.list) and deb822 stanzas (*.sources). Parsers are pure; reading the
files is `read_apt_sources`'s business.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..boot.errors import UsageError

APT_ETC = Path("/etc/apt")
# Schemes debootstrap can fetch from.
MIRROR_SCHEMES = ("http", "https", "file")


@dataclass(frozen=True)
class AptSource:
    """One binary (`deb`) source: where it is and which suites and components it serves."""

    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]


def parse_one_line_sources(text: str) -> list[AptSource]:
    """`deb [options] URI SUITE [COMPONENT...]` lines; deb-src and comments are skipped."""
    sources: list[AptSource] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        # [ arch=amd64 signed-by=... ] options, with or without spaces inside the brackets
        line = re.sub(r"\[[^\]]*\]", " ", line)
        words = line.split()
        if len(words) >= 3 and words[0] == "deb":
            sources.append(AptSource(words[1], (words[2],), tuple(words[3:])))
    return sources


def _deb822_stanzas(text: str) -> list[dict[str, str]]:
    stanzas: list[dict[str, str]] = []
    fields: dict[str, str] = {}
    key = None
    for line in [*text.splitlines(), ""]:
        if line.startswith("#"):
            continue
        if not line.strip():
            if fields:
                stanzas.append(fields)
            fields, key = {}, None
        elif line[0] in " \t" and key is not None:
            fields[key] += " " + line.strip()  # a continuation line
        elif ":" in line:
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
    return stanzas


def parse_deb822_sources(text: str) -> list[AptSource]:
    """The `Types: deb` stanzas of a .sources file (deb822), one AptSource per URI."""
    sources: list[AptSource] = []
    for fields in _deb822_stanzas(text):
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        suites = tuple(fields.get("suites", "").split())
        components = tuple(fields.get("components", "").split())
        sources.extend(AptSource(uri, suites, components)
                       for uri in fields.get("uris", "").split())
    return sources


def choose_mirror(sources: Sequence[AptSource], suite: str) -> str | None:
    """The URI of the first source serving SUITE itself (not SUITE-security or -updates);
    failing that, of the first archive serving some plain suite with a main component
    (its pool serves the other suites too). None if there is none."""
    usable = [s for s in sources if s.uri.split(":", 1)[0] in MIRROR_SCHEMES]
    for source in usable:
        if suite in source.suites:
            return source.uri.rstrip("/")
    for source in usable:
        if "main" in source.components and any(
                re.fullmatch(r"[a-z]+", s) for s in source.suites):
            return source.uri.rstrip("/")
    return None


def list_source_files(etc: Path = APT_ETC) -> list[Path]:
    """The files apt reads, in apt's order: sources.list, then sources.list.d/*.list and
    *.sources by name (other names, such as *.disabled, apt ignores)."""
    files = [etc / "sources.list"]
    parts = etc / "sources.list.d"
    if parts.is_dir():
        files += sorted(p for p in parts.iterdir()
                        if p.suffix in (".list", ".sources") and p.is_file())
    return [f for f in files if f.is_file()]


def read_apt_sources(files: Iterable[Path]) -> list[AptSource]:
    """Every binary source in FILES, in order."""
    sources: list[AptSource] = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix == ".sources":
            sources += parse_deb822_sources(text)
        else:
            sources += parse_one_line_sources(text)
    return sources


def apt_mirror(suite: str, *, etc: Path = APT_ETC) -> str:
    """The mirror this machine's apt uses for SUITE; UsageError saying what to do if none."""
    files = list_source_files(etc)
    mirror = choose_mirror(read_apt_sources(files), suite)
    if mirror is None:
        where = ", ".join(str(f) for f in files) or f"{etc}/sources.list*"
        raise UsageError(f"no Debian mirror for {suite} in {where}: pass --mirror URL")
    return mirror
