"""The house rules that tools check: ruff and mypy --strict over the whole tree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO

BIN = Path(sys.executable).parent

pytestmark = pytest.mark.unit


def test_ruff_finds_nothing() -> None:
    proc = subprocess.run([str(BIN / "ruff"), "check", "tmpfsboot", "tests", "bench"],
                          cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_strict_finds_nothing() -> None:
    proc = subprocess.run([str(BIN / "mypy")], cwd=REPO, capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
