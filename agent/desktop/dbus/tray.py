"""The tray icon: an ``org.kde.StatusNotifierItem`` with a ``com.canonical.dbusmenu`` menu.

Three parts:

* the look, pure: the icon name and SNI status for each agent state, the
  tooltip's words (progress, or the last backup's time and result), the
  menu's items and which are enabled, and what Eject says;
* :func:`look_at`, the one place that looks at a disk (mount table, the
  mapped device, the repository's ``latest``): the agent runs without root,
  so it looks without root, and closes an open disk only through the
  agent's eject (root, through the sudo rule);
* :class:`Tray`, a :class:`~agent.desktop.state.Listener` that exports the item at
  :data:`ITEM_PATH` and the menu at :data:`MENU_PATH` under the name
  ``org.kde.StatusNotifierItem-<pid>-<n>``, registers it with the
  StatusNotifierWatcher, and registers again whenever a watcher (re)starts.

Without a watcher (plain GNOME) there is no tray and no error: that is
logged once at info level. The tray never blocks or stops a backup: the
listener methods only compute and emit signals, looking at a disk runs in a
thread, and a failure is logged (a bus failure once): a listener method
that raises is logged by the agent's dispatcher, which calls each one guarded.

Menu clicks call the agent's :class:`~agent.desktop.state.Controller` (Back up now,
Stop, and Eject for a disk left open, which the agent closes with
``backup-agent eject`` as root) or ``quit`` (Quit: the agent stops, a
running cycle finishes on its own). Eject and Open latest backup answer with
a notification of their own (org.freedesktop.Notifications, replacing their
previous answer), since a menu click has no other way to answer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import posixpath
import shlex
import time
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Coroutine, Final, Mapping, NamedTuple, Sequence

from dbus_fast import DBusError, ErrorType, Message, MessageFlag, MessageType, NameFlag, RequestNameReply, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import (
    DBusBool,
    DBusInt32,
    DBusObjectPath,
    DBusSignature,
    DBusStr,
    DBusUInt32,
    DBusVariant,
)
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property, dbus_signal

from agent.config.model import Disk, Settings
from agent.disk.devices import device_number, top_mount
from agent.disk.mount import holders, umount_argv
from agent.disk.unlock import unlock_argv, unlock_method
from agent.core.errors import DiskError
from agent.core.events import CompleteEvent, ProgressEvent
from agent.core.mounts import MountEntry, read_mountinfo
from agent.repository.store import LATEST
from agent.desktop.state import AgentStatus, BrowseReply, Controller, EjectReply, Listener
from agent.desktop.dbus import driver_call, sender
from agent.desktop.dbus.actions import show_folder
from agent.desktop.dbus.bus import call as bus_call
from agent.desktop.dbus.bus import match_rule
from agent.desktop.dbus.notify import APP_NAME, PROGRESS_INTERVAL
from agent.desktop.dbus.texts import NORMAL, Text, age, progress_text, when

log = logging.getLogger(__name__)

ITEM_PATH: Final = "/StatusNotifierItem"
MENU_PATH: Final = "/MenuBar"
ITEM_INTERFACE: Final = "org.kde.StatusNotifierItem"
MENU_INTERFACE: Final = "com.canonical.dbusmenu"
WATCHER_NAME: Final = "org.kde.StatusNotifierWatcher"
WATCHER_PATH: Final = "/StatusNotifierWatcher"
WATCHER_INTERFACE: Final = "org.kde.StatusNotifierWatcher"
ITEM_ID: Final = "backup-agent"
OWNER_RULE: Final = match_rule(sender="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                               interface="org.freedesktop.DBus", member="NameOwnerChanged", arg0=WATCHER_NAME)
_NO_OWNER: Final = ("org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner")

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

LOOK_TIMEOUT: Final = 5.0  # seconds a look at a disk may take (a hung USB disk must not hang the menu)

# Menu item ids (0 is the root). An attached disk's Eject item is EJECT_BASE + its index in the config.
BACK_UP_NOW, STOP, OPEN_LATEST, EJECT, SEPARATOR, QUIT = 1, 2, 3, 4, 5, 6
BROWSE: Final = 7
EJECT_BASE: Final = 100
#: With several disks attached, "Back up now to NAME" is BACKUP_BASE + the disk's index in the config.
BACKUP_BASE: Final = 200


# -- the look (pure) ---------------------------------------------------------------------------


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
    mounts = tuple(entry.mount_point for entry in entries if entry.device == mapped_rdev)
    latest = None
    top = top_mount(entries, disk.mount_point)
    if top is not None and top.device == mapped_rdev and latest_link is not None:
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


def _sentence(text: str) -> str:
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
        what = _sentence(status.last_message) or "The backup failed."
        return f"Backup to {disk} failed", f"{what}\n{last} Earlier snapshots are untouched."
    if status.last_result in ("success", "partial") and status.last_message and status.last_success is not None:
        last = f"Last backup {age(status.last_success, now)}: {status.last_message}."
    if status.state == "disk-attached":
        due = f" Next backup {when(status.next_due, now)}." if status.next_due is not None else ""
        return f"{disk} attached", f"{last}{due}"
    return APP_NAME, f"{last} Plug in the backup disk to back up."


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
    status: AgentStatus, attached: Sequence[str], disks: Sequence[str], place: Place | None
) -> tuple[Item, ...]:
    """The menu for this state (pure); ``place``: where the status's disk stands, when looked at."""
    running = status.state == "running"
    here = [name for name in disks if name in attached]
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
    if len(here) > 1:  # several disks: the user says which
        items = [
            Item(BACKUP_BASE + disks.index(name), f"Back up now to {name}", not running, icon="document-save")
            for name in here
        ]
    else:
        items = [Item(BACK_UP_NOW, "Back up now", bool(here) and not running, icon="document-save")]
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
        return Text(f"{name} is not ejected", _sentence(reply.message), NORMAL)
    if reply is not None and reply.result == "busy":
        return Text(
            f"{name} is still open: do not unplug it yet",
            f"{_sentence(reply.message)} Once they are closed, choose Eject again.",
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
    failed = f" {_sentence('ejecting it failed: ' + reply.message)}" if reply is not None else ""
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


# -- looking at a disk (I/O) -----------------------------------------------------------------


def look_at(disk: Disk, *, users: bool = False) -> Place:
    """Where ``disk`` stands now; ``users``: also which processes use it when mounted."""
    try:
        rdev: str | None = device_number(os.stat(disk.mapped_device).st_rdev)
    except OSError:
        rdev = None
    if rdev is None:
        return Place()
    entries = read_mountinfo()
    try:
        latest_link: str | None = os.readlink(os.path.join(disk.repository, LATEST))
    except OSError:
        latest_link = None
    place = place_of(
        disk, entries, rdev, latest_link, lambda path: os.path.isdir(path) and os.access(path, os.R_OK | os.X_OK)
    )
    if users and place.mounts:
        found = {user for point in place.mounts for user in holders(point)}
        place = Place(place.unlocked, place.mounts, place.latest, tuple(sorted(found)))
    return place


# -- D-Bus objects ---------------------------------------------------------------------------

_Nothing = Annotated[None, DBusSignature("")]  # a method or signal without a value
_ToolTip = Annotated[tuple[str, list[Any], str, str], DBusSignature("(sa(iiay)ss)")]
_Pixmaps = Annotated[list[Any], DBusSignature("a(iiay)")]
_Layout = Annotated[tuple[int, list[Any]], DBusSignature("u(ia{sv}av)")]
_Group = Annotated[list[Any], DBusSignature("a(ia{sv})")]


class _Item(ServiceInterface):
    """org.kde.StatusNotifierItem: what the panel shows; the values come from the Tray."""

    def __init__(self, tray: "Tray") -> None:
        super().__init__(ITEM_INTERFACE)
        self._tray = tray

    @dbus_property(access=PropertyAccess.READ, name="Category")
    def _category(self) -> DBusStr:
        return "ApplicationStatus"

    @dbus_property(access=PropertyAccess.READ, name="Id")
    def _id(self) -> DBusStr:
        return ITEM_ID

    @dbus_property(access=PropertyAccess.READ, name="Title")
    def _title(self) -> DBusStr:
        return APP_NAME

    @dbus_property(access=PropertyAccess.READ, name="Status")
    def _status(self) -> DBusStr:
        return self._tray.item_status

    @dbus_property(access=PropertyAccess.READ, name="WindowId")
    def _window_id(self) -> DBusInt32:
        return 0

    @dbus_property(access=PropertyAccess.READ, name="IconName")
    def _icon_name(self) -> DBusStr:
        return self._tray.icon_name

    @dbus_property(access=PropertyAccess.READ, name="IconPixmap")
    def _icon_pixmap(self) -> _Pixmaps:
        return []

    @dbus_property(access=PropertyAccess.READ, name="OverlayIconName")
    def _overlay_icon_name(self) -> DBusStr:
        return ""

    @dbus_property(access=PropertyAccess.READ, name="OverlayIconPixmap")
    def _overlay_icon_pixmap(self) -> _Pixmaps:
        return []

    @dbus_property(access=PropertyAccess.READ, name="AttentionIconName")
    def _attention_icon_name(self) -> DBusStr:
        return ICONS["failed"]

    @dbus_property(access=PropertyAccess.READ, name="AttentionIconPixmap")
    def _attention_icon_pixmap(self) -> _Pixmaps:
        return []

    @dbus_property(access=PropertyAccess.READ, name="AttentionMovieName")
    def _attention_movie_name(self) -> DBusStr:
        return ""

    @dbus_property(access=PropertyAccess.READ, name="IconThemePath")
    def _icon_theme_path(self) -> DBusStr:
        return ""

    @dbus_property(access=PropertyAccess.READ, name="ToolTip")
    def _tooltip(self) -> _ToolTip:
        title, text = self._tray.tooltip
        return (self._tray.icon_name, [], title, text)

    @dbus_property(access=PropertyAccess.READ, name="ItemIsMenu")
    def _item_is_menu(self) -> DBusBool:
        return True

    @dbus_property(access=PropertyAccess.READ, name="Menu")
    def _menu(self) -> DBusObjectPath:
        return MENU_PATH

    # A click shows the menu (ItemIsMenu); these exist for hosts that call them anyway.

    @dbus_method(name="Activate")
    def _activate(self, x: DBusInt32, y: DBusInt32) -> _Nothing:
        return None

    @dbus_method(name="SecondaryActivate")
    def _secondary_activate(self, x: DBusInt32, y: DBusInt32) -> _Nothing:
        return None

    @dbus_method(name="ContextMenu")
    def _context_menu(self, x: DBusInt32, y: DBusInt32) -> _Nothing:
        return None

    @dbus_method(name="Scroll")
    def _scroll(self, delta: DBusInt32, orientation: DBusStr) -> _Nothing:
        return None

    @dbus_signal(name="NewIcon")
    def new_icon(self) -> _Nothing:
        return None

    @dbus_signal(name="NewAttentionIcon")
    def new_attention_icon(self) -> _Nothing:
        return None

    @dbus_signal(name="NewToolTip")
    def new_tooltip(self) -> _Nothing:
        return None

    @dbus_signal(name="NewTitle")
    def new_title(self) -> _Nothing:
        return None

    @dbus_signal(name="NewStatus")
    def new_status(self, status: str) -> DBusStr:
        return status


class _Menu(ServiceInterface):
    """com.canonical.dbusmenu (version 3): one flat menu below the root item 0."""

    def __init__(self, tray: "Tray") -> None:
        super().__init__(MENU_INTERFACE)
        self._tray = tray

    @dbus_property(access=PropertyAccess.READ, name="Version")
    def _version(self) -> DBusUInt32:
        return 3

    @dbus_property(access=PropertyAccess.READ, name="TextDirection")
    def _text_direction(self) -> DBusStr:
        return "ltr"

    @dbus_property(access=PropertyAccess.READ, name="Status")
    def _status(self) -> DBusStr:
        return "notice" if self._tray.item_status == "NeedsAttention" else "normal"

    @dbus_property(access=PropertyAccess.READ, name="IconThemePath")
    def _icon_theme_path(self) -> Annotated[list[str], DBusSignature("as")]:
        return []

    @dbus_method(name="GetLayout")
    def _get_layout(
        self, parent_id: DBusInt32, recursion_depth: DBusInt32, property_names: Annotated[list[str], DBusSignature("as")]
    ) -> _Layout:
        items = self._tray.items
        names = set(property_names)

        def pick(values: dict[str, Variant]) -> dict[str, Variant]:
            return {key: value for key, value in values.items() if not names or key in names}

        if parent_id == 0:
            children = (
                [Variant("(ia{sv}av)", [item.id, pick(item.properties()), []]) for item in items]
                if recursion_depth != 0
                else []
            )
            return self._tray.revision, [0, pick(self._root_properties()), children]
        item = self._find(parent_id)
        return self._tray.revision, [item.id, pick(item.properties()), []]

    @dbus_method(name="GetGroupProperties")
    def _get_group_properties(
        self, ids: Annotated[list[int], DBusSignature("ai")], property_names: Annotated[list[str], DBusSignature("as")]
    ) -> _Group:
        # The dbusmenu spec: an empty list asks for every item, the root (0)
        # included; a host (libdbusmenu-glib) asks for the root's properties too.
        names = set(property_names)
        wanted = set(ids)
        every = [(0, self._root_properties())] + [(item.id, item.properties()) for item in self._tray.items]
        return [
            [ident, {key: value for key, value in values.items() if not names or key in names}]
            for ident, values in every
            if not wanted or ident in wanted
        ]

    @staticmethod
    def _root_properties() -> dict[str, Variant]:
        """The root item 0: the menu itself, whose children show as a submenu."""
        return {"children-display": Variant("s", "submenu")}

    @dbus_method(name="GetProperty")
    def _get_property(self, ident: DBusInt32, name: DBusStr) -> DBusVariant:
        values = self._root_properties() if ident == 0 else self._find(ident).properties()
        if name not in values:
            raise DBusError(ErrorType.INVALID_ARGS, f"menu item {ident} has no property {name!r}")
        return values[name]

    @dbus_method(name="Event")
    def _event(self, ident: DBusInt32, event_id: DBusStr, data: DBusVariant, timestamp: DBusUInt32) -> _Nothing:
        self._find(ident)
        self._tray.menu_event(ident, event_id)

    @dbus_method(name="EventGroup")
    def _event_group(self, events: Annotated[list[Any], DBusSignature("a(isvu)")]) -> Annotated[list[int], DBusSignature("ai")]:
        known = {item.id for item in self._tray.items}
        errors = [int(event[0]) for event in events if int(event[0]) not in known]
        for event in events:
            if int(event[0]) in known:
                self._tray.menu_event(int(event[0]), str(event[1]))
        return errors

    @dbus_method(name="AboutToShow")
    async def _about_to_show(self, ident: DBusInt32) -> DBusBool:
        return await self._tray.about_to_show()

    @dbus_method(name="AboutToShowGroup")
    async def _about_to_show_group(
        self, ids: Annotated[list[int], DBusSignature("ai")]
    ) -> Annotated[tuple[list[int], list[int]], DBusSignature("aiai")]:
        known = {0} | {item.id for item in self._tray.items}
        changed = await self._tray.about_to_show()
        return ([0] if changed else []), [ident for ident in ids if ident not in known]

    @dbus_signal(name="ItemsPropertiesUpdated")
    def items_properties_updated(
        self, updated: list[Any], removed: list[Any]
    ) -> Annotated[tuple[list[Any], list[Any]], DBusSignature("a(ia{sv})a(ias)")]:
        return updated, removed

    @dbus_signal(name="LayoutUpdated")
    def layout_updated(self, revision: int, parent: int) -> Annotated[tuple[int, int], DBusSignature("ui")]:
        return revision, parent

    def _find(self, ident: int) -> Item:
        for item in self._tray.items:
            if item.id == ident:
                return item
        raise DBusError(ErrorType.INVALID_ARGS, f"no menu item {ident}")


# -- the tray ---------------------------------------------------------------------------------


class _Shown(NamedTuple):
    icon: str
    status: str
    tooltip: tuple[str, str]


@dataclass
class _Said:
    """The tray's own answer notification (Eject, Open latest backup), replaced by the next one."""

    ident: int = 0
    warned: bool = False
    capabilities: set[str] | None = None  # the server's, asked before the first answer
    disk: str | None = None  # the disk an Eject answer says is safe to unplug


class Tray:
    """The tray icon and its menu on ``bus``, following the agent as a Listener."""

    def __init__(
        self,
        bus: MessageBus,
        controller: Controller,
        settings: Settings,
        quit: Callable[[], None],
        *,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], float] = time.time,
        min_interval: float = PROGRESS_INTERVAL,
    ) -> None:
        self.bus = bus
        self.controller = controller
        self.settings = settings
        self.quit = quit
        self.clock = clock
        self.now = now
        self.min_interval = min_interval
        self.name: str | None = None  # the well-known name, once owned
        self.registered = False  # a watcher accepted the item
        self._item = _Item(self)
        self._menu = _Menu(self)
        self._disks = {disk.name: disk for disk in settings.disks}
        self._status = AgentStatus()
        self._progress: ProgressEvent | None = None
        self._attached: list[str] = []
        self._places: dict[str, Place] = {}
        self._revision = 1
        self._shown_revision = 1  # the revision the last AboutToShow answered for
        self._tooltip_at: float | None = None
        self._said = _Said()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._no_watcher_logged = False
        self._warned = False
        self._closed = False
        self._handler_added = False
        try:
            self._status = controller.status()
        except Exception:
            log.exception("tray: the agent's status could not be read")
        self._items = self._menu_now()
        self._shown = self._look_now()

    # -- what the D-Bus objects read ----------------------------------------------------

    @property
    def icon_name(self) -> str:
        return icon_name(self._status)

    @property
    def item_status(self) -> str:
        return item_status(self._status)

    @property
    def tooltip(self) -> tuple[str, str]:
        return tooltip(self._status, self._progress, self.now())

    @property
    def items(self) -> tuple[Item, ...]:
        return self._items

    @property
    def revision(self) -> int:
        return self._revision

    # -- starting and stopping -----------------------------------------------------------

    async def open(self) -> None:
        """Export the item and the menu, own a name, follow the watcher, and register."""
        self.bus.export(ITEM_PATH, self._item)
        self.bus.export(MENU_PATH, self._menu)
        pid = os.getpid()
        for number in range(1, 100):
            candidate = f"org.kde.StatusNotifierItem-{pid}-{number}"
            reply = await self.bus.request_name(candidate, NameFlag.DO_NOT_QUEUE)
            if reply in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
                self.name = candidate
                break
        if self.name is None:
            raise RuntimeError("no free org.kde.StatusNotifierItem-<pid>-<n> name on the session bus")
        self.bus.add_message_handler(self._on_message)
        self._handler_added = True
        reply_message = await self._call(
            "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "AddMatch", "s", [OWNER_RULE]
        )
        if reply_message.message_type is MessageType.ERROR:
            log.warning("tray: the session bus refused to say when a tray host starts (%s)", reply_message.body)
        await self.register()

    def close(self) -> None:
        """Take the icon away: unexport, give the name back."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        if self._handler_added:
            self.bus.remove_message_handler(self._on_message)
        if not self.bus.connected:
            return
        self.bus.unexport(ITEM_PATH, self._item)
        self.bus.unexport(MENU_PATH, self._menu)
        if self.name is not None:
            self.bus.send(driver_call("ReleaseName", "s", [self.name], no_reply=True))

    async def register(self) -> bool:
        """RegisterStatusNotifierItem with the watcher; False (logged once) when there is none."""
        if self.name is None or self._closed:
            return False
        try:
            reply = await self._call(
                WATCHER_NAME, WATCHER_PATH, WATCHER_INTERFACE, "RegisterStatusNotifierItem", "s", [self.name],
                flags=MessageFlag.NO_AUTOSTART,
            )
        except Exception as exc:
            self._failed("registering the tray icon", exc)
            return False
        if reply.message_type is MessageType.ERROR:
            self.registered = False
            if reply.error_name in _NO_OWNER:
                if not self._no_watcher_logged:
                    self._no_watcher_logged = True
                    log.info(
                        "no tray on this desktop (nothing owns %s on the session bus): no tray icon; "
                        "it appears when a tray host starts",
                        WATCHER_NAME,
                    )
                return False
            self._failed("registering the tray icon", RuntimeError(f"{reply.error_name}: {reply.body}"))
            return False
        self.registered = True
        self._no_watcher_logged = False
        log.info("tray icon registered as %s", self.name)
        return True

    async def settle(self) -> None:
        """Wait for what menu clicks and looks started (tests, shutdown).

        The finished tasks are dropped here, not left to their done-callbacks: from Python
        3.12 awaiting a gather of tasks that are already done does not yield to the loop,
        so those callbacks would never run and this would spin. The loop goes on while the
        awaited tasks start new ones.
        """
        while self._tasks:
            started = list(self._tasks)
            await asyncio.gather(*started, return_exceptions=True)
            self._tasks.difference_update(started)

    # -- Listener -----------------------------------------------------------------------

    def status_changed(self, status: AgentStatus) -> None:
        self._status = status
        if status.state != "running":
            self._progress = None
        if status.state == "idle":
            self._attached.clear()
        elif status.state == "disk-attached" and status.disk is not None and status.disk not in self._attached:
            self._attached.append(status.disk)
        self._publish()
        if status.state != "running" and status.disk in self._attached:
            self._start(self._refresh_place(status.disk))

    def disk_attached(self, disk: str) -> None:
        if disk not in self._attached:
            self._attached.append(disk)
        self._publish()

    def disk_removed(self, disk: str, during_backup: bool) -> None:
        if disk in self._attached:
            self._attached.remove(disk)
        self._places.pop(disk, None)
        self._publish()
        self._withdraw_said(disk)  # "safe to unplug" is done with once it is unplugged

    def disk_opened(self, disk: str) -> None:
        self._withdraw_said(disk)  # "safe to unplug" is untrue while it is open for browsing

    def backup_started(self, disk: str, reason: str) -> None:
        self._progress = None
        self._places.pop(disk, None)  # what was open may be closed by the cycle's end
        self._withdraw_said(disk)  # "safe to unplug" is untrue while it is backed up

    def progress(self, event: ProgressEvent) -> None:
        self._progress = event
        now = self.clock()
        if self._tooltip_at is not None and now - self._tooltip_at < self.min_interval:
            return
        self._publish()

    def backup_completed(self, event: CompleteEvent) -> None:
        return None  # the status change that follows says it

    def backup_failed(self, step: str | None, message: str, exit_code: int | None = None) -> None:
        return None  # the status change that follows says it

    # -- keeping the panel up to date -----------------------------------------------------

    def _look_now(self) -> _Shown:
        return _Shown(self.icon_name, self.item_status, self.tooltip)

    def _menu_now(self) -> tuple[Item, ...]:
        place = self._places.get(self._status.disk) if self._status.disk is not None else None
        return menu_items(self._status, self._attached, list(self._disks), place)

    def _publish(self) -> bool:
        """Emit the signals for what changed since the last time; True when the menu changed."""
        shown, before = self._look_now(), self._shown
        self._shown = shown
        if shown.icon != before.icon:
            self._item.new_icon()
        if shown.status != before.status:
            self._item.new_status(shown.status)
        if shown.tooltip != before.tooltip:
            self._item.new_tooltip()
            self._tooltip_at = self.clock()
        return self._publish_menu()

    def _publish_menu(self) -> bool:
        items, before = self._menu_now(), self._items
        if items == before:
            return False
        self._items = items
        self._revision += 1
        if [item.id for item in items] != [item.id for item in before]:
            self._menu.layout_updated(self._revision, 0)
        else:
            old = {item.id: item for item in before}
            changed = [[item.id, item.properties()] for item in items if old.get(item.id) != item]
            self._menu.items_properties_updated(changed, [])
        return True

    async def about_to_show(self) -> bool:
        """The menu opens: look at the disk again (it may have been opened or closed by hand).

        True when the menu changed since it was last shown or asked for.
        """
        disk = self._status.disk
        if disk is not None and disk in self._attached and self._status.state != "running":
            await self._refresh_place(disk)
        self._publish_menu()
        changed = self._revision != self._shown_revision
        self._shown_revision = self._revision
        return changed

    async def _refresh_place(self, name: str) -> None:
        place = await self._look(name)
        if place is not None and name in self._attached:
            self._places[name] = place
            self._publish_menu()

    async def _look(self, name: str, *, users: bool = False) -> Place | None:
        disk = self._disks.get(name)
        if disk is None:
            return None
        try:
            return await asyncio.wait_for(asyncio.to_thread(look_at, disk, users=users), LOOK_TIMEOUT)
        except Exception as exc:
            self._failed(f"looking at {name}", exc)
            return None

    # -- menu clicks ----------------------------------------------------------------------

    def menu_event(self, ident: int, event: str) -> None:
        """A menu event from the host; only "clicked" does something."""
        if event != "clicked" or self._closed:
            return
        try:
            if ident == BACK_UP_NOW:
                log.info("tray: Back up now: %s", self.controller.backup_now())
            elif ident == STOP:
                log.info("tray: Stop: %s", self.controller.stop())
            elif ident == OPEN_LATEST:
                self._start(self._open_latest())
            elif ident == BROWSE:
                self._start(self._browse())
            elif BACKUP_BASE <= ident < BACKUP_BASE + len(self._disks):
                name = list(self._disks)[ident - BACKUP_BASE]
                log.info("tray: Back up now to %s: %s", name, self.controller.backup_now(name))
            elif ident >= EJECT_BASE:
                names = list(self._disks)
                if ident - EJECT_BASE < len(names):
                    self._start(self._eject(names[ident - EJECT_BASE]))
            elif ident == QUIT:
                log.info("tray: Quit: the agent stops")
                self.quit()
        except Exception:
            log.exception("tray: menu item %d failed", ident)

    def _start(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            coroutine.close()
            log.debug("tray: no event loop running; nothing done")
            return
        task = loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _eject(self, name: str) -> None:
        disk = self._disks[name]
        backing_up = self._status.state == "running" and self._status.disk == name
        place = Place() if backing_up else await self._look(name, users=True)
        if place is None:
            await self._say(Text(f"{name}: cannot tell whether it is safe to unplug",
                                 "Looking at the disk failed; the log says why. Do not unplug it yet.", NORMAL))
            return
        reply = None
        if not backing_up:
            # The agent ejects it as root (a closed disk answers "already"), and keeps it
            # closed from then on: no scheduled backup opens it, also after a restart.
            try:
                reply = await self.controller.eject(name)
            except Exception:
                log.exception("tray: ejecting %s failed", name)
                reply = EjectReply("failed", "the agent could not run the eject; its log says why")
            place = await self._look(name, users=True) or place
        if not backing_up:
            self._places[name] = place
            self._publish_menu()
        text = eject_text(disk, backing_up=backing_up, place=place, reply=reply,
                          unmount=umount_argv(disk, self.settings), lock=lock_argv(disk, self.settings))
        log.info("tray: Eject %s: %s", name, text.summary)
        await self._say(text, icon="media-eject", disk=name)

    async def _open_latest(self) -> None:
        name = self._status.disk
        place = None
        if name is not None and self._status.state != "running":
            place = await self._look(name)
        if name is None or place is None or place.latest is None:
            await self._say(Text("The latest backup cannot be opened now",
                                 "Its disk is locked or not attached, or a backup is running.", NORMAL))
            return
        self._places[name] = place
        self._publish_menu()
        log.info("tray: opening %s", place.latest)
        problem = await show_folder(place.latest)
        if problem is not None:
            await self._say(Text("The latest backup could not be opened", f"{problem} The backup is {place.latest}.",
                                 NORMAL))

    async def _browse(self) -> None:
        """Browse backups: the agent opens the disk read-only (backup-agent open), then its snapshots folder is shown."""
        here = [name for name in self._disks if name in self._attached]
        name = self._status.disk if self._status.disk in here else (here[0] if here else None)
        if name is None or self._status.state == "running":
            await self._say(Text("The backups cannot be browsed now", "No backup disk is attached, or a backup is running.",
                                 NORMAL), icon="folder-open")
            return
        try:
            reply = await self.controller.browse(name)
        except Exception:
            log.exception("tray: opening %s for browsing failed", name)
            reply = BrowseReply("failed", "the agent could not open the disk; its log says why")
        if not reply.open or reply.snapshots is None:
            await self._say(Text(f"{name} cannot be browsed now", _sentence(reply.message), NORMAL), icon="folder-open")
            return
        await self._refresh_place(name)
        problem = await show_folder(reply.snapshots)
        if problem is not None:
            await self._say(Text(f"{name} is open, but its backups could not be shown",
                                 f"{problem} They are in {reply.snapshots}.", NORMAL), icon="folder-open")
            return
        log.info("tray: Browse backups: %s opened read-only at %s", name, reply.snapshots)
        await self._say(Text(f"Browsing the backups on {name}",
                             "They are read-only: copy what you need back out. The disk closes again after 15 minutes "
                             "unused, or choose Eject.", NORMAL), icon="folder-open")

    async def _say(self, text: Text, *, icon: str = "drive-harddisk", disk: str | None = None) -> None:
        """One notification that answers a click, replacing the previous answer (``disk``: an Eject's)."""
        summary, body, urgency = text
        hints = {"urgency": Variant("y", urgency), "category": Variant("s", "device")}
        try:
            if self._said.capabilities is None:
                self._said.capabilities = await sender.capabilities(self.bus)
            self._said.ident = await sender.notify(
                self.bus, app_name=APP_NAME, replaces=self._said.ident, icon=icon, summary=summary, body=body,
                actions=(), hints=hints, expire=-1, server_can=self._said.capabilities,
            )
            self._said.disk = disk
        except Exception as exc:
            self._said.capabilities = None  # ask again next time: the server may be a new one
            if not self._said.warned:
                self._said.warned = True
                log.warning("tray: cannot show the answer as a notification (%s): %s. %s", exc, summary, body)
            else:
                log.info("tray: %s. %s", summary, body)

    def _withdraw_said(self, disk: str) -> None:
        """Close the Eject answer about ``disk``, if it is the one shown: what it says is stale."""
        if self._closed or self._said.disk != disk or not self._said.ident:
            return
        ident, self._said.ident, self._said.disk = self._said.ident, 0, None
        self._start(self._close_said(ident))

    async def _close_said(self, ident: int) -> None:
        try:
            await sender.close(self.bus, ident)
        except Exception as exc:  # gone already, or the server went away: nothing stale is left to close
            log.info("tray: could not withdraw notification %d: %s", ident, exc)

    # -- the bus -------------------------------------------------------------------------

    async def _call(self, destination: str, path: str, interface: str, member: str, signature: str,
                    body: list[Any], flags: MessageFlag = MessageFlag.NONE) -> Message:
        return await bus_call(self.bus, destination, path, interface, member, signature, body, flags=flags)

    def _on_message(self, message: Message) -> bool:
        if (
            message.message_type is not MessageType.SIGNAL
            or message.member != "NameOwnerChanged"
            or message.interface != "org.freedesktop.DBus"
            or self._closed
        ):
            return False
        try:
            name, _old, new = (str(part) for part in message.body)
            if name == WATCHER_NAME:
                if new:
                    log.info("a tray host started (%s): registering the tray icon", WATCHER_NAME)
                    self._start(self.register())
                else:
                    self.registered = False
        except Exception:
            log.exception("tray: a NameOwnerChanged signal could not be handled")
        return False

    def _failed(self, what: str, exc: BaseException) -> None:
        if self._warned:
            log.debug("tray: %s failed: %s", what, exc)
            return
        self._warned = True
        log.warning("tray: %s failed (%s); backups go on without it", what, exc or type(exc).__name__)


def _listener(tray: Tray) -> Listener:
    return tray  # mypy checks here that Tray is a Listener


async def start(
    bus: MessageBus | None,
    controller: Controller,
    settings: Settings,
    quit: Callable[[], None],
    *,
    clock: Callable[[], float] = time.monotonic,
    now: Callable[[], float] = time.time,
    min_interval: float = PROGRESS_INTERVAL,
) -> Tray | None:
    """A :class:`Tray` on ``bus`` (the session bus), registered when a watcher runs; None without a bus.

    Nothing raises: a tray that cannot be set up is logged and the agent goes on without it.
    """
    if bus is None:
        log.info("no session bus: no tray icon")
        return None
    tray = Tray(bus, controller, settings, quit, clock=clock, now=now, min_interval=min_interval)
    try:
        await tray.open()
    except Exception as exc:
        log.warning("cannot show the tray icon (%s); backups go on without it", exc)
        tray.close()
        return None
    return tray


__all__ = [
    "ICONS",
    "ITEM_PATH",
    "MENU_PATH",
    "Item",
    "Place",
    "STATUSES",
    "Tray",
    "eject_text",
    "icon_name",
    "item_status",
    "look_at",
    "lock_argv",
    "menu_items",
    "place_of",
    "start",
    "tooltip",
]
