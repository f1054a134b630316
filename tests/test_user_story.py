"""The person at the desktop, end to end, as that person: a user without root whose only door is the sudo rule.

``backup-agent run`` runs as users run it: a subprocess as alice, a real
user made for the test (tests/test_browse.py's ``people``), whose only way
to root is the rule ``install`` writes (``sudoers_rule``, checked by visudo,
in /etc/sudoers.d, removed afterwards). So every cycle is the real
``sudo -n backup-agent backup --json --disk NAME``, Eject is ``sudo -n
backup-agent eject ...`` and Browse backups ``sudo -n backup-agent open ...``,
and the cycle as root reads only /etc/backup-agent/config.toml
(``system_config``). ``backup-agent`` is a root-owned script in a directory
alice can enter, on her PATH, running a copy of this checkout's code that
every user can read (``readable_code``).

The disk is tests/test_disk.py's rig on loop devices (a real LUKS header;
only device-mapper's mapping is a stand-in, which this kernel lacks), plugged
in and out with losetup, so udev's events are real; its stand-in rsync
(tests/test_daemon.py) can be slowed so there is a backup to stop. The
session bus is a private dbus-daemon the test starts, which only root and
alice may connect to: alice's agent and CLI, and the test's recording
notification server and StatusNotifierWatcher (the agent's tray registers,
and its menu is clicked as a panel clicks it). There is no system bus (the
address names nothing), so no logind. ``xdg-open`` is a stand-in on alice's
PATH that records what it was asked to show (no file manager here).

What the user is told is read from the recording server; what the agent
decided from ``backup-agent status --json`` as alice; what is on the disk
by root, as the kernel shows it. With ``BACKUP_AGENT_STORY=PATH`` the
notifications are also written to PATH, one block per card (summary, body,
urgency), with what the user did before each, as a replay of the story.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from agent.core import lock
from agent.desktop.daemon import ROOT_CYCLE_LOCK
from agent.desktop.dbus.notify import CRITICAL, NORMAL
from agent.desktop.dbus.tray import BROWSE, EJECT_BASE
from agent.core.errors import EXIT_DISK_MISSING, BusyError
from tests.conftest import ReadableCode
from tests.test_browse import alices_rule, open_bench, people, reads, system_config  # noqa: F401  (fixtures)
from tests.test_browse import write_system_config
from tests.test_daemon import StandIn, detach, real, settle, until
from tests.test_dbus_control import DBUS_DAEMON, private_bus
from tests.test_disk import NAME
from tests.test_disk_cycle import Bench
from tests.test_notify import RecordingServer
from tests.test_notify import serve as serve_notifications
from tests.test_sudo_door import real_sudo  # noqa: F401  (fixture of people)
from tests.test_tray import Host, start_watcher
from tests.test_udev import udevd  # noqa: F401  (fixture of @real)

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


@pytest.fixture
def bin_dir(readable_code: ReadableCode) -> Iterator[Path]:
    """Root's directory on alice's PATH: ``backup-agent`` as installed, and a stand-in ``xdg-open``."""
    directory = Path(tempfile.mkdtemp(prefix="ba-story-bin-"))
    try:
        os.chmod(directory, 0o755)
        program = directory / "backup-agent"
        # cd /: as root through sudo, ``-m`` must not look for the package in alice's directory.
        program.write_text(
            f'#!/bin/sh\ncd / || exit 97\nPYTHONPATH={readable_code.directory} exec {readable_code.python} -m agent.cli "$@"\n'
        )
        shown = directory / "xdg-open"
        shown.write_text('#!/bin/sh\necho "$1" >> "$HOME/xdg-open.argv"\n')
        for path in (program, shown):
            path.chmod(0o755)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def wrapper(bin_dir: Path) -> Path:
    """The installed ``backup-agent`` the sudo rule names (overrides tests/test_sudo_door.py's for ``alices_rule``)."""
    return bin_dir / "backup-agent"


@real
def test_stop_eject_restart_re_plug_browse_and_two_disks_as_the_desktop_user_through_sudo(
    open_bench: Bench, people: tuple[str, str], alices_rule: Path, system_config: Path, bin_dir: Path,
) -> None:
    if DBUS_DAEMON is None:
        pytest.skip(reason="dbus-daemon is not installed (apt-get install -y dbus-daemon): no private bus to test on")
    bench = open_bench
    alice, mallory = people
    uid = pwd.getpwnam(alice).pw_uid
    home = bench.tmp / "alice-home"
    mine = bench.source / "alice"
    for directory, mode in ((home, 0o700), (home / "state", 0o700), (home / "run", 0o700), (mine, 0o755)):
        directory.mkdir()
        directory.chmod(mode)
        shutil.chown(directory, alice, alice)
    (mine / "private.txt").write_text("alice's own\n")
    (mine / "private.txt").chmod(0o600)
    shutil.chown(mine / "private.txt", alice, alice)
    bench.init()
    detach(bench.rig.luks_device)
    settle()
    rsync = StandIn(bench)
    # A second configured disk that is not attached (its LUKS UUID is nowhere).
    elsewhere = bench.tmp / "offsite"
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
    write_system_config(system_config, bench.config)  # what root reads through sudo, and alice's agent too
    snapshots = bench.repository / "snapshots"
    state_file = home / "state" / "backup-agent" / "state.json"
    log_path = bench.tmp / "agent.log"

    def log() -> str:
        return log_path.read_text(errors="replace") if log_path.exists() else ""

    with private_bus("session", users=(alice,)) as session:
        env = {
            "PATH": f"{bin_dir}:/usr/bin:/bin",
            "HOME": str(home),
            "LANG": "C.UTF-8",
            "DBUS_SESSION_BUS_ADDRESS": session.address,
            "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={home / 'no-system-bus'}",
            "XDG_STATE_HOME": str(home / "state"),
            "XDG_RUNTIME_DIR": str(home / "run"),
        }
        as_alice = ["setpriv", f"--reuid={alice}", f"--regid={alice}", "--init-groups", str(bin_dir / "backup-agent")]

        def cli(*argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([*as_alice, *argv], cwd=home, env=env, capture_output=True, text=True, timeout=30)

        def status() -> dict[str, Any]:
            result = cli("-q", "status", "--json")  # a global option before the subcommand
            assert result.returncode == 0, result
            value: dict[str, Any] = json.loads(result.stdout)["status"]
            return value

        def on_disk() -> list[str]:
            return sorted(os.listdir(snapshots))

        agents: list[subprocess.Popen[bytes]] = []

        async def start_agent() -> subprocess.Popen[bytes]:
            mark = len(log())
            with open(log_path, "ab") as log_file:
                agent = subprocess.Popen(
                    [*as_alice, "run"], cwd=home, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                    stderr=subprocess.STDOUT, start_new_session=True,
                )
            agents.append(agent)
            await until(lambda: "watching for" in log()[mark:] or agent.poll() is not None, "the agent to start", 10)
            assert agent.poll() is None, log()
            with open(f"/proc/{agent.pid}/status", encoding="ascii") as proc:
                assert f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}\n" in proc.read()  # alice, and only alice
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

            async def machine_free() -> None:
                """Wait while a backup elsewhere on this machine (another checkout's tests) holds the root cycle's lock.

                Through sudo every cycle, eject and open takes /run/backup-agent.lock, whatever
                the environment says: one run elsewhere meanwhile rightly makes the agent wait
                or refuse, which is not what this story is about.
                """
                def free() -> bool:
                    try:
                        lock.probe(ROOT_CYCLE_LOCK)
                    except BusyError:
                        return False
                    return True

                await until(free, "a backup elsewhere on this machine to end", 120)

            async def stopped_backup(since: int) -> Any:
                """``backup-agent now``, then ``backup-agent stop`` once the transfer is under way."""
                rsync.tell(mode="slow", delay=20.0)
                await machine_free()
                asked = cli("now")
                assert asked.stdout.strip() == "backup started", asked
                await until(lambda: rsync.ready, "the transfer to be under way", 10)
                assert cli("stop").returncode == 0
                stopped = await card(f"Backup to {NAME} stopped", since, "the stop to be told")
                await until(lambda: status()["state"] != "running", "the stopped cycle to end", 15)
                await until(lambda: "It is safe to unplug" in cards()[-1].body, "the disk to be locked", 10)
                rsync.tell(mode="real")
                return stopped

            host: Host | None = None
            try:
                agent = await start_agent()

                # 1. plugged in: the first backup through sudo, one card updated in place, safe to unplug
                user("plugs the backup disk in")
                at = len(cards())
                await machine_free()
                device = bench.rig.attach(bench.rig.luks_image)
                await until(lambda: any("It is safe to unplug" in s.body for s in cards(at)), "the first backup", 20)
                first = cards(at)
                assert first[0].summary == f"Backing up to {NAME}"
                assert {s.id for s in first} == {first[0].id}, "one card for one backup"
                assert f"starting the backup of {NAME}" in log()
                bench.assert_locked_and_unmounted()

                # 2. "Back up now", then Stop: told as a stop, not a failure; no retry (the agent
                # signals sudo, which passes the signal on to the root cycle)
                user("runs `backup-agent now`, then `backup-agent stop` during the copy")
                at = len(cards())
                stopped = await stopped_backup(at)
                assert stopped.hints["urgency"] == NORMAL and "Earlier snapshots are untouched" in stopped.body
                assert all(s.hints["urgency"] != CRITICAL for s in cards(at)), [s.summary for s in cards(at)]
                after = status()
                assert (after["state"], after["last_result"]) == ("disk-attached", "stopped"), after
                assert after["next_due"] >= time.time() + 3500, "a stop is retried only at the next regular time"
                assert after["disks"][0]["unfinished"] is True
                assert stopped.id == first[0].id, "the last backup's card was replaced, not left beside it"
                bench.assert_locked_and_unmounted()

                # 3. stopped again: still one unfinished transfer on the disk, never two side by side
                user("runs `backup-agent now` and `backup-agent stop` once more")
                stopped = await stopped_backup(len(cards()))

                # 4. Browse backups from the tray: open read-only through sudo; alice gets her file back unprivileged
                user("chooses Browse backups in the tray, then runs `versions` and `restore --repository` as herself")
                await until(lambda: watcher.items, "the tray to register", 10)
                host = await Host.connect(session.address, watcher.items[0].split("/")[0])
                at = len(cards())
                await machine_free()
                await host.click(BROWSE)
                await card(f"Browsing the backups on {NAME}", at, "the disk to be open for browsing", 15)
                assert (home / "xdg-open.argv").read_text() == f"{snapshots}\n"
                unfinished = [name for name in on_disk() if name.endswith(".in-progress")]
                assert len(unfinished) == 1, on_disk()
                complete = [name for name in on_disk() if not name.endswith(".in-progress")]
                assert len(complete) == 1, on_disk()
                copy = snapshots / complete[0]
                assert (copy / "script.sh").stat().st_uid == 1234  # rsync ran as root: owners kept
                history = cli("versions", "--json", str(mine / "private.txt"))
                assert history.returncode == 0, history.stderr
                assert [v["first"] for v in json.loads(history.stdout)["versions"]] == complete
                # The config's rsync is the stand-in, in a directory only root may enter (where root runs
                # programs from): alice's own copy of the config, without it, lets her restore use the real one.
                own = home / "config.toml"
                own.write_text("".join(line for line in system_config.read_text().splitlines(keepends=True)
                                       if not line.startswith("rsync = ")))
                shutil.chown(own, alice, alice)
                back = home / "restored"
                restored = cli("restore", "--config", str(own), "--repository", str(bench.repository), "--to", str(back),
                               str(mine / "private.txt"))
                assert restored.returncode == 0, restored.stderr
                found = [path for path in back.rglob("private.txt")]
                assert [path.read_text() for path in found] == ["alice's own\n"], restored.stdout
                assert (found[0].stat().st_uid, found[0].stat().st_mode & 0o777) == (uid, 0o600)
                # mallory, another user of this machine, reads neither alice's 0600 file nor root's
                for path in (copy / "alice" / "private.txt", copy / "secret"):
                    looked = reads(mallory, path)
                    assert looked.returncode != 0 and "Permission denied" in looked.stderr, (path, looked)
                user(f"`versions` lists {complete[0]}; `restore --repository` puts private.txt back under {back} "
                     "(alice's, 0600); mallory's `cat` of it in the snapshot: Permission denied")

                # 5. Eject from the tray: closed, no next backup, and it stays so across a restart
                user("chooses Eject in the tray")
                at = len(cards())
                await machine_free()
                await host.click(EJECT_BASE)
                await card(f"It is safe to unplug {NAME}", at, "the eject's answer", 15)
                bench.assert_locked_and_unmounted()
                ejected = status()
                assert ejected["disks"][0]["ejected"] is True and ejected["next_due"] is None, ejected

                user("logs out and in again (the agent restarts) with the disk still plugged in, a backup due")
                await stop_agent(agent)
                registered = len(watcher.items)
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
                await until(lambda: len(watcher.items) > registered, "the new agent's tray to register", 10)
                host.name = watcher.items[-1].split("/")[0]
                user("(no notification, no backup started) `backup-agent status` says:\n" + shown_status.rstrip())

                # 6. unplugged and plugged in again: it carries on with the stopped backup
                user("unplugs the disk and plugs it in again")
                at = len(cards())
                detach(device)
                await until(lambda: not status()["disks"][0]["attached"], "the disk to be gone", 10)
                await machine_free()
                device = bench.rig.attach(bench.rig.luks_image)
                done = await card(f"Backup to {NAME} complete", at, "the resumed backup")
                resumed = next(s for s in cards(at) if s.summary == f"Backing up to {NAME}")
                assert "carries on with the unfinished backup" in resumed.body
                assert not any("no backup needed yet" in s.summary for s in cards(at))
                await until(lambda: "It is safe to unplug" in cards()[-1].body, "the disk to be locked", 10)
                assert status()["last_result"] == "success" and not status()["disks"][0]["unfinished"]

                # 7. plugged in again soon after: "no backup needed yet"; unplugged: the old cards are withdrawn
                user("unplugs the disk and plugs it in again a minute later")
                detach(device)
                await until(lambda: not status()["disks"][0]["attached"], "the disk to be gone", 10)
                await until(lambda: done.id in server.closed, "'safe to unplug' to be withdrawn", 5)
                at = len(cards())
                await machine_free()
                device = bench.rig.attach(bench.rig.luks_image)
                skipped = await card(f"{NAME}: no backup needed yet", at, "the skip notice", 10)
                assert skipped.hints["urgency"] == 0

                # 8. Eject in the tray: "leave the disk plugged in" is stale then, and withdrawn
                user("chooses Eject in the tray")
                at = len(cards())
                await machine_free()
                await host.click(EJECT_BASE)
                answer = await card(f"It is safe to unplug {NAME}", at, "the eject's answer", 15)
                await until(lambda: skipped.id in server.closed, "the skip notice to be withdrawn", 5)
                assert status()["disks"][0]["ejected"] is True

                # 9. two disks: status shows both; "now" names one (an ejected disk is backed up when asked)
                user(f"runs `backup-agent now --disk offsite`, then `backup-agent now --disk {NAME}` and stops it")
                listed = {d["name"]: d for d in status()["disks"]}
                assert list(listed) == [NAME, "offsite"]
                assert listed["offsite"]["attached"] is False and listed["offsite"]["last_success"] is None
                assert listed[NAME]["last_success"] is not None
                offsite = cli("now", "--disk", "offsite")
                assert offsite.returncode == EXIT_DISK_MISSING and "offsite is not attached" in offsite.stdout
                text = cli("status").stdout
                assert f"  {NAME}: ejected (closed until plugged in again); last success" in text
                assert "  offsite: not attached; last success never" in text
                at = len(cards())
                rsync.tell(mode="slow", delay=20.0)
                await machine_free()
                asked = cli("now", "--disk", NAME)
                assert asked.stdout.strip() == "backup started", asked
                await until(lambda: rsync.ready, "the transfer to be under way", 10)
                assert "Started because you asked for it" in cards(at)[-1].body
                await until(lambda: answer.id in server.closed, "'safe to unplug' to be withdrawn as it is backed up", 5)
                assert cli("stop").returncode == 0
                await card(f"Backup to {NAME} stopped", at, "the stop to be told")
                await until(lambda: "It is safe to unplug" in cards()[-1].body, "the disk to be locked", 10)
                rsync.tell(mode="real")
                user(f"`now --disk offsite` said: {offsite.stdout.strip()} (exit {offsite.returncode}); "
                     "before that, `backup-agent status` said:\n" + text.rstrip())

                # 10. the administrator frees the unfinished transfer: rotate opens the configured disk itself
                user(f"an administrator runs `sudo backup-agent -q rotate --discard-unfinished --disk {NAME}`")
                await stop_agent(agent)
                admin = ["sudo", "-n", str(bin_dir / "backup-agent")]
                await machine_free()
                before = subprocess.run([*admin, "list", "--disk", NAME], capture_output=True, text=True, timeout=60)
                assert before.returncode == 0 and "unfinished transfer" in before.stdout.splitlines()[-1], before
                assert "running:" not in before.stderr, before.stderr  # the commands run are told only with -v
                await machine_free()
                freed = subprocess.run([*admin, "-q", "rotate", "--discard-unfinished", "--disk", NAME],
                                       capture_output=True, text=True, timeout=60)
                assert freed.returncode == 0, freed
                await machine_free()
                after_list = subprocess.run([*admin, "list", "--disk", NAME], capture_output=True, text=True, timeout=60)
                assert after_list.returncode == 0, after_list
                assert after_list.stdout.splitlines() == before.stdout.splitlines()[:-1], "only the transfer is gone"
                user(f"`list --disk {NAME}` said before:\n{before.stdout.rstrip()}\nrotate said:\n{freed.stdout.rstrip()}\n"
                     f"and `list --disk {NAME}` after:\n{after_list.stdout.rstrip()}")
                bench.assert_locked_and_unmounted()
                assert "Traceback" not in log(), log()
                detach(device)
            finally:
                for agent in agents:
                    if agent.poll() is None:
                        agent.kill()
                        agent.wait()
                print(f"--- the agent's log (shown by pytest if the story failed)\n{log()[-6000:]}")
                replay = os.environ.get("BACKUP_AGENT_STORY")
                if replay:
                    Path(replay).write_text(story(server, said))
                if host is not None:
                    host.bus.disconnect()
                watcher_bus.disconnect()
                server_bus.disconnect()

        asyncio.run(asyncio.wait_for(scenario(), 600))
