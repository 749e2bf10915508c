"""The roots bench/fetch.py fetches: made once, kept under a cache directory.

- small-file: 45,000 entries generated from a seeded random, shaped like a Debian root:
  the usual top directories with random subdirectories up to seven levels deep, file sizes
  drawn from a log-normal (median 2.2 KB, two thirds under 4 KB, some tens of KB, none
  over 1 MB), some empty files, text made of words, binary of byte strings, .gz of random
  bytes, executables, relative symlinks and a few hard links, mtimes spread over a year.
- large-file: this host's usr/lib/x86_64-linux-gnu files of 512 KiB and more (shared
  objects and a few static archives) with the symlinks that point at them, plus 32 MiB
  files generated from a seeded random: two of random bytes (incompressible), two of text.
- mixed: the root bench/fetch.py used first, parts of this host's /usr (827 MB, 24,681
  entries), in the cache's own tree/ and www/.

Each tree is rebuilt when its recipe string changes (kept next to it, outside the image).
"""

from __future__ import annotations

import math
import os
import random
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

KiB, MiB = 1024, 1024 * 1024
SMALL_RECIPE = "small-file 3: seed 13, 45000 entries"
LARGE_RECIPE = "large-file 2: seed 13, host libs >= 512 KiB, 4 x 32 MiB"
MIXED_SOURCES = ("usr/bin", "usr/include", "usr/share/doc", "usr/share/locale",
                 "usr/lib/python3", "usr/lib/python3.11")
TOP_DIRS = ("etc", "usr/bin", "usr/sbin", "usr/lib/x86_64-linux-gnu",
            "usr/lib/python3/dist-packages", "usr/share/doc", "usr/share/locale",
            "usr/share/man/man1", "usr/share/perl5",
            "usr/include", "var/lib/dpkg/info", "lib/modules")
SUFFIXES = ("", "", ".py", ".pyc", ".h", ".gz", ".mo", ".so.1", ".conf", ".pm", ".html", ".list")
MTIME = 1_700_000_000  # 2023-11-14: the newest mtime in a generated root


@dataclass(frozen=True)
class Root:
    """A root to fetch: its tree and image directory under the cache, how it is made,
    what its recipe is (a change rebuilds it) and a line saying what it is."""

    name: str
    recipe: str
    make: Callable[[Path], None]
    about: str

    def tree(self, cache: Path) -> Path:
        return cache / "tree" if self.name == "mixed" else cache / self.name / "tree"

    def www(self, cache: Path) -> Path:
        return cache / "www" if self.name == "mixed" else cache / self.name / "www"

    def ensure_tree(self, cache: Path) -> Path:
        """The tree, made now unless it is complete and of this recipe."""
        tree = self.tree(cache)
        # The mixed root keeps the marker its first version wrote inside the tree.
        marker = tree / ".complete" if self.name == "mixed" else tree.with_name("tree.complete")
        if marker.exists() and marker.read_text() == self.recipe:
            return tree
        print(f"making the {self.name} root in {tree} ...", flush=True)
        shutil.rmtree(self.www(cache), ignore_errors=True)
        shutil.rmtree(tree, ignore_errors=True)
        tree.mkdir(parents=True)
        self.make(tree)
        marker.write_text(self.recipe)
        return tree


def zipf_stream(rng: random.Random, vocabulary: list[bytes], size: int, sep: bytes) -> bytes:
    """SIZE bytes of tokens from VOCABULARY, drawn with Zipf weights, joined by SEP."""
    weights = [1 / (rank + 1) for rank in range(len(vocabulary))]
    out = b""
    while len(out) < size:
        out += sep.join(rng.choices(vocabulary, weights, k=size // 4 + 1)) + sep
    return out[:size]


def word_text(rng: random.Random, size: int) -> bytes:
    """SIZE bytes of lines of words from a vocabulary of 4,000 (zstd -9 compresses it
    3.8x, as documentation and scripts)."""
    letters = b"etaoinshrdlcumwfgypbvkjxqz_"
    vocabulary = [bytes(rng.choices(letters, k=rng.randint(2, 11))) for _ in range(4000)]
    vocabulary += [b"\n"] * 200 + [b"=", b"(", b")", b"{", b"}", b";", b"#", b"/usr/lib"]
    rng.shuffle(vocabulary)
    return zipf_stream(rng, vocabulary, size, b" ")


def machine_code(rng: random.Random, size: int) -> bytes:
    """SIZE bytes of binary from a vocabulary of 2,000 random strings of 1-8 bytes
    (zstd -9 compresses it 2.7x, between bash's 2.1x and libpython's 3.0x)."""
    vocabulary = [rng.randbytes(rng.randint(1, 8)) for _ in range(2000)]
    return zipf_stream(rng, vocabulary, size, b"")


def make_small_file(tree: Path) -> None:
    """The small-file root: see the module docstring."""
    rng = random.Random(13)
    text, binary = word_text(rng, 96 * MiB), machine_code(rng, 64 * MiB)
    packed = rng.randbytes(16 * MiB)  # what is compressed already: .gz
    dirs = [tree / d for d in TOP_DIRS]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    names: set[Path] = set(dirs)
    depth = {d: len(d.relative_to(tree).parts) for d in dirs}

    def new_name(parent: Path, suffix: str) -> Path:
        while True:
            stem = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz0123456789-",
                                       k=rng.randint(3, 14)))
            path = parent / (stem + suffix)
            if path not in names:
                names.add(path)
                return path

    for _ in range(3500):
        parent = rng.choice([d for d in rng.sample(dirs, min(8, len(dirs))) if depth[d] < 7]
                            or dirs[:1])
        d = new_name(parent, "")
        d.mkdir()
        dirs.append(d)
        depth[d] = depth[parent] + 1
    files: list[Path] = []
    for _ in range(38_500):
        path = new_name(rng.choice(dirs), rng.choice(SUFFIXES))
        size = 0 if rng.random() < 0.03 else min(int(rng.lognormvariate(math.log(2200), 1.5)),
                                                 6 * MiB)
        if path.suffix == ".gz":
            pool = packed
        elif path.suffix in (".1", ".pyc", ".mo") or rng.random() < 0.1:
            pool = binary
        else:
            pool = text
        start = rng.randrange(len(pool) - size)
        path.write_bytes(pool[start:start + size])
        executable = "bin" in path.parts[-2] or rng.random() < 0.05
        os.chmod(path, 0o755 if executable else 0o644)
        files.append(path)
    for _ in range(2800):
        link, dest = new_name(rng.choice(dirs), rng.choice(SUFFIXES)), rng.choice(files)
        os.symlink(os.path.relpath(dest, link.parent), link)
    for _ in range(30):
        os.link(rng.choice(files), new_name(rng.choice(dirs), ""))
    for path in sorted(names, reverse=True):  # children before their directory
        stamp = MTIME - rng.randrange(365 * 86400)
        os.utime(path, (stamp, stamp), follow_symlinks=False)
    for parent in {*(p.parent for p in dirs[:len(TOP_DIRS)] for p in (p, *p.parents))}:
        if parent.is_relative_to(tree) and parent not in names:  # usr, usr/lib, ... and /
            os.utime(parent, (MTIME, MTIME))


def make_large_file(tree: Path) -> None:
    """The large-file root: see the module docstring."""
    src = Path("/usr/lib/x86_64-linux-gnu")
    dest = tree / "usr/lib/x86_64-linux-gnu"
    dest.mkdir(parents=True)
    big = sorted(p.name for p in src.iterdir()
                 if p.is_file() and not p.is_symlink() and p.stat().st_size >= 512 * KiB)
    subprocess.run(["cp", "-a", *(str(src / n) for n in big), str(dest)], check=True)
    chosen = set(big)
    for p in sorted(src.iterdir()):
        if p.is_symlink() and os.readlink(p) in chosen:
            os.symlink(os.readlink(p), dest / p.name)
    rng = random.Random(13)
    data = tree / "srv/data"
    data.mkdir(parents=True)
    for i in range(2):
        (data / f"random{i}.bin").write_bytes(rng.randbytes(32 * MiB))
        (data / f"text{i}.txt").write_bytes(word_text(rng, 32 * MiB))


def make_mixed(tree: Path) -> None:
    """The mixed root: parts of this host's /usr, copied as they are."""
    for src in MIXED_SOURCES:
        dest = tree / src
        dest.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-a", f"/{src}", str(dest)], check=True)


ROOTS = {
    "small-file": Root("small-file", SMALL_RECIPE, make_small_file,
                       "generated from a seeded random, shaped like a Debian root"),
    "large-file": Root("large-file", LARGE_RECIPE, make_large_file,
                       "this host's shared objects of 512 KiB and more, and 4 generated "
                       "32 MiB files, 2 random, 2 text"),
    # "": what the first version of bench/fetch.py wrote in the marker.
    "mixed": Root("mixed", "", make_mixed, "parts of this host's /usr"),
}
