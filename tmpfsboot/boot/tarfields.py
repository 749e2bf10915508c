"""Fields of tar headers and pax records: numbers, names, times, checksums, xattr
records and sparse maps, each parsed in full, every invalid one an ArchiveError naming
member and field. Pure functions over bytes, used by tarheader's HeaderParser."""

from __future__ import annotations

import base64
import binascii
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING
from zlib import adler32

from .errors import ArchiveError

if TYPE_CHECKING:
    from .tarheader import Member

MAX_ID = (1 << 32) - 2  # uid/gid: (uid_t)-1 means "unchanged" to chown
MAX_NUMBER = (1 << 62) - 1  # sizes, offsets, seconds: what off_t and time_t hold
MAX_SPARSE_ENTRIES = 1 << 20
BLOCK = 512


def fail(name: str | bytes, what: str) -> ArchiveError:
    """The error for member NAME (or the member whose header block NAME is)."""
    if isinstance(name, bytes):
        name = header_name(name)
    return ArchiveError(f"tar member {name!r}: {what}")


def cstr(data: bytes) -> bytes:
    """DATA up to its first NUL."""
    end = data.find(0)
    return data if end < 0 else data[:end]


def field_text(data: bytes) -> str:
    """A NUL-terminated text field, undecodable bytes kept as surrogates."""
    return cstr(data).decode("utf-8", "surrogateescape")


def parse_number(field: bytes, name: str | bytes, what: str, *, signed: bool = False,
                 limit: int = MAX_NUMBER) -> int:
    """A numeric header field: octal text (space or NUL padded), or GNU base-256."""
    first = field[0]
    if first & 0x80:
        value = int.from_bytes(field, "big") & ~(0xFF << (8 * len(field) - 8))
        if first == 0xFF:  # negative base-256 (two's complement)
            value -= 1 << (8 * len(field) - 8)
            if not signed:
                raise fail(name, f"negative base-256 {what}")
        elif first != 0x80:
            raise fail(name, f"corrupt base-256 {what}")
        if abs(value) > limit:
            raise fail(name, f"base-256 {what} {value} is out of range")
        return value
    text = cstr(field).strip(b" ")
    if not text:
        return 0
    if text.translate(None, b"01234567"):
        raise fail(name, f"{what} field {text.decode('latin-1')!r} is not an octal number")
    return int(text, 8)


def header_name(block: bytes) -> str:
    """The name a header gives itself (for error messages)."""
    name = cstr(block[0:100])
    if block[257:263] == b"ustar\0" and block[345]:
        name = cstr(block[345:500]) + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def unsigned_sum(block: bytes | bytearray) -> int:
    """The sum of a block's 512 bytes: zlib's adler32 sums in C, exactly while the sum
    stays below its modulus 65521 (256 bytes sum to at most 65280)."""
    return (adler32(block[:256]) & 0xFFFF) + (adler32(block[256:]) & 0xFFFF) - 2


def verify_checksum(block: bytes) -> bool:
    """The header checksum, over unsigned bytes (or signed, as some old tars summed)."""
    field = block[148:156]
    total = unsigned_sum(block) - sum(field) + 256
    try:
        stored = parse_number(field, "", "checksum")
    except ArchiveError:
        return False
    if total == stored:
        return True
    signed = total - 256 * sum(1 for b in block[:148] if b & 0x80)
    signed -= 256 * sum(1 for b in block[156:] if b & 0x80)
    return signed == stored


def checksum_ok(block: bytes | bytearray) -> bool:
    """The checksum spelt "%06o\\0 " (GNU tar, pax) and right, computed once; any other
    spelling, a signed sum or the end-of-archive block are for `verify_checksum`."""
    field = block[148:154]
    if block.isascii():  # then the sum is below adler32's modulus: one call sums it all
        total = (adler32(block) & 0xFFFF) - 1
    else:
        total = (adler32(block[:256]) & 0xFFFF) + (adler32(block[256:]) & 0xFFFF) - 2
    try:
        return (field.isdigit() and block[154] == 0
                and int(field, 8) == total - sum(block[148:156]) + 256)
    except ValueError:  # an 8 or a 9
        return False


def checksum_adler(digits: bytes) -> int:
    """What zlib's adler32 gives, in its low 16 bits, for an ASCII header block whose
    checksum field, DIGITS (six octal digits, then "\\0 "), is right: one plus the sum of
    its bytes (512 bytes under 128 sum to less than adler32's modulus). The fast path's
    `checksum_ok`; cached, as a root's headers share a few thousand checksums."""
    # the field is summed as eight spaces (256), not as its digits, NUL and space
    adler = int(digits, 8) + sum(digits) + 32 - 256 + 1
    if len(CHECKSUM_ADLERS) < 1 << 16:
        CHECKSUM_ADLERS[digits] = adler
    return adler


CHECKSUM_ADLERS: dict[bytes, int] = {}  # checksum field digits -> `checksum_adler`


FRACTION_SCALE = tuple(10 ** (9 - n) for n in range(10))  # nanoseconds per unit of a
# pax time's fraction of N digits


def pax_decimal(value: bytes, name: str, key: str, *, limit: int) -> int:
    """A pax record's non-negative decimal VALUE, at most LIMIT."""
    if not value.isdigit():
        raise fail(name, f"pax {key} {value.decode('latin-1')!r} is not a number")
    number = int(value)
    if number > limit:
        raise fail(name, f"pax {key} {number} is out of range")
    return number


def parse_pax_time(value: bytes, name: str, key: str = "mtime") -> int:
    """A pax time `[-]SECONDS[.FRACTION]` in nanoseconds."""
    whole, dot, frac = value.partition(b".")
    negative = whole.startswith(b"-")
    digits = whole[1:] if negative else whole
    if not digits.isdigit() or (dot and not frac.isdigit()) or len(digits) > 18:
        raise fail(name, f"pax {key} {value.decode('latin-1')!r} is not a time")
    ns = int(digits) * 1_000_000_000 + int((frac + b"000000000")[:9] if frac else b"0")
    return -ns if negative else ns


def parse_pax(data: bytes, name: str | bytes = "") -> list[tuple[str, bytes]]:
    """Pax records `LEN KEY=VALUE\\n` in order (GNU sparse 0.0 repeats keys)."""
    records: list[tuple[str, bytes]] = []
    pos, end = 0, len(data)
    while pos < end:
        if data[pos] == 0:
            break  # NUL padding after the records
        space = data.find(b" ", pos, pos + 21)
        length_text = data[pos:space]
        if space < 0 or not length_text.isdigit():
            raise fail(name, "corrupt pax header: bad record length")
        stop = pos + int(length_text)
        if stop > end or stop <= space + 1 or data[stop - 1] != 0x0A:
            raise fail(name, "corrupt pax header: record overruns or lacks its newline")
        key, eq, value = data[space + 1 : stop - 1].partition(b"=")
        if not eq or not key:
            raise fail(name, "corrupt pax header: record without '='")
        records.append((key.decode("utf-8", "surrogateescape"), value))
        pos = stop
    return records


def pax_name(value: bytes, name: str, key: str) -> str:
    """A pax path or linkpath: no NUL byte in it."""
    if 0 in value:
        raise fail(name, f"pax {key} contains a NUL byte")
    return value.decode("utf-8", "surrogateescape")


def xattr_record(key: str, value: bytes, name: str) -> tuple[str, bytes]:
    """(xattr name, value) of a SCHILY/LIBARCHIVE/RHT xattr record."""
    if key.startswith("SCHILY.xattr."):
        xname = key[13:]
    elif key.startswith("LIBARCHIVE.xattr."):
        xname = urllib.parse.unquote(key[17:], errors="surrogateescape")
        try:
            value = base64.b64decode(value + b"=" * (-len(value) % 4), validate=True)
        except binascii.Error:
            raise fail(name, f"pax {key} is not base64") from None
    else:  # RHT.security.selinux: the context as text; GNU tar sets it with its NUL
        xname = "security.selinux"
        value = value if value.endswith(b"\0") else value + b"\0"
    if not xname or "\0" in xname:
        raise fail(name, f"pax {key!r} names no valid xattr")
    return xname, value


def sparse_map(pairs: list[int], name: str, realsize: int) -> list[tuple[int, int]]:
    """A GNU sparse map, PAIRS being its offsets and lengths in turn, checked against a
    file of REALSIZE bytes: (offset, length) pieces in order."""
    if len(pairs) % 2:
        raise fail(name, "GNU.sparse map has an odd number of values")
    result = []
    last = 0
    for i in range(0, len(pairs), 2):
        offset, length = pairs[i], pairs[i + 1]
        if offset < last or offset + length > realsize:
            raise fail(name, f"sparse map entry {offset},{length} is out of order or range")
        last = offset + length
        result.append((offset, length))
    return result


def read_sparse_map(read: Callable[[int], bytes], member: Member) -> int:
    """Read a pax 1.0 sparse map from the start of MEMBER's data; returns bytes read."""
    buf = b""
    numbers: list[int] = []
    want = -1
    while want < 0 or len(numbers) < want:
        block = read(BLOCK)
        if len(block) < BLOCK:
            raise fail(member.name, "truncated archive inside the sparse map")
        buf += block
        lines = buf.split(b"\n")
        numbers = []
        for line in lines[:-1]:
            if not line.isdigit():
                raise fail(member.name, "corrupt sparse map")
            numbers.append(int(line))
        if numbers and want < 0:
            want = 1 + 2 * numbers[0]
            if numbers[0] > MAX_SPARSE_ENTRIES:
                raise fail(member.name, "sparse map too large")
        if len(buf) > member.size:
            raise fail(member.name, "sparse map overruns the member")
    member.sparse = sparse_map(numbers[1:want], member.name, member.realsize)
    member.size -= len(buf)
    member.sparse_map_in_data = False
    return len(buf)
