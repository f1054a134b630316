"""``backup-agent eject --disk NAME`` (agent/disk/eject.py): close a disk left open, or refuse and touch nothing.

The plan is pure and tested directly. The command runs as users run it
(``python -m agent.cli eject`` in a subprocess, as root) on the rig of
tests/test_disk.py through test_disk_cycle's Bench: a real LUKS2 header on a
loop device, a plain ext4 image on a second one that the stand-in
cryptdisks_start/stop expose as the mapped device (this kernel has no
device-mapper; only that step is replaced, and the stand-in's stop refuses
while the device is mounted, as cryptsetup close does). mount, umount, sync,
mountinfo and the machine lock are real. Every check of what is mounted
reads the kernel's /proc/self/mountinfo (test_disk_cycle.kernel_mounts).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.core import lock
from agent.config.model import Disk
from agent.desktop.daemon import cycle_argv_for, eject_reply
from agent.disk.eject import EjectPlan, plan_eject
from agent.core.errors import DiskBusyError, WrongDiskError
from agent.core.mounts import MountEntry
from agent.desktop.state import EjectReply
from tests.test_daemon import agent_on, here, one_cycle, real, settle, until  # noqa: F401  (here: fixture)
from tests.test_dbus_control import run
from tests.test_disk import NAME, _run, rig  # noqa: F401  (rig: the fixture bench uses)
from tests.test_disk_cycle import EXIT_BUSY, EXIT_DISK_BUSY, EXIT_OK, EXIT_REPOSITORY, Bench, Run, bench, device_number  # noqa: F401
from tests.test_udev import udevd  # noqa: F401  (fixture of @real)

MAPPED = "254:3"
ROOT = MountEntry("/", "ext4", "/dev/sda1", "8:1")
ONE = Disk(name="backup1", luks_uuid="0" * 8 + "-0000-0000-0000-" + "0" * 12, mount_point="/mnt/backup1",
           mapped_device="/dev/mapper/backup1", repository="/mnt/backup1/host")


def at(mount_point: str, device: str = MAPPED, source: str = "/dev/mapper/backup1") -> MountEntry:
    return MountEntry(mount_point, "ext4", source, device)


# -- the plan (pure) --------------------------------------------------------------------


def test_the_plan_closes_only_what_is_open() -> None:
    assert plan_eject(ONE, [ROOT], None) == EjectPlan(unmount=False, lock=False)
    assert plan_eject(ONE, [ROOT], None).closed
    assert plan_eject(ONE, [ROOT], MAPPED) == EjectPlan(unmount=False, lock=True)
    assert plan_eject(ONE, [ROOT, at("/mnt/backup1")], MAPPED) == EjectPlan(unmount=True, lock=True)
    # another disk's mount elsewhere is none of eject's business
    assert plan_eject(ONE, [ROOT, at("/mnt/other", "8:33", "/dev/sdc1")], None).closed


@pytest.mark.parametrize("mapped", [MAPPED, None], ids=["unlocked", "locked"])
def test_the_plan_refuses_another_filesystem_at_the_mount_point(mapped: str | None) -> None:
    """It might be the backup disk under another name: "safe to unplug" would be a guess."""
    foreign = at("/mnt/backup1", "7:5", "/dev/loop5")
    with pytest.raises(WrongDiskError) as caught:
        plan_eject(ONE, [ROOT, foreign], mapped)
    assert caught.value.message.startswith(
        "/mnt/backup1 is mounted from /dev/loop5 (ext4, device 7:5), not from the backup disk backup1 "
        "(/dev/mapper/backup1): nothing was unmounted or locked"
    )
    # mounted over the disk: the same refusal (what is visible there is not the disk)
    with pytest.raises(WrongDiskError):
        plan_eject(ONE, [ROOT, at("/mnt/backup1"), foreign], MAPPED)


def test_the_plan_refuses_a_disk_also_mounted_elsewhere() -> None:
    for entries in ([ROOT, at("/media/me/x")], [ROOT, at("/mnt/backup1"), at("/media/me/x")]):
        with pytest.raises(DiskBusyError) as caught:
            plan_eject(ONE, entries, MAPPED)
        assert caught.value.message == (
            "/dev/mapper/backup1 is also mounted on /media/me/x: nothing was unmounted or locked; "
            "unmount it there (umount /media/me/x), then eject backup1 again"
        )


# -- the command on the rig -------------------------------------------------------------


def eject(bench: Bench, *extra: str) -> Run:
    return bench.cli("eject", "--disk", NAME, "--config", str(bench.config), *extra)


def open_by_hand(bench: Bench) -> None:
    """As a user does to browse the snapshots: unlock (the stand-in's mapping), then mount."""
    bench.rig.unlock_by_hand()
    bench.rig.mount_by_hand(str(bench.rig.mapped))


def assert_open(bench: Bench) -> None:
    assert [entry[1] for entry in bench.mounted_here()] == [device_number(bench.rig.plain_device)]
    assert os.path.islink(bench.rig.mapped)


@pytest.mark.integration
def test_an_open_disk_is_unmounted_and_locked(bench: Bench) -> None:
    open_by_hand(bench)
    (bench.rig.mount_point / "written-while-open").write_bytes(os.urandom(4096))
    run = eject(bench, "--json")
    assert run.returncode == EXIT_OK, str(run)
    assert run.steps() == [
        ("lock", "start"), ("lock", "done"), ("disk", "start"), ("disk", "done"),
        ("unmount", "start"), ("unmount", "done"), ("lock-disk", "start"), ("lock-disk", "done"), ("complete", ""),
    ]
    found = [event for event in run.events if event["event"] == "step" and event["step"] == "disk"][-1]
    assert (found["unlocked"], found["mounted"]) == (True, True)
    assert run.the("complete")["already_closed"] is False
    bench.assert_locked_and_unmounted()
    assert bench.calls() == [("stop", 0)]  # the stand-in refuses to stop under a mount: unmounted first
    with bench.looking() as root:  # synced before the unmount: what was written is on the disk
        assert (root / "written-while-open").stat().st_size == 4096
    # and again: nothing left to do
    again = eject(bench)
    assert (again.returncode, again.stdout) == (EXIT_OK, f"{NAME} is locked and not mounted: already safe to unplug\n")
    assert bench.calls() == [("stop", 0)]


@pytest.mark.integration
def test_an_unlocked_disk_that_is_not_mounted_is_locked(bench: Bench) -> None:
    bench.rig.unlock_by_hand()
    run = eject(bench)
    assert (run.returncode, run.stdout) == (EXIT_OK, f"{NAME} is unmounted and locked: safe to unplug\n"), str(run)
    bench.assert_locked_and_unmounted()
    assert bench.calls() == [("stop", 0)]


@pytest.mark.integration
def test_a_closed_disk_is_already_safe(bench: Bench) -> None:
    run = eject(bench, "--json")
    assert run.returncode == EXIT_OK, str(run)
    assert ("unmount", "skipped") in run.steps() and ("lock-disk", "skipped") in run.steps()
    assert run.the("complete")["already_closed"] is True
    assert bench.calls() == []
    bench.assert_locked_and_unmounted()


@pytest.mark.integration
def test_a_busy_disk_is_left_open_and_the_holders_are_named(bench: Bench) -> None:
    """A program with its working directory on the disk: exit 9, named, nothing unmounted or locked."""
    before = bench.prepared()
    open_by_hand(bench)
    inside = subprocess.Popen(["sleep", "60"], cwd=bench.repository / "snapshots")
    bench.rig.processes.append(inside)  # the rig kills it in any case
    run = eject(bench, "--json")
    assert run.returncode == EXIT_DISK_BUSY, str(run)
    line = run.error_line
    assert line.startswith(f"backup-agent: unmount failed: cannot unmount {bench.rig.mount_point}: it is busy; "), line
    assert f"pid {inside.pid} (sleep)" in line and "left mounted and unlocked" in line
    assert not line.endswith("(earlier snapshots are untouched)")  # eject never touches them: not worth a word
    error = run.the("error")
    assert (error["step"], error["exit_code"], error["snapshots_untouched"]) == ("unmount", EXIT_DISK_BUSY, True)
    assert run.stderr.count("\n") == run.stderr.count("backup-agent: ")  # one line per message, no traceback
    assert_open(bench)
    assert bench.calls() == []
    # closed, the program gone: eject finishes the job; the snapshots are as they were
    bench.rig.release(inside)
    assert eject(bench).returncode == EXIT_OK
    bench.assert_locked_and_unmounted()
    assert bench.fingerprint() == before


@pytest.mark.integration
def test_another_filesystem_at_the_mount_point_is_refused_and_left_alone(bench: Bench) -> None:
    other = bench.rig.attach(bench.rig.image("other.img", "ext4"))
    bench.rig.unlock_by_hand()
    bench.rig.mount_by_hand(other)
    run = eject(bench)
    assert run.returncode == EXIT_REPOSITORY, str(run)
    assert run.error_line.startswith(
        f"backup-agent: {bench.rig.mount_point} is mounted from {other} (ext4, device {device_number(other)}), "
        f"not from the backup disk {NAME}"
    ), run.error_line
    assert [entry[1] for entry in bench.mounted_here()] == [device_number(other)]
    assert os.path.islink(bench.rig.mapped)  # not locked either
    assert bench.calls() == []


@pytest.mark.integration
def test_a_running_backup_is_not_ejected_under_it(bench: Bench) -> None:
    """The machine lock held as a cycle holds it: refused with the reason, the disk left open."""
    open_by_hand(bench)
    holder = {"pid": 424242, "started": "2026-11-22T13:00:00+01:00", "repository": str(bench.repository)}
    with lock.hold(lock.machine_lock_path(), holder):
        run = eject(bench, "--json")
    assert run.returncode == EXIT_BUSY, str(run)
    assert run.error_line == (
        f"backup-agent: lock failed: a backup is running: wait for it or stop it, then eject {NAME} again "
        f"(pid 424242, started 2026-11-22T13:00:00+01:00, writing to {bench.repository})"
    )
    assert run.steps() == [("lock", "start"), ("error", "")]
    assert_open(bench)
    assert bench.calls() == []


@pytest.mark.integration
def test_a_backup_is_refused_while_an_eject_holds_the_lock(bench: Bench) -> None:
    """The other side of the lock: the cycle names the eject instead of calling it a backup."""
    holder = {"pid": 434343, "started": "2026-11-22T13:00:00+01:00", "command": "eject", "disk": NAME}
    with lock.hold(lock.machine_lock_path(), holder):
        run = bench.backup()
    assert run.returncode == EXIT_BUSY, str(run)
    assert run.error_line.startswith(
        f"backup-agent: lock failed: backup-agent eject is running (pid 434343, started 2026-11-22T13:00:00+01:00, "
        f"disk {NAME})"
    ), run.error_line
    bench.assert_locked_and_unmounted()


def test_eject_needs_root_and_a_configured_disk(tmp_path: Path, cli_argv: list[str]) -> None:
    config = tmp_path / "config.toml"
    config.write_text("")
    env = {key: value for key, value in os.environ.items() if key != "SUDO_UID"}
    done = subprocess.run([*cli_argv, "eject", "--disk", "nope", "--config", str(config)], capture_output=True,
                          text=True, env=env, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 2 and done.stdout == ""
    if os.geteuid() == 0:
        assert done.stderr.startswith("backup-agent: --disk nope: no [[disk]] is configured in "), done.stderr
    else:
        assert done.stderr == "backup-agent: eject unmounts and locks the disk and needs root: run it with sudo\n"
    assert done.stderr.count("\n") == 1


# -- what the agent reads back (pure) ----------------------------------------------------------


def event_line(kind: str, **fields: object) -> str:
    return json.dumps({"version": 1, "time": "2026-11-22T13:00:00+01:00", "event": kind, **fields})


def test_the_agent_reads_how_the_eject_ended() -> None:
    done = [event_line("step", step="lock", state="start"), event_line("complete", snapshot=None, already_closed=False)]
    assert eject_reply(NAME, 0, done, [], through_sudo=True) == EjectReply(
        "ejected", f"{NAME} is unmounted and locked: safe to unplug")
    closed = [event_line("complete", snapshot=None, already_closed=True)]
    assert eject_reply(NAME, 0, closed, [], through_sudo=False) == EjectReply(
        "already", f"{NAME} is locked and not mounted: already safe to unplug")
    busy = [event_line("error", step="unmount", message="cannot unmount /mnt/b: it is busy; held by pid 7 (vim)",
                       exit_code=9, snapshots_untouched=True)]
    assert eject_reply(NAME, 9, busy, ["backup-agent: unmount failed: cannot unmount ..."], through_sudo=True) == (
        EjectReply("busy", "cannot unmount /mnt/b: it is busy; held by pid 7 (vim)"))
    running = [event_line("error", step="lock", message="a backup is running: wait for it or stop it",
                          exit_code=4, snapshots_untouched=True)]
    assert eject_reply(NAME, 4, running, [], through_sudo=True).result == "refused"
    # before any event (a usage error), the one error line; a status 0 without "complete" is no success
    assert eject_reply(NAME, 2, [], ["backup-agent: --disk x: no configured disk matches"], through_sudo=False) == (
        EjectReply("failed", "--disk x: no configured disk matches"))
    assert eject_reply(NAME, 0, ["not an event"], [], through_sudo=False) == EjectReply(
        "failed", "the eject exited with status 0")
    assert eject_reply(NAME, -9, [], [], through_sudo=False) == EjectReply("failed", "the eject was killed by SIGKILL")
    # a sudo rule written before eject existed: say how to fix it
    refused = eject_reply(NAME, 1, [], ["sudo: a password is required"], through_sudo=True)
    assert refused.result == "failed" and "run sudo backup-agent install again" in refused.message
    assert not refused.safe and EjectReply("already", "").safe


def test_the_agent_runs_eject_as_it_runs_the_cycle() -> None:
    """Without sudo: this Python and the agent's --config; never --no-sudo (eject has none: it needs root)."""
    argv = cycle_argv_for(config="c.toml", no_sudo=True, argv0="/usr/local/sbin/backup-agent", command="eject")
    assert argv == (sys.executable, "-m", "agent.cli", "eject", "--json", "--config", os.path.abspath("c.toml"))


# -- the agent: eject through the real command, and the schedule around it ----------------------


@real
def test_the_agent_ejects_refuses_during_a_backup_and_the_schedule_leaves_an_ejected_disk_closed(
    bench: Bench, here: None
) -> None:
    bench.init()
    settle()
    offset = [0.0]

    async def scenario() -> None:
        async with agent_on(bench, clock=lambda: time.time() + offset[0]) as (agent, recorder):
            # attached and never backed up: the plug-in starts a cycle; eject is refused under it
            await until(lambda: agent.cycle_pid is not None, "the plug-in's cycle to start")
            refused = await agent.eject(NAME)
            assert refused.result == "refused"
            assert refused.message.startswith("a backup is running: wait for it or stop it")
            await one_cycle(agent, recorder)
            bench.assert_locked_and_unmounted()

            open_by_hand(bench)
            assert await agent.eject(NAME) == EjectReply("ejected", f"{NAME} is unmounted and locked: safe to unplug")
            bench.assert_locked_and_unmounted()
            assert agent.status().state == "disk-attached" and agent.status().next_due is None
            assert agent.timer is None  # nothing scheduled for a disk ejected to be unplugged

            offset[0] = 3 * 3600.0  # hours later, still plugged in: due, but left closed
            agent.tick()
            agent.on_resumed()
            assert agent.cycle_pid is None and len(recorder.of("backup_started")) == 1
            assert await agent.eject(NAME) == EjectReply(
                "already", f"{NAME} is locked and not mounted: already safe to unplug")

            assert agent.backup_now() == "started"  # asked for: it backs up again
            await one_cycle(agent, recorder, 2)
            assert agent.status().next_due is not None and agent.timer is not None
            assert recorder.of("backup_failed") == []

    run(scenario(), timeout=60)
    bench.assert_locked_and_unmounted()


@real
def test_no_cycle_starts_while_an_eject_runs_and_none_fails(bench: Bench, here: None) -> None:
    """A backup asked for during an eject waits for it (the eject holds the machine lock), then runs."""
    bench.init()
    settle()

    async def scenario() -> None:
        async with agent_on(bench) as (agent, recorder):
            await one_cycle(agent, recorder)  # the plug-in's; the next is due in an hour
            open_by_hand(bench)
            inside = subprocess.Popen(["sleep", "60"], cwd=bench.repository)  # busy: the eject retries for ~3 s
            bench.rig.processes.append(inside)
            ejecting = asyncio.create_task(agent.eject(NAME))
            await until(lambda: agent.ejecting == NAME, "the eject to start")
            assert agent.backup_now() == "running"  # held back, not started, not failed
            agent.tick()
            await asyncio.sleep(0.5)
            assert agent.cycle_pid is None and len(recorder.of("backup_started")) == 1
            assert agent.status().state == "disk-attached"
            reply = await ejecting
            assert reply.result == "busy" and f"pid {inside.pid} (sleep)" in reply.message
            # the eject is over: the backup asked for runs now (on the disk as it was found: open)
            await one_cycle(agent, recorder, 2)
            assert recorder.of("backup_failed") == [] and agent.status().last_result == "success"
            assert [entry[0] for entry in bench.mounted_here()] == [str(bench.rig.mount_point)]
            bench.rig.release(inside)
            assert (await agent.eject(NAME)).result == "ejected"

    run(scenario(), timeout=60)
    bench.assert_locked_and_unmounted()
