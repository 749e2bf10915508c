"""The boot-time entry point: what initramfs-tools' `scripts/tmpfs` runs, one step at a time.

Started as ``python3.11 -I -S -m tmpfsboot.boot.main STEP ROOTMNT`` by the boot script:

- ``mount ROOTMNT``: after networking. Reads /proc/cmdline, writes /etc/resolv.conf,
  /etc/hostname and /etc/hosts of the initramfs from /run/net-*.conf (so DNS and
  ``%fqdn`` work), checks ``rootsize=`` (default: ``ROOTSIZE`` from the initramfs
  config) and mounts the empty tmpfs root.
- ``fetch ROOTMNT``: after the tmpfs-premount hooks. Gathers the node's facts, downloads,
  verifies and extracts every layer (``engine.fetch_root``), then writes the node's
  identity into the new root: hostname, hosts, machine-id, resolv.conf (identity.py).
  With squashfs or erofs layers the tmpfs moves to /run/tmpfsboot/layers and an
  overlay of the images takes its place on ROOTMNT (``imagelayer``).

On failure a step prints one line, leaves it in /run/tmpfsboot/error for the boot script
to hand to initramfs-tools' ``panic``, and exits 1 (3 when x was pressed for a shell). The
dracut glue runs the same steps (TMPFSBOOT_NETCONF=dracut: network facts from dracut's
files, ``dracutnet``). Standard library only.
"""

from __future__ import annotations

import glob
import logging
import os
import random
import select
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import dracutnet
from .cmdline import (
    BootPlan,
    Layer,
    MirrorOrder,
    NetFacts,
    choose_mirror_order,
    mac_from_bootif,
    node_identity,
    order_layers,
    parse_cmdline,
    parse_rootsize,
    resolve_layers,
)
from .contract import DEFAULT_ROOTSIZE, KEYRING_NAME
from .errors import CmdlineError, ShellRequested, TmpfsbootError, UsageError
from .identity import derive_machine_id, plan_identity, read_image_etc
from .log import NO_EVENTS, EventLog, phase, setup_logging
from .netconf import NetConf, parse_net_conf, render_hostname, render_hosts, render_resolv_conf
from .policy import FetchPolicy
from .run import run

log = logging.getLogger("tmpfsboot")

# Where the tmpfs moves to hold image layers (files, mounts, overlay upper and work), under
# /run so that it moves into the new root with /run: the images stay mounted after boot.
LAYERS_DIR = "tmpfsboot/layers"
# Directories /init needs in the new root to move /dev, /proc, /sys and /run into.
MOUNT_POINTS = ("dev", "proc", "sys", "run")
# The exit status after x was pressed: the dracut glue opens its emergency shell.
SHELL_EXIT = 3


@dataclass(frozen=True)
class Node:
    """Where the boot runs: file locations, so tests can point them into a scratch tree."""

    etc: str = "/etc"
    run: str = "/run"
    sys: str = "/sys"
    cmdline: str = "/proc/cmdline"
    tmp: str = "/tmp"  # dracut's network facts
    set_hostname: bool = True  # the kernel's hostname, from DHCP


def read_text(path: str) -> str | None:
    """The contents of PATH, or None if it cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def read_plan(node: Node) -> BootPlan:
    """The boot plan of this node's kernel command line; UsageError if it is not a tmpfs boot."""
    text = read_text(node.cmdline)
    if text is None:
        raise UsageError(f"{node.cmdline}: cannot read the kernel command line")
    plan = parse_cmdline(text)
    if not plan.tmpfs:
        raise CmdlineError("no root=http(s)://URL on the kernel command line: not a tmpfs boot")
    return plan


def wait_or_shell(seconds: float, *, fd: int | None = None) -> None:
    """Wait SECONDS before a retry; pressing x on the console opens a shell (as the seed).

    The shell is initramfs-tools' panic shell: ShellRequested carries the message there.
    """
    if fd is None:
        fd = sys.stdin.fileno() if sys.stdin is not None else -1
    if fd < 0 or not os.isatty(fd):
        time.sleep(seconds)
        return
    import termios  # lib-dynload: only for a console

    print(f"Press x (in the next {seconds:.0f} seconds) to open a shell", file=sys.stderr)
    saved = termios.tcgetattr(fd)
    raw = termios.tcgetattr(fd)
    raw[3] &= ~(termios.ICANON | termios.ECHO)
    termios.tcsetattr(fd, termios.TCSANOW, raw)
    try:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([fd], [], [], left)
            if ready and os.read(fd, 1) in (b"x", b"X"):
                raise ShellRequested("Spawning shell within the initramfs as requested")
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def read_net_conf(node: Node, device: str | None = None, *, source: str | None = None) -> NetConf:
    """The /run/net-DEVICE.conf of the boot interface (else the first one); empty if none.

    SOURCE "dracut" (TMPFSBOOT_NETCONF, set by the dracut glue) reads dracut's facts instead.
    """
    if source == dracutnet.SOURCE:
        return read_dracut_net(node, device)
    paths = sorted(glob.glob(f"{node.run}/net-*.conf"))
    preferred = f"{node.run}/net-{device}.conf" if device else None
    if preferred in paths:
        paths.insert(0, preferred)
    for path in paths:
        text = read_text(path)
        if text is not None:
            return parse_net_conf(text)
    return NetConf()


def read_dracut_net(node: Node, device: str | None) -> NetConf:
    """dracut's facts about DEVICE: DHCP's options, else its static ip=; empty if none."""
    if not device:
        return NetConf()
    dhcp = read_text(dracutnet.dhcpopts_path(node.tmp, device))
    if dhcp is not None:
        return dracutnet.parse_dhcpopts(dhcp, device=device)
    static = read_text(dracutnet.override_path(node.tmp, device)) or ""
    return dracutnet.parse_override(static, device=device)


def write_file(path: str, text: str) -> None:
    """Write TEXT to PATH atomically (a symlink at PATH is replaced, not followed)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmpfsboot"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_identity(etc: str, conf: NetConf) -> list[str]:
    """Write the initramfs' resolv.conf, hostname and hosts under ETC from CONF (so DNS
    and %fqdn work before the root exists); returns the names written."""
    written = []
    for name, text in (
        ("resolv.conf", render_resolv_conf(conf)),
        ("hostname", render_hostname(conf)),
        ("hosts", render_hosts(conf)),
    ):
        if text is not None:
            write_file(os.path.join(etc, name), text)
            written.append(name)
    return written


def choose_rootsize(plan: BootPlan, configured: str | None) -> str:
    """rootsize= from the command line, else ROOTSIZE from the initramfs config, else 50%."""
    if plan.rootsize is not None:
        return plan.rootsize
    if configured:
        try:
            return parse_rootsize(configured)
        except CmdlineError as e:
            raise CmdlineError(f"ROOTSIZE (initramfs config): {e}") from None
    return DEFAULT_ROOTSIZE


def lookup_fqdn(
    address: str,
    *,
    retries: int | None,
    sleep: Callable[[float], None] = time.sleep,
    resolve: Callable[[str], str] = lambda a: socket.gethostbyaddr(a)[0],
) -> str:
    """The FQDN of ADDRESS by reverse DNS, retried after a random 10-39 s as the seed does.

    Gives up after RETRIES retries (None: never), naming the address.
    """
    attempt = 0
    while True:
        try:
            name = resolve(address)
            if "." in name:
                return name
            problem = f"reverse DNS names it {name!r}, not a fully qualified name"
        except OSError as e:
            problem = str(e) or type(e).__name__
        if retries is not None and attempt >= retries:
            raise TmpfsbootError(f"cannot determine the FQDN of {address}: {problem}")
        attempt += 1
        delay = random.uniform(10, 40)
        log.warning("FQDN of %s: %s; retry %d in %.0f s", address, problem, attempt, delay)
        sleep(delay)


def gather_facts(plan: BootPlan, conf: NetConf, node: Node, env: dict[str, str]) -> NetFacts:
    """The node's facts for URL substitutions; the FQDN is looked up only if a URL uses it."""
    hostname = conf.short_hostname
    if not hostname:
        kernel_name = socket.gethostname()
        if kernel_name and kernel_name not in ("(none)", "localhost"):
            hostname = kernel_name.split(".", 1)[0]
    fqdn = conf.fqdn
    if fqdn is None and "fqdn" in plan.substitutions:
        if not conf.address:
            raise TmpfsbootError("%fqdn: DHCP gave no domain and the node has no address")
        fqdn = lookup_fqdn(conf.address, retries=plan.retries)
    mac = mac_from_bootif(plan.bootif) if plan.bootif else None
    if mac is None and conf.device:
        address = read_text(f"{node.sys}/class/net/{conf.device}/address")
        mac = address.strip().replace(":", "-").lower() if address else None
    uuid = read_text(f"{node.sys}/class/dmi/id/product_uuid")
    return NetFacts(
        hostname=hostname,
        fqdn=fqdn,
        mac=mac,
        ip=conf.address,
        arch=env.get("DPKG_ARCH") or None,
        uuid=uuid.strip().lower() if uuid else None,
    )


def step_mount(rootmnt: str, node: Node, env: dict[str, str], events: EventLog) -> None:
    """Write the initramfs' network files, then mount the empty tmpfs root on ROOTMNT."""
    plan = read_plan(node)
    conf = read_net_conf(node, env.get("DEVICE"), source=env.get("TMPFSBOOT_NETCONF"))
    written = write_identity(node.etc, conf)
    if written:
        log.info("Network: %s, wrote /etc/%s", conf.address or "no address",
                 ", /etc/".join(written))
    name = conf.short_hostname
    if node.set_hostname and name and socket.gethostname() != name:
        socket.sethostname(name)
    size = choose_rootsize(plan, env.get("ROOTSIZE"))
    with phase(f"Mounting tmpfs root on {rootmnt} (size={size})", events, size=size):
        run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", rootmnt])


def node_layers(plan: BootPlan, facts: NetFacts, configured: str | None) -> tuple[Layer, ...]:
    """The plan's layers with their mirrors in this node's order (tmpfs.mirrors=, else
    TMPFS_MIRRORS from the initramfs config)."""
    order = choose_mirror_order(plan, configured)
    if order is MirrorOrder.ORDERED or not any(len(la.mirrors) > 1 for la in plan.layers):
        return plan.layers
    identity = node_identity(facts)
    if identity is None:
        log.warning("tmpfs.mirrors=spread: no UUID, MAC or hostname; mirrors in written order")
        return plan.layers
    layers = order_layers(plan.layers, order, identity)
    log.info("Mirrors spread by %s: first %s", identity, layers[0].mirrors[0].url)
    return layers


def step_fetch(rootmnt: str, node: Node, env: dict[str, str], events: EventLog) -> None:
    """Fetch, verify and extract every layer into ROOTMNT, then complete the new root's /etc."""
    plan = read_plan(node)
    conf = read_net_conf(node, env.get("DEVICE"), source=env.get("TMPFSBOOT_NETCONF"))
    facts = gather_facts(plan, conf, node, env)
    urls = resolve_layers(node_layers(plan, facts, env.get("TMPFS_MIRRORS")), facts)
    path = os.path.join(node.etc, KEYRING_NAME)
    keyring = path if os.path.exists(path) else None
    policy = FetchPolicy.from_plan(plan, keyring=keyring, wait=wait_or_shell)
    from .engine import fetch_root  # the big part of start-up: load it late

    fetch_root(urls, rootmnt, policy, events=events,
               image_mounts=os.path.join(node.run, LAYERS_DIR))
    finish_root(rootmnt, conf, facts, plan, events)


def finish_root(rootmnt: str, conf: NetConf, facts: NetFacts, plan: BootPlan,
                events: EventLog = NO_EVENTS) -> None:
    """Give the new root what booting needs: mount points, and the node's own identity in
    /etc (hostname, hosts, machine-id, resolv.conf: see identity.py), each decision logged."""
    for name in MOUNT_POINTS:
        os.makedirs(os.path.join(rootmnt, name), mode=0o755, exist_ok=True)
    etc = os.path.join(rootmnt, "etc")
    machine_id = derive_machine_id(plan.machine_id, uuid=facts.uuid, mac=facts.mac)
    files = plan_identity(read_image_etc(etc), hostname=facts.hostname, fqdn=facts.fqdn,
                          resolv_conf=render_resolv_conf(conf), machine_id=machine_id,
                          hostname_from=plan.hostname_from)
    for f in files:
        path = os.path.join(etc, f.name)
        if f.text is not None:
            write_file(path, f.text)
            os.chmod(path, f.mode)
        action = "wrote" if f.text is not None else "left the image's"
        log.info("New root: %s /etc/%s: %s", action, f.name, f.why)
        events.write("identity", file=f"/etc/{f.name}", written=f.text is not None, why=f.why)


STEPS = {"mount": step_mount, "fetch": step_fetch}


def uptime() -> float | None:
    """Seconds since the kernel started, or None."""
    text = read_text("/proc/uptime")
    try:
        return float(text.split()[0]) if text else None
    except ValueError:
        return None


def python_start_seconds(env: dict[str, str]) -> float | None:
    """Seconds from the boot script starting Python (TMPFSBOOT_T0, an uptime) until now."""
    now, started = uptime(), env.get("TMPFSBOOT_T0")
    try:
        return round(now - float(started), 3) if now is not None and started else None
    except ValueError:
        return None


def describe_start(env: dict[str, str]) -> str:
    """The first console line: the interpreter and how long it took to get here."""
    line = f"tmpfsboot on Python {sys.version.split()[0]}"
    seconds = python_start_seconds(env)
    return line if seconds is None else f"{line}, started in {seconds:.2f} s"


def main(argv: Sequence[str] | None = None, *, node: Node = Node()) -> int:
    """Run one boot step. On failure: its one-line message in /run/tmpfsboot/error, return 1.

    SHELL_EXIT instead of 1 when x was pressed: the glue opens a shell.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ)
    quiet = "quiet" in (read_text(node.cmdline) or "").split()
    setup_logging(quiet=quiet, debug=env.get("TMPFSBOOT_DEBUG") == "1")
    state = os.path.join(node.run, "tmpfsboot")
    if len(args) != 2 or args[0] not in STEPS:
        print(f"usage: main.py {{{'|'.join(STEPS)}}} ROOTMNT", file=sys.stderr)
        return 2
    step, rootmnt = args
    os.makedirs(state, exist_ok=True)
    events = EventLog(os.path.join(state, "boot.jsonl"))
    try:
        log.info("%s: %s", describe_start(env), step)
        events.write("start", step=step, python_start_seconds=python_start_seconds(env))
        STEPS[step](rootmnt, node, env, events)
        return 0
    except Exception as e:
        if not isinstance(e, (TmpfsbootError, OSError)):
            traceback.print_exc()  # a bug: keep the evidence on the console
            e = TmpfsbootError(f"internal error: {type(e).__name__}: {e}")
        message = f"tmpfsboot: {e}"
        events.write("error", step=step, message=str(e))
        write_file(os.path.join(state, "error"), message + "\n")
        print(message, file=sys.stderr)
        return SHELL_EXIT if isinstance(e, ShellRequested) else 1
    finally:
        events.close()


if __name__ == "__main__":
    sys.exit(main())
