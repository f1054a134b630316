"""Desktop notifications: the texts, and the Notifier on a real, private session bus.

The texts are pure functions, tested directly. The Notifier is tested on a
private dbus-daemon (``private_bus`` from test_dbus_control) against
:class:`RecordingServer`: a stand-in for the desktop's notification daemon
(GNOME Shell, dunst, ...) at the process boundary. It implements the
org.freedesktop.Notifications methods the Notifier uses, records every
Notify call, returns ids as a real server does (a new one, or the one
replaced), and emits ActionInvoked when a test "clicks" an action. What is
under test is our side of that boundary, not any real server's rendering.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Annotated, Any, Iterator

import pytest
from dbus_fast import NameFlag, RequestNameReply, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusSignature, DBusStr, DBusUInt32
from dbus_fast.service import ServiceInterface, dbus_method, dbus_signal

from agent.dbus import notify
from agent.dbus.notify import CRITICAL, LOW, NORMAL, Notifier, Text
from agent.state import AgentStatus
from tests.test_dbus_control import DBUS_DAEMON, PrivateBus, private_bus, run

NOW = 1763812800.0  # 2025-11-22 12:00:00 UTC
UTC = dt.timezone.utc

COMPLETE: dict[str, Any] = {
    "event": "complete", "snapshot": "2025-11-22T12-00-00+0000", "skipped": None, "partial": False,
    "flagged": None, "statistics": {"files": 50123, "transferred_files": 12, "transferred_size": 1_500_000},
    "warnings": 0, "deleted": [], "duration": 200.4, "dry_run": False,
}


# -- texts (pure) ------------------------------------------------------------------------


def test_words() -> None:
    assert notify.age(None, NOW) == "never"
    assert notify.age(NOW - 30, NOW) == "just now"
    assert notify.age(NOW - 60, NOW) == "1 minute ago"
    assert notify.age(NOW - 3 * 3600 - 5, NOW) == "3 hours ago"
    assert notify.age(NOW - 4 * 86400, NOW) == "4 days ago"
    assert notify.size(512) == "512 bytes"
    assert notify.size(1_500_000) == "1.5 MB"
    assert notify.size(2 * 10**12) == "2.0 TB"
    assert notify.duration(9.2) == "9 s"
    assert notify.duration(200) == "3 min 20 s"
    assert notify.duration(3900) == "1 h 5 min"
    assert notify.when(NOW + 4 * 3600, NOW, UTC) == "at 16:00"
    assert notify.when(NOW + 21 * 3600, NOW, UTC) == "tomorrow at 09:00"
    assert notify.when(NOW + 2 * 86400, NOW, UTC) == "on Mon 24 Nov at 12:00"
    assert notify.step_words("transfer") == "copying files"
    assert notify.step_words("lock-disk") == "locking the disk"


def test_started_text() -> None:
    text = notify.started_text("backup1", "plugged in, due", NOW - 3 * 86400, NOW)
    assert text == Text(
        "Backing up to backup1",
        "Last backup 3 days ago. Started because the disk was plugged in. "
        "Keep the disk plugged in until it is safe to unplug.",
        NORMAL,
    )
    first = notify.started_text("backup1", "asked", None, NOW)
    assert first.body.startswith("First backup to this disk: it can take a while. Started because you asked for it.")


def test_progress_text() -> None:
    event = {"event": "progress", "percent": 42, "bytes": 1048576, "files": 12, "rate": 350000.0, "eta": 240}
    assert notify.progress_text("backup1", event, "transfer") == Text(
        "Backing up to backup1: 42%", "About 4 minutes left: copying files (12 files, 1.0 MB so far).", LOW
    )
    unknown = notify.progress_text("backup1", {"percent": None, "eta": None}, None)
    assert unknown == Text("Backing up to backup1", "Working out the time left: copying files.", LOW)


def test_completed_text_says_safe_to_unplug_only_once_locked() -> None:
    locking = notify.completed_text("backup1", COMPLETE, locked=False)
    assert locking.summary == "Backup to backup1 complete"
    assert locking.body == (
        "12 files changed (1.5 MB) in 3 min 20 s. Snapshot 2025-11-22T12-00-00+0000.\n"
        "The disk is being locked… do not unplug it yet."
    )
    assert "safe to unplug" not in locking.body
    locked = notify.completed_text("backup1", COMPLETE, locked=True)
    assert locked.body.endswith("\nIt is safe to unplug backup1.")
    nothing = notify.completed_text("backup1", {**COMPLETE, "statistics": {"transferred_files": 0}}, True)
    assert nothing.body.startswith("Nothing changed since the last backup in 3 min 20 s.")
    partial = notify.completed_text("backup1", {**COMPLETE, "partial": True}, True)
    assert partial.summary == "Backup to backup1 finished with problems"
    assert "Some files could not be read" in partial.body


def test_failed_text_is_critical_and_says_what_to_do() -> None:
    text = notify.failed_text("backup1", "unlock", "cannot unlock /dev/sdb1: no key")
    assert text == Text(
        "Backup to backup1 failed while unlocking the disk",
        "Cannot unlock /dev/sdb1: no key.\nCheck the disk's key or passphrase, then try again.\n"
        "Earlier snapshots are untouched.",
        CRITICAL,
    )
    after = notify.failed_text("backup1", "unmount", "target is busy", snapshot="S1")
    assert after.urgency == CRITICAL and after.summary == "Backed up to backup1, but the disk is still open"
    assert "Snapshot S1 is complete" in after.body and "Do not unplug it yet" in after.body
    assert notify.failed_text(None, None, "").body.startswith("The backup failed.\nTry again with Back up now")


def test_removed_and_skipped_texts() -> None:
    removed = notify.removed_text("backup1")
    assert removed.urgency == CRITICAL and removed.summary == "backup1 was unplugged during the backup"
    assert "Earlier snapshots are untouched." in removed.body
    skipped = notify.skipped_text("backup1", NOW - 2 * 3600, NOW + 4 * 3600, NOW, UTC)
    assert skipped == Text(
        "backup1: no backup needed yet",
        "Last backup 2 hours ago. The next one is due at 16:00; leave the disk plugged in, or plug it in again then.",
        LOW,
    )


# -- a recording notification server (a stand-in at the process boundary) --------------------


@dataclass
class Shown:
    app_name: str
    replaces_id: int
    icon: str
    summary: str
    body: str
    actions: list[str]
    hints: dict[str, Any]
    timeout: int
    id: int = 0


class RecordingServer(ServiceInterface):
    def __init__(self, capabilities: list[str]) -> None:
        super().__init__("org.freedesktop.Notifications")
        self.capabilities = capabilities
        self.shown: list[Shown] = []
        self.closed: list[int] = []
        self._next = 0

    @dbus_method(name="GetCapabilities")
    def _get_capabilities(self) -> Annotated[list[str], DBusSignature("as")]:
        return self.capabilities

    @dbus_method(name="Notify")
    def _notify(
        self,
        app_name: DBusStr,
        replaces_id: DBusUInt32,
        icon: DBusStr,
        summary: DBusStr,
        body: DBusStr,
        actions: Annotated[list[str], DBusSignature("as")],
        hints: Annotated[dict[str, Variant], DBusSignature("a{sv}")],
        timeout: Annotated[int, DBusSignature("i")],
    ) -> DBusUInt32:
        if replaces_id:
            ident = replaces_id
        else:
            self._next += 1
            ident = self._next
        plain = {key: value.value for key, value in hints.items()}
        self.shown.append(Shown(app_name, replaces_id, icon, summary, body, list(actions), plain, timeout, ident))
        return ident

    @dbus_method(name="CloseNotification")
    def _close(self, ident: DBusUInt32):  # type: ignore[no-untyped-def]  # dbus-fast: no reply value
        self.closed.append(ident)

    @dbus_method(name="GetServerInformation")
    def _info(self) -> Annotated[tuple[str, str, str, str], DBusSignature("ssss")]:
        return ("recording", "backup-agent tests", "1", "1.2")

    @dbus_signal(name="ActionInvoked")
    def action_invoked(self, ident: int, key: str) -> Annotated[tuple[int, str], DBusSignature("us")]:
        return ident, key


@dataclass
class FakeController:
    calls: list[str] = field(default_factory=list)

    def backup_now(self) -> str:
        self.calls.append("backup_now")
        return "started"

    def stop(self) -> str:
        self.calls.append("stop")
        return "stopping"

    def status(self) -> AgentStatus:
        return AgentStatus()


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def session_bus() -> Iterator[PrivateBus]:
    if DBUS_DAEMON is None:
        pytest.skip(reason="dbus-daemon is not installed (apt-get install -y dbus-daemon): no private bus to test on")
    with private_bus("session") as bus:
        yield bus


async def serve(address: str, capabilities: list[str]) -> tuple[MessageBus, RecordingServer]:
    bus = await MessageBus(bus_address=address).connect()
    server = RecordingServer(capabilities)
    bus.export("/org/freedesktop/Notifications", server)
    reply = await bus.request_name("org.freedesktop.Notifications", NameFlag.DO_NOT_QUEUE)
    assert reply is RequestNameReply.PRIMARY_OWNER
    return bus, server


async def until(condition: Any, timeout: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


RUNNING = AgentStatus(state="running", disk="backup1", last_success=NOW - 86400, last_result="success", step="transfer")
BEFORE = AgentStatus(state="disk-attached", disk="backup1", last_success=NOW - 86400, last_result="success")


@pytest.mark.integration
def test_a_whole_cycle_is_one_notification_updated_in_place(session_bus: PrivateBus) -> None:
    async def scenario() -> None:
        server_bus, server = await serve(session_bus.address, ["actions", "body", "persistence"])
        bus = await MessageBus(bus_address=session_bus.address).connect()
        clock, controller = FakeClock(), FakeController()
        notifier = await notify.start(bus, controller, clock=clock, now=lambda: NOW, min_interval=5.0)
        assert notifier is not None and notifier.capabilities == {"actions", "body", "persistence"}

        notifier.status_changed(BEFORE)
        notifier.backup_started("backup1", "plugged in, due")
        notifier.status_changed(RUNNING)
        for at, percent in ((1.0, 10), (4.9, 20), (5.0, 30), (7.0, 40), (10.5, 50)):
            clock.now = at
            notifier.progress({"event": "progress", "percent": percent, "bytes": 1000, "files": 1, "eta": 90})
        await notifier.flush()
        started, *progress = server.shown
        assert (started.replaces_id, started.summary) == (0, "Backing up to backup1")
        assert started.body.startswith("Last backup 24 hours ago. Started because the disk was plugged in.")
        assert started.actions == ["stop", "Stop"] and started.hints["urgency"] == NORMAL
        # at most one update every 5 s of the (fake) clock, each replacing the same notification
        assert [p.summary for p in progress] == ["Backing up to backup1: 30%", "Backing up to backup1: 50%"]
        assert {p.replaces_id for p in progress} == {started.id} and progress[0].hints["value"] == 30
        assert progress[0].body == "About 2 minutes left: copying files (1 file, 1.0 kB so far)."

        # "Stop" clicked: the controller is asked
        server.action_invoked(started.id, "stop")
        await until(lambda: controller.calls == ["stop"])
        server.action_invoked(999, "stop")  # not ours: ignored
        await asyncio.sleep(0.05)
        assert controller.calls == ["stop"]

        notifier.backup_completed(COMPLETE)
        notifier.status_changed(AgentStatus(**{**RUNNING.as_dict(), "step": "lock-disk"}))
        await notifier.flush()
        assert "safe to unplug" not in server.shown[-1].body
        assert server.shown[-1].body.endswith("The disk is being locked… do not unplug it yet.")
        notifier.status_changed(AgentStatus(state="disk-attached", disk="backup1", last_success=NOW,
                                            last_result="success", next_due=NOW + 3600))
        await notifier.flush()
        done = server.shown[-1]
        assert done.summary == "Backup to backup1 complete" and done.replaces_id == started.id
        assert done.body.endswith("It is safe to unplug backup1.") and done.actions == []
        assert len(server.shown) == 5  # started, 2 progress, completed (locking), completed (safe)

        # the next cycle gets a notification of its own
        notifier.backup_started("backup1", "interval elapsed")
        await notifier.flush()
        assert server.shown[-1].replaces_id == 0
        notifier.close()
        bus.disconnect()
        server_bus.disconnect()

    run(scenario())


@pytest.mark.integration
def test_a_failure_is_critical_and_offers_back_up_now(session_bus: PrivateBus) -> None:
    async def scenario() -> None:
        server_bus, server = await serve(session_bus.address, ["actions", "body", "body-markup"])
        bus = await MessageBus(bus_address=session_bus.address).connect()
        controller = FakeController()
        notifier = await notify.start(bus, controller, clock=FakeClock(), now=lambda: NOW)
        assert notifier is not None
        notifier.backup_started("backup1", "asked")
        notifier.backup_failed("make-room", "the disk is full: 10 GB needed, 2 GB free <see log>")
        await notifier.flush()
        started, failed = server.shown
        assert failed.replaces_id == started.id and failed.hints["urgency"] == CRITICAL and failed.timeout == 0
        assert failed.summary == "Backup to backup1 failed while making room on the disk"
        assert failed.body == (  # body-markup is advertised: escaped
            "The disk is full: 10 GB needed, 2 GB free &lt;see log&gt;.\n"
            "Free space on the backup disk or use a bigger one.\nEarlier snapshots are untouched."
        )
        assert failed.actions == ["backup-now", "Back up now"]
        server.action_invoked(failed.id, "backup-now")
        await until(lambda: controller.calls == ["backup_now"])

        # the disk pulled out mid-backup: one critical notification, the failure that follows adds none
        notifier.backup_started("backup1", "asked")
        notifier.disk_removed("backup1", during_backup=True)
        notifier.backup_failed("transfer", "transfer failed: the disk was removed")
        notifier.disk_removed("backup1", during_backup=False)
        await notifier.flush()
        restarted, removed = server.shown[2:]
        assert removed.replaces_id == restarted.id and removed.hints["urgency"] == CRITICAL
        assert removed.summary == "backup1 was unplugged during the backup"
        notifier.close()
        bus.disconnect()
        server_bus.disconnect()

    run(scenario())


@pytest.mark.integration
def test_no_actions_without_the_capability_and_skipped_on_plug_in(session_bus: PrivateBus) -> None:
    async def scenario() -> None:
        server_bus, server = await serve(session_bus.address, ["body"])
        bus = await MessageBus(bus_address=session_bus.address).connect()
        notifier = await notify.start(bus, FakeController(), clock=FakeClock(), now=lambda: NOW)
        assert notifier is not None
        notifier.backup_started("backup1", "asked")
        notifier.disk_attached("backup1")
        notifier.status_changed(AgentStatus(state="disk-attached", disk="backup1", last_success=NOW - 600,
                                            last_result="success", next_due=NOW + 3000))
        notifier.status_changed(BEFORE)  # a later change says nothing: only a plug-in is answered
        await notifier.flush()
        started, skipped = server.shown
        assert started.actions == [] and skipped.actions == []
        assert skipped.summary == "backup1: no backup needed yet" and skipped.replaces_id == 0
        assert skipped.body.startswith("Last backup 10 minutes ago. The next one is due ")
        notifier.close()
        bus.disconnect()
        server_bus.disconnect()

    run(scenario())


@pytest.mark.integration
def test_no_server_is_logged_once_and_nothing_raises(
    session_bus: PrivateBus, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        bus = await MessageBus(bus_address=session_bus.address).connect()
        with caplog.at_level(logging.DEBUG, logger="agent.dbus.notify"):
            notifier = await notify.start(bus, FakeController(), clock=FakeClock(), now=lambda: NOW)
            assert notifier is not None and notifier.capabilities is None
            notifier.backup_started("backup1", "asked")
            notifier.progress({"percent": 1})
            notifier.backup_failed("transfer", "it broke")
            await notifier.flush()
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and "cannot show desktop notifications" in warnings[0].getMessage()

        # a server that shows up later is used
        server_bus, server = await serve(session_bus.address, ["actions"])
        notifier.backup_started("backup1", "asked")
        await notifier.flush()
        assert [s.summary for s in server.shown] == ["Backing up to backup1"]
        notifier.close()
        bus.disconnect()
        server_bus.disconnect()

    run(scenario())


def test_no_bus_means_no_notifier() -> None:
    assert run(notify.start(None)) is None
