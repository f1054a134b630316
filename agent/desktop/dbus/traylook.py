"""What the tray shows, pure: its icon, status and tooltip, its menu, and what Eject says.

Values in, values out (the agent's status, where a disk stands, the clock),
tested directly: :mod:`agent.desktop.dbus.tray` follows the agent and looks
at the disks, :mod:`agent.desktop.dbus.sni` puts the result on the bus.
"""

from __future__ import annotations

import os
import posixpath
import shlex
from dataclasses import dataclass
from typing import Callable, Final, Mapping, Sequence

from dbus_fast import Variant

from agent.config.model import Disk, Settings
from agent.disk.devices import top_mount
from agent.disk.unlock import unlock_argv, unlock_method
from agent.core.errors import DiskError
from agent.core.events import ProgressEvent
from agent.core.mounts import MountEntry
from agent.desktop.state import AgentStatus, EjectReply
from agent.desktop.dbus.notify import APP_NAME
from agent.desktop.dbus.texts import NORMAL, Text, age, progress_text, when

#: Icon names of the freedesktop icon naming specification, one per agent state.
ICONS: Final[Mapping[str, str]] = {
    "idle": "drive-removable-media",  # no backup disk attached
    "disk-attached": "drive-harddisk",
    "running": "document-save",
    "failed": "dialog-error",
}
#: The SNI status per agent state: Passive may be hidden by the panel.
STATUSES: Final[Mapping[str, str]] = {
    "idle": "Passive",
    "disk-attached": "Active",
    "running": "Active",
    "failed": "NeedsAttention",
}

# Menu item ids (0 is the root). An attached disk's Eject item is EJECT_BASE + its index in the config.
BACK_UP_NOW, STOP, OPEN_LATEST, EJECT, SEPARATOR, QUIT = 1, 2, 3, 4, 5, 6
BROWSE: Final = 7
EJECT_BASE: Final = 100
#: With several disks attached, "Back up now to NAME" is BACKUP_BASE + the disk's index in the config.
BACKUP_BASE: Final = 200


@dataclass(frozen=True)
class Place:
    """Where a disk stands, as a user without root can see it."""

    unlocked: bool = False  # its mapped device exists
    mounts: tuple[str, ...] = ()  # where the mapped device is mounted
    latest: str | None = None  # the latest snapshot's directory, when it can be opened now
    users: tuple[tuple[int, str], ...] = ()  # processes using the mounted disk (pid, command)

    @property
    def closed(self) -> bool:
        """Locked and not mounted: safe to unplug."""
        return not self.unlocked and not self.mounts


def place_of(
    disk: Disk,
    entries: Sequence[MountEntry],
    mapped_rdev: str | None,
    latest_link: str | None,
    readable: Callable[[str], bool],
) -> Place:
    """Where ``disk`` stands (pure): from the mount table, the mapped device's "major:minor" (None:
    missing) and the target of the repository's ``latest`` link (None: none or unreadable).

    The latest snapshot counts only when the mapped device is what is visible
    at the mount point and ``latest`` names a directory under ``snapshots/``
    that ``readable`` accepts.
    """
    if mapped_rdev is None:
        return Place()
    mounts = tuple(entry.mount_point for entry in entries if entry.from_device(mapped_rdev))
    latest = None
    top = top_mount(entries, disk.mount_point)
    if top is not None and top.from_device(mapped_rdev) and latest_link is not None:
        relative = posixpath.normpath(latest_link)
        parts = relative.split("/")
        if len(parts) == 2 and parts[0] == "snapshots" and parts[1] not in ("", ".", ".."):
            path = posixpath.join(disk.repository, relative)
            if readable(path):
                latest = path
    return Place(unlocked=True, mounts=mounts, latest=latest)


def icon_name(status: AgentStatus) -> str:
    return ICONS.get(status.state, ICONS["idle"])


def item_status(status: AgentStatus) -> str:
    return STATUSES.get(status.state, "Active")


def sentence(text: str) -> str:
    text = text.strip().rstrip(".")
    return f"{text[0].upper()}{text[1:]}." if text else ""


def tooltip(status: AgentStatus, progress: ProgressEvent | None, now: float) -> tuple[str, str]:
    """(title, description): the progress while backing up, else the last backup's time and result."""
    disk = status.disk or "the backup disk"
    if status.state == "running":
        summary, body, _ = progress_text(disk, progress, status.step or "lock")
        return summary, body
    if status.last_success is None:
        last = "No backup yet."
    else:
        last = f"Last backup {age(status.last_success, now)}."
    if status.state == "failed":
        what = sentence(status.last_message) or "The backup failed."
        return f"Backup to {disk} failed", f"{what}\n{last} Earlier snapshots are untouched."
    if status.last_result in ("success", "partial") and status.last_message and status.last_success is not None:
        last = f"Last backup {age(status.last_success, now)}: {status.last_message}."
    last += offsite_words(status, now) + remote_words(status, now)
    if status.state == "disk-attached" and status.skipped:
        return f"{disk} attached", f"{last} A backup is due and waits: {status.skipped}. It starts when that ends."
    if status.state == "disk-attached":
        due = f" Next backup {when(status.next_due, now)}." if status.next_due is not None else ""
        return f"{disk} attached", f"{last}{due}"
    if status.disks and all(entry.remote for entry in status.disks):
        return APP_NAME, last  # servers only: nothing to plug in
    return APP_NAME, f"{last} Plug in the backup disk to back up."


def remote_words(status: AgentStatus, now: float) -> str:
    """The servers in the tooltip, each on its own schedule ("nas: last backup 2 hours ago; waiting for nas (no network).")."""
    words = []
    for entry in status.disks:
        if not entry.remote:
            continue
        last = f"last backup {age(entry.last_success, now)}" if entry.last_success is not None else "no backup yet"
        if entry.waiting:
            then = entry.waiting
        elif entry.skipped:
            then = f"the backup waits: {entry.skipped}"
        elif entry.next_due is not None and status.state != "running":
            then = f"next backup {when(entry.next_due, now)}"
        else:
            then = ""
        words.append(f" {entry.name}: {last}" + (f"; {then}." if then else "."))
    return "".join(words)


def offsite_words(status: AgentStatus, now: float) -> str:
    """The off-site copies in the tooltip: " Copied off-site to cloud 2 hours ago." or why not."""
    words = []
    for record in status.offsite:
        if record.result == "failed":
            words.append(f" Not copied off-site to {record.name}: {sentence(record.message)}")
        elif record.last_copy is not None:
            words.append(f" Copied off-site to {record.name} {age(record.last_copy, now)}.")
        else:
            words.append(f" No off-site copy to {record.name} yet.")
    return "".join(words)


@dataclass(frozen=True)
class Item:
    """One menu entry, as dbusmenu describes it."""

    id: int
    label: str = ""
    enabled: bool = True
    separator: bool = False
    icon: str = ""

    def properties(self) -> dict[str, Variant]:
        if self.separator:
            return {"type": Variant("s", "separator"), "visible": Variant("b", True)}
        values = {
            "label": Variant("s", self.label),
            "enabled": Variant("b", self.enabled),
            "visible": Variant("b", True),
        }
        if self.icon:
            values["icon-name"] = Variant("s", self.icon)
        return values


def menu_items(
    status: AgentStatus, attached: Sequence[str], disks: Sequence[str], place: Place | None,
    servers: Sequence[str] = (),
) -> tuple[Item, ...]:
    """The menu for this state (pure); ``place``: where the status's disk stands, when looked at.

    ``servers``: the reachable remote destinations, named in ``disks`` after the disks: each may be
    backed up now, none is ejected or browsed.
    """
    running = status.state == "running"
    here = [name for name in disks if name in attached and name not in servers]
    targets = here + [name for name in disks if name in servers]
    if running:
        open_label, can_open = "Open latest backup (after this backup)", False
    elif status.disk is None or status.disk not in here:
        open_label, can_open = "Open latest backup (no disk attached)", False
    elif place is None or place.closed:
        open_label, can_open = "Open latest backup (the disk is locked)", False
    elif not place.mounts:
        open_label, can_open = "Open latest backup (the disk is not mounted)", False
    elif place.latest is None:
        open_label, can_open = "Open latest backup (none found on the disk)", False
    else:
        open_label, can_open = "Open latest backup", True
    if len(targets) > 1:  # several disks (or servers): the user says which
        items = [
            Item(BACKUP_BASE + disks.index(name), f"Back up now to {name}", not running, icon="document-save")
            for name in targets
        ]
    else:
        items = [Item(BACK_UP_NOW, "Back up now", bool(targets) and not running, icon="document-save")]
    items += [
        Item(STOP, "Stop the backup", running, icon="process-stop"),
        Item(OPEN_LATEST, open_label, can_open, icon="folder-open"),
    ]
    if here:
        items += [Item(EJECT_BASE + disks.index(name), f"Eject {name}", True, icon="media-eject") for name in here]
    else:
        items.append(Item(EJECT, "Eject (no disk attached)", False, icon="media-eject"))
    # Opens the disk read-only first (backup-agent open through the agent), so it needs no mounted disk.
    items.append(Item(BROWSE, "Browse backups", bool(here) and not running, icon="folder-open"))
    items += [Item(SEPARATOR, separator=True), Item(QUIT, "Quit", True, icon="application-exit")]
    return tuple(items)


def eject_text(
    disk: Disk,
    *,
    backing_up: bool,
    place: Place,
    reply: EjectReply | None,
    unmount: Sequence[str],
    lock: Sequence[str],
) -> Text:
    """What Eject answers (pure): refused while a backup runs; safe to unplug; or why it is still open.

    ``place``: where the disk stands now; ``reply``: how ``backup-agent
    eject`` ended, None when it was not run (a backup runs, or the disk was
    closed already).
    """
    name = disk.name
    if backing_up:
        return Text(
            f"{name} is not ejected: a backup is running",
            "Wait until it finishes: the backup unmounts and locks the disk when it ends. "
            "Or choose Stop: the backup stops, then unmounts and locks the disk. Earlier snapshots are untouched.",
            NORMAL,
        )
    if reply is not None and reply.result == "ejected":
        return Text(f"It is safe to unplug {name}", f"{name} was unmounted and locked.", NORMAL)
    if (reply is None and place.closed) or (reply is not None and reply.result == "already"):
        return Text(f"It is safe to unplug {name}", f"{name} is locked and not mounted.", NORMAL)
    if reply is not None and reply.result == "refused":
        return Text(f"{name} is not ejected", sentence(reply.message), NORMAL)
    if reply is not None and reply.result == "busy":
        return Text(
            f"{name} is still open: do not unplug it yet",
            f"{sentence(reply.message)} Once they are closed, choose Eject again.",
            NORMAL,
        )
    steps = []
    if place.mounts:
        where = ", ".join(place.mounts)
        users = ", ".join(f"{command} (pid {pid})" for pid, command in place.users)
        state = f"{name} is mounted at {where}" + (f" and in use by {users}" if users else "") + "."
        steps.append("sudo " + shlex.join(unmount))
    else:
        state = f"{name} is unlocked ({disk.mapped_device}) but not mounted."
    steps.append("sudo " + shlex.join(lock))
    failed = f" {sentence('ejecting it failed: ' + reply.message)}" if reply is not None else ""
    return Text(
        f"{name} is still open: do not unplug it yet",
        f"{state}{failed} Close what uses it, then run: {' && '.join(steps)}",
        NORMAL,
    )


def lock_argv(disk: Disk, settings: Settings) -> tuple[str, ...]:
    """How the disk is locked again (for the user to type): its unlock method's stop command."""
    try:
        method = unlock_method(
            disk, os.path.exists(settings.commands.cryptdisks_stop), os.path.exists(settings.commands.systemctl)
        )
    except DiskError:
        method = "cryptdisks"
    return unlock_argv(disk, method, settings.commands)[1]


__all__ = [
    "BACKUP_BASE",
    "BACK_UP_NOW",
    "BROWSE",
    "EJECT",
    "EJECT_BASE",
    "ICONS",
    "Item",
    "OPEN_LATEST",
    "Place",
    "QUIT",
    "SEPARATOR",
    "STATUSES",
    "STOP",
    "eject_text",
    "icon_name",
    "item_status",
    "lock_argv",
    "menu_items",
    "place_of",
    "sentence",
    "tooltip",
]
