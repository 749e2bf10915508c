"""A member's xattrs and POSIX ACLs set on what the extractor made of it, as GNU tar
sets them: what the file system refuses is named in one warning and skipped."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from .acl import acl_text_to_xattr, read_id_table
from .errors import ArchiveError

if TYPE_CHECKING:
    from .tarheader import Member

log = logging.getLogger("tmpfsboot")


class XattrSetter:
    """Sets xattrs under a root; REAL turns a path relative to the root into one the
    process can open (the ACLs' names are looked up in the root's own passwd and group)."""

    def __init__(self, real: Callable[[str], str]) -> None:
        self._real = real
        self._ids: tuple[dict[str, int], dict[str, int]] | None = None
        self._unsupported: set[str] = set()  # namespaces the file system has no room for

    def set(self, target: int | str, m: Member, *, follow: bool) -> None:
        """Every xattr and ACL of M; the ones refused are named in one warning."""
        refused: list[str] = []
        for key, value in (m.xattrs or {}).items():
            self._set_one(target, key, value, refused, follow=follow)
        for kind, text in (m.acls or {}).items():
            key = f"system.posix_acl_{kind}"
            if (m.xattrs and key in m.xattrs) or not text.strip():
                continue
            if self._ids is None:
                self._ids = (read_id_table(self._real("etc/passwd")),
                             read_id_table(self._real("etc/group")))
            users, groups = self._ids
            try:
                value = acl_text_to_xattr(text, users=users, groups=groups)
            except ArchiveError as e:
                refused.append(f"{key} ({e})")
                continue
            self._set_one(target, key, value, refused, follow=follow)
        if refused:
            log.warning("tar member %r: the file system refused %s: skipped", m.name,
                        ", ".join(refused))

    def _set_one(self, target: int | str, key: str, value: bytes, refused: list[str], *,
                 follow: bool) -> None:
        """Set one xattr; one the file system refuses goes into REFUSED (as GNU tar, go on).

        A namespace the file system does not support at all (Debian 12's tmpfs, kernel 6.1,
        refuses user.*; tmpfs takes them from 6.6 on) is named once, for its first member,
        not for every file of the root. A malformed ACL (no mask entry) is EINVAL.
        """
        try:
            os.setxattr(target, key, value, follow_symlinks=follow)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise
            if e.errno in (errno.EOPNOTSUPP, errno.ENOTSUP):
                namespace = key.split(".", 1)[0]
                if namespace in self._unsupported:
                    return
                self._unsupported.add(namespace)
                key += f" (no {namespace}.* xattrs here: the others are skipped silently)"
            refused.append(key)
