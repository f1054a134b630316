"""Mounting and unmounting the unlocked disk, and who keeps a mount busy.

:func:`mounted` mounts the mapped device (directly, or through its fstab
line) only when nothing is mounted there, checks mountinfo, and on exit
syncs and unmounts only what it mounted, never lazily: a busy filesystem
stays mounted and unlocked, and the error names its holders (:func:`holders`)
and how to finish by hand. Entered after :func:`agent.disk.unlock.unlocked`
on the same ExitStack, so the unmount runs before the lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import time
from typing import Callable, Final, Iterable, Iterator

from agent.core.commands import Result, Runner
from agent.config.model import Disk, Settings
from agent.core.errors import CommandError, DiskBusyError, DiskError, WrongDiskError
from agent.core.mounts import MountEntry, read_mountinfo
from agent.disk.devices import device_number, mapped_rdev, mounts_of, normalize, top_mount
from agent.disk.tables import fstab_entry_for, parse_fstab
from agent.disk.unlock import said_last, unlock_argv, unlock_method

log = logging.getLogger(__name__)

# Seconds. sync on a slow USB disk with much dirty data takes as long as it takes.
MOUNT_TIMEOUT: Final = 120.0
UMOUNT_TIMEOUT: Final = 120.0
# Pauses between unmount attempts when the filesystem is busy (about 3 s in all).
UMOUNT_RETRY_DELAYS: Final[tuple[float, ...]] = (0.25, 0.5, 0.75, 1.5)
_DISK_FULL_RE: Final = re.compile(r"No space left on device|Disk quota exceeded")


def mount_argv(disk: Disk, settings: Settings) -> tuple[str, ...]:
    """How to mount the disk: with ``filesystem`` set, the mapped device directly; else its fstab line.

    The fstab form names the file (util-linux ``--fstab``), so the line is
    read from ``settings.fstab``, the file that was checked.
    """
    mount = settings.commands.mount
    if disk.filesystem is not None:
        argv: tuple[str, ...] = (mount, "-t", disk.filesystem)
        if disk.mount_options:
            argv += ("-o", ",".join(disk.mount_options))
        return argv + (disk.mapped_device, disk.mount_point)
    # Options of our own (browsing: agent.disk.browse) come after the line's, so they win.
    extra = ("--options-mode", "append", "-o", ",".join(disk.mount_options)) if disk.mount_options else ()
    return (mount, "--fstab", settings.fstab, *extra, disk.mount_point)


def umount_argv(disk: Disk, settings: Settings) -> tuple[str, ...]:
    """How to unmount the disk: plain umount, never ``-l`` (lazily, under pending writes)."""
    return (settings.commands.umount, disk.mount_point)


def disk_full(stderr_lines: Iterable[str]) -> bool:
    """rsync's output says the disk ran out of space or inodes (ENOSPC 28) or quota (EDQUOT 122)."""
    return any(_DISK_FULL_RE.search(line) for line in stderr_lines)


def _maps_device(path: str, major: int, minor: int) -> bool:
    """/proc/PID/maps has a mapping of a file on the device (field 4 is "MAJ:MIN" in hex)."""
    with open(path, "rb") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) < 6:
                continue
            device_major, _, device_minor = fields[3].partition(b":")
            try:
                if int(device_major, 16) == major and int(device_minor, 16) == minor:
                    return True
            except ValueError:
                continue
    return False


def _holds(process: str, device: int) -> bool:
    for link in ("cwd", "root", "exe"):
        with contextlib.suppress(OSError):
            if os.stat(f"{process}/{link}").st_dev == device:
                return True
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"{process}/fd"):
            with contextlib.suppress(OSError):
                if os.stat(f"{process}/fd/{fd}").st_dev == device:
                    return True
    with contextlib.suppress(OSError):
        return _maps_device(f"{process}/maps", os.major(device), os.minor(device))
    return False


def holders(mount_point: str) -> list[tuple[int, str]]:
    """Processes using files on the filesystem mounted at ``mount_point``: (pid, command), by pid.

    Looks at each process's working directory, root, executable, open files
    and mapped files, comparing devices (so deleted files count too). What
    cannot be read (a process that ended, another's in a stricter setup) is skipped.
    """
    try:
        device = os.stat(mount_point).st_dev
    except OSError:
        return []
    found: list[tuple[int, str]] = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        process = f"/proc/{name}"
        if not _holds(process, device):
            continue
        try:
            with open(f"{process}/comm", encoding="utf-8", errors="replace") as handle:
                command = handle.read().strip()
        except OSError:
            command = "?"
        found.append((int(name), command))
    return sorted(found)


def _is_mounted_from(entries: Iterable[MountEntry], mount_point: str, device: str) -> bool:
    entry = top_mount(entries, mount_point)
    return entry is not None and entry.from_device(device)


def _check_fstab_line(disk: Disk, settings: Settings, device: str) -> None:
    """In fstab mode the line for the mount point must exist (and name the mapped device, when it names a path)."""
    try:
        with open(settings.fstab, encoding="utf-8", errors="replace") as handle:
            entries = parse_fstab(handle.read())
    except FileNotFoundError:
        entries = []
    except OSError as error:
        raise DiskError(f"cannot read {settings.fstab}: {error.strerror}", step="mount") from None
    entry = fstab_entry_for(entries, disk.mount_point)
    if entry is None:
        raise DiskError(
            f"{settings.fstab} has no line for {disk.mount_point}: add one such as "
            f"`{disk.mapped_device} {disk.mount_point} ext4 noauto,nofail 0 2` (noauto: boot never waits for the disk), "
            f"or set filesystem for disk {disk.name} in the config; nothing was mounted",
            step="mount",
        )
    if entry.device.startswith("/"):
        try:
            named = device_number(os.stat(entry.device).st_rdev)
        except OSError:
            named = None
        if named != device:
            raise DiskError(
                f"{settings.fstab} mounts {entry.device} on {disk.mount_point}, not the backup disk's "
                f"{disk.mapped_device}: correct that line; nothing was mounted",
                step="mount",
            )


def unmount_disk(
    disk: Disk,
    mount_point: str,
    device: str,
    settings: Settings,
    runner: Runner,
    warn: Callable[[str], None],
    *,
    failing: bool,
) -> None:
    """sync, then unmount what this run mounted, retrying while busy; never lazily.

    Still busy: DiskBusyError naming the holders (or, while another error is
    already on its way out, the same message as a warning).
    """
    entries = read_mountinfo()
    if not _is_mounted_from(entries, mount_point, device):
        if mounts_of((entry for entry in entries if normalize(entry.mount_point) == mount_point), device):
            warn(f"something else was mounted over the backup disk on {mount_point}: leaving both mounted")
        else:
            log.info("%s was already unmounted", mount_point)
        return
    try:
        runner.run((settings.commands.sync, "-f", mount_point), step="unmount", check=False)
    except CommandError as error:
        warn(f"sync before unmounting failed: {error.message}")
    argv = umount_argv(disk, settings)
    last: Result | CommandError | None = None
    for delay in (0.0, *UMOUNT_RETRY_DELAYS):
        time.sleep(delay)
        try:
            last = runner.run(argv, step="unmount", check=False, timeout=UMOUNT_TIMEOUT)
        except CommandError as error:
            last = error
        if not _is_mounted_from(read_mountinfo(), mount_point, device):
            log.info("unmounted %s", mount_point)
            return
    busy_by = holders(mount_point)
    tail = last.stderr_tail if last is not None else ()
    below = [entry.mount_point for entry in read_mountinfo() if normalize(entry.mount_point).startswith(mount_point.rstrip("/") + "/")]
    commands = settings.commands
    try:
        method = unlock_method(disk, os.access(commands.cryptdisks_start, os.X_OK), os.access(commands.systemctl, os.X_OK))
    except DiskError:
        method = "cryptdisks"
    _start, stop = unlock_argv(disk, method, commands)
    finish = f"then run `{shlex.join(argv)}` and, to lock it, `{shlex.join(stop)}`"
    problem: DiskError | DiskBusyError
    if busy_by or below or any("busy" in line for line in tail):
        who = [f"pid {pid} ({command})" for pid, command in busy_by]
        who += [f"a filesystem mounted on {point}" for point in below]
        held = "; held by " + ", ".join(who) if who else ""
        problem = DiskBusyError(
            f"cannot unmount {mount_point}: it is busy{held}; the disk is left mounted and unlocked so pending "
            f"writes are safe: close those programs, {finish}",
            step="unmount",
        )
    else:
        detail = f": {tail[-1]}" if tail else ""
        problem = DiskError(
            f"unmounting {mount_point} failed{detail}; the disk is left mounted and unlocked: {finish}",
            step="unmount",
        )
    if failing:
        warn(problem.message)
        return
    raise problem


@contextlib.contextmanager
def mounted(
    disk: Disk, settings: Settings, runner: Runner, warn: Callable[[str], None], keep: Callable[[], bool] | None = None
) -> Iterator[bool]:
    """The mapped device mounted on the disk's mount point; yields whether this run mounted it.

    ``keep``: as for :func:`unlocked`, True leaves it mounted.

    Found mounted from the mapped device: nothing is done now or later.
    Something else mounted there: WrongDiskError, and it is left alone.
    Otherwise mount (directly, or through the fstab line), and check
    mountinfo. On exit, what this run mounted is synced and unmounted; see
    :func:`unmount_disk` for a busy filesystem.
    """
    mount_point = os.path.realpath(disk.mount_point)
    device = mapped_rdev(disk)
    top = top_mount(read_mountinfo(), mount_point)
    if top is not None and top.from_device(device):
        log.info("%s is already mounted on %s: it stays so", disk.mapped_device, mount_point)
        yield False
        return
    if top is not None:
        raise WrongDiskError(
            f"{mount_point} is already mounted from {top.source} ({top.fstype}, device {top.device}), not from "
            f"the backup disk {disk.name} ({disk.mapped_device}, device {device}): left it alone and wrote nothing; "
            "unmount it first, or fix mount_point in the config",
            step="mount",
        )
    argv = mount_argv(disk, settings)
    if runner.dry_run:
        raise DiskError(
            f"the backup disk {disk.name} is not mounted and a dry run changes nothing: it would run "
            f"`{shlex.join(argv)}`; mount it first to preview a backup",
            step="mount",
        )
    if not os.path.isdir(mount_point):
        raise DiskError(
            f"the mount point {mount_point} is not a directory: create it (mkdir -p {mount_point}); nothing was mounted",
            step="mount",
        )
    if disk.filesystem is None:
        _check_fstab_line(disk, settings, device)
    failure: Result | CommandError | None = None
    try:
        result = runner.run(argv, step="mount", check=False, timeout=MOUNT_TIMEOUT)
        if result.kind == "error":
            failure = result
    except CommandError as error:
        failure = error
    top = top_mount(read_mountinfo(), mount_point)
    if failure is not None or top is None or not top.from_device(device):
        if top is not None:
            # Nothing was mounted here before: whatever is there now, this run mounted it.
            unmount_disk(disk, mount_point, top.device, settings, runner, warn, failing=True)
        if isinstance(failure, CommandError):
            raise DiskError(f"mounting {disk.mapped_device} on {mount_point} failed: {failure.message}", step="mount")
        if failure is not None:
            raise DiskError(
                f"mounting {disk.mapped_device} on {mount_point} failed ({failure.meaning}){said_last(failure)}",
                step="mount",
            )
        if top is None:
            raise DiskError(f"mounting reported success but nothing is mounted on {mount_point}", step="mount")
        raise WrongDiskError(
            f"mounting put {top.source} ({top.fstype}, device {top.device}) on {mount_point}, not the backup disk's "
            f"{disk.mapped_device} (device {device}): unmounted it again; correct the mount's configuration",
            step="mount",
        )
    log.info("mounted %s on %s (%s)", disk.mapped_device, mount_point, top.fstype)
    try:
        yield True
    except BaseException:
        unmount_disk(disk, mount_point, device, settings, runner, warn, failing=True)
        raise
    if keep is None or not keep():
        unmount_disk(disk, mount_point, device, settings, runner, warn, failing=False)
