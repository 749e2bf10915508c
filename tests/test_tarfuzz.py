"""Seeded fuzzing of valid archives' headers: every mutated archive extracts, or ends in
one clean TmpfsbootError - never another exception, never a write outside the target,
and the target can always be emptied (what fetch_root does on failure)."""

from __future__ import annotations

import fcntl
import os
import random
from pathlib import Path

import pytest
from support.mounts import mounted_tmpfs
from support.tarcorpus import DATA

from tmpfsboot.boot.engine import empty_directory
from tmpfsboot.boot.errors import TmpfsbootError
from tmpfsboot.boot.extract import Extractor
from tmpfsboot.boot.tarfields import verify_checksum
from tmpfsboot.boot.tarheader import BLOCK

pytestmark = pytest.mark.integration

SEED = 8
CASES = 3000
SEEDS = ["go/pax.tar", "go/gnu.tar", "go/v7.tar", "go/star.tar", "go/xattrs.tar",
         "go/sparse-formats.tar", "go/pax-global-records.tar", "go/hdr-only.tar",
         "go/gnu-multi-hdrs.tar", "go/ustar-file-devs.tar", "go/trailing-slash.tar",
         "libarchive/test_read_format_gtar_sparse_1_17_posix10.tar",
         "libarchive/test_read_format_gtar_sparse_1_13.tar",
         "libarchive/test_compat_star_acl_posix1e.tar",
         "libarchive/test_read_pax_xattr_rht_security_selinux.tar"]
INTERESTING = [b"\0", b" ", b"\xff", b"\x80", b"-", b"/", b"..", b"9", b"=", b"\n",
               b"777777777777", b"\xff" * 8, b"\x80\x00\x00\x00\x00\x01\x00\x00"]


def _headers(data: bytes) -> list[int]:
    return [i for i in range(0, len(data) - BLOCK + 1, BLOCK)
            if verify_checksum(data[i : i + BLOCK]) and data[i : i + BLOCK] != bytes(BLOCK)]


def _fix_checksum(raw: bytearray, at: int) -> None:
    raw[at + 148 : at + 156] = b" " * 8
    raw[at + 148 : at + 155] = b"%06o\0" % sum(raw[at : at + BLOCK])


def mutate(data: bytes, rng: random.Random) -> bytes:
    """DATA with one to three header (or pax record) bytes changed, checksum mostly redone,
    or cut short."""
    raw = bytearray(data)
    headers = _headers(data)
    if rng.random() < 0.08:
        return bytes(raw[: rng.randrange(len(raw))])
    for _ in range(rng.randint(1, 3)):
        at = rng.choice(headers)
        if rng.random() < 0.3 and at + 2 * BLOCK <= len(raw):
            pos = at + BLOCK + rng.randrange(BLOCK)  # the data block: pax records, maps
        else:
            pos = at + rng.randrange(BLOCK)
        value = rng.choice(INTERESTING) if rng.random() < 0.5 else bytes([rng.randrange(256)])
        raw[pos : pos + len(value)] = value
        if rng.random() < 0.9:
            _fix_checksum(raw, at)
    return bytes(raw[: len(data)])


def test_mutated_headers_extract_or_fail_cleanly(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    seeds = [(DATA / name).read_bytes() for name in SEEDS]
    assert all(len(s) <= 1 << 20 for s in seeds)
    outcomes = {"ok": 0, "error": 0}
    with mounted_tmpfs(tmp_path / "fuzz", size="64m") as mount:
        target, outside = mount / "root", mount / "outside"
        target.mkdir()
        outside.mkdir()
        (outside / "canary").write_bytes(b"untouched")
        for case in range(CASES):
            archive = mutate(rng.choice(seeds), rng)
            r, w = os.pipe()
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 20)
            os.write(w, archive)
            os.close(w)
            try:
                Extractor(str(target)).extract(r)
                outcomes["ok"] += 1
            except TmpfsbootError as e:
                outcomes["error"] += 1
                assert "\n" not in str(e), (case, str(e))
            except Exception as e:
                pytest.fail(f"case {case}: {type(e).__name__}: {e} (archive {archive!r:.200})")
            finally:
                os.close(r)
            empty_directory(str(target))
            assert os.listdir(target) == []
            assert sorted(os.listdir(mount)) == ["outside", "root"]
            assert os.listdir(outside) == ["canary"], case
    # both outcomes well represented: the mutations reach past the checksum
    assert outcomes["ok"] > CASES // 10 and outcomes["error"] > CASES // 10, outcomes
