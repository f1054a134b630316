"""The D-Bus control interface on a real, private session bus.

Each test starts its own dbus-daemon (a config of our own: a socket in a
fresh directory, no service activation) and kills it by its pid afterwards.
What is under test is the D-Bus layer (agent.desktop.dbus.control, agent.desktop.dbus.client
and the three CLI commands); the controller behind it is a plain fake that
records calls.
"""

from __future__ import annotations

import asyncio
import dataclasses
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, TypeVar, cast

import pytest
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from agent.core import events
from agent.desktop.dbus import BUS_NAME, EXIT_NO_AGENT, INTERFACE, OBJECT_PATH, session_bus_address
from agent.desktop.dbus import client
from agent.desktop.dbus.control import AgentAlreadyRunningError, ControlInterface, serve
from agent.core.errors import EXIT_DISK_MISSING, BackupAgentError
from agent.desktop.state import AgentStatus, DiskStatus
from agent.desktop.statefile import save_state, state_file_path

REPO = Path(__file__).resolve().parent.parent
DBUS_DAEMON = shutil.which("dbus-daemon")

integration = pytest.mark.integration

T = TypeVar("T")

# -- a private bus -------------------------------------------------------------------

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>{kind}</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>{servicedir}
  <policy context="default">{users}
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


@dataclass
class PrivateBus:
    address: str
    pid: int
    directory: Path


@contextlib.contextmanager
def private_bus(
    kind: str = "session", services: dict[str, str] | None = None, users: tuple[str, ...] = ()
) -> Iterator[PrivateBus]:
    """A dbus-daemon of our own (``kind``: "session" or "system"), stopped by its pid afterwards.

    Like ``dbus-daemon --session --fork --print-address --print-pid``, but with a
    config of our own so that the socket lives in a directory we remove and no
    service on this machine can be activated on it; ``services`` (name →
    command) are the only activatable ones. Only the bus's own user (root
    here) may connect, and ``users``: a desktop user's session bus that
    the test's own servers share.
    """
    assert DBUS_DAEMON is not None
    directory = Path(tempfile.mkdtemp(prefix="ba-dbus-"))  # short: a socket path has at most 107 bytes
    if users:
        os.chmod(directory, 0o711)  # the others reach the socket, and list nothing
    config = directory / f"{kind}.conf"
    servicedir = ""
    if services:
        (directory / "services").mkdir()
        for name, command in services.items():
            (directory / "services" / f"{name}.service").write_text(f"[D-BUS Service]\nName={name}\nExec={command}\n")
        servicedir = (
            f"\n  <servicedir>{directory / 'services'}</servicedir>"
            '\n  <limit name="service_start_timeout">500</limit>'  # a stand-in that never takes its name
        )
    allowed = "".join(f'\n    <allow user="{user}"/>' for user in users)
    config.write_text(BUS_CONFIG.format(kind=kind, socket=directory / "socket", servicedir=servicedir, users=allowed))
    started = subprocess.run(
        [DBUS_DAEMON, f"--config-file={config}", "--fork", "--nopidfile", "--print-address=1", "--print-pid=1"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    lines = started.stdout.split()
    address = next(line for line in lines if "=" in line)
    pid = int(next(line for line in lines if line.isdigit()))
    try:
        yield PrivateBus(address=address, pid=pid, directory=directory)
    finally:
        _stop(pid)
        shutil.rmtree(directory, ignore_errors=True)


def _stop(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                if handle.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return  # exited; its parent (not us) reaps it
        except (FileNotFoundError, ProcessLookupError):
            return
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture
def session_bus(monkeypatch: pytest.MonkeyPatch) -> Iterator[PrivateBus]:
    if DBUS_DAEMON is None:
        pytest.skip(reason="dbus-daemon is not installed (apt-get install -y dbus-daemon): no private bus to test on")
    with private_bus("session") as bus:
        monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", bus.address)
        yield bus


def run(coroutine: Awaitable[T], timeout: float = 15) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coroutine, timeout)

    return asyncio.run(bounded())


async def connect(address: str) -> MessageBus:
    return await MessageBus(bus_address=address).connect()


@contextlib.contextmanager
def captured(logger: str) -> Iterator[list[logging.LogRecord]]:
    """Records of one logger, whatever other tests did to the "agent" logger's propagation."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(logging.DEBUG)
    target = logging.getLogger(logger)
    previous = target.level
    target.addHandler(handler)
    target.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        target.removeHandler(handler)
        target.setLevel(previous)


# -- the fake controller -----------------------------------------------------------


class FakeController:
    """A plain Controller that records what it was asked."""

    def __init__(self, status: AgentStatus | None = None) -> None:
        self.calls: list[str] = []
        self.current = status or AgentStatus()
        self.now_word = "started"
        self.stop_word = "stopping"
        self.failure: Exception | None = None

    def backup_now(self, disk: str | None = None) -> str:
        self.calls.append("backup_now" if disk is None else f"backup_now {disk}")
        if self.failure:
            raise self.failure
        return self.now_word

    def stop(self) -> str:
        self.calls.append("stop")
        if self.failure:
            raise self.failure
        return self.stop_word

    def status(self) -> AgentStatus:
        return self.current


RUNNING = AgentStatus(
    state="running",
    disk="backup1",
    last_success=1763812800.5,
    last_result="success",
    last_message="2026-11-22T13-00-00+0100",
    next_due=1763816400.0,
    step="transfer",
    progress={"percent": 42.0, "bytes": 1048576, "files": 12, "rate": 350000.0, "eta": None},
    cycle_pid=4242,
    disks=[
        DiskStatus("backup1", attached=True, last_success=1763812800.5, last_result="success"),
        DiskStatus("offsite", ejected=True, attached=True, last_result="stopped", unfinished=True),
    ],
)


# -- talking to the agent from another connection ------------------------------------


async def call(bus: MessageBus, member: str, signature: str = "", body: list[Any] | None = None,
               interface: str = INTERFACE) -> Message:
    return await bus.call(
        Message(destination=BUS_NAME, path=OBJECT_PATH, interface=interface, member=member,
                signature=signature, body=body or [])
    )


async def ping(bus: MessageBus) -> None:
    """A round trip to the agent: every signal it sent before has arrived."""
    reply = await call(bus, "Ping", interface="org.freedesktop.DBus.Peer")
    assert reply.message_type is MessageType.METHOD_RETURN


async def subscribe(bus: MessageBus) -> list[Message]:
    """Collect every signal the agent's object sends (ours and PropertiesChanged)."""
    seen: list[Message] = []
    rule = f"type='signal',sender='{BUS_NAME}',path='{OBJECT_PATH}'"
    reply = await bus.call(
        Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus", interface="org.freedesktop.DBus",
                member="AddMatch", signature="s", body=[rule])
    )
    assert reply.message_type is MessageType.METHOD_RETURN

    def handler(message: Message) -> None:
        if message.message_type is MessageType.SIGNAL:
            seen.append(message)

    bus.add_message_handler(handler)
    return seen


def plain(value: Any) -> Any:
    """Variants unpacked, with their signatures kept: {"k": ("x", 1)}."""
    if isinstance(value, Variant):
        return (value.signature, plain(value.value))
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


async def with_agent(controller: FakeController, body: Callable[[Any, MessageBus], Awaitable[T]]) -> T:
    service = await serve(controller)
    assert service is not None
    other = await connect(os.environ["DBUS_SESSION_BUS_ADDRESS"])
    try:
        return await body(service, other)
    finally:
        other.disconnect()
        service.close()


# -- methods ------------------------------------------------------------------------


@integration
def test_methods_reach_the_controller_and_return_its_word(session_bus: PrivateBus) -> None:
    controller = FakeController(RUNNING)

    async def body(service: Any, other: MessageBus) -> None:
        reply = await call(other, "BackupNow")
        assert (reply.message_type, reply.signature, reply.body) == (MessageType.METHOD_RETURN, "s", ["started"])
        controller.now_word = "running"
        assert (await call(other, "BackupNow")).body == ["running"]
        reply = await call(other, "Stop")
        assert (reply.signature, reply.body) == ("s", ["stopping"])
        assert controller.calls == ["backup_now", "backup_now", "stop"]
        # one disk by its name: the controller gets the name, nothing else
        assert (await call(other, "BackupNowDisk", "s", ["offsite"])).body == ["running"]
        assert controller.calls[-1] == "backup_now offsite"
        assert await client.backup_now(other, disk="offsite") == "running"

        reply = await call(other, "GetStatus")
        assert reply.signature == "a{sv}"
        assert plain(reply.body[0]) == {
            "state": ("s", "running"),
            "disk": ("s", "backup1"),
            "last_success": ("d", 1763812800.5),
            "last_result": ("s", "success"),
            "last_message": ("s", "2026-11-22T13-00-00+0100"),
            "next_due": ("d", 1763816400.0),
            "step": ("s", "transfer"),
            "progress": ("a{sv}", {"percent": ("d", 42.0), "bytes": ("x", 1048576), "files": ("x", 12),
                                    "rate": ("d", 350000.0)}),
            "cycle_pid": ("u", 4242),
            "disk_left": ("s", ""),
            "disk_left_detail": ("s", ""),
            "disks": ("aa{sv}", [
                {"name": ("s", "backup1"), "attached": ("b", True), "ejected": ("b", False),
                 "last_success": ("d", 1763812800.5), "last_result": ("s", "success"), "last_message": ("s", ""),
                 "unfinished": ("b", False), "skipped": ("s", ""), "remote": ("b", False), "waiting": ("s", "")},
                {"name": ("s", "offsite"), "attached": ("b", True), "ejected": ("b", True),
                 "last_result": ("s", "stopped"), "last_message": ("s", ""), "unfinished": ("b", True),
                 "skipped": ("s", ""), "remote": ("b", False), "waiting": ("s", "")},
            ]),
            "skipped": ("s", ""),
        }
        # the client reads it back into the same AgentStatus (eta: None is left out, so it is missing)
        expected = dataclasses.replace(RUNNING, progress={k: v for k, v in RUNNING.progress.items() if v is not None})
        assert await client.get_status(other) == expected

    run(with_agent(controller, body))


@integration
def test_get_status_leaves_out_what_is_unknown(session_bus: PrivateBus) -> None:
    async def body(service: Any, other: MessageBus) -> None:
        reply = await call(other, "GetStatus")
        assert plain(reply.body[0]) == {
            "state": ("s", "idle"), "last_result": ("s", "none"), "last_message": ("s", ""), "progress": ("a{sv}", {}),
            "disk_left": ("s", ""), "disk_left_detail": ("s", ""), "disks": ("aa{sv}", []), "skipped": ("s", ""),
        }
        assert await client.get_status(other) == AgentStatus()

    run(with_agent(FakeController(), body))


@integration
def test_methods_take_no_arguments(session_bus: PrivateBus) -> None:
    controller = FakeController()

    async def body(service: Any, other: MessageBus) -> None:
        reply = await call(other, "BackupNow", "s", ["/etc/shadow"])
        assert reply.message_type is MessageType.ERROR
        reply = await call(other, "Stop", "as", [["rm", "-rf", "/"]])
        assert reply.message_type is MessageType.ERROR
        assert controller.calls == []

    run(with_agent(controller, body))


@integration
def test_a_failing_controller_gives_a_dbus_error_and_the_service_goes_on(session_bus: PrivateBus) -> None:
    controller = FakeController()

    async def body(service: Any, other: MessageBus) -> None:
        controller.failure = BackupAgentError("the configuration is broken: fix /etc/backup-agent/config.toml")
        reply = await call(other, "BackupNow")
        assert reply.message_type is MessageType.ERROR
        assert reply.error_name == "org.backupagent.Agent1.Error.Failed"
        assert reply.body == ["the configuration is broken: fix /etc/backup-agent/config.toml"]

        controller.failure = RuntimeError("secret internals /home/me/.ssh/id_rsa")
        with captured("agent.desktop.dbus.control") as records:
            reply = await call(other, "Stop")
        assert reply.error_name == "org.backupagent.Agent1.Error.Failed"
        assert "secret" not in reply.body[0] and "Stop failed inside the agent" in reply.body[0]
        assert any(r.exc_info for r in records)  # the traceback goes to the agent's log

        controller.failure = None
        assert (await call(other, "Stop")).body == ["stopping"]

    run(with_agent(controller, body))


# -- properties ---------------------------------------------------------------------


PROPERTIES = "org.freedesktop.DBus.Properties"


@integration
def test_properties_with_values_and_with_sentinels(session_bus: PrivateBus) -> None:
    controller = FakeController(RUNNING)

    async def body(service: Any, other: MessageBus) -> None:
        reply = await call(other, "GetAll", "s", [INTERFACE], interface=PROPERTIES)
        assert plain(reply.body[0]) == {
            "State": ("s", "running"),
            "Disk": ("s", "backup1"),
            "LastSuccess": ("x", 1763812800),
            "LastResult": ("s", "success"),
            "LastMessage": ("s", "2026-11-22T13-00-00+0100"),
            "NextDue": ("x", 1763816400),
            "Step": ("s", "transfer"),
            "Percent": ("d", 42.0),
        }
        reply = await call(other, "Get", "ss", [INTERFACE, "Step"], interface=PROPERTIES)
        assert plain(reply.body[0]) == ("s", "transfer")

        controller.current = AgentStatus()  # getters read the controller's status now
        reply = await call(other, "GetAll", "s", [INTERFACE], interface=PROPERTIES)
        assert plain(reply.body[0]) == {
            "State": ("s", "idle"), "Disk": ("s", ""), "LastSuccess": ("x", 0), "LastResult": ("s", "none"),
            "LastMessage": ("s", ""), "NextDue": ("x", 0), "Step": ("s", ""), "Percent": ("d", -1.0),
        }
        reply = await call(other, "Set", "ssv", [INTERFACE, "State", Variant("s", "running")], interface=PROPERTIES)
        assert reply.message_type is MessageType.ERROR  # read-only

    run(with_agent(controller, body))


@integration
def test_status_changed_sends_properties_changed_with_only_what_changed(session_bus: PrivateBus) -> None:
    controller = FakeController(AgentStatus(state="disk-attached", disk="backup1", next_due=1763816400.0))

    async def body(service: Any, other: MessageBus) -> None:
        seen = await subscribe(other)
        running = AgentStatus(state="running", disk="backup1", next_due=1763816400.0, step="transfer",
                              progress={"percent": 7})
        controller.current = running
        service.listener.status_changed(running)
        service.listener.status_changed(running)  # nothing changed: no signal
        await ping(other)
        assert [(m.interface, m.member, m.signature) for m in seen] == [(PROPERTIES, "PropertiesChanged", "sa{sv}as")]
        assert plain(seen[0].body) == [
            INTERFACE, {"State": ("s", "running"), "Step": ("s", "transfer"), "Percent": ("d", 7.0)}, [],
        ]

        seen.clear()
        done = AgentStatus(state="disk-attached", disk="backup1", last_success=1763817000.9, last_result="success",
                           last_message="2026-11-22T14-00-00+0100", next_due=1763820600.0)
        service.listener.status_changed(done)
        await ping(other)
        assert plain(seen[0].body[1]) == {
            "State": ("s", "disk-attached"), "LastSuccess": ("x", 1763817000), "LastResult": ("s", "success"),
            "LastMessage": ("s", "2026-11-22T14-00-00+0100"), "NextDue": ("x", 1763820600), "Step": ("s", ""),
            "Percent": ("d", -1.0),
        }

    run(with_agent(controller, body))


# -- signals --------------------------------------------------------------------------


@integration
def test_every_listener_call_becomes_its_signal(session_bus: PrivateBus) -> None:
    async def body(service: Any, other: MessageBus) -> None:
        seen = await subscribe(other)
        listener: ControlInterface = service.listener
        listener.disk_attached("backup1")
        listener.backup_started("backup1", "plugged-in")
        first_line = ('{"version":1,"time":"2026-11-22T14:00:03+01:00","event":"progress","percent":42,'
                      '"bytes":1048576,"files":12,"rate":350000.0,"eta":4}')
        listener.progress(cast(events.ProgressEvent, events.decode(first_line)))
        listener.progress(events.progress(None, 0, 0, None, None))
        listener.backup_completed(events.complete(
            "2026-11-22T14-00-00+0100", skipped=None, partial=False,
            flagged=None, statistics={"files": 50123, "transferred_files": 12, "total_size": 10**12},
            warnings=0, deleted=[], duration=9.2, dry_run=False,
        ))
        listener.backup_failed("mount", "cannot mount /dev/mapper/backup1: wrong fs type")
        listener.backup_failed(None, "the cycle died")
        listener.disk_removed("backup1", True)
        await ping(other)

        got = [(m.member, m.signature, plain(m.body)) for m in seen if m.interface == INTERFACE]
        assert [g[:2] for g in got] == [
            ("DiskAttached", "s"), ("BackupStarted", "ss"), ("Progress", "a{sv}"), ("Progress", "a{sv}"),
            ("BackupCompleted", "sa{sv}"), ("Error", "ss"), ("Error", "ss"), ("DiskRemoved", "sb"),
        ]
        assert got[0][2] == ["backup1"]
        assert got[1][2] == ["backup1", "plugged-in"]
        first = got[2][2][0]
        elapsed = first.pop("elapsed")
        assert elapsed[0] == "d" and 0 <= elapsed[1] < 10
        assert first == {"percent": ("d", 42.0), "bytes_done": ("x", 1048576), "files_done": ("x", 12),
                         "rate": ("d", 350000.0), "remaining": ("x", 4)}
        second = got[3][2][0]
        second.pop("elapsed")
        assert second == {"bytes_done": ("x", 0), "files_done": ("x", 0)}  # only what the cycle's event has
        assert got[4][2] == ["2026-11-22T14-00-00+0100", {
            "files": ("x", 50123), "transferred_files": ("x", 12), "total_size": ("x", 10**12),
            "duration": ("d", 9.2), "partial": ("b", False), "warnings": ("x", 0),
        }]
        assert got[5][2] == ["mount", "cannot mount /dev/mapper/backup1: wrong fs type"]
        assert got[6][2] == ["", "the cycle died"]
        assert got[7][2] == ["backup1", True]

        # after the cycle ended, a progress event has no elapsed time of ours
        seen.clear()
        listener.progress(events.progress(1, 1, 1, 1.0, 1))
        await ping(other)
        assert "elapsed" not in plain(seen[0].body[0])

    run(with_agent(FakeController(), body))


# -- introspection --------------------------------------------------------------------


def _canonical(element: ET.Element) -> str:
    return ET.canonicalize(ET.tostring(element, encoding="unicode"), strip_text=True)


def readme_interface_xml() -> ET.Element:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```xml\n(.*?)```", text, flags=re.S)
    for block in blocks:
        if f'<interface name="{INTERFACE}">' in block:
            root = ET.fromstring(block)
            return root if root.tag == "interface" else root.find(f"interface[@name='{INTERFACE}']")  # type: ignore[return-value]
    raise AssertionError(f"README.md has no ```xml block with <interface name=\"{INTERFACE}\">")


@integration
def test_introspection_matches_the_readme(session_bus: PrivateBus) -> None:
    async def body(service: Any, other: MessageBus) -> None:
        reply = await call(other, "Introspect", interface="org.freedesktop.DBus.Introspectable")
        node = ET.fromstring(reply.body[0])
        live = node.find(f"interface[@name='{INTERFACE}']")
        assert live is not None
        assert _canonical(live) == _canonical(readme_interface_xml())

    run(with_agent(FakeController(), body))


# -- serving: the name, no bus ------------------------------------------------------


@integration
def test_a_second_agent_gets_a_clear_error_and_the_first_goes_on(session_bus: PrivateBus) -> None:
    async def body(service: Any, other: MessageBus) -> None:
        with pytest.raises(AgentAlreadyRunningError) as caught:
            await serve(FakeController())
        message = str(caught.value)
        assert "another backup-agent already runs" in message and f"pid {os.getpid()}" in message
        assert BUS_NAME in message
        assert caught.value.exit_code == 4
        assert (await call(other, "BackupNow")).body == ["started"]

    run(with_agent(FakeController(), body))


@integration
def test_close_gives_the_name_back(session_bus: PrivateBus) -> None:
    async def scenario() -> None:
        other = await connect(session_bus.address)
        shared = await connect(session_bus.address)
        try:
            for bus in (None, shared):  # a bus of its own, then one it was given
                service = await serve(FakeController(), bus)
                assert service is not None
                assert (await client.backup_now(other)) == "started"
                service.close()
                service.close()  # idempotent
                with pytest.raises(client.NoAgentError, match="no backup agent runs"):
                    await client.backup_now(other)
            assert shared.connected  # a bus it was given stays open
        finally:
            other.disconnect()
            shared.disconnect()

    run(scenario())


@integration
def test_the_client_never_starts_an_agent_through_bus_activation(tmp_path: Path) -> None:
    if DBUS_DAEMON is None:
        pytest.skip(reason="dbus-daemon is not installed (apt-get install -y dbus-daemon): no private bus to test on")
    marker = tmp_path / "activated"
    with private_bus("session", {BUS_NAME: f"/usr/bin/touch {marker}"}) as bus:

        async def scenario() -> None:
            other = await connect(bus.address)
            try:
                with pytest.raises(client.NoAgentError, match="no backup agent runs"):
                    await client.backup_now(other)
                # the bus would have started it: the service file works
                reply = await other.call(Message(destination=BUS_NAME, path=OBJECT_PATH, interface=INTERFACE,
                                                 member="BackupNow"))
                assert reply.message_type is MessageType.ERROR
            finally:
                other.disconnect()

        marker_before = marker.exists()
        run(scenario())
    assert not marker_before
    assert marker.exists()


@integration
@pytest.mark.parametrize("address", ["unset", "unix:path=/nonexistent/ba-test/bus"])
def test_no_session_bus_gives_none_and_one_log_line(address: str, monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))  # no bus socket there
    if address == "unset":
        monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)
        assert session_bus_address() is None
    else:
        monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", address)
    with captured("agent.desktop.dbus.control") as records:
        assert run(serve(FakeController())) is None
    warnings = [r for r in records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in records]
    assert "without the D-Bus interface" in warnings[0].getMessage()


def test_the_user_bus_socket_is_found_without_the_variable(tmp_path: Path) -> None:
    import socket

    path = tmp_path / "bus"
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(path))
        assert session_bus_address({"XDG_RUNTIME_DIR": str(tmp_path)}) == f"unix:path={path}"
    assert session_bus_address({"DBUS_SESSION_BUS_ADDRESS": "unix:path=/x", "XDG_RUNTIME_DIR": str(tmp_path)}) == "unix:path=/x"
    assert session_bus_address({"XDG_RUNTIME_DIR": "relative"}) is None


# -- the three commands, end to end ------------------------------------------------------


def cli_env(tmp_path: Path, address: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUDO_")}
    env.pop("DBUS_SESSION_BUS_ADDRESS", None)
    if address is not None:
        env["DBUS_SESSION_BUS_ADDRESS"] = address
    env["XDG_STATE_HOME"] = str(tmp_path / "state")
    env["XDG_RUNTIME_DIR"] = str(tmp_path)  # no user bus socket there
    env["TZ"] = "UTC"
    return env


async def backup_agent(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.cli", *args, cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@integration
def test_now_stop_status_through_the_cli(session_bus: PrivateBus, tmp_path: Path) -> None:
    controller = FakeController(RUNNING)
    env = cli_env(tmp_path, session_bus.address)

    async def body(service: Any, other: MessageBus) -> None:
        assert await backup_agent(env, "now") == (0, "backup started\n", "")
        controller.now_word = "no-disk"
        code, out, err = await backup_agent(env, "now")
        assert (code, err) == (EXIT_DISK_MISSING, "") and "no backup disk is attached" in out
        code, out, err = await backup_agent(env, "stop")
        assert (code, err) == (0, "") and out.startswith("stopping the running backup")
        controller.stop_word = "not-running"
        assert await backup_agent(env, "stop") == (0, "no backup is running\n", "")
        assert controller.calls == ["backup_now", "backup_now", "stop", "stop"]
        controller.now_word = "started"

        code, out, err = await backup_agent(env, "status")
        assert (code, err) == (0, "")
        assert out == (
            "agent:        running\n"
            "state:        running (transfer, 42%)\n"
            "disk:         backup1\n"
            "last success: 2025-11-22 12:00:00 +0000\n"
            "last result:  success: 2026-11-22T13-00-00+0100\n"
            "next backup:  2025-11-22 13:00:00 +0000\n"
            "cycle:        pid 4242\n"
            "disks:\n"
            "  backup1: attached; last success 2025-11-22 12:00:00 +0000\n"
            "  offsite: ejected (closed until plugged in again); last success never; last run stopped; "
            "the next plug-in carries on with the unfinished backup\n"
        )
        # now --disk NAME: that disk's name reaches the agent; one it does not know is a usage error
        assert await backup_agent(env, "now", "--disk", "offsite") == (0, "backup started\n", "")
        assert controller.calls[-1] == "backup_now offsite"
        controller.now_word = "unknown-disk"
        code, out, err = await backup_agent(env, "now", "--disk", "nosuch")
        assert code == 2 and out == "" and "nosuch is not a configured backup disk" in err, (code, out, err)
        controller.now_word = "no-disk"
        code, out, err = await backup_agent(env, "status", "--json")
        assert (code, err) == (0, "")
        document = json.loads(out)
        assert document["agent"] == "running" and document["saved"] is None
        assert document["status"] == {**RUNNING.as_dict(), "progress": {"percent": 42.0, "bytes": 1048576, "files": 12,
                                                                          "rate": 350000.0}}

    run(with_agent(controller, body), timeout=60)


@integration
def test_now_and_stop_without_an_agent_say_so_in_one_line(session_bus: PrivateBus, tmp_path: Path) -> None:
    async def scenario() -> None:
        for address in (session_bus.address, None):  # a bus without an agent; no bus at all
            env = cli_env(tmp_path, address)
            for command in ("now", "stop"):
                code, out, err = await backup_agent(env, command)
                assert code == EXIT_NO_AGENT and out == ""
                assert err.count("\n") == 1 and err.startswith("backup-agent: no backup agent"), err

    run(scenario(), timeout=60)


@integration
def test_status_without_an_agent_reads_the_saved_state(session_bus: PrivateBus, tmp_path: Path) -> None:
    env = cli_env(tmp_path, session_bus.address)
    path = state_file_path(env)
    assert path == str(tmp_path / "state" / "backup-agent" / "state.json")

    async def scenario() -> None:
        code, out, err = await backup_agent(env, "status")
        assert code == EXIT_NO_AGENT and out == ""
        assert err.count("\n") == 1 and "no agent has saved its state yet" in err and path in err

        saved = AgentStatus(state="disk-attached", disk="backup1", last_success=1763812800.0, last_result="failure",
                            last_message="transfer failed: the disk was removed", next_due=1763813100.0)
        save_state(path, {}, saved, now=1763812900.0)
        code, out, err = await backup_agent(env, "status")
        assert (code, err) == (0, "")
        assert out.splitlines()[:3] == [
            "agent:        not running; its last saved state (saved 2025-11-22 12:01:40 +0000)",
            "state:        disk-attached",
            "disk:         backup1",
        ]
        assert "last result:  failure: transfer failed: the disk was removed" in out
        code, out, err = await backup_agent(env, "status", "--json")
        document = json.loads(out)
        assert (code, document["agent"], document["saved"], document["state_file"]) == (0, "not-running", 1763812900.0, path)
        assert document["status"] == saved.as_dict()

    run(scenario(), timeout=60)


# -- the state file (no bus needed, but kept beside its reader's tests) -----------------


def test_state_file_round_trip_and_defaults(tmp_path: Path) -> None:
    path = str(tmp_path / "deep" / "backup-agent" / "state.json")
    assert client.read_saved_status(path) is None
    save_state(path, {}, RUNNING, now=5.0)
    assert client.read_saved_status(path) == RUNNING
    document = json.loads(Path(path).read_text())
    assert document == {"version": 1, "saved": 5.0, "disks": {}, "status": RUNNING.as_dict()}
    assert os.listdir(os.path.dirname(path)) == ["state.json"]  # no temporary left over

    Path(path).write_text('{"status": {"state": "idle", "future_field": 1}}')
    assert client.read_saved_status(path) == AgentStatus()

    # what the daemon writes: its per-disk records beside the status, which status ignores
    Path(path).write_text(json.dumps({
        "disks": {"backup1": {"failures": 0, "last_result": "success", "last_success": 1763812800.0}},
        "saved": 1763812900.0, "status": RUNNING.as_dict(), "version": 1,
    }, indent=2, sort_keys=True))
    assert client.read_saved_status(path) == RUNNING


def test_a_bad_state_file_is_ignored_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    for text in ("not json", "[]", '{"version": 1}', '{"status": 3}'):
        path.write_text(text)
        with captured("agent.desktop.dbus.client") as records, captured("agent.desktop.statefile") as read_records:
            assert client.read_saved_status(str(path)) is None
        assert len([r for r in records + read_records if r.levelno == logging.WARNING]) == 1, text

    path.write_text(json.dumps({"version": 1, "status": {
        "state": 3, "disk": ["x"], "last_success": "yesterday", "next_due": True, "cycle_pid": -1,
        "last_message": "kept", "progress": "half",
    }}))
    with captured("agent.desktop.dbus.client") as records:
        status = client.read_saved_status(str(path))
    assert status == AgentStatus(last_message="kept")
    assert len(records) == 6


def test_state_file_path_follows_xdg() -> None:
    assert state_file_path({"XDG_STATE_HOME": "/s", "HOME": "/h"}) == "/s/backup-agent/state.json"
    assert state_file_path({"HOME": "/h"}) == "/h/.local/state/backup-agent/state.json"
    assert state_file_path({"XDG_STATE_HOME": "rel", "HOME": "/h"}) == "/h/.local/state/backup-agent/state.json"


def test_the_client_reads_how_the_disk_was_left_and_refuses_other_values() -> None:
    read = client.status_from_mapping({"disk_left": "mounted", "disk_left_detail": "/mnt/x"}, source="test")
    assert (read.disk_left, read.disk_left_detail) == ("mounted", "/mnt/x")
    assert client.status_from_mapping({"disk_left": "sort of", "disk_left_detail": 3}, source="test") == AgentStatus()
