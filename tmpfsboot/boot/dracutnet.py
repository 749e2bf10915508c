"""Network facts from dracut's network-legacy: /tmp/dhclient.IFACE.dhcpopts and friends.

dracut's dhclient-script saves every ``new_*`` variable dhclient handed it (the output of
the shell's ``set``) in /tmp/dhclient.IFACE.dhcpopts; for a static ``ip=`` its ifup
leaves the fields in /tmp/net.IFACE.override. The dracut glue chooses this reader (it sets
TMPFSBOOT_NETCONF=dracut); initramfs-tools' /run/net-*.conf stays with ``netconf``.
Pure parsing here; reading the files is ``main.py``'s business. Standard library only.
"""

from __future__ import annotations

import shlex

from .netconf import NetConf

# The value of TMPFSBOOT_NETCONF with which the dracut glue selects this reader.
SOURCE = "dracut"


def dhcpopts_path(tmp: str, device: str) -> str:
    """Where dracut's dhclient-script left DEVICE's DHCP options."""
    return f"{tmp}/dhclient.{device}.dhcpopts"


def override_path(tmp: str, device: str) -> str:
    """Where dracut's ifup left the fields of DEVICE's ip= (a static configuration)."""
    return f"{tmp}/net.{device}.override"


def parse_override(text: str, *, device: str | None = None) -> NetConf:
    """Parse ifup's ``KEY="VALUE"`` lines of a static ``ip=``: ip, hostname, dns1, dns2.

    A hostname with a dot gives the domain too. Other lines are ignored.
    """
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition("=")
        try:
            words = shlex.split(rest)
        except ValueError:
            continue
        if sep and key.isalnum() and words:
            values[key] = words[0]
    hostname = values.get("hostname")
    domain = hostname.split(".", 1)[1] if hostname and "." in hostname else None
    return NetConf(
        device=device,
        address=values.get("ip"),
        hostname=hostname,
        domain=domain,
        nameservers=tuple(v for v in (values.get("dns1"), values.get("dns2")) if v),
    )


def parse_dhcpopts(text: str, *, device: str | None = None) -> NetConf:
    """Parse a dhcpopts file (``new_KEY=VALUE`` lines, quoted as bash or dash's ``set`` does).

    Lines that are not such assignments are ignored; empty values count as absent.
    """
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition("=")
        if not sep or not key.startswith("new_") or not key.replace("_", "").isalnum():
            continue
        try:
            words = shlex.split(rest)
        except ValueError:
            continue  # an unbalanced quote: not something a shell's `set` writes
        values[key.removeprefix("new_")] = " ".join(words)

    def get(key: str) -> str | None:
        return values.get(key, "").strip() or None

    servers = (get("domain_name_servers") or "").split()
    servers += (get("dhcp6_name_servers") or "").split()
    return NetConf(
        device=device,
        address=get("ip_address") or get("ip6_address"),
        hostname=get("host_name"),
        domain=get("domain_name"),
        nameservers=tuple(dict.fromkeys(servers)),
        search=tuple((get("domain_search") or "").split()),
    )
