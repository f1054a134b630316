"""Opening a backup disk for browsing, and a backup cycle on a disk opened so.

``backup-agent open --disk NAME`` (root; the desktop user reaches it through
the sudo rule ``install`` writes, like eject) unlocks the disk and mounts it
**read-only, nosuid, nodev, noexec**, proves it is the disk (as the cycle
does), and leaves it so. The desktop user then reads the snapshots with the
file manager and runs ``versions``, ``diff`` and ``restore`` without root:
the filesystem's owners, modes and ACLs, copied from the live system by
``rsync -aHAX --numeric-ids``, decide who reads what (the README's
"Restore" section gives the whole argument).

It is closed again by Eject (``backup-agent eject``), by the agent after an
idle time, or left to a backup: a cycle that finds its disk mounted
read-only remounts it read-write for the cycle and read-only again after,
leaving it as found (:func:`writable`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import os
import stat
from typing import Callable, Iterator

from agent.disk.find import find_device, not_attached
from agent.disk.identity import verify_identity
from agent.disk.mount import mounted
from agent.disk.unlock import unlocked
from agent.core import lock
from agent.core.commands import Runner
from agent.config.model import Disk, Settings
from agent.core.errors import BackupAgentError, DiskError, DiskMissingError, StepError
from agent.core.events import Emitter, complete, step
from agent.repository.store import MANIFEST_SUFFIX

log = logging.getLogger(__name__)

# What a disk opened for browsing is mounted with: nothing on it can be
# written, run, or used as a setuid program or a device node.
BROWSE_OPTIONS = ("ro", "nosuid", "nodev", "noexec")
_FLAGS = {"ro": os.ST_RDONLY, "nosuid": os.ST_NOSUID, "nodev": os.ST_NODEV, "noexec": os.ST_NOEXEC}
_OVERRIDDEN = {"ro", "rw", "suid", "nosuid", "dev", "nodev", "exec", "noexec", "defaults"}


def browse_disk(disk: Disk) -> Disk:
    """The disk as ``open`` mounts it (pure): its own options, then ours, which win."""
    kept = tuple(option for option in disk.mount_options if option not in _OVERRIDDEN)
    return dataclasses.replace(disk, mount_options=(*kept, *BROWSE_OPTIONS))


def missing_flags(flags: int) -> list[str]:
    """Which of BROWSE_OPTIONS a mount with statvfs ``flags`` lacks (pure)."""
    return [name for name, bit in _FLAGS.items() if not flags & bit]


def open_for_browsing(
    disk: Disk,
    settings: Settings,
    runner: Runner,
    emitter: Emitter,
    warn: Callable[[str], None],
    *,
    passphrase: bytearray | None = None,
) -> bool:
    """Unlock and mount ``disk`` for browsing and leave it so; True when this call opened it.

    Under the machine lock, so no cycle or eject runs meanwhile. Each step
    is undone when a later one fails: a refused or failed open leaves the
    disk as found. Found already mounted, it is left as it is (a mount by
    hand may be read-write), and said so. ``passphrase``: as for a backup
    (agent.disk.unlock.unlocked).
    """
    if os.geteuid() != 0:
        raise StepError(f"opening the backup disk {disk.name} needs root: run it with sudo", step="disk")
    holder = {
        "pid": os.getpid(),
        "command": "open",
        "disk": disk.name,
        "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    keep = _Keep()
    with contextlib.ExitStack() as stack:
        emitter.emit(step("lock", "start"))
        stack.enter_context(lock.hold(lock.machine_lock_path(), holder))
        emitter.emit(step("lock", "done"))
        emitter.emit(step("disk", "start", disk=disk.name))
        if find_device(disk, settings, runner) is None:
            raise DiskMissingError(not_attached(disk), step="disk")
        emitter.emit(step("disk", "done"))
        emitter.emit(step("unlock", "start", disk=disk.name))
        unlocked_now = stack.enter_context(unlocked(disk, settings, runner, warn, keep, passphrase=passphrase))
        emitter.emit(step("unlock", "done", unlocked_now=unlocked_now))
        emitter.emit(step("mount", "start", mount_point=disk.mount_point))
        mounted_now = stack.enter_context(mounted(browse_disk(disk), settings, runner, warn, keep))
        emitter.emit(step("mount", "done", mounted_now=mounted_now))
        emitter.emit(step("verify", "start", repository=disk.repository))
        verify_identity(disk, settings)
        lacking = missing_flags(os.statvfs(disk.mount_point).f_flag)
        if mounted_now and lacking:
            raise DiskError(
                f"{disk.mount_point} was mounted without {', '.join(lacking)} (the mount options or the fstab line "
                f"overrode them): unmounted and locked again; it is only opened for browsing with {','.join(BROWSE_OPTIONS)}",
                step="verify",
            )
        emitter.emit(step("verify", "done"))
        keep.value = True
    opened = unlocked_now or mounted_now
    emitter.emit(
        complete(
            None,
            disk=disk.name,
            mount_point=disk.mount_point,
            repository=disk.repository,
            snapshots=os.path.join(disk.repository, "snapshots"),
            already_open=not opened,
            read_only=not lacking,
        )
    )
    return opened


@dataclasses.dataclass
class _Keep:
    """Set once every step succeeded: the disk then stays open."""

    value: bool = False

    def __call__(self) -> bool:
        return self.value


def private_manifests(metadata_dir: str) -> list[str]:
    """Make every manifest in ``metadata_dir`` root's alone (0600); the names changed.

    A manifest lists every file of a snapshot with a checksum of its
    content, files in private directories too: on a disk open for browsing
    it must not be readable by every user. Older versions wrote them 0644;
    each cycle closes them. Never follows a link (the disk is not trusted).
    """
    changed = []
    for entry in sorted(os.listdir(metadata_dir)):
        if not entry.endswith(MANIFEST_SUFFIX):
            continue
        try:
            fd = os.open(os.path.join(metadata_dir, entry), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            continue  # a link or a special file: not a manifest this cycle wrote
        try:
            info = os.fstat(fd)
            if stat.S_ISREG(info.st_mode) and info.st_mode & 0o077:
                os.fchmod(fd, 0o600)
                changed.append(entry)
        finally:
            os.close(fd)
    return changed


def is_read_only(mount_point: str) -> bool:
    return bool(os.statvfs(mount_point).f_flag & os.ST_RDONLY)


@contextlib.contextmanager
def writable(disk: Disk, settings: Settings, runner: Runner, warn: Callable[[str], None]) -> Iterator[bool]:
    """A disk found mounted read-only (opened for browsing) remounted read-write for the body, then read-only again.

    Yields whether it remounted. The remount back runs also when the body
    fails; if it cannot (a file still open for writing), that is a warning:
    the disk stays mounted read-write, and Eject still closes it.
    """
    mount_point = os.path.realpath(disk.mount_point)
    if not is_read_only(mount_point):
        yield False
        return
    mount = settings.commands.mount
    runner.run((mount, "-o", "remount,rw", mount_point), step="mount")
    if is_read_only(mount_point):
        raise DiskError(f"{mount_point} is still read-only after remounting it read-write: nothing was written", step="mount")
    log.info("remounted %s read-write for the backup (it was opened for browsing)", mount_point)
    try:
        yield True
    finally:
        try:
            runner.run((mount, "-o", "remount,ro", mount_point), step="unmount")
        except BackupAgentError as exc:
            warn(f"{mount_point} could not be made read-only again ({exc.message}): it stays mounted read-write")
        else:
            if not is_read_only(mount_point):
                warn(f"{mount_point} is still read-write after remounting it read-only")
