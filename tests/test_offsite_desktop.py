"""The off-site copy on the desktop: the status, the texts, the tray's tooltip, the D-Bus
dictionaries, and the notifications' "copied off-site" and reminder on a real private bus.

The decisions are pure and tested directly; the notifications go to a
notification server that the test exports on a private session bus.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from dbus_fast.aio import MessageBus

from agent.config.model import Offsite, Settings
from agent.core import events
from agent.desktop.daemon import Agent, AgentOptions, _Cycle, offsite_records
from agent.desktop.dbus import control, traylook
from agent.desktop.dbus.client import format_status, offsite_line, status_from_mapping
from agent.desktop.dbus.notify import LOW, NORMAL
from agent.desktop.dbus import notify
from agent.desktop.dbus.texts import offsite_reminder_text, offsite_text, step_words
from agent.desktop.state import AgentStatus, OffsiteStatus, offsite_after, offsite_from, offsite_maintained
from tests.test_dbus_control import PrivateBus, private_bus, run  # noqa: F401  (fixture)
from tests.test_notify import Clock, FakeClock, FakeController, FakeDisks, serve, session_bus  # noqa: F401  (fixture)

NOW = 1763812800.0  # 2025-11-22 12:00:00 UTC
UTC = dt.timezone.utc
DAY = 86400.0


def test_an_offsite_step_changes_the_record_as_it_ended() -> None:
    before = OffsiteStatus("cloud", NOW - 3 * DAY, "old", "copied", "")
    done = offsite_after(before, "done", {"offsite": "cloud", "snapshot": "2025-11-22T12-00-00+0000"}, NOW)
    assert done == OffsiteStatus("cloud", NOW, "2025-11-22T12-00-00+0000", "copied", "")
    failed = offsite_after(done, "failed", {"message": "the off-site repository cannot be reached"}, NOW + 60)
    assert (failed.result, failed.last_copy, failed.message) == ("failed", NOW, "the off-site repository cannot be reached")
    skipped = offsite_after(done, "skipped", {"reason": "the connection is metered"}, NOW + 60)
    assert (skipped.result, skipped.last_copy, skipped.message) == ("copied", NOW, "the connection is metered")


def test_status_says_pruning_belongs_to_the_server_owner_and_shows_the_last_check() -> None:
    record = OffsiteStatus("cloud", NOW, "s", "copied")
    note = "cloud is append-only: forgetting and pruning old off-site snapshots belong to the server's owner"
    record = offsite_maintained(record, "offsite-forget", "skipped", {"offsite": "cloud", "reason": note})
    record = offsite_maintained(record, "offsite-check", "done", {"offsite": "cloud", "subset": "3/12", "result": "ok"})
    assert (record.retention, record.check) == (note, "ok (3/12)")
    line = offsite_line(record, NOW)
    assert "belong to the server's owner" in line and "last check ok (3/12)" in line
    damaged = offsite_maintained(record, "offsite-check", "failed", {"message": "restic check of 4/12 found damage: pack 1f is damaged"})
    assert damaged.check == "restic check of 4/12 found damage: pack 1f is damaged"
    assert offsite_maintained(record, "offsite-forget", "done", {"forgotten": 2}).retention == ""


def test_records_follow_the_configuration_and_keep_what_was_saved() -> None:
    sites = (Offsite("cloud", repository="/r", password_file="/p"), Offsite("nas", repository="/n", password_file="/p"))
    settings = Settings(path=None, offsite=sites)
    saved = [{"name": "cloud", "last_copy": NOW, "snapshot": "s", "result": "copied"}, {"name": "gone"}, {"no": "name"}, 5]
    assert offsite_records(settings, saved) == [OffsiteStatus("cloud", NOW, "s", "copied", ""), OffsiteStatus("nas")]
    assert offsite_records(settings, "not a list") == [OffsiteStatus("cloud"), OffsiteStatus("nas")]
    assert offsite_from({"name": "x", "last_copy": True}) == OffsiteStatus("x")


def test_status_shows_the_newest_offsite_copy_and_its_age() -> None:
    record = OffsiteStatus("cloud", NOW - 2 * DAY - 3 * 3600, "2025-11-20T09-00-00+0000", "copied", "")
    assert "newest copy 2025-11-20T09-00-00+0000" in offsite_line(record, NOW) and "(2 d 3 h old)" in offsite_line(record, NOW)
    failing = OffsiteStatus("cloud", None, None, "failed", "the repository refused the password")
    assert offsite_line(failing, NOW) == "no copy yet; last try failed: the repository refused the password"
    status = AgentStatus(offsite=[record])
    again = status_from_mapping(status.as_dict(), source="test")
    assert again.offsite == [record]
    assert "off-site:\n  cloud: newest copy" in format_status(again, live=True)
    assert "off-site" not in format_status(AgentStatus(), live=True)


def test_the_words_of_a_copy_and_of_a_reminder() -> None:
    assert offsite_text("cloud", "done", "s1", "") == offsite_text("cloud", "done", "s1", "x")
    done = offsite_text("cloud", "done", "s1", "")
    assert done.summary == "Copied off-site to cloud" and "s1" in done.body and done.urgency == LOW
    failed = offsite_text("cloud", "failed", "s1", "the off-site storage is full (quota exceeded)")
    assert failed.summary == "Not copied off-site to cloud" and failed.urgency == NORMAL
    assert failed.body.startswith("The off-site storage is full") and "untouched" in failed.body
    assert offsite_reminder_text("cloud", NOW - 9 * DAY, NOW, UTC).summary == "No off-site copy to cloud for 9 days"
    assert offsite_reminder_text("cloud", None, NOW, UTC).summary == "No off-site copy to cloud yet"
    assert step_words("offsite") == "copying the snapshot off-site"


def test_the_tray_tooltip_says_copied_off_site_or_why_not() -> None:
    status = AgentStatus(last_success=NOW - 3600, last_result="success", offsite=[OffsiteStatus("cloud", NOW - 7200, "s", "copied")])
    assert "Copied off-site to cloud 2 hours ago." in traylook.tooltip(status, None, NOW)[1]
    status.offsite = [OffsiteStatus("cloud", NOW - 7200, "s", "failed", "the off-site repository cannot be reached")]
    assert "Not copied off-site to cloud: The off-site repository cannot be reached." in traylook.tooltip(status, None, NOW)[1]


def test_dbus_progress_carries_the_offsite_fields_and_get_status_the_records() -> None:
    event = events.progress(25.0, 1000, 10, 500.0, 6, step="offsite", bytes_total=4000, files_total=40, errors=0, current="/a")
    values = control.progress_vardict(event, 2.0)
    assert {key: value.value for key, value in values.items()} == {
        "percent": 25.0, "bytes_done": 1000, "files_done": 10, "rate": 500.0, "remaining": 6, "elapsed": 2.0,
        "step": "offsite", "bytes_total": 4000, "files_total": 40, "errors": 0, "current": "/a",
    }
    assert "step" not in control.progress_vardict(events.progress(1, 1, 1, None, None), None)
    status = AgentStatus(offsite=[OffsiteStatus("cloud", NOW, "s", "copied")])
    reply = control.status_vardict(status)
    assert reply["offsite"].signature == "aa{sv}" and reply["offsite"].value[0]["name"].value == "cloud"
    assert "offsite" not in control.status_vardict(AgentStatus())


@pytest.mark.integration
def test_copied_off_site_is_told_and_an_old_copy_is_reminded_of(session_bus: PrivateBus, tmp_path: Path) -> None:  # noqa: F811
    settings = Settings(path=None, remind_after=0, offsite=(Offsite("cloud", repository="/r", password_file="/p", remind_after=3),))
    clock = Clock(NOW)

    async def scenario() -> None:
        server_bus, server = await serve(session_bus.address, ["body"])
        bus = await MessageBus(bus_address=session_bus.address).connect()
        notifier = await notify.start(
            bus, FakeController(), disks=FakeDisks({}), settings=settings, state_path=str(tmp_path / "notifications.json"),
            clock=FakeClock(), now=clock, tz=UTC,
        )
        # The agent's status: the last off-site copy four days ago, older than its remind_after of 3.
        notifier.status_changed(AgentStatus(offsite=[OffsiteStatus("cloud", NOW - 4 * DAY, "s0", "copied")]))
        notifier.login()
        await notifier.flush()
        assert [card.summary for card in server.shown] == ["No off-site copy to cloud for 4 days"]
        # A copy ends: "copied off-site"; a copy that was not due says nothing.
        notifier.offsite_finished(OffsiteStatus("cloud", NOW, "s1", "copied"), "done")
        notifier.offsite_finished(OffsiteStatus("cloud", NOW, "s1", "copied", "not due"), "skipped")
        await notifier.flush()
        assert [card.summary for card in server.shown][1:] == ["Copied off-site to cloud"]
        # With a fresh copy, no reminder the next day.
        notifier.status_changed(AgentStatus(offsite=[OffsiteStatus("cloud", NOW, "s1", "copied")]))
        clock.now = NOW + DAY
        notifier.remind()
        await notifier.flush()
        assert len(server.shown) == 2
        notifier.close()
        bus.disconnect()
        server_bus.disconnect()

    run(scenario())


class Heard:
    """A listener that hears off-site copies (and everything else, to pass it by)."""

    def __init__(self) -> None:
        self.offsite: list[tuple[OffsiteStatus, str]] = []
        self.statuses: list[AgentStatus] = []
        self.progressed: list[events.ProgressEvent] = []

    def offsite_finished(self, offsite: OffsiteStatus, state: str) -> None:
        self.offsite.append((offsite, state))

    def status_changed(self, status: AgentStatus) -> None:
        self.statuses.append(status)

    def progress(self, event: events.ProgressEvent) -> None:
        self.progressed.append(event)

    def __getattr__(self, name: str) -> Any:
        return lambda *args: None


def test_the_agent_records_each_copy_from_the_cycles_lines_and_keeps_it_across_a_restart(tmp_path: Path) -> None:
    """The cycle's real JSON lines, read where the agent reads them (its stdout handler), with a real state file."""
    settings = Settings(path=None, offsite=(Offsite("cloud", repository="/r", password_file="/p"),))
    options = AgentOptions(cycle_argv=("/bin/false",), state_file=str(tmp_path / "state.json"))
    heard = Heard()
    agent = Agent(settings, options, [heard], clock=lambda: NOW)
    cycle = _Cycle(disk="backup1", reason="now", started=NOW, started_monotonic=0.0)
    lines = [
        events.step("offsite", "start", offsite="cloud", snapshot="2025-11-22T12-00-00+0000"),
        events.progress(40.0, 400, 4, 100.0, 6, step="offsite", bytes_total=1000, files_total=10, errors=0, current="/a"),
        events.step("offsite", "done", offsite="cloud", snapshot="2025-11-22T12-00-00+0000", id="abcd", files=10),
        events.step("offsite-forget", "skipped", offsite="cloud", reason="cloud is append-only: ... belong to the server's owner"),
        events.step("offsite", "done", offsite="elsewhere", snapshot="x"),  # not configured: passed over
    ]
    for event in lines:
        agent._on_stdout(cycle, events.encode(event))
    [record] = agent.status().offsite
    assert (record.last_copy, record.snapshot, record.result) == (NOW, "2025-11-22T12-00-00+0000", "copied")
    assert "server's owner" in record.retention
    assert [(o.name, state) for o, state in heard.offsite] == [("cloud", "done")]
    assert [(p.step, p.files_total, p.current) for p in heard.progressed] == [("offsite", 10, "/a")]
    again = Agent(settings, options, [], clock=lambda: NOW + DAY)
    assert again.status().offsite == [record]
