"""The tray icon, following the agent: a :class:`~agent.desktop.state.Listener` with a menu.

Three modules, one job each:

* :mod:`agent.desktop.dbus.traylook`, pure: the icon name and SNI status for
  each agent state, the tooltip's words (progress, or the last backup's time
  and result), the menu's items and which are enabled, and what Eject says;
* :mod:`agent.desktop.dbus.sni`: the D-Bus objects, an
  ``org.kde.StatusNotifierItem`` and its ``com.canonical.dbusmenu`` menu, which
  read what to show from the :class:`Tray` and hand it the clicks;
* this one: :func:`look_at`, the one place that looks at a disk (mount table,
  the mapped device, the repository's ``latest``): the agent runs without
  root, so it looks without root, and closes an open disk only through the
  agent's eject (root, through the sudo rule); and :class:`Tray`, which
  exports the item at :data:`ITEM_PATH` and the menu at :data:`MENU_PATH`
  under the name ``org.kde.StatusNotifierItem-<pid>-<n>``, registers it with
  the StatusNotifierWatcher, and registers again whenever a watcher (re)starts.

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
import time
from dataclasses import dataclass
from typing import Any, Callable, Coroutine, Final, NamedTuple

from dbus_fast import Message, MessageFlag, MessageType, NameFlag, RequestNameReply, Variant
from dbus_fast.aio import MessageBus

from agent.config.model import Disk, Settings
from agent.disk.devices import device_number
from agent.disk.mount import holders, umount_argv
from agent.core.events import CompleteEvent, ProgressEvent
from agent.core.mounts import read_mountinfo
from agent.repository.store import LATEST
from agent.desktop.state import AgentStatus, BrowseReply, Controller, EjectReply, Listener
from agent.desktop.dbus import driver_call, sender
from agent.desktop.dbus.actions import show_folder
from agent.desktop.dbus.bus import call as bus_call
from agent.desktop.dbus.bus import match_rule
from agent.desktop.dbus.notify import APP_NAME, PROGRESS_INTERVAL
from agent.desktop.dbus.texts import NORMAL, Text
from agent.desktop.dbus.sni import ITEM_INTERFACE as ITEM_INTERFACE
from agent.desktop.dbus.sni import ITEM_PATH as ITEM_PATH
from agent.desktop.dbus.sni import MENU_INTERFACE as MENU_INTERFACE
from agent.desktop.dbus.sni import MENU_PATH as MENU_PATH
from agent.desktop.dbus.sni import WATCHER_INTERFACE, WATCHER_NAME, WATCHER_PATH, ItemService, MenuService
from agent.desktop.dbus.traylook import (  # the look, re-exported: callers and tests name it from here
    BACK_UP_NOW,
    BACKUP_BASE,
    BROWSE,
    EJECT,
    EJECT_BASE,
    ICONS,
    OPEN_LATEST,
    QUIT,
    SEPARATOR,
    STATUSES,
    STOP,
    Item,
    Place,
    eject_text,
    icon_name,
    item_status,
    lock_argv,
    menu_items,
    place_of,
    sentence,
    tooltip,
)

log = logging.getLogger(__name__)

OWNER_RULE: Final = match_rule(sender="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                               interface="org.freedesktop.DBus", member="NameOwnerChanged", arg0=WATCHER_NAME)
_NO_OWNER: Final = ("org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner")
LOOK_TIMEOUT: Final = 5.0  # seconds a look at a disk may take (a hung USB disk must not hang the menu)


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
        self._item = ItemService(self)
        self._menu = MenuService(self)
        self._disks = {disk.name: disk for disk in settings.disks}
        self._servers = [remote.name for remote in settings.remotes]  # after the disks in the menu's numbering
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
        reachable = [entry.name for entry in self._status.disks if entry.remote and entry.attached]
        return menu_items(self._status, self._attached, [*self._disks, *self._servers], place, reachable)

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
            elif BACKUP_BASE <= ident < BACKUP_BASE + len(self._disks) + len(self._servers):
                name = [*self._disks, *self._servers][ident - BACKUP_BASE]
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
            await self._say(Text(f"{name} cannot be browsed now", sentence(reply.message), NORMAL), icon="folder-open")
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
    "BACKUP_BASE",
    "BACK_UP_NOW",
    "BROWSE",
    "EJECT",
    "EJECT_BASE",
    "ICONS",
    "ITEM_INTERFACE",
    "ITEM_PATH",
    "MENU_INTERFACE",
    "MENU_PATH",
    "OPEN_LATEST",
    "QUIT",
    "SEPARATOR",
    "STOP",
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
