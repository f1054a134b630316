"""The mount table, and which mount points ``rsync --one-file-system`` skips.

With ``--one-file-system`` rsync copies a mount point under the source as an
empty directory and nothing below it; :func:`find_skipped_mounts` names those
directories so the user can be told what the snapshot leaves out.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import re
import stat
from dataclasses import dataclass
from typing import Callable, Iterable

MOUNTINFO = "/proc/self/mountinfo"


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo (escapes decoded)."""

    mount_point: str
    fstype: str
    source: str
    device: str  # "major:minor"
    # The "major:minor" of the block device ``source`` names, where it is not
    # ``device``: btrfs gives each mount an anonymous device of its own, so
    # mountinfo's major:minor never is the disk's (read_mountinfo fills it).
    backing: str | None = None

    def from_device(self, rdev: str) -> bool:
        """Whether this filesystem is the one on the block device ``rdev`` ("major:minor")."""
        return rdev in (self.device, self.backing)


_OCTAL_RE = re.compile(rb"\\([0-3][0-7]{2})")


def unescape(field: str) -> str:
    """Undo the octal escapes of mountinfo, fstab and crypttab (``\\040`` space, ``\\011`` tab, ``\\134`` backslash).

    The one decoder for all three tables, so a name reads the same in each.
    Each escape stands for one byte of the name, as libmount and cryptdisks
    read it: the bytes are decoded together (like os.fsdecode), so a name
    written ``\\303\\251`` is "\u00e9", not two Latin-1 letters. A backslash
    that starts no escape of a byte stays as it is.
    """
    if "\\" not in field:
        return field
    raw = _OCTAL_RE.sub(lambda match: bytes((int(match.group(1), 8),)), os.fsencode(field))
    return os.fsdecode(raw)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Parse the text of /proc/<pid>/mountinfo (pure); malformed lines are skipped.

    A line is ``id parent maj:min root mount-point options [optional...] -
    fstype source super-options`` (proc(5)).
    """
    entries: list[MountEntry] = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            separator = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) < separator + 3:
            continue
        entries.append(
            MountEntry(
                mount_point=unescape(fields[4]),
                fstype=unescape(fields[separator + 1]),
                source=unescape(fields[separator + 2]),
                device=fields[2],
            )
        )
    return entries


def read_mountinfo(path: str = MOUNTINFO) -> list[MountEntry]:
    """The mount table of this process (names decoded like os.fsdecode)."""
    with open(path, "rb") as file:
        entries = parse_mountinfo(os.fsdecode(file.read()))
    return [_with_backing(entry) if entry.fstype == "btrfs" else entry for entry in entries]


def _with_backing(entry: MountEntry) -> MountEntry:
    """A btrfs entry with the block device its source names (a path under /dev), when it is one."""
    if not entry.source.startswith("/dev/"):
        return entry
    try:
        info = os.stat(entry.source)
    except OSError:
        return entry
    if not stat.S_ISBLK(info.st_mode):
        return entry
    return dataclasses.replace(entry, backing=f"{os.major(info.st_rdev)}:{os.minor(info.st_rdev)}")


def _normalize(path: str) -> str:
    path = posixpath.normpath(path)
    return "/" + path.lstrip("/")


def _is_under(path: str, directory: str) -> bool:
    """``path`` is strictly below ``directory`` (both normalized)."""
    if path == directory:
        return False
    return path.startswith(directory if directory == "/" else directory + "/")


def skipped_mount_points(
    source: str,
    mount_points: Iterable[str],
    same_device: Callable[[str], bool],
) -> tuple[str, ...]:
    """Mount points strictly under ``source`` on another filesystem (pure).

    ``same_device(mount_point)`` says whether a mount point is on the
    source's filesystem. A skipped mount point nested under another skipped
    one is left out: rsync never gets there. Sorted, without duplicates.
    """
    root = _normalize(source)
    under = sorted({_normalize(point) for point in mount_points if _is_under(_normalize(point), root)})
    skipped: list[str] = []
    for point in under:  # sorted: a parent comes before what lies under it
        if any(_is_under(point, outer) for outer in skipped):
            continue
        if not same_device(point):
            skipped.append(point)
    return tuple(skipped)


def find_skipped_mounts(source: str) -> tuple[str, ...]:
    """The mount points under ``source`` that ``rsync --one-file-system`` leaves empty.

    A mount point that cannot be stat-ed counts as skipped.
    """
    root = os.path.realpath(source)
    device = os.stat(root).st_dev

    def same_device(point: str) -> bool:
        try:
            return os.stat(point).st_dev == device
        except OSError:
            return False

    return skipped_mount_points(root, (entry.mount_point for entry in read_mountinfo()), same_device)
