"""The engine's exceptions: one base class, narrow subclasses whose message names the object."""

from __future__ import annotations


class TmpfsbootError(Exception):
    """Base of every error tmpfsboot reports to a user as one line."""

    exit_code = 1


class UsageError(TmpfsbootError):
    """Invalid input from the user: a bad command line, option or value (exit 2)."""

    exit_code = 2


class CmdlineError(UsageError):
    """The kernel command line (or ROOT argument) is invalid."""


class CommandError(TmpfsbootError):
    """A child program failed or could not be started."""


class FetchError(TmpfsbootError):
    """A download failed for good (every mirror, every retry)."""


class PermanentHTTPError(FetchError):
    """The server gave a permanent answer (403, 404, 410, ...): do not retry this mirror."""


class TransientFetchError(FetchError):
    """A failure worth retrying: connection refused or reset, 5xx, 429, a stall."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RestartRoot(TmpfsbootError):
    """The root must be fetched again from its first layer (DIR emptied first).

    Raised when a layer can no longer continue as one byte stream (the file changed on
    the server, a resume was refused) or failed verification after extraction.
    """


class VerificationError(RestartRoot):
    """An image does not match its SHA256SUMS, or the signature is bad or missing."""


class ArchiveError(TmpfsbootError):
    """A tar archive is corrupt or truncated."""


class UnsafeMemberError(ArchiveError):
    """A tar member would write outside the root: refused, naming the member."""


class SpaceError(TmpfsbootError):
    """The root does not fit: names the needed and the available bytes."""


class ShellRequested(TmpfsbootError):
    """The user pressed x while the boot waited: stop and open initramfs-tools' shell."""
