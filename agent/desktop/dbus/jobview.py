"""The running backup as a KDE job: Plasma shows it where it shows file copies.

Plasma's job progress service is the bus name ``org.kde.JobViewServer`` at
``/JobViewServer``. Its ``org.kde.JobViewServer.requestView(appName,
appIconName, capabilities)`` gives an object path that speaks
``org.kde.JobViewV2``: ``setPercent``, ``setSpeed``, ``setProcessedAmount``,
``setInfoMessage``, ``setDescriptionField`` and ``terminate``; its
``cancelRequested`` signal is the user's click on the job's cancel button,
which the view offers because the capabilities say Killable. That click is
the agent's Stop (a stop, never a failure). The server's
``org.kde.JobViewServerV2`` form (a desktop entry, hints, and a
``JobViewV3`` with one ``update(a{sv})``) is not used: every Plasma that
offers it offers this one too.

:class:`JobViews` is a :class:`~agent.desktop.state.Listener`. Whether a
job server is there is asked when a backup starts (one may come and go with
the desktop), so the choice is made at run time by what the session bus
offers; :attr:`JobViews.active` tells the notifier that a job view shows the
progress now, so it sends no progress cards of its own. Every call is queued
and sent by one task; a failure is logged once and never stops a backup.
See ``docs/ARCHITECTURE.md``, "Progress where each desktop shows it".
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Callable, Union

from dbus_fast import Message, MessageFlag, MessageType
from dbus_fast.aio import MessageBus

from agent.core.events import CompleteEvent, ProgressEvent
from agent.desktop.dbus import driver_call
from agent.desktop.dbus.bus import call, checked, match_rule, send
from agent.desktop.dbus.texts import step_words
from agent.engine.cycle import human_size
from agent.desktop.state import AgentStatus, Controller, Listener

log = logging.getLogger(__name__)

JOB_SERVER_NAME = "org.kde.JobViewServer"
JOB_SERVER_PATH = "/JobViewServer"
JOB_SERVER_INTERFACE = "org.kde.JobViewServer"
JOB_VIEW_INTERFACE = "org.kde.JobViewV2"
KILLABLE = 1  # KJob::Killable: the view shows a cancel button (our Stop)
APP_NAME = "Backups"
APP_ICON = "drive-harddisk"
PROGRESS_INTERVAL = 1.0  # seconds between two progress updates, at least


@dataclass(frozen=True)
class JobCall:
    """One method call on the job's view (``org.kde.JobViewV2``)."""

    member: str
    signature: str
    body: tuple[Any, ...]


# -- what to say (pure) ------------------------------------------------------------------


def started_calls(disk: str) -> tuple[JobCall, ...]:
    """A new job: where it goes, and that it starts."""
    return (
        JobCall("setInfoMessage", "s", (f"Backing up to {disk}",)),
        JobCall("setDescriptionField", "uss", (0, "Destination", disk)),
    )


def step_calls(disk: str, step: str | None) -> tuple[JobCall, ...]:
    """A new step of the cycle (unlocking, copying files, locking)."""
    words = step_words(step)
    return (JobCall("setInfoMessage", "s", (f"Backing up to {disk}: {words}",)),)


def progress_calls(event: ProgressEvent) -> tuple[JobCall, ...]:
    """The transfer's progress: percent, speed, and what was copied so far."""
    calls: list[JobCall] = []
    if event.percent is not None:
        calls.append(JobCall("setPercent", "u", (int(min(100.0, max(0.0, event.percent))),)))
    if event.rate is not None and event.rate >= 0:
        calls.append(JobCall("setSpeed", "t", (int(event.rate),)))
    calls += [
        JobCall("setProcessedAmount", "ts", (max(0, event.bytes), "bytes")),
        JobCall("setProcessedAmount", "ts", (max(0, event.files), "files")),
        JobCall("setDescriptionField", "uss", (1, "Copied", f"{event.files} files, {human_size(event.bytes)}")),
    ]
    return tuple(calls)


def ended_calls(error: str) -> tuple[JobCall, ...]:
    """The job is over: ``error`` empty for a success or a stop, else what failed."""
    return (JobCall("terminate", "s", (error,)),)


# -- the listener --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Open:
    disk: str


@dataclass(frozen=True)
class _Calls:
    calls: tuple[JobCall, ...]


@dataclass(frozen=True)
class _End:
    error: str


_Item = Union[_Open, _Calls, _End]


class JobViews:
    """One KDE job per backup cycle, while a job server is on the session bus."""

    def __init__(self, bus: MessageBus, controller: Controller | None = None, *,
                 clock: Callable[[], float] | None = None) -> None:
        self.bus = bus
        self._controller = controller
        self._clock = clock or (lambda: asyncio.get_running_loop().time())
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._view: str | None = None  # the object path of this cycle's job, once the server gave one
        self._rule: str | None = None
        self._disk: str | None = None
        self._step: str | None = None
        self._last_progress: float | None = None
        self._running = False
        self._warned = False
        self._closed = False
        bus.add_message_handler(self._on_message)

    @property
    def active(self) -> bool:
        """A job view shows this cycle's progress now (the notifier leaves progress to it)."""
        return self._view is not None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.bus.remove_message_handler(self._on_message)
        if self._worker is not None:
            self._worker.cancel()

    # -- Listener -------------------------------------------------------------------------

    def status_changed(self, status: AgentStatus) -> None:
        if status.state == "running":
            if status.step != self._step and self._disk is not None:
                self._step = status.step
                self._put(_Calls(step_calls(self._disk, status.step)))
            return
        if self._running:  # ended without a word (a stop, a cycle that did not run): over, no error
            self._running = False
            self._put(_End(""))

    def disk_attached(self, disk: str) -> None:
        return None

    def disk_removed(self, disk: str, during_backup: bool) -> None:
        if during_backup and self._running:
            self._running = False
            self._put(_End(f"{disk} was unplugged during the backup"))

    def disk_opened(self, disk: str) -> None:
        return None

    def backup_started(self, disk: str, reason: str) -> None:
        self._disk, self._step, self._last_progress = disk, None, None
        self._running = True
        self._put(_Open(disk))

    def progress(self, event: ProgressEvent) -> None:
        if not self._running:
            return
        now = self._clock()
        if self._last_progress is not None and now - self._last_progress < PROGRESS_INTERVAL:
            return
        self._last_progress = now
        self._put(_Calls(progress_calls(event)))

    def backup_completed(self, event: CompleteEvent) -> None:
        if self._running:
            self._put(_Calls((JobCall("setPercent", "u", (100,)),)))

    def backup_failed(self, step: str | None, message: str, exit_code: int | None = None) -> None:
        if self._running:
            self._running = False
            self._put(_End(message or "the backup failed"))

    # -- sending -------------------------------------------------------------------------------

    def _put(self, item: _Item) -> None:
        if self._closed:
            return
        if self._worker is None or self._worker.done():
            try:
                self._worker = asyncio.get_running_loop().create_task(self._work())
            except RuntimeError:
                return
        self._queue.put_nowait(item)

    async def flush(self) -> None:
        """Wait until everything queued so far has been sent (or failed)."""
        if self._worker is not None and not self._worker.done():
            await self._queue.join()

    async def _work(self) -> None:
        while True:
            item = await self._queue.get()
            try:
                await self._carry(item)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self._warned:
                    self._warned = True
                    log.warning("cannot show the backup as a KDE job (%s); it goes on without", exc)
                else:
                    log.debug("job view: %s", exc)
            finally:
                self._queue.task_done()

    async def _carry(self, item: _Item) -> None:
        if isinstance(item, _Open):
            await self._end("")  # a job left over from a cycle whose end was not heard
            await self._open()
        elif isinstance(item, _Calls):
            for job_call in item.calls:
                await self._call(job_call)
        else:
            await self._end(item.error)

    async def _open(self) -> None:
        owner = await send(self.bus, driver_call("NameHasOwner", "s", [JOB_SERVER_NAME]))
        if owner.message_type is not MessageType.METHOD_RETURN or owner.body != [True]:
            log.debug("no KDE job server on the session bus: progress goes to notifications")
            return
        reply = checked(await call(self.bus, JOB_SERVER_NAME, JOB_SERVER_PATH, JOB_SERVER_INTERFACE, "requestView",
                                   "ssi", [APP_NAME, APP_ICON, KILLABLE]), "requestView")
        path = str(reply.body[0])
        rule = match_rule(path=path, interface=JOB_VIEW_INTERFACE, member="cancelRequested")
        checked(await send(self.bus, driver_call("AddMatch", "s", [rule])), "AddMatch")
        self._view, self._rule = path, rule
        if self._warned:
            log.info("the backup shows as a KDE job again")
            self._warned = False
        for job_call in started_calls(self._disk or "the backup disk"):
            await self._call(job_call)

    async def _call(self, job_call: JobCall) -> None:
        if self._view is None:
            return
        if job_call.member == "setDescriptionField":  # the one method with a reply
            checked(await call(self.bus, JOB_SERVER_NAME, self._view, JOB_VIEW_INTERFACE, job_call.member,
                               job_call.signature, list(job_call.body)), job_call.member)
            return
        await self.bus.send(Message(destination=JOB_SERVER_NAME, path=self._view, interface=JOB_VIEW_INTERFACE,
                                    member=job_call.member, signature=job_call.signature, body=list(job_call.body),
                                    flags=MessageFlag.NO_REPLY_EXPECTED))

    async def _end(self, error: str) -> None:
        if self._view is None:
            return
        try:
            for job_call in ended_calls(error):
                await self._call(job_call)
        finally:
            rule, self._view, self._rule = self._rule, None, None
            if rule is not None and self.bus.connected:
                self.bus.send(driver_call("RemoveMatch", "s", [rule], no_reply=True))

    def _on_message(self, message: Message) -> None:
        if (
            message.message_type is not MessageType.SIGNAL
            or message.interface != JOB_VIEW_INTERFACE
            or message.member != "cancelRequested"
            or self._view is None
            or message.path != self._view
        ):
            return
        log.info("the KDE job's cancel button: stopping the backup")
        if self._controller is None:
            return
        try:
            log.info("stop from the job view: %s", self._controller.stop())
        except Exception:
            log.exception("stopping the backup from the job view failed")


def _listener(views: JobViews) -> Listener:
    return views  # mypy checks here that JobViews is a Listener


__all__ = [
    "APP_NAME", "JOB_SERVER_NAME", "JOB_SERVER_PATH", "JOB_VIEW_INTERFACE", "JobCall", "JobViews", "KILLABLE",
    "ended_calls", "progress_calls", "started_calls", "step_calls",
]
