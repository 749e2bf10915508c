"""A real tier: `tmpfsboot serve` as the origin, three nginx caches configured from
docs/nginx.md, and 150 simulated nodes, each role in its own network namespace on a
private bridge. The nodes spread themselves over the caches (tmpfs.mirrors=spread);
each cache fetches the image from the origin once; when a cache dies halfway, only
its nodes move, each to its own next cache, and every node still gets a verified image.

The thousand-node version is a bench: `make fleet` (figures in docs/benchmarks.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.serve import NGINX, has_slice_module
from support.tier import StormResult, run_storm

NODES = 150
CACHES = 3


def can_make_namespaces() -> bool:
    if not NGINX.exists() or not has_slice_module() or not shutil.which("ip"):
        return False
    probe = "tfbprobe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, check=False)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return made.returncode == 0


pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not can_make_namespaces(),
                       reason="needs root, ip netns and nginx with the slice module"),
]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A 4 MiB image of random bytes (incompressible) built by `tmpfsboot image build`."""
    from tmpfsboot.host.image import build_image

    src = tmp_path_factory.mktemp("src")
    (src / "usr").mkdir()
    (src / "usr/blob").write_bytes(os.urandom(4 << 20))
    out = tmp_path_factory.mktemp("images")
    build_image(src, out, "root")
    yield out


def storm(images: Path, tmp_path: Path, **kwargs: object) -> StormResult:
    result = run_storm(images, "root.tar.zst", tmp_path, nodes=NODES, caches=CACHES,
                       timeout=8.0, **kwargs)  # type: ignore[arg-type]
    failed = [f"{n.mac}: {n.error}" for n in result.nodes if not n.ok]
    assert not failed, failed[:5]
    return result


def test_spread_nodes_share_the_caches_evenly_and_the_origin_sends_one_copy_each(
        images: Path, tmp_path: Path) -> None:
    result = storm(images, tmp_path)
    assert result.ok == NODES  # every node's image matched SHA256SUMS
    for share in result.shares():
        assert abs(share * CACHES - 1) < 0.10, result.shares()
    # each cache fetched each 8 MiB slice once (proxy_cache_lock): one copy per cache
    assert CACHES * result.size <= result.origin_image_bytes <= 1.2 * CACHES * result.size
    # a node took its whole image from the cache it asks first
    assert all(n.last == n.order[0] for n in result.nodes)


def test_ordered_mirrors_send_every_node_to_the_first_cache(images: Path,
                                                            tmp_path: Path) -> None:
    result = storm(images, tmp_path, order="ordered")
    assert result.shares()[0] == 1.0
    assert result.origin_image_bytes == result.size  # the idle caches fetched nothing


def test_a_cache_killed_halfway_moves_only_its_nodes_to_their_next_cache(
        images: Path, tmp_path: Path) -> None:
    dead = 1
    result = storm(images, tmp_path, kill=dead)
    assert result.ok == NODES
    late = result.late_nodes()
    assert late, "the cache died after all its nodes were done: nothing was tested"
    # each late node finished on its own second choice, resuming where it was
    assert all(n.last == n.order[1] for n in late)
    assert sum(1 for n in late if n.received[dead] and n.received[n.last]) > 0
    # ... and they spread over both survivors
    moved = result.moved()
    assert all(moved[c] >= len(late) / 4 for c in range(CACHES) if c != dead), moved
    # the other caches' nodes never noticed
    assert all(n.received[dead] == 0 and n.last == n.order[0]
               for n in result.nodes if n.order[0] != dead)
