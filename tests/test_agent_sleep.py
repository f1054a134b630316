"""``backup-agent run`` and logind: the sleep inhibitor around a cycle, and catching up on resume.

The agent runs as users run it, in a subprocess (``backup-agent run --no-sudo
--config CFG``), with the real cycle, real udev and loop devices (tests/test_daemon.py's
bench). logind is tests/test_logind.py's stand-in, a separate D-Bus peer owning
org.freedesktop.login1 on a private "system" bus that the agent finds through
``DBUS_SYSTEM_BUS_ADDRESS``; a private session bus carries the control
interface. Nothing is typed to the agent: the plug-in is ``losetup``, the
suspend is the stand-in's ``PrepareForSleep`` signals.

What a suspend does to a program is stop its monotonic clock while the wall
clock goes on. The agent's wall clock is moved forward in that way: the
subprocess is ``backup-agent run`` behind a three-line wrapper whose
``time.time`` adds the seconds written in a file (none until the test writes
it), while asyncio's timers, on the monotonic clock, do not move. The cycle
is not wrapped.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.desktop.statefile import DiskRecord, load_state
from tests.test_daemon import REPO, StandIn, detach, here, real, settle, until  # noqa: F401  (here: fixture)
from tests.test_dbus_control import DBUS_DAEMON, private_bus
from tests.test_disk import NAME, rig  # noqa: F401  (fixture)
from tests.test_disk_cycle import Bench, bench  # noqa: F401  (fixture)
from tests.test_logind import released, start_stand_in
from tests.test_udev import udevd  # noqa: F401  (fixture)

WHY = "a backup is being written to the backup disk"

#: ``backup-agent run`` with a wall clock the test can move forward (see the module's docstring).
WRAPPER = """
import os, sys, time
_real, _offset = time.time, os.environ["BA_TEST_WALL_CLOCK_OFFSET"]
def _wall_clock():
    try:
        with open(_offset, encoding="utf-8") as handle:
            return _real() + float(handle.read())
    except (FileNotFoundError, ValueError):
        return _real()
time.time = _wall_clock
from agent.cli import main
sys.exit(main(sys.argv[1:]))
"""


@real
def test_a_cycle_holds_a_sleep_block_lock_and_a_resume_catches_up_once_only_when_due(
    bench: Bench, here: None, tmp_path: Path
) -> None:
    if DBUS_DAEMON is None:
        pytest.skip(reason="dbus-daemon is not installed (apt-get install -y dbus-daemon): no private bus to test on")
    bench.init()
    detach(bench.rig.luks_device)
    settle()
    bench.assert_locked_and_unmounted()
    rsync = StandIn(bench)  # rewrites the config with [commands] rsync
    rsync.tell(mode="slow", delay=1.0)  # the first transfer lasts long enough to look at the lock meanwhile
    with open(bench.config, "a", encoding="utf-8") as handle:
        handle.write('[agent]\ninterval = "1m"\non_plug = "if-due"\n')

    offset_file = tmp_path / "wall-clock-offset"
    state_file = tmp_path / "xdg-state" / "backup-agent" / "state.json"
    log_path = tmp_path / "agent.log"

    def log() -> str:
        return log_path.read_text(errors="replace")

    def record() -> DiskRecord | None:
        return load_state(str(state_file))[0].get(NAME) if state_file.exists() else None

    with private_bus("system") as system, private_bus("session") as session:
        env = dict(os.environ)
        for name in ("SUDO_UID", "NOTIFY_SOCKET", "WATCHDOG_USEC"):
            env.pop(name, None)
        env.update(
            DBUS_SYSTEM_BUS_ADDRESS=system.address,
            DBUS_SESSION_BUS_ADDRESS=session.address,
            XDG_STATE_HOME=str(tmp_path / "xdg-state"),
            BA_TEST_WALL_CLOCK_OFFSET=str(offset_file),
        )

        async def scenario() -> None:
            logind_bus, stand_in = await start_stand_in(system.address)
            with open(log_path, "wb") as log_file:
                agent = subprocess.Popen(
                    [sys.executable, "-c", WRAPPER, "run", "--no-sudo", "--config", str(bench.config)],
                    cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            try:
                # watch_sleep has subscribed before the agent says it is watching udev
                await until(lambda: "watching for" in log() or agent.poll() is not None, "the agent to start", 10)
                assert agent.poll() is None, log()
                assert "no system bus" not in log() and "logind is not on the system bus" not in log(), log()

                # -- 1. plugged in: one block lock on sleep, held while the cycle runs, released after
                bench.rig.attach(bench.rig.luks_image)
                await until(lambda: rsync.ready, "the first transfer to start")
                assert stand_in.calls == [("sleep", "backup-agent", WHY, "block")]
                stand_in.drop_write_ends()  # the agent has it: the cycle runs only once the lock is taken
                (first,) = stand_in.read_ends
                assert not released(first, 0)  # held mid-transfer
                assert f"starting the backup of {NAME} (plugged in, due)" in log()
                done = await until(lambda: (r := record()) is not None and r.last_result != "none" and r, "cycle 1")
                assert done.last_result == "success", (done, log())
                await until(lambda: released(first, 0), "the sleep inhibitor to be released after cycle 1", 5)
                bench.assert_locked_and_unmounted()
                rsync.tell(mode="real")

                # -- 2. a suspend and resume with nothing due: no cycle, no lock
                stand_in.PrepareForSleep(True)
                stand_in.PrepareForSleep(False)
                await until(lambda: log().count("the machine woke up from sleep") == 1, "resume notice 1", 5)
                await asyncio.sleep(0.5)
                assert len(stand_in.calls) == 1, stand_in.calls
                assert log().count("starting the backup of") == 1, log()

                # -- 3. slept through the interval (the wall clock went on, the monotonic one did not):
                #       the resume starts exactly one cycle, under a lock of its own, released after it
                offset_file.write_text("3600")
                stand_in.PrepareForSleep(True)
                stand_in.PrepareForSleep(False)
                await until(lambda: f"starting the backup of {NAME} (resumed from sleep, due)" in log(), "cycle 2")
                await until(lambda: len(stand_in.calls) == 2, "the second Inhibit")
                assert stand_in.calls[1] == ("sleep", "backup-agent", WHY, "block")
                await until(
                    lambda: (r := record()) is not None and r.last_snapshot != done.last_snapshot and r, "cycle 2 to end"
                )
                second = record()
                assert second is not None and second.last_result == "success", (second, log())
                stand_in.drop_write_ends()
                await until(lambda: released(stand_in.read_ends[1], 0), "the sleep inhibitor to be released after cycle 2", 5)
                bench.assert_locked_and_unmounted()
                await asyncio.sleep(1.0)  # no burst: one catch-up, then the interval again
                assert len(stand_in.calls) == 2, stand_in.calls
                assert log().count("starting the backup of") == 2, log()
                assert rsync.runs() == ["slow", "real"]

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
                logind_bus.disconnect()
                stand_in.close()

        asyncio.run(asyncio.wait_for(scenario(), 60))
