"""The header parser's fast path against its general path: what `image build` writes (a
pax mtime record before each plain header) takes the fast path, and gives exactly the
Members, or exactly the error, that the general path gives for the same bytes - intact,
mutated header by header, or cut short anywhere."""

from __future__ import annotations

import io
import os
import random
import subprocess

import pytest
from test_tarfuzz import mutate

from tmpfsboot.boot.errors import ArchiveError
from tmpfsboot.boot.tarheader import BLOCK, FastRun, HeaderParser, Member
from tmpfsboot.boot.tarstream import Reader
from tmpfsboot.host.image import TAR_OPTIONS

pytestmark = pytest.mark.unit

CASES = 3000


class GeneralOnly(HeaderParser):
    """The parser with its fast path off: every member through `_general`."""

    def _fast(self, *, whole: bool) -> list[FastRun]:
        return []


class Counting(HeaderParser):
    """The parser as it is, counting the members the fast path did not take, and those
    that came in fast runs."""

    general = ran = 0

    def next_general(self) -> Member | None:
        self.general += 1
        return super().next_general()

    def fast_run(self) -> list[FastRun]:
        run = super().fast_run()
        self.ran += len(run)
        return run


def outcome(parser_class: type[HeaderParser], archive: bytes,
            made: list[HeaderParser] | None = None, *, runs: bool = False,
            chunk: int = 0) -> list[tuple[Member, bytes]] | str:
    """Every member of ARCHIVE with its data, or the error's message; the parser used is
    appended to MADE. With RUNS, members come through `fast_run` first, as the extractor
    takes them; with CHUNK, the stream comes in reads of at most CHUNK bytes, as from a
    pipe."""
    stream = io.BytesIO(archive)
    reader = Reader(lambda view: stream.readinto(view[:chunk] if chunk else view))
    parser = parser_class(reader)
    if made is not None:
        made.append(parser)
    found = []
    try:
        while True:
            if runs and (run := parser.fast_run()):
                found += [(Member(*fields), bytes(reader.buf[at : at + fields[5]]))
                          for *fields, at in run]
            elif (m := parser.next_member()) is None:
                break
            else:
                found.append((m, reader.read(m.size)))
                reader.skip(-m.size % BLOCK)
    except ArchiveError as e:
        return f"error: {e}"
    return found


@pytest.fixture(scope="module")
def image_tar(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A root archived as `image build` archives it: short and long names, directories,
    owners, modes and mtimes with and without a fraction, empty and larger files."""
    root = tmp_path_factory.mktemp("fastroot")
    rng = random.Random(13)
    for d in range(4):
        sub = root / f"d{d}" / ("deep" * (20 * (d == 3)))
        sub.mkdir(parents=True, exist_ok=True)
        for i in range(30):
            path = sub / (f"f{i}" + "x" * rng.choice((0, 0, 0, 0, 0, 90, 120)))
            path.write_bytes(rng.randbytes(rng.choice((0, 1, 511, 512, 513, 3000))))
            if rng.random() < 0.2:  # most files of a root: 0644, root's
                os.chmod(path, rng.choice((0o755, 0o600, 0o4755)))
                os.chown(path, rng.choice((0, 1000)), rng.choice((0, 100)))
            else:
                os.chmod(path, 0o644)
            os.utime(path, ns=(0, rng.choice((1_700_000_000_000_000_000,
                                              1_700_000_000_123_456_789,
                                              1_700_000_000_500_000_000))))
    return subprocess.run(["tar", "-c", "-f", "-", *TAR_OPTIONS, "-C", str(root), "."],
                          check=True, capture_output=True).stdout


def test_image_build_archive_takes_the_fast_path_and_parses_the_same(image_tar: bytes) -> None:
    made: list[HeaderParser] = []
    fast = outcome(Counting, image_tar, made)
    general = outcome(GeneralOnly, image_tar)
    assert isinstance(fast, list) and len(fast) > 50
    assert fast == general
    # first owners and long names take the general path
    assert isinstance(made[0], Counting) and made[0].general < len(fast) / 2


@pytest.mark.parametrize("chunk", [0, 65536, 4096, 1000, 513])
def test_fast_runs_give_the_general_paths_members_and_data(image_tar: bytes,
                                                           chunk: int) -> None:
    """Members whole in the buffer come in runs, and a file cut by the buffer's end (a
    pipe's short reads) is read on: every member of the fast path's shape comes in a run
    (the general path's last call finds the end)."""
    made: list[HeaderParser] = []
    fast = outcome(Counting, image_tar, made, runs=True, chunk=chunk)
    assert fast == outcome(GeneralOnly, image_tar)
    assert isinstance(made[0], Counting) and made[0].ran > len(fast) / 2
    assert made[0].ran + made[0].general == len(fast) + 1


def test_mutated_and_truncated_archives_give_the_same_members_or_error(
        image_tar: bytes) -> None:
    rng = random.Random(13)
    head = image_tar[: 40 * BLOCK] + bytes(2 * BLOCK)  # mutations land in the first members
    differ = []
    for case in range(CASES):
        archive = mutate(head, rng)
        general = outcome(GeneralOnly, archive)
        for runs in (False, True):
            if (fast := outcome(HeaderParser, archive, runs=runs)) != general:
                differ.append((case, runs, fast, general))
    assert not differ, differ[:3]


def test_every_cut_in_a_fast_member_gives_the_general_paths_error(image_tar: bytes) -> None:
    for cut in range(0, 8 * BLOCK, 7):
        archive = image_tar[:cut]
        general = outcome(GeneralOnly, archive)
        assert outcome(HeaderParser, archive) == general, cut
        assert outcome(HeaderParser, archive, runs=True, chunk=600) == general, cut
