"""Progress where each desktop shows it, and the tray's actions where there is no tray.

The words and calls are pure (agent/desktop/dbus/jobview.py, launcher.py,
notray.py) and tested directly; the listeners run against a real private
session bus, with a notification server and a KDE job server that are
stand-ins at the process boundary (tests/test_notify.py,
tests/helpers/desktop_services.py).
"""

from __future__ import annotations

import logging
import re
import shlex
from pathlib import Path
from typing import Annotated

import pytest
from dbus_fast import DBusError, Message, NameFlag
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusObjectPath, DBusSignature, DBusStr
from dbus_fast.service import ServiceInterface, dbus_method

from agent import cli
from agent.core import events
from agent.desktop.dbus import jobview, launcher, notify, notray
from agent.desktop.dbus.jobview import JobCall
from agent.desktop.dbus.traylook import Place, menu_items
from agent.desktop.state import AgentStatus
from tests.test_dbus_control import PrivateBus, run
from tests.test_notify import NOW, FakeClock, FakeController, serve, session_bus  # noqa: F401  (session_bus: fixture)

README = Path(__file__).resolve().parent.parent / "README.md"


# -- pure ------------------------------------------------------------------------------------------


def test_the_job_view_is_told_percent_speed_and_what_was_copied() -> None:
    assert jobview.started_calls("backup1") == (
        JobCall("setInfoMessage", "s", ("Backing up to backup1",)),
        JobCall("setDescriptionField", "uss", (0, "Destination", "backup1")),
    )
    calls = jobview.progress_calls(events.progress(42.7, 1048576, 12, 350000.0, 90))
    assert calls == (
        JobCall("setPercent", "u", (42,)),
        JobCall("setSpeed", "t", (350000,)),
        JobCall("setProcessedAmount", "ts", (1048576, "bytes")),
        JobCall("setProcessedAmount", "ts", (12, "files")),
        JobCall("setDescriptionField", "uss", (1, "Copied", "12 files, 1.0 MiB")),
    )
    # the file being copied, once the cycle names one, in the second field (as Plasma's own copies show it)
    copying = jobview.progress_calls(events.progress(42.7, 1048576, 12, 350000.0, 90, current="/home/a/b.txt"))
    assert copying[-1] == JobCall("setDescriptionField", "uss", (1, "File", "/home/a/b.txt"))
    assert jobview.v3_update(copying)["descriptionValue2"].value == "/home/a/b.txt"
    # what rsync does not know yet is not said
    assert [c.member for c in jobview.progress_calls(events.progress(None, 0, 0, None, None))] == [
        "setProcessedAmount", "setProcessedAmount", "setDescriptionField"]
    assert jobview.step_calls("backup1", "transfer") == (
        JobCall("setInfoMessage", "s", ("Backing up to backup1: copying files",)),)
    assert jobview.ended_calls("the disk is full") == (JobCall("terminate", "s", ("the disk is full",)),)


def test_the_launcher_entry_shows_a_bar_from_0_to_1_or_none() -> None:
    assert {k: v.value for k, v in launcher.launcher_properties(0.25).items()} == {
        "progress": 0.25, "progress-visible": True}
    assert launcher.launcher_properties(1.7)["progress"].value == 1.0
    assert {k: v.value for k, v in launcher.launcher_properties(None).items()} == {"progress-visible": False}


def test_every_tray_item_is_reachable_without_a_tray_and_the_readme_says_how() -> None:
    status = AgentStatus(state="disk-attached", disk="b1")
    menus = [
        menu_items(status, ["b1"], ["b1", "b2"], Place()),
        menu_items(status, ["b1", "b2"], ["b1", "b2"], Place(unlocked=True, mounts=("/m",), latest="/m/x")),
        menu_items(AgentStatus(state="running", disk="b1"), ["b1"], ["b1"], None),
        menu_items(AgentStatus(), [], ["b1"], None),
    ]
    labels = {item.label for menu in menus for item in menu if not item.separator}
    for label in labels:
        assert any(label.startswith(entry.item) for entry in notray.WITHOUT_TRAY), label
    readme = README.read_text(encoding="utf-8")
    section = readme[readme.index("### Without a tray"):]
    section = section[: section.index("\n## ")]
    parser = cli.build_parser()
    for entry in notray.WITHOUT_TRAY:
        assert f"`{entry.command}`" in section, entry
        words = shlex.split(entry.command.replace("[DISK]", "").replace("NAME", "b1"))
        if words[0] == "sudo":
            words = words[2:]
        if words[0] == "backup-agent":
            parser.parse_args(words[1:])  # a real subcommand, in a form the CLI takes
    # the notification actions the list names are the notifier's
    for label in re.findall(r"(Back up now|Stop|Not now|Open backups),", " ".join(e.notification + "," for e in
                                                                                 notray.WITHOUT_TRAY)):
        assert label in notify.ACTION_LABELS.values()


# -- the listeners on a real bus --------------------------------------------------------------------


@pytest.mark.integration
def test_while_a_job_view_shows_the_progress_the_notification_is_not_updated_with_it(session_bus: PrivateBus) -> None:
    async def scenario() -> None:
        server_bus, server = await serve(session_bus.address, ["actions", "body"])
        bus = await MessageBus(bus_address=session_bus.address).connect()
        clock = FakeClock()
        notifier = await notify.start(bus, FakeController(), clock=clock, now=lambda: NOW)
        notifier.backup_started("backup1", "asked")
        clock.now += 10
        notifier.progress(events.progress(30.0, 1000, 1, None, 90))
        await notifier.flush()
        assert [card.summary for card in server.shown] == ["Backing up to backup1", "Backing up to backup1: 30%"]
        notifier.progress_elsewhere = lambda: True
        clock.now += 10
        notifier.progress(events.progress(60.0, 2000, 2, None, 60))
        await notifier.flush()
        assert len(server.shown) == 2
        notifier.close()
        bus.disconnect()
        server_bus.disconnect()

    run(scenario())


class RefusingJobServer(ServiceInterface):
    """A job server that refuses every view: the agent must go on without one."""

    def __init__(self) -> None:
        super().__init__("org.kde.JobViewServer")
        self.asked = 0

    @dbus_method(name="requestView")
    def _request_view(self, app_name: DBusStr, icon: DBusStr, capabilities: Annotated[int, DBusSignature("i")]) -> DBusObjectPath:
        self.asked += 1
        raise DBusError("org.kde.Error.Refused", "no more jobs")


@pytest.mark.integration
def test_a_job_server_that_fails_is_logged_once_and_changes_nothing(
    session_bus: PrivateBus, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        server_bus = await MessageBus(bus_address=session_bus.address).connect()
        refusing = RefusingJobServer()
        server_bus.export("/JobViewServer", refusing)
        await server_bus.request_name("org.kde.JobViewServer", NameFlag.DO_NOT_QUEUE)
        bus = await MessageBus(bus_address=session_bus.address).connect()
        views = jobview.JobViews(bus, FakeController())
        for _ in range(2):
            views.backup_started("backup1", "asked")
            views.progress(events.progress(50.0, 10, 1, 5.0, 3))
            views.backup_completed(events.complete("2025-11-22T12-00-00+0000"))
            views.status_changed(AgentStatus(state="disk-attached", disk="backup1"))
            await views.flush()
        assert refusing.asked == 2 and not views.active
        views.close()
        bus.disconnect()
        server_bus.disconnect()

    with caplog.at_level(logging.DEBUG, logger="agent"):
        run(scenario())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "KDE job" in r.getMessage()]
    assert len(warnings) == 1 and "no more jobs" in warnings[0].getMessage()


@pytest.mark.integration
def test_no_job_server_means_no_view_and_no_warning(session_bus: PrivateBus, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        bus = await MessageBus(bus_address=session_bus.address).connect()
        views = jobview.JobViews(bus)
        views.backup_started("backup1", "asked")
        await views.flush()
        assert not views.active
        assert await notray.has_tray(bus) is False
        views.close()
        bus.disconnect()

    with caplog.at_level(logging.INFO, logger="agent"):
        run(scenario())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.integration
def test_a_server_with_only_the_newer_form_gets_one_update_per_change_and_its_cancel_stops(
    session_bus: PrivateBus,
) -> None:
    from tests.helpers.desktop_services import serve_jobviews_v2_only
    from tests.test_notify import until

    async def scenario() -> None:
        server_bus, server = await serve_jobviews_v2_only(session_bus.address)
        bus = await MessageBus(bus_address=session_bus.address).connect()
        controller = FakeController()
        views = jobview.JobViews(bus, controller)
        views.backup_started("backup1", "asked")
        views.progress(events.progress(42.0, 2048, 3, 100.0, 9))
        await views.flush()
        assert server.requests == [("backup-agent", 1, {"immediate": True})] and views.active
        view = server.views[0]
        await until(lambda: len(view.updates) == 2)
        assert view.updates[0] == {"infoMessage": "Backing up to backup1", "descriptionLabel1": "Destination",
                                   "descriptionValue1": "backup1"}
        assert view.updates[1] == {"percent": 42, "speed": 100, "processedBytes": 2048, "processedFiles": 3,
                                   "descriptionLabel2": "Copied", "descriptionValue2": "3 files, 2.0 KiB"}
        view.cancel_requested()
        await until(lambda: controller.calls == ["stop"])
        views.backup_failed("transfer", "interrupted by SIGTERM")
        await views.flush()
        await until(lambda: view.terminated is not None)
        assert view.terminated == (100, "interrupted by SIGTERM", {}) and not views.active
        views.close()
        bus.disconnect()
        server_bus.disconnect()

    run(scenario())


@pytest.mark.integration
def test_the_dock_hears_the_progress_for_the_launcher_install_writes(session_bus: PrivateBus) -> None:
    """The Update broadcast and Query name application://backup-agent.desktop, the file install puts in place."""
    from agent.system.install import LAUNCHER_FILE
    from tests.helpers.desktop_services import listen_to_launcher
    from tests.test_notify import until

    uri = "application://" + Path(LAUNCHER_FILE).name

    async def scenario() -> None:
        dock_bus, heard = await listen_to_launcher(session_bus.address)
        bus = await MessageBus(bus_address=session_bus.address).connect()
        clock = FakeClock()
        shown = launcher.start(bus, clock=clock)
        assert shown is not None
        shown.entry.backup_started("backup1", "asked")
        clock.now += 2
        shown.entry.progress(events.progress(40.0, 10, 1, 5.0, 3))
        await until(lambda: len(heard) == 2)
        assert heard == [(uri, {"progress": 0.0, "progress-visible": True}),
                         (uri, {"progress": 0.4, "progress-visible": True})]
        reply = await dock_bus.call(Message(destination=bus.unique_name, path=launcher.LAUNCHER_PATH,
                                            interface=launcher.LAUNCHER_INTERFACE, member="Query"))
        assert reply is not None and reply.body[0] == uri
        shown.close()
        bus.disconnect()
        dock_bus.disconnect()

    run(scenario())


@pytest.mark.integration
def test_the_launcher_s_commands_show_an_answer_no_terminal_would(
    session_bus: PrivateBus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``now --notify`` and ``stop --notify`` (the launcher's Exec lines), run as the CLI, against the control
    interface with a plain controller and a recording notification server on a private bus."""
    from agent.core.errors import EXIT_DISK_MISSING
    from agent.desktop.dbus import EXIT_NO_AGENT
    from tests.test_dbus_control import FakeController, backup_agent, cli_env, with_agent
    from tests.test_notify import until

    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", session_bus.address)
    controller = FakeController()
    env = cli_env(tmp_path, session_bus.address)

    async def scenario() -> None:
        server_bus, cards = await serve(session_bus.address, ["actions", "body"])

        async def body(service: object, other: MessageBus) -> None:
            assert await backup_agent(env, "now", "--notify") == (0, "backup started\n", "")
            assert cards.shown == []  # started: the agent's own card says so
            controller.now_word = "no-disk"
            code, out, _ = await backup_agent(env, "now", "--notify")
            assert (code, out) == (EXIT_DISK_MISSING, "no backup disk is attached: plug one in and the agent backs it up\n")
            controller.stop_word = "not-running"
            assert (await backup_agent(env, "stop", "--notify"))[:2] == (0, "no backup is running\n")

        await with_agent(controller, body)
        assert [(card.app_name, card.summary, card.body) for card in cards.shown] == [
            ("Backups", "Backups", "No backup disk is attached: plug one in and the agent backs it up."),
            ("Backups", "Backups", "No backup is running."),
        ]
        assert cards.shown[0].hints["desktop-entry"] == "backup-agent"
        # no agent at all: the one line on stderr and the exit status, as without --notify, and the card
        code, out, err = await backup_agent(env, "now", "--notify")
        assert (code, out) == (EXIT_NO_AGENT, "") and err.startswith("backup-agent: no backup agent")
        await until(lambda: len(cards.shown) == 3)
        assert cards.shown[2].body.startswith("No backup agent runs in this session") and cards.shown[2].hints["urgency"] == 1
        server_bus.disconnect()

    run(scenario(), timeout=60)
