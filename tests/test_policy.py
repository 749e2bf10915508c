"""FetchPolicy as both callers build it, and the URLs the engine is handed, resolved and
ordered before it runs (the engine never sees the command line)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tmpfsboot.boot.cmdline import (
    MirrorOrder,
    NetFacts,
    node_identity,
    order_layers,
    parse_cmdline,
    parse_root,
    resolve_layers,
    spread_urls,
)
from tmpfsboot.boot.contract import DEFAULT_BACKOFF, DEFAULT_TIMEOUT
from tmpfsboot.boot.errors import CmdlineError, UsageError
from tmpfsboot.boot.policy import FetchPolicy, Verify

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent


def _wait(seconds: float) -> None:
    pass


POLICIES = [
    # (command line, keyring, expected policy)
    ("root=http://h/a.tar", None,
     FetchPolicy(Verify.CHECKSUM, None, None, DEFAULT_TIMEOUT, DEFAULT_BACKOFF, True, _wait)),
    ("root=http://h/a.tar", "/etc/k.gpg",
     FetchPolicy(Verify.SIGNATURE, "/etc/k.gpg", None, DEFAULT_TIMEOUT, DEFAULT_BACKOFF,
                 True, _wait)),
    ("root=http://h/a.tar tmpfs.verify=checksum", "/etc/k.gpg",
     FetchPolicy(Verify.CHECKSUM, "/etc/k.gpg", None, DEFAULT_TIMEOUT, DEFAULT_BACKOFF,
                 True, _wait)),
    ("root=http://h/a.tar tmpfs.verify=no tmpfs.retries=3 tmpfs.timeout=7.5 "
     "tmpfs.backoff=0.5", None,
     FetchPolicy(Verify.NO, None, 3, 7.5, 0.5, True, _wait)),
    ("root=http://h/a.tar tmpfs.writers=0", None,
     FetchPolicy(Verify.CHECKSUM, None, None, DEFAULT_TIMEOUT, DEFAULT_BACKOFF, True, _wait,
                 writers=0)),
    ("root=http://h/a.tar tmpfs.writers=6", None,
     FetchPolicy(Verify.CHECKSUM, None, None, DEFAULT_TIMEOUT, DEFAULT_BACKOFF, True, _wait,
                 writers=6)),
]


@pytest.mark.parametrize(("text", "keyring", "expected"), POLICIES)
def test_policy_from_plan_takes_the_command_line_and_defaults_verify_by_keyring(
        text: str, keyring: str | None, expected: FetchPolicy) -> None:
    assert FetchPolicy.from_plan(parse_cmdline(text), keyring=keyring, wait=_wait) == expected


def test_policy_refuses_signature_mode_without_a_keyring() -> None:
    with pytest.raises(UsageError, match="verify=signature needs a keyring"):
        FetchPolicy.from_plan(parse_cmdline("root=http://h/a.tar tmpfs.verify=signature"),
                              keyring=None)
    with pytest.raises(UsageError, match="needs a keyring"):
        FetchPolicy.choose(Verify.SIGNATURE, keyring="", retries=None)


def test_policy_is_frozen() -> None:
    policy = FetchPolicy(Verify.NO)
    with pytest.raises(AttributeError):
        policy.retries = 3  # type: ignore[misc]


def test_resolve_layers_substitutes_every_mirror_in_order() -> None:
    layers = parse_root("http://a/%hostname.tar|http://b/%mac.tar,http://c/base.tar")
    facts = NetFacts(hostname="n1", mac="aa-bb-cc-dd-ee-ff")
    assert resolve_layers(layers, facts) == (
        ("http://a/n1.tar", "http://b/aa-bb-cc-dd-ee-ff.tar"), ("http://c/base.tar",))


def test_resolve_layers_fails_on_an_unknown_fact() -> None:
    with pytest.raises(CmdlineError, match="%uuid is unknown"):
        resolve_layers(parse_root("http://a/base.tar,http://a/%uuid.tar"), NetFacts())


def test_resolved_urls_keep_the_spread_order_of_their_templates() -> None:
    layers = parse_root("http://a/%hostname.tar|http://b/%hostname.tar|http://c/%hostname.tar")
    facts = NetFacts(hostname="node42")
    identity = node_identity(facts)
    assert identity is not None
    urls = resolve_layers(order_layers(layers, MirrorOrder.SPREAD, identity), facts)
    written = [f"http://{h}/node42.tar" for h in "abc"]
    assert list(urls[0]) == spread_urls(written, identity)


def test_engine_loads_without_the_command_line_parser() -> None:
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import tmpfsboot.boot.engine; "
            "sys.exit('tmpfsboot.boot.cmdline' in sys.modules)")
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(REPO)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr or "the engine imported cmdline"
