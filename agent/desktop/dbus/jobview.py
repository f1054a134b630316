"""The running backup as a KDE job: Plasma shows it where it shows file copies.

Plasma's job progress service is the bus name ``org.kde.JobViewServer`` at
``/JobViewServer``. Its ``org.kde.JobViewServer.requestView(appName,
appIconName, capabilities)`` gives an object path that speaks
``org.kde.JobViewV2``: ``setPercent``, ``setSpeed``, ``setProcessedAmount``,
``setInfoMessage``, ``setDescriptionField`` and ``terminate``; its
``cancelRequested`` signal is the user's click on the job's cancel button,
which the view offers because the capabilities say Killable. That click is
the agent's Stop (a stop, never a failure).

A server that offers only ``org.kde.JobViewServerV2`` (its
``requestView(desktopEntry, capabilities, hints)`` gives a
``org.kde.JobViewV3``: one ``update(a{sv})`` with KJob's keys, and
``terminate(errorCode, errorMessage, hints)``) gets the same calls in that
form (:func:`v3_update`). The first form is preferred where both are
offered, as Plasma does: it names the application and its icon itself,
where the second looks them up in the desktop entry ``backup-agent
install`` writes (agent.system.install.launcher_entry).

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

from dbus_fast import Message, MessageFlag, MessageType, Variant
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
JOB_SERVER_V2_INTERFACE = "org.kde.JobViewServerV2"
JOB_VIEW_INTERFACE = "org.kde.JobViewV2"
JOB_VIEW_V3_INTERFACE = "org.kde.JobViewV3"
DESKTOP_ENTRY = "backup-agent"  # what the V2 server is told: the desktop entry install writes, backup-agent.desktop
KILLABLE = 1  # KJob::Killable: the view shows a cancel button (our Stop)
USER_DEFINED_ERROR = 100  # KJob::UserDefinedError: the job failed (0: it did not; 1 would say "cancelled")
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
    """The transfer's progress: percent, speed, and the file being copied (or, before one is named, what
    was copied so far), in the second of the two fields Plasma shows, as its own copies show the file."""
    calls: list[JobCall] = []
    if event.percent is not None:
        calls.append(JobCall("setPercent", "u", (int(min(100.0, max(0.0, event.percent))),)))
    if event.rate is not None and event.rate >= 0:
        calls.append(JobCall("setSpeed", "t", (int(event.rate),)))
    calls += [
        JobCall("setProcessedAmount", "ts", (max(0, event.bytes), "bytes")),
        JobCall("setProcessedAmount", "ts", (max(0, event.files), "files")),
    ]
    if event.current:
        calls.append(JobCall("setDescriptionField", "uss", (1, "File", event.current)))
    else:
        calls.append(JobCall("setDescriptionField", "uss", (1, "Copied", f"{event.files} files, {human_size(event.bytes)}")))
    return tuple(calls)


def ended_calls(error: str) -> tuple[JobCall, ...]:
    """The job is over: ``error`` empty for a success or a stop, else what failed."""
    return (JobCall("terminate", "s", (error,)),)


_V3_FIELDS = {0: ("descriptionLabel1", "descriptionValue1"), 1: ("descriptionLabel2", "descriptionValue2")}
_V3_AMOUNTS = {"bytes": "processedBytes", "files": "processedFiles"}


def v3_update(calls: tuple[JobCall, ...]) -> dict[str, Variant]:
    """The same calls as one ``org.kde.JobViewV3.update`` (pure; ``terminate`` is left out: it stays a call)."""
    values: dict[str, Variant] = {}
    for job_call in calls:
        member, body = job_call.member, job_call.body
        if member == "setInfoMessage":
            values["infoMessage"] = Variant("s", body[0])
        elif member == "setDescriptionField" and body[0] in _V3_FIELDS:
            label, value = _V3_FIELDS[body[0]]
            values[label], values[value] = Variant("s", body[1]), Variant("s", body[2])
        elif member == "setPercent":
            values["percent"] = Variant("u", body[0])
        elif member == "setSpeed":
            values["speed"] = Variant("t", body[0])
        elif member == "setProcessedAmount" and body[1] in _V3_AMOUNTS:
            values[_V3_AMOUNTS[body[1]]] = Variant("t", body[0])
    return values


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
        self._v3 = False  # the view speaks org.kde.JobViewV3 (a server with JobViewServerV2 only)
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
            await self._send(item.calls)
        else:
            await self._end(item.error)

    async def _open(self) -> None:
        owner = await send(self.bus, driver_call("NameHasOwner", "s", [JOB_SERVER_NAME]))
        if owner.message_type is not MessageType.METHOD_RETURN or owner.body != [True]:
            log.debug("no KDE job server on the session bus: progress goes to notifications")
            return
        offered = checked(await call(self.bus, JOB_SERVER_NAME, JOB_SERVER_PATH, "org.freedesktop.DBus.Introspectable",
                                     "Introspect"), "Introspect").body[0]
        v3 = f'"{JOB_SERVER_INTERFACE}"' not in offered and f'"{JOB_SERVER_V2_INTERFACE}"' in offered
        if v3:
            reply = checked(await call(self.bus, JOB_SERVER_NAME, JOB_SERVER_PATH, JOB_SERVER_V2_INTERFACE,
                                       "requestView", "sia{sv}",
                                       [DESKTOP_ENTRY, KILLABLE, {"immediate": Variant("b", True)}]), "requestView")
        else:
            reply = checked(await call(self.bus, JOB_SERVER_NAME, JOB_SERVER_PATH, JOB_SERVER_INTERFACE,
                                       "requestView", "ssi", [APP_NAME, APP_ICON, KILLABLE]), "requestView")
        path = str(reply.body[0])
        self._v3 = v3
        rule = match_rule(path=path, interface=self._view_interface, member="cancelRequested")
        checked(await send(self.bus, driver_call("AddMatch", "s", [rule])), "AddMatch")
        self._view, self._rule = path, rule
        if self._warned:
            log.info("the backup shows as a KDE job again")
            self._warned = False
        await self._send(started_calls(self._disk or "the backup disk"))

    async def _send(self, calls: tuple[JobCall, ...]) -> None:
        """The calls in order; to a JobViewV3 as one update."""
        if self._v3 and self._view is not None:
            values = v3_update(calls)
            if values:
                await self.bus.send(Message(destination=JOB_SERVER_NAME, path=self._view,
                                            interface=JOB_VIEW_V3_INTERFACE, member="update", signature="a{sv}",
                                            body=[values], flags=MessageFlag.NO_REPLY_EXPECTED))
            calls = tuple(job_call for job_call in calls if job_call.member == "terminate")
        for job_call in calls:
            await self._call(job_call)

    @property
    def _view_interface(self) -> str:
        return JOB_VIEW_V3_INTERFACE if self._v3 else JOB_VIEW_INTERFACE

    async def _call(self, job_call: JobCall) -> None:
        if self._view is None:
            return
        if self._v3:
            if job_call.member == "terminate":  # errorCode: KJob::UserDefinedError when it failed
                error = str(job_call.body[0])
                await self.bus.send(Message(destination=JOB_SERVER_NAME, path=self._view,
                                            interface=JOB_VIEW_V3_INTERFACE, member="terminate", signature="usa{sv}",
                                            body=[USER_DEFINED_ERROR if error else 0, error, {}],
                                            flags=MessageFlag.NO_REPLY_EXPECTED))
            else:
                await self._send((job_call,))
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
            await self._send(ended_calls(error))
        finally:
            rule, self._view, self._rule = self._rule, None, None
            if rule is not None and self.bus.connected:
                self.bus.send(driver_call("RemoveMatch", "s", [rule], no_reply=True))

    def _on_message(self, message: Message) -> None:
        if (
            message.message_type is not MessageType.SIGNAL
            or message.interface != self._view_interface
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
    "ended_calls", "progress_calls", "started_calls", "step_calls", "v3_update",
]
