"""Manual pages: tmpfsboot(8) from the argument parser, tmpfsboot-cmdline(7) and
tmpfsboot.conf(5) from the parameter tables below, which the README's tables must equal.

`python3 -m tmpfsboot.manpage DIR` (what `make man` and the Debian package build run)
writes the three pages into DIR. Table cells are written in Markdown's inline syntax (the
README's), and turned into roff here: `code` becomes bold, `\\|` a plain bar.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from .. import __version__
from ..boot.cmdline import SUBSTITUTIONS
from ..boot.contract import DEFAULT_BACKOFF, DEFAULT_ROOTSIZE
from ..host.initramfs import HOOK_DIRS, MODULES_CHOICES

Row = tuple[str, str]

CMDLINE_HEADER: Row = ("parameter", "meaning")
CMDLINE_PARAMETERS: tuple[Row, ...] = (
    ("`root=URL[,URL...]`", "layers, extracted in order; a later one overwrites an earlier "
     "one, OCI whiteouts delete; squashfs/erofs image layers come first, stacked under an overlay"),
    ("`URL\\|URL`", "mirrors of one layer, tried in order"),
    ("`tmpfs.mirrors=ordered\\|spread`", "`spread`: each node orders every layer's mirrors by "
     "rendezvous hashing of its identity (SMBIOS UUID, else MAC, else hostname), so a fleet "
     "spreads evenly over caches and a node always asks the same cache first; `tmpfsboot "
     "cmdline --hostname H [--mac M] [--uuid U] TEXT` shows a node's order (docs/nginx.md)"),
    (f"`{' '.join('%' + s for s in SUBSTITUTIONS)} %%`",
     "substitutions in URLs (an unknown `%word` is an error before any download)"),
    ("`boot=tmpfs`", "select the tmpfs boot explicitly"),
    ("`rootsize=SIZE`", f"tmpfs size (default `ROOTSIZE`, {DEFAULT_ROOTSIZE}); anything else "
     "panics naming the value"),
    ("`tmpfs.verify=signature\\|checksum\\|no`", "default: `signature` with a keyring in the "
     "initramfs, else `checksum`"),
    ("`tmpfs.retries=N`", "retries after a failure (default: unlimited, as the original patch)"),
    ("`tmpfs.timeout=SECONDS`", "a connection stalled this long counts as broken"),
    ("`tmpfs.writers=N`", "processes writing the first tar layer's small files beside the "
     "extracting one (default: one per CPU beyond two, the extractor's and the "
     "decompressor's; `0`: none); the layer's log line names them (`2 writer processes`)"),
    ("`tmpfs.backoff=SECONDS`", f"first retry delay, doubled each time, jittered (default "
     f"{DEFAULT_BACKOFF:g}: the seed's 10-39 s); a server's `Retry-After` sets the delay "
     "instead. Pressing `x` while the boot waits opens a shell"),
    ("`tmpfs.hostname=node\\|image`", "`node` (default): the new root's `/etc/hostname` is "
     "the DHCP (or `ip=`) name and `/etc/hosts` names it on 127.0.1.1; `image`: both left as "
     "the image has them"),
    ("`tmpfs.machine_id=node\\|random\\|image\\|HEX`", "`node` (default): "
     "`/etc/machine-id` is the SMBIOS product UUID, as systemd derives it in a VM (stable "
     "across reboots, distinct between machines), or a hash of the boot NIC's MAC where the "
     "UUID is missing or a placeholder (all 0, all F, "
     "`03000200-0400-0500-0006-000700080009`); `random`: new each boot; `image`: the "
     "image's; 32 hex digits: that one"),
    ("`panic=N quiet ip= BOOTIF= break=`", "initramfs-tools' own, honoured as usual"),
)

SETTINGS_HEADER: Row = ("variable", "meaning")
BUILD_SETTINGS: tuple[Row, ...] = (
    ("`TMPFS=y\\|n`", "add tmpfsboot's files (engine, python3.11, decompressors, CA bundle). "
     "Default `n`."),
    (f"`ROOTSIZE={DEFAULT_ROOTSIZE}`", "default size of the tmpfs root: bytes, `k`/`m`/`g`, "
     "or `N%` of RAM"),
    ("`TMPFS_KEYRING=PATH`", "gpgv keyring to put in the initramfs; makes "
     "`tmpfs.verify=signature` the default"),
    ("`TMPFS_MIRRORS=ordered\\|spread`", "default for `tmpfs.mirrors=` (default `ordered`)"),
    ("`MODULES=" + "\\|".join(MODULES_CHOICES) + "`",
     "initramfs-tools' own: `netboot` carries the common NIC drivers"),
)


def markdown_table(header: Row, rows: Iterable[Row]) -> str:
    """The rows as a Markdown table, as the README holds it."""
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {term} | {meaning} |" for term, meaning in rows]
    return "\n".join(lines) + "\n"


# ----- roff -----


def roff_escape(text: str) -> str:
    """TEXT safe inside a roff text line: backslashes, hyphens and a leading dot escaped."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text.startswith((".", "'")) else text


def roff_inline(markdown: str) -> str:
    """One table cell (Markdown inline: `code`, \\|) as roff, code in bold."""
    parts = re.split(r"`([^`]*)`", markdown.replace("\\|", "|"))
    out = []
    for i, part in enumerate(parts):
        text = roff_escape(part).removeprefix("\\&") if i else roff_escape(part)
        out.append(f"\\fB{text}\\fR" if i % 2 else text)
    return "".join(out)


def roff_paragraphs(text: str) -> str:
    """Plain prose (blank lines between paragraphs) as roff paragraphs."""
    paras = [" ".join(p.split()) for p in text.strip().split("\n\n")]
    return "\n.PP\n".join(roff_escape(p) for p in paras) + "\n"


def roff_table(rows: Iterable[Row]) -> str:
    """Term and meaning pairs as tagged paragraphs."""
    return "".join(f".TP\n{roff_inline(term)}\n{roff_inline(meaning)}\n" for term, meaning
                   in rows)


def title(name: str, section: int, manual: str) -> str:
    """The .TH line (no date: the page is the same whenever it is built)."""
    return f'.TH {name.upper()} {section} "" "tmpfsboot {__version__}" "{manual}"\n'


# ----- tmpfsboot(8) from the parser -----


def _invocation(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"\\fI{roff_escape(str(action.metavar or action.dest))}\\fR"
    metavar = ""
    if action.nargs != 0:
        if action.choices is not None:
            metavar = "{" + ",".join(str(c) for c in action.choices) + "}"
        else:
            metavar = str(action.metavar or action.dest.upper())
        metavar = f" \\fI{roff_escape(metavar)}\\fR"
    return ", ".join(f"\\fB{roff_escape(o)}\\fR{metavar}" for o in action.option_strings)


def _options(parser: argparse.ArgumentParser, *, with_help: bool = False) -> str:
    formatter = parser._get_formatter()
    out = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
            continue
        if isinstance(action, argparse._HelpAction) and not with_help:
            continue  # said once, for the command
        text = formatter._expand_help(action) if action.help else ""
        if action.required and action.option_strings:
            text = f"{text} (required)" if text else "required"
        out.append(f".TP\n{_invocation(action)}\n{roff_escape(text)}\n")
    return "".join(out)


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help, parser) of each visible subcommand of PARSER, in order."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                if helps.get(name) != argparse.SUPPRESS:
                    found.append((name, helps.get(name) or "", sub))
    return found


def _usage(parser: argparse.ArgumentParser) -> str:
    usage = " ".join(parser.format_usage().removeprefix("usage:").split())
    return f".PP\n{roff_escape(usage)}\n"


def _verb_section(name: str, summary: str, parser: argparse.ArgumentParser) -> str:
    out = f'.SS "{parser.prog}"\n' + _usage(parser)
    text = parser.description or summary
    if text:
        out += f".PP\n{roff_inline(' '.join(text.split()))}\n"
    out += _options(parser)
    for sub_name, sub_help, sub in _subcommands(parser):
        out += _verb_section(sub_name, sub_help, sub)
    return out


def render_tmpfsboot_8(parser: argparse.ArgumentParser) -> str:
    """tmpfsboot(8): every verb (and action) with every option the parser knows."""
    out = title("tmpfsboot", 8, "System Administration")
    out += ".SH NAME\ntmpfsboot \\- boot disk\\-less Linux machines into a verified tmpfs root\n"
    out += ".SH SYNOPSIS\n" + _usage(parser)
    out += ".SH DESCRIPTION\n" + roff_paragraphs(DESCRIPTION_8)
    out += ".SH OPTIONS\n" + _options(parser, with_help=True)
    out += ".PP\nEvery verb takes \\fB\\-h\\fR, \\fB\\-\\-help\\fR as well.\n"
    out += ".SH VERBS\n"
    for name, summary, sub in _subcommands(parser):
        out += _verb_section(name, summary, sub)
    out += ".SH EXIT STATUS\n" + roff_table((
        ("`0`", "success"), ("`1`", "failure"), ("`2`", "bad usage or invalid input")))
    out += ".SH SEE ALSO\n" + _see_also(("tmpfsboot-cmdline", 7), ("tmpfsboot.conf", 5),
                                        ("initramfs-tools", 7), ("update-initramfs", 8))
    return out


DESCRIPTION_8 = """
tmpfsboot boots Linux machines disk-less. With TMPFS=y in initramfs-tools' configuration
(see tmpfsboot.conf(5)) the initramfs brings up the network, mounts a tmpfs as the root file
system, downloads one or more root images over HTTP or HTTPS, verifies them against
SHA256SUMS (and optionally a gpg signature), extracts them into the tmpfs and hands over to
the image's init. The kernel command line says what to fetch (tmpfsboot-cmdline(7)).

The tmpfsboot command is the host side: it builds and serves root images, builds an
initramfs without touching /etc, runs the boot engine's fetch on any host, parses a kernel
command line, and boots a demonstration in QEMU. Errors are one line naming the cause;
tracebacks only with --debug.
"""


def _see_also(*pages: tuple[str, int]) -> str:
    return ",\n".join(f".BR {roff_escape(name)} ({section})" for name, section in pages) + "\n"


# ----- tmpfsboot-cmdline(7) and tmpfsboot.conf(5) from the tables -----

CMDLINE_DESCRIPTION = """
A root= parameter whose value starts with http:// or https:// selects tmpfsboot's boot mode
by itself; boot=tmpfs selects it explicitly. The initramfs then brings up the network,
mounts a tmpfs on the new root, fetches each layer, verifies it while it streams in,
extracts it, and starts the image's init. Each comma-separated element of root= is a layer;
within one layer, | separates mirrors of the same image (GRUB needs such an argument
quoted).
"""

SUBSTITUTIONS_TEXT = """
%hostname and %fqdn come from DHCP (%fqdn else from reverse DNS, retried); %mac is the boot
interface (BOOTIF= or the NIC), lower-case and separated by -; %ip its address; %arch the
dpkg architecture; %uuid the DMI product UUID; %% is a literal %. An unknown %word is an
error before anything is downloaded.
"""

FAILURE_TEXT = """
Every step runs as a program whose failure ends in initramfs-tools' panic with tmpfsboot's
one-line message (the URL, the layer, the expected and actual hash, or the value that was
refused), so panic=N reboots the node after N seconds. A root with a layer that failed
verification is never booted: the tmpfs is emptied first. While the boot waits to retry,
pressing x opens a shell.
"""


def _hook_dirs_text() -> str:
    points = ("before networking", "the empty tmpfs is mounted on ${rootmnt}",
              "the last layer is extracted")
    return roff_table((f"`/etc/initramfs-tools/scripts/{d}`", p) for d, p in
                      zip(HOOK_DIRS, points, strict=True)) + (
        ".PP\nThey run like initramfs\\-tools' local\\-* ones (see initramfs\\-tools(7)).\n")


def render_cmdline_7() -> str:
    """tmpfsboot-cmdline(7): kernel parameters, substitutions, hook directories, failures."""
    out = title("tmpfsboot-cmdline", 7, "tmpfsboot")
    out += ".SH NAME\ntmpfsboot\\-cmdline \\- kernel parameters of tmpfsboot's tmpfs boot\n"
    out += ".SH DESCRIPTION\n" + roff_paragraphs(CMDLINE_DESCRIPTION)
    out += ".SH PARAMETERS\n" + roff_table(CMDLINE_PARAMETERS)
    out += ".SH SUBSTITUTIONS\n" + roff_paragraphs(SUBSTITUTIONS_TEXT)
    out += ".SH HOOK DIRECTORIES\n" + _hook_dirs_text()
    out += ".SH FAILURES\n" + roff_paragraphs(FAILURE_TEXT)
    out += ".SH FILES\n" + roff_table((
        ("`/run/tmpfsboot/boot.jsonl`", "JSON-lines log of the boot's phases, timings, bytes "
         "and retries; initramfs-tools moves /run into the new root, so it survives"),))
    out += ".SH EXAMPLE\n.PP\n.nf\n" + roff_escape(
        "root=http://images.lab/base.tar.zst|http://mirror.lab/base.tar.zst,"
        "http://images.lab/host-%hostname.tar.zst rootsize=75% panic=30") + "\n.fi\n"
    out += ".SH SEE ALSO\n" + _see_also(("tmpfsboot", 8), ("tmpfsboot.conf", 5),
                                        ("initramfs-tools", 7), ("bootparam", 7))
    return out


def render_conf_5() -> str:
    """tmpfsboot.conf(5): the build-time settings in initramfs.conf or conf.d."""
    out = title("tmpfsboot.conf", 5, "File Formats")
    out += ".SH NAME\ntmpfsboot.conf \\- tmpfsboot's settings in initramfs\\-tools' configuration\n"
    out += ".SH DESCRIPTION\n" + roff_paragraphs("""
tmpfsboot has no configuration file of its own: its initramfs-tools hook reads these
variables from /etc/initramfs-tools/initramfs.conf and /etc/initramfs-tools/conf.d/*, as
mkinitramfs does. They take effect at the next update-initramfs. Installing tmpfsboot
changes no initramfs until TMPFS=y is set.
""")
    out += ".SH VARIABLES\n" + roff_table(BUILD_SETTINGS)
    out += ".SH EXAMPLE\n.PP\n.nf\n" + roff_escape(
        "echo TMPFS=y > /etc/initramfs-tools/conf.d/tmpfsboot\nupdate-initramfs -u") + "\n.fi\n"
    out += ".SH FILES\n" + roff_table((
        ("`/usr/share/initramfs-tools/hooks/tmpfsboot`", "the hook (Debian package)"),
        ("`/etc/initramfs-tools/conf.d/`", "where an administrator sets these variables")))
    out += ".SH SEE ALSO\n" + _see_also(("tmpfsboot", 8), ("tmpfsboot-cmdline", 7),
                                        ("initramfs.conf", 5), ("update-initramfs", 8))
    return out


def render_pages() -> dict[str, str]:
    """File name -> roff text of every page."""
    from . import build_parser  # the CLI imports every verb module; the pages need them

    return {
        "tmpfsboot.8": render_tmpfsboot_8(build_parser()),
        "tmpfsboot-cmdline.7": render_cmdline_7(),
        "tmpfsboot.conf.5": render_conf_5(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Write every page into the directory named by the one argument."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python3 -m tmpfsboot.manpage OUTDIR", file=sys.stderr)
        return 2
    outdir = Path(args[0])
    outdir.mkdir(parents=True, exist_ok=True)
    for name, text in render_pages().items():
        (outdir / name).write_text(text)
        print(outdir / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
