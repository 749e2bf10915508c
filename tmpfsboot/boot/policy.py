"""How a root is fetched: verification, retries, time-outs, as one frozen value.

Both callers of the engine (the boot's ``main.py`` from the kernel command line, the
host's ``tmpfsboot fetch`` from its options) build a FetchPolicy the same way and hand it
to ``engine.fetch_root``, which never sees the command line. Standard library only.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .contract import DEFAULT_BACKOFF, DEFAULT_TIMEOUT
from .errors import CmdlineError, UsageError

if TYPE_CHECKING:
    from .cmdline import BootPlan

# Sleeps between retries (the boot's lets the console ask for a shell meanwhile). Kept off
# fetch.py's import: the boot's mount step reads the command line without the HTTP code.
Wait = Callable[[float], None]


class Verify(enum.Enum):
    """How a layer is verified before the root may boot (as systemd-importd's --verify)."""

    SIGNATURE = "signature"
    CHECKSUM = "checksum"
    NO = "no"

    @classmethod
    def default_for(cls, keyring: str | None) -> Verify:
        """signature when a keyring is available, else checksum."""
        return cls.SIGNATURE if keyring else cls.CHECKSUM

    @classmethod
    def parse(cls, text: str) -> Verify:
        """The mode named TEXT, or CmdlineError listing the valid ones."""
        try:
            return cls(text)
        except ValueError:
            valid = "|".join(v.value for v in cls)
            raise CmdlineError(f"tmpfs.verify={text}: expected {valid}") from None


@dataclass(frozen=True)
class FetchPolicy:
    """What every download of one root obeys.

    VERIFY with KEYRING (signature mode needs one); RETRIES after failures, shared by the
    whole root (None: unlimited), the first back-off BACKOFF seconds, doubled and jittered,
    slept by WAIT; a connection stalled TIMEOUT seconds counts as broken; PREFLIGHT reads
    the manifests and refuses a root that cannot fit before any layer is downloaded;
    WRITERS processes write small files beside the extracting one (None: one per CPU
    beyond the extractor's and the decompressor's).
    """

    verify: Verify
    keyring: str | None = None
    retries: int | None = None
    timeout: float = DEFAULT_TIMEOUT
    backoff: float = DEFAULT_BACKOFF
    preflight: bool = True
    wait: Wait = time.sleep
    writers: int | None = None

    def __post_init__(self) -> None:
        if self.verify is Verify.SIGNATURE and not self.keyring:
            raise UsageError("verify=signature needs a keyring (--keyring or TMPFS_KEYRING)")

    @classmethod
    def choose(cls, verify: Verify | None, *, keyring: str | None, retries: int | None,
               timeout: float = DEFAULT_TIMEOUT, backoff: float = DEFAULT_BACKOFF,
               wait: Wait = time.sleep, writers: int | None = None) -> FetchPolicy:
        """The policy asked for; without VERIFY, signature when there is a keyring, else
        checksum. UsageError when signature mode has no keyring."""
        return cls(verify=verify or Verify.default_for(keyring), keyring=keyring,
                   retries=retries, timeout=timeout, backoff=backoff, wait=wait,
                   writers=writers)

    @classmethod
    def from_plan(cls, plan: BootPlan, *, keyring: str | None,
                  wait: Wait = time.sleep) -> FetchPolicy:
        """The policy of a boot plan (tmpfs.verify=, tmpfs.retries=, tmpfs.timeout=,
        tmpfs.backoff=, tmpfs.writers=) with the initramfs' KEYRING, if it has one."""
        return cls.choose(plan.verify, keyring=keyring, retries=plan.retries,
                          timeout=plan.timeout, backoff=plan.backoff, wait=wait,
                          writers=plan.writers)
