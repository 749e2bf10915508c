"""dracut integration: install tmpfsboot's dracut module, build an initramfs with dracut.

`tmpfsboot initramfs install --generator dracut` puts the module `90tmpfsboot` where dracut
looks for modules (/usr/lib/dracut/modules.d). `tmpfsboot initramfs build --generator
dracut` runs the real dracut with a private configuration (`--conf /dev/null --confdir
PRIVATE`) and a private copy of dracut's base directory (symbolic links to the host's,
plus the module), so neither /etc/dracut.conf.d nor /usr/lib/dracut is touched. The module
stages the same engine, interpreter and stdlib subset as the initramfs-tools hook
(`tmpfsboot initramfs stage`); dracut's network-legacy brings the network up.
"""

from __future__ import annotations

import logging
import shlex
import sys
import tempfile
from importlib import resources
from pathlib import Path

from ..boot.cmdline import parse_rootsize
from ..boot.errors import TmpfsbootError, UsageError
from ..boot.log import format_bytes, phase
from ..boot.run import require_program, run
from .initramfs import default_kernel

log = logging.getLogger("tmpfsboot")

DRACUT_BASEDIR = Path("/usr/lib/dracut")
MODULE_NAME = "90tmpfsboot"
# dracut 059's systemd-networkd module never sends a request for a netroot: the module
# is built with network-legacy (dhclient), which works with and without systemd.
NETWORK_MODULE = "network-legacy"
# The NIC drivers of a QEMU guest and DHCP's packet sockets, whatever the build host has.
DRIVERS = ("virtio_pci", "virtio_net", "af_packet")
# zstd at level 1, multi-threaded: dracut's --zstd (level 15) took 4 times as long to build
# here for a 20 % smaller file (docs/benchmarks.md); initramfs-tools uses level 9.
COMPRESS = "zstd -q -1 -T0"


def module_source() -> Path:
    """tmpfsboot's shipped dracut module directory."""
    return Path(str(resources.files("tmpfsboot") / "data" / "dracut" / MODULE_NAME))


def render_module(dest: Path, *, python: str = sys.executable) -> list[Path]:
    """Write the module into DEST (created), PYTHON filled in; returns the files changed.

    Idempotent: a file already holding the right content and mode is left alone.
    """
    dest.mkdir(parents=True, exist_ok=True)
    changed = []
    for source in sorted(module_source().iterdir()):
        text = source.read_text().replace("@PYTHON@", python)
        path = dest / source.name
        mode = 0o755 if source.suffix == ".sh" else 0o644
        if path.exists() and path.read_text() == text and (path.stat().st_mode & 0o777) == mode:
            continue
        path.write_text(text)
        path.chmod(mode)
        changed.append(path)
    return changed


def install_module(modules_dir: Path = DRACUT_BASEDIR / "modules.d") -> list[Path]:
    """Put the module into MODULES_DIR (dracut's modules.d); returns the files changed."""
    if not modules_dir.is_dir():
        raise UsageError(f"{modules_dir}: not a directory (is dracut-core installed?)")
    return render_module(modules_dir / MODULE_NAME)


def remove_module(modules_dir: Path = DRACUT_BASEDIR / "modules.d") -> list[Path]:
    """Remove what install_module put into MODULES_DIR (the directory if left empty)."""
    dest = modules_dir / MODULE_NAME
    removed = []
    for source in sorted(module_source().iterdir()):
        path = dest / source.name
        if path.exists():
            path.unlink()
            removed.append(path)
    if dest.is_dir() and not any(dest.iterdir()):
        dest.rmdir()
    return removed


def private_basedir(dest: Path, *, source: Path = DRACUT_BASEDIR) -> Path:
    """A dracut base directory in DEST: links to SOURCE's files and modules, plus ours.

    An installed 90tmpfsboot in SOURCE is replaced by this tmpfsboot's own.
    """
    if not (source / "dracut-init.sh").is_file():
        raise UsageError(f"{source}: not dracut's base directory; install the Debian "
                         "package dracut-core")
    dest.mkdir(parents=True)
    for entry in source.iterdir():
        if entry.name != "modules.d":
            (dest / entry.name).symlink_to(entry)
    modules = dest / "modules.d"
    modules.mkdir()
    for entry in (source / "modules.d").iterdir():
        if entry.name != MODULE_NAME:
            (modules / entry.name).symlink_to(entry)
    render_module(modules / MODULE_NAME)
    return dest


def render_conf(*, rootsize: str | None, keyring: Path | None, scripts: Path | None) -> str:
    """The private dracut.conf.d snippet: the module's settings as for initramfs-tools."""
    values = {}
    if rootsize is not None:
        values["ROOTSIZE"] = parse_rootsize(rootsize)
    if keyring is not None:
        if not keyring.is_file():
            raise UsageError(f"--keyring {keyring}: no such file")
        values["TMPFS_KEYRING"] = str(keyring.resolve())
    if scripts is not None:
        if not scripts.is_dir():
            raise UsageError(f"--scripts {scripts}: not a directory")
        values["TMPFS_SCRIPTS"] = str(scripts.resolve())
    lines = [f"{key}={shlex.quote(value)}" for key, value in values.items()]
    return "".join(f"{line}\n" for line in lines)


def dracut_argv(output: Path, version: str, *, confdir: Path, tmpdir: Path, systemd: bool,
                enable: bool) -> list[str]:
    """The dracut command line of a private, host-independent build."""
    # network and its backend in both: without tmpfsboot, the initramfs a netroot needs
    add = ["network", NETWORK_MODULE, *(["tmpfsboot"] if enable else [])]
    argv = [require_program("dracut"), "--conf", "/dev/null", "--confdir", str(confdir),
            "--tmpdir", str(tmpdir), "--no-hostonly", "--no-hostonly-cmdline", "--force",
            "--compress", COMPRESS, "--add", " ".join(add), "--add-drivers", " ".join(DRIVERS)]
    if not systemd:
        argv += ["--omit", "systemd"]
    return [*argv, str(output), version]


def build_dracut(
    output: Path,
    *,
    kernel: str | None = None,
    rootsize: str | None = None,
    keyring: Path | None = None,
    scripts: Path | None = None,
    systemd: bool = False,
    enable: bool = True,
) -> Path:
    """Build OUTPUT with the real dracut from a private configuration and base directory.

    SYSTEMD chooses dracut's flavour (its systemd module, or the shell init without it).
    SCRIPTS is a directory with the hook directories tmpfs-top, tmpfs-premount and
    tmpfs-bottom. enable=False builds the same initramfs without tmpfsboot, for comparison.
    """
    version = kernel or default_kernel()
    if not Path("/lib/modules", version).is_dir():
        raise UsageError(f"--kernel {version}: no /lib/modules/{version}")
    try:
        conf = render_conf(rootsize=rootsize, keyring=keyring, scripts=scripts)
    except TmpfsbootError as e:
        raise UsageError(f"--rootsize {rootsize}: {e}") from None
    output = output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    flavour = "systemd" if systemd else "no systemd"
    with tempfile.TemporaryDirectory(prefix="tmpfsboot-dracut.") as tmp:
        basedir = private_basedir(Path(tmp) / "basedir")
        confdir = Path(tmp) / "conf.d"
        confdir.mkdir()
        (confdir / "tmpfsboot.conf").write_text(conf)
        argv = dracut_argv(output, version, confdir=confdir, tmpdir=Path(tmp), systemd=systemd,
                           enable=enable)
        with phase(f"Building initramfs with dracut for {version} ({flavour}): {output}"):
            run(argv, env={"dracutbasedir": str(basedir), "TMPDIR": tmp}, capture=True)
    log.info("Initramfs: %s (%s)", output, format_bytes(output.stat().st_size))
    return output
