"""Opening a repository for a command that reads it (versions, diff, restore, verify).

Three ways, in this order:

- ``--repository DIR``: the repository at that path, as it is; no disk is touched.
- a disk (``--disk NAME``; else, when no ``[backup] repository`` is set,
  the first configured disk that is attached): opened through the same
  lifecycle as the backup cycle, under the machine lock so a backup cannot
  unmount it underneath: find it by its LUKS UUID, unlock, mount, prove the
  mount is the disk's and the repository the one this machine recorded.
  Each step registers its own undo, so on exit the disk is left as found.
  A disk mounted by the command itself is mounted read-only when its config
  gives ``filesystem`` (the mount options are ours to extend); through an
  fstab line the line's own options apply (``mount --fstab`` takes them
  from the file), so it is mounted as the backup mounts it.
- otherwise ``[backup] repository`` from the config.

Not as root, a disk cannot be found (blkid) nor unlocked: the disk's
repository is read only when the disk is mounted already (opened for
browsing, agent.disk.browse); otherwise the error says that opening it needs
root, and how (``backup-agent open``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
from typing import Callable, Iterator

from agent.disk.find import find_device, first_present, none_attached, not_attached, select_disk
from agent.disk.identity import verify_identity
from agent.disk.mount import mounted
from agent.disk.unlock import unlocked
from agent.core import lock
from agent.core.commands import Runner
from agent.config.model import Disk, Settings
from agent.core.errors import DiskMissingError, RepositoryError, UsageError
from agent.repository.store import Repository


def open_to_read(root: str) -> Repository:
    """Repository.open for a command that only reads: its errors name no step of the backup cycle
    (a missing repository is not a "prepare failed")."""
    try:
        return Repository.open(root)
    except RepositoryError as exc:
        exc.step = None
        raise


def read_only(disk: Disk) -> Disk:
    """The disk as a reading command mounts it: read-only when the mount options are ours."""
    if disk.filesystem is None or "ro" in disk.mount_options:
        return disk
    return dataclasses.replace(disk, mount_options=(*(o for o in disk.mount_options if o != "rw"), "ro"))


@contextlib.contextmanager
def open_repository(
    settings: Settings,
    runner: Runner,
    *,
    repository: str | None,
    disk: str | None,
    warn: Callable[[str], None],
    command: str = "read",
) -> Iterator[Repository]:
    """The repository to read, opened for the block and closed as found afterwards."""
    if repository is not None and disk is not None:
        raise UsageError(f"give either --repository {repository} or --disk {disk}, not both")
    if repository is not None:
        yield open_to_read(os.path.abspath(repository))
        return
    chosen = select_disk(settings, name=disk, crypto=None, mount=None)
    if os.geteuid() != 0 and (chosen is not None or (settings.repository is None and settings.disks)):
        # Not root: blkid cannot see the disk, nor can it be unlocked. A disk
        # opened for browsing (backup-agent open) is read as it is.
        yield open_to_read(_opened(settings, chosen))
        return
    if chosen is None and settings.repository is None and settings.disks:
        chosen = first_present(settings, runner)
        if chosen is None:
            raise DiskMissingError(none_attached(settings) + "; plug one in, or give --repository DIR")
    if chosen is None:
        if settings.repository is None:
            raise UsageError(
                "no repository: give --repository DIR, or configure a [[disk]] or [backup] repository "
                f"in {settings.path or 'the config'}"
            )
        yield open_to_read(os.path.abspath(settings.repository))
        return
    with contextlib.ExitStack() as stack:
        yield _open_disk(stack, settings, runner, chosen, warn, command)


def _opened(settings: Settings, chosen: Disk | None) -> str:
    """Without root: the repository of the chosen (or first) configured disk that is mounted now, or why none can be read."""
    candidates = [chosen] if chosen is not None else list(settings.disks)
    for candidate in candidates:
        if os.path.ismount(candidate.mount_point) and os.path.isdir(candidate.repository):
            return os.path.abspath(candidate.repository)
    name = candidates[0].name
    raise UsageError(
        f"opening the backup disk {name} needs root: open it for browsing with `sudo backup-agent open --disk {name}` "
        "(the tray's Browse backups does this), then run this again; or give --repository DIR"
    )


def _open_disk(
    stack: contextlib.ExitStack, settings: Settings, runner: Runner, disk: Disk, warn: Callable[[str], None], command: str
) -> Repository:
    """Lock, find, unlock, mount, verify: each undo registered on ``stack`` as its step succeeds."""
    if os.geteuid() != 0:
        raise UsageError(
            f"reading the backup disk {disk.name} needs root (it is unlocked and mounted for the command): "
            "run it with sudo, or give --repository DIR for a repository you can read"
        )
    holder = {"pid": os.getpid(), "command": command, "started": dt.datetime.now().astimezone().isoformat(timespec="seconds")}
    stack.enter_context(lock.hold(lock.machine_lock_path(), holder))
    if find_device(disk, settings, runner) is None:
        raise DiskMissingError(not_attached(disk), step="disk")
    stack.enter_context(unlocked(disk, settings, runner, warn))
    stack.enter_context(mounted(read_only(disk), settings, runner, warn))
    verify_identity(disk, settings)
    return open_to_read(disk.repository)
