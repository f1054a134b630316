"""Describe a directory tree completely, to compare snapshots with sources.

Paths are bytes so names that are not UTF-8 survive. The description holds
everything a snapshot must preserve: type, mode, owner, mtime, content,
symlink target, xattrs (ACLs are the system.posix_acl_* xattrs) and which
files are hard links of one another.
"""

from __future__ import annotations

import hashlib
import os
import stat
from typing import Any


def _xattrs(path: bytes) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    values = {}
    for name in names:
        try:
            values[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue
    return values


def describe(root: str | bytes, *, times: bool = True) -> dict[bytes, dict[str, Any]]:
    """Relative path -> attributes, for every entry below ``root`` (not root itself)."""
    top = os.fsencode(root)
    result: dict[bytes, dict[str, Any]] = {}
    members: dict[int, list[bytes]] = {}
    for directory, dirnames, filenames in os.walk(top):
        for name in sorted(dirnames) + sorted(filenames):
            path = os.path.join(directory, name)
            rel = os.path.relpath(path, top)
            info = os.lstat(path)
            entry: dict[str, Any] = {
                "type": stat.S_IFMT(info.st_mode),
                "mode": stat.S_IMODE(info.st_mode),
                "uid": info.st_uid,
                "gid": info.st_gid,
                "xattrs": _xattrs(path),
            }
            if times and stat.S_ISLNK(info.st_mode):
                # rsync sets a symlink's time with whole-second precision only
                entry["mtime_s"] = info.st_mtime_ns // 1_000_000_000
            elif times and not stat.S_ISDIR(info.st_mode):
                entry["mtime_ns"] = info.st_mtime_ns
            if stat.S_ISLNK(info.st_mode):
                entry["target"] = os.readlink(path)
            elif stat.S_ISREG(info.st_mode):
                with open(path, "rb") as handle:
                    entry["sha256"] = hashlib.sha256(handle.read()).hexdigest()
                members.setdefault(info.st_ino, []).append(rel)
            result[rel] = entry
    # Hard links within this tree (not to other snapshots): name each group
    # by its smallest member's path.
    for group in members.values():
        if len(group) > 1:
            for rel in group:
                result[rel]["link_group"] = min(group)
    return result


def inodes(root: str | bytes) -> dict[bytes, int]:
    """Relative path -> inode number, for regular files."""
    top = os.fsencode(root)
    found = {}
    for directory, _dirs, filenames in os.walk(top):
        for name in filenames:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            if stat.S_ISREG(info.st_mode):
                found[os.path.relpath(path, top)] = info.st_ino
    return found
