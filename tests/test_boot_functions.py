"""Static: no function in tmpfsboot/boot/ is longer than about a screen (issue 9 item 6).

A long function in the initramfs engine hides which step failed and what it needs; split
it by what it does. Counted from the `def` line to its last line, docstring included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

BOOT = Path(__file__).resolve().parent.parent / "tmpfsboot" / "boot"
MAX_LINES = 60

# Functions allowed over MAX_LINES, "file.py:Class.function": their line count.
EXEMPT: dict[str, int] = {}
EXEMPT_FILES: tuple[str, ...] = ()


def function_lengths(path: Path) -> dict[str, int]:
    """Every function and method in PATH, "file.py:Outer.name", and its length in lines."""
    lengths: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = prefix + child.name
                assert child.end_lineno is not None
                lengths[f"{path.name}:{name}"] = child.end_lineno - child.lineno + 1
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(path.read_text(encoding="utf-8")), "")
    return lengths


def boot_function_lengths() -> dict[str, int]:
    """function_lengths of every module of the boot package."""
    found: dict[str, int] = {}
    for path in sorted(BOOT.glob("*.py")):
        found.update(function_lengths(path))
    return found


def test_no_boot_function_is_longer_than_the_limit() -> None:
    lengths = boot_function_lengths()
    assert len(lengths) > 100, "the boot package was not found"
    too_long = {name: n for name, n in lengths.items()
                if n > MAX_LINES and n > EXEMPT.get(name, 0)}
    assert not too_long, f"split these boot functions (at most {MAX_LINES} lines): {too_long}"


def test_exemptions_are_only_the_extraction_files_and_still_needed() -> None:
    lengths = boot_function_lengths()
    for name in EXEMPT:
        assert name.split(":")[0] in EXEMPT_FILES, f"{name}: only {EXEMPT_FILES} are exempt"
        assert lengths.get(name, 0) > MAX_LINES, f"{name} fits the limit now: drop it"


def test_the_measure_counts_a_long_method(tmp_path: Path) -> None:
    body = "\n".join(f"        x{i} = {i}" for i in range(MAX_LINES))
    path = tmp_path / "sample.py"
    path.write_text(f"class A:\n    def long(self) -> None:\n{body}\n\n"
                    "def short() -> None:\n    pass\n")
    assert function_lengths(path) == {"sample.py:A.long": MAX_LINES + 1,
                                      "sample.py:short": 2}
