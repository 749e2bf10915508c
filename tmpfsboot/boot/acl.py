"""POSIX ACLs: pax SCHILY.acl.* text to the kernel's system.posix_acl_* xattr value."""

from __future__ import annotations

import struct

from .errors import ArchiveError

# ACL xattr encoding (linux/posix_acl_xattr.h).
_ACL_VERSION = 2
_ACL_TAGS = {"user": (0x01, 0x02), "group": (0x04, 0x08), "mask": (0x10, 0x10),
             "other": (0x20, 0x20)}
_ACL_UNDEFINED_ID = 0xFFFFFFFF


def acl_text_to_xattr(text: str, *, users: dict[str, int], groups: dict[str, int]) -> bytes:
    """Encode a POSIX ACL in text form (as pax SCHILY.acl.*) as a system.posix_acl_* value.

    Raises ArchiveError for an entry it cannot encode (a bad tag, an unknown name).
    """
    entries = []
    for raw in text.replace(",", "\n").splitlines():
        entry = raw.split("#", 1)[0].strip()
        if not entry:
            continue
        parts = entry.split(":")
        if len(parts) < 3:
            raise ArchiveError(f"corrupt ACL entry {entry!r}")
        kind, qualifier, perms = parts[0], parts[1], parts[2]
        kind = {"u": "user", "g": "group", "m": "mask", "o": "other"}.get(kind, kind)
        if kind not in _ACL_TAGS:
            raise ArchiveError(f"corrupt ACL entry {entry!r}")
        obj_tag, named_tag = _ACL_TAGS[kind]
        if qualifier:
            # star writes the numeric id as a fourth field; GNU tar writes names or numbers
            if len(parts) > 3 and parts[3].isdigit():
                ident = int(parts[3])
            elif qualifier.isdigit():
                ident = int(qualifier)
            else:
                table = users if kind == "user" else groups
                if qualifier not in table:
                    raise ArchiveError(f"ACL entry {entry!r}: unknown {kind} {qualifier!r}")
                ident = table[qualifier]
            if ident > _ACL_UNDEFINED_ID:
                raise ArchiveError(f"ACL entry {entry!r}: id out of range")
            tag = named_tag
        else:
            tag, ident = obj_tag, _ACL_UNDEFINED_ID
        if perms.strip("rwx-"):
            raise ArchiveError(f"ACL entry {entry!r}: bad permissions {perms!r}")
        perm = sum(bit for ch, bit in zip("rwx", (4, 2, 1), strict=True) if ch in perms)
        entries.append((tag, perm, ident))
    entries.sort(key=lambda e: (e[0], e[2] if e[2] != _ACL_UNDEFINED_ID else -1))
    return struct.pack("<I", _ACL_VERSION) + b"".join(struct.pack("<HHI", *e) for e in entries)


def read_id_table(path: str) -> dict[str, int]:
    """name -> id from a passwd or group file; empty when it is missing."""
    table: dict[str, int] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split(":")
                if len(fields) > 2 and fields[2].isdigit():
                    table.setdefault(fields[0], int(fields[2]))
    except OSError:
        pass
    return table
