#!/usr/bin/env python3
"""Benchmark the desktop agent: idle cost with no disk, and plug-in latency.

1. Idle: ``backup-agent run --no-sudo --config CFG`` (``python -m
   agent.cli``) with one configured disk that is not attached, once without
   a session bus (D-Bus skipped) and once with a private session bus that
   this benchmark starts. After the agent said READY=1 on $NOTIFY_SOCKET,
   over ``--idle-seconds``: its resident memory (VmRSS, VmHWM) and its
   wake-ups (the increase of voluntary + involuntary context switches summed
   over all its threads, /proc/PID/task/*/status).
2. Latency: the test harness (tests/test_disk.py's Rig, tests/test_disk_cycle.py's
   Bench: a real LUKS2 image, a plain ext4 image, stand-in cryptdisks
   scripts, a config in a root-only directory), ``init`` once, then the same
   ``backup-agent run`` with ``[agent] on_plug = "always"``, and ``--plugs``
   plug-ins: ``losetup -f --show LUKS_IMAGE`` (the udev event), wait for the
   cycle to end and the disk to be locked, ``losetup -d``, wait for the agent
   to see it gone. The agent's STATUS= lines on $NOTIFY_SOCKET, time-stamped
   on arrival by a reader thread, tell when the cycle started ("backing up
   to DISK") and its first step ("backing up to DISK: STEP", the cycle's
   first JSON ``step`` event).

Needs root, udev (a udevd is started for the run when none answers, and
stopped afterwards), losetup, cryptsetup, mkfs.ext4, blkid, mount, rsync,
dbus-daemon (for the session-bus row). Exit status: 0 when everything ran
(even if a target fails), 1 when something failed, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_DIR = BENCH_DIR.parent
if str(PROJECT_DIR) not in sys.path:
    sys.path.insert(0, str(PROJECT_DIR))

from agent.desktop.daemon import cycle_lock_path  # noqa: E402
from agent.desktop.statefile import load_state  # noqa: E402
from tests.conftest import _trusted_base  # noqa: E402
from tests.test_disk import NAME, Rig  # noqa: E402
from tests.test_disk_cycle import Bench  # noqa: E402

RSS_TARGET_BYTES = 40_000_000  # "under 40 MB"
WAKEUP_TARGET = 0  # "no wake-ups"
LATENCY_TARGET_S = 0.5  # "95th percentile under 0.5 s"
UDEVD = "/lib/systemd/systemd-udevd"
READY_TIMEOUT = 30.0
WAIT = 60.0  # seconds one cycle, or the agent noticing a pull, may take
SETTLE_S = 1.0  # after READY=1, before the idle window opens
UDEV_MARGIN_S = 0.25  # a slice this close to a udev event is not "quiet"
REQUIRED = ("losetup", "cryptsetup", "mkfs.ext4", "blkid", "mount", "umount", "udevadm", "rsync")


class BenchError(Exception):
    """Something the benchmark needs failed."""


def run_quiet(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed with {done.returncode}: {done.stderr.strip()}")
    return done


def settle() -> None:
    run_quiet("udevadm", "settle", "--timeout=10", check=False)


# --------------------------------------------------------------------------
# /proc


def proc_status(pid: int, task: int | None = None) -> dict[str, str]:
    path = f"/proc/{pid}/status" if task is None else f"/proc/{pid}/task/{task}/status"
    fields: dict[str, str] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def kib(value: str) -> int:
    return int(value.split()[0])


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB."""
    fields = proc_status(pid)
    return kib(fields["VmRSS"]), kib(fields["VmHWM"])


def context_switches(pid: int) -> dict[int, int]:
    """Per thread: voluntary + involuntary context switches so far."""
    found: dict[int, int] = {}
    for name in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):
            fields = proc_status(pid, int(name))
            found[int(name)] = int(fields["voluntary_ctxt_switches"]) + int(fields["nonvoluntary_ctxt_switches"])
    return found


# --------------------------------------------------------------------------
# $NOTIFY_SOCKET, the agent, udevd, dbus-daemon


class NotifySocket:
    """A bound datagram socket; a thread time-stamps every message (time.monotonic) as it arrives."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._socket.bind(str(path))
        self._socket.settimeout(0.2)
        self._queue: queue.Queue[tuple[float, str]] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, name="notify", daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._socket.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self._queue.put((time.monotonic(), data.decode("utf-8", "replace")))

    def next(self, timeout: float) -> tuple[float, str] | None:
        try:
            return self._queue.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return None

    def drain(self) -> list[tuple[float, str]]:
        found = []
        while (item := self.next(0)) is not None:
            found.append(item)
        return found

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._socket.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


@dataclass
class Context:
    python: Path
    tmp: Path
    runtime_dir: Path
    log_dir: Path
    runs: int = 0


class AgentProcess:
    """``PYTHON -m agent.cli run --no-sudo --config CFG``, its notify socket and log; stopped with SIGTERM."""

    def __init__(self, ctx: Context, config: Path, label: str, *, bus_address: str | None = None) -> None:
        ctx.runs += 1
        self.label = label
        work = ctx.tmp / f"agent-{ctx.runs}"
        work.mkdir()
        self.state_file = work / "xdg-state" / "backup-agent" / "state.json"
        self.log_path = ctx.log_dir / f"agent-{ctx.runs}-{label.replace(' ', '-')}.log"
        self.notify = NotifySocket(work / "notify.sock")
        env = dict(os.environ)
        for name in ("SUDO_UID", "DBUS_SESSION_BUS_ADDRESS", "XDG_RUNTIME_DIR", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(name, None)
        env.update(
            XDG_STATE_HOME=str(work / "xdg-state"),
            NOTIFY_SOCKET=str(self.notify.path),
            BACKUP_AGENT_RUNTIME_DIR=str(ctx.runtime_dir),
        )
        if bus_address is not None:
            env["DBUS_SESSION_BUS_ADDRESS"] = bus_address
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                [str(ctx.python), "-m", "agent.cli", "run", "--no-sudo", "--config", str(config)],
                cwd=PROJECT_DIR, env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 15) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise BenchError(f"the agent ({self.label}) exited with {self.process.returncode}:\n{self.log_tail()}")

    def wait_for(self, predicate: Callable[[str], bool], what: str, timeout: float) -> tuple[float, str]:
        """The first notify message that satisfies ``predicate`` (earlier ones are passed over)."""
        deadline = time.monotonic() + timeout
        while True:
            item = self.notify.next(min(0.2, deadline - time.monotonic()))
            if item is not None and predicate(item[1]):
                return item
            if item is None:
                self.check_alive()
                if time.monotonic() > deadline:
                    raise BenchError(f"timed out after {timeout:g} s waiting for {what}:\n{self.log_tail()}")

    def wait_ready(self) -> float:
        return self.wait_for(lambda message: "READY=1" in message.split("\n"), "READY=1", READY_TIMEOUT)[0]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.notify.close()


@contextlib.contextmanager
def running_agent(ctx: Context, config: Path, label: str, *, bus_address: str | None = None) -> Iterator[AgentProcess]:
    agent = AgentProcess(ctx, config, label, bus_address=bus_address)
    try:
        yield agent
    finally:
        agent.stop()


def udevd_answers() -> bool:
    return subprocess.run(["udevadm", "control", "--ping", "--timeout=1"], capture_output=True).returncode == 0


@contextlib.contextmanager
def udevd_running(log_dir: Path) -> Iterator[str]:
    """The machine's udevd, or one started here (foreground, own process group) and stopped by its pid."""
    if udevd_answers():
        yield "already running"
        return
    if not os.path.exists(UDEVD):
        raise BenchError(f"no udevd answers and {UDEVD} is missing: apt-get install -y udev")
    with open(log_dir / "udevd.log", "wb") as log_file:
        process = subprocess.Popen(
            [UDEVD], stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 5
        while not udevd_answers():
            if process.poll() is not None:
                raise BenchError(f"{UDEVD} exited with {process.returncode}")
            if time.monotonic() > deadline:
                raise BenchError(f"{UDEVD} (pid {process.pid}) did not answer within 5 s")
            time.sleep(0.05)
        yield f"started for this run (pid {process.pid})"
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # its workers, if one outlived it


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@contextlib.contextmanager
def session_bus(directory: Path) -> Iterator[str]:
    """A private session bus (dbus-daemon --session --fork); killed by the pid it printed."""
    if shutil.which("dbus-daemon") is None:
        raise BenchError("dbus-daemon is not installed: apt-get install -y dbus")
    done = subprocess.run(
        ["dbus-daemon", "--session", "--fork", "--nopidfile", "--print-address=1", "--print-pid=1",
         f"--address=unix:dir={directory}"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10,
    )
    lines = done.stdout.split()
    if done.returncode != 0 or len(lines) < 2 or not lines[1].isdigit():
        raise BenchError(f"dbus-daemon did not start ({done.returncode}): {done.stderr.strip()}")
    address, pid = lines[0], int(lines[1])
    try:
        yield address
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)


# --------------------------------------------------------------------------
# 1. Idle


class UdevWatch:
    """The block-device udev events this machine sends meanwhile (the agent's monitor gets the same), time-stamped.

    The agent rightly wakes for each (it reads the event and finds it is not
    its disk). On a shared machine other work attaches loop devices, so the
    idle window is cut in one-second slices and the wake-ups in slices with no
    udev event near them are counted apart: those are the agent's own.
    """

    def __init__(self) -> None:
        import pyudev

        self._monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="udev")
        self._monitor.filter_by(subsystem="block")
        self._monitor.start()
        self._times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, name="udev", daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            if self._monitor.poll(timeout=0.2) is not None:
                self._times.append(time.monotonic())

    def times(self) -> list[float]:
        return list(self._times)

    def __enter__(self) -> "UdevWatch":
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


@dataclass
class IdleResult:
    label: str
    seconds: float
    rss_kib_start: int
    rss_kib_end: int
    rss_kib_max: int
    hwm_kib: int
    wakeups: int
    per_minute: float
    threads: int
    udev_events: int  # block-device udev events on this machine during the window (each wakes the agent)
    quiet_seconds: int  # one-second slices with no udev event near them
    unexplained: int  # wake-ups in those slices: what the agent did on its own
    wakeups_by_thread: dict[str, int] = field(default_factory=dict)
    status_messages: int = 0


def measure_idle(ctx: Context, config: Path, label: str, seconds: float, bus_address: str | None) -> IdleResult:
    with running_agent(ctx, config, label, bus_address=bus_address) as agent:
        agent.wait_ready()
        time.sleep(SETTLE_S)
        agent.check_alive()
        if bus_address is not None and "no session bus" in agent.log_path.read_text(errors="replace"):
            raise BenchError(f"the agent did not connect to the session bus {bus_address}:\n{agent.log_tail()}")
        agent.notify.drain()
        rss_start, _ = memory_kib(agent.pid)
        rss_max = rss_start
        with UdevWatch() as udev:
            before = context_switches(agent.pid)
            start = time.monotonic()
            samples = [(start, sum(before.values()))]
            end = start + seconds
            while (now := time.monotonic()) < end:
                time.sleep(min(1.0, end - now))  # reading /proc/PID does not wake the agent
                samples.append((time.monotonic(), sum(context_switches(agent.pid).values())))
                rss_max = max(rss_max, memory_kib(agent.pid)[0])
            after = context_switches(agent.pid)
            elapsed = time.monotonic() - start
            time.sleep(UDEV_MARGIN_S)  # an event that came at the very end is counted
            events = udev.times()
        rss_end, hwm = memory_kib(agent.pid)
        agent.check_alive()
        messages = agent.notify.drain()
    by_thread = {str(tid): count - before.get(tid, 0) for tid, count in after.items()}
    by_thread = {tid: count for tid, count in by_thread.items() if count}
    wakeups = sum(after.values()) - sum(before.values())
    quiet = [
        (b[1] - a[1])
        for a, b in zip(samples, samples[1:])
        if not any(a[0] - UDEV_MARGIN_S <= t <= b[0] + UDEV_MARGIN_S for t in events)
    ]
    return IdleResult(
        label=label,
        seconds=round(elapsed, 2),
        rss_kib_start=rss_start,
        rss_kib_end=rss_end,
        rss_kib_max=max(rss_max, rss_end),
        hwm_kib=hwm,
        wakeups=wakeups,
        per_minute=round(wakeups * 60.0 / elapsed, 2) if elapsed > 0 else 0.0,
        threads=len(after),
        udev_events=sum(1 for t in events if start <= t <= start + elapsed),
        quiet_seconds=len(quiet),
        unexplained=sum(quiet),
        wakeups_by_thread=by_thread,
        status_messages=len(messages),
    )


# --------------------------------------------------------------------------
# 2. Plug-in latency


@dataclass
class Plug:
    device: str
    started_s: float
    first_step_s: float
    first_step: str
    cycle_s: float
    snapshot: str


def _status(message: str) -> str | None:
    for line in message.split("\n"):
        if line.startswith("STATUS="):
            return line[len("STATUS="):]
    return None


def _record(state_file: Path) -> tuple[str | None, str | None]:
    """(last_result, last_snapshot) of the disk in the agent's state file."""
    if not state_file.exists():
        return None, None
    record = load_state(str(state_file))[0].get(NAME)
    return (record.last_result, record.last_snapshot) if record is not None else (None, None)


def one_plug(bench: Bench, agent: AgentProcess, previous: str | None) -> Plug:
    running = f"backing up to {NAME}"
    t0 = time.monotonic()
    device = bench.rig.attach(bench.rig.luks_image)  # the plug-in: the kernel's uevent, udevd, the agent
    try:
        started, _ = agent.wait_for(
            lambda m: (s := _status(m)) is not None and s.startswith(running), "the cycle to start", WAIT
        )
        stepped, message = agent.wait_for(
            lambda m: (s := _status(m)) is not None and s.startswith(running + ": "), "the cycle's first step", WAIT
        )
        step = (_status(message) or "").removeprefix(running + ": ")
        ended, message = agent.wait_for(
            lambda m: (s := _status(m)) is not None and not s.startswith("backing up"), "the cycle to end", WAIT
        )
        deadline = time.monotonic() + 10
        while (record := _record(agent.state_file))[1] in (None, previous) and time.monotonic() < deadline:
            time.sleep(0.02)
        result, snapshot = record
        if result != "success" or snapshot is None or snapshot == previous:
            raise BenchError(
                f"the cycle did not make a new snapshot (result {result}, status {_status(message)!r}):\n"
                f"{agent.log_tail()}"
            )
        try:
            bench.assert_locked_and_unmounted()
        except AssertionError as exc:
            raise BenchError(f"the disk is not locked and unmounted after the cycle: {exc}") from None
    finally:
        run_quiet("losetup", "-d", device, check=False)  # the pull
    agent.wait_for(lambda m: _status(m) == "waiting for a backup disk", "the agent to see the disk gone", WAIT)
    settle()
    return Plug(
        device=device,
        started_s=round(started - t0, 4),
        first_step_s=round(stepped - t0, 4),
        first_step=step,
        cycle_s=round(ended - t0, 3),
        snapshot=snapshot,
    )


def measure_latency(bench: Bench, ctx: Context, config: Path, plugs: int) -> list[Plug]:
    done: list[Plug] = []
    with running_agent(ctx, config, "latency") as agent:
        agent.wait_ready()
        previous: str | None = None
        for index in range(plugs):
            plug = one_plug(bench, agent, previous)
            previous = plug.snapshot
            done.append(plug)
            print(
                f"  plug {index + 1:2d}/{plugs}: {plug.device:<12} started {plug.started_s * 1000:6.1f} ms, "
                f"first step ({plug.first_step}) {plug.first_step_s * 1000:6.1f} ms, cycle {plug.cycle_s:5.2f} s",
                flush=True,
            )
    return done


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest rank: the smallest value with at least ``fraction`` of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def distribution(values: Sequence[float]) -> dict[str, float]:
    return {
        "min": min(values),
        "median": statistics.median(values),
        "p95": percentile(values, 0.95),
        "max": max(values),
    }


# --------------------------------------------------------------------------
# Report


def targets(idle: list[IdleResult], latency: list[Plug]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for result in idle:
        peak = max(result.rss_kib_max, result.hwm_kib) * 1024
        found.append({
            "name": f"idle RSS ({result.label}): peak {peak / 1e6:.1f} MB < {RSS_TARGET_BYTES / 1e6:.0f} MB",
            "value": peak, "pass": peak < RSS_TARGET_BYTES,
        })
    for result in idle:
        found.append({
            "name": f"idle wake-ups ({result.label}): {result.unexplained} of its own in "
                    f"{result.quiet_seconds} udev-quiet s of {result.seconds:.0f} s, target {WAKEUP_TARGET} "
                    f"(all {result.wakeups} = {result.per_minute:g}/min, with {result.udev_events} block udev "
                    "events from other work on this machine)",
            "value": result.unexplained, "pass": result.unexplained <= WAKEUP_TARGET,
        })
    if latency:
        for key, what in (("started_s", "backup_started"), ("first_step_s", "first step")):
            p95 = percentile([getattr(plug, key) for plug in latency], 0.95)
            found.append({
                "name": f"plug-in -> {what}: p95 {p95 * 1000:.0f} ms < {LATENCY_TARGET_S * 1000:.0f} ms "
                        f"over {len(latency)} plug-ins",
                "value": p95, "pass": p95 < LATENCY_TARGET_S,
            })
    return found


def print_report(idle: list[IdleResult], latency: list[Plug], checks: list[dict[str, Any]]) -> None:
    if idle:
        print()
        print("Idle agent, no disk attached")
        print(f"{'run':<12} {'window s':>8} {'RSS MiB':>8} {'max MiB':>8} {'HWM MiB':>8} {'threads':>7} "
              f"{'wake-ups':>8} {'per min':>8} {'udev ev':>8} {'quiet s':>8} {'own':>5}")
        for r in idle:
            print(f"{r.label:<12} {r.seconds:>8.1f} {r.rss_kib_end / 1024:>8.1f} {r.rss_kib_max / 1024:>8.1f} "
                  f"{r.hwm_kib / 1024:>8.1f} {r.threads:>7} {r.wakeups:>8} {r.per_minute:>8g} "
                  f"{r.udev_events:>8} {r.quiet_seconds:>8} {r.unexplained:>5}")
        print("udev ev: block-device udev events during the window (each wakes the agent: it reads it);")
        print("own: wake-ups in the one-second slices with no udev event within 0.25 s (quiet s).")
    if latency:
        print()
        print(f"Plug-in latency over {len(latency)} plug-ins (from just before losetup)")
        print(f"{'to':<16} {'min ms':>8} {'median ms':>9} {'p95 ms':>8} {'max ms':>8}")
        for key, what in (("started_s", "backup_started"), ("first_step_s", "first step")):
            d = distribution([getattr(plug, key) for plug in latency])
            print(f"{what:<16} {d['min'] * 1000:>8.1f} {d['median'] * 1000:>9.1f} "
                  f"{d['p95'] * 1000:>8.1f} {d['max'] * 1000:>8.1f}")
        steps = sorted({plug.first_step for plug in latency})
        cycles = distribution([plug.cycle_s for plug in latency])
        print(f"first step: {', '.join(steps)}; whole cycle median {cycles['median']:.2f} s, "
              f"max {cycles['max']:.2f} s")
    print()
    for check in checks:
        print(f"{'PASS' if check['pass'] else 'FAIL'}  {check['name']}")


# --------------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--idle-seconds", type=float, default=60.0, help="idle window per run (default 60; 0 skips)")
    p.add_argument("--plugs", type=int, default=20, help="plug-ins timed (default 20; 0 skips)")
    p.add_argument("--no-bus-run", dest="bus_run", action="store_false",
                   help="skip the idle run with a private session bus")
    p.add_argument("--python", type=Path, default=PROJECT_DIR / ".venv" / "bin" / "python",
                   help="the Python that runs the agent (default .venv/bin/python)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    p.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = p.parse_args(argv)
    if args.idle_seconds < 0 or args.plugs < 0:
        p.error("--idle-seconds and --plugs must not be negative")
    if not args.python.exists():
        p.error(f"--python {args.python} does not exist")
    return args


def check_parts() -> None:
    if os.geteuid() != 0:
        raise BenchError("needs root (loop devices, cryptsetup, mount, udevd)")
    missing = [tool for tool in REQUIRED if shutil.which(tool) is None]
    if missing:
        raise BenchError(f"missing {', '.join(missing)}: run scripts/test, which installs them")
    if not os.path.exists("/dev/loop-control"):
        raise BenchError("no /dev/loop-control: this kernel has no loop devices")


def run(args: argparse.Namespace, tmp: Path, trusted: Path) -> int:
    runtime_dir = tmp / "runtime"
    runtime_dir.mkdir()
    log_dir = tmp / "logs"
    log_dir.mkdir()
    # The cycles' machine lock (init's and the agent's) in a directory of this run, never /run's.
    os.environ["BACKUP_AGENT_RUNTIME_DIR"] = str(runtime_dir)
    # absolute(), not resolve(): the venv's python is a symbolic link that must stay one.
    ctx = Context(python=args.python.absolute(), tmp=tmp, runtime_dir=runtime_dir, log_dir=log_dir)
    idle: list[IdleResult] = []
    latency: list[Plug] = []
    rig_dir = tmp / "rig"
    rig_dir.mkdir()
    with contextlib.ExitStack() as stack:
        udevd = stack.enter_context(udevd_running(log_dir))
        print(f"udevd: {udevd}", flush=True)
        rig = Rig(rig_dir, trusted)
        stack.callback(rig.cleanup)
        bench = Bench(rig, trusted)
        stack.callback(bench.cleanup)
        stack.callback(stop_leftover_cycle)
        bench.init()
        run_quiet("losetup", "-d", rig.luks_device)  # not attached from here on but by a plug-in
        settle()
        bench.assert_locked_and_unmounted()
        config = bench.config
        if args.idle_seconds > 0:
            runs: list[tuple[str, str | None]] = [("no bus", None)]
            if args.bus_run:
                bus_dir = tmp / "bus"
                bus_dir.mkdir()
                runs.append(("session bus", stack.enter_context(session_bus(bus_dir))))
            for label, address in runs:
                print(f"idle ({label}): {args.idle_seconds:g} s ...", flush=True)
                idle.append(measure_idle(ctx, config, label, args.idle_seconds, address))
        if args.plugs > 0:
            always = trusted / "config-always.toml"
            always.write_text(config.read_text() + '\n[agent]\non_plug = "always"\n')
            always.chmod(0o644)
            print(f"latency: {args.plugs} plug-ins ...", flush=True)
            latency = measure_latency(bench, ctx, always, args.plugs)
    checks = targets(idle, latency)
    print_report(idle, latency, checks)
    if args.json:
        payload = {
            "targets": {
                "rss_bytes": RSS_TARGET_BYTES, "wakeups": WAKEUP_TARGET, "latency_p95_s": LATENCY_TARGET_S,
            },
            "environment": {
                "kernel": platform.release(), "python": sys.version.split()[0], "udevd": udevd,
                "cpus": os.cpu_count(),
            },
            "idle": [asdict(result) for result in idle],
            "latency": {
                "plugs": [asdict(plug) for plug in latency],
                "started_s": distribution([p.started_s for p in latency]) if latency else None,
                "first_step_s": distribution([p.first_step_s for p in latency]) if latency else None,
            },
            "checks": checks,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


def stop_leftover_cycle() -> None:
    """A cycle outlives its agent: if one still holds this run's lock, stop it before the rig is torn down."""
    path = cycle_lock_path(through_sudo=False)
    try:
        with open(path, encoding="utf-8") as handle:
            holder = json.loads(handle.read(4096) or "{}")
    except (OSError, ValueError):
        return
    pid = holder.get("pid") if isinstance(holder, dict) else None
    if not isinstance(pid, int) or _gone(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    trusted: Path | None = None
    try:
        check_parts()
        base = _trusted_base()
        if base is None:
            raise BenchError("no root-owned home directory closed to others to make a trusted directory in")
        trusted = Path(tempfile.mkdtemp(prefix="bench-", dir=base))
        os.chmod(trusted, 0o755)
        return run(args, tmp, trusted)
    except (BenchError, AssertionError, OSError, subprocess.SubprocessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if not args.keep:
            print(f"(the logs are kept in {tmp / 'logs'})", file=sys.stderr)
            args.keep = True
        return 1
    finally:
        if trusted is not None:
            shutil.rmtree(trusted, ignore_errors=True)
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
