"""The desktop agent (agent/desktop/daemon.py) with real parts: udevd, loop devices, the real cycle.

Every test uses tests/test_disk_cycle.py's bench: a real LUKS2 header on a
loop device, a plain ext4 image the stand-in cryptdisks_start exposes as the
"mapped device" (this kernel has no device-mapper), real mount, umount,
blkid, rsync, and the real CLI as the cycle, run as root without sudo
(``python -m agent.cli backup --json --config CFG --disk NAME``). udev is
real too: the machine's udevd, or one started for this module (tests/test_udev.py's
fixture). Attaching the LUKS image with losetup is the plug-in; detaching it
is the pull.

Where a transfer must be slow or must fail because the disk went away, a
stand-in rsync sits at the process boundary (``[commands] rsync``): it copies
with the real rsync, then waits, or waits until the LUKS loop device is
detached and fails the way rsync does on an I/O error (exit 11).

The agent runs in this process on an asyncio loop (so a recording listener,
the clock and the timer can be looked at), except in the first test, where
``backup-agent run`` runs as users run it, in a subprocess, and nothing is
typed after it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

import pytest

from agent.core import events, lock
from agent.policy import schedule
from agent.config.load import load_settings
from agent.config.model import Disk, Settings
from agent.desktop.daemon import Agent, AgentOptions, cycle_argv_for, cycle_lock_path
from agent.desktop.sdnotify import watchdog_interval
from agent.desktop.statefile import DiskRecord, load_state, save_state
from agent.desktop.state import AgentStatus
from tests.test_disk import NAME, _run, rig  # noqa: F401  (rig: fixture)
from tests.test_disk_cycle import Bench, bench  # noqa: F401  (fixture)
from tests.test_udev import udevd  # noqa: F401  (fixture)

_T = TypeVar("_T", bound=Callable[..., Any])


def real(test: _T) -> _T:
    """An integration test: root, loop devices, a real udevd (skipped with the reason where they are missing)."""
    marked: _T = pytest.mark.integration(pytest.mark.root(pytest.mark.usefixtures("udevd")(test)))
    return marked


REPO = Path(__file__).resolve().parent.parent
REAL_RSYNC = "/usr/bin/rsync"
WAIT = 20.0  # seconds a whole cycle may take here (it takes about one)


# ---------------------------------------------------------------------------
# Helpers


class Recorder:
    """A Listener that records every call, in order, with when it came."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], float]] = []

    def _add(self, name: str, *args: Any) -> None:
        self.calls.append((name, args, time.monotonic()))

    def status_changed(self, status: AgentStatus) -> None:
        self._add("status_changed", status)

    def disk_attached(self, disk: str) -> None:
        self._add("disk_attached", disk)

    def disk_removed(self, disk: str, during_backup: bool) -> None:
        self._add("disk_removed", disk, during_backup)

    def disk_opened(self, disk: str) -> None:
        self._add("disk_opened", disk)

    def backup_started(self, disk: str, reason: str) -> None:
        self._add("backup_started", disk, reason)

    def progress(self, event: events.ProgressEvent) -> None:
        self._add("progress", event)

    def backup_completed(self, event: events.CompleteEvent) -> None:
        self._add("backup_completed", event)

    def backup_failed(self, step: str | None, message: str, exit_code: int | None = None) -> None:
        self._add("backup_failed", step, message, exit_code)

    def of(self, name: str) -> list[tuple[Any, ...]]:
        return [args for call, args, _ in self.calls if call == name]

    def names(self) -> list[str]:
        """The calls but status_changed and progress, in order."""
        return [call for call, _, _ in self.calls if call not in ("status_changed", "progress")]

    def states(self) -> list[str]:
        return [args[0].state for args in self.of("status_changed")]


class Raising(Recorder):
    """A listener that fails in every method: it must change nothing."""

    def _add(self, name: str, *args: Any) -> None:
        raise RuntimeError(f"listener failure in {name}")


async def until(predicate: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.02)


def settle() -> None:
    _run("udevadm", "settle", "--timeout=5")


def detach(device: str) -> None:
    _run("losetup", "-d", device)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


STAND_IN = '''#!{python} -I
"""A stand-in for rsync (tests/test_daemon.py): what it does is in {control}."""
import json, os, subprocess, sys, time

CONTROL = {control!r}
REAL = {real!r}
args = sys.argv[1:]
with open(CONTROL, encoding="utf-8") as handle:
    behaviour = json.load(handle)
mode = behaviour.get("mode", "real")
with open(CONTROL + ".runs", "a", encoding="utf-8") as handle:
    handle.write(mode + "\\n")
if mode == "real":
    os.execv(REAL, [REAL, *args])
if mode == "slow":  # wait, then be the real rsync
    with open(CONTROL + ".ready", "w", encoding="utf-8") as handle:
        handle.write("waiting\\n")
    time.sleep(float(behaviour["delay"]))
    os.execv(REAL, [REAL, *args])
if mode == "until-gone":  # copy, then fail as rsync does when the disk is pulled out
    source, target = args[-2], args[-1]
    subprocess.run([REAL, "-a", *[a for a in args if a.startswith("--link-dest=")], source, target], check=True)
    with open(CONTROL + ".ready", "w", encoding="utf-8") as handle:
        handle.write("copied\\n")
    deadline = time.monotonic() + 30
    while os.path.exists(behaviour["watch"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    print(f'rsync: [receiver] write failed on "{{target}}/data": Input/output error (5)', file=sys.stderr)
    print("rsync error: error in file IO (code 11) at receiver.c(381) [receiver=3.2.7]", file=sys.stderr)
    sys.exit(11)
sys.exit(f"stand-in rsync: unknown mode {{mode}}")
'''


class StandIn:
    """The stand-in rsync, installed where root may run it, told what to do through a control file."""

    def __init__(self, bench: Bench) -> None:
        self.control = bench.tmp / "rsync-control.json"
        self.path = bench.trusted / "rsync-stand-in"
        self.path.write_text(STAND_IN.format(python=sys.executable, control=str(self.control), real=REAL_RSYNC))
        self.path.chmod(0o755)
        self.tell(mode="real")
        bench.write_config(rsync=self.path)

    def tell(self, **behaviour: Any) -> None:
        self.control.write_text(json.dumps(behaviour))
        Path(str(self.control) + ".ready").unlink(missing_ok=True)

    @property
    def ready(self) -> bool:
        return Path(str(self.control) + ".ready").exists()

    def runs(self) -> list[str]:
        path = Path(str(self.control) + ".runs")
        return path.read_text().split() if path.exists() else []


def cycle_argv(bench: Bench) -> tuple[str, ...]:
    """The real CLI as root, without sudo (the tests' cycle)."""
    return (sys.executable, "-m", "agent.cli", "backup", "--json", "--config", str(bench.config))


def eject_argv(bench: Bench) -> tuple[str, ...]:
    """The real eject as root, without sudo (as cycle_argv_for(..., command="eject") makes it for root)."""
    return (sys.executable, "-m", "agent.cli", "eject", "--json", "--config", str(bench.config))


@pytest.fixture
def here(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cycle runs as ``python -m agent.cli`` from this checkout, as root and not through sudo."""
    if shutil.which("udevadm") is None:
        pytest.skip(reason="udevadm is not installed: run scripts/test, which installs udev")
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("SUDO_UID", raising=False)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)


@contextlib.asynccontextmanager
async def agent_on(
    bench: Bench,
    *,
    policy: schedule.Policy = schedule.Policy(),
    clock: Callable[[], float] = time.time,
    extra_listeners: tuple[Any, ...] = (),
    leave_cycle: bool = False,
    inhibit: Callable[[], Awaitable[object | None]] | None = None,
    **more_options: Any,
) -> AsyncIterator[tuple[Agent, Recorder]]:
    """An agent running on this loop; on the way out a cycle still running is stopped and awaited.

    ``leave_cycle``: the agent goes away while its cycle runs, as a crashed
    or restarted agent does, and the cycle is left to finish on its own.
    """
    recorder = Recorder()
    options = AgentOptions(
        cycle_argv=cycle_argv(bench),
        policy=policy,
        state_file=str(bench.tmp / "agent-state" / "state.json"),
        foreign_poll=0.2,
        inhibit=inhibit,
        eject_argv=eject_argv(bench),
        **more_options,
    )
    agent = Agent(load_settings(str(bench.config)), options, [*extra_listeners, recorder], clock=clock)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await until(lambda: agent.watching or task.done(), "the agent to start watching", 5)
        if task.done():
            task.result()
        yield agent, recorder
    finally:
        pid = agent.cycle_pid
        if pid is not None and not leave_cycle:
            agent.stop()
            with contextlib.suppress(AssertionError):
                await until(lambda: agent.cycle_pid is None, "the cycle to stop", 15)
        stop.set()
        await asyncio.wait_for(task, 5)
    assert not agent.watching


async def one_cycle(agent: Agent, recorder: Recorder, count: int = 1) -> None:
    """Wait until ``count`` cycles have started and the last one has ended."""
    await until(lambda: len(recorder.of("backup_started")) >= count, f"cycle {count} to start")
    await until(lambda: agent.cycle_pid is None and agent.status().state != "running", f"cycle {count} to end")


def snapshots(bench: Bench) -> dict[str, Any]:
    return bench.fingerprint()


# ---------------------------------------------------------------------------
# 1. The done-when: backup-agent run, a plug-in, no command typed


@real
def test_attaching_the_disk_while_backup_agent_runs_makes_a_snapshot_and_locks_it_again(
    bench: Bench, here: None, tmp_path: Path
) -> None:
    bench.init()
    detach(bench.rig.luks_device)
    settle()
    bench.assert_locked_and_unmounted()

    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(5)
    state_home = tmp_path / "xdg-state"
    env = dict(os.environ)
    env.pop("SUDO_UID", None)
    env.update(XDG_STATE_HOME=str(state_home), NOTIFY_SOCKET=str(notify_path))
    log_path = tmp_path / "agent.log"
    with open(log_path, "wb") as log_file:
        agent = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--no-sudo", "--config", str(bench.config)],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        messages: list[str] = []
        while "READY=1" not in messages:
            messages.append(notify.recv(4096).decode())
        assert agent.poll() is None

        bench.rig.attach(bench.rig.luks_image)  # the plug-in; nothing is typed from here on
        state_file = state_home / "backup-agent" / "state.json"
        deadline = time.monotonic() + WAIT
        notify.setblocking(False)
        while not (state_file.exists() and load_state(str(state_file))[0].get(NAME)):
            with contextlib.suppress(BlockingIOError):
                while True:
                    messages.append(notify.recv(4096).decode())
            assert agent.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, f"no backup within {WAIT} s:\n{log_path.read_text()}"
            time.sleep(0.05)
        record = load_state(str(state_file))[0][NAME]
        assert record.last_result == "success", (record, log_path.read_text())

        bench.assert_locked_and_unmounted()  # locked again, nothing mounted
        state = snapshots(bench)
        assert list(state["snapshots"]) == [record.last_snapshot] and state["in_progress"] == []
        assert record.last_snapshot is not None
        bench.source_equals(record.last_snapshot)
        assert bench.calls()[-2:] == [("start", 0), ("stop", 0)]

        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=5) == 0, log_path.read_text()
        notify.settimeout(0.5)
        with contextlib.suppress(TimeoutError):
            while True:
                messages.append(notify.recv(4096).decode())
        statuses = [m for m in messages if m.startswith("STATUS=")]
        assert any(m.startswith("STATUS=backing up to") for m in statuses), messages
        assert "STOPPING=1" in messages
        output = log_path.read_text()
        assert f"starting the backup of {NAME} (plugged in, due)" in output
        assert "Traceback" not in output
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        notify.close()


# ---------------------------------------------------------------------------
# 2. Found at start


@real
def test_a_disk_attached_before_the_agent_starts_is_found_and_backed_up(bench: Bench, here: None) -> None:
    bench.init()
    settle()

    inhibitor: list[str] = []

    class Inhibitor:
        def close(self) -> None:
            inhibitor.append("released")

    async def inhibit() -> object:
        await asyncio.sleep(0.01)  # a D-Bus round trip to logind
        inhibitor.append("taken")
        return Inhibitor()

    async def scenario() -> None:
        async with agent_on(bench, extra_listeners=(Raising(),), inhibit=inhibit) as (agent, recorder):
            await until(lambda: agent.cycle_pid, "the cycle to start")
            assert inhibitor == ["taken"]  # before the cycle started, held while it runs
            await one_cycle(agent, recorder)
            assert inhibitor == ["taken", "released"]
            assert recorder.names() == ["disk_attached", "backup_started", "backup_completed"]
            assert recorder.of("backup_started") == [(NAME, "plugged in, due")]
            status = agent.status()
            assert (status.state, status.disk, status.last_result, status.cycle_pid) == (
                "disk-attached", NAME, "success", None
            )
            assert status.step is None and status.progress == {}
            assert agent.last_returncode == 0
            states = recorder.states()
            assert "running" in states and states[-1] == "disk-attached"
            # The next backup is due an interval after the snapshot: one timer, armed for then.
            assert status.next_due is not None and status.last_success is not None
            assert status.next_due == pytest.approx(status.last_success + 3600)
            assert agent.timer is not None
            assert agent.timer.when() - asyncio.get_running_loop().time() == pytest.approx(
                status.next_due - time.time(), abs=2
            )
            snapshot = recorder.of("backup_completed")[0][0].snapshot
        records, saved = load_state(str(bench.tmp / "agent-state" / "state.json"))
        assert records[NAME].last_snapshot == snapshot and records[NAME].failures == 0
        assert saved["state"] == "disk-attached"

    asyncio.run(scenario())
    bench.assert_locked_and_unmounted()
    assert list(snapshots(bench)["snapshots"]) != []


# ---------------------------------------------------------------------------
# 3. A burst of events, one cycle


@real
def test_a_burst_of_udev_events_gives_one_cycle(bench: Bench, here: None) -> None:
    bench.init()
    detach(bench.rig.luks_device)
    settle()

    async def scenario() -> None:
        # "always": every plug-in the agent believed it saw would start a cycle.
        async with agent_on(bench, policy=schedule.Policy(on_plug="always")) as (agent, recorder):
            device = bench.rig.attach(bench.rig.luks_image)
            for _ in range(4):
                _run("udevadm", "trigger", "--action=change", device)
            backup_now = await until(lambda: agent.status().state == "running" and agent.backup_now(), "a cycle")
            assert backup_now == "running"
            for _ in range(3):
                _run("udevadm", "trigger", "--action=change", device)
            await one_cycle(agent, recorder)
            settle()
            await asyncio.sleep(0.5)  # whatever udev still had to say
            assert recorder.of("disk_attached") == [(NAME,)]
            assert recorder.of("backup_started") == [(NAME, "plugged in, always")]
            assert agent.cycle_pid is None

    asyncio.run(scenario())
    bench.assert_locked_and_unmounted()
    assert len(snapshots(bench)["snapshots"]) == 1


# ---------------------------------------------------------------------------
# 4. Pulled out mid-transfer, then plugged in again


@real
def test_a_disk_pulled_out_mid_transfer_fails_cleanly_and_the_next_plug_in_resumes(bench: Bench, here: None) -> None:
    bench.init()
    earlier = bench.backup_ok()
    before = snapshots(bench)
    stand_in = StandIn(bench)
    luks_device = bench.rig.luks_device
    stand_in.tell(mode="until-gone", watch=f"/sys/block/{os.path.basename(luks_device)}/loop/backing_file")
    settle()

    async def scenario() -> tuple[str, str]:
        async with agent_on(bench) as (agent, recorder):
            await until(lambda: stand_in.ready, "the transfer to be under way")
            assert agent.status().state == "running" and agent.status().step == "transfer"
            pulled = time.monotonic()
            detach(luks_device)
            await until(lambda: recorder.of("disk_removed"), "disk_removed", 2)
            removed = [(call, args, when) for call, args, when in recorder.calls if call == "disk_removed"]
            assert removed[0][1] == (NAME, True)
            assert removed[0][2] - pulled < 1.0, "the pull was not reported at once"

            await until(lambda: agent.cycle_pid is None, "the cycle to fail")
            assert agent.last_returncode == 5
            failed = recorder.of("backup_failed")
            assert len(failed) == 1 and failed[0][0] == "transfer"
            assert "rsync failed" in failed[0][1] and "resumes from it" in failed[0][1]
            assert failed[0][2] == 5  # the error event's exit status, for the listeners' hints
            status = agent.status()
            assert (status.state, status.last_result, status.next_due) == ("failed", "failure", None)
            assert agent.timer is None  # not attached: nothing to wait for

            bench.assert_locked_and_unmounted()
            after = snapshots(bench)
            assert after["snapshots"] == before["snapshots"] and after["latest"] == before["latest"]
            assert len(after["in_progress"]) == 1
            leftover = after["in_progress"][0].removesuffix(".in-progress")

            stand_in.tell(mode="real")
            bench.rig.attach(bench.rig.luks_image)  # plugged in again: resumes
            await one_cycle(agent, recorder, 2)
            assert recorder.of("backup_started")[1] == (NAME, "plugged in, unfinished")
            assert agent.status().last_result == "success" and agent.last_returncode == 0
            done = recorder.of("backup_completed")
            assert len(done) == 1
            return str(done[0][0].snapshot), leftover

    snapshot, leftover = asyncio.run(scenario())
    bench.assert_locked_and_unmounted()
    final = snapshots(bench)
    assert final["snapshots"][earlier] == before["snapshots"][earlier]  # byte for byte, same inodes
    assert set(final["snapshots"]) == {earlier, snapshot} and final["in_progress"] == []
    metadata = json.loads(final["snapshots"][snapshot]["metadata"])
    assert metadata["resumed_from"] == [leftover]
    bench.source_equals(snapshot)


# ---------------------------------------------------------------------------
# 5. "Back up now" while one runs; "Stop"


@real
def test_backup_now_while_running_and_stop_with_sigterm(bench: Bench, here: None) -> None:
    bench.init()
    before = snapshots(bench)
    stand_in = StandIn(bench)
    stand_in.tell(mode="slow", delay=30)
    settle()

    async def scenario() -> None:
        async with agent_on(bench) as (agent, recorder):
            await until(lambda: stand_in.ready, "the transfer to be under way")
            pid = agent.cycle_pid
            assert pid is not None and alive(pid)
            assert os.getsid(pid) == pid  # a session of its own: the agent's signals do not reach it
            assert agent.status().cycle_pid == pid
            assert agent.backup_now() == "running"
            assert agent.stop() == "stopping"
            await until(lambda: agent.cycle_pid is None, "the cycle to stop", 10)
            assert agent.last_returncode == 143
            # A stop asked for is not a failure: nothing says "failed", no error state, no retry.
            assert recorder.of("backup_failed") == []
            assert len(recorder.of("backup_started")) == 1
            assert agent.stop() == "not-running"
            status = agent.status()
            assert (status.state, status.last_result) == ("disk-attached", "stopped")
            assert "failed" not in recorder.states()
            assert status.disks[0].unfinished and status.disks[0].name == NAME
            # The next try is the regular one, an interval after the stop, not the 5-minute retry.
            assert agent.timer is not None
            assert agent.timer.when() - asyncio.get_running_loop().time() == pytest.approx(3600, abs=5)
            assert status.next_due is not None and status.next_due - time.time() == pytest.approx(3600, abs=5)
            assert not alive(pid)

    asyncio.run(scenario())
    bench.assert_locked_and_unmounted()  # as found
    after = snapshots(bench)
    assert after["snapshots"] == before["snapshots"] == {}
    assert stand_in.runs() == ["slow"]


# ---------------------------------------------------------------------------
# 6. The schedule on a controllable clock


@real
def test_after_a_success_the_next_cycle_waits_for_the_interval(bench: Bench, here: None) -> None:
    bench.init()
    settle()
    offset = [0.0]

    def clock() -> float:
        return time.time() + offset[0]

    async def scenario() -> str:
        async with agent_on(bench, clock=clock) as (agent, recorder):
            await one_cycle(agent, recorder)
            loop = asyncio.get_running_loop()
            timer = agent.timer
            assert timer is not None and timer.when() - loop.time() == pytest.approx(3600, abs=5)

            agent.tick()  # the timer's path, before the interval has passed
            assert len(recorder.of("backup_started")) == 1
            assert agent.backup_now() == "started"  # asked: due or not
            await one_cycle(agent, recorder, 2)
            assert recorder.of("backup_started")[1] == (NAME, "asked")

            offset[0] = 1800.0
            agent.tick()
            assert len(recorder.of("backup_started")) == 2
            timer = agent.timer
            assert timer is not None and timer.when() - loop.time() == pytest.approx(1800, abs=5)

            offset[0] = 3601.0
            agent.tick()
            assert recorder.of("backup_started")[2] == (NAME, "interval elapsed")
            assert agent.timer is None  # a cycle runs: its end is the next event
            await one_cycle(agent, recorder, 3)
            assert agent.status().last_result == "success"

            agent.on_resumed()  # woke from sleep, nothing due: no cycle
            assert len(recorder.of("backup_started")) == 3
            offset[0] = 3601.0 + 3601.0
            agent.on_resumed()
            assert recorder.of("backup_started")[3] == (NAME, "resumed from sleep, due")
            await one_cycle(agent, recorder, 4)
            done = recorder.of("backup_completed")
            assert len(done) == 4 and agent.status().last_result == "success"
            return str(done[-1][0].snapshot)

    newest = asyncio.run(scenario())
    bench.assert_locked_and_unmounted()
    assert snapshots(bench)["latest"] == f"snapshots/{newest}"  # (rotation thinned the ones of this hour)


# ---------------------------------------------------------------------------
# 7. A cycle someone else started


@real
def test_a_cycle_started_elsewhere_is_shown_and_no_other_starts(bench: Bench, here: None) -> None:
    bench.init()
    settle()
    path = cycle_lock_path(through_sudo=False)
    assert path == lock.machine_lock_path()
    assert cycle_lock_path(through_sudo=True) == "/run/backup-agent.lock"

    async def scenario() -> None:
        holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            with lock.hold(path, {"pid": holder.pid, "started": "now", "repository": "elsewhere"}):
                async with agent_on(bench) as (agent, recorder):
                    status = agent.status()
                    assert (status.state, status.cycle_pid) == ("running", holder.pid)
                    assert recorder.of("disk_attached") == [(NAME,)]
                    assert recorder.of("backup_started") == []  # the plug-in waits
                    assert agent.backup_now() == "running"
                    assert agent.stop() == "not-running"
                    await asyncio.sleep(0.5)  # the agent looks at the lock meanwhile
                    assert recorder.of("backup_started") == []
                    assert agent.status().cycle_pid == holder.pid
        finally:
            holder.kill()
            holder.wait()

    asyncio.run(scenario())
    bench.assert_locked_and_unmounted()


@real
def test_a_cycle_that_loses_the_lock_to_another_waits_and_says_no_failure(bench: Bench, here: None) -> None:
    """Another cycle takes the machine lock between the agent's look and its own cycle's start.

    The inhibitor call is that moment: the test's holder takes the lock
    there, so the agent's cycle meets it for real and exits busy.
    """
    bench.init()
    settle()
    path = cycle_lock_path(through_sudo=False)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    stack = contextlib.ExitStack()

    taken: list[bool] = []

    async def take_the_lock() -> None:  # at the first cycle's start only
        if not taken:
            taken.append(True)
            stack.enter_context(lock.hold(path, {"pid": holder.pid, "started": "now", "repository": "elsewhere"}))

    async def scenario() -> None:
        async with agent_on(bench, inhibit=take_the_lock) as (agent, recorder):
            await until(lambda: agent.status().cycle_pid == holder.pid, "the agent to see the other cycle")
            assert recorder.of("backup_started") == [(NAME, "plugged in, due")]
            assert recorder.of("backup_failed") == []
            assert agent.status().last_result != "failure"
            stack.close()  # the other cycle ends: the held-back plug-in runs now
            await until(lambda: agent.status().last_result == "success", "the held-back backup", 20)
            assert recorder.of("backup_failed") == []

    try:
        asyncio.run(scenario())
    finally:
        stack.close()
        holder.kill()
        holder.wait()
    bench.assert_locked_and_unmounted()


@real
def test_the_held_back_plug_in_starts_when_the_foreign_cycle_ends(bench: Bench, here: None) -> None:
    bench.init()
    settle()
    path = cycle_lock_path(through_sudo=False)

    async def scenario() -> None:
        with contextlib.ExitStack() as stack:
            stack.enter_context(lock.hold(path, {"pid": os.getpid()}))
            async with agent_on(bench) as (agent, recorder):
                assert agent.status().cycle_pid == os.getpid()
                stack.close()  # the foreign cycle ends
                await one_cycle(agent, recorder)
                assert recorder.of("backup_started") == [(NAME, "plugged in, due")]
                assert agent.status().last_result == "success"

    asyncio.run(scenario())
    bench.assert_locked_and_unmounted()


@real
def test_the_cycle_outlives_its_agent_and_the_next_agent_shows_it(bench: Bench, here: None) -> None:
    bench.init()
    stand_in = StandIn(bench)
    stand_in.tell(mode="slow", delay=1.5)
    settle()

    async def scenario() -> None:
        async with agent_on(bench, leave_cycle=True) as (first, _):
            await until(lambda: stand_in.ready, "the transfer to be under way")
            pid = first.cycle_pid
            assert pid is not None and first.status().state == "running"
        assert alive(pid), "the cycle died with its agent"
        stand_in.tell(mode="real")
        async with agent_on(bench) as (second, recorder):
            status = second.status()
            assert (status.state, status.cycle_pid) == ("running", pid)
            assert recorder.of("backup_started") == []
            await until(lambda: not alive(pid), "the first cycle to finish on its own")
            # It knows nothing of how that cycle went: the disk is due, one more (incremental) snapshot.
            await one_cycle(second, recorder)
            assert recorder.of("backup_started") == [(NAME, "plugged in, due")]
            assert second.status().last_result == "success"

    asyncio.run(scenario())
    bench.assert_locked_and_unmounted()
    state = snapshots(bench)
    assert len(state["snapshots"]) == 2 and state["in_progress"] == []


# ---------------------------------------------------------------------------
# 8. Idle: no disk, no timer


@real
def test_an_idle_agent_without_a_disk_arms_no_timer(tmp_path: Path, here: None) -> None:
    disk = Disk(
        name="absent",
        luks_uuid=str(uuid.uuid4()),
        mount_point=str(tmp_path / "mnt"),
        mapped_device="/dev/mapper/absent",
        repository=str(tmp_path / "mnt" / "host"),
    )
    settings = Settings(path=None, disks=(disk,))
    options = AgentOptions(cycle_argv=("/bin/false",), state_file=str(tmp_path / "state.json"))
    recorder = Recorder()

    async def scenario() -> None:
        agent = Agent(settings, options, [recorder])
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        await until(lambda: agent.watching, "the agent to start", 5)
        await asyncio.sleep(0.3)
        loop = asyncio.get_running_loop()
        assert agent.timer is None
        assert agent.status().state == "idle" and agent.status().next_due is None
        assert agent.backup_now() == "no-disk" and agent.stop() == "not-running"
        agent.tick()
        agent.on_resumed()
        assert agent.timer is None
        # Nothing at all is scheduled on the loop: the agent sleeps until udev speaks.
        assert [h for h in getattr(loop, "_scheduled", []) if not h.cancelled()] == []
        stop.set()
        await task

    asyncio.run(scenario())
    assert recorder.names() == []
    assert not (tmp_path / "state.json").exists()


@real
def test_the_watchdog_is_kept_alive_from_the_loop_only_when_asked(
    tmp_path: Path, here: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_path))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # pings every 0.1 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    options = AgentOptions(cycle_argv=("/bin/false",), state_file=str(tmp_path / "state.json"))
    messages: list[str] = []

    async def scenario() -> None:
        agent = Agent(Settings(path=None), options)
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        await asyncio.sleep(0.55)
        stop.set()
        await task
        with contextlib.suppress(BlockingIOError):
            while True:
                messages.append(notify.recv(4096).decode())

    try:
        asyncio.run(scenario())
    finally:
        notify.close()
    assert messages[0] == "READY=1"
    assert messages[1] == "STATUS=waiting for a backup disk"
    assert 4 <= messages.count("WATCHDOG=1") <= 7, messages
    assert messages[-1] == "STOPPING=1"


# ---------------------------------------------------------------------------
# Pure parts (no root, no udev)


def test_the_state_file_round_trips_and_a_damaged_one_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "state.json"
    records = {"a": DiskRecord(last_success=1.5, last_result="success", last_message="snapshot x", last_snapshot="x")}
    save_state(str(path), records, AgentStatus(state="disk-attached", disk="a"))
    loaded, status = load_state(str(path))
    assert loaded == records and status["state"] == "disk-attached" and status["disk"] == "a"
    assert os.listdir(path.parent) == ["state.json"]  # no temporary left behind
    path.write_text("{not json")
    assert load_state(str(path)) == ({}, {})
    path.write_text(json.dumps({"disks": {"a": {"last_success": "yesterday", "failures": -1, "last_result": "odd"}}}))
    assert load_state(str(path))[0] == {"a": DiskRecord()}
    assert load_state(str(tmp_path / "missing.json")) == ({}, {})


def test_the_watchdog_interval_is_half_of_what_systemd_asks_and_only_for_this_process() -> None:
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


def test_the_cycle_lock_and_the_cycle_argv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert cycle_lock_path(through_sudo=True) == "/run/backup-agent.lock"
    monkeypatch.setenv("BACKUP_AGENT_RUNTIME_DIR", str(tmp_path))
    monkeypatch.delenv("SUDO_UID", raising=False)
    assert cycle_lock_path(through_sudo=False) == str(tmp_path / "backup-agent.lock")
    assert AgentOptions(cycle_argv=("/usr/bin/sudo", "-n", "/x")).lock_path() == "/run/backup-agent.lock"
    assert AgentOptions(cycle_argv=("python",), cycle_lock="/l").lock_path() == "/l"
    argv = cycle_argv_for(config="cfg.toml", no_sudo=True, argv0="/usr/local/bin/backup-agent")
    assert argv[:5] == (sys.executable, "-m", "agent.cli", "backup", "--json")
    assert argv[-2:] == ("--config", os.path.abspath("cfg.toml"))
    assert ("--no-sudo" in argv) is (os.geteuid() != 0)


def test_the_agent_and_status_read_the_state_file_through_one_reader(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A newer file is read as far as possible and said so, by the agent as by `status` (one reader: agent.desktop.statefile)."""
    from agent.desktop.dbus.client import read_saved_status

    path = tmp_path / "state.json"
    path.write_text(json.dumps({"version": 2, "saved": 5.0, "disks": {"a": {"ejected": True}},
                                "status": {"state": "idle", "disk": "a"}}))
    with caplog.at_level(logging.WARNING, logger="agent.desktop.statefile"):
        records, status = load_state(str(path))
        saved = read_saved_status(str(path))
    assert records == {"a": DiskRecord(ejected=True)} and status["disk"] == "a"
    assert saved is not None and saved.disk == "a"
    assert [r.getMessage().count("has version 2") for r in caplog.records] == [1, 1]
