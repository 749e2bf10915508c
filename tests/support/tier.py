"""A fleet on one machine: the origin (`tmpfsboot serve`), caching nginx configured from
docs/nginx.md, and the simulated nodes (bench/swarm.py), each in its own network
namespace with its own address on a private bridge.

The bridge lives in a namespace of its own too, so nothing is added to the host's
network: no interface, no route, no address; every packet stays between the namespaces
made here, and they are deleted on the way out whatever happened. Used by
tests/test_fleet.py (a small storm) and bench/storm.py --caches N (the big ones).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from support import REPO
from support.serve import NGINX, cache_config, with_temp_paths

SWARM = REPO / "bench" / "swarm.py"
sys.path.insert(0, str(SWARM.parent))
from swarm import NodeRecord  # noqa: E402 (bench/ is no package: made importable above)

NET = "10.213"  # a /16 that exists only inside the namespaces made here
ORIGIN = f"{NET}.0.1"
NODES = f"{NET}.2.1"
ORIGIN_PORT = 8080
CACHE_PORT = 8081
# `tmpfsboot serve`'s access log line: client "METHOD TARGET" status bytes seconds
SERVE_LOG = re.compile(r'"GET (?P<target>\S+)" (?P<status>\d{3}) (?P<bytes>\d+) ')


def cache_address(index: int) -> str:
    """The address of cache INDEX (0-based)."""
    return f"{NET}.1.{index + 1}"


def ip(*args: str) -> None:
    """Run `ip ARGS`, failing with its message."""
    r = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if r.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


class Namespaces:
    """Network namespaces on one private bridge; each gets one address. Deleted on close."""

    def __init__(self) -> None:
        self.prefix = f"tfb{os.getpid()}"
        self.switch = f"{self.prefix}-sw"
        self.names: list[str] = []

    def open(self) -> None:
        """Make the switch: a namespace holding only the bridge."""
        ip("netns", "add", self.switch)
        self.names.append(self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")

    def add(self, role: str, address: str) -> str:
        """A namespace for ROLE holding ADDRESS/16 on eth0, wired to the bridge."""
        name = f"{self.prefix}-{role}"
        ip("netns", "add", name)
        self.names.append(name)
        port = self.port(role)
        ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0",
           "netns", name)
        ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        ip("-n", name, "addr", "add", f"{address}/16", "dev", "eth0")
        ip("-n", name, "link", "set", "eth0", "up")
        ip("-n", name, "link", "set", "lo", "up")
        return name

    @staticmethod
    def port(role: str) -> str:
        """The bridge port of ROLE's namespace."""
        return f"p-{role}"[:15]

    def unplug(self, role: str) -> None:
        """Pull ROLE's cable: its packets, those queued included, are gone."""
        ip("-n", self.switch, "link", "del", self.port(role))

    def close(self) -> None:
        for name in reversed(self.names):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        self.names.clear()


def in_namespace(name: str, argv: list[str]) -> list[str]:
    """ARGV run inside network namespace NAME."""
    return ["ip", "netns", "exec", name, *argv]


@dataclass
class Tier:
    """A running fleet: where everything is, and its processes."""

    workdir: Path
    net: Namespaces
    nodes_ns: str
    caches: list[str]  # base URLs
    origin: str
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def fail(self, role: str) -> None:
        """ROLE (e.g. "cache2") dies as a machine does: its processes killed and its
        cable pulled, so the bytes its kernel still held never arrive (a killed process
        alone would have them sent) and its address stops answering."""
        self.kill(role)
        self.net.unplug(role)

    def kill(self, role: str) -> None:
        """Kill ROLE's processes (an nginx master and its workers) at once."""
        proc = self.processes[role]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def wait_ready(self, url: str, deadline: float = 20.0) -> None:
        """Wait until URL answers from the nodes' namespace."""
        end = time.monotonic() + deadline
        while True:
            r = subprocess.run(in_namespace(self.nodes_ns, [
                "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "2",
                url]), capture_output=True, text=True, check=False)
            if r.stdout == "200":
                return
            if time.monotonic() > end:
                raise RuntimeError(f"{url} does not answer from the nodes: {r.stdout!r}")
            time.sleep(0.1)


def start(tier: Tier, role: str, ns: str, argv: list[str], log: Path) -> None:
    """Start ARGV in namespace NS as ROLE, in a process group of its own, output to LOG."""
    with log.open("wb") as out:
        tier.processes[role] = subprocess.Popen(
            in_namespace(ns, argv), stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True)


@contextlib.contextmanager
def fleet_tier(images: Path, workdir: Path, *, caches: int,
               origin_streams: int = 64) -> Iterator[Tier]:
    """Origin serving IMAGES, CACHES nginx caches in front of it (none: nodes use the origin
    directly), and a namespace for the nodes; all torn down on exit."""
    net = Namespaces()
    tier = Tier(workdir=workdir, net=net, nodes_ns="", caches=[],
                origin=f"http://{ORIGIN}:{ORIGIN_PORT}/")
    try:
        net.open()
        origin_ns = net.add("origin", ORIGIN)
        tier.nodes_ns = net.add("nodes", NODES)
        # thousands of connections from one address: all ports, reuse TIME_WAIT
        subprocess.run(in_namespace(tier.nodes_ns, [
            "sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=1024 65535",
            "net.ipv4.tcp_tw_reuse=1"]), check=True)
        start(tier, "origin", origin_ns, [
            sys.executable, "-m", "tmpfsboot", "serve", str(images), "--bind", ORIGIN,
            "--port", str(ORIGIN_PORT), "--max-streams", str(origin_streams)],
            workdir / "origin.log")
        for i in range(caches):
            address = cache_address(i)
            ns = net.add(f"cache{i + 1}", address)
            prefix = workdir / f"cache{i + 1}"
            prefix.mkdir(parents=True)
            config = with_temp_paths(cache_config(ORIGIN_PORT, prefix, CACHE_PORT,
                                                  origin_host=ORIGIN, bind=address), prefix)
            (prefix / "nginx.conf").write_text(config)
            start(tier, f"cache{i + 1}", ns, [
                str(NGINX), "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                "-e", str(prefix / "startup-error.log"), "-g", "daemon off;"],
                prefix / "stdout.log")
            tier.caches.append(f"http://{address}:{CACHE_PORT}/")
        for url in [tier.origin, *tier.caches]:
            tier.wait_ready(url + "SHA256SUMS")
        yield tier
    finally:
        for role in list(tier.processes):
            tier.kill(role)
        net.close()


@dataclass
class StormResult:
    """What one storm through a tier measured."""

    nodes: list[NodeRecord]
    wall: float
    size: int
    mirrors: list[str]
    origin_image_bytes: int
    origin_other_bytes: int
    origin_requests: Counter[int]
    killed: int | None  # index of the cache killed halfway
    killed_at: float | None  # seconds after power-on

    @property
    def ok(self) -> int:
        return sum(1 for n in self.nodes if n.ok)

    def served(self) -> list[int]:
        """Image bytes each mirror delivered to the nodes (as the nodes counted them)."""
        totals = [0] * len(self.mirrors)
        for n in self.nodes:
            for i, b in enumerate(n.received):
                totals[i] += b
        return totals

    def shares(self) -> list[float]:
        served = self.served()
        return [b / (sum(served) or 1) for b in served]

    def firsts(self) -> Counter[int]:
        return Counter(n.order[0] for n in self.nodes)

    def moved(self) -> Counter[int]:
        """Where the killed cache's late nodes finished their image."""
        return Counter(n.last for n in self.late_nodes())

    def late_nodes(self) -> list[NodeRecord]:
        """The killed cache's nodes that had not finished when it died."""
        assert self.killed is not None and self.killed_at is not None
        return [n for n in self.nodes if n.order[0] == self.killed and
                n.finished > self.killed_at]

    def times(self) -> list[float]:
        return sorted(n.finished for n in self.nodes if n.ok)


def origin_bytes(log: Path, image: str) -> tuple[int, int, Counter[int]]:
    """(image bytes, other bytes, answers by status) from the origin's access log."""
    image_bytes = other = 0
    statuses: Counter[int] = Counter()
    for m in SERVE_LOG.finditer(log.read_text(errors="replace")):
        statuses[int(m["status"])] += 1
        if m["target"] == "/" + image:
            image_bytes += int(m["bytes"])
        else:
            other += int(m["bytes"])
    return image_bytes, other, statuses


def run_storm(images: Path, image: str, workdir: Path, *, nodes: int, caches: int,
              order: str = "spread", kill: int | None = None, backoff: float = 0.05,
              timeout: float = 30.0, deadline: float = 600.0,
              origin_streams: int = 64) -> StormResult:
    """NODES nodes boot IMAGE at once through a fresh tier of CACHES cold caches (none: from
    the origin directly); with KILL, cache KILL dies once half the bytes arrived."""
    size = (images / image).stat().st_size
    workdir.mkdir(parents=True, exist_ok=True)
    with fleet_tier(images, workdir, caches=caches, origin_streams=origin_streams) as tier:
        mirrors = tier.caches or [tier.origin]
        argv = [sys.executable, str(SWARM), "--nodes", str(nodes), "--image", image,
                "--image-size", str(size), "--order", order, "--backoff", str(backoff),
                "--timeout", str(timeout), "--deadline", str(deadline), *mirrors]
        proc = subprocess.Popen(in_namespace(tier.nodes_ns, argv), stdout=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)
        killed_at = None
        assert proc.stdout is not None
        last = b""
        for line in proc.stdout:
            if line.startswith(b"HALF ") and kill is not None:
                tier.fail(f"cache{kill + 1}")
                killed_at = float(line.split()[1])
            last = line
        if proc.wait() != 0:
            raise RuntimeError(f"the swarm failed with exit status {proc.returncode}")
        report = json.loads(last)
    image_bytes, other, statuses = origin_bytes(workdir / "origin.log", image)
    return StormResult(nodes=[NodeRecord(**n) for n in report["nodes"]],
                       wall=report["wall"], size=size,
                       mirrors=mirrors, origin_image_bytes=image_bytes,
                       origin_other_bytes=other, origin_requests=statuses, killed=kill,
                       killed_at=killed_at)
