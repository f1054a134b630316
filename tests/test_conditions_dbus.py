"""Moments not to back up, and progress where the desktop shows it, with real buses and the real agent.

UPower, NetworkManager and KDE's job progress service are not on this
machine: they are small stand-ins (tests/helpers/desktop_services.py,
dbus-fast services) on private buses this test starts (a dbus-daemon for the
system bus and one for the session bus), that is, at the process boundary.
The agent runs as users run it (``backup-agent run --no-sudo --config CFG``
in a subprocess) with the real cycle, real udev and loop devices
(tests/test_daemon.py's bench); a notification server (tests/test_notify.py's
recording one) and a listener for the dock's launcher entry share the
session bus. Nothing of the agent is replaced.
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
from typing import Any

import pytest

from agent.desktop.dbus import networkmanager, upower
from agent.desktop.statefile import DiskRecord, load_state
from tests.helpers.desktop_services import (
    listen_to_launcher,
    serve_jobviews,
    serve_networkmanager,
    serve_upower,
)
from tests.test_daemon import REPO, StandIn, detach, here, real, settle, until  # noqa: F401  (here: fixture)
from tests.test_dbus_control import DBUS_DAEMON, private_bus
from tests.test_disk import NAME, rig  # noqa: F401  (fixture)
from tests.test_disk_cycle import Bench, bench  # noqa: F401  (fixture)
from tests.test_notify import serve as serve_notifications
from tests.test_udev import udevd  # noqa: F401  (fixture)


def needs_dbus() -> None:
    if DBUS_DAEMON is None:
        pytest.skip(reason="dbus-daemon is not installed (apt-get install -y dbus-daemon): no private bus to test on")


@pytest.mark.integration
def test_the_battery_and_the_connection_are_read_then_followed_as_they_change() -> None:
    """The adapters the agent uses, against the stand-ins: one query, then every PropertiesChanged."""
    from dbus_fast.aio import MessageBus

    needs_dbus()

    async def scenario(address: str) -> None:
        upower_bus, power, display = await serve_upower(address, on_battery=True, percent=12.0)
        nm_bus, manager = await serve_networkmanager(address, metered=3, connectivity=4)
        agent_bus = await MessageBus(bus_address=address).connect()
        try:
            # the reusable query a remote destination asks before it sends
            state = await networkmanager.network_state(agent_bus)
            assert state == networkmanager.NetworkState(metered=True, connectivity="full") and state.online
            batteries: list[tuple[bool, float | None]] = []
            networks: list[networkmanager.NetworkState] = []
            watch = await upower.watch_power(agent_bus, lambda on, percent: batteries.append((on, percent)))
            net = await networkmanager.watch_network(agent_bus, networks.append)
            assert watch is not None and net is not None
            assert batteries == [(True, 12.0)] and networks == [state]
            display.set_percent(11.0)
            power.set_on_battery(False)
            manager.set_metered(4)  # guessed not metered
            await until(lambda: len(batteries) == 3 and len(networks) == 2, "the changes", 5)
            assert batteries[1:] == [(True, 11.0), (False, 11.0)]
            assert networks[1] == networkmanager.NetworkState(metered=False, connectivity="full")
            watch.close()
            net.close()
            power.set_on_battery(True)
            await asyncio.sleep(0.2)
            assert len(batteries) == 3  # closed: no more calls
        finally:
            for bus in (agent_bus, upower_bus, nm_bus):
                bus.disconnect()
        # without the services: nothing is known, and nothing is held
        lonely = await MessageBus(bus_address=address).connect()
        try:
            assert await networkmanager.network_state(lonely) == networkmanager.NetworkState()
            seen: list[tuple[bool, float | None]] = []
            assert await upower.watch_power(lonely, lambda on, percent: seen.append((on, percent))) is not None
            assert seen == [(False, None)]
        finally:
            lonely.disconnect()

    with private_bus("system") as system:
        asyncio.run(asyncio.wait_for(scenario(system.address), 30))


@real
def test_a_backup_skipped_on_battery_is_caught_up_on_mains_shown_as_a_kde_job_stopped_from_it_and_not_now(
    bench: Bench, here: None, tmp_path: Path
) -> None:
    needs_dbus()
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

    with private_bus("session") as session, private_bus("system") as system:
        env = {k: v for k, v in os.environ.items() if k not in ("SUDO_UID", "NOTIFY_SOCKET", "WATCHDOG_USEC")}
        env.update(DBUS_SESSION_BUS_ADDRESS=session.address, DBUS_SYSTEM_BUS_ADDRESS=system.address,
                   XDG_STATE_HOME=str(tmp_path / "xdg-state"))

        async def cli(*argv: str) -> tuple[int, str]:
            """The real CLI, awaited (the stand-ins on this loop must answer the agent meanwhile)."""
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agent.cli", *argv, cwd=REPO, env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )
            out, _ = await asyncio.wait_for(process.communicate(), 30)
            return process.returncode or 0, out.decode()

        async def status() -> dict[str, Any]:
            code, out = await cli("status", "--json")
            assert code == 0, out
            return json.loads(out)["status"]  # type: ignore[no-any-return]

        async def scenario() -> None:
            _, power, display = await serve_upower(system.address, on_battery=True, percent=12.0)
            await serve_networkmanager(system.address, metered=1)  # metered: a local disk backs up all the same
            _, jobs = await serve_jobviews(session.address)
            _, cards = await serve_notifications(session.address, ["actions", "body"])
            _, dock = await listen_to_launcher(session.address)
            with open(log_path, "wb") as log_file:
                agent = subprocess.Popen(
                    [sys.executable, "-m", "agent.cli", "run", "--no-sudo", "--config", str(bench.config)],
                    cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            try:
                await until(lambda: "watching for" in log() or agent.poll() is not None, "the agent to start", 10)
                assert agent.poll() is None, log()

                # plugged in on a low battery: due, but skipped; said in status, once on a low-urgency card
                bench.rig.attach(bench.rig.luks_image)
                await until(lambda: "skipped for now" in log(), "the skip", 10)
                waiting = await status()
                assert waiting["state"] == "disk-attached" and waiting["skipped"] == "on battery at 12% (below 30%)"
                assert waiting["last_result"] == "none" and waiting["next_due"] is None, waiting
                code, human = await cli("status")
                assert "waiting:      on battery at 12% (below 30%)" in human, human
                await until(lambda: any(card.summary == f"{NAME}: backup waits" for card in cards.shown), "the card", 5)
                display.set_percent(11.0)  # still low: no second card, no backup
                await asyncio.sleep(0.5)
                told = [card for card in cards.shown if card.summary == f"{NAME}: backup waits"]
                assert len(told) == 1 and told[0].hints["urgency"] == 0, told  # low urgency, never critical
                assert (await status())["skipped"] == "on battery at 11% (below 30%)"
                assert rsync.runs() == [] and not jobs.requests

                # on mains: caught up at once, as the plug-in it was; a KDE job with Cancel (Killable),
                # and the dock's progress from shown to gone
                power.set_on_battery(False)
                done = await until(lambda: (r := record()) is not None and r.last_result != "none" and r, "cycle 1")
                assert done.last_result == "success", (done, log())
                assert f"starting the backup of {NAME} (plugged in, due)" in log()
                # the connection is metered (NetworkManager says so), and a local disk backs up all the same
                assert "metered connection: True" in log()
                assert jobs.requests == [("Backups", "drive-harddisk", 1)]
                first = jobs.views[0]
                await until(lambda: first.calls and first.calls[-1][0] == "terminate", "the job's end", 5)
                members = [member for member, _ in first.calls]
                assert ("setInfoMessage", (f"Backing up to {NAME}",)) in first.calls
                assert ("setDescriptionField", (0, "Destination", NAME)) in first.calls
                assert ("setPercent", (100,)) in first.calls and first.calls[-1] == ("terminate", ("",))
                assert members.count("terminate") == 1
                await until(lambda: dock and dock[-1][1] == {"progress-visible": False}, "the dock's bar to go", 5)
                assert dock[0] == ("application://backup-agent.desktop", {"progress": 0.0, "progress-visible": True})
                assert (await status())["skipped"] == ""

                # the job's cancel button is the agent's Stop: stopped, not failed
                rsync.tell(mode="slow", delay=20.0)
                assert (await cli("now"))[1].strip() == "backup started"
                await until(lambda: len(jobs.views) == 2 and rsync.ready, "the second job and its transfer", 10)
                jobs.views[1].cancel_requested()
                stopped = await until(lambda: (r := record()) is not None and r.last_result == "stopped" and r,
                                      "the stop from the job view", 15)
                assert stopped.failures == 0 and stopped.postponed_until is None
                await until(lambda: jobs.views[1].calls[-1] == ("terminate", ("",)), "the second job's end", 5)

                # Not now, on the started card: stopped, and the next try exactly one interval later
                rsync.tell(mode="slow", delay=20.0)
                assert (await cli("now"))[1].strip() == "backup started"
                await until(lambda: rsync.ready, "the third transfer", 10)
                started = [card for card in cards.shown if "not-now" in card.actions]
                assert started and started[-1].actions[:4] == ["stop", "Stop", "not-now", "Not now"]
                said = time.time()
                cards.action_invoked(started[-1].id, "not-now")
                later = await until(lambda: (r := record()) is not None and r.postponed_until is not None and r,
                                    "the postponement", 15)
                assert said - 1 <= later.postponed_until - 3600 <= time.time(), later
                after = await status()
                assert after["last_result"] == "stopped" and after["next_due"] == later.postponed_until, after
                assert after["last_message"].startswith("not now, as asked; the next backup at "), after
                bench.assert_locked_and_unmounted()

                agent.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + 5
                while agent.poll() is None and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                assert agent.returncode == 0, log()
                assert "Traceback" not in log(), log()
                if os.environ.get("SHOW_AGENT_LOG"):
                    print(log())
            finally:
                if agent.poll() is None:
                    agent.kill()
                    agent.wait()

        asyncio.run(asyncio.wait_for(scenario(), 120))
