"""The desktop agent: udev, the schedule and the backup cycle, on one asyncio loop.

``backup-agent run`` builds an :class:`Agent` and awaits :meth:`Agent.run`.
Everything the agent does is a reaction on the loop, and nothing polls:

- udev (:class:`agent.desktop.udev.Monitor`, its socket on the loop) says a
  configured disk came or went;
- at most ONE timer (``loop.call_later``) is armed, for the earliest moment a
  backup falls due on an attached disk; with no disk attached there is none;
- the running cycle's stdout and stderr pipes and a pidfd for its exit sit on
  the loop as readers;
- ``backup_now``/``stop`` (D-Bus), ``eject`` (the tray), ``on_resumed``
  (logind) call in.

So an idle agent with no disk attached sleeps in the loop's ``epoll_wait``
until udev has something to say. Two exceptions, both only when asked for:
``WATCHDOG=1`` pings when systemd set ``$WATCHDOG_USEC``, and a look at the
machine lock every few seconds while a cycle started by someone else (a
previous agent, a shell) runs, to notice its end.

The decisions are :mod:`agent.desktop.agenda`'s (pure, across disks, built on the
per-disk :mod:`agent.policy.schedule`): the agent turns what happens into its
events and only carries out the actions it returns, and keeps what a
restart must not lose (last success, failures, unfinished runs, ejected
disks) in a small JSON state file.

The cycle is ``cycle_argv + ("--disk", NAME)``, normally ``sudo -n
/usr/local/bin/backup-agent backup --json --disk NAME``. It runs in a session
of its own, so a signal to the agent's process group does not reach it, and
the agent never kills it on its own shutdown: a cycle outlives its agent (it
survives losing its reader), and the next agent sees it through the cycle's
machine lock (:func:`cycle_lock_path`) and shows it instead of starting
another.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Final, Literal, Protocol, Sequence

from agent.desktop import agenda
from agent.core import events, lock
from agent.policy import conditions, schedule
from agent.config.model import RemoteRepository, Settings
from agent.disk.mount import holders
from agent.core.errors import (
    EXIT_BUSY, EXIT_DISK_BUSY, EXIT_OK, EXIT_PARTIAL, EXIT_UNREACHABLE, EXIT_WRONG_PASSPHRASE, BusyError, LockFileError,
    UsageError,
)
from agent.desktop import servers
from agent.policy import reach
from agent.desktop.reminder import notice_state_path
from agent.desktop.passphrase import TRIES, Given, Passphrases, too_many_tries
from agent.desktop import pinentry
from agent.desktop.pinentry import PromptUnavailable
from agent.desktop.process import ChildProcess, run_to_end
from agent.desktop.sdnotify import Notifier, watchdog_interval
from agent.desktop.statefile import DiskRecord, load_state, save_state, state_file_path
from agent.desktop.state import (
    AgentStatus,
    BrowseReply,
    DiskStatus,
    EjectReply,
    Listener,
    OffsiteListener,
    OffsiteStatus,
    Result,
    disk_left,
    offsite_after,
    offsite_from,
    offsite_maintained,
)
from agent.desktop.udev import DiskGone, DiskSeen, Monitor

log = logging.getLogger(__name__)

#: The machine lock of a cycle that runs as root (through sudo, the caller's
#: environment cannot move it).
ROOT_CYCLE_LOCK: Final = "/run/backup-agent.lock"
#: Seconds between looks at the cycle lock, only while another agent's (or a
#: shell's) cycle runs.
FOREIGN_POLL: Final = 3.0
#: Seconds a disk opened for browsing stays open; then it is closed unless a
#: process of the user still uses it (a file open, a shell in it), in which
#: case it is looked at again after as long.
BROWSE_IDLE: Final = 900.0
_STDERR_TAIL: Final = 5


# -- where things are -----------------------------------------------------------


def cycle_lock_path(*, through_sudo: bool) -> str:
    """The machine lock the cycle takes (agent.core.lock.machine_lock_path as the CYCLE computes it).

    Through sudo the cycle is root and ignores the caller's environment:
    always :data:`ROOT_CYCLE_LOCK`. Without sudo the cycle inherits the
    agent's environment and user, so it is the agent's own
    :func:`agent.core.lock.machine_lock_path` (``$BACKUP_AGENT_RUNTIME_DIR`` when
    set, as the tests do; /run for root; the runtime dir for a user).
    """
    if through_sudo:
        return ROOT_CYCLE_LOCK
    return lock.machine_lock_path()


def _through_sudo(argv: Sequence[str]) -> bool:
    return bool(argv) and os.path.basename(argv[0]) == "sudo"


# -- the agent ------------------------------------------------------------------------


class Releasable(Protocol):
    """What holds sleep off while a cycle runs (logind's inhibitor): released by closing it."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class AgentOptions:
    """How the agent starts the cycle and where it keeps its state."""

    #: How to start the cycle, without ``--disk``: ``("sudo", "-n", EXECUTABLE,
    #: "backup", "--json")``, or without sudo (root, tests) ``(sys.executable,
    #: "-m", "agent.cli", "backup", "--json", "--config", PATH)``.
    cycle_argv: Sequence[str]
    policy: schedule.Policy = schedule.Policy()
    state_file: str = field(default_factory=state_file_path)
    #: Takes logind's sleep inhibitor before a cycle starts; what it returns
    #: (an fd, or an object with ``close()``) is closed when the cycle ends.
    inhibit: Callable[[], Awaitable[Releasable | None]] | None = None
    #: The cycle's machine lock; None: :func:`cycle_lock_path` for ``cycle_argv``.
    cycle_lock: str | None = None
    #: Seconds between looks at the lock while a foreign cycle runs.
    foreign_poll: float = FOREIGN_POLL
    #: How to eject a disk, without ``--disk``: ``("sudo", "-n", EXECUTABLE,
    #: "eject", "--json")`` or, without sudo, this Python's ``-m agent.cli
    #: eject --json``. Empty: this agent cannot eject (the tray says how by hand).
    eject_argv: Sequence[str] = ()
    #: How to open a disk for browsing, without ``--disk`` (``open --json``, as eject_argv).
    open_argv: Sequence[str] = ()
    #: Seconds a disk opened for browsing stays open; then, when nothing uses it, it is closed.
    browse_idle: float = BROWSE_IDLE
    #: Where the passphrase of a disk without a key file comes from (the
    #: keyring, pinentry); None: such a disk must be unlocked by hand.
    passphrases: Passphrases | None = None

    def lock_path(self) -> str:
        if self.cycle_lock is not None:
            return self.cycle_lock
        return cycle_lock_path(through_sudo=_through_sudo(self.cycle_argv))


@dataclass
class _Cycle:
    """The cycle this agent started, while it runs."""

    disk: str
    reason: str
    started: float  # agent clock
    started_monotonic: float
    process: ChildProcess | None = None
    stderr_tail: list[str] = field(default_factory=list)
    complete: events.CompleteEvent | None = None
    error: events.ErrorEvent | None = None
    protocol_refused: bool = False  # a line of a newer protocol was logged once
    stop_requested: bool = False
    closing: dict[str, str] = field(default_factory=dict)  # "unmount"/"lock-disk" -> the state reported
    lock_warning: str = ""  # why locking the disk failed, when it did
    inhibitor: Releasable | None = None
    launch: "asyncio.Task[None] | None" = None
    finished: bool = False
    # A disk opened with a passphrase (docs/ARCHITECTURE.md, "A passphrase disk"):
    given: Given | None = None  # the one being tried, until the disk is open
    wrong: int = 0  # typed passphrases that did not open it
    forgotten: bool = False  # a remembered one did not open it and was forgotten
    remember: bool | None = None  # the user's answer to "remember it?"
    skipped: str | None = None  # not run, and not a failure: why (a cancelled prompt)
    unreachable: str | None = None  # a server that did not answer: why (not run, not a failure)
    announced: bool = False  # listeners heard backup_started
    asking: bool = False  # the passphrase prompt is up


@dataclass(frozen=True)
class _Foreign:
    """A cycle someone else started (another agent, a shell), seen through the lock."""

    pid: int | None
    description: str


def _exit_description(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-returncode).name}"
        return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


class Agent:
    """The agent: udev in, decisions by :mod:`agent.policy.schedule`, one cycle at a time, listeners out.

    Implements :class:`agent.desktop.state.Controller`. Every method runs on the
    event loop's thread. A listener that raises is logged and changes nothing.
    """

    def __init__(
        self,
        settings: Settings,
        options: AgentOptions,
        listeners: Sequence[Listener] = (),
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not options.cycle_argv:
            raise ValueError("cycle_argv is empty: give the command that runs the backup cycle")
        self._settings = settings
        self._options = options
        self._listeners: list[Listener] = list(listeners)
        self._clock = clock
        self._disk_names = tuple(disk.name for disk in settings.disks)
        # Remote destinations (docs/ARCHITECTURE.md, "Remote destinations"): scheduled and recorded as disks are.
        self._remotes = {remote.name: remote for remote in settings.remotes}
        self._names = self._disk_names + tuple(self._remotes)
        records, saved_status = load_state(options.state_file)
        self._records: dict[str, DiskRecord] = {name: records.get(name, DiskRecord()) for name in self._names}
        # Records of disks no longer configured are kept in the file, untouched.
        self._other_records = {name: record for name, record in records.items() if name not in self._records}
        self._agenda = agenda.new(
            options.policy,
            self._names,
            {
                name: schedule.DiskState(
                    last_success=record.last_success,
                    failures=record.failures,
                    last_failure=record.last_failure,
                    unfinished=record.unfinished,
                    stopped_at=record.stopped_at,
                    postponed_until=record.postponed_until,
                )
                for name, record in self._records.items()
            },
            ejected=[name for name, record in self._records.items() if record.ejected],
            rules=rules_of(settings),
            remote=remote_destinations(settings),
            servers=tuple(self._remotes),
            policies=own_policies(settings, options.policy),
        )
        self._queue: list[agenda.Event] = []  # events that came while one was being carried out
        self._stepping = False
        self._starting = False  # Monitor.start is reporting the disks present at start
        self._loop: asyncio.AbstractEventLoop | None = None
        self._monitor: Monitor | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._foreign_timer: asyncio.TimerHandle | None = None
        self._watchdog_timer: asyncio.TimerHandle | None = None
        self._cycle: _Cycle | None = None
        self._foreign: _Foreign | None = None
        self._notifier = Notifier(None)
        self._last_notified = ""
        last_disk = saved_status.get("disk")
        self._status = AgentStatus(disk=last_disk if last_disk in self._records else None)
        self._status.offsite = offsite_records(settings, saved_status.get("offsite"))
        self._published: AgentStatus | None = None
        self._last_returncode: int | None = None
        self._ejecting: str | None = None  # the disk an eject is closing now
        # Disks opened for browsing, each with the timer that closes it when idle.
        self._browsing: dict[str, asyncio.TimerHandle] = {}
        self._browse_tasks: set[asyncio.Task[None]] = set()
        self._refresh(publish=False)

    # -- wiring ---------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        """Subscribe (the D-Bus service, notifications, the tray), also after the agent started."""
        self._listeners.append(listener)

    @property
    def timer(self) -> asyncio.TimerHandle | None:
        """The one schedule timer armed now (None: nothing to wait for, e.g. no disk attached)."""
        return self._timer

    @property
    def cycle_pid(self) -> int | None:
        """The pid of the cycle this agent started, while it runs."""
        cycle = self._cycle
        return cycle.process.pid if cycle is not None and cycle.process is not None else None

    @property
    def watching(self) -> bool:
        """True once :meth:`run` has started the udev monitor (and read the devices present), until it returns."""
        return self._monitor is not None

    @property
    def last_returncode(self) -> int | None:
        """The exit status of the last cycle this agent saw end (negative: killed by that signal)."""
        return self._last_returncode

    def attached(self) -> list[str]:
        """The configured disks attached now, in the configuration's order (servers are never attached:
        a reminder for one comes when no backup to it succeeded for long, reachable or not)."""
        return [name for name in self._agenda.attached() if name not in self._remotes]

    def current_agenda(self) -> agenda.Agenda:
        """What the agent decides from now (a value)."""
        return self._agenda

    def last_successes(self) -> dict[str, float | None]:
        """Each configured disk's last successful backup (epoch seconds; None: never), for reminders."""
        return {name: record.last_success for name, record in self._records.items()}

    # -- running ----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Watch and act until ``stop`` is set.

        The udev monitor starts first, then the devices present are read (a
        disk plugged in before the agent started is found). On return the
        monitor and every timer are gone; a cycle still running is left to
        finish on its own.
        """
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._notifier = Notifier.from_environ()
        try:
            self._look_for_foreign()
            if not self._disk_names:
                log.warning(
                    "no [[disk]] is configured in %s: nothing to watch", self._settings.path or "the configuration"
                )
            self._monitor = Monitor(self._settings.disks, self._on_disk_change)
            self._starting = True  # the disks present now are found, not plugged in
            try:
                self._monitor.start(loop)
            finally:
                self._starting = False
            if self._remotes:
                self._do(agenda.Watching())  # the servers are attached now: those due start (or wait)
            self._notifier.send("READY=1")
            self._notify_status()
            interval = watchdog_interval()
            if interval is not None and self._notifier.enabled:
                self._watchdog(loop, interval)
            log.info("watching for %s%s", ", ".join(self._disk_names) or "no disk",
                     f"; backing up to {', '.join(self._remotes)} while reachable" if self._remotes else "")
            await stop.wait()
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        self._notifier.send("STOPPING=1")
        if self._monitor is not None:
            self._monitor.stop()
            self._monitor = None
        for handle in (self._timer, self._foreign_timer, self._watchdog_timer, *self._browsing.values()):
            if handle is not None:
                handle.cancel()
        self._browsing.clear()  # a disk left open for browsing is closed by Eject or the next backup's agent
        self._timer = self._foreign_timer = self._watchdog_timer = None
        cycle = self._cycle
        if cycle is not None:
            if cycle.launch is not None and not cycle.launch.done():
                cycle.launch.cancel()  # a passphrase prompt closes with it
            if cycle.given is not None:
                cycle.given.wipe()
            if cycle.process is not None and cycle.process.poll() is None:
                log.info(
                    "the backup cycle (pid %d) goes on without the agent; the next agent will show it",
                    cycle.process.pid,
                )
            self._detach(cycle)
            self._release_inhibitor(cycle)
            self._cycle = None
        # Not watching any more: nothing is known to be attached, nothing can start.
        self._agenda = agenda.new(
            self._agenda.policy,
            self._names,
            {name: self._agenda.disk(name).state for name in self._names},
            ejected=[name for name in self._disk_names if self._agenda.disk(name).ejected],
            rules=self._agenda.rules,
            remote=tuple(self._agenda.remote),
            servers=tuple(self._remotes),
            policies=self._agenda.policies,
        )
        self._queue.clear()
        self._loop = None
        self._notifier.close()

    def _watchdog(self, loop: asyncio.AbstractEventLoop, interval: float) -> None:
        self._notifier.send("WATCHDOG=1")
        self._watchdog_timer = loop.call_later(interval, self._watchdog, loop, interval)

    # -- Controller -----------------------------------------------------------------------

    def backup_now(self, disk: str | None = None) -> str:
        """Start a cycle on ``disk`` (None: the first attached one): "started", "running", "no-disk", "unknown-disk"."""
        # While something else holds the machine the agenda holds the request back: "running".
        return self._do(agenda.Asked(disk or None)) or "no-disk"

    def stop(self) -> str:
        """SIGTERM to the running cycle (it cleans up; a stop is not a failure): "stopping" or "not-running"."""
        if self._cycle is None and self._foreign is not None:
            log.warning(
                "the running backup (%s) was not started by this agent: it is not stopped from here",
                self._foreign.description,
            )
        return self._do(agenda.StopAsked()) or "not-running"

    def not_now(self) -> str:
        """"Not now": stop the running cycle as stop() does; the next try exactly one interval later.
        "postponed" or "not-running"."""
        return self._do(agenda.NotNow()) or "not-running"

    def on_power(self, on_battery: bool, percent: float | None) -> None:
        """UPower told the battery's state (agent.desktop.dbus.upower): a skipped backup may start now."""
        battery = conditions.on_battery_percent(on_battery, percent)
        self._circumstances(dataclasses.replace(battery, metered=self._agenda.circumstances.metered))

    def on_network(self, metered: bool | None, online: bool | None = None) -> None:
        """NetworkManager told whether the connection is metered (None: not known, taken as not), and
        whether there is a network at all (False: none, so no server is tried; None: not known, tried)."""
        self._circumstances(
            dataclasses.replace(self._agenda.circumstances, metered=metered is True, offline=online is False)
        )

    def _circumstances(self, now: conditions.Circumstances) -> None:
        if now != self._agenda.circumstances:
            log.info("on battery: %s (%s%%); metered connection: %s; no network: %s", now.on_battery,
                     "?" if now.battery_percent is None else f"{now.battery_percent:.0f}", now.metered, now.offline)
            self._do(agenda.Circumstance(now))

    def _kill(self, disk: str) -> None:
        cycle = self._cycle
        if cycle is None or cycle.disk != disk:
            return
        cycle.stop_requested = True
        if cycle.asking and cycle.launch is not None and not cycle.launch.done():
            cycle.launch.cancel()  # the passphrase prompt closes: nothing ran, nothing to stop
            cycle.skipped = "stopped while the passphrase was asked for"
            self._finish(cycle, None, None)
            return
        if cycle.process is not None and cycle.process.poll() is None:
            log.info("stopping the backup cycle (pid %d)", cycle.process.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(cycle.process.pid, signal.SIGTERM)

    def status(self) -> AgentStatus:
        """A copy of the current status."""
        return self._copy(self._status)

    @property
    def ejecting(self) -> str | None:
        """The disk an eject is closing now, or None."""
        return self._ejecting

    def _blocker(self) -> str | None:
        """What keeps a disk from being ejected or opened now: a running cycle, this agent's or another's."""
        if self._cycle is None:
            self._look_for_foreign()
        if self._cycle is not None:
            return f"the backup of {self._cycle.disk} is running"
        if self._foreign is not None:
            return f"another backup is running ({self._foreign.description})"
        return None

    def _why_not_run(
        self, disk: str, argv: Sequence[str], doing: str, again: str
    ) -> tuple[Literal["refused", "failed"], str] | None:
        """Why eject or open cannot run for ``disk`` now, as (result, message); None: it may.

        The same four checks for both: a configured disk, no eject running,
        no cycle running (this agent's or another's), a way to run it.
        """
        if disk not in self._disk_names:
            return "failed", f"{disk} is not a configured backup disk"
        if self._ejecting is not None:
            return "refused", f"{self._ejecting} is being ejected: wait for it"
        blocker = self._blocker()
        if blocker is not None:
            return "refused", f"a backup is running: {again} ({blocker})"
        if not argv:
            return "failed", f"this agent was started without a way to {doing}"
        return None

    async def eject(self, disk: str, *, by_user: bool = True) -> EjectReply:
        """Unmount and lock ``disk`` now: ``eject_argv + ("--disk", disk)``, as the cycle is run.

        Normally ``sudo -n backup-agent eject --json --disk NAME``, in a
        session of its own (it finishes even if the agent stops), waited for
        in a thread so the loop goes on. Refused while a cycle runs, this
        agent's or another's. While it runs no cycle starts (triggers wait,
        see :mod:`agent.desktop.agenda`); once the disk is closed, no scheduled backup
        opens it again until it is plugged in again or Back up now is asked.
        A close that the user did not ask for (``by_user=False``: the end of
        browsing) leaves the schedule as it was.
        """
        refused = self._why_not_run(
            disk, self._options.eject_argv, "eject a disk", f"wait for it or stop it, then eject {disk} again"
        )
        if refused is not None:
            return EjectReply(*refused)
        argv = [*self._options.eject_argv, "--disk", disk]
        self._ejecting = disk
        self._block()
        log.info("ejecting %s: running %s", disk, " ".join(argv))
        try:
            returncode, out, err = await run_to_end(argv)
        except OSError as exc:
            reply = EjectReply("failed", f"could not start the eject ({argv[0]}): {exc.strerror or exc}")
        except BaseException:
            self._ejecting = None
            self._block()
            raise
        else:
            reply = eject_reply(disk, returncode, out, err, through_sudo=_through_sudo(argv))
        (log.info if reply.safe else log.warning)("eject %s: %s", disk, reply.message)
        if reply.safe and by_user:
            self._do(agenda.Ejected(disk))  # before the way is clear again: nothing opens it
        self._ejecting = None
        self._block()
        self._refresh()
        return reply

    async def browse(self, disk: str) -> BrowseReply:
        """Open ``disk`` read-only for browsing: ``open_argv + ("--disk", disk)``, run as eject is.

        Refused while a cycle or an eject runs. Once open, it is closed again
        (an eject) after :attr:`AgentOptions.browse_idle` seconds in which no
        process of this user used it; a click on Browse again restarts that time.
        """
        refused = self._why_not_run(disk, self._options.open_argv, "open a disk", f"wait for it, then browse {disk} again")
        if refused is not None:
            return BrowseReply(*refused)
        argv = [*self._options.open_argv, "--disk", disk]
        log.info("opening %s for browsing: running %s", disk, " ".join(argv))
        try:
            ended = await self._open_with_passphrase(disk, argv)
        except OSError as exc:
            reply = BrowseReply("failed", f"could not start opening the disk ({argv[0]}): {exc.strerror or exc}")
        else:
            reply = ended if isinstance(ended, BrowseReply) else browse_reply(disk, *ended, through_sudo=_through_sudo(argv))
        (log.info if reply.open else log.warning)("browse %s: %s", disk, reply.message)
        if reply.open:
            self._arm_browse_close(disk)
            self._tell("disk_opened", disk)  # what said "safe to unplug" is untrue now
        return reply

    async def _open_with_passphrase(self, disk: str, argv: list[str]) -> tuple[int, list[str], list[str]] | BrowseReply:
        """``open``, with the passphrase on stdin for a disk without a key file (asked again as for a backup)."""
        passphrases = self._options.passphrases
        if passphrases is None or not passphrases.needed(disk):
            return await run_to_end(argv)
        wrong, forgotten, remember = 0, False, None
        while True:
            try:
                given = await passphrases.ask(disk, "browse", wrong=wrong, forgotten=forgotten, remember=remember)
            except PromptUnavailable as exc:
                return BrowseReply("failed", f"cannot ask for the passphrase of {disk}: {exc}")
            if given is None:
                return BrowseReply("refused", "the passphrase prompt was cancelled: the disk stays locked")
            remember = given.remember
            try:
                ended = await run_to_end([*argv, "--passphrase-stdin"], stdin=given.secret)
            except BaseException:
                given.wipe()
                raise
            if ended[0] != EXIT_WRONG_PASSPHRASE:
                if ended[0] == EXIT_OK:
                    passphrases.opened(disk, given)  # remembered if asked, then wiped
                else:
                    given.wipe()
                return ended
            given.wipe()
            if given.remembered:
                passphrases.forget(disk)
                forgotten = True
            else:
                wrong += 1
                if wrong >= TRIES:
                    return BrowseReply("failed", too_many_tries(disk, "browse"))

    def _arm_browse_close(self, disk: str) -> None:
        old = self._browsing.pop(disk, None)
        if old is not None:
            old.cancel()
        loop = self._loop or asyncio.get_running_loop()
        self._browsing[disk] = loop.call_later(self._options.browse_idle, self._browse_time_up, disk)

    def _browse_time_up(self, disk: str) -> None:
        task = (self._loop or asyncio.get_running_loop()).create_task(self._close_browsed(disk))
        self._browse_tasks.add(task)
        task.add_done_callback(self._browse_tasks.discard)

    async def _close_browsed(self, disk: str) -> None:
        """The browsing time is up: close the disk unless it is in use (then look again later)."""
        self._browsing.pop(disk, None)
        config = next(d for d in self._settings.disks if d.name == disk)
        in_use = await asyncio.to_thread(holders, config.mount_point) if os.path.ismount(config.mount_point) else []
        if self._blocker() is not None or self._ejecting is not None or in_use:
            self._arm_browse_close(disk)
            return
        try:
            # Closed because browsing ended, not ejected by the user: backups go on as scheduled.
            reply = await self.eject(disk, by_user=False)
        except Exception:
            log.exception("closing %s after browsing failed", disk)
            return
        if reply.result in ("busy", "refused"):
            self._arm_browse_close(disk)
            return
        log.info("%s closed after browsing: %s", disk, reply.message)

    # -- hooks for logind ---------------------------------------------------------------

    def on_resumed(self) -> None:
        """The machine woke from sleep (logind's PrepareForSleep(false)): catch up once if due."""
        self._do(agenda.Resumed())

    def tick(self) -> None:
        """What the schedule timer does when it fires: one decision per attached disk."""
        if self._timer is not None:
            self._timer.cancel()  # called by hand (tests, a resume hook): the armed one is replaced
            self._timer = None
        self._do(agenda.Tick())

    # -- udev -------------------------------------------------------------------------------

    def _on_disk_change(self, change: DiskSeen | DiskGone) -> None:
        name = change.disk
        if name not in self._disk_names:
            return
        if isinstance(change, DiskSeen):
            log.info("backup disk %s %s (%s)", name, "found" if self._starting else "attached", change.device)
            if self._cycle is None:  # the status names the running cycle's disk while one runs
                self._status.disk = name
            self._tell("disk_attached", name)
            self._do(agenda.Plugged(name, at_start=self._starting))
        else:
            during = self._cycle is not None and self._cycle.disk == name
            log.info("backup disk %s removed (%s)%s", name, change.device, " during the backup" if during else "")
            self._tell("disk_removed", name, during)
            self._do(agenda.Unplugged(name))

    # -- deciding ---------------------------------------------------------------------------

    def _do(self, event: agenda.Event) -> str | None:
        """Feed one event to the agenda and carry out its actions; the answer to a caller, if any.

        Events that arise while actions are carried out (a cycle that could
        not be spawned ends at once) are queued and fed after, in order.
        """
        if (
            not self._stepping
            and isinstance(event, (agenda.Plugged, agenda.Tick, agenda.Resumed, agenda.Asked))
            and self._cycle is None
            and self._ejecting is None
        ):
            self._look_for_foreign()  # a cycle someone else started meanwhile holds the machine: Blocked first
        self._queue.append(event)
        if self._stepping:
            return None
        answer: str | None = None
        self._stepping = True
        try:
            while self._queue:
                current = self._queue.pop(0)
                now = self._clock()
                self._agenda, actions = agenda.step(self._agenda, current, now)
                for action in actions:
                    said = self._carry_out(action, now)
                    if said is not None and current is event:
                        answer = said
        finally:
            self._stepping = False
        self._refresh()
        return answer

    def _carry_out(self, action: agenda.Action, now: float) -> str | None:
        if isinstance(action, agenda.Start):
            self._start(action.disk, action.reason)
        elif isinstance(action, agenda.Stop):
            self._kill(action.disk)
        elif isinstance(action, agenda.Answer):
            return action.word
        elif isinstance(action, agenda.Waits):
            log.info("backup of %s (%s) waits: %s", action.disk, action.reason, action.why)
        elif isinstance(action, agenda.Skipped):
            log.info("backup of %s skipped for now: %s (it starts when that ends)", action.disk, action.reason)
        elif isinstance(action, agenda.Save):
            self._keep_agenda()
            self._save()
        elif isinstance(action, agenda.Wake):
            self._arm(action.at, now)
        return None

    def _keep_agenda(self) -> None:
        """Copy what the agenda must keep across a restart into the records the state file holds."""
        for name in self._names:
            entry = self._agenda.disk(name)
            state = entry.state
            self._records[name] = dataclasses.replace(
                self._records[name],
                last_success=state.last_success,
                failures=state.failures,
                last_failure=state.last_failure,
                unfinished=state.unfinished,
                stopped_at=state.stopped_at,
                ejected=entry.ejected,
                postponed_until=state.postponed_until,
            )

    def _block(self) -> None:
        """Tell the agenda whether something else holds the machine (an eject, another cycle)."""
        if self._ejecting is not None:
            # Its machine lock would look like a foreign cycle: not a failure, wait for it.
            reason: str | None = f"{self._ejecting} is being ejected"
        elif self._foreign is not None:
            reason = f"another backup is running ({self._foreign.description})"
        else:
            reason = None
        if reason != self._agenda.blocked:
            self._do(agenda.Blocked(reason))

    def _arm(self, at: float | None, now: float) -> None:
        """Cancel the timer, and arm one for ``at`` (wall clock), if any."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._loop is None or at is None:
            return
        self._timer = self._loop.call_later(max(0.0, at - now), self.tick)

    # -- the foreign cycle --------------------------------------------------------------------

    def _look_for_foreign(self) -> None:
        """Probe the cycle's lock; while someone holds it, show that cycle and look again later."""
        path = self._options.lock_path()
        try:
            lock.probe(path)
        except LockFileError as exc:
            # Not a sign of a running cycle (it would be readable): say
            # so, and let the cycle itself report "busy" if it is.
            log.warning("cannot look at the backup cycle's lock: %s", exc.message)
            if self._foreign is not None:
                self._foreign = None
                self._block()
                self._refresh()
            return
        except BusyError as exc:
            pid = exc.pid
            found = _Foreign(pid, f"pid {pid}" if pid is not None else f"the lock {path} is held")
            if self._foreign != found:
                log.info("a backup cycle started elsewhere is running (%s): waiting for it to end", found.description)
            self._foreign = found
            self._arm_foreign_poll()
            self._block()
            self._refresh()
            return
        if self._foreign is not None:
            log.info("the backup cycle started elsewhere (%s) has ended", self._foreign.description)
            self._foreign = None
            self._block()
            self._refresh()

    def _arm_foreign_poll(self) -> None:
        if self._loop is None or self._foreign_timer is not None:
            return
        self._foreign_timer = self._loop.call_later(self._options.foreign_poll, self._poll_foreign)

    def _poll_foreign(self) -> None:
        self._foreign_timer = None
        self._look_for_foreign()

    # -- the cycle -------------------------------------------------------------------------------

    def _start(self, name: str, reason: str) -> None:
        loop = self._loop
        if loop is None:  # triggers come from udev, timers and D-Bus, all served by run(): a bug
            raise RuntimeError(f"the backup of {name} was to start outside Agent.run")
        cycle = _Cycle(disk=name, reason=reason, started=self._clock(), started_monotonic=time.monotonic())
        self._cycle = cycle
        self._status.disk = name
        self._status.step = None
        self._status.progress = {}
        self._status.disk_left, self._status.disk_left_detail = "", ""
        log.info("starting the backup of %s (%s)", name, reason)
        # Listeners hear of the running cycle, and of this disk's last backup,
        # before they hear that it started: the first plug-in after the agent
        # started would otherwise be told as a first backup ever.
        self._refresh()
        remote = self._remotes.get(name)
        if remote is not None:
            # Told once the server answered: a server that is not there is "waiting", never a card.
            cycle.launch = loop.create_task(self._probe_then_spawn(loop, cycle, remote))
            return
        passphrases = self._options.passphrases
        if passphrases is None or not passphrases.needed(name):
            self._announce(cycle)  # else once the passphrase opened the disk, or at the end: a cancel leaves no card
        self._launch(loop, cycle)

    def _launch(self, loop: asyncio.AbstractEventLoop, cycle: _Cycle) -> None:
        inhibit = self._options.inhibit
        if inhibit is None:
            self._spawn(loop, cycle)
        else:
            cycle.launch = loop.create_task(self._inhibit_then_spawn(loop, cycle, inhibit))

    async def _probe_then_spawn(
        self, loop: asyncio.AbstractEventLoop, cycle: _Cycle, remote: RemoteRepository
    ) -> None:
        """Connect to the server's port (a second or two at most); start the cycle only when it answered."""
        host, port = servers.address(remote)
        why = await servers.unreachable(host, port, reach.PROBE_TIMEOUT)
        if cycle is not self._cycle:  # the agent shut down meanwhile
            return
        if cycle.stop_requested:
            cycle.skipped = "stopped before it started"
            self._finish(cycle, None, None)
            return
        if why is not None:
            cycle.unreachable = why
            self._finish(cycle, None, None)
            return
        self._announce(cycle)
        self._launch(loop, cycle)

    async def _inhibit_then_spawn(
        self, loop: asyncio.AbstractEventLoop, cycle: _Cycle, inhibit: Callable[[], Awaitable[Releasable | None]]
    ) -> None:
        try:
            cycle.inhibitor = await inhibit()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("could not take the sleep inhibitor; backing up without it")
        if cycle is not self._cycle:  # the agent shut down meanwhile
            self._release_inhibitor(cycle)
            return
        self._spawn(loop, cycle)

    def _spawn(self, loop: asyncio.AbstractEventLoop, cycle: _Cycle) -> None:
        if cycle.stop_requested:
            self._finish(cycle, None, "stopped before it started")
            return
        passphrases = self._options.passphrases
        if passphrases is not None and cycle.given is None and passphrases.needed(cycle.disk):
            cycle.launch = loop.create_task(self._ask_then_spawn(loop, cycle, passphrases))
            return
        argv = [*self._options.cycle_argv, *destination_args(cycle.disk, remote=cycle.disk in self._remotes)]
        if cycle.given is not None:
            argv.append("--passphrase-stdin")

        def on_line(stream: str, line: str) -> None:
            if stream == "stdout":
                self._on_stdout(cycle, line)
            else:
                self._on_stderr(cycle, line)

        process = ChildProcess(loop, on_line, lambda: self._exited(cycle))
        try:
            process.start(argv, stdin=cycle.given.secret if cycle.given is not None else None)
        except OSError as exc:
            self._finish(cycle, None, f"could not start the backup cycle ({argv[0]}): {exc.strerror or exc}")
            return
        cycle.process = process
        self._refresh()

    def _announce(self, cycle: _Cycle) -> None:
        if not cycle.announced:
            cycle.announced = True
            self._tell("backup_started", cycle.disk, cycle.reason)

    async def _ask_then_spawn(self, loop: asyncio.AbstractEventLoop, cycle: _Cycle, passphrases: Passphrases) -> None:
        """Get the disk's passphrase (the keyring, else pinentry), then start the cycle with it; a cancel skips the backup."""
        cycle.asking = True
        try:
            given = await passphrases.ask(
                cycle.disk, "backup", wrong=cycle.wrong, forgotten=cycle.forgotten, remember=cycle.remember
            )
        except PromptUnavailable as exc:
            if cycle is self._cycle:
                self._finish(cycle, None, f"cannot ask for the passphrase of {cycle.disk}: {exc}")
            return
        finally:
            cycle.asking = False
        if cycle is not self._cycle:  # the agent shut down meanwhile
            if given is not None:
                given.wipe()
            return
        if given is None:
            cycle.skipped = "the passphrase prompt was cancelled"
            self._finish(cycle, None, None)
            return
        cycle.given, cycle.remember = given, given.remember
        self._spawn(loop, cycle)

    def _passphrase_again(self, cycle: _Cycle, returncode: int | None) -> bool | str:
        """At the cycle's exit: True when the passphrase was wrong and is asked again (the cycle goes on);
        after the last try, the failure to tell; else False. The passphrase is wiped in any case."""
        given, cycle.given = cycle.given, None
        passphrases, loop = self._options.passphrases, self._loop
        if given is None:
            return False
        given.wipe()
        if returncode != EXIT_WRONG_PASSPHRASE or passphrases is None or loop is None or cycle.stop_requested:
            return False
        if given.remembered:
            passphrases.forget(cycle.disk)
            cycle.forgotten = True
        else:
            cycle.wrong += 1
            if cycle.wrong >= TRIES:
                return too_many_tries(cycle.disk)
        self._detach(cycle)
        cycle.process, cycle.complete, cycle.error = None, None, None
        cycle.stderr_tail.clear()
        cycle.closing.clear()
        cycle.launch = loop.create_task(self._ask_then_spawn(loop, cycle, passphrases))
        return True

    def _on_stderr(self, cycle: _Cycle, line: str) -> None:
        if not line.strip():
            return
        log.info("cycle: %s", line)
        cycle.stderr_tail.append(line)
        del cycle.stderr_tail[:-_STDERR_TAIL]

    def _on_stdout(self, cycle: _Cycle, line: str) -> None:
        if not line.strip():
            return
        try:
            event = events.decode(line)
        except events.ProtocolVersionError as exc:
            if not cycle.protocol_refused:
                log.error("backup of %s: %s", cycle.disk, exc)
                cycle.protocol_refused = True
            return
        except ValueError as exc:
            log.warning("the backup cycle wrote a line that is not an event (%s): %.200s", exc, line)
            return
        if isinstance(event, events.StepEvent):
            if event.step in ("unmount", "lock-disk") and event.state in ("done", "left-as-found", "failed"):
                cycle.closing[event.step] = event.state
            if event.step == "unlock" and event.state == "done" and cycle.given is not None and self._options.passphrases:
                given, cycle.given = cycle.given, None
                if event.detail.get("unlocked_now") is True:  # it opened the disk: remembered if asked, then wiped
                    self._options.passphrases.opened(cycle.disk, given)
                else:  # found unlocked: the passphrase proved nothing
                    given.wipe()
                self._announce(cycle)
            if event.step == "offsite" and event.state in ("done", "failed", "skipped"):
                self._offsite_finished(event)
            elif event.step.startswith("offsite-") and event.state in ("done", "failed", "skipped"):
                self._offsite_maintained(event)
            self._status.step = event.step
            self._refresh()
        elif isinstance(event, events.ProgressEvent):
            progress: dict[str, Any] = event.fields()
            progress["elapsed"] = round(time.monotonic() - cycle.started_monotonic, 3)
            self._status.progress = progress
            self._tell("progress", event)
        elif isinstance(event, events.WarningEvent):
            log.warning("backup of %s: %s", cycle.disk, event.message)
            if event.step == "lock-disk":
                cycle.lock_warning = event.message
        elif isinstance(event, events.CompleteEvent):
            cycle.complete = event
            if not event.skipped:
                self._tell("backup_completed", event)
        else:
            cycle.error = event
            step = event.step
            message = event.message or "the backup failed"
            exit_code = event.exit_code
            if exit_code == EXIT_BUSY and step == "lock":
                # Maybe another cycle took the machine lock first: that is a
                # wait, not a failure; _finish decides once the cycle has ended.
                return
            if exit_code == EXIT_WRONG_PASSPHRASE:
                return  # asked again, or told after the last try (_finish)
            if exit_code == EXIT_UNREACHABLE and cycle.disk in self._remotes:
                return  # the server went away after it answered: waiting, not a failure (_finish)
            if cycle.stop_requested:
                log.info("backup of %s: %s (stopped as asked)", cycle.disk, message)
                return
            self._tell("backup_failed", step, message, exit_code)

    def _exited(self, cycle: _Cycle) -> None:
        """The cycle's process ended: read what it left in the pipes, then conclude."""
        process = cycle.process
        if cycle.finished or cycle is not self._cycle or process is None:
            return
        process.drain()
        self._finish(cycle, process.returncode, None)

    def _detach(self, cycle: _Cycle) -> None:
        """Stop reading the cycle (it keeps running if it still runs)."""
        if cycle.process is not None:
            cycle.process.detach()

    def _finish(self, cycle: _Cycle, returncode: int | None, failure: str | None) -> None:
        """Conclude a cycle: the schedule, the record, the state file, listeners, the next decision."""
        again = self._passphrase_again(cycle, returncode)
        if again is True:
            return
        if isinstance(again, str):
            cycle.error, failure = None, again
        cycle.finished = True
        self._last_returncode = returncode
        self._detach(cycle)
        self._release_inhibitor(cycle)
        self._cycle = None
        name = cycle.disk
        complete, error = cycle.complete, cycle.error
        record = self._records[name]
        busy = (
            returncode == EXIT_BUSY
            and error is not None
            and error.step == "lock"
        )
        if busy:
            self._look_for_foreign()
        if cycle.unreachable is None and name in self._remotes and not cycle.stop_requested and (
            returncode == EXIT_UNREACHABLE and error is not None
        ):
            cycle.unreachable = error.message or "the server cannot be reached"
        if cycle.unreachable is not None:
            # Not there: no failure, no card; "waiting for NAME", looked for again later (agent.policy.reach).
            log.info("%s cannot be reached (%s): waiting for it", name, cycle.unreachable)
            self._status.step = None
            self._status.progress = {}
            self._do(agenda.Finished(name, "unreachable", why=cycle.unreachable))
            return
        if cycle.skipped is not None:
            # Not run, and not a failure: no card; the next try comes after an interval.
            log.info("the backup of %s was skipped: %s", name, cycle.skipped)
            self._status.step = None
            self._status.progress = {}
            self._do(agenda.Finished(name, "skipped"))
            return
        if busy and self._foreign is not None:
            # Someone else's cycle took the machine lock first: not a failure
            # of this disk; its trigger waits for that cycle (the agenda holds it).
            log.info("the backup of %s did not start: %s", name, error.message if error else "busy")
            self._status.step = None
            self._status.progress = {}
            self._do(agenda.Finished(name, "busy"))
            return
        self._announce(cycle)  # a passphrase disk's backup that ended before its disk opened: told now
        succeeded = complete is not None and not complete.skipped and returncode in (EXIT_OK, EXIT_PARTIAL)
        taken: float | None = None
        if complete is not None and succeeded:
            snapshot = complete.snapshot
            # The snapshot is named after the cycle's start: the moment the
            # agent started it, on the agent's own clock.
            taken = cycle.started
            partial = returncode == EXIT_PARTIAL or complete.partial
            result: Result = "partial" if partial else "success"
            message = f"snapshot {snapshot}" + (" (partial: some files could not be read)" if partial else "")
            record = dataclasses.replace(
                record,
                last_result=result,
                last_message=message,
                last_snapshot=snapshot if snapshot is not None else record.last_snapshot,
            )
            log.info("backup of %s done: %s", name, message)
        elif cycle.stop_requested:
            # Asked for: not a failure. What was copied so far stays as the
            # unfinished transfer the next run carries on with.
            message = "as asked; the next backup carries on from where this one stopped"
            running = self._agenda.running
            if running is not None and running.disk == name and running.postponed_at is not None:
                later = dt.datetime.fromtimestamp(running.postponed_at + self._agenda.policy_for(name).interval)
                message = f"not now, as asked; the next backup at {later:%H:%M} carries on from where this one stopped"
            record = dataclasses.replace(record, last_result="stopped", last_message=message)
            log.info("backup of %s stopped as asked", name)
        else:
            if error is not None:
                message = error.message or "the backup failed"
            elif failure is not None:
                message = failure
            elif complete is not None and complete.skipped:
                message = f"nothing done: {complete.skipped}"
            elif returncode is None:  # whoever ends a cycle that did not run gives the failure
                message = "the backup cycle did not run"
            else:
                message = f"the backup cycle {_exit_description(returncode)}"
                if cycle.stderr_tail:
                    message += f": {cycle.stderr_tail[-1]}"
            if error is None:
                self._tell("backup_failed", self._status.step, message, returncode)
            elif busy:  # held back in _on_stdout: no other cycle explains it after all
                self._tell("backup_failed", "lock", message, EXIT_BUSY)
            record = dataclasses.replace(record, last_result="failure", last_message=message)
            log.warning("backup of %s failed: %s", name, message)
        self._records[name] = record
        self._status.step = None
        self._status.progress = {}
        self._status.disk = name
        self._status.disk_left = disk_left(cycle.closing) if name not in self._remotes else ""
        self._status.disk_left_detail = {
            "mounted": next((d.mount_point for d in self._settings.disks if d.name == name), ""),
            "lock-failed": cycle.lock_warning,
        }.get(self._status.disk_left, "")
        self._do(agenda.Finished(name, "success" if succeeded else "failure", snapshot_time=taken))
        self._keep_agenda()
        self._save()

    def _release_inhibitor(self, cycle: _Cycle) -> None:
        held, cycle.inhibitor = cycle.inhibitor, None
        if held is None:
            return
        try:
            held.close()
        except Exception:
            log.exception("releasing the sleep inhibitor failed")

    def _save(self) -> None:
        try:
            save_state(self._options.state_file, {**self._other_records, **self._records}, self._status)
        except OSError as exc:
            log.warning("could not save the agent's state to %s: %s", self._options.state_file, exc)

    # -- status and listeners ---------------------------------------------------------------------

    def _refresh(self, *, publish: bool = True) -> None:
        """Recompute the derived fields; tell listeners (and systemd) when anything but progress changed."""
        status = self._status
        attached = self.attached()
        running = self._cycle is not None or self._foreign is not None
        if self._cycle is not None:
            status.cycle_pid = self.cycle_pid
        elif self._foreign is not None:
            status.cycle_pid = self._foreign.pid
        else:
            status.cycle_pid = None
        if status.disk is None and attached:
            status.disk = attached[0]
        record = self._records.get(status.disk) if status.disk is not None else None
        if record is not None:
            status.last_success = record.last_success
            status.last_result = record.last_result
            status.last_message = record.last_message
        status.disks = [self._disk_status(name, running) for name in self._names]
        dues = [disk.next_due for disk in status.disks if disk.next_due is not None]
        status.next_due = min(dues) if dues else None
        status.skipped = next((disk.skipped for disk in status.disks if disk.name == status.disk), "")
        if not running:
            status.step = None
            status.progress = {}
        if running:
            status.state = "running"
        elif status.last_result == "failure":
            status.state = "failed"
        elif attached:
            status.state = "disk-attached"
        else:
            status.state = "idle"
        if not publish:
            return
        comparable = dataclasses.replace(status, progress={}, disks=list(status.disks))
        if comparable == self._published:
            return
        self._published = comparable
        self._tell("status_changed", self._copy(status))
        self._notify_status()

    def _disk_status(self, name: str, running: bool) -> DiskStatus:
        entry = self._agenda.disk(name)
        record = self._records[name]
        attached = entry.state.attached
        due = entry.next_due if attached and not entry.ejected and not running else None
        skipped = entry.skipped.text if entry.skipped is not None and due is not None else ""
        if entry.skipped is not None and due is not None:
            due = entry.skipped.until  # the end of quiet hours; an event ends the others
        waiting = ""
        if name in self._remotes:
            if not attached:
                waiting = reach.offline_text(name)
            elif entry.waiting is not None:
                waiting = reach.waiting_text(name, entry.waiting)
                attached = False
        return DiskStatus(
            name=name,
            attached=attached,
            ejected=entry.ejected,
            last_success=entry.state.last_success,
            last_result=record.last_result,
            last_message=record.last_message,
            next_due=due,
            unfinished=entry.state.unfinished,
            skipped=skipped,
            remote=name in self._remotes,
            waiting=waiting,
            last_failure=entry.state.last_failure,
        )

    def _notify_status(self) -> None:
        text = self._status_line()
        if text != self._last_notified:
            self._last_notified = text
            self._notifier.send(f"STATUS={text}")

    def _status_line(self) -> str:
        status = self._status
        if status.state == "running":
            if self._foreign is not None and self._cycle is None:
                return f"a backup started elsewhere is running ({self._foreign.description})"
            return f"backing up to {status.disk}" + (f": {status.step}" if status.step else "")
        if status.state == "failed":
            return f"the last backup failed: {status.last_message}"
        if status.state == "disk-attached" and status.skipped:
            return f"{status.disk} attached; the backup waits: {status.skipped}"
        if status.state == "disk-attached":
            due = status.next_due
            when = dt.datetime.fromtimestamp(due).strftime("%H:%M") if due is not None else "?"
            return f"{status.disk} attached; next backup at {when}"
        return "waiting for a backup disk"

    def _offsite_maintained(self, event: events.StepEvent) -> None:
        """forget, prune or check ended: the record says so (``status``: pruning is the server owner's, the last check)."""
        records = self._status.offsite
        for index, record in enumerate(records):
            if record.name == event.detail.get("offsite"):
                records[index] = offsite_maintained(record, event.step, event.state, event.detail)
                self._save()
                self._refresh()

    def _offsite_finished(self, event: events.StepEvent) -> None:
        """An off-site copy ended: its record in the status (saved with it), then the listeners that hear of it."""
        name = event.detail.get("offsite")
        records = self._status.offsite
        index = next((i for i, record in enumerate(records) if record.name == name), None)
        if index is None:
            return
        records[index] = offsite_after(records[index], event.state, event.detail, self._clock())
        self._save()
        self._refresh()
        for listener in list(self._listeners):
            if isinstance(listener, OffsiteListener):
                try:
                    listener.offsite_finished(dataclasses.replace(records[index]), event.state)
                except Exception:
                    log.exception("listener %r failed in offsite_finished", listener)

    @staticmethod
    def _copy(status: AgentStatus) -> AgentStatus:
        return dataclasses.replace(
            status,
            progress=dict(status.progress),
            disks=[dataclasses.replace(disk) for disk in status.disks],
            offsite=[dataclasses.replace(record) for record in status.offsite],
        )

    def _tell(self, method: str, *args: Any) -> None:
        for listener in list(self._listeners):
            try:
                getattr(listener, method)(*args)
            except Exception:
                log.exception("listener %r failed in %s", listener, method)


def rules_of(settings: Settings) -> conditions.Rules:
    """The configuration's ``[conditions]`` as the agenda's rules."""
    return conditions.Rules(settings.battery_below, settings.skip_metered, settings.quiet_hours)


def remote_destinations(settings: Settings) -> tuple[str, ...]:
    """The configured backups whose destination is remote, which a metered connection holds back.

    Every ``[[remote]]`` but those that allow a metered connection (``metered = true``)
    (docs/ARCHITECTURE.md, "Moments not to back up", "Remote destinations").
    """
    return tuple(remote.name for remote in settings.remotes if not remote.metered)


def own_policies(settings: Settings, policy: schedule.Policy) -> dict[str, schedule.Policy]:
    """The schedules of the destinations that have their own: each ``[[remote]]`` with an ``interval``."""
    return {
        remote.name: dataclasses.replace(policy, interval=float(remote.interval))
        for remote in settings.remotes
        if remote.interval is not None
    }


def destination_args(name: str, *, remote: bool) -> tuple[str, str]:
    """What follows ``backup --json`` for one destination: the exact words of a sudo rule's form (pure)."""
    return ("--remote", name) if remote else ("--disk", name)


def offsite_records(settings: Settings, saved: Any) -> list[OffsiteStatus]:
    """One record per configured [[offsite]], in order, carrying what the saved status knew of it (pure)."""
    found = [offsite_from(item) for item in saved] if isinstance(saved, list) else []
    known = {record.name: record for record in found if record is not None}
    return [known.get(site.name, OffsiteStatus(site.name)) for site in settings.offsite]


# -- eject ----------------------------------------------------------------------------------------------


def _outcome(stdout: Sequence[str]) -> tuple[events.CompleteEvent | None, events.ErrorEvent | None]:
    """The last complete and error events among a command's lines; other lines are passed over."""
    done: events.CompleteEvent | None = None
    error: events.ErrorEvent | None = None
    for line in stdout:
        with contextlib.suppress(ValueError):
            event = events.decode(line)
            if isinstance(event, events.CompleteEvent):
                done = event
            elif isinstance(event, events.ErrorEvent):
                error = event
    return done, error


def eject_reply(disk: str, returncode: int, stdout: Sequence[str], stderr: Sequence[str], *, through_sudo: bool) -> EjectReply:
    """What ``backup-agent eject --json`` ended with (pure): its exit status, events and last error line."""
    done, error = _outcome(stdout)
    said = [line.strip() for line in stderr if line.strip()]
    if error is not None and error.message:
        message = error.message
    elif said:
        message = said[-1].removeprefix("backup-agent: ")
    else:
        message = f"the eject {_exit_description(returncode)}"
    if returncode == EXIT_OK and done is not None:
        if done.already_closed:
            return EjectReply("already", f"{disk} is locked and not mounted: already safe to unplug")
        return EjectReply("ejected", f"{disk} is unmounted and locked: safe to unplug")
    if through_sudo and error is None and any("password is required" in line for line in said):
        return EjectReply(
            "failed",
            "the sudo rule does not allow ejecting yet: run sudo backup-agent install again "
            "(it adds `eject --json --disk NAME` for each disk)",
        )
    if returncode == EXIT_BUSY:
        return EjectReply("refused", message)
    if returncode == EXIT_DISK_BUSY:
        return EjectReply("busy", message)
    return EjectReply("failed", message)


def browse_reply(
    disk: str, returncode: int, stdout: Sequence[str], stderr: Sequence[str], *, through_sudo: bool
) -> BrowseReply:
    """What ``backup-agent open --json`` ended with (pure): its exit status, events and last error line."""
    done, error = _outcome(stdout)
    said = [line.strip() for line in stderr if line.strip()]
    if error is not None and error.message:
        message = error.message
    elif said:
        message = said[-1].removeprefix("backup-agent: ")
    else:
        message = f"opening the disk {_exit_description(returncode)}"
    if returncode == EXIT_OK and done is not None:
        folder = done.snapshots
        if done.already_open:
            return BrowseReply("already", f"{disk} is open already", folder)
        return BrowseReply("opened", f"{disk} is open for browsing, read-only", folder)
    if through_sudo and error is None and any("password is required" in line for line in said):
        return BrowseReply(
            "failed",
            "the sudo rule does not allow opening the disk yet: run sudo backup-agent install again "
            "(it adds `open --json --disk NAME` for each disk)",
        )
    if returncode == EXIT_BUSY:
        return BrowseReply("refused", message)
    return BrowseReply("failed", message)


# -- backup-agent run --------------------------------------------------------------------------------


def _this_executable(argv0: str) -> str:
    """The absolute path of this backup-agent executable (what the sudo rule names)."""
    name = os.path.basename(argv0)
    if argv0 and name not in ("cli.py", "__main__.py", "-c", "-m") and not name.endswith(".py"):
        return os.path.abspath(argv0)
    found = shutil.which("backup-agent")
    if found is None:
        raise UsageError(
            "cannot tell which backup-agent executable the sudo rule allows: run the installed backup-agent, "
            "or pass --no-sudo"
        )
    return os.path.abspath(found)


def cycle_argv_for(*, config: str | None, no_sudo: bool, argv0: str, command: str = "backup") -> tuple[str, ...]:
    """How ``backup-agent run`` starts the cycle, or with ``command="eject"`` an eject (pure but for the executable lookup).

    Through sudo (a user's agent): ``sudo -n EXECUTABLE backup --json``, the
    form the sudoers rule allows; the cycle reads only the system config.
    Without sudo (``--no-sudo``, or the agent runs as root): this Python
    runs ``-m agent.cli backup --json`` with the agent's own ``--config``
    (and ``--no-sudo`` as a user; eject has none: it needs root).
    """
    if no_sudo or os.geteuid() == 0:
        argv: tuple[str, ...] = (sys.executable, "-m", "agent.cli", command, "--json")
        if os.geteuid() != 0 and command == "backup":
            argv += ("--no-sudo",)
        if config is not None:
            argv += ("--config", os.path.abspath(config))
        return argv
    return (shutil.which("sudo") or "/usr/bin/sudo", "-n", _this_executable(argv0), command, "--json")


def main(*, config: str | None, no_sudo: bool, argv0: str, notifications: bool = True) -> int:
    """``backup-agent run``: the agent until SIGTERM or SIGINT (``notifications=False``: none, whatever the config says)."""
    from agent.config.load import SYSTEM_CONFIG, load_settings

    settings = load_settings(config, through_sudo=False)
    argv = cycle_argv_for(config=config, no_sudo=no_sudo, argv0=argv0)
    if _through_sudo(argv) and config is not None and os.path.abspath(config) != SYSTEM_CONFIG:
        log.warning(
            "--config %s tells the agent which disks to watch; the cycle, through sudo, reads only %s",
            config,
            SYSTEM_CONFIG,
        )
    async def serve() -> None:
        """The agent with its adapters; each one opened registers its closing at once, so a failing
        start of a later one (the tray, the notifier) still closes what was opened before it."""
        # dbus_fast is imported here, not at the top: the cycle (which runs
        # as root through sudo) never loads it.
        from agent.desktop.dbus import control, jobview, launcher, logind, networkmanager, notify, notray, secrets, tray, upower

        async with contextlib.AsyncExitStack() as stack:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, stop.set)
                stack.callback(loop.remove_signal_handler, signum)
            system = await logind.system_bus()
            if system is not None:
                stack.callback(system.disconnect)

            async def inhibit() -> Releasable | None:
                return await logind.inhibit(system, "backup-agent", "a backup is being written to the backup disk")

            policy = schedule.Policy(interval=float(settings.interval), on_plug=settings.on_plug)  # rules: rules_of()
            program = pinentry.choose(os.environ, shutil.which)
            if program is None:
                log.info("no pinentry fits this session: a disk without a key file must be unlocked by hand")
            passphrases = Passphrases(settings, pinentry.Pinentry(program) if program else None, None)
            options = AgentOptions(
                cycle_argv=argv,
                policy=policy,
                inhibit=inhibit if system is not None else None,
                eject_argv=cycle_argv_for(config=config, no_sudo=no_sudo, argv0=argv0, command="eject"),
                open_argv=cycle_argv_for(config=config, no_sudo=no_sudo, argv0=argv0, command="open"),
                passphrases=passphrases,
            )
            agent = Agent(settings, options)
            service = await control.serve(agent)
            if service is not None:
                stack.callback(service.close)
                agent.add_listener(service.listener)
                passphrases.keyring = secrets.SecretService(service.bus)  # offered only with a session bus
            notifier = None
            if settings.notifications and notifications:
                notifier = await notify.start(
                    service.bus if service is not None else None, agent, disks=agent, settings=settings,
                    state_path=notice_state_path(options.state_file),
                )
                stack.callback(notifier.close)
                agent.add_listener(notifier)
            else:
                log.info("desktop notifications are turned off")
            if settings.tray and service is not None:
                icon = await tray.start(service.bus, agent, settings, stop.set)  # its Quit is SIGTERM's stop
                if icon is not None:
                    stack.callback(icon.close)
                    agent.add_listener(icon)
            # Progress where the desktop shows it (docs/ARCHITECTURE.md, "Progress where each desktop shows it").
            if service is not None:
                jobs = jobview.JobViews(service.bus, agent)
                stack.callback(jobs.close)
                agent.add_listener(jobs)
                if notifier is not None:
                    notifier.progress_elsewhere = lambda: jobs.active
                dock = launcher.start(service.bus)
                if dock is not None:
                    stack.callback(dock.close)
                    agent.add_listener(dock.entry)
                await notray.tell_if_no_tray(service.bus)
            # Moments not to back up: the battery and the connection, as they change.
            power = await upower.watch_power(system, agent.on_power)
            if power is not None:
                stack.callback(power.close)
            network = await networkmanager.watch_network(
                system, lambda state: agent.on_network(state.metered, state.connectivity != "none")
            )
            if network is not None:
                stack.callback(network.close)
            sleep_watch = await logind.watch_sleep(system, agent.on_resumed)
            if sleep_watch is not None:
                stack.callback(sleep_watch.close)
            if notifier is not None:
                # Runs once agent.run below has read the disks present (it does so
                # before its first await): the login's reminders and missed failures.
                loop.call_soon(notifier.login)
            await agent.run(stop)

    asyncio.run(serve())
    return EXIT_OK


__all__ = [
    "Agent",
    "AgentOptions",
    "ROOT_CYCLE_LOCK",
    "cycle_argv_for",
    "cycle_lock_path",
    "eject_reply",
    "main",
]
