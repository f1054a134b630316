"""The person at the desktop, end to end: plug-in, backup, stop, re-plug, eject, agent restart, two disks.

``backup-agent run`` runs as users run it (a subprocess, ``--no-sudo`` as
root here) with the real cycle, real udev and loop devices (tests/test_daemon.py's
bench; its stand-in rsync can be slowed so there is a backup to stop), on a
private session bus where this test serves a recording notification server
and a StatusNotifierWatcher (so the agent's tray registers, and its Eject is
clicked as a panel clicks it). What the user is told is read from the
recording server; what the agent decided from ``backup-agent status --json``.

With ``BACKUP_AGENT_STORY=PATH`` the notifications are also written to PATH,
one block per card (summary, body, urgency), as a replay of the story.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from agent.errors import EXIT_DISK_MISSING
from tests.test_daemon import REPO, StandIn, detach, here, real, settle, until  # noqa: F401  (here: fixture)
from tests.test_dbus_control import DBUS_DAEMON, private_bus
from tests.test_disk import NAME, rig  # noqa: F401  (fixture)
from tests.test_disk_cycle import Bench, bench  # noqa: F401  (fixture)
from tests.test_notify import CRITICAL, NORMAL, RecordingServer
from tests.test_notify import serve as serve_notifications
from tests.test_tray import EJECT_BASE, Host, start_watcher
from tests.test_udev import udevd  # noqa: F401  (fixture)

URGENCY = {0: "low", 1: "normal", 2: "critical"}


def story(server: RecordingServer, said: list[tuple[int, str]]) -> str:
    """The notifications in the order they came, each with what the user did just before."""
    lines: list[str] = []
    marks = list(said)  # (how many notifications and withdrawals came before, what the user did)
    for index, (kind, value) in enumerate(server.order):
        while marks and marks[0][0] <= index:
            lines.append(f"\n## {marks.pop(0)[1]}")
        if kind == "notify":
            shown = server.shown[value]
            urgency = URGENCY.get(int(shown.hints.get("urgency", 1)), "?")
            replaced = f" (replaces #{shown.replaces_id})" if shown.replaces_id else ""
            lines.append(f"#{shown.id}{replaced} [{urgency}] {shown.summary}")
            lines += [f"    {line}" for line in shown.body.splitlines()]
            if shown.actions:
                lines.append(f"    actions: {', '.join(shown.actions[1::2])}")
        else:
            lines.append(f"#{value} withdrawn (CloseNotification)")
    lines += [f"\n## {does}" for _, does in marks]
    return "\n".join(lines) + "\n"


@real
def test_stop_re_plug_eject_restart_and_two_disks_as_the_user_meets_them(
    bench: Bench, here: None, tmp_path: Path
) -> None:
    if DBUS_DAEMON is None:
        pytest.skip(reason="dbus-daemon is not installed (apt-get install -y dbus-daemon): no private bus to test on")
    bench.init()
    detach(bench.rig.luks_device)
    settle()
    rsync = StandIn(bench)
    # A second configured disk that is not attached (its LUKS UUID is nowhere).
    elsewhere = tmp_path / "offsite"
    elsewhere.mkdir()
    with open(bench.config, "a", encoding="utf-8") as config:
        config.write(
            "[[disk]]\n"
            'name = "offsite"\n'
            f'luks_uuid = "{uuid.uuid4()}"\n'
            f'mount_point = "{elsewhere / "mnt"}"\n'
            f'mapped_device = "{elsewhere / "mapper" / "offsite"}"\n'
            f'repository = "{elsewhere / "mnt" / "host"}"\n'
            'unlock = "cryptdisks"\n'
            'filesystem = "ext4"\n'
        )
    state_file = tmp_path / "xdg-state" / "backup-agent" / "state.json"
    log_path = tmp_path / "agent.log"

    def log() -> str:
        return log_path.read_text(errors="replace") if log_path.exists() else ""

    with private_bus("session") as session:
        env = {k: v for k, v in os.environ.items() if k not in ("SUDO_UID", "NOTIFY_SOCKET", "WATCHDOG_USEC")}
        env.update(DBUS_SESSION_BUS_ADDRESS=session.address, XDG_STATE_HOME=str(tmp_path / "xdg-state"))
        env.pop("DBUS_SYSTEM_BUS_ADDRESS", None)

        def cli(*argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "agent.cli", *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=30
            )

        def status() -> dict[str, Any]:
            result = cli("status", "--json")
            assert result.returncode == 0, result
            value: dict[str, Any] = json.loads(result.stdout)["status"]
            return value

        agents: list[subprocess.Popen[bytes]] = []

        async def start_agent() -> subprocess.Popen[bytes]:
            mark = len(log())
            with open(log_path, "ab") as log_file:
                agent = subprocess.Popen(
                    [sys.executable, "-m", "agent.cli", "run", "--no-sudo", "--config", str(bench.config)],
                    cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            agents.append(agent)
            await until(lambda: "watching for" in log()[mark:] or agent.poll() is not None, "the agent to start", 10)
            assert agent.poll() is None, log()
            await until(lambda: cli("status", "--json").returncode == 0 and status(), "the agent on the bus", 10)
            return agent

        async def stop_agent(agent: subprocess.Popen[bytes]) -> None:
            agent.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while agent.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert agent.returncode == 0, log()

        async def scenario() -> None:
            server_bus, server = await serve_notifications(session.address, ["actions", "body", "persistence"])
            watcher_bus, watcher = await start_watcher(session.address)
            said: list[tuple[int, str]] = []

            def user(does: str) -> None:
                said.append((len(server.order), does))

            def cards(since: int = 0) -> list[Any]:
                return server.shown[since:]

            async def card(summary: str, since: int, what: str, timeout: float = 20) -> Any:
                return await until(
                    lambda: next((s for s in cards(since) if s.summary.startswith(summary)), None), what, timeout
                )

            try:
                agent = await start_agent()

                # 1. plugged in: the first backup, one card updated in place, safe to unplug
                user("plugs the backup disk in")
                at = len(cards())
                device = bench.rig.attach(bench.rig.luks_image)
                await until(lambda: any("It is safe to unplug" in s.body for s in cards(at)), "the first backup", 20)
                first = cards(at)
                assert first[0].summary == f"Backing up to {NAME}"
                assert {s.id for s in first} == {first[0].id}, "one card for one backup"

                # 2. "Back up now", then Stop: told as a stop, not a failure; no retry
                rsync.tell(mode="slow", delay=20.0)
                user("runs `backup-agent now`, then `backup-agent stop` during the copy")
                at = len(cards())
                assert cli("now").stdout.strip() == "backup started"
                await until(lambda: rsync.ready, "the transfer to be under way", 10)
                assert cli("stop").returncode == 0
                stopped = await card(f"Backup to {NAME} stopped", at, "the stop to be told")
                assert stopped.hints["urgency"] == NORMAL and "Earlier snapshots are untouched" in stopped.body
                await until(lambda: status()["state"] != "running", "the stopped cycle to end", 15)
                await asyncio.sleep(0.3)
                assert all(s.hints["urgency"] != CRITICAL for s in cards(at)), [s.summary for s in cards(at)]
                after = status()
                assert (after["state"], after["last_result"]) == ("disk-attached", "stopped"), after
                assert after["next_due"] >= time.time() + 3500, "a stop is retried only at the next regular time"
                assert after["disks"][0]["unfinished"] is True
                assert stopped.id == first[0].id, "the last backup's card was replaced, not left beside it"

                # 3. unplugged and plugged in again: it carries on with the stopped backup
                rsync.tell(mode="real")
                user("unplugs the disk and plugs it in again")
                at = len(cards())
                detach(device)
                await until(lambda: not status()["disks"][0]["attached"], "the disk to be gone", 10)
                device = bench.rig.attach(bench.rig.luks_image)
                done = await card(f"Backup to {NAME} complete", at, "the resumed backup")
                resumed = next(s for s in cards(at) if s.summary == f"Backing up to {NAME}")
                assert "carries on with the unfinished backup" in resumed.body
                assert not any("no backup needed yet" in s.summary for s in cards(at))
                await until(lambda: "It is safe to unplug" in cards()[-1].body, "the disk to be locked", 10)
                assert status()["last_result"] == "success" and not status()["disks"][0]["unfinished"]
                assert done.id == stopped.id  # "Backup stopped" was replaced by what followed

                # 4. plugged in again soon after: "no backup needed yet"; unplugged: that card is withdrawn
                user("unplugs the disk and plugs it in again a minute later")
                detach(device)
                await until(lambda: not status()["disks"][0]["attached"], "the disk to be gone", 10)
                # "safe to unplug" is withdrawn once the disk is unplugged
                await until(lambda: done.id in server.closed, "the card to be withdrawn", 5)
                at = len(cards())
                device = bench.rig.attach(bench.rig.luks_image)
                skipped = await card(f"{NAME}: no backup needed yet", at, "the skip notice", 10)
                assert skipped.hints["urgency"] == 0

                # 5. Eject from the tray: closed, no next backup, and it stays so across a restart
                user("chooses Eject in the tray")
                await until(lambda: watcher.items, "the tray to register", 10)
                host = await Host.connect(session.address, watcher.items[0].split("/")[0])
                await host.click(EJECT_BASE)
                await card(f"It is safe to unplug {NAME}", at, "the eject's answer", 15)
                ejected = status()
                assert ejected["disks"][0]["ejected"] is True and ejected["next_due"] is None, ejected
                # "no backup needed yet; leave the disk plugged in" is stale now: withdrawn
                await until(lambda: skipped.id in server.closed, "the skip notice to be withdrawn", 5)

                user("logs out and in again (the agent restarts) with the disk still plugged in, a backup due")
                await stop_agent(agent)
                saved = json.loads(state_file.read_text())
                assert saved["disks"][NAME]["ejected"] is True
                saved["disks"][NAME]["last_success"] -= 2 * 3600  # two hours later: a backup is due
                state_file.write_text(json.dumps(saved))
                at, mark = len(cards()), len(log())
                agent = await start_agent()
                await asyncio.sleep(1.5)
                assert "starting the backup" not in log()[mark:], log()[mark:]
                assert not any(s.summary.startswith("Backing up") for s in cards(at))
                restarted = status()
                assert restarted["disks"][0]["ejected"] is True and restarted["next_due"] is None, restarted
                shown_status = cli("status").stdout
                assert f"none scheduled ({NAME} ejected)" in shown_status
                user("(no notification, no backup started) `backup-agent status` says:\n" + shown_status.rstrip())

                # 6. two disks: status shows both; "now" names one
                user(f"runs `backup-agent now --disk {NAME}`, then `backup-agent now --disk offsite`")
                listed = {d["name"]: d for d in status()["disks"]}
                assert list(listed) == [NAME, "offsite"]
                assert listed["offsite"]["attached"] is False and listed["offsite"]["last_success"] is None
                assert listed[NAME]["last_success"] is not None
                asked = cli("now", "--disk", NAME)
                assert asked.stdout.strip() == "backup started", asked
                await card(f"Backup to {NAME} complete", at, "the asked-for backup")
                offsite = cli("now", "--disk", "offsite")
                assert offsite.returncode == EXIT_DISK_MISSING and "offsite is not attached" in offsite.stdout
                text = cli("status").stdout
                assert f"  {NAME}: attached; last success" in text and "  offsite: not attached; last success never" in text
                user(f"`now --disk offsite` says: {offsite.stdout.strip()} (exit {offsite.returncode}); "
                     "then `backup-agent status` says:\n" + text.rstrip())
                await until(lambda: "It is safe to unplug" in cards()[-1].body, "the disk to be locked", 10)
                await stop_agent(agent)
                assert "Traceback" not in log(), log()
                detach(device)
            finally:
                for agent in agents:
                    if agent.poll() is None:
                        agent.kill()
                        agent.wait()
                replay = os.environ.get("BACKUP_AGENT_STORY")
                if replay:
                    Path(replay).write_text(story(server, said))
                watcher_bus.disconnect()
                server_bus.disconnect()

        asyncio.run(asyncio.wait_for(scenario(), 150))
