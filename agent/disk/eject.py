"""Eject: close a backup disk now (sync, unmount, lock), whoever opened it.

A backup cycle closes what it opened itself. A disk can still be left open:
the user unlocked and mounted it to browse snapshots, or a cycle could not
unmount it because a program kept it busy. ``backup-agent eject --disk NAME``
closes it, as root, under the machine lock (so no cycle opens the disk
meanwhile, and eject never closes a disk under a running backup), with the
cycle's own unmount and lock (:func:`agent.disk.mount.unmount_disk` syncs
first, retries while busy, names the holders and never unmounts lazily;
:func:`agent.disk.unlock.lock_disk` never locks under a mount).

:func:`plan_eject` is pure: the mount table and the mapped device in, the
steps out, or a refusal of anything eject must not touch (another filesystem
at the mount point, the disk also mounted elsewhere). :func:`eject` does it
and reports each step as the cycle does (:mod:`agent.core.events`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

from agent.disk.passphrase import close_argv
from agent.disk import devices, mount, unlock
from agent.core import lock
from agent.core.commands import Runner
from agent.config.model import Disk, Settings
from agent.core.errors import BackupAgentError, BusyError, DiskBusyError, DiskError, LockFileError, WrongDiskError
from agent.core.events import Emitter, complete, error, step, warning
from agent.core.mounts import MountEntry, read_mountinfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EjectPlan:
    """What closing the disk takes: unmount its mount point, lock its mapped device, or neither."""

    unmount: bool
    lock: bool

    @property
    def closed(self) -> bool:
        """Nothing to do: already safe to unplug."""
        return not self.unmount and not self.lock


def plan_eject(disk: Disk, entries: Sequence[MountEntry], mapped_rdev: str | None) -> EjectPlan:
    """The steps that close ``disk`` (pure); ``mapped_rdev`` is None when its mapped device does not exist.

    ``disk.mount_point`` must be the real path. Refuses, before anything is
    touched: a filesystem at the mount point that is not the mapped device
    (WrongDiskError; it could be the backup disk under another name, so
    "safe to unplug" would be a guess), and the mapped device mounted
    anywhere else (DiskBusyError: eject unmounts only the disk's own mount
    point, and a filesystem is never locked under a mount).
    """
    mount_point = disk.mount_point
    top = devices.top_mount(entries, mount_point)
    if top is not None and (mapped_rdev is None or not top.from_device(mapped_rdev)):
        raise WrongDiskError(
            f"{mount_point} is mounted from {top.source} ({top.fstype}, device {top.device}), not from the backup "
            f"disk {disk.name} ({disk.mapped_device}): nothing was unmounted or locked; unmount it yourself, "
            "or fix mount_point or mapped_device in the config"
        )
    if mapped_rdev is None:
        return EjectPlan(unmount=False, lock=False)
    elsewhere = sorted(
        {entry.mount_point for entry in entries if entry.from_device(mapped_rdev) and entry.mount_point != mount_point}
    )
    if elsewhere:
        where = ", ".join(elsewhere)
        raise DiskBusyError(
            f"{disk.mapped_device} is also mounted on {where}: nothing was unmounted or locked; "
            f"unmount it there (umount {elsewhere[0]}), then eject {disk.name} again"
        )
    return EjectPlan(unmount=top is not None, lock=True)


def _lock_refusal(holder: dict[str, Any], disk: Disk) -> BusyError:
    """The one line for a machine lock held by someone else, naming them (``holder``: what they wrote)."""
    who = lock.holder_details(holder)
    if holder.get("command") == "eject":
        return BusyError(f"an eject is already running ({who}): wait for it", step="lock", holder=holder)
    if holder.get("command") == "init":
        return BusyError(
            f"backup-agent init is running ({who}): wait for it, then eject {disk.name} again", step="lock", holder=holder
        )
    detail = f" ({who})" if who else ""
    return BusyError(
        f"a backup is running: wait for it or stop it, then eject {disk.name} again{detail}", step="lock", holder=holder
    )


class Eject:
    """One eject of one disk; each step is announced on ``emitter``, as the cycle announces its own."""

    def __init__(self, disk: Disk, settings: Settings, emitter: Emitter, runner: Runner) -> None:
        self.disk = dataclasses.replace(disk, mount_point=os.path.realpath(disk.mount_point))
        self.settings = settings
        self.emitter = emitter
        self.runner = runner
        self.warnings: list[str] = []
        self._current: str | None = None

    def run(self) -> bool:
        """Close the disk; True when it was open and is closed now, False when it was closed already.

        Raises BackupAgentError (after an ``error`` event) when it refuses or
        a step fails; what it had not reached is left as it was.
        """
        try:
            with contextlib.ExitStack() as stack:
                self._lock_machine(stack)
                plan, device = self._look()
                stop = self._stop_argv() if plan.lock else ()
                if plan.unmount and device is not None:
                    self._unmount(device)
                else:
                    self.emitter.emit(step("unmount", "skipped", reason="not mounted"))
                if plan.lock and device is not None:
                    self._lock(stop, device)
                else:
                    self.emitter.emit(step("lock-disk", "skipped", reason="already locked"))
                self.emitter.emit(complete(None, disk=self.disk.name, already_closed=plan.closed))
                return not plan.closed
        except OSError as exc:
            failure = DiskError(f"{exc.filename or 'the mount table'}: {exc.strerror}", step=self._current)
            self._report(failure)
            raise failure from exc
        except BackupAgentError as exc:
            self._report(exc)
            raise

    def _report(self, failure: BackupAgentError) -> None:
        # Eject never writes to a repository: every snapshot is untouched.
        self.emitter.emit(error(failure.step, failure.message, failure.exit_code, True))

    def _warn(self, message: str) -> None:
        log.warning("%s", message)
        self.warnings.append(message)
        self.emitter.emit(warning(self._current or "eject", message))

    def _start(self, name: str, **detail: object) -> None:
        self._current = name
        self.emitter.emit(step(name, "start", **detail))

    def _lock_machine(self, stack: contextlib.ExitStack) -> None:
        self._start("lock")
        path = lock.machine_lock_path()
        holder = {
            "pid": os.getpid(),
            "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": "eject",
            "disk": self.disk.name,
        }
        try:
            stack.enter_context(lock.hold(path, holder))
        except LockFileError:
            raise  # not held by anyone: its own words say what is wrong
        except BusyError as exc:
            raise _lock_refusal(exc.holder, self.disk) from None
        self.emitter.emit(step("lock", "done"))

    def _look(self) -> tuple[EjectPlan, str | None]:
        """Where the disk stands, and the plan; the mapped device's "major:minor" (None: locked)."""
        disk = self.disk
        self._start("disk", disk=disk.name)
        device = devices.mapped_rdev(disk, step="disk") if os.path.exists(disk.mapped_device) else None
        plan = plan_eject(disk, read_mountinfo(), device)
        self.emitter.emit(step("disk", "done", unlocked=device is not None, mounted=plan.unmount))
        return plan, device

    def _stop_argv(self) -> tuple[str, ...]:
        """The lock command of the disk's unlock method, as the cycle picks it (before anything is touched).

        A disk whose crypttab line has no key file is closed with ``cryptsetup
        close NAME``, as the cycle that opened it with a passphrase does.
        """
        commands = self.settings.commands
        entry = unlock.passphrase_entry(self.disk, self.settings)
        if entry is not None:
            return close_argv(entry, commands)
        try:
            method = unlock.unlock_method(
                self.disk, os.access(commands.cryptdisks_start, os.X_OK), os.access(commands.systemctl, os.X_OK)
            )
        except DiskError as exc:
            exc.step = "lock-disk"
            raise
        return unlock.unlock_argv(self.disk, method, commands)[1]

    def _unmount(self, device: str) -> None:
        self._start("unmount", mount_point=self.disk.mount_point)
        mount.unmount_disk(self.disk, self.disk.mount_point, device, self.settings, self.runner, self._warn, failing=False)
        self.emitter.emit(step("unmount", "done"))

    def _lock(self, stop: tuple[str, ...], device: str) -> None:
        disk = self.disk
        self._start("lock-disk", disk=disk.name)
        before = len(self.warnings)
        unlock.lock_disk(disk, stop, device, self.runner, self._warn, why="ejecting it")
        if os.path.exists(disk.mapped_device):
            said = self.warnings[before:]
            raise DiskError(
                said[-1] if said else f"{disk.mapped_device} still exists after locking {disk.name}: it is still unlocked",
                step="lock-disk",
            )
        self.emitter.emit(step("lock-disk", "done"))
