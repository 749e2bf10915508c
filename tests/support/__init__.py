"""Test helpers, one package: servers, archives, keys, mounts, report writing, VM images.

tests/conftest.py registers it once (on sys.path, assertion rewriting, the fixture
plugins); test modules import `from support.MODULE import NAME`.
"""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
REPO = TESTS.parent
