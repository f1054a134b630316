"""``backup-agent now``, ``stop`` and ``status`` against a running agent, over a private session bus.

The agent runs as users run it (``backup-agent run --no-sudo --config CFG`` in
a subprocess) with the real cycle, real udev and loop devices
(tests/test_daemon.py's bench, whose stand-in rsync can be slowed so there is
a cycle to stop); the three commands are the real CLI, finding the agent on a
private session bus the test started.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.desktop.statefile import DiskRecord, load_state
from agent.core.errors import EXIT_DISK_MISSING
from tests.test_daemon import REPO, StandIn, detach, here, real, settle, until  # noqa: F401  (here: fixture)
from agent.desktop.dbus import driver_call
from tests.test_dbus_control import DBUS_DAEMON, private_bus
from tests.test_disk import NAME, rig  # noqa: F401  (fixture)
from tests.test_disk_cycle import Bench, bench  # noqa: F401  (fixture)
from tests.test_udev import udevd  # noqa: F401  (fixture)


@real
def test_now_stop_and_status_reach_the_running_agent(bench: Bench, here: None, tmp_path: Path) -> None:
    if DBUS_DAEMON is None:
        pytest.skip(reason="dbus-daemon is not installed (apt-get install -y dbus-daemon): no private bus to test on")
    bench.init()
    detach(bench.rig.luks_device)
    settle()
    rsync = StandIn(bench)
    state_file = tmp_path / "xdg-state" / "backup-agent" / "state.json"
    log_path = tmp_path / "agent.log"

    def log() -> str:
        return log_path.read_text(errors="replace")

    def record() -> DiskRecord | None:
        return load_state(str(state_file))[0].get(NAME) if state_file.exists() else None

    with private_bus("session") as session:
        env = {k: v for k, v in os.environ.items() if k not in ("SUDO_UID", "NOTIFY_SOCKET", "WATCHDOG_USEC")}
        env.update(DBUS_SESSION_BUS_ADDRESS=session.address, XDG_STATE_HOME=str(tmp_path / "xdg-state"))
        env.pop("DBUS_SYSTEM_BUS_ADDRESS", None)

        def cli(*argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "agent.cli", *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=30
            )

        async def scenario() -> None:
            with open(log_path, "wb") as log_file:
                agent = subprocess.Popen(
                    [sys.executable, "-m", "agent.cli", "run", "--no-sudo", "--config", str(bench.config)],
                    cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            try:
                await until(lambda: "watching for" in log() or agent.poll() is not None, "the agent to start", 10)
                assert agent.poll() is None, log()
                await until(lambda: cli("status", "--json").returncode == 0, "the agent on the bus", 10)

                # no disk: "now" says so, with the disk-missing status
                nothing = cli("now")
                assert nothing.returncode == EXIT_DISK_MISSING and "no backup disk is attached" in nothing.stdout

                # plugged in: the first backup, by itself
                bench.rig.attach(bench.rig.luks_image)
                first = await until(lambda: (r := record()) is not None and r.last_result != "none" and r, "cycle 1")
                assert first.last_result == "success", (first, log())
                live = json.loads(cli("status", "--json").stdout)
                assert live["agent"] == "running"
                assert live["status"]["disk"] == NAME and live["status"]["last_result"] == "success", live

                # back up now, though it is not due; asked again while it runs: one cycle
                rsync.tell(mode="slow", delay=20.0)
                started = cli("now")
                assert started.returncode == 0 and started.stdout.strip() == "backup started", started
                await until(lambda: len(rsync.runs()) == 2, "the asked-for transfer to start", 10)
                again = cli("now")
                assert again.returncode == 0 and again.stdout.strip() == "a backup is already running", again
                assert f"starting the backup of {NAME} (asked)" in log()

                # stop: the cycle gets SIGTERM, cleans up, and the disk is locked again; a stop
                # asked for is no failure: no failure count, no retry, the transfer kept for later
                stopping = cli("stop")
                assert stopping.returncode == 0 and stopping.stdout.startswith("stopping the running backup"), stopping
                second = await until(
                    lambda: (r := record()) is not None and r.last_result == "stopped" and r, "the stopped cycle to end", 15
                )
                assert second.last_snapshot == first.last_snapshot  # nothing new completed
                assert second.failures == 0 and second.unfinished and second.stopped_at is not None, second
                after_stop = json.loads(cli("status", "--json").stdout)["status"]
                assert after_stop["state"] == "disk-attached" and after_stop["last_result"] == "stopped", after_stop
                # the next try is the regular one (an hour on), not a retry in 5 minutes
                assert after_stop["next_due"] >= second.stopped_at + 3600 - 1, after_stop
                bench.assert_locked_and_unmounted()
                assert cli("stop").stdout.strip() == "no backup is running"
                assert log().count("starting the backup of") == 2, log()

                agent.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + 5
                while agent.poll() is None and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                assert agent.returncode == 0, log()
                assert "Traceback" not in log(), log()
                # no agent any more: status still answers from the saved state
                saved = cli("status", "--json")
                assert saved.returncode == 0, saved
                document = json.loads(saved.stdout)
                assert document["agent"] == "not-running" and document["status"]["last_result"] == "stopped", document
            finally:
                if agent.poll() is None:
                    agent.kill()
                    agent.wait()

        asyncio.run(asyncio.wait_for(scenario(), 90))


@pytest.mark.integration
@pytest.mark.parametrize("failing", ["notify", "tray"])
def test_a_failing_start_of_the_notifier_or_the_tray_leaves_no_connection_or_name_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """serve() opens the system bus, then the session bus with the agent's name, then the notifier and
    the tray; when a later start raises, what was opened before it is closed. The failing start is a
    stand-in (the adapter's own start replaced by one that raises): a real notifier or tray never
    raises out of its start, so only a bug would; the buses, the name and the agent are real."""
    import importlib

    from dbus_fast.aio import MessageBus

    from agent.desktop import daemon

    if DBUS_DAEMON is None:
        pytest.skip(reason="dbus-daemon is not installed (apt-get install -y dbus-daemon): no private bus to test on")
    config = tmp_path / "config.toml"
    config.write_text(f'[[disk]]\nname = "{NAME}"\nluks_uuid = "5f0c0f4e-0c2a-4f1c-9a53-2a8a8f7a1b10"\n'
                      f'mount_point = "{tmp_path / "mnt"}"\n')

    async def fails(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"{failing} could not start")

    monkeypatch.setattr(importlib.import_module(f"agent.desktop.dbus.{failing}"), "start", fails)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))

    async def names(address: str) -> tuple[set[str], bool]:
        """Every connection on the bus but the one asking, and whether the agent's name has an owner."""
        bus = await MessageBus(bus_address=address).connect()
        try:
            listed = await bus.call(driver_call("ListNames", "", []))
            owned = await bus.call(driver_call("NameHasOwner", "s", ["org.backupagent.Agent"]))
            assert listed is not None and owned is not None
            return {n for n in listed.body[0] if n.startswith(":") and n != bus.unique_name}, bool(owned.body[0])
        finally:
            bus.disconnect()

    with private_bus("session") as session, private_bus("system") as system:
        monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", session.address)
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", system.address)
        with pytest.raises(RuntimeError, match=f"{failing} could not start"):
            daemon.main(config=str(config), no_sudo=True, argv0="backup-agent")
        for address in (session.address, system.address):
            assert asyncio.run(names(address)) == (set(), False), address
