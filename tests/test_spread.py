"""tmpfs.mirrors=spread: each node orders a layer's mirrors by rendezvous hashing of its
identity. Tables for the pure functions, a statistical check of evenness and of minimal
movement over a simulated fleet, and the boot step choosing its first mirror by it."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tmpfsboot.boot.cmdline import (
    MirrorOrder,
    NetFacts,
    choose_mirror_order,
    is_usable_uuid,
    mirror_weight,
    node_identity,
    order_layers,
    parse_cmdline,
    spread_urls,
)
from tmpfsboot.boot.errors import CmdlineError
from tmpfsboot.boot.main import Node, main, node_layers
from tmpfsboot.cli import main as cli_main

MIRRORS = [f"http://cache-{c}.lab:8081/img/root.tar.zst" for c in "abc"]


def fleet_macs(count: int) -> list[str]:
    """COUNT distinct MACs as a rack of one vendor hands them out: consecutive numbers."""
    return [f"mac:52-54-00-{i >> 16 & 255:02x}-{i >> 8 & 255:02x}-{i & 255:02x}"
            for i in range(count)]


IDENTITIES = [
    # (facts, identity spread by)
    (NetFacts(uuid="4C4C4544-0042-3510-8052-B4C04F4E3232", mac="52-54-00-12-34-56",
              hostname="n1"), "uuid:4c4c4544-0042-3510-8052-b4c04f4e3232"),
    (NetFacts(uuid="00000000-0000-0000-0000-000000000000", mac="52-54-00-12-34-56"),
     "mac:52-54-00-12-34-56"),
    (NetFacts(uuid="FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF", mac="52:54:00:AB:CD:EF"),
     "mac:52-54-00-ab-cd-ef"),
    (NetFacts(uuid="03000200-0400-0500-0006-000700080009", hostname="Node7"),
     "hostname:node7"),
    (NetFacts(uuid="not-a-uuid", hostname="n2"), "hostname:n2"),
    (NetFacts(hostname="n3"), "hostname:n3"),
    (NetFacts(), None),
]


@pytest.mark.unit
@pytest.mark.parametrize(("facts", "identity"), IDENTITIES)
def test_node_identity_prefers_usable_uuid_then_mac_then_hostname(
        facts: NetFacts, identity: str | None) -> None:
    assert node_identity(facts) == identity


@pytest.mark.unit
@pytest.mark.parametrize(("uuid", "usable"), [
    ("4c4c4544-0042-3510-8052-b4c04f4e3232", True),
    ("4C4C4544-0042-3510-8052-B4C04F4E3232\n", True),
    ("00000000-0000-0000-0000-000000000000", False),
    ("ffffffff-ffff-ffff-ffff-ffffffffffff", False),
    ("03000200-0400-0500-0006-000700080009", False),
    ("4c4c4544-0000-1111", False),
    ("", False),
    (None, False),
])
def test_is_usable_uuid_refuses_placeholders(uuid: str | None, usable: bool) -> None:
    assert is_usable_uuid(uuid) is usable


# Pinned on purpose: a node must ask the same cache first after an upgrade of tmpfsboot
# (that cache is warm for it), so the hash may never change silently.
PINNED = [
    ("hostname:n1", ["a", "b", "c"]),
    ("mac:52-54-00-12-34-56", ["c", "b", "a"]),
    ("uuid:4c4c4544-0042-3510-8052-b4c04f4e3232", ["c", "b", "a"]),
]


@pytest.mark.unit
@pytest.mark.parametrize(("identity", "order"), PINNED)
def test_spread_order_is_stable_across_versions(identity: str, order: list[str]) -> None:
    assert spread_urls(MIRRORS, identity) == [MIRRORS["abc".index(c)] for c in order]


@pytest.mark.unit
def test_mirror_weight_is_the_documented_hash_of_identity_and_server() -> None:
    # docs/nginx.md tells operators how to predict a node's cache: keep it true
    digest = hashlib.sha256(b"hostname:n1\ncache-a.lab:8081").digest()
    assert mirror_weight("hostname:n1", MIRRORS[0]) == int.from_bytes(digest[:8], "big")
    assert mirror_weight("hostname:n1", "http://CACHE-A.lab:8081/other") == \
        mirror_weight("hostname:n1", MIRRORS[0])


@pytest.mark.unit
def test_spread_is_a_permutation_and_the_same_for_every_layer_of_a_node() -> None:
    plan = parse_cmdline("root=" + "|".join(MIRRORS) + ","
                         + "|".join(u.replace("root", "site") for u in MIRRORS)
                         + " tmpfs.mirrors=spread")
    firsts = Counter()
    for identity in fleet_macs(60):
        layers = order_layers(plan.layers, MirrorOrder.SPREAD, identity)
        hosts = [[m.url.split("/")[2] for m in layer.mirrors] for layer in layers]
        assert sorted(layers[0].mirrors, key=lambda m: m.url) == list(plan.layers[0].mirrors)
        assert hosts[0] == hosts[1]  # one cache for the whole root, warm for its layers
        firsts[hosts[0][0]] += 1
    assert len(firsts) == 3  # not every node on the same cache


@pytest.mark.unit
def test_mirrors_of_one_server_keep_their_written_order() -> None:
    urls = ["http://a/x/root.tar", "http://b/root.tar", "http://a/y/root.tar"]
    for identity in fleet_macs(20):
        order = spread_urls(urls, identity)
        assert order.index(urls[0]) < order.index(urls[2])


@pytest.mark.unit
def test_ordered_or_no_identity_keeps_the_command_line_order() -> None:
    plan = parse_cmdline("root=" + "|".join(MIRRORS))
    assert order_layers(plan.layers, MirrorOrder.ORDERED, "hostname:n1") == plan.layers
    assert order_layers(plan.layers, MirrorOrder.SPREAD, None) == plan.layers


@pytest.mark.unit
@pytest.mark.parametrize(("cmdline", "configured", "expected"), [
    ("root=http://h/x", None, MirrorOrder.ORDERED),
    ("root=http://h/x", "", MirrorOrder.ORDERED),
    ("root=http://h/x", "spread", MirrorOrder.SPREAD),
    ("root=http://h/x tmpfs.mirrors=ordered", "spread", MirrorOrder.ORDERED),
    ("root=http://h/x tmpfs.mirrors=spread", "ordered", MirrorOrder.SPREAD),
])
def test_mirror_order_from_cmdline_then_initramfs_config(cmdline: str, configured: str | None,
                                                         expected: MirrorOrder) -> None:
    assert choose_mirror_order(parse_cmdline(cmdline), configured) is expected


@pytest.mark.unit
def test_bad_mirror_order_is_rejected_naming_its_source() -> None:
    with pytest.raises(CmdlineError, match=r"tmpfs\.mirrors=random: expected ordered\|spread"):
        parse_cmdline("root=http://h/x tmpfs.mirrors=random")
    with pytest.raises(CmdlineError, match=r"TMPFS_MIRRORS .*=hash"):
        choose_mirror_order(parse_cmdline("root=http://h/x"), "hash")


@pytest.mark.unit
@pytest.mark.parametrize("caches", [2, 3, 5, 8])
def test_each_cache_is_first_for_an_even_share_of_the_fleet(caches: int) -> None:
    urls = [f"http://10.0.0.{i}:8081/root.tar.zst" for i in range(caches)]
    nodes = 12_000
    firsts = Counter(spread_urls(urls, identity)[0] for identity in fleet_macs(nodes))
    for url in urls:
        # binomial sd is below 1% of the share here: 10% is many sd, and the hash is fixed
        assert abs(firsts[url] / nodes - 1 / caches) < 0.1 / caches, (url, firsts)


@pytest.mark.unit
@pytest.mark.parametrize("removed", [0, 1, 2])
def test_a_failed_cache_moves_only_its_nodes_spread_over_the_others(removed: int) -> None:
    urls = [f"http://cache-{c}:8081/root.tar.zst" for c in "abcd"]
    left = urls[:removed] + urls[removed + 1:]
    moved: Counter[str] = Counter()
    for identity in fleet_macs(12_000):
        before = spread_urls(urls, identity)
        after = spread_urls(left, identity)
        # the survivors keep their relative order: a node's fallback is its own next choice
        assert after == [u for u in before if u != urls[removed]]
        if before[0] == urls[removed]:
            moved[after[0]] += 1
    share = sum(moved.values()) / len(left)
    assert all(abs(moved[u] - share) < 0.1 * share for u in left), moved


@pytest.mark.unit
def test_a_new_cache_takes_its_share_from_every_other_and_nothing_else_moves() -> None:
    urls = [f"http://cache-{c}:8081/root.tar.zst" for c in "abc"]
    grown = [*urls, "http://cache-d:8081/root.tar.zst"]
    nodes = fleet_macs(12_000)
    changed = [i for i in nodes if spread_urls(urls, i)[0] != spread_urls(grown, i)[0]]
    assert all(spread_urls(grown, i)[0] == grown[3] for i in changed)
    assert abs(len(changed) / len(nodes) - 0.25) < 0.025


@pytest.mark.unit
def test_cmdline_verb_prints_the_nodes_mirror_order(capsys: pytest.CaptureFixture[str]) -> None:
    text = "root=" + "|".join(MIRRORS) + " tmpfs.mirrors=spread"
    assert cli_main(["cmdline", "--hostname", "n1", text]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["layers"][0]["mirrors"] == spread_urls(MIRRORS, "hostname:n1")
    assert (plan["mirror_order"], plan["node"]) == ("spread", "hostname:n1")
    # a usable UUID wins over the MAC and the hostname, as on the node
    uuid = "4c4c4544-0042-3510-8052-b4c04f4e3232"
    assert cli_main(["cmdline", "--hostname", "n1", "--mac", "52-54-00-12-34-56",
                     "--uuid", uuid.upper(), text]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["layers"][0]["mirrors"] == spread_urls(MIRRORS, f"uuid:{uuid}")
    # the initramfs default, when the command line says nothing
    assert cli_main(["cmdline", "--mirrors", "spread", "--mac", "52-54-00-12-34-56",
                     "root=" + "|".join(MIRRORS)]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["layers"][0]["mirrors"] == spread_urls(MIRRORS, "mac:52-54-00-12-34-56")
    assert cli_main(["cmdline", "--hostname", "n1", "root=" + "|".join(MIRRORS)]) == 0
    assert json.loads(capsys.readouterr().out)["layers"][0]["mirrors"] == MIRRORS


@pytest.mark.unit
def test_cmdline_verb_needs_a_node_to_spread_for(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["cmdline", "root=" + "|".join(MIRRORS) + " tmpfs.mirrors=spread"]) == 2
    assert "--hostname, --mac or --uuid" in capsys.readouterr().err


@pytest.mark.unit
def test_node_layers_spreads_with_the_initramfs_default() -> None:
    plan = parse_cmdline("root=" + "|".join(MIRRORS))
    facts = NetFacts(mac="52-54-00-12-34-56", hostname="n1")
    assert node_layers(plan, facts, None) == plan.layers
    spread = node_layers(plan, facts, "spread")
    assert [m.url for m in spread[0].mirrors] == spread_urls(MIRRORS, "mac:52-54-00-12-34-56")


# ----- the boot step: the node's first request goes to its own first mirror -----


@pytest.fixture
def image_servers(tmp_path: Path) -> Iterator[list[str]]:
    """Two `tmpfsboot serve` instances of one image directory: two mirrors of one layer."""
    from tmpfsboot.host.image import build_image
    from tmpfsboot.host.serve import start_server

    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc/motd").write_text("spread\n")
    images = tmp_path / "images"
    images.mkdir()
    build_image(src, images, "root")
    with start_server(images, access_log=False) as a, start_server(images,
                                                                   access_log=False) as b:
        yield [a.url + "root.tar.zst", b.url + "root.tar.zst"]


def scratch_node(tmp_path: Path, uuid: str, cmdline: str) -> Node:
    sysfs = tmp_path / "sys/class/dmi/id"
    sysfs.mkdir(parents=True)
    (sysfs / "product_uuid").write_text(uuid + "\n")
    (tmp_path / "cmdline").write_text(cmdline + "\n")
    return Node(etc=str(tmp_path / "etc"), run=str(tmp_path / "run"), sys=str(tmp_path / "sys"),
                cmdline=str(tmp_path / "cmdline"), set_hostname=False)


@pytest.mark.integration
def test_fetch_step_takes_the_layer_from_the_nodes_first_mirror(
        image_servers: list[str], tmp_path: Path) -> None:
    uuids = [f"4c4c4544-0042-3510-8052-{i:012x}" for i in range(40)]
    for wanted in image_servers:
        # a node whose own order puts WANTED first, though it is not always written first
        uuid = next(u for u in uuids if spread_urls(image_servers, f"uuid:{u}")[0] == wanted)
        scratch = tmp_path / wanted.split(":")[2].split("/")[0]
        node = scratch_node(scratch, uuid, "root=" + "|".join(image_servers)
                            + " tmpfs.mirrors=spread tmpfs.retries=0")
        target = scratch / "newroot"
        target.mkdir()
        assert main(["fetch", str(target)], node=node) == 0
        assert (target / "etc/motd").read_text() == "spread\n"
        events = [json.loads(line) for line in
                  (scratch / "run/tmpfsboot/boot.jsonl").read_text().splitlines()]
        layer = next(e for e in events if e.get("layer") == 1 and "url" in e)
        assert layer["url"] == wanted
