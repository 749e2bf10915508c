"""docs/nginx.md: the configuration text of the doc, run by Debian's nginx on loopback."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.serve import (
    NGINX,
    Nginx,
    cache_config,
    free_port,
    get,
    has_slice_module,
    held_streams,
    nginx_blocks,
    nginx_origin,
    running_nginx,
)

from tmpfsboot.host.image import build_image

pytestmark = pytest.mark.skipif(not NGINX.exists(), reason="/usr/sbin/nginx is absent")

SLICE = 8 << 20



@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of images as `tmpfsboot image build` makes it, plus a big file that
    spans several cache slices and outlasts every socket buffer."""
    src = tmp_path_factory.mktemp("src")
    (src / "etc").mkdir()
    (src / "etc/hostname").write_text("node\n")
    out = tmp_path_factory.mktemp("images")
    build_image(src, out, "root")
    # Not sparse: its bytes differ per slice, so a slice mix-up shows.
    (out / "big.img").write_bytes(b"".join(bytes([i]) * (1 << 20) for i in range(40)))
    (out / ".partial.tmp").write_text("half")
    return out


@pytest.fixture(scope="module")
def origin(image_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    with nginx_origin(image_dir, tmp_path_factory.mktemp("nginx")) as nginx:
        yield nginx


@pytest.mark.integration
def test_doc_has_origin_and_cache_configurations() -> None:
    blocks = nginx_blocks()
    assert len(blocks) == 2
    assert "sendfile on;" in blocks[0] and "limit_conn_status 503;" in blocks[0]
    assert "proxy_cache_lock on;" in blocks[1] and "slice 8m;" in blocks[1]


@pytest.mark.integration
def test_doc_configurations_pass_nginx_t(tmp_path: Path, image_dir: Path) -> None:
    from support.serve import origin_config
    for name, config in (("origin", origin_config(image_dir, tmp_path, 8080)),
                         ("cache", cache_config(8080, tmp_path, 8081))):
        conf = tmp_path / f"{name}.conf"
        conf.write_text(config)
        r = subprocess.run([str(NGINX), "-t", "-p", str(tmp_path), "-c", str(conf), "-e",
                            str(tmp_path / "err.log")], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


@pytest.mark.integration
def test_nginx_serves_image_sums_and_manifest(origin: Nginx, image_dir: Path) -> None:
    for name in ("root.tar.zst", "SHA256SUMS", "root.manifest.json"):
        r = get(origin.port, f"/{name}")
        assert (r.status, r.body) == (200, (image_dir / name).read_bytes())
    assert get(origin.port, "/root.manifest.json").headers["content-type"] == "application/json"


@pytest.mark.integration
def test_nginx_head_gives_size(origin: Nginx, image_dir: Path) -> None:
    r = get(origin.port, "/big.img", method="HEAD")
    assert r.status == 200
    assert r.headers["content-length"] == str((image_dir / "big.img").stat().st_size)
    assert r.body == b""


@pytest.mark.integration
def test_nginx_range_and_if_range(origin: Nginx, image_dir: Path) -> None:
    data = (image_dir / "root.tar.zst").read_bytes()
    first = get(origin.port, "/root.tar.zst", {"Range": "bytes=0-9"})
    assert first.status == 206
    assert first.body == data[:10]
    assert first.headers["content-range"] == f"bytes 0-9/{len(data)}"
    etag = first.headers["etag"]
    assert etag.startswith('"'), "a weak ETag cannot validate a resume"
    resumed = get(origin.port, "/root.tar.zst", {"Range": "bytes=10-", "If-Range": etag})
    assert (resumed.status, resumed.body) == (206, data[10:])
    changed = get(origin.port, "/root.tar.zst", {"Range": "bytes=10-",
                                                 "If-Range": '"something-else"'})
    assert (changed.status, changed.body) == (200, data)
    assert get(origin.port, "/root.tar.zst", {"Range": f"bytes={len(data)}-"}).status == 416


@pytest.mark.integration
def test_nginx_hides_temporary_files_and_refuses_escapes(origin: Nginx) -> None:
    assert get(origin.port, "/.partial.tmp").status == 404
    r = get(origin.port, "/../../etc/passwd")
    assert r.status in (400, 403, 404)
    assert b"root:" not in r.body


@pytest.mark.integration
def test_nginx_access_log_has_bytes_and_duration(origin: Nginx) -> None:
    get(origin.port, "/SHA256SUMS", {"Range": "bytes=0-4"})
    time.sleep(0.1)
    lines = origin.access_log.read_text().splitlines()
    line = next(x for x in reversed(lines) if "SHA256SUMS" in x)
    fields = line.split()
    assert fields[0] == "127.0.0.1"
    assert '"GET /SHA256SUMS HTTP/1.1" 206 5 ' in line
    assert float(fields[6]) >= 0
    assert 'range="bytes=0-4"' in line


@pytest.mark.integration
def test_nginx_cap_answers_503_with_retry_after(image_dir: Path, tmp_path: Path) -> None:
    cap, clients = 3, 8
    with nginx_origin(image_dir, tmp_path, streams=cap) as nginx, \
            held_streams(nginx.port, "/big.img", clients) as answers:
        statuses = [status for status, _ in answers]
        assert statuses.count(200) == cap
        assert statuses.count(503) == clients - cap
        assert all(h.get("retry-after") == "5" for s, h in answers if s == 503)
        # Small files stay outside the cap.
        assert get(nginx.port, "/SHA256SUMS").status == 200


@pytest.mark.integration
@pytest.mark.skipif(not has_slice_module(), reason="this nginx has no slice module")
def test_caching_proxy_serves_ranges_from_slices_and_locks(origin: Nginx, image_dir: Path,
                                                           tmp_path: Path) -> None:
    data = (image_dir / "big.img").read_bytes()
    port = free_port()
    with running_nginx(cache_config(origin.port, tmp_path, port), tmp_path,
                       port=port) as cache:
        before = len(origin.access_log.read_text().splitlines())
        # A resume in the middle of the third slice: answered from aligned slices.
        start = 2 * SLICE + 12345
        r = get(cache.port, "/big.img", {"Range": f"bytes={start}-"})
        assert (r.status, r.body) == (206, data[start:])
        assert r.headers["content-range"] == f"bytes {start}-{len(data) - 1}/{len(data)}"
        assert r.headers["etag"]
        full = get(cache.port, "/big.img")
        assert (full.status, full.body) == (200, data)
        again = get(cache.port, "/big.img", {"Range": "bytes=0-99"})
        assert (again.status, again.body, again.headers["x-cache-status"]) == (
            206, data[:100], "HIT")
        time.sleep(0.1)
        fetched = origin.access_log.read_text().splitlines()[before:]
        big = [line for line in fetched if "/big.img" in line]
        # Each 8 MiB slice came from the origin once: 5 slices for a 40 MiB file.
        assert len(big) == -(-len(data) // SLICE)
        assert all(" 206 " in line for line in big)
        sums = get(cache.port, "/SHA256SUMS")
        assert (sums.status, sums.body) == (200, (image_dir / "SHA256SUMS").read_bytes())
