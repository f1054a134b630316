"""The sleep inhibitor and resume notices, against a logind stand-in on a private "system" bus."""

from __future__ import annotations

import logging
import os
import select
from pathlib import Path
from typing import Iterator

import pytest
from dbus_fast import DBusError, Message, MessageType, NameFlag, RequestNameReply
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusBool, DBusStr, DBusUnixFd
from dbus_fast.service import ServiceInterface, dbus_method, dbus_signal

from agent.desktop.dbus import logind
from tests.test_dbus_control import DBUS_DAEMON, PrivateBus, captured, private_bus, run

integration = pytest.mark.integration


class LogindStandIn(ServiceInterface):
    """A stand-in for systemd-logind's Manager, at the process boundary.

    It is a separate D-Bus peer on a private "system" bus, owning
    org.freedesktop.login1 at /org/freedesktop/login1, so the code under test
    sends real messages and receives a real file descriptor, exactly as from
    logind. ``Inhibit`` records its arguments and returns the write end of a
    fresh ``os.pipe()``; the stand-in keeps the read end, where EOF means the
    inhibitor was released (every copy of the write end is closed), which is
    how logind notices it too. ``PrepareForSleep`` is emitted on demand.
    """

    def __init__(self) -> None:
        super().__init__(logind.LOGIND_MANAGER)
        self.calls: list[tuple[str, str, str, str]] = []
        self.read_ends: list[int] = []
        self.write_ends: list[int] = []
        self.refusal: str | None = None

    @dbus_method()
    def Inhibit(self, what: DBusStr, who: DBusStr, why: DBusStr, mode: DBusStr) -> DBusUnixFd:  # noqa: N802
        self.calls.append((what, who, why, mode))
        if self.refusal is not None:
            raise DBusError("org.freedesktop.DBus.Error.AccessDenied", self.refusal)
        read_end, write_end = os.pipe()
        self.read_ends.append(read_end)
        self.write_ends.append(write_end)
        return write_end

    @dbus_signal()
    def PrepareForSleep(self, start: bool) -> DBusBool:  # noqa: N802
        return start

    def drop_write_ends(self) -> None:
        """Close the stand-in's own copies, once the replies went out."""
        for fd in self.write_ends:
            os.close(fd)
        self.write_ends.clear()

    def close(self) -> None:
        self.drop_write_ends()
        for fd in self.read_ends:
            os.close(fd)
        self.read_ends.clear()


@pytest.fixture
def system_bus(monkeypatch: pytest.MonkeyPatch) -> Iterator[PrivateBus]:
    if DBUS_DAEMON is None:
        pytest.skip(reason="dbus-daemon is not installed (apt-get install -y dbus-daemon): no private bus to test on")
    monkeypatch.setattr(logind, "_warned", set())
    with private_bus("system") as bus:
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", bus.address)
        yield bus


async def start_stand_in(address: str) -> tuple[MessageBus, LogindStandIn]:
    bus = await MessageBus(bus_address=address, negotiate_unix_fd=True).connect()
    stand_in = LogindStandIn()
    bus.export(logind.LOGIND_PATH, stand_in)
    assert await bus.request_name(logind.LOGIND_NAME, NameFlag.DO_NOT_QUEUE) == RequestNameReply.PRIMARY_OWNER
    return bus, stand_in


def released(fd: int, wait: float) -> bool:
    """True when the pipe's read end sees EOF within ``wait`` seconds."""
    readable, _, _ = select.select([fd], [], [], wait)
    return bool(readable) and os.read(fd, 1) == b""


async def round_trip(bus: MessageBus, destination: str) -> None:
    """Everything ``destination`` sent to ``bus`` before this has arrived."""
    reply = await bus.call(
        Message(destination=destination, path="/", interface="org.freedesktop.DBus.Peer", member="Ping")
    )
    assert reply.message_type is MessageType.METHOD_RETURN


@integration
def test_inhibit_takes_a_block_lock_on_sleep_and_close_releases_it(system_bus: PrivateBus) -> None:
    async def scenario() -> None:
        logind_bus, stand_in = await start_stand_in(system_bus.address)
        bus = await logind.system_bus()
        assert bus is not None
        try:
            inhibitor = await logind.inhibit(bus, "backup-agent", "backing up to backup1")
            assert inhibitor is not None and inhibitor.held
            assert stand_in.calls == [("sleep", "backup-agent", "backing up to backup1", "block")]
            stand_in.drop_write_ends()
            (read_end,) = stand_in.read_ends
            assert not released(read_end, 0.2)  # held while our fd is open
            inhibitor.close()
            assert not inhibitor.held
            assert released(read_end, 5)  # logind sees it released
            inhibitor.close()  # idempotent

            second = await logind.inhibit(bus, "backup-agent", "again")
            assert second is not None
            with second:
                stand_in.drop_write_ends()
                assert not released(stand_in.read_ends[1], 0.1)
            assert released(stand_in.read_ends[1], 5)
        finally:
            bus.disconnect()
            logind_bus.disconnect()
            stand_in.close()

    run(scenario())


@integration
def test_a_refused_or_missing_logind_gives_none_and_logs_once(system_bus: PrivateBus) -> None:
    async def scenario() -> None:
        bus = await logind.system_bus()
        assert bus is not None
        try:
            with captured("agent.desktop.dbus.logind") as records:
                assert await logind.inhibit(bus, "backup-agent", "no logind here") is None
                assert await logind.inhibit(bus, "backup-agent", "no logind here") is None
            warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
            assert len(warnings) == 1 and "ServiceUnknown" in warnings[0], warnings

            logind_bus, stand_in = await start_stand_in(system_bus.address)
            stand_in.refusal = "Permission denied"
            try:
                with captured("agent.desktop.dbus.logind") as records:
                    assert await logind.inhibit(bus, "backup-agent", "refused") is None
                warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
                assert len(warnings) == 1 and "AccessDenied: Permission denied" in warnings[0], warnings
                assert stand_in.calls == [("sleep", "backup-agent", "refused", "block")]
            finally:
                logind_bus.disconnect()
                stand_in.close()
        finally:
            bus.disconnect()

    run(scenario())


@integration
def test_a_bus_without_fd_passing_gives_none(system_bus: PrivateBus) -> None:
    async def scenario() -> None:
        logind_bus, stand_in = await start_stand_in(system_bus.address)
        bus = await MessageBus(bus_address=system_bus.address).connect()  # negotiate_unix_fd left False
        try:
            with captured("agent.desktop.dbus.logind") as records:
                assert await logind.inhibit(bus, "backup-agent", "no fds") is None
            assert any("negotiate_unix_fd" in r.getMessage() or "file descriptor" in r.getMessage() for r in records)
        finally:
            bus.disconnect()
            logind_bus.disconnect()
            stand_in.close()

    run(scenario())


@integration
def test_watch_sleep_calls_on_resumed_on_wake_only(system_bus: PrivateBus) -> None:
    resumed: list[str] = []

    async def scenario() -> None:
        logind_bus, stand_in = await start_stand_in(system_bus.address)
        spoofer = await MessageBus(bus_address=system_bus.address).connect()
        bus = await logind.system_bus()
        assert bus is not None
        try:
            watch = await logind.watch_sleep(bus, lambda: resumed.append("resumed"))
            assert watch is not None

            stand_in.PrepareForSleep(True)
            await round_trip(bus, logind.LOGIND_NAME)
            assert resumed == []
            stand_in.PrepareForSleep(False)
            await round_trip(bus, logind.LOGIND_NAME)
            assert resumed == ["resumed"]

            # the same signal from anyone but logind is not delivered
            await spoofer.send(
                Message.new_signal(logind.LOGIND_PATH, logind.LOGIND_MANAGER, "PrepareForSleep", "b", [False])
            )
            await round_trip(bus, spoofer.unique_name or "")
            assert resumed == ["resumed"]

            watch.close()
            watch.close()
            stand_in.PrepareForSleep(False)
            await round_trip(bus, logind.LOGIND_NAME)
            assert resumed == ["resumed"]
        finally:
            bus.disconnect()
            spoofer.disconnect()
            logind_bus.disconnect()
            stand_in.close()

    run(scenario())


@integration
def test_a_failing_resume_handler_is_logged_and_the_watch_goes_on(system_bus: PrivateBus) -> None:
    calls: list[int] = []

    def on_resumed() -> None:
        calls.append(1)
        raise RuntimeError("scheduler broke")

    async def scenario() -> None:
        logind_bus, stand_in = await start_stand_in(system_bus.address)
        bus = await logind.system_bus()
        assert bus is not None
        try:
            watch = await logind.watch_sleep(bus, on_resumed)
            assert watch is not None
            with captured("agent.desktop.dbus.logind") as records:
                stand_in.PrepareForSleep(False)
                stand_in.PrepareForSleep(False)
                await round_trip(bus, logind.LOGIND_NAME)
            assert calls == [1, 1]
            assert [r.getMessage() for r in records if r.exc_info] == ["the resume handler failed"] * 2
            watch.close()
        finally:
            bus.disconnect()
            logind_bus.disconnect()
            stand_in.close()

    run(scenario())


@integration
def test_watch_sleep_without_logind_is_kept_and_says_so_once(system_bus: PrivateBus) -> None:
    async def scenario() -> None:
        bus = await logind.system_bus()
        assert bus is not None
        try:
            with captured("agent.desktop.dbus.logind") as records:
                watch = await logind.watch_sleep(bus, lambda: None)
                again = await logind.watch_sleep(bus, lambda: None)
            assert watch is not None and again is not None
            warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
            assert warnings == ["logind is not on the system bus: no resume notices until it starts"]
            watch.close()
            again.close()
        finally:
            bus.disconnect()

    run(scenario())


def test_no_system_bus_gives_none_and_one_log_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(logind, "_warned", set())
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/no-bus-here")

    async def scenario() -> None:
        with captured("agent.desktop.dbus.logind") as records:
            bus = await logind.system_bus()
            assert bus is None
            assert await logind.inhibit(bus, "backup-agent", "x") is None
            assert await logind.watch_sleep(bus, lambda: None) is None
            assert await logind.system_bus() is None
        warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and "no system bus" in warnings[0], warnings

    run(scenario())
