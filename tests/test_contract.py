"""The published format, read and written by one module: SHA256SUMS and manifests."""

from __future__ import annotations

import pytest

from tmpfsboot.boot.contract import (
    Manifest,
    manifest_name,
    parse_sums,
    parse_unpacked_size,
    render_sums,
)
from tmpfsboot.boot.errors import VerificationError

H1, H2 = "a" * 64, "b" * 64


@pytest.mark.unit
@pytest.mark.parametrize(("text", "expected"), [
    ("", {}),
    (f"{H1} *root.tar.zst\n", {"root.tar.zst": H1}),
    (f"{H1}  root.tar.zst\n{H2} *host.tar.gz\n", {"root.tar.zst": H1, "host.tar.gz": H2}),
    (f"{H1.upper()}  x\n\n", {"x": H1}),
    (f"{H1}  ./x.tar\r\n", {"x.tar": H1}),
    (f"SHA256 (x.tar.xz) = {H2}\n", {"x.tar.xz": H2}),
    (f"-----BEGIN PGP SIGNED MESSAGE-----\n{H1} *x\n", {"x": H1}),
])
def test_parse_sums_reads_coreutils_and_bsd_lines(text: str, expected: dict[str, str]) -> None:
    assert parse_sums(text) == expected


@pytest.mark.unit
def test_parse_sums_strict_names_the_line_it_cannot_read() -> None:
    with pytest.raises(VerificationError, match="line 2: not `HASH \\*NAME`: 'garbage'"):
        parse_sums(f"{H1} *x\ngarbage\n", strict=True)


@pytest.mark.unit
def test_render_sums_sorts_by_name_in_binary_form_and_parses_back() -> None:
    sums = {"b.tar.zst": H2, "a.tar.zst": H1}
    text = render_sums(sums)
    assert text == f"{H1} *a.tar.zst\n{H2} *b.tar.zst\n"
    assert parse_sums(text, strict=True) == sums


@pytest.mark.unit
@pytest.mark.parametrize(("image", "expected"), [
    ("base.tar.zst", "base.manifest.json"),
    ("host-n1.tgz", "host-n1.manifest.json"),
    ("x.tar", "x.manifest.json"),
    ("odd.bin", "odd.bin.manifest.json"),
])
def test_manifest_name_drops_the_image_ending(image: str, expected: str) -> None:
    assert manifest_name(image) == expected


@pytest.mark.unit
def test_manifest_render_is_read_back_by_the_engine() -> None:
    m = Manifest(name="base", file="base.tar.zst", compression="zstd", size=10, sha256=H1,
                 unpacked_size=8192, entries=3)
    assert parse_unpacked_size(m.render()) == 8192


@pytest.mark.unit
@pytest.mark.parametrize(("data", "expected"), [
    (b'{"unpacked_size": 4096}', 4096),
    (b'{"unpacked_size": -1}', None),
    (b'{"unpacked_size": "4096"}', None),
    (b'{"unpacked_size": true}', None),
    (b'{}', None),
])
def test_parse_unpacked_size_takes_only_a_usable_figure(data: bytes,
                                                        expected: int | None) -> None:
    assert parse_unpacked_size(data) == expected


@pytest.mark.unit
@pytest.mark.parametrize("data", [b"[1]", b"not json", b"\xff"])
def test_parse_unpacked_size_refuses_what_is_no_json_object(data: bytes) -> None:
    with pytest.raises(ValueError):
        parse_unpacked_size(data)
