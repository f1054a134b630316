"""Mount points and device numbers as the kernel shows them, shared by the disk's steps.

Paths are compared normalised; a device is its "major:minor" as mountinfo
writes it; what is visible at a mount point is the last mount stacked there.
Every step checks the system itself with these (the mapped device exists,
mountinfo shows the mount) instead of trusting an exit status.
"""

from __future__ import annotations

import os
import posixpath
import stat
from typing import Iterable, Protocol, TypeVar

from agent.config.model import Disk
from agent.core.errors import DiskError
from agent.core.mounts import MountEntry


class _HasMountPoint(Protocol):
    @property
    def mount_point(self) -> str: ...


_AtMountPoint = TypeVar("_AtMountPoint", bound=_HasMountPoint)


def normalize(path: str) -> str:
    """An absolute, normalised path, as mount points are compared."""
    return "/" + posixpath.normpath(path).lstrip("/")


def last_at(entries: Iterable[_AtMountPoint], mount_point: str) -> _AtMountPoint | None:
    """The last entry for ``mount_point``, paths compared normalized."""
    wanted = normalize(mount_point)
    found: _AtMountPoint | None = None
    for entry in entries:
        if normalize(entry.mount_point) == wanted:
            found = entry
    return found


def top_mount(entries: Iterable[MountEntry], mount_point: str) -> MountEntry | None:
    """What is visible at ``mount_point``: with mounts stacked there, the last in mountinfo."""
    return last_at(entries, mount_point)


def mounts_of(entries: Iterable[MountEntry], device: str) -> list[MountEntry]:
    return [entry for entry in entries if entry.from_device(device)]


def device_number(dev: int) -> str:
    """A dev_t as mountinfo writes it: "major:minor"."""
    return f"{os.major(dev)}:{os.minor(dev)}"


def mapped_rdev(disk: Disk, *, step: str = "mount") -> str:
    """The mapped device's "major:minor"; DiskError when it is missing or not a block device."""
    try:
        info = os.stat(disk.mapped_device)
    except FileNotFoundError:
        raise DiskError(f"disk {disk.name} is not unlocked: {disk.mapped_device} does not exist", step=step) from None
    except OSError as error:
        raise DiskError(f"cannot examine {disk.mapped_device}: {error.strerror}", step=step) from None
    if not stat.S_ISBLK(info.st_mode):
        raise DiskError(
            f"{disk.mapped_device} is not a block device: check mapped_device of disk {disk.name} in the config",
            step=step,
        )
    return device_number(info.st_rdev)
