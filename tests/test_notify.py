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
import dataclasses
import datetime as dt
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Iterator

import pytest
from dbus_fast import NameFlag, RequestNameReply, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusSignature, DBusStr, DBusUInt32
from dbus_fast.service import ServiceInterface, dbus_method, dbus_signal

from agent.core import events
from agent.config.load import load_settings
from agent.config.model import Disk, Settings
from agent.desktop.statefile import DiskRecord, save_state
from agent.engine.cycle import human_size
from agent.desktop.dbus import notify
from agent.core.errors import (
    EXIT_BUSY,
    EXIT_DISK_BUSY,
    EXIT_DISK_FULL,
    EXIT_DISK_MISSING,
    EXIT_REPOSITORY,
    EXIT_STEP_FAILED,
    EXIT_USAGE,
)
from agent.desktop.dbus.notify import CRITICAL, LOW, NORMAL, Notifier, Text
from agent.desktop.reminder import MissedFailure, MissedSummary, NoticeState, load_notice_state, save_notice_state
from agent.desktop.state import AgentStatus, DiskStatus, EjectReply
from tests.test_daemon import REPO, Recorder, agent_on, detach, here, one_cycle, real, settle  # noqa: F401  (here: fixture)
from tests.test_dbus_control import DBUS_DAEMON, PrivateBus, private_bus, run
from tests.test_disk import NAME, rig  # noqa: F401  (fixture)
from tests.test_disk_cycle import Bench, bench  # noqa: F401  (fixture)
from tests.test_udev import udevd  # noqa: F401  (fixture)

NOW = 1763812800.0  # 2025-11-22 12:00:00 UTC
UTC = dt.timezone.utc

COMPLETE_FIELDS: dict[str, Any] = {
    "skipped": None, "partial": False,
    "flagged": None, "statistics": {"files": 50123, "transferred_files": 12, "transferred_size": 1_500_000},
    "warnings": 0, "deleted": [], "duration": 200.4, "dry_run": False,
}
COMPLETE = events.complete("2025-11-22T12-00-00+0000", **COMPLETE_FIELDS)


# -- texts (pure) ------------------------------------------------------------------------


def test_words() -> None:
    assert notify.age(None, NOW) == "never"
    assert notify.age(NOW - 30, NOW) == "just now"
    assert notify.age(NOW - 60, NOW) == "1 minute ago"
    assert notify.age(NOW - 3 * 3600 - 5, NOW) == "3 hours ago"
    assert notify.age(NOW - 4 * 86400, NOW) == "4 days ago"
    assert notify.day(NOW - 7 * 86400, NOW, UTC) == "Sat 15 Nov"
    assert notify.day(NOW - 365 * 86400, NOW, UTC) == "Fri 22 Nov 2024"
    assert notify.past(NOW - 3600, NOW, UTC) == "today at 11:00"
    assert notify.past(NOW - 86400, NOW, UTC) == "yesterday at 12:00"
    assert notify.past(NOW - 3 * 86400, NOW, UTC) == "on Wed 19 Nov at 12:00"
    assert notify.duration(9.2) == "9 s"
    assert notify.duration(200) == "3 min 20 s"
    assert notify.duration(3900) == "1 h 5 min"
    assert notify.when(NOW + 4 * 3600, NOW, UTC) == "at 16:00"
    assert notify.when(NOW + 21 * 3600, NOW, UTC) == "tomorrow at 09:00"
    assert notify.when(NOW + 2 * 86400, NOW, UTC) == "on Mon 24 Nov at 12:00"
    assert notify.step_words("transfer") == "copying files"
    assert notify.step_words("lock-disk") == "locking the disk"
    assert notify.step_words("empty-trash") == "freeing the space of old snapshots"


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
    event = events.progress(42, 1048576, 12, 350000.0, 240)
    assert notify.progress_text("backup1", event, "transfer") == Text(
        "Backing up to backup1: 42%", "About 4 minutes left: copying files (12 files, 1.0 MiB so far).", LOW
    )
    unknown = notify.progress_text("backup1", None, None)
    assert unknown == Text("Backing up to backup1", "Working out the time left: copying files.", LOW)
    # the file being copied, on a line of its own: its name, a long one shortened in the middle
    copying = events.progress(42, 1048576, 12, 350000.0, 240, current="/home/alice/Music/a song.flac")
    assert notify.progress_text("backup1", copying, "transfer").body == (
        "About 4 minutes left: copying files (12 files, 1.0 MiB so far).\nNow: a song.flac")
    long = events.progress(42, 1048576, 12, 350000.0, 240, current="/d/" + "x" * 100 + ".tar.zst")
    line = notify.progress_text("backup1", long, "transfer").body.splitlines()[1]
    assert len(line) == len("Now: ") + 48 and line.startswith("Now: xxx") and line.endswith("x.tar.zst") and "…" in line


def test_sizes_are_the_cli_s_binary_units() -> None:
    """One formatter for the CLI and the notifications (agent.engine.cycle.human_size): MiB, not MB."""
    assert human_size(1_500_000) == "1.4 MiB"
    assert "(1.4 MiB)" in notify.completed_text("backup1", COMPLETE, "locked").body
    event = events.progress(1, 3 * 2**30, 2, None, 60)
    assert "(2 files, 3.0 GiB so far)" in notify.progress_text("backup1", event, "transfer").body
    assert "(1 file, 512 B so far)" in notify.progress_text("backup1", events.progress(None, 512, 1, None, None), None).body


def test_completed_text_says_safe_to_unplug_only_once_locked() -> None:
    locking = notify.completed_text("backup1", COMPLETE, None)
    assert locking.summary == "Backup to backup1 complete"
    assert locking.body == (
        "12 files changed (1.4 MiB) in 3 min 20 s. Snapshot 2025-11-22T12-00-00+0000.\n"
        "The disk is being locked… do not unplug it yet."
    )
    assert "safe to unplug" not in locking.body
    locked = notify.completed_text("backup1", COMPLETE, "locked")
    assert locked.body.endswith("\nIt is safe to unplug backup1.")
    nothing = notify.completed_text(
        "backup1", events.complete(COMPLETE.snapshot, **{**COMPLETE_FIELDS, "statistics": {"transferred_files": 0}}), "locked"
    )
    assert nothing.body.startswith("Nothing changed since the last backup in 3 min 20 s.")
    partial = notify.completed_text("backup1", events.complete(COMPLETE.snapshot, **{**COMPLETE_FIELDS, "partial": True}), "locked")
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


def test_the_hint_follows_the_cause_when_the_exit_status_tells_it() -> None:
    full = notify.failed_text(
        "backup1", "transfer",
        "the backup disk is full (0 B free): no snapshot was completed; delete old snapshots with backup-agent "
        "rotate, set keep_free in [rotation], or use a bigger disk",
        exit_code=EXIT_DISK_FULL,
    )
    assert full.summary == "Backup to backup1 failed while copying files"
    assert full.body.endswith(
        "or use a bigger disk.\nMake room on the disk as it says, then try again with Back up now.\n"
        "Earlier snapshots are untouched."
    )
    assert "plugged in" not in full.body
    # each cause its own hint, whatever the step it happened in
    hints = {
        code: notify.failure_hint("transfer", code)
        for code in (EXIT_USAGE, EXIT_REPOSITORY, EXIT_BUSY, EXIT_DISK_MISSING, EXIT_DISK_BUSY, EXIT_DISK_FULL, 143)
    }
    assert hints[EXIT_DISK_MISSING] == "Plug the backup disk in and try again."
    assert hints[EXIT_DISK_BUSY] == "Close the programs it names, then eject the disk from the file manager."
    assert hints[143] == "Back up now starts it again."
    assert len(set(hints.values())) == len(hints)
    # a step failure (5), an unknown status or none: the step's hint
    assert notify.failure_hint("unlock", EXIT_STEP_FAILED) == "Check the disk's key or passphrase, then try again."
    assert notify.failure_hint("transfer", EXIT_STEP_FAILED) == "Keep the disk plugged in and try again."
    assert notify.failure_hint("transfer", None) == notify.failure_hint("transfer", 1) == notify.failure_hint("transfer", -9)
    # a failure shown at the next login keeps its cause
    missed = MissedFailure(NOW - 3600, "backup1", "transfer", "the backup disk is full", None, EXIT_DISK_FULL)
    assert "Make room on the disk" in notify.missed_text(MissedSummary(missed, 1, missed.time), NOW, UTC).body


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
        self.order: list[tuple[str, int]] = []  # ("notify", id) and ("close", id), as they came
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
        self.order.append(("notify", len(self.shown) - 1))
        return ident

    @dbus_method(name="CloseNotification")
    def _close(self, ident: DBusUInt32):  # type: ignore[no-untyped-def]  # dbus-fast: no reply value
        self.closed.append(ident)
        self.order.append(("close", ident))

    @dbus_method(name="GetServerInformation")
    def _info(self) -> Annotated[tuple[str, str, str, str], DBusSignature("ssss")]:
        return ("recording", "backup-agent tests", "1", "1.2")

    @dbus_signal(name="ActionInvoked")
    def action_invoked(self, ident: int, key: str) -> Annotated[tuple[int, str], DBusSignature("us")]:
        return ident, key


@dataclass
class FakeController:
    calls: list[str] = field(default_factory=list)

    def backup_now(self, disk: str | None = None) -> str:
        self.calls.append("backup_now" if disk is None else f"backup_now {disk}")
        return "started"

    def stop(self) -> str:
        self.calls.append("stop")
        return "stopping"

    def not_now(self) -> str:
        self.calls.append("not_now")
        return "postponed"

    async def eject(self, disk: str) -> EjectReply:
        self.calls.append(f"eject {disk}")
        return EjectReply("already", f"{disk} is locked and not mounted: already safe to unplug")

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
            notifier.progress(events.progress(percent, 1000, 1, None, 90))
        await notifier.flush()
        started, *progress = server.shown
        assert (started.replaces_id, started.summary) == (0, "Backing up to backup1")
        assert started.body.startswith("Last backup 24 hours ago. Started because the disk was plugged in.")
        # Stop, and Not now (a stop whose next try is one interval later), on the started card and its updates
        assert started.actions == ["stop", "Stop", "not-now", "Not now"] and started.hints["urgency"] == NORMAL
        assert all(p.actions == started.actions for p in progress)
        # at most one update every 5 s of the (fake) clock, each replacing the same notification
        assert [p.summary for p in progress] == ["Backing up to backup1: 30%", "Backing up to backup1: 50%"]
        assert {p.replaces_id for p in progress} == {started.id} and progress[0].hints["value"] == 30
        assert progress[0].body == "About 2 minutes left: copying files (1 file, 1000 B so far)."

        # "Stop" clicked: the controller is asked
        server.action_invoked(started.id, "stop")
        await until(lambda: controller.calls == ["stop"])
        server.action_invoked(999, "stop")  # not ours: ignored
        await asyncio.sleep(0.05)
        assert controller.calls == ["stop"]
        server.action_invoked(started.id, "not-now")
        await until(lambda: controller.calls == ["stop", "not_now"])

        notifier.backup_completed(COMPLETE)
        notifier.status_changed(AgentStatus(**{**RUNNING.as_dict(), "step": "lock-disk"}))
        await notifier.flush()
        assert "safe to unplug" not in server.shown[-1].body
        assert server.shown[-1].body.endswith("The disk is being locked… do not unplug it yet.")
        notifier.status_changed(AgentStatus(state="disk-attached", disk="backup1", last_success=NOW,
                                            last_result="success", next_due=NOW + 3600, disk_left="locked"))
        await notifier.flush()
        done = server.shown[-1]
        assert done.summary == "Backup to backup1 complete" and done.replaces_id == started.id
        assert done.body.endswith("It is safe to unplug backup1.") and done.actions == []
        assert len(server.shown) == 5  # started, 2 progress, completed (locking), completed (safe)

        # the next cycle replaces the last one's card (its "safe to unplug" is stale now): one card, not two
        notifier.backup_started("backup1", "interval elapsed")
        await notifier.flush()
        assert server.shown[-1].replaces_id == started.id
        notifier.close()
        bus.disconnect()
        server_bus.disconnect()

    run(scenario())


@pytest.mark.integration
def test_safe_to_unplug_is_withdrawn_once_the_disk_is_opened_for_browsing(session_bus: PrivateBus) -> None:
    async def scenario() -> None:
        server_bus, server = await serve(session_bus.address, ["actions", "body"])
        bus = await MessageBus(bus_address=session_bus.address).connect()
        notifier = await notify.start(bus, FakeController(), clock=FakeClock(), now=lambda: NOW)
        locked = dict(disk="backup1", last_success=NOW, next_due=NOW + 3600, disk_left="locked")
        for end in ("success", "stopped"):
            notifier.backup_started("backup1", "asked")
            notifier.status_changed(RUNNING)
            if end == "success":
                notifier.backup_completed(COMPLETE)
            notifier.status_changed(AgentStatus(state="disk-attached", last_result=end, **locked))  # type: ignore[arg-type]
            await notifier.flush()
            card = server.shown[-1]
            assert card.body.endswith("It is safe to unplug backup1.")
            notifier.disk_opened("other")  # another disk's browsing says nothing of this one
            await notifier.flush()
            assert card.id not in server.closed
            notifier.disk_opened("backup1")  # Browse backups: unlocked and mounted now
            await notifier.flush()
            assert server.order[-1] == ("close", card.id)
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
def test_a_stop_is_told_as_a_stop_and_no_skip_notice_hides_an_unfinished_run(session_bus: PrivateBus) -> None:
    async def scenario() -> None:
        server_bus, server = await serve(session_bus.address, ["actions", "body"])
        bus = await MessageBus(bus_address=session_bus.address).connect()
        notifier = await notify.start(bus, FakeController(), clock=FakeClock(), now=lambda: NOW)
        notifier.backup_started("backup1", "asked")
        notifier.status_changed(RUNNING)
        left = [DiskStatus("backup1", attached=True, last_result="stopped", unfinished=True)]
        notifier.status_changed(AgentStatus(state="disk-attached", disk="backup1", last_result="stopped",
                                            next_due=NOW + 3600, disk_left="locked", disks=left))
        await notifier.flush()
        started, stopped = server.shown
        assert stopped.summary == "Backup to backup1 stopped" and stopped.replaces_id == started.id
        assert stopped.hints["urgency"] == NORMAL and stopped.actions == ["backup-now", "Back up now"]
        assert stopped.body.endswith("It is safe to unplug backup1.") and "failed" not in stopped.body
        # plugged in again while its last run is unfinished (or failed): never "no backup needed yet"
        for result in ("stopped", "failure"):
            notifier.disk_attached("backup1")
            notifier.status_changed(AgentStatus(
                state="failed" if result == "failure" else "disk-attached", disk="backup1", last_result=result,
                next_due=NOW + 3000, disks=[DiskStatus("backup1", attached=True, last_result=result, unfinished=True)]))
        await notifier.flush()
        assert len(server.shown) == 2
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
        with caplog.at_level(logging.DEBUG, logger="agent.desktop.dbus.notify"):
            notifier = await notify.start(bus, FakeController(), clock=FakeClock(), now=lambda: NOW)
            assert notifier is not None and notifier.capabilities is None
            notifier.backup_started("backup1", "asked")
            notifier.progress(events.progress(1, 0, 0, None, None))
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


def test_no_bus_is_logged_once_and_nothing_raises(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        with caplog.at_level(logging.DEBUG, logger="agent.desktop.dbus.notify"):
            notifier = await notify.start(None, FakeController(), clock=FakeClock(), now=lambda: NOW)
            notifier.login()
            notifier.backup_started("backup1", "asked")
            notifier.backup_failed("transfer", "it broke")
            await notifier.flush()
            notifier.close()

    run(scenario())
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == ["no session bus: no desktop notifications (a failed backup is shown at the next login)"]


# -- how the disk was left, reminders, missed failures (texts, pure) ------------------------------


def test_the_completed_text_says_what_is_true_about_the_disk() -> None:
    def tail(left: Any, detail: str = "") -> str:
        return notify.completed_text("backup1", COMPLETE, left, detail).body.split("\n")[-1]

    assert tail("locked") == "It is safe to unplug backup1."
    assert tail("mounted", "/mnt/x") == (
        "backup1 stays unlocked and mounted at /mnt/x, as it was found: eject it before you unplug it."
    )
    assert tail("unlocked") == "backup1 was unmounted but stays unlocked, as it was found: eject it before you unplug it."
    failed = notify.completed_text("backup1", COMPLETE, "lock-failed", "locking backup1 failed (exit status 1).")
    assert failed.summary == "Backup to backup1 complete, but the disk is still unlocked"
    assert failed.body.endswith("Could not lock backup1: locking backup1 failed (exit status 1). Do not unplug it yet.")
    assert tail("") == "Eject backup1 from the file manager before you unplug it."
    for left in ("mounted", "unlocked", "lock-failed", "", None):
        assert "safe to unplug" not in notify.completed_text("backup1", COMPLETE, left, "x").body


def test_reminder_and_missed_texts() -> None:
    assert notify.reminder_text("backup1", NOW - 8 * 86400 - 60, NOW, UTC) == Text(
        "No backup to backup1 for 8 days",
        "Last backup on Fri 14 Nov. Plug backup1 in: the backup starts by itself.",
        NORMAL,
    )
    never = notify.reminder_text("backup1", None, NOW, UTC)
    assert never.summary == "No backup to backup1 yet" and never.body.startswith("Last backup: never.")
    latest = MissedFailure(NOW - 86400, "backup1", "unlock", "no key")
    once = notify.missed_text(MissedSummary(latest, 1, latest.time), NOW, UTC)
    assert once.summary == "Backup to backup1 failed while unlocking the disk yesterday at 12:00"
    assert once.urgency == CRITICAL and once.body.endswith("Earlier snapshots are untouched.")
    thrice = notify.missed_text(MissedSummary(latest, 3, NOW - 3 * 86400), NOW, UTC)
    assert thrice.body.endswith("\nBackups to backup1 failed 3 times since Wed 19 Nov.")


# -- reminders, missed failures and Open backups on a real bus ---------------------------------------


@dataclass
class FakeDisks:
    """The agent's side of reminders: what is attached, and each disk's last success."""

    successes: dict[str, float | None]
    here: list[str] = field(default_factory=list)

    def attached(self) -> list[str]:
        return list(self.here)

    def last_successes(self) -> dict[str, float | None]:
        return dict(self.successes)


def one_disk(tmp_path: Path, name: str = "backup1") -> Settings:
    mount = tmp_path / "mnt"
    disk = Disk(name=name, luks_uuid=str(uuid.uuid4()), mount_point=str(mount), mapped_device=f"/dev/mapper/{name}",
                repository=str(mount / "host"))
    return Settings(path=None, disks=(disk,), remind_after=7)


class Clock:
    """Epoch seconds the test moves on."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.integration
def test_a_reminder_at_login_then_once_a_day_until_the_disk_is_seen_across_restarts(
    session_bus: PrivateBus, tmp_path: Path
) -> None:
    state = str(tmp_path / "state" / "notifications.json")
    settings = one_disk(tmp_path)
    last = NOW - 9 * 86400
    disks = FakeDisks({"backup1": last})
    clock = Clock(NOW)  # Saturday 12:00 UTC

    async def login(server_address: str) -> tuple[Notifier, MessageBus]:
        bus = await MessageBus(bus_address=server_address).connect()
        notifier = await notify.start(bus, FakeController(), disks=disks, settings=settings, state_path=state,
                                      clock=FakeClock(), now=clock, tz=UTC)
        notifier.login()
        await notifier.flush()
        return notifier, bus

    async def scenario() -> None:
        server_bus, server = await serve(session_bus.address, ["body"])
        notifier, bus = await login(session_bus.address)
        [shown] = server.shown
        assert (shown.summary, shown.body) == (
            "No backup to backup1 for 9 days", "Last backup on Thu 13 Nov. Plug backup1 in: the backup starts by itself."
        )
        # one timer, a day ahead (nothing wakes the agent before)
        timer = notifier.reminder_timer
        assert timer is not None and abs(timer.when() - asyncio.get_running_loop().time() - 86400) < 5
        clock.now += 6 * 3600
        notifier.remind()  # what the timer does: nothing yet
        await notifier.flush()
        assert len(server.shown) == 1
        notifier.close()
        bus.disconnect()

        # an agent restart the same day: not again
        notifier, bus = await login(session_bus.address)
        assert len(server.shown) == 1
        clock.now = NOW + 86400  # the day after, still running: once more, in place of yesterday's
        notifier.remind()
        await notifier.flush()
        assert len(server.shown) == 2 and server.shown[1].summary == "No backup to backup1 for 10 days"
        # the disk is seen: no more reminders, no timer
        notifier.disk_attached("backup1")
        assert notifier.reminder_timer is None
        clock.now += 2 * 86400
        notifier.remind()
        await notifier.flush()
        assert len(server.shown) == 2
        notifier.close()
        bus.disconnect()

        # a login the next morning, 20 hours after the last reminder: a new day, so at once
        clock.now = NOW + 86400 + 20 * 3600
        notifier, bus = await login(session_bus.address)
        assert len(server.shown) == 3 and server.shown[2].summary == "No backup to backup1 for 10 days"
        notifier.close()
        bus.disconnect()
        # a backup succeeded: no reminder at the next login
        disks.successes["backup1"] = clock.now + 3600
        clock.now += 2 * 3600
        notifier, bus = await login(session_bus.address)
        assert len(server.shown) == 3 and notifier.reminder_timer is not None
        notifier.close()
        bus.disconnect()
        server_bus.disconnect()

    run(scenario())


@pytest.mark.integration
def test_a_failure_no_one_could_be_told_is_shown_at_the_next_login_once(session_bus: PrivateBus, tmp_path: Path) -> None:
    state = str(tmp_path / "state" / "notifications.json")
    settings = one_disk(tmp_path)
    disks = FakeDisks({"backup1": NOW - 86400})
    clock = Clock(NOW)

    async def scenario() -> None:
        # no notification server on the bus: the failure cannot be shown
        bus = await MessageBus(bus_address=session_bus.address).connect()
        notifier = await notify.start(bus, FakeController(), disks=disks, settings=settings, state_path=state,
                                      clock=FakeClock(), now=clock, tz=UTC)
        notifier.login()
        notifier.backup_started("backup1", "asked")
        notifier.backup_failed("transfer", "rsync failed (exit status 11)")
        await notifier.flush()
        notifier.close()
        bus.disconnect()
        assert [f.step for f in load_notice_state(state).missed] == ["transfer"]

        # no session bus at all: kept too
        clock.now += 3600
        offline = await notify.start(None, FakeController(), disks=disks, settings=settings, state_path=state,
                                     clock=FakeClock(), now=clock, tz=UTC)
        offline.login()
        offline.backup_started("backup1", "asked")
        offline.backup_failed("unlock", "no key")
        await offline.flush()
        offline.close()
        assert [f.step for f in load_notice_state(state).missed] == ["transfer", "unlock"]

        # the next login, with a server: shown once, then forgotten
        clock.now = NOW + 86400
        server_bus, server = await serve(session_bus.address, ["actions", "body"])
        for _ in range(2):
            bus = await MessageBus(bus_address=session_bus.address).connect()
            notifier = await notify.start(bus, FakeController(), disks=disks, settings=settings, state_path=state,
                                          clock=FakeClock(), now=clock, tz=UTC)
            notifier.login()
            await notifier.flush()
            notifier.close()
            bus.disconnect()
        [missed] = server.shown
        assert missed.summary == "Backup to backup1 failed while unlocking the disk yesterday at 13:00"
        assert missed.hints["urgency"] == CRITICAL and missed.actions == ["backup-now", "Back up now"]
        assert missed.body.endswith("Backups to backup1 failed 2 times since Sat 22 Nov.")
        assert load_notice_state(state).missed == []
        # once a backup of that disk starts, the old failure is stale: withdrawn, not left above it
        clock.now = NOW + 2 * 86400
        notice = dataclasses.replace(load_notice_state(state), missed=[MissedFailure(NOW, "backup1", "transfer", "x")])
        save_notice_state(state, notice)
        bus = await MessageBus(bus_address=session_bus.address).connect()
        notifier = await notify.start(bus, FakeController(), disks=disks, settings=settings, state_path=state,
                                      clock=FakeClock(), now=clock, tz=UTC)
        notifier.login()
        await notifier.flush()
        again = server.shown[-1]
        assert again.summary.startswith("Backup to backup1 failed") and again.id not in server.closed
        notifier.backup_started("backup1", "plugged in, unfinished")
        await notifier.flush()
        assert again.id in server.closed and server.shown[-1].summary == "Backing up to backup1"
        notifier.close()
        bus.disconnect()
        server_bus.disconnect()

    run(scenario())


@pytest.mark.integration
def test_the_next_agent_withdraws_the_cards_an_earlier_one_left_once_untrue(session_bus: PrivateBus, tmp_path: Path) -> None:
    state = str(tmp_path / "state" / "notifications.json")
    settings = one_disk(tmp_path)
    disks = FakeDisks({"backup1": NOW - 86400}, ["backup1"])
    clock = Clock(NOW)

    async def agent(address: str, login: bool = True) -> tuple[Notifier, MessageBus]:
        bus = await MessageBus(bus_address=address).connect()
        notifier = await notify.start(bus, FakeController(), disks=disks, settings=settings, state_path=state,
                                      clock=FakeClock(), now=clock)
        if login:
            notifier.login()
        await notifier.flush()
        return notifier, bus

    async def scenario() -> None:
        server_bus, server = await serve(session_bus.address, ["actions", "body"])
        first, bus = await agent(session_bus.address)
        first.backup_started("backup1", "asked")
        first.backup_failed("transfer", "transfer failed: rsync said so")
        await first.flush()
        failed = server.shown[-1]
        first.close()  # the agent restarts: its cards stay on screen
        bus.disconnect()

        # Still true (no success since): left as it is, and the next card of that disk replaces it in place.
        clock.now += 60
        second, bus = await agent(session_bus.address)
        assert server.closed == []
        server.action_invoked(failed.id, "backup-now")  # its button still works for the new agent
        await until(lambda: second._controller.calls == ["backup_now"])  # type: ignore[union-attr]
        second.backup_started("backup1", "asked")
        second.backup_completed(COMPLETE)
        second.status_changed(AgentStatus(state="disk-attached", disk="backup1", last_success=clock.now,
                                          last_result="success", next_due=clock.now + 3600, disk_left="locked"))
        await second.flush()
        done = server.shown[-1]
        assert done.replaces_id == failed.id and done.body.endswith("It is safe to unplug backup1.")
        second.close()
        bus.disconnect()

        # Unplugged while no agent ran: "safe to unplug" is done with, and the next agent withdraws it.
        disks.successes["backup1"], disks.here = clock.now, []
        clock.now += 60
        third, bus = await agent(session_bus.address)
        assert server.order[-1] == ("close", done.id)
        third.backup_started("backup1", "asked")  # a later card is a new one, not a replacement of the closed one
        await third.flush()
        assert server.shown[-1].replaces_id == 0
        third.backup_failed("transfer", "transfer failed: rsync said so")
        await third.flush()
        third.close()
        bus.disconnect()

        # Another server (a new login): its ids are not the earlier server's; nothing of it is closed.
        server_bus.disconnect()
        server_bus, server = await serve(session_bus.address, ["actions", "body"])
        disks.successes["backup1"] = clock.now + 1
        clock.now += 60
        fourth, bus = await agent(session_bus.address)
        fourth.backup_started("backup1", "asked")
        await fourth.flush()
        assert server.closed == [] and server.shown[-1].replaces_id == 0
        fourth.close()
        bus.disconnect()

        # A cycle that starts before the next agent's login replaces the earlier "running" card in place,
        # and the login then leaves this agent's own card alone.
        running = server.shown[-1]
        fifth, bus = await agent(session_bus.address, login=False)
        fifth.backup_started("backup1", "asked")
        fifth.login()
        await fifth.flush()
        assert server.shown[-1].replaces_id == running.id and server.closed == []
        fifth.close()
        bus.disconnect()
        server_bus.disconnect()

    run(scenario())


@pytest.mark.integration
def test_a_failure_followed_by_a_success_is_not_shown_at_login(session_bus: PrivateBus, tmp_path: Path) -> None:
    state = str(tmp_path / "notifications.json")
    save_notice_state(state, NoticeState(missed=[MissedFailure(NOW - 7200, "backup1", "transfer", "it broke")]))
    disks = FakeDisks({"backup1": NOW - 3600})

    async def scenario() -> None:
        server_bus, server = await serve(session_bus.address, ["body"])
        bus = await MessageBus(bus_address=session_bus.address).connect()
        notifier = await notify.start(bus, None, disks=disks, settings=one_disk(tmp_path), state_path=state,
                                      now=lambda: NOW, tz=UTC)
        notifier.login()
        await notifier.flush()
        assert server.shown == [] and load_notice_state(state).missed == []
        notifier.close()
        bus.disconnect()
        server_bus.disconnect()

    run(scenario())


XDG_OPEN = """#!/bin/sh
# A stand-in for xdg-open (tests/test_notify.py): records its argv, one per line.
for arg in "$@"; do printf '%s\\n' "$arg"; done > {record}
"""


@pytest.mark.integration
def test_open_backups_is_offered_only_when_the_snapshot_can_be_reached_and_runs_xdg_open(
    session_bus: PrivateBus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "xdg-open.argv"
    (bin_dir / "xdg-open").write_text(XDG_OPEN.format(record=record))
    (bin_dir / "xdg-open").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    settings = one_disk(tmp_path)
    snapshot = tmp_path / "mnt" / "host" / "snapshots" / str(COMPLETE.snapshot)
    snapshot.mkdir(parents=True)

    def ended(left: str, detail: str = "") -> AgentStatus:
        return AgentStatus(state="disk-attached", disk="backup1", last_success=NOW, last_result="success",
                           disk_left=left, disk_left_detail=detail)  # type: ignore[arg-type]

    async def scenario() -> None:
        server_bus, server = await serve(session_bus.address, ["actions", "body"])
        bus = await MessageBus(bus_address=session_bus.address).connect()
        notifier = await notify.start(bus, None, settings=settings, clock=FakeClock(), now=lambda: NOW)

        # locked again (the normal case): nothing to open
        notifier.backup_started("backup1", "asked")
        notifier.backup_completed(COMPLETE)
        notifier.status_changed(ended("locked"))
        await notifier.flush()
        assert server.shown[-1].body.endswith("It is safe to unplug backup1.") and server.shown[-1].actions == []

        # found mounted, left mounted: the snapshot is there, so it is offered
        notifier.backup_started("backup1", "asked")
        notifier.backup_completed(COMPLETE)
        notifier.status_changed(ended("mounted", str(tmp_path / "mnt")))
        await notifier.flush()
        done = server.shown[-1]
        assert done.actions == ["open-backups", "Open backups"]
        assert "stays unlocked and mounted at" in done.body and "safe to unplug" not in done.body
        server.action_invoked(done.id, "open-backups")
        await until(lambda: record.exists() and record.read_text().endswith("\n"))
        assert record.read_text().splitlines() == [str(snapshot)]

        # mounted, but the snapshot is not there for this user: not offered
        snapshot.rename(snapshot.with_name("elsewhere"))
        notifier.backup_started("backup1", "asked")
        notifier.backup_completed(COMPLETE)
        notifier.status_changed(ended("mounted", str(tmp_path / "mnt")))
        await notifier.flush()
        assert server.shown[-1].actions == []
        notifier.close()
        bus.disconnect()
        server_bus.disconnect()

    run(scenario())


# -- the real agent and cycle: "safe to unplug" only when it is ------------------------------------


async def notified_cycle(
    bench: Bench, address: str, plug_in: bool = False
) -> tuple[list[Shown], AgentStatus, int | None, Recorder]:
    """One cycle of the real agent with a real Notifier as a listener: what the server was shown.

    ``plug_in``: the disk's LUKS image is attached once the agent watches.
    Returns the notifications, the agent's status and the cycle's exit status
    at its end, and the agent's recorded listener calls.
    """
    server_bus, server = await serve(address, ["actions", "body"])
    bus = await MessageBus(bus_address=address).connect()
    notifier = await notify.start(bus, None, settings=load_settings(str(bench.config)))
    try:
        async with agent_on(bench, extra_listeners=(notifier,)) as (agent, recorder):
            if plug_in:
                bench.rig.attach(bench.rig.luks_image)
            await one_cycle(agent, recorder)
            status, returncode = agent.status(), agent.last_returncode
            await notifier.flush()
    finally:
        notifier.close()
        bus.disconnect()
        server_bus.disconnect()
    return server.shown, status, returncode, recorder


@real
@pytest.mark.parametrize("case", ["locked", "found unlocked", "found mounted", "lock fails"])
def test_the_completed_notification_tells_how_the_real_cycle_left_the_disk(
    bench: Bench, here: None, session_bus: PrivateBus, case: str
) -> None:
    bench.prepared()  # one snapshot made by the CLI; the disk stays attached
    if case == "lock fails":
        bench.write_config(variant="stop-fails")
    elif case != "locked":
        bench.rig.unlock_by_hand()
    if case == "found mounted":
        bench.rig.mount_by_hand(str(bench.rig.mapped))
    settle()

    async def scenario() -> None:
        shown, status, _, recorder = await notified_cycle(bench, session_bus.address)
        assert status.last_result == "success", (status, recorder.calls)
        final = shown[-1]
        assert final.summary.startswith(f"Backup to {NAME} complete"), shown
        if case == "locked":
            assert (status.disk_left, status.disk_left_detail) == ("locked", "")
            assert final.body.endswith(f"It is safe to unplug {NAME}.")
        else:
            assert "safe to unplug" not in final.body
        if case == "found unlocked":
            assert status.disk_left == "unlocked"
            assert final.body.endswith(f"{NAME} was unmounted but stays unlocked, as it was found: eject it before you unplug it.")
        if case == "found mounted":
            assert (status.disk_left, status.disk_left_detail) == ("mounted", str(bench.rig.mount_point))
            assert final.body.endswith(
                f"{NAME} stays unlocked and mounted at {bench.rig.mount_point}, as it was found: eject it before you unplug it."
            )
            assert final.actions == ["open-backups", "Open backups"]  # the snapshot is there to open
        if case == "lock fails":
            assert status.disk_left == "lock-failed" and f"locking {NAME} failed" in status.disk_left_detail
            assert final.summary == f"Backup to {NAME} complete, but the disk is still unlocked"
            assert f"Could not lock {NAME}: locking {NAME} failed" in final.body
            assert final.body.endswith("Do not unplug it yet.")
        if case != "found mounted":
            assert final.actions == []

    asyncio.run(asyncio.wait_for(scenario(), 60))


@real
@pytest.mark.parametrize("plugged", ["before the agent started", "after the agent started"])
def test_the_first_backup_after_the_agent_starts_says_when_the_last_one_was(
    bench: Bench, here: None, session_bus: PrivateBus, plugged: str
) -> None:
    """The agent read the disk's last backup from its state file: the started notification says so."""
    bench.init()
    last = time.time() - 3 * 86400
    save_state(str(bench.tmp / "agent-state" / "state.json"),
               {NAME: DiskRecord(last_success=last, last_result="success", last_message="snapshot S")},
               AgentStatus(disk=NAME, last_success=last, last_result="success"))
    if plugged == "after the agent started":
        detach(bench.rig.luks_device)
    settle()

    async def scenario() -> None:
        shown, _, _, recorder = await notified_cycle(bench, session_bus.address, plugged == "after the agent started")
        started = shown[0]
        assert started.summary == f"Backing up to {NAME}", shown
        assert started.body.startswith("Last backup 3 days ago. Started because the disk was plugged in."), started.body
        # Every listener (the tray's tooltip too) hears of the running cycle and of
        # this disk's last backup before it hears that the backup started.
        first = next(i for i, (call, _, _) in enumerate(recorder.calls) if call == "backup_started")
        before = [args[0] for call, args, _ in recorder.calls[:first] if call == "status_changed"]
        assert before and (before[-1].state, before[-1].disk, before[-1].last_success) == ("running", NAME, last)

    asyncio.run(asyncio.wait_for(scenario(), 60))


@real
def test_a_full_disk_says_to_make_room_not_to_keep_the_disk_plugged_in(
    bench: Bench, here: None, session_bus: PrivateBus
) -> None:
    """The real cycle runs out of space: the hint follows the cause (its exit status), not the step."""
    bench.prepared()
    with bench.looking() as root:
        free = os.statvfs(root).f_bavail * os.statvfs(root).f_frsize
    (bench.source / "big.bin").write_bytes(os.urandom(free + 4 * 1024 * 1024))
    settle()

    async def scenario() -> None:
        shown, _, returncode, _ = await notified_cycle(bench, session_bus.address)
        assert returncode == EXIT_DISK_FULL
        failed = shown[-1]
        assert failed.summary == f"Backup to {NAME} failed while copying files", shown
        assert failed.body.startswith("The backup disk is full (") and "plugged in" not in failed.body
        # what to do is said once: the cycle's message names the tools, the hint points to it
        assert failed.body.count("keep_free") == failed.body.count("backup-agent rotate --discard-unfinished") == 1
        assert failed.body.endswith(
            "\nMake room on the disk as it says, then try again with Back up now.\nEarlier snapshots are untouched."
        )

    asyncio.run(asyncio.wait_for(scenario(), 60))


# -- backup-agent run: the login's reminder, and both ways to turn notifications off -----------------


@real
@pytest.mark.parametrize("switch", ["on", "--disable-notifications", "enabled = false"])
def test_backup_agent_run_reminds_at_login_unless_notifications_are_off(
    session_bus: PrivateBus, here: None, trusted_dir: Path, tmp_path: Path, switch: str
) -> None:
    config = trusted_dir / "config.toml"
    lines = ["[notifications]", "remind_after = 7"]
    if switch == "enabled = false":
        lines.append("enabled = false")
    lines += ["[[disk]]", 'name = "backup1"', f'luks_uuid = "{uuid.uuid4()}"', f'mount_point = "{tmp_path / "mnt"}"']
    config.write_text("\n".join(lines) + "\n")
    state_home = tmp_path / "xdg-state"
    # the agent has known the disk for a month, and it never had a backup
    save_notice_state(str(state_home / "backup-agent" / "notifications.json"),
                      NoticeState(known_since={"backup1": NOW - 30 * 86400}))
    env = {k: v for k, v in os.environ.items() if k not in ("SUDO_UID", "NOTIFY_SOCKET", "WATCHDOG_USEC")}
    env.update(DBUS_SESSION_BUS_ADDRESS=session_bus.address, XDG_STATE_HOME=str(state_home))
    env.pop("DBUS_SYSTEM_BUS_ADDRESS", None)
    argv = [sys.executable, "-m", "agent.cli", "run", "--no-sudo", "--config", str(config)]
    if switch == "--disable-notifications":
        argv.append(switch)
    log_path = tmp_path / "agent.log"

    async def scenario() -> None:
        server_bus, server = await serve(session_bus.address, ["actions", "body"])
        with open(log_path, "wb") as log_file:
            agent = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            await until(lambda: "watching for" in log_path.read_text() or agent.poll() is not None, 15)
            assert agent.poll() is None, log_path.read_text()
            if switch == "on":
                await until(lambda: server.shown, 5)
                [reminder] = server.shown
                assert reminder.summary == "No backup to backup1 yet" and reminder.app_name == "Backups"
            else:
                await asyncio.sleep(1.0)  # the reminder comes within milliseconds when notifications are on
                assert server.shown == []
                assert "desktop notifications are turned off" in log_path.read_text()
            agent.send_signal(signal.SIGTERM)
            while agent.poll() is None:
                await asyncio.sleep(0.05)
            assert agent.returncode == 0 and "Traceback" not in log_path.read_text(), log_path.read_text()
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
            server_bus.disconnect()

    asyncio.run(asyncio.wait_for(scenario(), 40))
