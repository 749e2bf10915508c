"""Parse the kernel command line into a BootPlan, and resolve URL substitutions.

Pure functions: reading /proc/cmdline or /run/net-*.conf is the caller's business.
"""

from __future__ import annotations

import enum
import hashlib
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

from .contract import DEFAULT_BACKOFF, DEFAULT_TIMEOUT
from .errors import CmdlineError
from .identity import (
    MACHINE_ID_FROM_NODE,
    HostnameFrom,
    MachineIdChoice,
    parse_machine_id_option,
)
from .policy import Verify as Verify  # tmpfs.verify= names one; re-exported for callers

# Substitutions a URL may use; %% is a literal %.
SUBSTITUTIONS = ("hostname", "fqdn", "mac", "ip", "arch", "uuid")

# %word, %% or a percent-encoding (%2F, %2f); a word that is no substitution but starts
# with two hex digits (%ab, %de...) is taken for a percent-encoding.
_TOKEN = re.compile(r"%(%|[a-z]+|[0-9A-Fa-f]{2})?")
_HEX2 = re.compile(r"[0-9A-Fa-f]{2}")
_SIZE = re.compile(r"(?P<num>[0-9]+)(?P<unit>[kKmMgGtTpPeE%]?)")



@dataclass(frozen=True)
class Mirror:
    """One URL of a layer, possibly holding %substitutions still to resolve."""

    url: str
    substitutions: tuple[str, ...] = ()


@dataclass(frozen=True)
class Layer:
    """One root image; its mirrors are tried in order."""

    mirrors: tuple[Mirror, ...]


@dataclass(frozen=True)
class BootPlan:
    """What the kernel command line asks of the boot engine."""

    tmpfs: bool
    layers: tuple[Layer, ...] = ()
    rootsize: str | None = None
    verify: Verify | None = None
    retries: int | None = None
    timeout: float = DEFAULT_TIMEOUT
    backoff: float = DEFAULT_BACKOFF
    quiet: bool = False
    bootif: str | None = None
    hostname_from: HostnameFrom = HostnameFrom.NODE
    machine_id: MachineIdChoice = MACHINE_ID_FROM_NODE
    mirror_order: MirrorOrder | None = None  # tmpfs.mirrors=; None: the initramfs default
    writers: int | None = None  # tmpfs.writers=; None: from the CPUs

    @property
    def substitutions(self) -> tuple[str, ...]:
        """Every substitution some URL uses, in order of first appearance."""
        seen: dict[str, None] = {}
        for layer in self.layers:
            for mirror in layer.mirrors:
                seen.update(dict.fromkeys(mirror.substitutions))
        return tuple(seen)

    def to_json(self) -> dict[str, object]:
        """The plan as plain JSON data (what `tmpfsboot cmdline` prints)."""
        return {
            "tmpfs": self.tmpfs,
            "layers": [{"mirrors": [m.url for m in layer.mirrors]} for layer in self.layers],
            "substitutions": list(self.substitutions),
            "rootsize": self.rootsize,
            "verify": self.verify.value if self.verify else None,
            "retries": self.retries,
            "timeout": self.timeout,
            "backoff": self.backoff,
            "quiet": self.quiet,
            "mirror_order": self.mirror_order.value if self.mirror_order else None,
            "hostname": self.hostname_from.value,
            "machine_id": self.machine_id.text,
        }


@dataclass(frozen=True)
class NetFacts:
    """What the node knows about itself, for URL substitutions."""

    hostname: str | None = None
    fqdn: str | None = None
    mac: str | None = None
    ip: str | None = None
    arch: str | None = None
    uuid: str | None = None

    def value(self, name: str) -> str | None:
        """The value of substitution NAME, or None if unknown."""
        value: str | None = getattr(self, name)
        return value


def split_cmdline(text: str) -> tuple[list[str], list[str]]:
    """Split a kernel command line as the kernel does: whitespace, "double quotes".

    Returns (kernel arguments, arguments after `--` that go to init).
    """
    args: list[str] = []
    current: list[str] = []
    in_token = in_quote = False
    for ch in text:
        if ch == '"':
            in_quote = not in_quote
            in_token = True
        elif ch.isspace() and not in_quote:
            if in_token:
                args.append("".join(current))
            current, in_token = [], False
        else:
            current.append(ch)
            in_token = True
    if in_quote:
        raise CmdlineError(f"unbalanced double quote in kernel command line: {text.strip()}")
    if in_token:
        args.append("".join(current))
    if "--" in args:
        i = args.index("--")
        return args[:i], args[i + 1 :]
    return args, []


def parse_url_template(url: str) -> Mirror:
    """Check one mirror URL: http(s) scheme, a host, and only known %substitutions."""
    if not url:
        raise CmdlineError("root=: empty layer or mirror (two separators in a row?)")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise CmdlineError(f"root={url}: only http:// and https:// URLs can be fetched")
    if not parts.netloc:
        raise CmdlineError(f"root={url}: the URL names no host")
    words: list[str] = []
    for m in _TOKEN.finditer(url):
        word = m.group(1)
        if word is None:
            raise CmdlineError(
                f"root={url}: lone % at offset {m.start()}; write %% for a literal %"
            )
        if word == "%" or (word not in SUBSTITUTIONS and _HEX2.match(word)):
            continue
        if word not in SUBSTITUTIONS:
            known = ", ".join("%" + s for s in SUBSTITUTIONS)
            raise CmdlineError(f"root={url}: unknown substitution %{word} (known: {known}, %%)")
        if word not in words:
            words.append(word)
    return Mirror(url=url, substitutions=tuple(words))


def parse_root(value: str) -> tuple[Layer, ...]:
    """Parse what follows `root=`: layers split by `,`, mirrors by `|`."""
    if not value:
        raise CmdlineError("root=: no URL given")
    layers = []
    for element in value.split(","):
        if not element:
            raise CmdlineError(f"root={value}: empty layer (two commas in a row?)")
        layers.append(Layer(tuple(parse_url_template(u) for u in element.split("|"))))
    return tuple(layers)


def parse_rootsize(text: str) -> str:
    """Validate a tmpfs size: bytes, a k/m/g/t/p/e suffix (binary), or N% (1-100) of RAM."""
    m = _SIZE.fullmatch(text)
    if not m:
        raise CmdlineError(
            f"rootsize={text}: expected bytes, a k/m/g suffix (e.g. 4g) or a percentage of RAM "
            "(e.g. 50%)"
        )
    num = int(m.group("num"))
    if num == 0:
        raise CmdlineError(f"rootsize={text}: must be more than zero")
    if m.group("unit") == "%" and num > 100:
        raise CmdlineError(f"rootsize={text}: more than 100% of RAM")
    return text


def _parse_int(key: str, text: str, *, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise CmdlineError(f"{key}={text}: expected a whole number") from None
    if value < minimum:
        raise CmdlineError(f"{key}={text}: must be at least {minimum}")
    return value


def parse_timeout(text: str, *, key: str = "tmpfs.timeout") -> float:
    """A positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise CmdlineError(f"{key}={text}: expected a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise CmdlineError(f"{key}={text}: must be a positive number of seconds")
    return value


def parse_cmdline(text: str) -> BootPlan:
    """Parse a kernel command line into the plan the boot engine follows.

    tmpfs boot is selected by `boot=tmpfs` or by a `root=` whose URL is http(s); any
    other root= leaves `tmpfs` False (not our boot) and the plan empty.
    """
    args, _ = split_cmdline(text)  # what follows `--` is init's, never ours
    opts: dict[str, str] = {}
    flags: set[str] = set()
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep:
            opts[key] = value  # the last occurrence wins, as in initramfs-tools' /init
        else:
            flags.add(key)
    root = opts.get("root")
    boot = opts.get("boot")
    is_url = root is not None and root.split(":", 1)[0] in ("http", "https")
    if boot == "tmpfs" and not is_url:
        shown = "nothing" if root is None else root
        raise CmdlineError(f"boot=tmpfs needs root=http(s)://URL, got root={shown}")
    if not is_url or (boot is not None and boot != "tmpfs"):
        return BootPlan(tmpfs=False)
    assert root is not None
    rootsize = opts.get("rootsize")
    verify = opts.get("tmpfs.verify")
    retries = opts.get("tmpfs.retries")
    timeout = opts.get("tmpfs.timeout")
    backoff = opts.get("tmpfs.backoff")
    mirror_order = opts.get("tmpfs.mirrors")
    hostname_from = opts.get("tmpfs.hostname")
    machine_id = opts.get("tmpfs.machine_id")
    writers = opts.get("tmpfs.writers")
    return BootPlan(
        tmpfs=True,
        layers=parse_root(root),
        rootsize=parse_rootsize(rootsize) if rootsize is not None else None,
        verify=Verify.parse(verify) if verify is not None else None,
        retries=_parse_int("tmpfs.retries", retries, minimum=0) if retries is not None else None,
        timeout=parse_timeout(timeout) if timeout is not None else DEFAULT_TIMEOUT,
        backoff=parse_timeout(backoff, key="tmpfs.backoff") if backoff is not None
        else DEFAULT_BACKOFF,
        quiet="quiet" in flags,
        bootif=opts.get("BOOTIF"),
        hostname_from=HostnameFrom.parse(hostname_from) if hostname_from is not None
        else HostnameFrom.NODE,
        machine_id=parse_machine_id_option(machine_id) if machine_id is not None
        else MACHINE_ID_FROM_NODE,
        mirror_order=MirrorOrder.parse(mirror_order) if mirror_order is not None else None,
        writers=_parse_int("tmpfs.writers", writers, minimum=0) if writers is not None
        else None,
    )


def resolve_url(mirror: Mirror, facts: NetFacts) -> str:
    """The mirror's URL with every %substitution replaced; CmdlineError if a fact is unknown.

    Values are percent-quoted so that a hostname cannot add path segments or a query.
    """

    def replace(m: re.Match[str]) -> str:
        word = m.group(1)
        if word == "%":
            return "%"
        if word is None or word not in SUBSTITUTIONS:
            return m.group(0)  # a percent-encoding such as %2F stays as it is
        value = facts.value(word)
        if not value:
            raise CmdlineError(f"{mirror.url}: %{word} is unknown on this node")
        return urllib.parse.quote(value, safe="-._~:")

    return _TOKEN.sub(replace, mirror.url)


def resolve_layers(layers: Sequence[Layer], facts: NetFacts) -> tuple[tuple[str, ...], ...]:
    """What the engine fetches: each layer's mirror URLs with every substitution resolved,
    in the layers' mirror order (spread them first: order_layers). CmdlineError naming the
    first fact this node does not know, before anything is downloaded."""
    return tuple(tuple(resolve_url(m, facts) for m in layer.mirrors) for layer in layers)


def mac_from_bootif(bootif: str) -> str | None:
    """The MAC address in PXELINUX's BOOTIF=01-aa-bb-cc-dd-ee-ff, as aa-bb-cc-dd-ee-ff."""
    parts = bootif.lower().split("-")
    if len(parts) == 7 and all(re.fullmatch("[0-9a-f]{2}", p) for p in parts):
        return "-".join(parts[1:])
    return None


# ----- mirror spreading: tmpfs.mirrors=spread -----


class MirrorOrder(enum.Enum):
    """How a node orders the mirrors of a layer (tmpfs.mirrors=, TMPFS_MIRRORS)."""

    ORDERED = "ordered"  # as written: every node asks the first mirror first
    SPREAD = "spread"  # per node, by rendezvous hashing of the node's identity

    @classmethod
    def parse(cls, text: str, *, key: str = "tmpfs.mirrors") -> MirrorOrder:
        """The order named TEXT, or CmdlineError naming KEY and the valid ones."""
        try:
            return cls(text)
        except ValueError:
            valid = "|".join(v.value for v in cls)
            raise CmdlineError(f"{key}={text}: expected {valid}") from None


# SMBIOS product UUIDs that name no machine: unset (all 0), not settable (all f; as
# dmidecode reads them), and a placeholder many boards ship with.
BOGUS_UUIDS = frozenset({
    "00000000-0000-0000-0000-000000000000",
    "ffffffff-ffff-ffff-ffff-ffffffffffff",
    "03000200-0400-0500-0006-000700080009",
})
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def is_usable_uuid(uuid: str | None) -> bool:
    """Whether UUID (as /sys/class/dmi/id/product_uuid gives it) identifies one machine."""
    if not uuid:
        return False
    text = uuid.strip().lower()
    return bool(_UUID.fullmatch(text)) and text not in BOGUS_UUIDS


def node_identity(facts: NetFacts) -> str | None:
    """What spreads this node: its SMBIOS UUID if usable, else its MAC, else its hostname.

    Returned as "uuid:...", "mac:..." or "hostname:..."; None when the node knows none.
    """
    if facts.uuid and is_usable_uuid(facts.uuid):
        return "uuid:" + facts.uuid.strip().lower()
    if facts.mac:
        return "mac:" + facts.mac.strip().lower().replace(":", "-")
    if facts.hostname:
        return "hostname:" + facts.hostname.strip().lower()
    return None


def mirror_site(url: str) -> str:
    """The server a mirror URL names (host:port as written, lower-case): what is weighed,
    so that a node takes every layer from the same cache."""
    return urllib.parse.urlsplit(url).netloc.lower()


def mirror_weight(identity: str, url: str) -> int:
    """The rendezvous (highest random weight) score of URL's server for node IDENTITY."""
    digest = hashlib.sha256(f"{identity}\n{mirror_site(url)}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def spread_order(urls: Sequence[str], identity: str) -> list[int]:
    """The indices of URLS in the order node IDENTITY tries them: by descending weight of
    their server (rendezvous hashing).

    Each server is first for an even share of nodes; a node always gets the same order;
    without one server, the others keep their order, so only the nodes that had it first
    move, each to its own second choice. Mirrors on one server keep their written order.
    """
    return sorted(range(len(urls)), key=lambda i: (-mirror_weight(identity, urls[i]), i))


def spread_urls(urls: Sequence[str], identity: str) -> list[str]:
    """URLS in the order node IDENTITY tries them (see spread_order)."""
    return [urls[i] for i in spread_order(urls, identity)]


def choose_mirror_order(plan: BootPlan, configured: str | None) -> MirrorOrder:
    """tmpfs.mirrors= from the command line, else TMPFS_MIRRORS from the initramfs config,
    else ordered."""
    if plan.mirror_order is not None:
        return plan.mirror_order
    if configured:
        return MirrorOrder.parse(configured, key="TMPFS_MIRRORS (initramfs config)")
    return MirrorOrder.ORDERED


def order_layers(layers: tuple[Layer, ...], order: MirrorOrder,
                 identity: str | None) -> tuple[Layer, ...]:
    """LAYERS with each layer's mirrors in the order this node tries them.

    ORDERED, or no identity to spread by, keeps the command line's order.
    """
    if order is MirrorOrder.ORDERED or identity is None:
        return layers
    return tuple(
        Layer(tuple(layer.mirrors[i]
                    for i in spread_order([m.url for m in layer.mirrors], identity)))
        for layer in layers
    )
