"""Pure parsers and renderers of /run/net-*.conf data, tested from tables."""

from __future__ import annotations

import pytest

from tmpfsboot.boot.netconf import (
    NetConf,
    parse_net_conf,
    render_hostname,
    render_hosts,
    render_resolv_conf,
)

pytestmark = pytest.mark.unit

# What klibc's ipconfig wrote in a QEMU guest (user-mode DHCP, hostname=node7).
QEMU_CONF = """\
DEVICE='eth0'
PROTO='dhcp'
IPV4ADDR='10.0.2.15'
IPV4BROADCAST='10.0.2.255'
IPV4NETMASK='255.255.255.0'
IPV4GATEWAY='10.0.2.2'
IPV4DNS0='10.0.2.3'
IPV4DNS1='0.0.0.0'
HOSTNAME='node7'
DNSDOMAIN='lab.example'
NISDOMAIN=''
ROOTSERVER='10.0.2.2'
ROOTPATH=''
filename='pxelinux.0'
UPTIME='3'
DHCPLEASETIME='86400'
DOMAINSEARCH='example.org lab.example'
"""

PARSE_CASES = [
    (QEMU_CONF, NetConf(device="eth0", address="10.0.2.15", hostname="node7",
                        domain="lab.example", nameservers=("10.0.2.3",),
                        search=("example.org", "lab.example"))),
    ("", NetConf()),
    ("DEVICE=eth1\nIPV4DNS0='0.0.0.0'\nHOSTNAME=''\n", NetConf(device="eth1")),
    ("# comment\nnot an assignment\nIPV4ADDR='192.0.2.9'\n", NetConf(address="192.0.2.9")),
    ("HOSTNAME='a.b.c'\nIPV4DNS0='1.1.1.1'\nIPV4DNS1='9.9.9.9'\n",
     NetConf(hostname="a.b.c", nameservers=("1.1.1.1", "9.9.9.9"))),
    ("IPV4ADDR='unbalanced\nDEVICE='eth2'\n", NetConf(device="eth2")),
]


@pytest.mark.parametrize(("text", "expected"), PARSE_CASES)
def test_parse_net_conf(text: str, expected: NetConf) -> None:
    assert parse_net_conf(text) == expected


FQDN_CASES = [
    (NetConf(hostname="node7", domain="lab.example"), "node7.lab.example", "node7"),
    (NetConf(hostname="node7"), None, "node7"),
    (NetConf(hostname="node7.lab.example", domain="other"), "node7.lab.example", "node7"),
    (NetConf(), None, None),
]


@pytest.mark.parametrize(("conf", "fqdn", "short"), FQDN_CASES)
def test_fqdn_comes_from_dhcp_hostname_and_domain(conf: NetConf, fqdn: str | None,
                                                  short: str | None) -> None:
    assert conf.fqdn == fqdn
    assert conf.short_hostname == short


RESOLV_CASES = [
    (parse_net_conf(QEMU_CONF),
     "domain lab.example\nnameserver 10.0.2.3\nsearch lab.example example.org\n"),
    (NetConf(nameservers=("10.0.0.1",)), "nameserver 10.0.0.1\n"),
    (NetConf(domain="d.example"), "domain d.example\n"),
    (NetConf(hostname="x"), None),
]


@pytest.mark.parametrize(("conf", "expected"), RESOLV_CASES)
def test_render_resolv_conf(conf: NetConf, expected: str | None) -> None:
    assert render_resolv_conf(conf) == expected


def test_render_hostname_writes_the_short_name() -> None:
    assert render_hostname(NetConf(hostname="node7.lab.example")) == "node7\n"
    assert render_hostname(NetConf()) is None


HOSTS_CASES = [
    (NetConf(hostname="node7", domain="lab.example"), None, "127.0.1.1\tnode7.lab.example\tnode7"),
    (NetConf(hostname="node7"), None, "127.0.1.1\tnode7"),
    (NetConf(hostname="node7"), "node7.from.dns", "127.0.1.1\tnode7.from.dns\tnode7"),
]


@pytest.mark.parametrize(("conf", "fqdn", "line"), HOSTS_CASES)
def test_render_hosts_names_the_node_on_127_0_1_1(conf: NetConf, fqdn: str | None,
                                                   line: str) -> None:
    hosts = render_hosts(conf, fqdn=fqdn)
    assert hosts is not None
    assert hosts.splitlines()[:2] == ["127.0.0.1\tlocalhost", line]
    assert "::1     localhost ip6-localhost ip6-loopback" in hosts


def test_render_hosts_without_hostname_writes_nothing() -> None:
    assert render_hosts(NetConf(address="10.0.0.5")) is None
