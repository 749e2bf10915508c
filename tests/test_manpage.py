"""Manual pages: generated from the parser and the parameter tables, the README's tables
equal to the pages', and clean for man(1) as lintian checks them."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO

from tmpfsboot.cli import build_parser
from tmpfsboot.cli.manpage import (
    BUILD_SETTINGS,
    CMDLINE_HEADER,
    CMDLINE_PARAMETERS,
    SETTINGS_HEADER,
    markdown_table,
    render_pages,
    roff_escape,
    roff_inline,
)

pytestmark = pytest.mark.unit

PAGES = ("tmpfsboot.8", "tmpfsboot-cmdline.7", "tmpfsboot.conf.5")


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pages as `make man` writes them (python -m tmpfsboot.cli.manpage DIR)."""
    out = tmp_path_factory.mktemp("man")
    subprocess.run([sys.executable, "-m", "tmpfsboot.cli.manpage", str(out)], check=True,
                   capture_output=True)
    return out


def render_text(page: Path) -> str:
    """PAGE as man(1) shows it, on lines wide enough never to wrap."""
    env = {**os.environ, "MANWIDTH": "1000", "LANG": "C.UTF-8", "MAN_KEEP_FORMATTING": ""}
    proc = subprocess.run(["man", "-l", "-P", "cat", "-E", "ascii", str(page)],
                          capture_output=True, text=True, env=env, check=True)
    return proc.stdout


def visible_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """PARSER and every subcommand parser `--help` lists, recursively."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            hidden = {a.dest for a in action._choices_actions if a.help == argparse.SUPPRESS}
            for name, sub in action.choices.items():
                if name not in hidden:
                    found += visible_parsers(sub)
    return found


def test_make_man_writes_the_three_pages(pages: Path) -> None:
    assert sorted(p.name for p in pages.iterdir()) == sorted(PAGES)


@pytest.mark.parametrize("name", PAGES)
def test_page_has_no_groff_warning(pages: Path, name: str) -> None:
    # What lintian runs for its groff-message tag.
    proc = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z",
                           str(pages / name)], capture_output=True, text=True,
                          env={**os.environ, "LANG": "C.UTF-8", "MANWIDTH": "80"}, check=True)
    assert proc.stderr == ""


def test_tmpfsboot_8_documents_every_verb_and_option(pages: Path) -> None:
    text = render_text(pages / "tmpfsboot.8")
    parsers = visible_parsers(build_parser())
    assert len(parsers) >= 10  # tmpfsboot, its verbs and their actions
    for parser in parsers:
        assert parser.prog in text
        for action in parser._actions:
            if action.help == argparse.SUPPRESS:
                continue
            for option in action.option_strings:
                assert option in text, f"{parser.prog} {option}"
            if action.help and "%" not in action.help:
                assert " ".join(action.help.split()) in " ".join(text.split()), action.help


def test_hidden_action_stays_out_of_the_page(pages: Path) -> None:
    # `initramfs stage` is the hook's, help=SUPPRESS: not for administrators.
    assert "initramfs stage" not in render_text(pages / "tmpfsboot.8")


def test_cmdline_7_lists_every_parameter_of_the_table(pages: Path) -> None:
    text = render_text(pages / "tmpfsboot-cmdline.7")
    for term, _ in CMDLINE_PARAMETERS:
        assert term.strip("`").replace("\\|", "|") in text
    for hook_dir in ("tmpfs-top", "tmpfs-premount", "tmpfs-bottom"):
        assert f"/etc/initramfs-tools/scripts/{hook_dir}" in text


def test_conf_5_lists_every_build_setting(pages: Path) -> None:
    text = render_text(pages / "tmpfsboot.conf.5")
    for variable in ("TMPFS=y|n", "ROOTSIZE=50%", "TMPFS_KEYRING=PATH"):
        assert variable in text


@pytest.mark.parametrize(("header", "rows"), [(CMDLINE_HEADER, CMDLINE_PARAMETERS),
                                              (SETTINGS_HEADER, BUILD_SETTINGS)])
def test_readme_table_is_the_man_page_table(header: tuple[str, str],
                                            rows: tuple[tuple[str, str], ...]) -> None:
    readme = (REPO / "README.md").read_text()
    assert markdown_table(header, rows) in readme, (
        "README.md's table drifted from tmpfsboot/cli/manpage.py; paste this:\n"
        + markdown_table(header, rows))


ROFF_CASES = [
    ("plain", "plain"),
    ("--option", "\\-\\-option"),
    ("a\\b", "a\\eb"),
    (".starts with a dot", "\\&.starts with a dot"),
    ("'quote first", "\\&'quote first"),
]


@pytest.mark.parametrize(("text", "expected"), ROFF_CASES)
def test_roff_escape(text: str, expected: str) -> None:
    assert roff_escape(text) == expected


INLINE_CASES = [
    ("`root=URL`", "\\fBroot=URL\\fR"),
    ("`a\\|b` or `.c`", "\\fBa|b\\fR or \\fB.c\\fR"),
    ("default `n`.", "default \\fBn\\fR."),
]


@pytest.mark.parametrize(("markdown", "expected"), INLINE_CASES)
def test_roff_inline(markdown: str, expected: str) -> None:
    assert roff_inline(markdown) == expected


def test_render_pages_is_stable() -> None:
    # No date or host detail: two builds give the same pages.
    assert render_pages() == render_pages()
