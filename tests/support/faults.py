"""Fixtures of the fault matrix (a pytest plugin, registered in tests/conftest.py).

`scene`: a target directory with a sentinel directory beside it whose content must never
change; `good` and `other`: two small roots made with GNU tar, as zstd images; `gpg_key`:
a throw-away signing key and its public keyring. `fetch()` runs the real engine with a
short back-off and records every back-off delay the engine asked for.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from support.archives import compress, gnu_tar, make_tree, snapshot, tree_size
from support.keys import GpgKey, throwaway_gpg_key
from tmpfsboot.boot.cmdline import NetFacts, parse_root, resolve_layers
from tmpfsboot.boot.engine import fetch_root
from tmpfsboot.boot.log import NO_EVENTS, EventLog
from tmpfsboot.boot.policy import FetchPolicy, Verify

BACKOFF = 0.01
# the command a user runs, installed beside the interpreter running the tests
CLI = Path(sys.executable).parent / "tmpfsboot"


@dataclass(frozen=True)
class Root:
    """A source tree and its image."""

    tree: Path
    tar: bytes
    image: bytes
    unpacked: int
    snapshot: dict[str, tuple[object, ...]]


def _build(base: Path, seed: int) -> Root:
    tree = make_tree(base / f"tree{seed}", seed=seed)
    tar = gnu_tar(tree)
    return Root(tree, tar, compress(tar, "zstd"), tree_size(tree), snapshot(tree))


@pytest.fixture(scope="session")
def good(tmp_path_factory: pytest.TempPathFactory) -> Root:
    """The root most cases fetch."""
    return _build(tmp_path_factory.mktemp("good"), 1)


@pytest.fixture(scope="session")
def other(tmp_path_factory: pytest.TempPathFactory) -> Root:
    """A different root: what a mirror holds after it was updated."""
    return _build(tmp_path_factory.mktemp("other"), 2)


@dataclass
class Scene:
    """Where one case extracts, and what must stay untouched beside it."""

    target: Path
    sentinel: Path
    before: dict[str, tuple[object, ...]]
    waits: list[float] = field(default_factory=list)

    def assert_outside_untouched(self) -> None:
        """The sentinel beside the target is exactly as it was."""
        assert snapshot(self.sentinel) == self.before, "something was written outside"
        assert sorted(os.listdir(self.target.parent)) == ["root", "sentinel"]

    def assert_empty(self) -> None:
        """The target was emptied (a half or unverified root is never left behind)."""
        assert os.listdir(self.target) == [], os.listdir(self.target)

    def wait(self, seconds: float) -> None:
        """The engine's sleep: recorded, and not slept (the figures are asserted)."""
        self.waits.append(seconds)


@pytest.fixture
def scene(tmp_path: Path) -> Scene:
    """An empty target directory and a sentinel directory beside it."""
    target = tmp_path / "root"
    target.mkdir()
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "secret").write_text("must not change\n")
    (sentinel / "sub").mkdir()
    return Scene(target, sentinel, snapshot(sentinel))


def fetch(root: str, scene: Scene, *, retries: int | None = 3, timeout: float = 5.0,
          verify: Verify = Verify.CHECKSUM, keyring: str | None = None,
          sleep: bool = False, preflight: bool = True, facts: NetFacts | None = None) -> None:
    """Run the real engine on ROOT (what follows root=) into the scene's target."""
    policy = FetchPolicy(verify=verify, keyring=keyring, retries=retries, timeout=timeout,
                         backoff=BACKOFF, preflight=preflight,
                         wait=time.sleep if sleep else scene.wait)
    fetch_root(resolve_layers(parse_root(root), facts or NetFacts()), str(scene.target),
               policy)


def fetch_url(url: str, target: Path, *, facts: NetFacts | None = None,
              verify: Verify = Verify.CHECKSUM, retries: int = 0,
              events: EventLog = NO_EVENTS, image_mounts: str | None = None) -> None:
    """Run the real engine on URL (what follows root=) into TARGET: by default no retries,
    checksums verified, a short back-off."""
    policy = FetchPolicy(verify=verify, retries=retries, timeout=5.0, backoff=0.01)
    fetch_root(resolve_layers(parse_root(url), facts or NetFacts()), str(target), policy,
               events=events, image_mounts=image_mounts)


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`tmpfsboot ARGS...` as a user runs it."""
    return subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


@pytest.fixture(scope="session")
def gpg_key() -> Iterator[GpgKey]:
    """One throw-away signing key for the session."""
    with throwaway_gpg_key() as key:
        yield key
