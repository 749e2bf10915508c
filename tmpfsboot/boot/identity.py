"""The node's identity in its new root: hostname, hosts, machine-id and resolv.conf.

One image boots a whole fleet, so after the last layer the node's own identity replaces
whatever the image carries:

- /etc/hostname: the DHCP (or ``ip=``) name, unless ``tmpfs.hostname=image``;
  /etc/hosts names the node on 127.0.1.1, as Debian's installer does.
- /etc/machine-id: derived from the SMBIOS product UUID as systemd does in a VM (the UUID's
  32 hex digits), so a node keeps its ID across reboots and nodes differ; where the UUID is
  missing or a known placeholder, from the boot NIC's MAC. ``tmpfs.machine_id=random``,
  ``image`` or 32 hex digits override it.
- /etc/resolv.conf: from the DHCP/``ip=`` data, unless the image's is a symlink (the stub
  of systemd-resolved), which is left alone.

The deciding is pure (``plan_identity`` and what it calls, tested from tables); reading the
image's /etc is ``read_image_etc``; writing is the caller's (``main.finish_root``).
Standard library only.
"""

from __future__ import annotations

import enum
import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from .errors import CmdlineError

# Product UUIDs that name no machine: firmware that never set one (systemd refuses the
# all-zero and all-F ones too), and a placeholder some vendors' firmware ships on every board.
PLACEHOLDER_UUIDS = frozenset({
    "00000000000000000000000000000000",
    "ffffffffffffffffffffffffffffffff",
    "03000200040005000006000700080009",
})
_UUID = re.compile(r"[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}")
# Mixed into the hash of a MAC, so a MAC-derived machine-id is no other tool's hash of it.
_MAC_SALT = b"tmpfsboot machine-id from MAC\n"
# A machine-id is readable by all, written by none (as systemd-machine-id-setup leaves it).
MACHINE_ID_MODE = 0o444


class HostnameFrom(enum.Enum):
    """Where the new root's /etc/hostname comes from (``tmpfs.hostname=``)."""

    NODE = "node"  # DHCP, ip=, or the kernel's hostname: the default
    IMAGE = "image"  # leave the image's /etc/hostname and /etc/hosts alone

    @classmethod
    def parse(cls, text: str) -> HostnameFrom:
        """The choice named TEXT, or CmdlineError listing the valid ones."""
        try:
            return cls(text)
        except ValueError:
            raise CmdlineError(f"tmpfs.hostname={text}: expected node or image") from None


class MachineIdFrom(enum.Enum):
    """How the new root's /etc/machine-id is chosen (``tmpfs.machine_id=``)."""

    NODE = "node"  # SMBIOS product UUID, else the boot NIC's MAC: the default
    RANDOM = "random"  # a new one each boot
    IMAGE = "image"  # leave the image's alone
    GIVEN = "given"  # 32 hex digits on the command line


@dataclass(frozen=True)
class MachineIdChoice:
    """``tmpfs.machine_id=`` parsed: a mode, and the ID itself for GIVEN."""

    mode: MachineIdFrom = MachineIdFrom.NODE
    value: str | None = None

    @property
    def text(self) -> str:
        """The option's value as the command line would spell it."""
        return self.value if self.value is not None else self.mode.value


# The default: derived from the product UUID, else the MAC.
MACHINE_ID_FROM_NODE = MachineIdChoice()


def normalize_id128(text: str) -> str | None:
    """32 lower-case hex digits from a UUID (dashed or not, any case); None if TEXT is none."""
    text = text.strip().lower()
    if not _UUID.fullmatch(text):
        return None
    return text.replace("-", "")


def parse_machine_id_option(text: str) -> MachineIdChoice:
    """``tmpfs.machine_id=random|image|node|HEX`` -> the choice; CmdlineError naming it."""
    if text in ("random", "image", "node"):
        return MachineIdChoice(MachineIdFrom(text))
    value = normalize_id128(text)
    if value is None or value == "0" * 32:
        raise CmdlineError(f"tmpfs.machine_id={text}: expected random, image, node or "
                           "32 hexadecimal digits (not all zero)")
    return MachineIdChoice(MachineIdFrom.GIVEN, value)


def machine_id_from_uuid(uuid: str | None) -> str | None:
    """The machine-id systemd derives in a VM from the SMBIOS product UUID: its 128 bits
    as 32 hex digits. None when there is no usable UUID (missing, malformed, placeholder)."""
    value = normalize_id128(uuid) if uuid else None
    return None if value is None or value in PLACEHOLDER_UUIDS else value


def as_v4_uuid(raw: bytes) -> str:
    """16 bytes as a machine-id in the shape of a random (version 4) UUID, as systemd's
    sd_id128_randomize() makes them."""
    b = bytearray(raw[:16])
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    return b.hex()


def machine_id_from_mac(mac: str | None) -> str | None:
    """A machine-id that is a fixed function of the MAC (any of : - . separators, any
    case); None unless MAC is a usable unicast address."""
    digits = re.sub(r"[:.-]", "", mac or "").lower()
    if not re.fullmatch(r"[0-9a-f]{12}", digits) or digits in ("0" * 12, "f" * 12):
        return None
    return as_v4_uuid(hashlib.sha256(_MAC_SALT + bytes.fromhex(digits)).digest())


@dataclass(frozen=True)
class MachineId:
    """The machine-id to write (None: leave the image's) and where it came from."""

    value: str | None
    source: str


def derive_machine_id(choice: MachineIdChoice, *, uuid: str | None, mac: str | None,
                      randbytes: Callable[[int], bytes] = os.urandom) -> MachineId:
    """The node's machine-id under CHOICE: stable for one machine, distinct between them."""
    if choice.mode is MachineIdFrom.IMAGE:
        return MachineId(None, "tmpfs.machine_id=image")
    if choice.mode is MachineIdFrom.GIVEN:
        return MachineId(choice.value, "tmpfs.machine_id=")
    if choice.mode is MachineIdFrom.RANDOM:
        return MachineId(as_v4_uuid(randbytes(16)), "tmpfs.machine_id=random")
    if (value := machine_id_from_uuid(uuid)) is not None:
        return MachineId(value, "SMBIOS product UUID")
    if (value := machine_id_from_mac(mac)) is not None:
        why = "no SMBIOS product UUID" if not uuid else f"placeholder product UUID {uuid}"
        return MachineId(value, f"MAC {mac} ({why})")
    return MachineId(as_v4_uuid(randbytes(16)), "random (no product UUID and no MAC)")


def hosts_text(name: str, fqdn: str | None, existing: str | None = None) -> str:
    """/etc/hosts naming the node on 127.0.1.1 (FQDN first, as Debian does).

    EXISTING (the image's file) keeps every other line; its 127.0.1.1 line, naming the
    build machine, is replaced. Without one, Debian's default file.
    """
    names = f"{fqdn}\t{name}" if fqdn and fqdn != name else name
    ours = f"127.0.1.1\t{names}"
    if existing is None:
        return (
            "127.0.0.1\tlocalhost\n"
            f"{ours}\n"
            "\n"
            "# The following lines are desirable for IPv6 capable hosts\n"
            "::1     localhost ip6-localhost ip6-loopback\n"
            "ff02::1 ip6-allnodes\n"
            "ff02::2 ip6-allrouters\n"
        )

    def address(line: str) -> str | None:
        words = line.split("#", 1)[0].split()
        return words[0] if words else None

    lines = [line for line in existing.splitlines() if address(line) != "127.0.1.1"]
    at = next((i + 1 for i, line in enumerate(lines) if address(line) == "127.0.0.1"), 0)
    lines.insert(at, ours)
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ImageEtc:
    """What the image left in the new root's /etc that the identity depends on."""

    hosts: str | None = None
    resolv_conf_is_symlink: bool = False


@dataclass(frozen=True)
class EtcFile:
    """One decision about a file under /etc: its new text (None: left as the image has
    it), its mode, and why, for the console and the boot log."""

    name: str
    text: str | None
    why: str
    mode: int = 0o644


def plan_identity(image: ImageEtc, *, hostname: str | None, fqdn: str | None,
                  resolv_conf: str | None, machine_id: MachineId,
                  hostname_from: HostnameFrom = HostnameFrom.NODE) -> list[EtcFile]:
    """What to write into the new root's /etc, file by file, and why."""
    files: list[EtcFile] = []
    if hostname_from is HostnameFrom.IMAGE:
        files += [EtcFile("hostname", None, "tmpfs.hostname=image"),
                  EtcFile("hosts", None, "tmpfs.hostname=image")]
    elif hostname:
        files += [EtcFile("hostname", f"{hostname}\n", f"node name {hostname}"),
                  EtcFile("hosts", hosts_text(hostname, fqdn, image.hosts),
                          f"127.0.1.1 {fqdn or hostname}")]
    else:
        files += [EtcFile("hostname", None, "the node has no name (DHCP gave none)"),
                  EtcFile("hosts", None, "the node has no name (DHCP gave none)")]
    if machine_id.value is None:
        files.append(EtcFile("machine-id", None, machine_id.source, MACHINE_ID_MODE))
    else:
        files.append(EtcFile("machine-id", machine_id.value + "\n",
                             f"{machine_id.value} from {machine_id.source}", MACHINE_ID_MODE))
    if image.resolv_conf_is_symlink:
        files.append(EtcFile("resolv.conf", None, "the image's is a symlink"))
    elif resolv_conf is None:
        files.append(EtcFile("resolv.conf", None, "DHCP named no DNS server"))
    else:
        files.append(EtcFile("resolv.conf", resolv_conf, "from DHCP"))
    return files


def read_image_etc(etc: str) -> ImageEtc:
    """ImageEtc of the directory ETC (the new root's /etc)."""
    try:
        with open(os.path.join(etc, "hosts"), encoding="utf-8", errors="replace") as f:
            hosts: str | None = f.read()
    except OSError:
        hosts = None
    return ImageEtc(hosts=hosts,
                    resolv_conf_is_symlink=os.path.islink(os.path.join(etc, "resolv.conf")))
