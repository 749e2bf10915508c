"""The architecture as the imports show it: boot/ at the bottom on the standard library
alone, host/ above it, the command line on top. docs/architecture.md describes it."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tmpfsboot"
# A file past this many lines holds more than one concern (STYLE.md: small modules).
MAX_LINES = 500

pytestmark = pytest.mark.unit


def imports_of(path: Path) -> list[tuple[int, str, int]]:
    """(line, module, relative level) of every import statement in PATH."""
    found: list[tuple[int, str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, node.module or "", node.level))
    return found


def modules(subpackage: str) -> list[Path]:
    return sorted((PACKAGE / subpackage).glob("*.py"))


@pytest.mark.parametrize("path", modules("boot"), ids=lambda p: p.name)
def test_boot_side_imports_only_the_standard_library_and_its_siblings(path: Path) -> None:
    bad = [f"{path.name}:{line}: {name or '.'} (level {level})"
           for line, name, level in imports_of(path)
           if (level == 0 and name.split(".")[0] not in sys.stdlib_module_names)
           or level > 1]
    assert not bad, "the initramfs has only the standard library: " + ", ".join(bad)


@pytest.mark.parametrize("path", modules("host"), ids=lambda p: p.name)
def test_host_side_knows_nothing_of_the_command_line(path: Path) -> None:
    bad = [f"{path.name}:{line}: {name}" for line, name, level in imports_of(path)
           if name in ("argparse", "tmpfsboot.cli") or (level == 2 and name == "cli")]
    assert not bad, "argparse and verbs belong in tmpfsboot/cli: " + ", ".join(bad)


def test_no_module_is_over_the_size_limit() -> None:
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines())
             for p in PACKAGE.rglob("*.py")}
    assert not {k: v for k, v in sizes.items() if v > MAX_LINES}
