"""The tray icon (agent/desktop/dbus/tray.py): the look, pure; the item and its menu on a real, private bus.

The look (icon, status, tooltip, menu items, what Eject says, where a disk
stands) is pure and tested directly. The Tray is tested on a private
dbus-daemon (``private_bus`` from test_dbus_control) with two stand-ins at
the process boundary: :class:`Watcher`, a StatusNotifierWatcher that records
the items registered with it (as KDE's or XFCE's panel does), and
test_notify's RecordingServer for the notifications that answer Eject and
Open latest backup. A host connection reads the item's properties and the
menu, records the signals, and clicks menu items with ``Event`` as a panel
does.

The Tray is fed the listener calls a real cycle produces (in the order
agent.desktop.daemon makes them, as tests/test_daemon.py records them), and in the
last test it follows a real Agent doing real cycles on the bench of
tests/test_disk_cycle.py (root, loop devices, udev). ``xdg-open`` there is a
stand-in on PATH that records its argv (a process boundary).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Iterator

import pytest
from dbus_fast import Message, MessageType, NameFlag, RequestNameReply, Variant, unpack_variants
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusBool, DBusInt32, DBusSignature, DBusStr
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property, dbus_signal

from agent.core import events
from agent.policy import schedule
from agent.config.load import load_settings
from agent.config.model import Commands, Disk, Settings
from agent.desktop.daemon import Agent, AgentOptions
from agent.desktop.dbus import tray
from agent.desktop.dbus.notify import NORMAL, Text
from agent.desktop.dbus.tray import (
    BACK_UP_NOW,
    BACKUP_BASE,
    BROWSE,
    EJECT,
    EJECT_BASE,
    ITEM_INTERFACE,
    ITEM_PATH,
    MENU_INTERFACE,
    MENU_PATH,
    OPEN_LATEST,
    QUIT,
    SEPARATOR,
    STOP,
    Item,
    Place,
)
from agent.core.mounts import MountEntry
from agent.desktop.state import AgentStatus, EjectReply
from tests.test_daemon import cycle_argv, eject_argv, here, real, until  # noqa: F401  (here: fixture)
from tests.test_dbus_control import PrivateBus, captured, run
from tests.test_disk import NAME, _run, rig  # noqa: F401  (rig: fixture)
from tests.test_disk_cycle import Bench, bench  # noqa: F401  (fixture)
from tests.test_notify import FakeClock, FakeController, serve as serve_notifications
from tests.test_notify import session_bus  # noqa: F401  (fixture)
from tests.test_udev import udevd  # noqa: F401  (fixture)

NOW = 1763812800.0  # 2025-11-22 12:00:00 UTC
SNAPSHOT = "2025-11-22T11-00-00+0000"


def disk(name: str = "backup1", root: str = "/nonexistent-ba") -> Disk:
    return Disk(
        name=name, luks_uuid="0" * 8 + "-0000-0000-0000-" + "0" * 12, mount_point=f"{root}/mnt/{name}",
        mapped_device=f"{root}/mapper/{name}", repository=f"{root}/mnt/{name}/host",
    )


SETTINGS = Settings(path=None, disks=(disk("backup1"), disk("backup2")))


# -- the look (pure) -----------------------------------------------------------------------------


def test_each_state_has_its_icon_and_status() -> None:
    looks = {
        state: (tray.icon_name(AgentStatus(state=state)), tray.item_status(AgentStatus(state=state)))
        for state in ("idle", "disk-attached", "running", "failed")
    }
    assert looks == {
        "idle": ("drive-removable-media", "Passive"),
        "disk-attached": ("drive-harddisk", "Active"),
        "running": ("document-save", "Active"),
        "failed": ("dialog-error", "NeedsAttention"),
    }


def test_the_tooltip_shows_the_progress_or_the_last_backup() -> None:
    running = AgentStatus(state="running", disk="backup1", step="transfer", last_success=NOW - 7200)
    event = events.progress(42, 1048576, 12, None, 240)
    assert tray.tooltip(running, event, NOW) == (
        "Backing up to backup1: 42%", "About 4 minutes left: copying files (12 files, 1.0 MiB so far)."
    )
    assert tray.tooltip(AgentStatus(state="running", disk="backup1", step="unlock"), None, NOW) == (
        "Backing up to backup1", "Working out the time left: unlocking the disk."
    )
    attached = AgentStatus(state="disk-attached", disk="backup1", last_success=NOW - 7200, last_result="success",
                           last_message=f"snapshot {SNAPSHOT}", next_due=NOW + 86400)
    title, text = tray.tooltip(attached, None, NOW)
    assert title == "backup1 attached"
    assert text.startswith(f"Last backup 2 hours ago: snapshot {SNAPSHOT}. Next backup tomorrow at ")
    failed = AgentStatus(state="failed", disk="backup1", last_success=NOW - 3 * 86400, last_result="failure",
                         last_message="cannot unlock the disk: wrong key")
    assert tray.tooltip(failed, None, NOW) == (
        "Backup to backup1 failed",
        "Cannot unlock the disk: wrong key.\nLast backup 3 days ago. Earlier snapshots are untouched.",
    )
    assert tray.tooltip(AgentStatus(), None, NOW) == ("Backups", "No backup yet. Plug in the backup disk to back up.")


def labels(items: tuple[Item, ...]) -> list[tuple[int, str, bool]]:
    return [(item.id, "-" if item.separator else item.label, item.enabled) for item in items]


def test_the_menu_enables_what_the_state_allows() -> None:
    names = ["backup1", "backup2"]
    idle = tray.menu_items(AgentStatus(), [], names, None)
    assert labels(idle) == [
        (BACK_UP_NOW, "Back up now", False),
        (STOP, "Stop the backup", False),
        (OPEN_LATEST, "Open latest backup (no disk attached)", False),
        (EJECT, "Eject (no disk attached)", False),
        (BROWSE, "Browse backups", False),
        (SEPARATOR, "-", True),
        (QUIT, "Quit", True),
    ]
    attached = AgentStatus(state="disk-attached", disk="backup2")
    locked = tray.menu_items(attached, ["backup2"], names, Place())
    assert labels(locked)[:4] == [
        (BACK_UP_NOW, "Back up now", True),
        (STOP, "Stop the backup", False),
        (OPEN_LATEST, "Open latest backup (the disk is locked)", False),
        (EJECT_BASE + 1, "Eject backup2", True),
    ]
    running = tray.menu_items(AgentStatus(state="running", disk="backup2"), ["backup2"], names, None)
    assert labels(running)[:4] == [
        (BACK_UP_NOW, "Back up now", False),
        (STOP, "Stop the backup", True),
        (OPEN_LATEST, "Open latest backup (after this backup)", False),
        (EJECT_BASE + 1, "Eject backup2", True),
    ]
    open_ = Place(unlocked=True, mounts=("/mnt/backup2",), latest="/mnt/backup2/host/snapshots/S")
    assert labels(tray.menu_items(attached, ["backup2"], names, open_))[2] == (OPEN_LATEST, "Open latest backup", True)
    unmounted = Place(unlocked=True)
    assert labels(tray.menu_items(attached, ["backup2"], names, unmounted))[2][1:] == (
        "Open latest backup (the disk is not mounted)", False)
    # a failed backup with the disk still attached: Back up now again
    # (two disks attached: the user says which one "Back up now" is for)
    failed = tray.menu_items(AgentStatus(state="failed", disk="backup1"), ["backup1", "backup2"], names, None)
    assert labels(failed)[:2] == [
        (BACKUP_BASE, "Back up now to backup1", True),
        (BACKUP_BASE + 1, "Back up now to backup2", True),
    ]
    assert [item.id for item in failed][4:6] == [EJECT_BASE, EJECT_BASE + 1]
    both_running = tray.menu_items(AgentStatus(state="running", disk="backup1"), ["backup1", "backup2"], names, None)
    assert [enabled for _, _, enabled in labels(both_running)[:2]] == [False, False]
    # Browse backups: while a disk is attached and no backup runs (it opens the disk itself)
    assert labels(failed)[6] == (BROWSE, "Browse backups", True)
    assert labels(locked)[4] == (BROWSE, "Browse backups", True)
    assert labels(running)[4] == (BROWSE, "Browse backups", False)


def test_where_a_disk_stands() -> None:
    one = disk("backup1", "/x")
    mapped = "254:3"
    at = [MountEntry("/", "ext4", "/dev/sda1", "8:1"), MountEntry("/x/mnt/backup1", "ext4", "/dev/mapper/backup1", mapped)]

    def readable(path: str) -> bool:
        return path == "/x/mnt/backup1/host/snapshots/S1"

    assert tray.place_of(one, at, None, None, readable) == Place()  # no mapped device: locked
    assert tray.place_of(one, at[:1], mapped, None, readable) == Place(unlocked=True)
    assert tray.place_of(one, at, mapped, "snapshots/S1", readable) == Place(
        True, ("/x/mnt/backup1",), "/x/mnt/backup1/host/snapshots/S1"
    )
    # only a link to a snapshot counts, and only where the disk is visible at its mount point
    for link in ("snapshots/../../etc", "/etc", "snapshots", "snapshots/S2"):
        assert tray.place_of(one, at, mapped, link, readable).latest is None
    covered = [*at, MountEntry("/x/mnt/backup1", "tmpfs", "tmpfs", "0:50")]
    assert tray.place_of(one, covered, mapped, "snapshots/S1", readable) == Place(True, ("/x/mnt/backup1",), None)
    assert Place().closed and not Place(unlocked=True).closed


def test_what_eject_says() -> None:
    one = disk("backup1", "/x")
    umount, lock = ("/bin/umount", "/x/mnt/backup1"), ("/sbin/cryptdisks_stop", "backup1")

    def says(place: Place, reply: EjectReply | None = None, backing_up: bool = False) -> Text:
        return tray.eject_text(one, backing_up=backing_up, place=place, reply=reply, unmount=umount, lock=lock)

    refused = says(Place(), backing_up=True)
    assert refused.summary == "backup1 is not ejected: a backup is running"
    assert "Or choose Stop" in refused.body and "Earlier snapshots are untouched." in refused.body
    safe = Text("It is safe to unplug backup1", "backup1 is locked and not mounted.", NORMAL)
    assert says(Place()) == safe  # closed already: eject was not even run
    assert says(Place(), EjectReply("already", "backup1 is locked and not mounted: already safe to unplug")) == safe
    assert says(Place(), EjectReply("ejected", "backup1 is unmounted and locked: safe to unplug")) == Text(
        "It is safe to unplug backup1", "backup1 was unmounted and locked.", NORMAL
    )
    mounted = Place(True, ("/x/mnt/backup1",), None, ((4242, "nautilus"),))
    busy = says(mounted, EjectReply("busy", "cannot unmount /x/mnt/backup1: it is busy; held by pid 4242 (nautilus); "
                                            "the disk is left mounted and unlocked"))
    assert busy == Text(
        "backup1 is still open: do not unplug it yet",
        "Cannot unmount /x/mnt/backup1: it is busy; held by pid 4242 (nautilus); the disk is left mounted and "
        "unlocked. Once they are closed, choose Eject again.",
        NORMAL,
    )
    other = says(mounted, EjectReply("refused", "a backup is running: wait for it or stop it, then eject backup1 again"))
    assert other == Text("backup1 is not ejected", "A backup is running: wait for it or stop it, then eject backup1 again.",
                         NORMAL)
    # it failed (the sudo rule predates eject, say): what is open, why, and how to close it by hand
    failed = says(mounted, EjectReply("failed", "the sudo rule does not allow ejecting yet"))
    assert failed.summary == "backup1 is still open: do not unplug it yet"
    assert failed.body == (
        "backup1 is mounted at /x/mnt/backup1 and in use by nautilus (pid 4242). Ejecting it failed: the sudo rule "
        "does not allow ejecting yet. Close what uses it, then run: sudo /bin/umount /x/mnt/backup1 && "
        "sudo /sbin/cryptdisks_stop backup1"
    )
    unlocked = says(Place(unlocked=True), EjectReply("failed", "locking backup1 failed"))
    assert unlocked.body.startswith("backup1 is unlocked (/x/mapper/backup1) but not mounted. Ejecting it failed")
    assert unlocked.body.endswith("run: sudo /sbin/cryptdisks_stop backup1")


def test_the_readme_names_the_icons_and_menu_items() -> None:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = text.split("### The tray icon", 1)[1].split("\n## ", 1)[0]
    for state, icon in tray.ICONS.items():
        assert f"`{icon}` | {tray.STATUSES[state]}" in section, (state, icon)
    for item in tray.menu_items(AgentStatus(state="disk-attached", disk="d"), ["d"], ["d"], Place()):
        if not item.separator:
            label = item.label.split(" (")[0].replace("Eject d", "Eject *disk*")
            assert f"| {label} |" in section, label


def test_the_lock_command_follows_the_unlock_method(tmp_path: Path) -> None:
    systemctl = tmp_path / "systemctl"
    systemctl.write_text("")
    commands = Commands(cryptdisks_stop=str(tmp_path / "missing"), systemctl=str(systemctl))
    settings = Settings(path=None, commands=commands)
    assert tray.lock_argv(disk("backup1"), settings) == (str(systemctl), "stop", "systemd-cryptsetup@backup1.service")
    (tmp_path / "missing").write_text("")
    assert tray.lock_argv(disk("backup1"), settings) == (str(tmp_path / "missing"), "backup1")


# -- stand-ins and a host on a private bus ------------------------------------------------------------


class Watcher(ServiceInterface):
    """A StatusNotifierWatcher that records what registers with it."""

    def __init__(self) -> None:
        super().__init__("org.kde.StatusNotifierWatcher")
        self.items: list[str] = []

    @dbus_method(name="RegisterStatusNotifierItem")
    def _register_item(self, service: DBusStr) -> Annotated[None, DBusSignature("")]:
        self.items.append(service)
        self._registered(service)

    @dbus_method(name="RegisterStatusNotifierHost")
    def _register_host(self, service: DBusStr) -> Annotated[None, DBusSignature("")]:
        return None

    @dbus_property(access=PropertyAccess.READ, name="RegisteredStatusNotifierItems")
    def _registered_items(self) -> Annotated[list[str], DBusSignature("as")]:
        return self.items

    @dbus_property(access=PropertyAccess.READ, name="IsStatusNotifierHostRegistered")
    def _host_registered(self) -> DBusBool:
        return True

    @dbus_property(access=PropertyAccess.READ, name="ProtocolVersion")
    def _protocol_version(self) -> DBusInt32:
        return 0

    @dbus_signal(name="StatusNotifierItemRegistered")
    def _registered(self, service: str) -> DBusStr:
        return service


async def start_watcher(address: str) -> tuple[MessageBus, Watcher]:
    bus = await MessageBus(bus_address=address).connect()
    watcher = Watcher()
    bus.export("/StatusNotifierWatcher", watcher)
    assert await bus.request_name("org.kde.StatusNotifierWatcher", NameFlag.DO_NOT_QUEUE) is RequestNameReply.PRIMARY_OWNER
    return bus, watcher


class Host:
    """The panel's side: reads properties and the menu, records the signals, clicks."""

    def __init__(self, bus: MessageBus, name: str) -> None:
        self.bus = bus
        self.name = name
        self.signals: list[tuple[str, list[Any]]] = []
        bus.add_message_handler(self._record)

    def _record(self, message: Message) -> bool:
        if message.message_type is MessageType.SIGNAL and message.path in (ITEM_PATH, MENU_PATH):
            self.signals.append((str(message.member), list(message.body)))
        return False

    @classmethod
    async def connect(cls, address: str, name: str) -> "Host":
        host = cls(await MessageBus(bus_address=address).connect(), name)
        for path in (ITEM_PATH, MENU_PATH):
            await host.call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "AddMatch", "s",
                            [f"type='signal',path='{path}'"])
        return host

    async def call(self, destination: str, path: str, interface: str, member: str, signature: str,
                   body: list[Any]) -> list[Any]:
        reply = await self.bus.call(Message(destination=destination, path=path, interface=interface, member=member,
                                            signature=signature, body=body))
        assert reply is not None
        assert reply.message_type is MessageType.METHOD_RETURN, (member, reply.error_name, reply.body)
        return list(reply.body)

    async def properties(self, path: str = ITEM_PATH, interface: str = ITEM_INTERFACE) -> dict[str, Any]:
        body = await self.call(self.name, path, "org.freedesktop.DBus.Properties", "GetAll", "s", [interface])
        values: dict[str, Any] = unpack_variants(body[0])
        return values

    async def layout(self) -> tuple[int, list[tuple[int, dict[str, Any]]]]:
        revision, (root, _props, children) = await self.call(self.name, MENU_PATH, MENU_INTERFACE, "GetLayout",
                                                             "iias", [0, -1, []])
        assert root == 0
        return revision, [(child.value[0], unpack_variants(child.value[1])) for child in children]

    async def menu(self) -> list[tuple[int, str, bool]]:
        _, items = await self.layout()
        return [(ident, props.get("label", "-"), props.get("enabled", True)) for ident, props in items]

    async def click(self, ident: int) -> None:
        await self.call(self.name, MENU_PATH, MENU_INTERFACE, "Event", "isvu", [ident, "clicked", Variant("s", ""), 0])

    async def about_to_show(self) -> bool:
        return bool((await self.call(self.name, MENU_PATH, MENU_INTERFACE, "AboutToShow", "i", [0]))[0])

    def count(self, member: str) -> int:
        return sum(1 for name, _ in self.signals if name == member)

    async def quiet(self) -> None:
        """Every signal sent so far has arrived (one round trip to the bus after them)."""
        await self.call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "GetId", "", [])
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def tray_on(address: str, settings: Settings = SETTINGS, controller: Any = None,
                  clock: Any = None) -> AsyncIterator[tuple[tray.Tray, Host, list[str]]]:
    """A Tray on its own connection (as the agent's), a host, and the record of Quit."""
    bus = await MessageBus(bus_address=address).connect()
    quits: list[str] = []
    icon = await tray.start(bus, controller or FakeController(), settings, lambda: quits.append("quit"),
                            clock=clock or FakeClock(), now=lambda: NOW, min_interval=5.0)
    assert icon is not None and icon.name is not None
    host = await Host.connect(address, icon.name)
    try:
        yield icon, host, quits
    finally:
        icon.close()
        host.bus.disconnect()
        bus.disconnect()


ATTACHED = AgentStatus(state="disk-attached", disk="backup1", last_success=NOW - 7200, last_result="success",
                       last_message=f"snapshot {SNAPSHOT}", next_due=NOW + 1800)


def running(step: str | None) -> AgentStatus:
    return AgentStatus(**{**ATTACHED.as_dict(), "state": "running", "step": step, "next_due": None})


# -- on the bus ------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_registers_and_shows_each_state_of_a_cycle(session_bus: PrivateBus) -> None:
    async def scenario() -> None:
        watcher_bus, watcher = await start_watcher(session_bus.address)
        clock = FakeClock()
        async with tray_on(session_bus.address, clock=clock) as (icon, host, _):
            assert icon.registered and watcher.items == [icon.name]
            assert icon.name == f"org.kde.StatusNotifierItem-{os.getpid()}-1"
            shown = await host.properties()
            assert {key: shown[key] for key in ("Category", "Id", "Title", "Status", "IconName", "ItemIsMenu", "Menu")} == {
                "Category": "ApplicationStatus", "Id": "backup-agent", "Title": "Backups", "Status": "Passive",
                "IconName": "drive-removable-media", "ItemIsMenu": True, "Menu": MENU_PATH,
            }
            assert shown["ToolTip"] == ("drive-removable-media", [], "Backups",
                                        "No backup yet. Plug in the backup disk to back up.")
            menu = await host.properties(MENU_PATH, MENU_INTERFACE)
            assert (menu["Version"], menu["TextDirection"], menu["Status"]) == (3, "ltr", "normal")

            # the calls a real cycle makes (agent.desktop.daemon's order): plug-in, start, steps, progress, end
            icon.disk_attached("backup1")
            icon.status_changed(ATTACHED)
            await host.quiet()
            assert (await host.properties())["IconName"] == "drive-harddisk"
            assert host.count("NewIcon") == 1 and ("NewStatus", ["Active"]) in host.signals
            assert host.count("LayoutUpdated") == 1  # the Eject item of backup1 came
            icon.backup_started("backup1", "plugged in, due")
            for step in (None, "lock", "unlock", "mount", "transfer"):
                icon.status_changed(running(step))
            await host.quiet()
            tooltips = host.count("NewToolTip")
            for at, percent in ((1.0, 10), (4.9, 20), (6.0, 30), (7.0, 40), (11.5, 50)):
                clock.now = at
                icon.progress(events.progress(percent, 1000, 1, None, 90))
            await host.quiet()
            # at most one tooltip update every 5 s of the clock (the last step's came at 0 s): 30%, 50%
            assert host.count("NewToolTip") - tooltips == 2
            shown = await host.properties()
            assert (shown["IconName"], shown["Status"]) == ("document-save", "Active")
            assert shown["ToolTip"][2:] == ("Backing up to backup1: 50%",
                                            "About 2 minutes left: copying files (1 file, 1000 B so far).")
            assert [(ident, enabled) for ident, _, enabled in await host.menu()][:4] == [
                (BACK_UP_NOW, False), (STOP, True), (OPEN_LATEST, False), (EJECT_BASE, True)]
            updated = [body for name, body in host.signals if name == "ItemsPropertiesUpdated"]
            assert updated and {ident for ident, _ in updated[-1][0]} == {BACK_UP_NOW, STOP, OPEN_LATEST, BROWSE}

            icon.backup_completed(events.complete("S2"))
            icon.status_changed(running("lock-disk"))
            done = AgentStatus(**{**ATTACHED.as_dict(), "last_success": NOW - 30, "last_message": "snapshot S2"})
            icon.status_changed(done)
            await icon.settle()
            await host.quiet()
            shown = await host.properties()
            assert (shown["IconName"], shown["Status"]) == ("drive-harddisk", "Active")
            assert shown["ToolTip"][2] == "backup1 attached"
            assert shown["ToolTip"][3].startswith("Last backup just now: snapshot S2. Next backup at ")
            assert await host.menu() == [
                (BACK_UP_NOW, "Back up now", True), (STOP, "Stop the backup", False),
                (OPEN_LATEST, "Open latest backup (the disk is locked)", False), (EJECT_BASE, "Eject backup1", True),
                (BROWSE, "Browse backups", True), (SEPARATOR, "-", True), (QUIT, "Quit", True),
            ]

            # a failure: the attention status and icon; the menu's status says so too
            icon.status_changed(AgentStatus(**{**done.as_dict(), "state": "failed", "last_result": "failure",
                                               "last_message": "the disk was removed"}))
            await host.quiet()
            assert host.signals[-1][0] != "NewStatus" or host.signals[-1][1] == ["NeedsAttention"]
            assert ("NewStatus", ["NeedsAttention"]) in host.signals
            shown = await host.properties()
            assert (shown["IconName"], shown["Status"]) == ("dialog-error", "NeedsAttention")
            assert (await host.properties(MENU_PATH, MENU_INTERFACE))["Status"] == "notice"
            icon.disk_removed("backup1", during_backup=False)
            await host.quiet()
            assert (await host.menu())[3] == (EJECT, "Eject (no disk attached)", False)
            assert host.count("LayoutUpdated") == 2
        watcher_bus.disconnect()

    run(scenario())


@pytest.mark.integration
def test_registers_again_when_the_watcher_restarts(session_bus: PrivateBus) -> None:
    async def scenario() -> None:
        watcher_bus, watcher = await start_watcher(session_bus.address)
        async with tray_on(session_bus.address) as (icon, _host, _):
            assert watcher.items == [icon.name]
            watcher_bus.disconnect()  # the panel goes away
            await until(lambda: not icon.registered, "the tray to notice the watcher is gone", 3)
            again_bus, again = await start_watcher(session_bus.address)  # and comes back
            await until(lambda: again.items == [icon.name], "the item to register with the new watcher", 3)
            assert icon.registered
            again_bus.disconnect()

    run(scenario())


@pytest.mark.integration
def test_close_gives_the_name_back_on_the_bus_it_was_given(session_bus: PrivateBus) -> None:
    async def scenario() -> None:
        async with tray_on(session_bus.address) as (icon, host, _):
            bus_driver = ("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus")
            assert await host.call(*bus_driver, "NameHasOwner", "s", [icon.name]) == [True]
            icon.close()
            icon.close()  # idempotent
            assert icon.bus.connected  # the agent's connection: not the tray's to close
            # ReleaseName is sent without waiting; a round trip on the same connection follows it
            await icon.bus.call(Message(destination=bus_driver[0], path=bus_driver[1], interface=bus_driver[2],
                                        member="GetId"))
            assert await host.call(*bus_driver, "NameHasOwner", "s", [icon.name]) == [False]

    run(scenario())


@pytest.mark.integration
def test_no_watcher_is_no_tray_and_no_error(session_bus: PrivateBus) -> None:
    async def scenario() -> None:
        with captured("agent.desktop.dbus.tray") as records:
            async with tray_on(session_bus.address) as (icon, host, _):
                assert not icon.registered
                assert await icon.register() is False  # asked again: still none, not logged again
                icon.disk_attached("backup1")
                icon.status_changed(ATTACHED)
                await host.quiet()
                assert (await host.properties())["IconName"] == "drive-harddisk"  # kept up to date all the same
                watcher_bus, watcher = await start_watcher(session_bus.address)  # a panel starts later
                await until(lambda: watcher.items == [icon.name], "the late registration", 3)
                watcher_bus.disconnect()
        said = [r.getMessage() for r in records if r.levelno >= logging.INFO]
        assert sum("no tray on this desktop" in line for line in said) == 1
        assert not [r for r in records if r.levelno >= logging.WARNING]

    run(scenario())


@dataclasses.dataclass
class RefusingController(FakeController):
    """Its eject is refused with words a markup reader would take for a tag and an entity."""

    async def eject(self, disk: str) -> EjectReply:
        self.calls.append(f"eject {disk}")
        return EjectReply("refused", "backup-agent open holds /media/<me>/Tom & Jerry")


@pytest.mark.integration
def test_the_tray_s_answers_are_escaped_where_the_server_reads_markup(session_bus: PrivateBus, tmp_path: Path) -> None:
    """The tray's Notify went out unescaped while the notifier's was escaped: one sender now escapes both."""
    settings = Settings(path=None, disks=(disk("backup1", str(tmp_path)),))

    async def scenario() -> None:
        server_bus, server = await serve_notifications(session_bus.address, ["body", "body-markup"])
        async with tray_on(session_bus.address, settings, RefusingController()) as (icon, host, _):
            icon.disk_attached("backup1")
            icon.status_changed(ATTACHED)
            await icon.settle()
            await host.click(EJECT_BASE)
            await icon.settle()
            assert (server.shown[-1].summary, server.shown[-1].body) == (
                "backup1 is not ejected", "Backup-agent open holds /media/&lt;me&gt;/Tom &amp; Jerry.")
        server_bus.disconnect()

    run(scenario())


@pytest.mark.integration
def test_menu_clicks(session_bus: PrivateBus, tmp_path: Path) -> None:
    one = disk("backup1", str(tmp_path))  # its mapped device does not exist: locked
    settings = Settings(path=None, disks=(one,))

    async def scenario() -> None:
        server_bus, server = await serve_notifications(session_bus.address, ["body"])
        controller = FakeController()
        async with tray_on(session_bus.address, settings, controller) as (icon, host, quits):
            icon.disk_attached("backup1")
            icon.status_changed(ATTACHED)
            await icon.settle()
            assert await host.about_to_show() is True  # the layout changed since the host last asked
            assert await host.about_to_show() is False
            await host.click(BACK_UP_NOW)
            icon.backup_started("backup1", "asked")
            icon.status_changed(running("transfer"))
            await host.click(STOP)
            assert controller.calls == ["backup_now", "stop"]

            await host.click(EJECT_BASE)  # while backing up: refused, with the reason
            await icon.settle()
            assert server.shown[-1].summary == "backup1 is not ejected: a backup is running"

            icon.status_changed(ATTACHED)
            await host.click(EJECT_BASE)
            await icon.settle()
            assert (server.shown[-1].summary, server.shown[-1].body) == (
                "It is safe to unplug backup1", "backup1 is locked and not mounted.")
            assert server.shown[-1].replaces_id == server.shown[0].id  # one answer, replaced

            await host.click(OPEN_LATEST)  # disabled, but a host may send it anyway: answered
            await icon.settle()
            assert server.shown[-1].summary == "The latest backup cannot be opened now"

            await host.click(QUIT)
            assert quits == ["quit"]
            assert controller.calls == ["backup_now", "stop", "eject backup1"]  # closed: the agent keeps it so
            reply = await host.bus.call(Message(destination=icon.name, path=MENU_PATH, interface=MENU_INTERFACE,
                                                member="Event", signature="isvu",
                                                body=[77, "clicked", Variant("s", ""), 0]))
            assert reply is not None and reply.error_name == "org.freedesktop.DBus.Error.InvalidArgs"
            group = await host.call(host.name, MENU_PATH, MENU_INTERFACE, "GetGroupProperties", "aias",
                                    [[STOP, 77], ["label"]])
            assert unpack_variants(group[0]) == [(STOP, {"label": "Stop the backup"})]
            value = await host.call(host.name, MENU_PATH, MENU_INTERFACE, "GetProperty", "is", [STOP, "enabled"])
            assert value[0].value is False
            # The root item 0 answers too, as the dbusmenu spec has it (libdbusmenu-glib asks for it).
            root = await host.call(host.name, MENU_PATH, MENU_INTERFACE, "GetGroupProperties", "aias", [[0], []])
            assert unpack_variants(root[0]) == [(0, {"children-display": "submenu"})]
            every = await host.call(host.name, MENU_PATH, MENU_INTERFACE, "GetGroupProperties", "aias", [[], ["label"]])
            assert [ident for ident, _ in unpack_variants(every[0])][:2] == [0, BACK_UP_NOW]
            value = await host.call(host.name, MENU_PATH, MENU_INTERFACE, "GetProperty", "is", [0, "children-display"])
            assert value[0].value == "submenu"
            errors = await host.call(host.name, MENU_PATH, MENU_INTERFACE, "EventGroup", "a(isvu)",
                                     [[[BACK_UP_NOW, "clicked", Variant("s", ""), 0], [78, "clicked", Variant("s", ""), 0]]])
            assert errors == [[78]] and controller.calls[-1] == "backup_now"
        server_bus.disconnect()

    run(scenario())


@pytest.mark.integration
def test_the_eject_answer_is_withdrawn_once_untrue(session_bus: PrivateBus, tmp_path: Path) -> None:
    """"It is safe to unplug" is untrue once a backup of that disk starts or it is opened for browsing, and done
    with once it is unplugged."""
    settings = Settings(path=None, disks=(disk("backup1", str(tmp_path)), disk("backup2", str(tmp_path))))

    async def scenario() -> None:
        server_bus, server = await serve_notifications(session_bus.address, ["body"])
        async with tray_on(session_bus.address, settings, FakeController()) as (icon, host, _):
            icon.disk_attached("backup1")
            icon.status_changed(ATTACHED)

            async def eject() -> int:
                await host.click(EJECT_BASE)
                await icon.settle()
                assert server.shown[-1].summary == "It is safe to unplug backup1"
                return server.shown[-1].id

            said = await eject()
            icon.backup_started("backup2", "asked")  # another disk's backup: still true
            await icon.settle()
            assert server.closed == []
            icon.backup_started("backup1", "asked")
            await icon.settle()
            assert server.closed == [said]
            icon.status_changed(ATTACHED)
            said = await eject()
            icon.disk_removed("backup1", during_backup=False)
            await icon.settle()
            assert server.closed[-1] == said
            # opened for browsing (unlocked and mounted): untrue again, another disk's opening says nothing of it
            icon.disk_attached("backup1")
            said = await eject()
            icon.disk_opened("backup2")
            await icon.settle()
            assert server.closed[-1] != said
            icon.disk_opened("backup1")
            await icon.settle()
            assert server.closed[-1] == said
        server_bus.disconnect()

    run(scenario())


@pytest.mark.integration
def test_with_two_disks_attached_back_up_now_names_the_disk(session_bus: PrivateBus, tmp_path: Path) -> None:
    settings = Settings(path=None, disks=(disk("backup1", str(tmp_path)), disk("backup2", str(tmp_path))))

    async def scenario() -> None:
        controller = FakeController()
        async with tray_on(session_bus.address, settings, controller) as (icon, host, _):
            icon.disk_attached("backup1")
            icon.disk_attached("backup2")
            icon.status_changed(ATTACHED)
            await icon.settle()
            await host.click(BACKUP_BASE + 1)
            await host.click(BACKUP_BASE)
            assert controller.calls == ["backup_now backup2", "backup_now backup1"]

    run(scenario())


def test_no_bus_means_no_tray() -> None:
    assert run(tray.start(None, FakeController(), SETTINGS, lambda: None)) is None


@contextlib.contextmanager
def busy_fails(seconds: float) -> Iterator[None]:
    """Turn a coroutine that never yields into a failure: only a signal reaches it (the loop is stuck)."""
    def fail(signum: int, frame: Any) -> None:
        raise AssertionError(f"still busy after {seconds:g} s without yielding to the event loop")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_settle_returns_when_a_task_ended_just_before() -> None:
    """settle() right after the tray's last task ended, before that task's done-callbacks ran.

    From Python 3.12 awaiting a gather of finished tasks does not yield to the loop, so a
    settle() that waits for the callbacks to empty its task set spins for ever. The bus is
    never connected: a look at a disk the tray has no settings for ends in its first step.
    """
    async def scenario() -> None:
        bus = MessageBus(bus_address="unix:path=/nonexistent-ba/bus")
        icon = tray.Tray(bus, FakeController(), Settings(path=None, disks=(disk("backup1"),)), lambda: None)
        icon.status_changed(AgentStatus(state="disk-attached", disk="backup9"))  # starts that look
        await asyncio.sleep(0)  # the look runs and ends; its done-callbacks wait for the next turn
        await icon.settle()
        icon.status_changed(AgentStatus(state="disk-attached", disk="backup9"))
        await icon.settle()  # and a task not yet started is waited for
        icon.close()

    with busy_fails(5):
        asyncio.run(scenario())


# -- with the real agent, a real disk and a real cycle --------------------------------------------------

XDG_OPEN = """#!{python}
import sys
with open({record!r}, "a", encoding="utf-8") as handle:
    handle.write(repr(sys.argv[1:]) + "\\n")
"""


@real
def test_the_tray_follows_a_real_agent_and_its_menu_works(
    bench: Bench, here: None, session_bus: PrivateBus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "xdg-open.argv"
    (bin_dir / "xdg-open").write_text(XDG_OPEN.format(python=sys.executable, record=str(record)))
    (bin_dir / "xdg-open").chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    bench.init()
    _run("udevadm", "settle", "--timeout=5")
    settings = load_settings(str(bench.config))

    async def scenario() -> None:
        server_bus, server = await serve_notifications(session_bus.address, ["body"])
        watcher_bus, watcher = await start_watcher(session_bus.address)
        options = AgentOptions(cycle_argv=cycle_argv(bench), policy=schedule.Policy(),
                               state_file=str(tmp_path / "state.json"), foreign_poll=0.2,
                               eject_argv=eject_argv(bench),
                               open_argv=(*cycle_argv(bench)[:3], "open", "--json", "--config", str(bench.config)))
        agent = Agent(settings, options)
        stop = asyncio.Event()
        bus = await MessageBus(bus_address=session_bus.address).connect()
        icon = await tray.start(bus, agent, settings, stop.set)
        assert icon is not None and icon.name is not None and watcher.items == [icon.name]
        agent.add_listener(icon)
        host = await Host.connect(session_bus.address, icon.name)
        task = asyncio.create_task(agent.run(stop))
        try:
            # the disk is attached: the agent backs it up; the tray shows it
            await until(lambda: agent.status().state == "running", "the cycle to start")
            await until(lambda: agent.status().state == "disk-attached", "the cycle to end")
            await icon.settle()
            shown = await host.properties()
            assert (shown["IconName"], shown["Status"]) == ("drive-harddisk", "Active")
            snapshot = agent.status().last_message.removeprefix("snapshot ")
            assert shown["ToolTip"][3].startswith(f"Last backup just now: snapshot {snapshot}.")
            assert ("NewIcon", []) in host.signals and ("NewStatus", ["Active"]) in host.signals
            menu = await host.menu()
            assert menu[:4] == [(BACK_UP_NOW, "Back up now", True), (STOP, "Stop the backup", False),
                                (OPEN_LATEST, "Open latest backup (the disk is locked)", False),
                                (EJECT_BASE, f"Eject {NAME}", True)]

            await host.click(EJECT_BASE)  # locked again by the cycle: safe
            await icon.settle()
            assert server.shown[-1].summary == f"It is safe to unplug {NAME}"

            # opened by hand: Open latest backup works; Eject unmounts and locks it (as root, the real
            # backup-agent eject), or, while a program keeps it busy, says so and names the program
            bench.rig.unlock_by_hand()
            bench.rig.mount_by_hand(str(bench.rig.mapped))
            assert await host.about_to_show() is True
            assert (await host.menu())[2] == (OPEN_LATEST, "Open latest backup", True)
            await host.click(OPEN_LATEST)
            await icon.settle()
            assert record.read_text() == repr([str(bench.repository / "snapshots" / snapshot)]) + "\n"
            inside = subprocess.Popen(["sleep", "60"], cwd=bench.repository / "snapshots")
            bench.rig.processes.append(inside)  # the rig kills it in any case
            await host.click(EJECT_BASE)
            await icon.settle()
            still = server.shown[-1]
            assert still.summary == f"{NAME} is still open: do not unplug it yet"
            assert f"it is busy; held by pid {inside.pid} (sleep)" in still.body
            assert still.body.endswith("Once they are closed, choose Eject again.")
            assert [entry[0] for entry in bench.mounted_here()] == [str(bench.rig.mount_point)]
            assert (await host.menu())[2] == (OPEN_LATEST, "Open latest backup", True)
            bench.rig.release(inside)
            await host.click(EJECT_BASE)
            await icon.settle()
            assert (server.shown[-1].summary, server.shown[-1].body) == (
                f"It is safe to unplug {NAME}", f"{NAME} was unmounted and locked.")
            bench.assert_locked_and_unmounted()
            # the menu followed by itself (no AboutToShow asked the tray to look again)
            assert (await host.menu())[2] == (OPEN_LATEST, "Open latest backup (the disk is locked)", False)
            assert agent.status().state == "disk-attached"  # ejecting is not a failure, and started nothing

            # Browse backups: the agent opens the disk read-only (the real backup-agent open), the
            # snapshots folder is shown, and it says so; Eject closes it again
            await host.click(BROWSE)
            await icon.settle()
            assert (server.shown[-1].summary, server.shown[-1].body) == (
                f"Browsing the backups on {NAME}",
                "They are read-only: copy what you need back out. The disk closes again after 15 minutes unused, "
                "or choose Eject.")
            assert record.read_text().splitlines()[-1] == repr([str(bench.repository / "snapshots")])
            assert os.statvfs(bench.rig.mount_point).f_flag & os.ST_RDONLY
            await host.click(EJECT_BASE)
            await icon.settle()
            assert server.shown[-1].summary == f"It is safe to unplug {NAME}"
            bench.assert_locked_and_unmounted()

            # Back up now from the menu: a real cycle; the tray shows it running, then done
            host.signals.clear()
            await host.click(BACK_UP_NOW)
            assert agent.status().state == "running"
            await until(lambda: agent.status().state == "disk-attached", "the asked cycle to end")
            await host.quiet()
            icons = [body for name, body in host.signals if name == "NewStatus"]
            assert host.count("NewIcon") >= 2 and icons == []  # Active while running and after
            assert (await host.properties())["IconName"] == "drive-harddisk"

            # Quit: the agent stops, as on SIGTERM
            await host.click(QUIT)
            await asyncio.wait_for(task, 5)
            assert stop.is_set() and not agent.watching
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 10)
            icon.close()
            for connection in (host.bus, bus, watcher_bus, server_bus):
                connection.disconnect()

    run(scenario(), timeout=60)
    bench.assert_locked_and_unmounted()


# -- backup-agent run -------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.integration
@pytest.mark.parametrize("enabled", [True, False])
def test_backup_agent_run_shows_the_tray_and_quit_stops_it(
    session_bus: PrivateBus, tmp_path: Path, enabled: bool
) -> None:
    """The wiring in daemon.main: ``[tray] enabled`` decides, the item registers, Quit is SIGTERM's stop."""
    config = tmp_path / "config.toml"
    config.write_text(f"[tray]\nenabled = {'true' if enabled else 'false'}\n[notifications]\nenabled = false\n")
    log_path = tmp_path / "agent.log"
    env = {k: v for k, v in os.environ.items() if k not in ("SUDO_UID", "NOTIFY_SOCKET", "WATCHDOG_USEC")}
    env.update(DBUS_SESSION_BUS_ADDRESS=session_bus.address, XDG_STATE_HOME=str(tmp_path / "xdg-state"))
    env.pop("DBUS_SYSTEM_BUS_ADDRESS", None)

    async def scenario() -> None:
        watcher_bus, watcher = await start_watcher(session_bus.address)
        with open(log_path, "wb") as log_file:
            agent = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "--no-sudo", "--config", str(config)],
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            await until(lambda: "watching for" in log_path.read_text() or agent.poll() is not None,
                        "the agent to start", 10)
            assert agent.poll() is None, log_path.read_text()
            if not enabled:
                await asyncio.sleep(0.3)
                assert watcher.items == []
                agent.send_signal(signal.SIGTERM)
            else:
                assert watcher.items == [f"org.kde.StatusNotifierItem-{agent.pid}-1"], log_path.read_text()
                host = await Host.connect(session_bus.address, watcher.items[0])
                assert (await host.properties())["IconName"] == "drive-removable-media"
                await host.click(QUIT)
                host.bus.disconnect()
            await until(lambda: agent.poll() is not None, "the agent to stop", 10)
            assert agent.returncode == 0, log_path.read_text()
            assert "Traceback" not in log_path.read_text()
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
            watcher_bus.disconnect()

    run(scenario(), timeout=30)
