"""Rewriting generated parts of Markdown files (docs/reliability.md, docs/benchmarks.md).

Two kinds of generated part, each with one function: a block between two marker lines
(`<!-- NAME:begin -->` ... `<!-- NAME:end -->`), and a section from its `## ` heading to
the next `## ` heading. The rest of the file is left alone; `write_file` replaces the
file atomically.
"""

from __future__ import annotations

import os
from pathlib import Path


def replace_between(text: str, begin: str, end: str, body: str) -> str:
    """TEXT with what lies between the markers BEGIN and END replaced by BODY (each on a
    line of its own); BEGIN, BODY, END appended when either marker is missing."""
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        _, _, tail = rest.partition(end)
        return head + block + tail
    return (text.rstrip("\n") + "\n\n" if text.strip() else "") + block + "\n"


def replace_section(text: str, heading: str, body: str) -> str:
    """TEXT with the section under HEADING (up to the next `## `) replaced by BODY; the
    section appended when TEXT has no such heading."""
    lines = text.splitlines()
    try:
        start = lines.index(heading)
    except ValueError:
        return text.rstrip("\n") + "\n\n" + heading + "\n\n" + body.strip("\n") + "\n"
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
               len(lines))
    new = [*lines[: start + 1], "", *body.strip("\n").splitlines(), ""]
    if end < len(lines):
        new += lines[end:]
    return "\n".join(new).rstrip("\n") + "\n"


def read_file(path: Path | str, default: str = "") -> str:
    """The text of PATH, or DEFAULT when it does not exist."""
    path = Path(path)
    return path.read_text(encoding="utf-8") if path.exists() else default


def write_file(path: Path | str, text: str) -> None:
    """Replace PATH with TEXT atomically (a reader never sees half a file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_section(path: Path | str, heading: str, body: str, *,
                  title: str = "# Benchmarks") -> None:
    """Replace (or append) the section under HEADING of the Markdown file PATH (a new file
    starts with TITLE)."""
    write_file(path, replace_section(read_file(path, title + "\n"), heading, body))
