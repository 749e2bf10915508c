"""Tar headers to member records: pure parsing, no file system.

Reads v7, old GNU, GNU, ustar (with prefix), pax (`x`, `g`), Solaris `X` and star
headers, GNU long names and links, and every GNU sparse format (old GNU `S` with its
extension blocks, pax 0.0, 0.1 and 1.0). Bytes come in through a READ callable (exact
reads, b"" at a clean end); `Member` records come out. Every invalid header or pax record
is an ArchiveError naming the member and the field.

Built for speed (one pass over each 512-byte header, the checksum computed once, the
common all-octal numeric fields parsed without a helper call per field), as GNU tar-like
throughput is the goal: a root has tens of thousands of members. The fields themselves
(numbers, times, names, pax records, checksums) are parsed in tarfields.py.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass
from zlib import adler32

from .errors import ArchiveError
from .tarfields import (
    BLOCK,
    CHECKSUM_ADLERS,
    FRACTION_SCALE,
    MAX_ID,
    MAX_NUMBER,
    MAX_SPARSE_ENTRIES,
    checksum_adler,
    checksum_ok,
    cstr,
    fail,
    parse_number,
    parse_pax,
    parse_pax_time,
    pax_decimal,
    pax_name,
    sparse_map,
    verify_checksum,
    xattr_record,
)
from .tarstream import Reader

ZERO_BLOCK = bytes(BLOCK)
MAX_EXTENSION = 64 << 20  # the largest pax or long-name header we accept


class TypeFlag(bytes, enum.Enum):
    """The typeflag byte of a tar header (POSIX, GNU, star, Solaris)."""

    REGULAR = b"0"
    AREGULAR = b"\0"  # v7 and pre-POSIX regular file
    HARDLINK = b"1"
    SYMLINK = b"2"
    CHAR = b"3"
    BLOCK = b"4"
    DIRECTORY = b"5"
    FIFO = b"6"
    CONTIGUOUS = b"7"  # a regular file everywhere that matters
    PAX = b"x"
    PAX_GLOBAL = b"g"
    SOLARIS_PAX = b"X"
    GNU_LONGNAME = b"L"
    GNU_LONGLINK = b"K"
    GNU_SPARSE = b"S"
    GNU_DUMPDIR = b"D"
    GNU_VOLUME = b"V"
    GNU_MULTIVOL = b"M"


# Kinds a Member carries: the typeflag byte as an int, normalized (every regular-file
# flag, and every flag GNU tar does not know, become REGULAR; trailing-slash regular
# files and dump directories become DIRECTORY).
REGULAR = TypeFlag.REGULAR[0]
HARDLINK = TypeFlag.HARDLINK[0]
SYMLINK = TypeFlag.SYMLINK[0]
CHAR = TypeFlag.CHAR[0]
BLOCKDEV = TypeFlag.BLOCK[0]
DIRECTORY = TypeFlag.DIRECTORY[0]
FIFO = TypeFlag.FIFO[0]
SKIP = TypeFlag.GNU_VOLUME[0]  # nothing to extract (volume labels, continuations)

_PAX = frozenset(f[0] for f in (TypeFlag.PAX, TypeFlag.SOLARIS_PAX))
_EXTENSIONS = frozenset(f[0] for f in (TypeFlag.PAX, TypeFlag.SOLARIS_PAX,
                                       TypeFlag.PAX_GLOBAL, TypeFlag.GNU_LONGNAME,
                                       TypeFlag.GNU_LONGLINK))
# Flags whose size field says nothing about data that follows (GNU tar reads none).
_HEADER_ONLY = frozenset((HARDLINK, SYMLINK, CHAR, BLOCKDEV, DIRECTORY, FIFO))
_KNOWN = frozenset(f[0] for f in TypeFlag)
_REGULAR_FLAGS = frozenset((REGULAR, 0, TypeFlag.CONTIGUOUS[0]))
_SKIPPED = frozenset((SKIP, TypeFlag.GNU_MULTIVOL[0]))
_OCTAL_OR_PAD = b"01234567 \0"

# The fast path (`_fast`): the shape `image build` gives almost every member, a plain
# ustar header of a file or directory (octal fields, no prefix, the checksum spelt
# "%06o\0 ", ASCII) after a pax header holding only an mtime when the mtime has a
# fraction. One match checks the fields of the blocks, one checksum each block, and they
# give the same member `_general` gives for the same bytes (tests/test_tarfast.py);
# anything else, odd or merely rarer, is left to `_general`. A member's header is matched
# from its name to its prefix, every field at its place: the name (up to its first NUL, as
# `cstr` reads it), mode+uid+gid, size, mtime, checksum, typeflag, an empty link name,
# the magic, and an empty prefix (owner names and device numbers are not read).
_FILE_FIELDS = (rb"(?=([^\0]{1,100})).{100}([0-7]{7}\0[0-7]{7}\0[0-7]{7})\0([0-7]{11})\0"
                rb"([0-7]{11})\0([0-7]{6})\0 ([05])\0.{99}ustar\x0000.{80}\0")
_FILE_BLOCK = re.compile(_FILE_FIELDS, re.DOTALL)


def _pax_mtime_and_file(length: int) -> re.Pattern[bytes]:
    """A pax header with one mtime record of LENGTH bytes, from its size field on (size,
    mtime, checksum, typeflag x), its record, and the member's header after it: so the
    three blocks take one match. The record is "LENGTH mtime=SECONDS[.FRACTION]\\n"."""
    value = length - len(b"%d mtime=" % length) - 1  # the digits and the dot
    return re.compile(b"%011o" % length + rb"\0.{12}([0-7]{6})\0 x.{355}"
                      + b"%d mtime=(?=[0-9.]{%d}\n)" % (length, value)
                      + rb"(\d{1,18})(?:\.(\d{1,9}))?\n" + b".{%d}" % (BLOCK - length)
                      + _FILE_FIELDS, re.DOTALL)


# `_pax_mtime_and_file(n).match` by the last two digits of the pax header's size field, as
# the int `(block[133] << 8) | block[134]`; compiled when first seen (see `_pax_matcher`)
_PAX_MATCHERS: dict[int, Callable[[bytearray, int], re.Match[bytes] | None]] = {}
_PAX_LENGTHS = {(b"%02o" % n)[0] << 8 | (b"%02o" % n)[1]: n
                for n in range(len("11 mtime=1\n"), 64)}  # an mtime record is short


def _pax_matcher(key: int) -> Callable[[bytearray, int], re.Match[bytes] | None] | None:
    """The matcher for pax headers whose size field ends in KEY's digits; None for no
    mtime record length. Compiled on demand: a root's records come in a few lengths
    (its seconds' digits, one to nine of a fraction), and compiling all would take more
    of the start-up than their matching saves on a small archive."""
    length = _PAX_LENGTHS.get(key)
    if length is None:
        return None
    match = _PAX_MATCHERS[key] = _pax_mtime_and_file(length).match
    return match


_ZERO_SIZE = b"0" * 11
_FAST_HEADERS = 3 * BLOCK  # a pax header, its record block and the member's header

FastMember = tuple[str, int, int, int, int, int, int]
FastRun = tuple[str, int, int, int, int, int, int, int]  # FastMember, then where its data is


@dataclass(slots=True)
class Member:
    """One archive member, ready to extract.

    SIZE is the number of data bytes that follow the header in the archive (0 for
    header-only kinds); SPARSE, when not None, maps those bytes to (offset, length)
    pieces of a file of REALSIZE bytes; SPARSE_MAP_BLOCKS says the map (pax 1.0) still
    sits at the start of the data and must be read with tarfields' `read_sparse_map` first.
    """

    name: str
    kind: int
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] | None = None
    acls: dict[str, str] | None = None
    sparse: list[tuple[int, int]] | None = None
    realsize: int = 0
    sparse_map_in_data: bool = False


class HeaderParser:
    """Turns a tar stream, read through READER, into Member records, one per
    `next_member()`; `next_fast()` gives what `image build` writes as plain tuples."""

    def __init__(self, reader: Reader) -> None:
        self.reader = reader
        self.read = reader.read
        self.global_pax: dict[str, bytes] = {}
        self.count = 0
        self._ids: dict[bytes, tuple[int, int, int]] = {}  # raw fields -> `_parse_ids`

    def next_member(self) -> Member | None:
        """The next member; None at the end-of-archive block. Raises ArchiveError."""
        fast = self.next_fast()
        if fast is not None:
            return Member(*fast)
        return self.next_general()

    def next_general(self) -> Member | None:
        """The next member, of any format, parsed in full (None at the end)."""
        return self._general(self.read(BLOCK), None)

    def next_fast(self) -> FastMember | None:
        """The next member as (name, kind, mode, uid, gid, size, mtime_ns) if it has the
        shape `image build` gives almost every member, else None with nothing consumed.
        Its data is left to read."""
        run = self._fast(whole=False)
        return run[0][:7] if run else None

    def fast_run(self) -> list[FastRun]:
        """The next members of that shape that lie whole in the reader's buffer, headers
        and data, as (name, kind, mode, uid, gid, size, mtime_ns, at), their data being
        `reader.buf[at : at + size]`; the reader moves past them all. Empty when the next
        member is of another shape, or not whole in the buffer."""
        return self._fast(whole=True)

    def _fast(self, *, whole: bool) -> list[FastRun]:
        """The members of the fast path's shape (see `_FILE_FIELDS`) whole in the buffer,
        in one loop (each step here is paid for each member of a root); when not WHOLE,
        the next one, its data left to read."""
        reader = self.reader
        found: list[FastRun] = []
        if (reader.end - reader.pos < _FAST_HEADERS and reader.ensure(_FAST_HEADERS)
                < _FAST_HEADERS) or self.global_pax:
            return found  # near the end of the stream: the general path reads it
        buf, pos, end, known_ids = reader.buf, reader.pos, reader.end, self._ids
        adlers, pax_matchers, file_match = CHECKSUM_ADLERS, _PAX_MATCHERS, _FILE_BLOCK.match
        append, short = found.append, 0
        while end - pos >= _FAST_HEADERS:
            at = pos
            if buf[at + 156] == 0x78:  # x: a pax header, its one record an mtime
                key = buf[at + 133] << 8 | buf[at + 134]
                match = pax_matchers.get(key) or _pax_matcher(key)
                header = None if match is None else match(buf, at + 124)
                if header is None:
                    break
                (checksum, seconds, fraction, name, raw_ids, size_field, _, file_checksum,
                 flag) = header.groups()
                block = buf[at : at + BLOCK]
                if (not block.isascii() or adler32(block) & 0xFFFF
                        != (adlers.get(checksum) or checksum_adler(checksum))):
                    break
                # SECONDS.FRACTION: the digits as one number, scaled to nanoseconds
                mtime_ns = (int(seconds + fraction) * FRACTION_SCALE[len(fraction)]
                            if fraction else int(seconds) * 1_000_000_000)
                at += 2 * BLOCK
            else:
                header = file_match(buf, at)
                if header is None:
                    break
                name, raw_ids, size_field, seconds, file_checksum, flag = header.groups()
                mtime_ns = int(seconds, 8) * 1_000_000_000
            block = buf[at : at + BLOCK]
            if ((flag == b"0" and name[-1] == 0x2F)
                    or (flag == b"5" and size_field != _ZERO_SIZE) or not block.isascii()
                    or adler32(block) & 0xFFFF
                    != (adlers.get(file_checksum) or checksum_adler(file_checksum))):
                break
            size = int(size_field, 8)
            stop = at = at + BLOCK
            if whole and (stop := at + size + (-size % BLOCK)) > end:
                short = 0 if found or stop - pos > len(buf) else stop - pos
                break
            append((name.decode(), flag[0],
                    *(known_ids.get(raw_ids) or self._parse_ids(raw_ids)), size, mtime_ns, at))
            pos = stop
            if not whole:
                break
        reader.pos = pos
        self.count += len(found)
        if short and reader.ensure(short) >= short:  # a small file cut by the buffer's end
            return self._fast(whole=True)
        return found

    def _parse_ids(self, raw: bytes) -> tuple[int, int, int]:
        """Mode, uid and gid from their three fields, RAW (as `_FILE_FIELDS` matched them)."""
        ids = (int(raw[0:7], 8) & 0o7777, int(raw[8:15], 8), int(raw[16:23], 8))
        if len(self._ids) < 1024:  # a root repeats a handful
            self._ids[raw] = ids
        return ids

    def _general(self, block: bytes, pax: list[tuple[str, bytes]] | None) -> Member | None:
        """The next member, BLOCK being its first header block (any format)."""
        long_name: bytes | None = None
        long_link: bytes | None = None
        read = self.read
        while True:
            if len(block) < BLOCK:
                if pax is None and long_name is None and long_link is None and not block:
                    raise ArchiveError(f"truncated archive: no end-of-archive marker after "
                                       f"{self.count} members")
                raise ArchiveError(f"truncated archive: the stream ended inside a header "
                                   f"after {self.count} members")
            if not checksum_ok(block):
                if block == ZERO_BLOCK:
                    return None  # end of archive (one zero block is enough, as for tar)
                if not verify_checksum(block):
                    raise fail(block, f"corrupt tar header (checksum mismatch, after "
                                f"{self.count} members)")
            flag = block[156]
            if flag not in _EXTENSIONS:
                self.count += 1
                return self._member(block, flag, pax, long_name, long_link)
            field = block[124:135]
            try:
                size = int(field, 8) if field.isdigit() and block[135] in (0, 32) else -1
            except ValueError:
                size = -1
            if size < 0:
                size = parse_number(block[124:136], block, "size")
            if size > MAX_EXTENSION:
                raise fail(block, f"{size}-byte extended header")
            padded = size + (-size % BLOCK)
            data = read(padded)
            if len(data) < padded:
                raise fail(block, "truncated archive inside an extended header")
            if flag == 0x78 or flag == 0x58:  # x, X: consecutive ones: the last wins
                pax = parse_pax(data[:size], block)
            elif flag == 0x67:  # g
                self.global_pax.update(parse_pax(data[:size], block))
            elif flag == 0x4C:  # L
                long_name = cstr(data[:size])
            else:
                long_link = cstr(data[:size])
            block = read(BLOCK)

    def _member(self, block: bytes, flag: int, pax: list[tuple[str, bytes]] | None,
                long_name: bytes | None, long_link: bytes | None) -> Member:
        if long_name is None:
            raw_name = block[0:100]
            end = raw_name.find(0)
            if end >= 0:
                raw_name = raw_name[:end]
            if block[345] and block[257:263] == b"ustar\0":
                # the POSIX prefix (star's is shorter: its atime and ctime follow)
                prefix = block[345:476] if block[508:512] == b"tar\0" else block[345:500]
                raw_name = cstr(prefix) + b"/" + raw_name
        else:
            raw_name = long_name
        name = raw_name.decode("utf-8", "surrogateescape")
        nums = block[100:148]
        if not nums.translate(None, _OCTAL_OR_PAD):
            nums = nums.replace(b"\0", b" ")
            try:  # the common case: plain octal fields, parsed inline
                mode, uid, gid = int(nums[0:8], 8), int(nums[8:16], 8), int(nums[16:24], 8)
                size, mtime = int(nums[24:36], 8), int(nums[36:48], 8)
            except ValueError:
                mode, uid, gid, size, mtime = self._numbers(block, name)
            else:
                if len(self._ids) < 1024:
                    self._ids[block[100:124]] = (mode & 0o7777, uid, gid)
        else:
            mode, uid, gid, size, mtime = self._numbers(block, name)
        m = Member(name, flag, mode & 0o7777, uid, gid, size, mtime * 1_000_000_000)
        if flag in _REGULAR_FLAGS or flag not in _KNOWN:
            m.kind = REGULAR  # unknown flags too: POSIX says extract them as files
        elif flag == 0x44:  # GNU dumpdir: a directory whose data lists its entries
            m.kind = DIRECTORY
        elif flag in _HEADER_ONLY:
            m.size = 0
            if flag in (HARDLINK, SYMLINK):
                m.linkname = (long_link if long_link is not None
                              else cstr(block[157:257])).decode("utf-8", "surrogateescape")
            elif flag in (CHAR, BLOCKDEV):
                m.devmajor = parse_number(block[329:337], name, "devmajor", limit=MAX_ID)
                m.devminor = parse_number(block[337:345], name, "devminor", limit=MAX_ID)
        elif flag == 0x53:  # S: old GNU sparse
            self._old_gnu_sparse(m, block)
        else:
            m.kind = SKIP
        if pax and len(pax) == 1 and pax[0][0] == "mtime" and pax[0][1] and not self.global_pax:
            m.mtime_ns = parse_pax_time(pax[0][1], name)  # what image build writes, mostly
        elif self.global_pax or pax:
            records = pax or []
            if self.global_pax:  # a per-file record, even an empty one, overrides
                own = {key for key, _ in records}
                records = [r for r in self.global_pax.items() if r[0] not in own] + records
            self._apply_pax(m, records, flag)
        if flag in _REGULAR_FLAGS and m.name.endswith("/") and m.sparse is None:
            m.kind = DIRECTORY  # v7 and BSD tar: a trailing slash means a directory
            m.size = 0  # and, as for every directory, GNU tar reads no data for it
        return m

    @staticmethod
    def _numbers(block: bytes, name: str) -> tuple[int, int, int, int, int]:
        return (parse_number(block[100:108], name, "mode"),
                parse_number(block[108:116], name, "uid", limit=MAX_ID),
                parse_number(block[116:124], name, "gid", limit=MAX_ID),
                parse_number(block[124:136], name, "size"),
                parse_number(block[136:148], name, "mtime", signed=True))

    def _old_gnu_sparse(self, m: Member, block: bytes) -> None:
        m.kind = REGULAR
        m.realsize = parse_number(block[483:495], m.name, "sparse realsize")
        pairs: list[int] = []
        entries, extended = block[386:482], block[482]
        while True:
            for i in range(0, len(entries), 24):
                if not entries[i]:
                    break
                pairs.append(parse_number(entries[i : i + 12], m.name, "sparse offset"))
                pairs.append(parse_number(entries[i + 12 : i + 24], m.name, "sparse length"))
            if not extended:
                break
            if len(pairs) > 2 * MAX_SPARSE_ENTRIES:
                raise fail(m.name, "sparse map too large")
            ext = self.read(BLOCK)
            if len(ext) < BLOCK:
                raise fail(m.name, "truncated archive inside the sparse extension headers")
            entries, extended = ext[0:504], ext[504]
        m.sparse = sparse_map(pairs, m.name, m.realsize)

    def _apply_pax(self, m: Member, records: list[tuple[str, bytes]], flag: int) -> None:
        sparse_pairs: list[int] | None = None
        sparse_major = -1
        name = m.name
        for key, value in records:
            if key == "mtime" and value:  # first: image build writes one on every member
                m.mtime_ns = parse_pax_time(value, name)
            elif key == "path":  # even empty: GNU tar then fails on the nameless member
                m.name = name = pax_name(value, name, key)
            elif not value:
                continue  # an empty value removes the record: the header's field stands
            elif key == "linkpath":
                if m.kind in (HARDLINK, SYMLINK):
                    m.linkname = pax_name(value, name, key)
            elif key == "size":
                size = pax_decimal(value, name, key, limit=MAX_NUMBER)
                if flag not in _HEADER_ONLY:
                    m.size = size
            elif key == "uid":
                m.uid = pax_decimal(value, name, key, limit=MAX_ID)
            elif key == "gid":
                m.gid = pax_decimal(value, name, key, limit=MAX_ID)
            elif key.startswith(("SCHILY.xattr.", "LIBARCHIVE.xattr.", "RHT.security.selinux")):
                if m.xattrs is None:
                    m.xattrs = {}
                xkey, xvalue = xattr_record(key, value, name)
                m.xattrs[xkey] = xvalue
            elif key == "SCHILY.acl.access" or key == "SCHILY.acl.default":
                if m.acls is None:
                    m.acls = {}
                m.acls[key[11:]] = value.decode("utf-8", "surrogateescape")
            elif key == "SCHILY.devmajor" and m.kind in (CHAR, BLOCKDEV):
                m.devmajor = pax_decimal(value, name, key, limit=MAX_ID)
            elif key == "SCHILY.devminor" and m.kind in (CHAR, BLOCKDEV):
                m.devminor = pax_decimal(value, name, key, limit=MAX_ID)
            elif key.startswith("GNU.sparse."):
                sparse_pairs, sparse_major = self._sparse_record(
                    m, key[11:], value, sparse_pairs, sparse_major)
        if sparse_pairs is not None or sparse_major >= 0:
            if m.kind != REGULAR:
                raise fail(m.name, "GNU.sparse records on a member that is not a file")
            if sparse_major == 1:
                m.sparse_map_in_data = True
            else:
                m.sparse = sparse_map(sparse_pairs or [], m.name, m.realsize)

    def _sparse_record(self, m: Member, key: str, value: bytes, pairs: list[int] | None,
                       major: int) -> tuple[list[int] | None, int]:
        name = m.name
        if key == "name":
            m.name = pax_name(value, name, "GNU.sparse.name")
        elif key in ("size", "realsize"):
            m.realsize = pax_decimal(value, name, "GNU.sparse." + key, limit=MAX_NUMBER)
        elif key == "major":
            major = pax_decimal(value, name, "GNU.sparse.major", limit=1)
        elif key in ("offset", "numbytes"):
            pairs = pairs if pairs is not None else []
            pairs.append(pax_decimal(value, name, "GNU.sparse." + key, limit=MAX_NUMBER))
        elif key == "map":
            pairs = [pax_decimal(v, name, "GNU.sparse.map", limit=MAX_NUMBER)
                     for v in value.split(b",")]
        return pairs, major
