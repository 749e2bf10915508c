"""Network facts from initramfs-tools' /run/net-DEVICE.conf, and the files made from them.

Pure functions: reading /run/net-*.conf and writing /etc/resolv.conf, /etc/hostname and
/etc/hosts is the caller's business (``main.py``). Standard library only.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from .identity import hosts_text

# ipconfig writes 0.0.0.0 for a DNS server the DHCP answer did not name.
_NO_ADDRESS = ("", "0.0.0.0")


@dataclass(frozen=True)
class NetConf:
    """What klibc's ipconfig learnt about one interface (from DHCP or ip=)."""

    device: str | None = None
    address: str | None = None
    hostname: str | None = None
    domain: str | None = None
    nameservers: tuple[str, ...] = ()
    search: tuple[str, ...] = ()

    @property
    def fqdn(self) -> str | None:
        """HOSTNAME.DNSDOMAIN when DHCP named both (a hostname with a dot is one already)."""
        if not self.hostname:
            return None
        if "." in self.hostname:
            return self.hostname
        if self.domain:
            return f"{self.hostname}.{self.domain}"
        return None

    @property
    def short_hostname(self) -> str | None:
        """The hostname up to its first dot."""
        return self.hostname.split(".", 1)[0] if self.hostname else None


def parse_net_conf(text: str) -> NetConf:
    """Parse the shell assignments of a /run/net-DEVICE.conf file.

    Unknown keys and lines that are not `KEY=VALUE` are ignored; empty values and
    0.0.0.0 count as absent.
    """
    values: dict[str, str] = {}
    for line in text.splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue  # an unbalanced quote: not something ipconfig writes
        for word in words:
            key, sep, value = word.partition("=")
            if sep and key.replace("_", "").isalnum():
                values[key] = value

    def get(key: str) -> str | None:
        value = values.get(key, "").strip()
        return None if value in _NO_ADDRESS else value

    nameservers = tuple(
        v for v in (get("IPV4DNS0"), get("IPV4DNS1"), get("IPV6DNS0"), get("IPV6DNS1")) if v
    )
    return NetConf(
        device=get("DEVICE"),
        address=get("IPV4ADDR") or get("IPV6ADDR"),
        hostname=get("HOSTNAME"),
        domain=get("DNSDOMAIN"),
        nameservers=nameservers,
        search=tuple((get("DOMAINSEARCH") or "").split()),
    )


def render_resolv_conf(conf: NetConf) -> str | None:
    """resolv.conf lines for CONF's domain, name servers and search list; None if it has none."""
    lines: list[str] = []
    if conf.domain:
        lines.append(f"domain {conf.domain}")
    lines.extend(f"nameserver {ns}" for ns in conf.nameservers)
    search = tuple(dict.fromkeys(((conf.domain,) if conf.domain else ()) + conf.search))
    if conf.search:
        lines.append("search " + " ".join(search))
    return "\n".join(lines) + "\n" if lines else None


def render_hostname(conf: NetConf) -> str | None:
    """The /etc/hostname line (the short name), or None when DHCP gave no hostname."""
    name = conf.short_hostname
    return f"{name}\n" if name else None


def render_hosts(conf: NetConf, *, fqdn: str | None = None) -> str | None:
    """/etc/hosts naming this node on 127.0.1.1 as Debian does; None without a hostname.

    FQDN, when known from reverse DNS, is used where DHCP gave no domain.
    """
    name = conf.short_hostname
    return hosts_text(name, conf.fqdn or fqdn) if name else None
