"""initramfs-tools integration: install tmpfsboot's hook and boot script, build an initramfs.

`tmpfsboot initramfs install` puts the hook, the boot script `scripts/tmpfs` and the conf.d
snippet into /etc/initramfs-tools (or --confdir). `tmpfsboot initramfs build` runs the real
`mkinitramfs -d` on a private copy of that configuration, so /etc stays untouched. The hook
calls back into `tmpfsboot initramfs stage`, which decides what goes in: Debian's python3.11,
the standard-library modules the boot engine imports (the closure found by importing them
under that interpreter, compiled to sourceless .pyc), the engine itself, decompressors,
gpgv and the keyring, the CA bundle.
"""

from __future__ import annotations

import ast
import ctypes
import ctypes.util
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..boot.cmdline import MirrorOrder, parse_rootsize
from ..boot.contract import CA_BUNDLES, DEFAULT_ROOTSIZE, KEYRING_NAME
from ..boot.errors import CommandError, TmpfsbootError, UsageError
from ..boot.log import format_bytes, phase
from ..boot.run import find_program, require_program, run

log = logging.getLogger("tmpfsboot")

# The tmpfsboot package: its boot/ subpackage is what goes into the initramfs.
PACKAGE = Path(__file__).resolve().parent.parent

DEFAULT_CONFDIR = Path("/etc/initramfs-tools")
# Where the Debian package puts the hook (debian/rules); with it, /etc needs no copy.
PACKAGED_HOOK = Path("/usr/share/initramfs-tools/hooks/tmpfsboot")
# Debian's own interpreter (python3.11-minimal), never a pyenv or venv build.
PYTHON = Path("/usr/bin/python3.11")
STDLIB = Path("/usr/lib/python3.11")
# The files `install` puts into a configuration directory, relative to it.
INSTALLED = ("hooks/tmpfsboot", "scripts/tmpfs", "conf.d/tmpfsboot")
HOOK_DIRS = ("tmpfs-top", "tmpfs-premount", "tmpfs-bottom")
# What the hook puts into an initramfs tree besides the engine (tree path -> data file), so a
# hook under /usr/share/initramfs-tools (the Debian package) needs nothing in /etc, and an
# initramfs built with TMPFS=n carries none of them. zz-: sourced last by /init, and apart
# from an administrator's conf.d/tmpfsboot (which mkinitramfs copies in as well).
STAGED_FILES = {"scripts/tmpfs": "scripts/tmpfs",
                "conf/conf.d/zz-tmpfsboot": "conf.d/tmpfsboot"}
MODULES_CHOICES = ("most", "netboot", "dep", "list")
GENERATORS = ("initramfs-tools", "dracut")
# With MODULES=list the NIC drivers of a QEMU guest must be named (most/netboot have them).
LIST_MODULES = ("virtio_pci", "virtio_net", "af_packet")
# What no import statement in the engine shows: runpy (for `python -m`) and the codecs,
# which are looked up by name at run time (UTF-8 I/O, ASCII and Latin-1 for HTTP, IDNA
# for host names).
EXTRA_ROOTS = ("runpy", "encodings.utf_8", "encodings.ascii", "encodings.latin_1",
               "encodings.idna")
# Decompressors the engine runs as children when present (else the stdlib fallback). Each
# entry is a list of alternatives, the first found wins: pixz comes only without xz, as it
# links libarchive and through libxml2 the 30 MB ICU data (xz -T0 decompresses in parallel).
DECOMPRESSORS = (("zstd",), ("xz", "pixz"), ("pigz",))
# .pyc optimization level for the initramfs. Measured (docs/benchmarks.md): level 2 saves
# 0.19 MB of a 11.5 MB zstd initramfs and no start-up time, but drops the engine's asserts.
OPTIMIZE = 0

# Runs under Debian's python3.11 -I -S with the engine's imports as arguments (see
# find_imports): imports them and takes what landed in sys.modules, which is their closure
# as it loads at boot plus what start-up itself needs. The pure-Python ones are compiled
# into the initramfs tree as sourceless .pyc; a JSON report names the extension modules.
_STAGE_SCRIPT = r"""
import sys, importlib
pkg_parent, destdir, optimize = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path.insert(0, pkg_parent)
for name in sys.argv[4:]:
    try:
        importlib.import_module(name)
    except ImportError:
        pass  # `from X import function`: X itself is in the list
# The snapshot, taken before this script imports tools of its own.
loaded = sorted((name, getattr(mod, "__file__", None)) for name, mod in sys.modules.items())
import json, os, py_compile
stdlib = os.path.dirname(os.__file__)
pyc, ext, builtin = [], [], []
for name, path in loaded:
    if name in sys.builtin_module_names or path is None:
        builtin.append(name)
        continue
    if path.endswith(".so"):
        ext.append(path)
        continue
    if path.startswith(pkg_parent + "/"):
        rel = os.path.relpath(path, pkg_parent)
    elif path.startswith(stdlib + "/"):
        rel = os.path.relpath(path, stdlib)
    else:
        raise SystemExit(f"{name}: {path} is neither the standard library nor tmpfsboot")
    if rel == "tmpfsboot/__init__.py":
        continue  # written empty by the caller
    out = os.path.join(destdir, stdlib.lstrip("/"), rel) + "c"
    os.makedirs(os.path.dirname(out), exist_ok=True)
    py_compile.compile(path, cfile=out, dfile=os.path.join(stdlib, rel), doraise=True,
                       optimize=optimize)
    pyc.append(name)
os.makedirs(os.path.join(destdir, stdlib.lstrip("/"), "lib-dynload"), exist_ok=True)
json.dump({"pyc": pyc, "ext": ext, "builtin": builtin}, sys.stdout)
"""


def find_imports(path: Path) -> list[str]:
    """Every absolute module name PATH imports, at top level or inside functions.

    For `from X import Y` both X and X.Y are named: Y may be a submodule.
    """
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names if a.name != "*"]
    return [n for n in dict.fromkeys(names) if n != "__future__"]


@dataclass(frozen=True)
class Staged:
    """What `stage_engine` put into an initramfs tree, and the programs left to copy_exec."""

    modules: tuple[str, ...]
    programs: tuple[str, ...]
    pyc_bytes: int


def data_dir() -> Path:
    """tmpfsboot's shipped initramfs-tools files."""
    return Path(str(resources.files("tmpfsboot") / "data" / "initramfs-tools"))


def render_hook(python: str) -> str:
    """The hook with PYTHON (the interpreter that runs this tmpfsboot) filled in."""
    return (data_dir() / "hooks" / "tmpfsboot").read_text().replace("@PYTHON@", python)


def install_files(confdir: Path, *, python: str = sys.executable) -> list[Path]:
    """Put the hook, boot script and conf.d snippet into CONFDIR; returns the files changed.

    Idempotent: a file already holding the right content is left alone.
    """
    if not confdir.is_dir():
        raise UsageError(f"{confdir}: not a directory (is initramfs-tools installed?)")
    contents = {
        "hooks/tmpfsboot": render_hook(python),
        "scripts/tmpfs": (data_dir() / "scripts" / "tmpfs").read_text(),
        "conf.d/tmpfsboot": (data_dir() / "conf.d" / "tmpfsboot").read_text(),
    }
    changed = []
    for rel, text in contents.items():
        path = confdir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = 0o755 if rel.startswith("hooks/") else 0o644
        if path.exists() and path.read_text() == text and (path.stat().st_mode & 0o777) == mode:
            continue
        path.write_text(text)
        path.chmod(mode)
        changed.append(path)
    for name in HOOK_DIRS:
        (confdir / "scripts" / name).mkdir(parents=True, exist_ok=True)
    return changed


def remove_files(confdir: Path) -> list[Path]:
    """Remove what install_files put into CONFDIR (hook directories only if empty)."""
    removed = []
    for rel in INSTALLED:
        path = confdir / rel
        if path.exists():
            path.unlink()
            removed.append(path)
    for name in HOOK_DIRS:
        d = confdir / "scripts" / name
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
    return removed


def has_builtin_nss_dns() -> bool:
    """True if the C library resolves DNS itself (glibc 2.34+), so libnss_dns is not needed."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return hasattr(libc, "_nss_dns_gethostbyname4_r")


def find_nss_dns() -> str | None:
    """The NSS DNS module of this libc, if any."""
    for d in ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib64", "/lib64"):
        path = Path(d) / "libnss_dns.so.2"
        if path.exists():
            return str(path)
    return None


def engine_imports() -> list[str]:
    """The engine's modules and every standard-library module they import anywhere."""
    boot = PACKAGE / "boot"
    names: list[str] = []
    for path in sorted(boot.glob("*.py")):
        names.append(f"tmpfsboot.boot.{path.stem}" if path.stem != "__init__" else "tmpfsboot.boot")
        names += find_imports(path)
    return list(dict.fromkeys(names))


def stage_python(destdir: Path, *, optimize: int = OPTIMIZE) -> dict[str, list[str]]:
    """Compile the engine and the stdlib modules it needs into DESTDIR with Debian's python3.11.

    Returns the report: pyc (module names), ext (.so paths to copy_exec), builtin.
    """
    python = str(PYTHON) if PYTHON.exists() else None
    if python is None:
        raise CommandError(f"{PYTHON}: not found; install the Debian package python3.11-minimal")
    package_parent = str(PACKAGE.parent)
    argv = [python, "-I", "-S", "-c", _STAGE_SCRIPT, package_parent, str(destdir), str(optimize),
            *engine_imports(), *EXTRA_ROOTS]
    proc = run(argv, capture=True)
    report: dict[str, list[str]] = json.loads(proc.stdout)
    # tmpfsboot/__init__ must exist and stay empty: only tmpfsboot.boot goes in.
    init = destdir / STDLIB.relative_to("/") / "tmpfsboot" / "__init__.pyc"
    init.parent.mkdir(parents=True, exist_ok=True)
    run([python, "-I", "-S", "-c",
         "import py_compile, sys, tempfile, os\n"
         "with tempfile.NamedTemporaryFile('w', suffix='.py', delete=False) as f: pass\n"
         "py_compile.compile(f.name, cfile=sys.argv[1], dfile='tmpfsboot/__init__.py',"
         " doraise=True)\nos.unlink(f.name)", str(init)])
    return report


def stage_engine(destdir: Path, *, rootsize: str = DEFAULT_ROOTSIZE,
                 keyring: Path | None = None,
                 mirrors: str = MirrorOrder.ORDERED.value) -> Staged:
    """Put into the initramfs tree DESTDIR what a tmpfs boot needs, except the ELF programs.

    Returns the programs and libraries the hook must copy with copy_exec (so their shared
    libraries follow): python3.11, the extension modules, decompressors, gpgv, libnss_dns.
    """
    try:
        parse_rootsize(rootsize)
    except TmpfsbootError as e:
        raise UsageError(f"ROOTSIZE (initramfs config): {e}") from None
    check_mirror_order(mirrors)
    if not destdir.is_dir():
        raise UsageError(f"{destdir}: not a directory")
    report = stage_python(destdir)
    for target_rel, data_rel in STAGED_FILES.items():
        target = destdir / target_rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data_dir() / data_rel, target)
    programs: list[str] = [str(PYTHON), *report["ext"]]
    for alternatives in DECOMPRESSORS:
        found = [p for p in map(find_program, alternatives) if p]
        programs += found[:1]
    if keyring is not None:
        if not keyring.is_file():
            raise UsageError(f"TMPFS_KEYRING={keyring}: no such file")
        programs.append(require_program("gpgv"))
        target = destdir / "etc" / KEYRING_NAME
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(keyring, target)
    ca_bundle = next((Path(p) for p in CA_BUNDLES if os.path.exists(p)), None)
    if ca_bundle is not None:
        target = destdir / ca_bundle.relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ca_bundle, target)
        # OpenSSL's default file (OPENSSLDIR/cert.pem) as on the build host.
        default = destdir / "usr/lib/ssl/cert.pem"
        default.parent.mkdir(parents=True, exist_ok=True)
        if not default.is_symlink():
            default.symlink_to(ca_bundle)
    else:
        log.warning("%s: not found; https:// roots will fail (install ca-certificates)",
                    CA_BUNDLES[0])
    if not has_builtin_nss_dns():
        nss = find_nss_dns()
        if nss:
            programs.append(nss)
    tree = destdir / STDLIB.relative_to("/")
    size = sum(p.stat().st_size for p in tree.rglob("*.pyc"))
    return Staged(modules=tuple(report["pyc"]), programs=tuple(programs), pyc_bytes=size)


def default_kernel() -> str:
    """The newest kernel with both /boot/vmlinuz-VERSION and /lib/modules/VERSION."""
    versions = [p.name.removeprefix("vmlinuz-") for p in Path("/boot").glob("vmlinuz-*")]
    versions = [v for v in versions if Path("/lib/modules", v).is_dir()]
    if not versions:
        raise CommandError("no kernel in /boot with modules in /lib/modules; install the "
                           "Debian package linux-image-amd64")
    return max(versions, key=_version_key)


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.replace("-", ".").split(".") if p.isdigit())


def kernel_image(version: str) -> Path:
    """/boot/vmlinuz-VERSION, or CommandError."""
    path = Path("/boot") / f"vmlinuz-{version}"
    if not path.exists():
        raise CommandError(f"{path}: not found; install the Debian package linux-image-amd64")
    return path


def check_mirror_order(mirrors: str) -> None:
    """UsageError unless MIRRORS is a valid TMPFS_MIRRORS (checked at build time, not boot)."""
    try:
        MirrorOrder.parse(mirrors, key="TMPFS_MIRRORS")
    except TmpfsbootError as e:
        raise UsageError(f"{e} (initramfs config)") from None


def set_conf(text: str, values: Mapping[str, str]) -> str:
    """initramfs.conf TEXT with each KEY=VALUE of VALUES set (replaced, else appended)."""
    lines = text.splitlines()
    for key, value in values.items():
        line = f"{key}={value}"
        for i, old in enumerate(lines):
            if old.startswith(f"{key}="):
                lines[i] = line
                break
        else:
            lines.append(line)
    return "\n".join(lines) + "\n"


def prepare_confdir(
    confdir: Path,
    *,
    source: Path = DEFAULT_CONFDIR,
    modules: str = "list",
    rootsize: str | None = None,
    keyring: Path | None = None,
    scripts: Path | None = None,
    mirrors: str | None = None,
    extra_modules: Iterable[str] = (),
) -> None:
    """Make CONFDIR a private copy of SOURCE with tmpfsboot installed and enabled."""
    if source.is_dir():
        shutil.copytree(source, confdir, symlinks=True, dirs_exist_ok=True)
    else:
        confdir.mkdir(parents=True, exist_ok=True)
    conf = confdir / "initramfs.conf"
    values = {"MODULES": modules, "TMPFS": "y"}
    if rootsize is not None:
        parse_rootsize(rootsize)
        values["ROOTSIZE"] = rootsize
    if mirrors is not None:
        check_mirror_order(mirrors)
        values["TMPFS_MIRRORS"] = mirrors
    if keyring is not None:
        values["TMPFS_KEYRING"] = str(keyring.resolve())
    conf.write_text(set_conf(conf.read_text() if conf.exists() else "", values))
    install_files(confdir)
    wanted = list(extra_modules) + (list(LIST_MODULES) if modules == "list" else [])
    if wanted:
        with (confdir / "modules").open("a") as f:
            f.write("".join(f"{m}\n" for m in wanted))
    if scripts is not None:
        shutil.copytree(scripts, confdir / "scripts", dirs_exist_ok=True)


def build_initramfs(
    output: Path,
    *,
    kernel: str | None = None,
    modules: str = "list",
    rootsize: str | None = None,
    keyring: Path | None = None,
    scripts: Path | None = None,
    source: Path = DEFAULT_CONFDIR,
    enable: bool = True,
    mirrors: str | None = None,
) -> Path:
    """Build OUTPUT with the real mkinitramfs from a private copy of the configuration.

    SCRIPTS, a directory like /etc/initramfs-tools/scripts (e.g. with tmpfs-top/NAME hook
    scripts), is added to the copy. enable=False builds the same initramfs without
    tmpfsboot's files (TMPFS=n), for comparison.
    """
    if modules not in MODULES_CHOICES:
        raise UsageError(f"--modules {modules}: expected one of {', '.join(MODULES_CHOICES)}")
    version = kernel or default_kernel()
    if not Path("/lib/modules", version).is_dir():
        raise UsageError(f"--kernel {version}: no /lib/modules/{version}")
    mkinitramfs = require_program("mkinitramfs")
    output = output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tmpfsboot-initramfs.") as tmp:
        confdir = Path(tmp) / "conf"
        prepare_confdir(confdir, source=source, modules=modules, rootsize=rootsize,
                        keyring=keyring, scripts=scripts, mirrors=mirrors)
        if not enable:
            conf = confdir / "initramfs.conf"
            conf.write_text(set_conf(conf.read_text(), {"TMPFS": "n"}))
        with phase(f"Building initramfs for {version} (MODULES={modules}): {output}"):
            run([mkinitramfs, "-d", str(confdir), "-o", str(output), version],
                env={"TMPDIR": tmp}, capture=True)
    log.info("Initramfs: %s (%s)", output, format_bytes(output.stat().st_size))
    return output


# ----- command line -----
