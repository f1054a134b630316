"""The desktop agent and remote destinations, with a real sshd, real buses and the real cycle.

The server is a real OpenSSH sshd on 127.0.0.1 (tests/sshserver.py). A
second [[remote]] points at a port nothing listens on: a server that is not
there. NetworkManager is not on this machine: its stand-in
(tests/helpers/desktop_services.py) sits on a private system bus at the
process boundary, and a recording notification server (tests/test_notify.py)
on a private session bus. The agent runs as users run it (``backup-agent run
--no-sudo --config CFG``, a subprocess, root here so the cycle needs no sudo),
and ``backup-agent status`` asks it over D-Bus. Nothing of the agent is replaced.
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
from typing import Any, Iterator

import pytest

from agent.desktop.statefile import DiskRecord, load_state
from tests.helpers.desktop_services import serve_networkmanager
from tests.sshserver import SshServer, free_port, requires_sshd, running_sshd
from tests.test_conditions_dbus import needs_dbus
from agent.policy import schedule
from tests.test_daemon import REPO, agent_on, detach, here, one_cycle, real, settle, until  # noqa: F401  (here: fixture)
from tests.test_disk import NAME, rig  # noqa: F401  (fixture)
from tests.test_disk_cycle import Bench, bench  # noqa: F401  (fixture)
from tests.test_udev import udevd  # noqa: F401  (fixture)
from tests.test_dbus_control import private_bus
from tests.test_notify import serve as serve_notifications

# NetworkManager's values: NMMetered 1 yes, 2 no; NMConnectivityState 1 none, 4 full.
METERED, NOT_METERED, NO_NETWORK, FULL = 1, 2, 1, 4


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    with running_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


def agent_config(tmp_path: Path, sshd: SshServer, source: Path, repo: Path, closed_port: int) -> Path:
    config = tmp_path / "config.toml"
    (tmp_path / "state").mkdir()
    attic = sshd.config("/srv/attic", name="attic").replace(f"port = {sshd.port}", f"port = {closed_port}")
    config.write_text(
        f'[backup]\nsource = "{source}"\nionice = "none"\nnice = 0\n[rotation]\nhourly = "always"\n'
        f'[system]\nstate_dir = "{tmp_path / "state"}"\n[tray]\nenabled = false\n'
        + sshd.config(str(repo), name="nas")
        + attic + "metered = true\n"
    )
    return config


@pytest.mark.integration
@requires_sshd
def test_remote_destinations_follow_the_network_wait_for_a_silent_server_and_back_up_when_reachable(
    sshd: SshServer, tmp_path: Path
) -> None:
    needs_dbus()
    source = tmp_path / "source"
    source.mkdir()
    (source / "notes.txt").write_text("remote\n")
    repo = tmp_path / "server" / "repo"
    repo.parent.mkdir()
    closed_port = free_port()  # nothing listens there: "attic" is a server that is not reachable
    config = agent_config(tmp_path, sshd, source, repo, closed_port)
    state_file = tmp_path / "xdg-state" / "backup-agent" / "state.json"
    log_path = tmp_path / "agent.log"
    runtime = tmp_path / "run"
    runtime.mkdir()

    def log() -> str:
        return log_path.read_text(errors="replace")

    def record(name: str) -> DiskRecord | None:
        return load_state(str(state_file))[0].get(name) if state_file.exists() else None

    with private_bus("session") as session, private_bus("system") as system:
        env = {k: v for k, v in os.environ.items() if k not in ("SUDO_UID", "NOTIFY_SOCKET", "WATCHDOG_USEC")}
        env.update(DBUS_SESSION_BUS_ADDRESS=session.address, DBUS_SYSTEM_BUS_ADDRESS=system.address,
                   XDG_STATE_HOME=str(tmp_path / "xdg-state"), BACKUP_AGENT_RUNTIME_DIR=str(runtime))

        async def cli(*argv: str) -> tuple[int, str]:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agent.cli", *argv, cwd=REPO, env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )
            out, _ = await asyncio.wait_for(process.communicate(), 30)
            return process.returncode or 0, out.decode()

        async def destinations() -> dict[str, dict[str, Any]]:
            code, out = await cli("status", "--json")
            assert code == 0, out
            return {entry["name"]: entry for entry in json.loads(out)["status"]["disks"]}

        async def scenario() -> None:
            _, manager = await serve_networkmanager(system.address, metered=METERED, connectivity=NO_NETWORK)
            _, cards = await serve_notifications(session.address, ["actions", "body"])
            with open(log_path, "wb") as log_file:
                agent = subprocess.Popen(
                    [sys.executable, "-m", "agent.cli", "run", "--no-sudo", "--config", str(config)],
                    cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            try:
                await until(lambda: "watching for" in log() or agent.poll() is not None, "the agent to start", 10)
                assert agent.poll() is None, log()

                # no network: neither server is due, none is tried
                await until(lambda: "no network: True" in log(), "NetworkManager's word", 5)
                offline = await destinations()
                assert offline["nas"]["waiting"] == "waiting for nas (no network)", offline
                assert offline["attic"]["waiting"] == "waiting for attic (no network)"
                assert offline["nas"]["remote"] and offline["nas"]["next_due"] is None
                code, said = await cli("now", "--disk", "nas")
                assert code == 22 and "nas cannot be reached: there is no network" in said, said
                await asyncio.sleep(0.5)
                assert "starting the backup" not in log() and not repo.exists()

                # a network, metered: nas (metered not allowed) is skipped; attic (allowed) is tried and
                # is not there: waiting, no failure, no card
                manager.set_connectivity(FULL)
                await until(lambda: "attic cannot be reached" in log(), "the look for attic", 10)
                now = await destinations()
                assert now["nas"]["skipped"] == "on a metered connection", now
                refused = f"waiting for attic (127.0.0.1:{closed_port}: the connection was refused)"
                assert now["attic"]["waiting"] == refused and now["attic"]["last_result"] == "none", now
                due = now["attic"]["next_due"]
                assert due is not None and 50 < due - time.time() <= 60  # looked for again in a minute
                code, human = await cli("status")
                assert f"attic: server; last success never; {refused}" in human, human
                assert "nas: server, reachable; last success never; waiting: on a metered connection" in human, human
                assert now["attic"]["last_failure"] is None and now["attic"]["unfinished"] is False
                assert not repo.exists() and "starting the backup of nas" not in log()
                assert not [c for c in cards.shown if "attic" in c.summary and "waits" not in c.summary], cards.shown

                # the connection is not metered any more: nas is caught up, told as for a disk
                manager.set_metered(NOT_METERED)
                done = await until(lambda: (r := record("nas")) is not None and r.last_result != "none" and r,
                                   "the backup to nas", 20)
                assert done.last_result == "success", (done, log())
                assert "starting the backup of nas (interval elapsed)" in log()
                (snapshot,) = os.listdir(repo / "snapshots")
                assert (repo / "snapshots" / snapshot / "notes.txt").read_text() == "remote\n"
                summaries = [card.summary for card in cards.shown]
                assert "Backing up to nas" in summaries and "Backup to nas complete" in summaries, summaries
                complete = [card for card in cards.shown if card.summary == "Backup to nas complete"][-1]
                assert "unplug" not in complete.body and "complete on nas" in complete.body, complete.body
                after = await destinations()
                assert after["nas"]["skipped"] == "" and after["nas"]["last_success"] is not None
                assert 3500 < after["nas"]["next_due"] - time.time() <= 3600  # its own schedule: an interval on
                assert after["attic"]["waiting"] == refused  # and attic's is its own
                assert not [c for c in cards.shown if c.hints.get("urgency") == 2], cards.shown  # no failure card

                agent.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + 5
                while agent.poll() is None and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                assert agent.returncode == 0, log()
                assert "Traceback" not in log(), log()
            finally:
                if agent.poll() is None:
                    agent.kill()
                    agent.wait()

        asyncio.run(asyncio.wait_for(scenario(), 90))


@pytest.mark.integration
def test_a_server_not_backed_up_for_remind_after_days_is_reminded_of_without_plugging_advice(tmp_path: Path) -> None:
    """The notifier (agent/desktop/dbus/notify.py) with a recording notification server on a private bus."""
    from dbus_fast.aio import MessageBus

    from agent.config.model import RemoteRepository, Settings
    from agent.desktop.dbus import notify
    from tests.test_notify import NOW, UTC, Clock, FakeClock, FakeController, FakeDisks

    needs_dbus()
    settings = Settings(path=None, remotes=(RemoteRepository("nas", "nas.home.arpa", "/srv/b"),), remind_after=7)
    # The agent never calls a server attached (Agent.attached), reachable or not: the reminder comes all the same.
    disks = FakeDisks({"nas": NOW - 9 * 86400})

    async def scenario(address: str) -> None:
        server_bus, server = await serve_notifications(address, ["body"])
        bus = await MessageBus(bus_address=address).connect()
        try:
            notifier = await notify.start(bus, FakeController(), disks=disks, settings=settings,
                                          state_path=str(tmp_path / "notifications.json"), clock=FakeClock(),
                                          now=Clock(NOW), tz=UTC)
            notifier.login()
            await notifier.flush()
            [shown] = server.shown
            assert shown.summary == "No backup to nas for 9 days", shown
            assert "whenever nas can be reached" in shown.body and "Plug" not in shown.body, shown.body
            notifier.close()
        finally:
            bus.disconnect()
            server_bus.disconnect()

    with private_bus("session") as session:
        asyncio.run(asyncio.wait_for(scenario(session.address), 30))


@real
@requires_sshd
def test_a_disk_and_a_server_keep_their_own_schedules(
    bench: Bench, here: None, sshd: SshServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent in this process (tests/test_daemon.py's agent_on) with a real LUKS disk bench and the real sshd."""
    monkeypatch.setenv("BACKUP_AGENT_RUNTIME_DIR", str(tmp_path))  # the machine lock is this test's
    bench.init()
    detach(bench.rig.luks_device)
    settle()
    repo = tmp_path / "server" / "repo"
    repo.parent.mkdir()
    with open(bench.config, "a", encoding="utf-8") as config:
        config.write(sshd.config(str(repo), name="nas"))
    ahead = [0.0]

    def clock() -> float:
        return time.time() + ahead[0]

    async def scenario() -> None:
        async with agent_on(bench, clock=clock, policy=schedule.Policy(interval=3600.0)) as (agent, recorder):
            # never backed up, and no NetworkManager to say otherwise: the server is due at once
            await one_cycle(agent, recorder, 1)
            assert recorder.of("backup_started")[0][0] == "nas"
            ahead[0] = 600.0  # ten minutes later on the agent's clock,
            bench.rig.attach(bench.rig.luks_image)  # the plug-in: the disk, due too
            await one_cycle(agent, recorder, 2)
            assert recorder.of("backup_started")[1][0] == NAME
            assert not recorder.of("backup_failed")
            by_name = {entry.name: entry for entry in agent.status().disks}
            disk, nas = by_name[NAME], by_name["nas"]
            assert (disk.last_result, nas.last_result, disk.remote, nas.remote) == ("success", "success", False, True)
            assert disk.last_success is not None and nas.last_success is not None
            assert nas.last_success + 600 < disk.last_success
            assert nas.next_due == nas.last_success + 3600 and disk.next_due == disk.last_success + 3600
            assert len(os.listdir(repo / "snapshots")) == 1
            # an hour on, the server is due and the disk not yet: only the server is backed up
            ahead[0] = nas.next_due + 0.1 - time.time()
            agent.tick()
            await one_cycle(agent, recorder, 3)
            assert [args[0] for args in recorder.of("backup_started")] == ["nas", NAME, "nas"]
            after = {entry.name: entry for entry in agent.status().disks}
            assert after[NAME].last_success == disk.last_success and after[NAME].next_due == disk.next_due
            assert after["nas"].last_success is not None and after["nas"].last_success > nas.last_success
            assert len(os.listdir(repo / "snapshots")) == 2
        bench.assert_locked_and_unmounted()

    asyncio.run(asyncio.wait_for(scenario(), 90))
