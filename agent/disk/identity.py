"""Proving the opened disk is the backup disk, before anything reads or writes it.

Two checks: what is mounted at the mount point is the mapped device, not
the root filesystem or another disk, and a filesystem that can keep
snapshots (:func:`check_mount`); and the repository on it carries the
random id this machine recorded for the disk at ``init``
(:func:`check_marker`). Both are pure; :func:`verify_mount` and
:func:`verify_identity` apply them to the live system. The recorded ids
live under the state directory (:func:`recorded_id`, :func:`record_id`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import socket
import stat
from typing import Final

from agent.config.model import Disk, Settings
from agent.core.errors import DiskError, WrongDiskError
from agent.core.files import write_atomic
from agent.core.mounts import MountEntry, read_mountinfo
from agent.repository.store import Marker, Repository, classify
from agent.disk.devices import device_number, mapped_rdev, normalize, top_mount

log = logging.getLogger(__name__)

# Filesystems that cannot hold snapshots: no hard links (every snapshot would
# be a full copy) or no Unix owners and permissions (a restore would lose
# them), or read-only. fuseblk is how ntfs-3g and exfat-fuse mounts appear.
UNSUPPORTED_FILESYSTEMS: Final = frozenset(
    {
        "vfat",
        "msdos",
        "umsdos",
        "fat",
        "exfat",
        "ntfs",
        "ntfs3",
        "fuseblk",
        "hfs",
        "iso9660",
        "udf",
        "squashfs",
        "erofs",
        "cramfs",
        "romfs",
    }
)
_READ_ONLY_FILESYSTEMS: Final = frozenset({"iso9660", "udf", "squashfs", "erofs", "cramfs", "romfs"})
SUPPORTED_HINT: Final = "ext4, xfs or btrfs"
_ID_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,128}")


def _unsupported_reason(fstype: str) -> str:
    if fstype in _READ_ONLY_FILESYSTEMS:
        return "a read-only filesystem"
    return "a filesystem without hard links or Unix owners and permissions"


def check_mount(disk: Disk, entries: list[MountEntry], mapped_rdev: str, root_device: str) -> MountEntry:
    """The mount at the disk's mount point, proved to be the backup disk's (pure; docs/ARCHITECTURE.md, rule 2).

    ``entries`` is mountinfo, ``mapped_rdev`` the mapped device's and
    ``root_device`` the root filesystem's "major:minor". Refuses (WrongDiskError)
    an unmounted mount point (an empty directory on the root filesystem), a
    mount of another device, the root filesystem's device, and a filesystem
    that cannot keep snapshots.
    """
    mount_point = normalize(disk.mount_point)
    entry = top_mount(entries, mount_point)
    if entry is None:
        raise WrongDiskError(
            f"{mount_point} is not mounted: nothing is written to an empty mount point on the root filesystem; "
            f"the backup disk {disk.name} ({disk.mapped_device}) should be mounted there",
            step="verify",
        )
    if entry.device == root_device:
        raise WrongDiskError(
            f"{mount_point} is on the root filesystem's device ({entry.source}, {entry.device}), "
            f"not on the backup disk {disk.name}: nothing was written",
            step="verify",
        )
    if not entry.from_device(mapped_rdev):
        raise WrongDiskError(
            f"{mount_point} is mounted from {entry.source} ({entry.fstype}, device {entry.device}), "
            f"not from the backup disk {disk.name} ({disk.mapped_device}, device {mapped_rdev}): "
            "nothing was written; unmount it, or fix mount_point in the config",
            step="verify",
        )
    if entry.fstype in UNSUPPORTED_FILESYSTEMS:
        raise WrongDiskError(
            f"{mount_point} holds {entry.fstype}, {_unsupported_reason(entry.fstype)}, which cannot keep "
            f"hard-linked snapshots: format the backup disk's filesystem (on {disk.mapped_device}) as "
            f"{SUPPORTED_HINT}; nothing was written",
            step="verify",
        )
    return entry


def check_marker(disk: Disk, marker: Marker | None, recorded_id: str | None, host: str) -> None:
    """The repository on the disk is the one this machine recorded for it (pure; raises WrongDiskError).

    Same label or a cloned LUKS UUID is not enough: the random repository id
    written by ``backup-agent init`` must match.
    """
    init = f"backup-agent init --disk {disk.name}"
    if marker is None:
        raise WrongDiskError(
            f"there is no backup-agent repository at {disk.repository} on disk {disk.name}: "
            f"run {init} to create one (the backup never creates it by itself); nothing was written",
            step="verify",
        )
    if recorded_id is None:
        raise WrongDiskError(
            f"no repository id is recorded on this machine for disk {disk.name} (the disk holds id {marker.id}): "
            f"run {init} to adopt or create its repository; nothing was written",
            step="verify",
        )
    if marker.id != recorded_id:
        raise WrongDiskError(
            f"this is not the disk backup-agent knows as {disk.name}: same label or cloned LUKS UUID, "
            f"another repository (id {marker.id}, expected {recorded_id}); nothing was written",
            step="verify",
        )
    if marker.host != host:
        raise WrongDiskError(
            f"the repository {disk.repository} on disk {disk.name} belongs to host {marker.host}, "
            f"not to this machine ({host}): nothing was written; each machine backs up into its own "
            "repository (the default is <mount point>/<hostname>)",
            step="verify",
        )


def verify_mount(disk: Disk) -> MountEntry:
    """check_mount on this system: the live mountinfo, the mapped device, the root filesystem."""
    mount_point = os.path.realpath(disk.mount_point)
    root = device_number(os.stat("/").st_dev)
    mapped = mapped_rdev(disk, step="verify")
    return check_mount(dataclasses.replace(disk, mount_point=mount_point), read_mountinfo(), mapped, root)


def verify_identity(disk: Disk, settings: Settings) -> Marker | None:
    """Prove the opened disk is this one, before anything reads or writes it; returns the marker it checked.

    The mount's source first (:func:`verify_mount`), then the repository's
    marker against the id this machine recorded (:func:`check_marker`).
    """
    verify_mount(disk)
    marker = Repository.open(disk.repository).marker if classify(disk.repository) == "repository" else None
    check_marker(disk, marker, recorded_id(settings, disk), socket.gethostname())
    return marker


def id_path(settings: Settings, disk: Disk) -> str:
    """Where this machine records the repository id of the disk: ``<state_dir>/disks/<name>.id``."""
    if not disk.name or "/" in disk.name or disk.name.startswith(".") or "\0" in disk.name:
        raise DiskError(f"disk name {disk.name!r} cannot name a file: expected a crypttab name without / or a leading .")
    return os.path.join(settings.state_dir, "disks", disk.name + ".id")


def recorded_id(settings: Settings, disk: Disk) -> str | None:
    """The repository id recorded for the disk on this machine; None when none is recorded.

    The file must not be writable by others (it decides which disk is trusted).
    """
    path = id_path(settings, disk)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise DiskError(f"cannot read the recorded repository id {path}: {error.strerror}", step="verify") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if stat.S_IMODE(info.st_mode) & 0o022 or info.st_uid not in (0, os.geteuid()):
            raise DiskError(
                f"refusing the recorded repository id {path}: it must be owned by root and writable by root only "
                f"(owner uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o})",
                step="verify",
            )
        text = handle.read(4096).decode("utf-8", "replace").strip()
    if not text:
        return None
    if not _ID_RE.fullmatch(text):
        raise DiskError(f"{path} does not hold a repository id: remove it and run backup-agent init --disk {disk.name}", step="verify")
    return text


def _make_directories(path: str) -> None:
    """mkdir -p with mode 0755 for each directory created (whatever the umask)."""
    missing: list[str] = []
    current = path
    while not os.path.isdir(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o755)
        except FileExistsError:
            continue
        os.chmod(directory, 0o755)


def record_id(settings: Settings, disk: Disk, repository_id: str) -> None:
    """Record the disk's repository id on this machine: written atomically, mode 0644."""
    if not _ID_RE.fullmatch(repository_id):
        raise ValueError(f"not a repository id: {repository_id!r}")
    path = id_path(settings, disk)
    directory = os.path.dirname(path)
    _make_directories(directory)
    write_atomic(path, repository_id.encode() + b"\n", prefix=f".{disk.name}.")
    log.info("recorded repository id %s for disk %s in %s", repository_id, disk.name, path)
