"""Round trip: `tmpfsboot image build` -> a server -> `tmpfsboot fetch` into a fresh tmpfs,
and the fetched tree equals the source entry by entry."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.keys import GpgKey, throwaway_gpg_key
from support.mounts import mounted_tmpfs
from support.serve import (
    NGINX,
    cache_config,
    free_port,
    has_slice_module,
    held_streams,
    nginx_origin,
    running_nginx,
)
from support.trees import diff_trees, make_full_tree, snapshot_tree

from tmpfsboot.host.image import build_image
from tmpfsboot.host.serve import ImageServer, start_server


@pytest.fixture(scope="module")
def gpg_key() -> Iterator[GpgKey]:
    with throwaway_gpg_key() as key:
        yield key


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path_factory.mktemp("src") / "root") as src:
        make_full_tree(src)
        yield src


@pytest.fixture(scope="module")
def images(source: Path, gpg_key: GpgKey, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root.tar.zst of the full tree plus a per-host layer, in one signed directory."""
    out = tmp_path_factory.mktemp("images")
    build_image(source, out, "root", sign=gpg_key.fingerprint, gpg_homedir=gpg_key.homedir)
    host = tmp_path_factory.mktemp("host-node1")
    (host / "etc").mkdir()
    (host / "etc/hostname").write_text("node1\n")
    subprocess.run([sys.executable, "-m", "tmpfsboot", "image", "layer", "--from", str(host),
                    "--output", str(out), "--name", "host-node1", "--compression", "gzip",
                    "--sign", gpg_key.fingerprint, "--gpg-homedir", str(gpg_key.homedir)],
                   check=True)
    return out


@pytest.fixture(scope="module")
def server(images: Path) -> Iterator[ImageServer]:
    with start_server(images) as srv:
        yield srv


@pytest.fixture
def fresh_tmpfs(tmp_path: Path) -> Iterator[Path]:
    # tmpfs' own default root mode is 1777: the image's root entry must set 0755.
    with mounted_tmpfs(tmp_path / "dest", mode="1777") as dest:
        yield dest


def fetch(root: str, dest: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`tmpfsboot fetch` as an operator runs it: a separate process."""
    return subprocess.run([sys.executable, "-m", "tmpfsboot", "fetch", "--retries", "1",
                           "--backoff", "0.1", "--timeout", "10", *args, root, str(dest)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.integration
def test_embedded_server_round_trip_keeps_every_entry(server: ImageServer, source: Path,
                                                      fresh_tmpfs: Path) -> None:
    r = fetch(server.url + "root.tar.zst", fresh_tmpfs)
    assert r.returncode == 0, r.stderr
    assert diff_trees(snapshot_tree(source), snapshot_tree(fresh_tmpfs)) == []
    recent = server.snapshot().recent
    assert ("GET", "/root.tar.zst", 200) in recent
    assert ("GET", "/SHA256SUMS", 200) in recent


@pytest.mark.integration
@pytest.mark.skipif(not NGINX.exists(), reason="/usr/sbin/nginx is absent")
def test_nginx_round_trip_keeps_every_entry(images: Path, source: Path, fresh_tmpfs: Path,
                                            tmp_path: Path) -> None:
    with nginx_origin(images, tmp_path / "nginx") as nginx:
        r = fetch(nginx.url + "root.tar.zst", fresh_tmpfs)
    assert r.returncode == 0, r.stderr
    assert diff_trees(snapshot_tree(source), snapshot_tree(fresh_tmpfs)) == []


@pytest.mark.integration
@pytest.mark.skipif(not has_slice_module(), reason="no nginx with the slice module")
def test_round_trip_through_nginx_caching_proxy(images: Path, source: Path,
                                                fresh_tmpfs: Path, tmp_path: Path) -> None:
    with nginx_origin(images, tmp_path / "origin") as origin:
        port = free_port()
        config = cache_config(origin.port, tmp_path / "cache", port)
        with running_nginx(config, tmp_path / "cache", port=port) as cache:
            r = fetch(cache.url + "root.tar.zst", fresh_tmpfs)
    assert r.returncode == 0, r.stderr
    assert diff_trees(snapshot_tree(source), snapshot_tree(fresh_tmpfs)) == []


@pytest.mark.integration
def test_signed_round_trip_with_layers(server: ImageServer, source: Path, gpg_key: GpgKey,
                                       fresh_tmpfs: Path) -> None:
    r = fetch(f"{server.url}root.tar.zst,{server.url}host-%hostname.tar.gz", fresh_tmpfs,
              "--verify", "signature", "--keyring", str(gpg_key.keyring),
              "--hostname", "node1")
    assert r.returncode == 0, r.stderr
    want = snapshot_tree(source)
    got = snapshot_tree(fresh_tmpfs)
    assert (fresh_tmpfs / "etc/hostname").read_text() == "node1\n"
    # Everything but the file the host layer replaced is the root image's.
    del want["etc/hostname"], got["etc/hostname"]
    assert diff_trees(want, got) == []
    assert ("GET", "/SHA256SUMS.gpg", 200) in server.snapshot().recent


@pytest.mark.integration
def test_signature_by_another_key_is_refused(server: ImageServer, fresh_tmpfs: Path) -> None:
    with throwaway_gpg_key() as stranger:
        r = fetch(server.url + "root.tar.zst", fresh_tmpfs, "--verify", "signature",
                  "--keyring", str(stranger.keyring))
    assert r.returncode == 1
    assert "SHA256SUMS" in r.stderr
    assert list(fresh_tmpfs.iterdir()) == []


@pytest.mark.integration
@pytest.mark.parametrize("compression", ["xz", "gzip"])
def test_round_trip_with_pixz_and_pigz_images(source: Path, fresh_tmpfs: Path, tmp_path: Path,
                                              compression: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    image = build_image(source, out, "root", compression=compression)
    with start_server(out, access_log=False) as srv:
        r = fetch(srv.url + image.name, fresh_tmpfs)
    assert r.returncode == 0, r.stderr
    assert diff_trees(snapshot_tree(source), snapshot_tree(fresh_tmpfs)) == []


@pytest.mark.integration
def test_node_waits_out_a_503_at_the_cap_and_then_boots(images: Path, source: Path,
                                                        fresh_tmpfs: Path) -> None:
    big = images / "big.img"
    with open(big, "wb") as f:
        f.truncate(64 << 20)
    try:
        with start_server(images, max_streams=1, retry_after=1) as srv, \
                held_streams(srv.port, "/big.img", 1) as held:
            assert held[0][0] == 200     # the only slot is taken
            proc = subprocess.Popen(
                [sys.executable, "-m", "tmpfsboot", "fetch", "--retries", "3", "--backoff",
                 "0.1", "--timeout", "10", srv.url + "root.tar.zst", str(fresh_tmpfs)],
                stderr=subprocess.PIPE, text=True)
            deadline = time.monotonic() + 20
            while ("GET", "/root.tar.zst", 503) not in srv.snapshot().recent:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.02)
            # The node was told to come back: free the slot while it waits.
            held.release()
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            image_answers = srv.snapshot().statuses_of("/root.tar.zst")
            assert image_answers[0] == 503 and image_answers[-1] == 200
    finally:
        big.unlink()
    assert diff_trees(snapshot_tree(source), snapshot_tree(fresh_tmpfs)) == []
