"""The pure header parser: member records from bytes, and one named error for each
invalid header or pax record (tables of inputs and expected results)."""

from __future__ import annotations

import io
import tarfile

import pytest

from tmpfsboot.boot.errors import ArchiveError
from tmpfsboot.boot.tarfields import parse_pax_time, verify_checksum
from tmpfsboot.boot.tarheader import (
    BLOCK,
    DIRECTORY,
    REGULAR,
    HeaderParser,
    Member,
    TypeFlag,
)
from tmpfsboot.boot.tarstream import Reader

pytestmark = pytest.mark.unit


def pax_archive(name: str, records: dict[str, str], data: bytes = b"",
                kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data)
    info.pax_headers = records
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def with_field(archive: bytes, offset: int, value: bytes, *, header: int = 0) -> bytes:
    """ARCHIVE with VALUE written at OFFSET of header number HEADER, checksum redone."""
    raw = bytearray(archive)
    start = header * BLOCK
    raw[start + offset : start + offset + len(value)] = value
    raw[start + 148 : start + 156] = b" " * 8
    raw[start + 148 : start + 155] = b"%06o\0" % sum(raw[start : start + BLOCK])
    return bytes(raw)


def members(archive: bytes) -> list[Member]:
    parser = HeaderParser(Reader(io.BytesIO(archive).readinto))
    found = []
    while (m := parser.next_member()) is not None:
        found.append(m)
        io_skip = m.size + (-m.size % BLOCK)
        parser.read(io_skip)
    return found


def plain(name: str = "x", data: bytes = b"") -> bytes:
    """One ustar member, without an end-of-archive marker."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info.tobuf(tarfile.USTAR_FORMAT) + data + bytes(-len(data) % BLOCK)


BAD_INPUT = [
    (pax_archive("x", {"uid": "abc"}), "tar member 'x': pax uid 'abc' is not a number"),
    (pax_archive("x", {"uid": "-1"}), "tar member 'x': pax uid '-1' is not a number"),
    (pax_archive("x", {"gid": "99999999999"}), "tar member 'x': pax gid 99999999999 is out"),
    (pax_archive("x", {"size": "-512"}), "tar member 'x': pax size '-512' is not a number"),
    (pax_archive("x", {"mtime": "1700000000.\u00e9"}), "tar member 'x': pax mtime"),
    (pax_archive("x", {"mtime": "12abc"}), "tar member 'x': pax mtime '12abc' is not a time"),
    (pax_archive("x", {"path": "a\0b"}), "tar member 'x': pax path contains a NUL byte"),
    (pax_archive("x", {"LIBARCHIVE.xattr.user.a": "!!"}), "is not base64"),
    (pax_archive("x", {"SCHILY.xattr.": "v"}), "names no valid xattr"),
    (with_field(plain(), 124, b"\xff" + b"\xff" * 10 + b"\x00"),
     "tar member 'x': negative base-256 size"),
    (with_field(plain(), 108, b"\x80\x00\x00\x01\x00\x00\x00\x00"),
     "tar member 'x': base-256 uid 4294967296 is out of range"),
    (with_field(plain(), 100, b"07x4\0\0\0\0"), "tar member 'x': mode field '07x4'"),
    (with_field(plain("x", b"data"), 124, b"0000000000x\0"),
     "tar member 'x': size field"),
]


@pytest.mark.parametrize(("archive", "message"), BAD_INPUT)
def test_invalid_field_is_one_archive_error_naming_member_and_field(archive: bytes,
                                                                    message: str) -> None:
    with pytest.raises(ArchiveError) as info:
        members(archive + bytes(1024))
    assert message in str(info.value)


def test_consecutive_pax_headers_the_last_one_wins_not_merged() -> None:
    first = pax_archive("x", {"uid": "7", "path": "first"})[: 2 * BLOCK]  # x header only
    second = pax_archive("x", {"gid": "9"})
    (m,) = members(first + second + bytes(1024))
    assert (m.name, m.uid, m.gid) == ("x", 0, 9)


def test_header_only_member_with_a_size_reads_no_data() -> None:
    dir_with_size = with_field(tarfile.TarInfo("d").tobuf(tarfile.GNU_FORMAT), 156, b"5")
    dir_with_size = with_field(dir_with_size, 124, b"00000001000\0")
    parsed = members(dir_with_size + plain("after") + bytes(1024))
    assert [(m.name, m.kind, m.size) for m in parsed] == [("d", DIRECTORY, 0),
                                                          ("after", REGULAR, 0)]


def test_unknown_typeflag_is_a_regular_file_and_v7_slash_a_directory() -> None:
    unknown = with_field(plain("u", b"data"), 156, b"A")
    v7_dir = with_field(plain("v/"), 156, b"\0")
    parsed = members(unknown + v7_dir + bytes(1024))
    assert [(m.name, m.kind, m.size) for m in parsed] == [("u", REGULAR, 4),
                                                          ("v/", DIRECTORY, 0)]


def test_type_flags_are_named() -> None:
    assert TypeFlag(b"S") is TypeFlag.GNU_SPARSE and TypeFlag.PAX.value == b"x"


@pytest.mark.parametrize(("text", "ns"), [
    (b"1700000000", 1_700_000_000_000_000_000),
    (b"1700000000.5", 1_700_000_000_500_000_000),
    (b"-1.25", -1_250_000_000),
    (b"0.0000000019", 1),
])
def test_pax_time_in_nanoseconds(text: bytes, ns: int) -> None:
    assert parse_pax_time(text, "x") == ns


def test_checksum_accepts_old_signed_sums() -> None:
    header = bytearray(with_field(plain("\u00e9t\u00e9"), 0, b"\xe9t\xe9"))
    signed = sum(b - 256 if b > 127 else b for b in header[:148] + b" " * 8 + header[156:])
    header[148:156] = b"%06o\0 " % signed
    assert verify_checksum(bytes(header))
    header[0] ^= 1
    assert not verify_checksum(bytes(header))
