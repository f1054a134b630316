"""Desktop notifications (org.freedesktop.Notifications on the session bus).

Two parts:

* the texts: pure functions from the agent's events to a :class:`Text`
  (summary, body, urgency), short and in the user's terms;
* :class:`Notifier`, a :class:`~agent.desktop.state.Listener` that shows them with
  dbus-fast: ``Notify`` with ``replaces_id`` so that one cycle is one
  notification updated in place (started → progress → completed or failed),
  progress at most once every :data:`PROGRESS_INTERVAL` seconds, actions
  ("Back up now", "Stop") only when the server advertises ``actions`` and a
  :class:`~agent.desktop.state.Controller` is given.

The listener methods only queue; one task sends, in order, so a progress
update always knows the id of the notification it replaces. A notifier never
raises into the agent and never stops a backup: a server that cannot be
reached is logged once (and again only after it worked in between).

"Safe to unplug": the cycle's ``complete`` event comes before the disk is
unmounted and locked. The completed notification first says the disk is
being locked; when :meth:`Notifier.status_changed` shows the cycle ended
without an error (an unmount failure arrives as ``backup_failed``), it is
replaced by one that says what is true, from the status's ``disk_left``:
safe to unplug only when the cycle unmounted and locked the disk; else
that it stays unlocked (and mounted) as it was found, or why it could not
be locked.

"Open backups" opens the latest snapshot with ``xdg-open``. After a normal
cycle the disk is locked and there is nothing to open, so the action is
offered only where the snapshot can be reached: the cycle left the disk
mounted as it found it, and the snapshot's directory is there for this user.

Reminders and missed failures (:mod:`agent.desktop.reminder` decides): at login
(:meth:`Notifier.login`, once the agent has read the disks present) the
cards an earlier agent left on screen that are untrue now are withdrawn
(their ids are kept in the notifications' file with the server that showed
them; :func:`agent.desktop.reminder.stale_cards` decides), the
failures no one could be told about are shown, and a disk that had no
successful backup for ``remind_after`` days gets a reminder, then once a
day while the agent runs, until the disk is seen. One timer waits for the
next one. Without a session bus the notifier still records failures, for
the next login.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import os
import time
from typing import Callable, NamedTuple, Protocol

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from agent.config.model import Settings
from agent.core.events import CompleteEvent, ProgressEvent
from agent.desktop.reminder import (
    DiskView,
    MissedFailure,
    NoticeState,
    ShownCard,
    load_notice_state,
    missed_to_show,
    plan_reminders,
    save_notice_state,
    stale_cards,
)
from agent.repository.store import SNAPSHOTS
from agent.desktop.state import AgentStatus, Controller, Listener, OffsiteStatus
from agent.desktop.dbus import driver_call, sender
from agent.desktop.dbus.actions import show_folder
from agent.desktop.dbus.bus import BusCallError, match_rule, send
from agent.desktop.dbus.sender import NOTIFICATIONS_INTERFACE, NOTIFICATIONS_PATH
from agent.desktop.dbus.texts import (  # the words, re-exported: callers and tests name them from here
    CRITICAL,
    LOW,
    NORMAL,
    Text,
    age,
    completed_text,
    day,
    duration,
    failed_text,
    failure_hint,
    missed_text,
    offsite_reminder_text,
    offsite_text,
    past,
    progress_text,
    reminder_text,
    remote_reminder_text,
    removed_text,
    skipped_text,
    started_text,
    step_words,
    stopped_text,
    waiting_text,
    when,
)

log = logging.getLogger(__name__)

SIGNAL_RULE = match_rule(interface=NOTIFICATIONS_INTERFACE, path=NOTIFICATIONS_PATH)

APP_NAME = "Backups"
PROGRESS_INTERVAL = 5.0  # seconds between two progress updates, at least

ACTION_BACKUP_NOW = "backup-now"
ACTION_STOP = "stop"
ACTION_OPEN = "open-backups"
ACTION_NOT_NOW = "not-now"  # stop, and the next try one interval later (agent.desktop.agenda.NotNow)
ACTION_LABELS: dict[str, str] = {
    ACTION_BACKUP_NOW: "Back up now", ACTION_STOP: "Stop", ACTION_OPEN: "Open backups", ACTION_NOT_NOW: "Not now",
}
REMINDER_RETRY = 3600.0  # seconds before a reminder that could not be shown is tried again

CLOSED_BY_USER = 2  # NotificationClosed's reason: dismissed by the user


# -- the notifier ---------------------------------------------------------------------------


class DiskSource(Protocol):
    """What reminders need to know of the agent (agent.desktop.daemon.Agent is one)."""

    def attached(self) -> list[str]: ...

    def last_successes(self) -> dict[str, float | None]: ...


class _Item(NamedTuple):
    slot: str  # which notification it updates: "cycle", "disk", "missed:DISK" or "reminder:DISK"
    # (an item with ``close`` set withdraws that slot's notification instead)
    text: Text
    actions: tuple[str, ...]
    icon: str
    category: str
    value: int | None  # a progress bar's percent
    transient: bool
    open_path: str | None = None  # what "Open backups" opens
    shown: Callable[[], None] | None = None  # called once the server showed it
    missed: Callable[[], None] | None = None  # called when it could not be shown
    close: bool = False  # withdraw the slot's notification (CloseNotification): what it says is stale
    about: tuple[str, str] = ("", "")  # its disk and kind (agent.desktop.reminder.CARD_KINDS), kept across restarts


class Notifier:
    """A Listener that shows the agent's events as desktop notifications.

    ``bus`` is a connected session bus (None: there is none; failures are
    only recorded for the next login); ``controller`` receives "Back up now"
    and "Stop" (no such actions without one); ``disks`` and ``settings``
    (remind_after, each disk's repository) are for reminders and "Open
    backups"; ``state_path`` is where reminders and missed failures are kept
    (:func:`agent.desktop.reminder.notice_state_path`; None: not kept). ``clock``
    (monotonic seconds) paces progress; ``now`` (epoch seconds) is for ages,
    due times and reminders; ``tz`` for dates (None: local time). Use
    :func:`start` to make one; :meth:`login` once the agent watches;
    :meth:`close` ends it.
    """

    def __init__(
        self,
        bus: MessageBus | None,
        controller: Controller | None = None,
        *,
        disks: DiskSource | None = None,
        settings: Settings | None = None,
        state_path: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], float] = time.time,
        tz: dt.tzinfo | None = None,
        min_interval: float = PROGRESS_INTERVAL,
        app_name: str = APP_NAME,
    ) -> None:
        self.bus = bus
        self.capabilities: set[str] | None = None  # None: not known (yet)
        self._controller = controller
        self._clock = clock
        self._now = now
        self._tz = tz
        self._min_interval = min_interval
        self._app_name = app_name
        self._disks = disks
        self._remind_after = settings.remind_after if settings is not None else 0
        # [[offsite]] remind_after, each its own (0: never).
        self._offsite_remind = {site.name: site.remind_after for site in settings.offsite} if settings is not None else {}
        self._repositories = {disk.name: disk.repository for disk in settings.disks} if settings is not None else {}
        self._servers = frozenset(remote.name for remote in settings.remotes) if settings is not None else frozenset()
        self._state_path = state_path
        self._notice = load_notice_state(state_path) if state_path is not None else NoticeState()
        self._logged_in = False
        self._attached: set[str] = set()
        self._reminding: set[str] = set()  # reminders queued, not yet shown or failed
        self._retry_at: float | None = None  # a reminder could not be shown: not again before this
        self._reminder_timer: asyncio.TimerHandle | None = None
        self._open_paths: dict[int, str] = {}  # notification id → the snapshot "Open backups" opens
        self._queue: asyncio.Queue[_Item] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._ids: dict[str, int] = {}  # slot → the id the server gave its notification
        self._ours: dict[int, tuple[str, ...]] = {}  # id → the actions it offers
        self._about: dict[str, tuple[str, str, float]] = {}  # slot → its disk, kind, and since when (now())
        self._server: str | None = None  # which server gave the ids (sender.server); None: not known
        self._adopted: list[ShownCard] = []  # cards an earlier agent left on screen, until login() judges them
        self._mounts = {disk.name: disk.mount_point for disk in settings.disks} if settings is not None else {}
        self._warned = bus is None  # start() already said there is no bus
        self._closed = False
        self._handler_added = False
        # what the agent said so far
        self._status: AgentStatus | None = None
        self._disk: str | None = None  # the running cycle's disk
        self._last_update: float | None = None  # clock() of the cycle notification's last update
        self._muted = False  # the user dismissed this cycle's notification: no more progress
        self._completed: CompleteEvent | None = None  # complete event, until the cycle ends
        self._opening: set[asyncio.Task[None]] = set()  # "Open backups" clicks still waiting for xdg-open
        self._removed = False  # the disk went away during this cycle
        self._plugged: str | None = None  # a disk just plugged in, until the agent decides
        # What the "cycle" notification shows now: its disk and kind
        # ("running", "complete", "failed", "stopped", "removed"), to withdraw it once stale.
        self._card: tuple[str, str] | None = None
        self._stopping = False  # a cycle runs and its end is to be told as "stopped" if so
        self._skipped: str | None = None  # the disk the "no backup needed yet" card is about
        self._waiting: set[str] = set()  # disks whose due backup waits for a condition, told once each time
        # Whether another view shows the running backup's progress now (KDE's job view): no progress cards then.
        self.progress_elsewhere: Callable[[], bool] = lambda: False

    # -- life -------------------------------------------------------------------------

    async def open(self) -> None:
        """Subscribe to ActionInvoked and NotificationClosed, and ask the server's capabilities."""
        self._worker_queue()
        if self.bus is None:
            return
        self.bus.add_message_handler(self._on_message)
        self._handler_added = True
        try:
            reply = await send(self.bus, driver_call("AddMatch", "s", [SIGNAL_RULE]))
            if reply.message_type is MessageType.ERROR:
                log.debug("the session bus refused the notification signals' match rule: %s", reply.body)
        except Exception as exc:
            self._failed(exc)
            return
        await self._capabilities()
        await self._learn_server()
        self._adopt()

    async def _learn_server(self) -> None:
        """Which server shows the cards (asked once, here at the start when one runs, so that no call of
        this kind is still on its way when the agent stops right after a notification)."""
        if self._server is not None or self._state_path is None or self.bus is None:
            return
        try:
            self._server = await sender.server(self.bus)
        except Exception as exc:
            log.debug("the notification server is not known (yet); its cards are not kept: %s", exc)

    def _adopt(self) -> None:
        """Take over the ids of the cards an earlier agent left on screen, if the same server shows them.

        Another server (a new login, a restarted daemon) shows none of them
        and gives their numbers to other cards: they are forgotten, never closed.
        """
        if self._server is None:
            return
        for card in self._notice.cards:
            if card.server != self._server or card.slot in self._ids:
                continue
            self._ids[card.slot] = card.ident
            self._ours[card.ident] = tuple(key for key in card.actions if key != ACTION_OPEN)
            self._about[card.slot] = (card.disk, card.kind, card.time)
            self._adopted.append(card)
        self._keep_cards()

    def close(self) -> None:
        """Stop: no more notifications; the ones shown stay."""
        if self._closed:
            return
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
        if self._reminder_timer is not None:
            self._reminder_timer.cancel()
            self._reminder_timer = None
        if self._handler_added and self.bus is not None:
            self.bus.remove_message_handler(self._on_message)

    async def flush(self) -> None:
        """Wait until everything queued so far has been sent (or failed)."""
        if self._queue is not None and self._worker is not None and not self._worker.done():
            await self._queue.join()

    # -- login: missed failures and reminders --------------------------------------------------

    def login(self) -> None:
        """The agent started (a login) and has read the disks present: missed failures, then reminders."""
        try:
            self._logged_in = True
            successes: dict[str, float | None] = {}
            if self._disks is not None:
                self._attached = set(self._disks.attached())
                successes = self._disks.last_successes()
                now = self._now()
                for name in successes:
                    self._notice.known_since.setdefault(name, now)
            self._judge_adopted(successes)
            summaries = missed_to_show(self._notice.missed, successes)
            # Failures a later success made moot are forgotten.
            self._notice.missed = [f for f in self._notice.missed if any(f.disk == s.latest.disk for s in summaries)]
            self._save_notice()
            for summary in summaries:
                self._post(f"missed:{summary.latest.disk}", missed_text(summary, self._now(), self._tz),
                           actions=(ACTION_BACKUP_NOW,), icon="dialog-error", category="transfer.error",
                           about=(summary.latest.disk, "missed"),
                           shown=functools.partial(self._forget_missed, summary.latest))
            self._replan(login=True)
        except Exception:
            log.exception("notifications: login failed")

    def _settled(self, slot: str) -> None:
        """This agent has replaced or withdrawn the slot's card: an earlier agent's card there is no longer to judge."""
        if self._adopted:
            self._adopted = [card for card in self._adopted if card.slot != slot]

    def _judge_adopted(self, successes: dict[str, float | None]) -> None:
        """Withdraw the cards an earlier agent left that are untrue now; the rest are replaced in place later."""
        adopted, self._adopted = self._adopted, []
        open_disks = {name for name, mount in self._mounts.items() if os.path.ismount(mount)}
        stale = stale_cards(adopted, attached=self._attached, open_disks=open_disks, last_successes=successes)
        for card in adopted:
            if card in stale:
                self._withdraw(card.slot)
            elif card.slot == "cycle":
                self._card = (card.disk, card.kind)  # withdrawn or replaced as this agent's own would be

    def _forget_missed(self, shown: MissedFailure) -> None:
        self._notice.missed = [f for f in self._notice.missed if f.disk != shown.disk or f.time > shown.time]
        self._save_notice()

    def _record_missed(self, failure: MissedFailure) -> None:
        if self._state_path is None:
            return
        self._notice.missed.append(failure)
        self._save_notice()
        log.info("the failure of the backup to %s is kept and shown at the next login", failure.disk)

    def _save_notice(self) -> None:
        if self._state_path is None:
            return
        try:
            save_notice_state(self._state_path, self._notice)
        except OSError as exc:
            log.warning("could not save the notifications' state to %s: %s", self._state_path, exc)

    def _replan(self, *, login: bool = False) -> None:
        """Show the reminders due now; arm the one timer for the next."""
        if self._reminder_timer is not None:
            self._reminder_timer.cancel()
            self._reminder_timer = None
        if self._disks is None or not self._logged_in or self._closed:
            return
        now = self._now()
        offsite_wake = self._offsite_reminders(now, login)
        if self._remind_after <= 0:
            self._arm(offsite_wake, now)
            return
        successes = self._disks.last_successes()
        views = {
            name: DiskView(last, name in self._attached, self._notice.known_since.get(name),
                           self._notice.reminded.get(name))
            for name, last in successes.items()
        }
        plan = plan_reminders(now, views, self._remind_after, login=login, tz=self._tz)
        wake = plan.next_check
        if self._retry_at is not None and now < self._retry_at:
            wake = self._retry_at if wake is None else min(wake, self._retry_at)
        else:
            self._retry_at = None
            for reminder in plan.due:
                if reminder.disk in self._reminding:
                    continue
                self._reminding.add(reminder.disk)
                words = remote_reminder_text if reminder.disk in self._servers else reminder_text
                self._post(f"reminder:{reminder.disk}", words(reminder.disk, reminder.last_success, now, self._tz),
                           icon="drive-harddisk", category="device", about=(reminder.disk, "reminder"),
                           shown=functools.partial(self._reminded, reminder.disk, True),
                           missed=functools.partial(self._reminded, reminder.disk, False))
        if offsite_wake is not None:
            wake = offsite_wake if wake is None else min(wake, offsite_wake)
        self._arm(wake, now)

    def _arm(self, wake: float | None, now: float) -> None:
        if wake is not None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            # At least a second: a clock that disagrees with the plan never spins.
            self._reminder_timer = loop.call_later(max(1.0, wake - now), self.remind)

    def _offsite_reminders(self, now: float, login: bool) -> float | None:
        """Remind of each [[offsite]] whose last copy is older than its own remind_after; when to look again."""
        if self._retry_at is not None and now < self._retry_at:
            return self._retry_at
        records = {record.name: record for record in (self._status.offsite if self._status is not None else [])}
        wake: float | None = None
        for name, days in self._offsite_remind.items():
            key = f"offsite:{name}"
            last = records[name].last_copy if name in records else None
            since = self._notice.known_since.setdefault(key, now)
            plan = plan_reminders(now, {key: DiskView(last, False, since, self._notice.reminded.get(key))}, days, login=login, tz=self._tz)
            if plan.next_check is not None:
                wake = plan.next_check if wake is None else min(wake, plan.next_check)
            for _due in plan.due:
                if key in self._reminding:
                    continue
                self._reminding.add(key)
                self._post(f"reminder:{key}", offsite_reminder_text(name, last, now, self._tz),
                           icon="network-server", category="transfer", about=(key, "reminder"),
                           shown=functools.partial(self._reminded, key, True),
                           missed=functools.partial(self._reminded, key, False))
        return wake

    @property
    def reminder_timer(self) -> asyncio.TimerHandle | None:
        """The one timer armed for the next reminder (None: none to wait for)."""
        return self._reminder_timer

    def remind(self) -> None:
        """What the reminder timer does: show the reminders due, arm the timer for the next."""
        try:
            self._replan()
        except Exception:
            log.exception("notifications: reminders failed")

    def _reminded(self, disk: str, shown: bool) -> None:
        self._reminding.discard(disk)
        if shown:
            self._notice.reminded[disk] = self._now()
            self._save_notice()
        else:
            self._retry_at = self._now() + REMINDER_RETRY
        self._replan()

    # -- Listener ---------------------------------------------------------------------

    def status_changed(self, status: AgentStatus) -> None:
        self._status = status
        plugged, self._plugged = self._plugged, None
        if status.state != "running":
            self._replan()  # a cycle ended: a success ends the reminders
        if self._skipped is not None and any(d.name == self._skipped and d.ejected for d in status.disks):
            self._withdraw("disk")  # "leave the disk plugged in" is stale once it is ejected
            self._skipped = None
        self._tell_waiting(status)
        ended = self._stopping and status.state != "running"
        if ended:
            self._stopping = False
        if self._completed is not None and status.state != "running":
            event, self._completed = self._completed, None
            if status.last_result in ("success", "partial"):
                disk = self._disk or status.disk or "the disk"
                open_path = self._reachable_snapshot(disk, event, status)
                self._post("cycle", completed_text(disk, event, status.disk_left, status.disk_left_detail,
                                                   remote=disk in self._servers),
                           actions=(ACTION_OPEN,) if open_path else (), icon="drive-harddisk",
                           category="transfer.complete", open_path=open_path, about=(disk, "complete"))
                self._card = (disk, "complete")
                self._withdraw(f"missed:{disk}")  # a failure a success made moot
        elif ended and status.last_result == "stopped" and not self._removed:
            disk = self._disk or status.disk or "the disk"
            self._post("cycle", stopped_text(disk, status.disk_left, status.disk_left_detail),
                       actions=(ACTION_BACKUP_NOW,), icon="drive-harddisk", category="transfer",
                       about=(disk, "stopped"))
            self._card = (disk, "stopped")
        elif (
            plugged is not None
            and status.state != "running"
            and status.disk == plugged
            and status.next_due is not None
            and status.next_due > self._now()
            and not _unresolved(status, plugged)
            and not status.skipped
        ):
            self._skipped = plugged
            self._post("disk", skipped_text(plugged, status.last_success, status.next_due, self._now()),
                       actions=(ACTION_BACKUP_NOW,), icon="drive-harddisk", category="device.added",
                       about=(plugged, "skipped"))

    def _tell_waiting(self, status: AgentStatus) -> None:
        """Once each time a disk's due backup starts to wait for a condition: a low-urgency card, never a failure."""
        for entry in status.disks:
            if not entry.skipped:
                self._waiting.discard(entry.name)
                continue
            if entry.name in self._waiting:
                continue
            self._waiting.add(entry.name)
            self._skipped = entry.name  # withdrawn as "no backup needed yet" is: started, unplugged, ejected
            self._post("disk", waiting_text(entry.name, entry.skipped, entry.next_due, self._now(), self._tz),
                       actions=(ACTION_BACKUP_NOW,), icon="drive-harddisk", category="device",
                       about=(entry.name, "skipped"))

    def disk_attached(self, disk: str) -> None:
        self._plugged = disk
        self._attached.add(disk)
        if self._card is not None and self._card[0] == disk and self._card[1] in ("complete", "removed"):
            # "Safe to unplug" or "unplugged during the backup" is stale once it is back.
            self._withdraw("cycle")
        self._replan()

    def disk_removed(self, disk: str, during_backup: bool) -> None:
        self._plugged = None
        self._attached.discard(disk)
        self._replan()
        if during_backup:
            self._removed = True
            self._completed = None
            self._post("cycle", removed_text(disk), icon="dialog-warning", category="device.removed",
                       about=(disk, "removed"))
            self._card = (disk, "removed")
        else:
            # "No backup needed yet; leave the disk plugged in" and "safe to unplug" are done with.
            self._withdraw("disk")
            if self._card == (disk, "complete"):
                self._withdraw("cycle")

    def disk_opened(self, disk: str) -> None:
        # "Complete/stopped — it is safe to unplug" is untrue while the disk is open for browsing;
        # what the card said of the backup itself the tray and `status` still show.
        if self._card is not None and self._card[0] == disk and self._card[1] in ("complete", "stopped"):
            self._withdraw("cycle")

    def backup_started(self, disk: str, reason: str) -> None:
        self._plugged = None
        self._disk = disk
        self._muted = self._removed = False
        self._completed = None
        status = self._status
        last = status.last_success if status is not None and status.disk == disk else None
        self._last_update = self._clock()
        self._stopping = True
        # One card per disk's story: the cycle's card (the last result, stale now) is replaced in
        # place, and a "no backup needed yet" or a missed failure of this disk is withdrawn.
        self._withdraw("disk")
        self._withdraw(f"missed:{disk}")
        self._post("cycle", started_text(disk, reason, last, self._now(), remote=disk in self._servers), actions=(ACTION_STOP, ACTION_NOT_NOW),
                   icon="drive-harddisk", category="transfer", transient=True, about=(disk, "running"))
        self._card = (disk, "running")

    def progress(self, event: ProgressEvent) -> None:
        if self._muted or self._removed or event.step == "offsite":
            return  # the off-site copy runs after "completed" was said: its progress is the tray's and D-Bus's
        if self.progress_elsewhere():
            return
        now = self._clock()
        if self._last_update is not None and now - self._last_update < self._min_interval:
            return
        self._last_update = now
        step = self._status.step if self._status is not None and self._status.state == "running" else None
        percent = event.percent
        value = int(min(100.0, max(0.0, percent))) if percent is not None else None
        self._post("cycle", progress_text(self._disk or "the disk", event, step), actions=(ACTION_STOP, ACTION_NOT_NOW),
                   icon="drive-harddisk", category="transfer", value=value, transient=True,
                   about=(self._disk or "the disk", "running"))

    def backup_completed(self, event: CompleteEvent) -> None:
        self._completed = event
        self._muted = False
        self._post("cycle", completed_text(self._disk or "the disk", event, None, remote=self._disk in self._servers),
                   icon="drive-harddisk", category="transfer", about=(self._disk or "the disk", "running"))

    def offsite_finished(self, offsite: OffsiteStatus, state: str) -> None:
        """ "Copied off-site" or why not; a copy that was not due says nothing."""
        if state not in ("done", "failed"):
            return
        self._post(f"offsite:{offsite.name}", offsite_text(offsite.name, state, offsite.snapshot, offsite.message),
                   icon="network-server", category="transfer", about=(f"offsite:{offsite.name}", state))
        if state == "done":
            self._notice.reminded.pop(f"offsite:{offsite.name}", None)

    def backup_failed(self, step: str | None, message: str, exit_code: int | None = None) -> None:
        completed, self._completed = self._completed, None
        if self._removed:
            return  # the removal notification already says it all
        self._muted = False
        snapshot = completed.snapshot if completed is not None else None
        done = snapshot
        text = failed_text(self._disk, step, message, done, exit_code)
        self._card = (self._disk or "the disk", "failed")
        failure = MissedFailure(self._now(), self._disk or "the disk", step, message, done, exit_code)
        self._post("cycle", text, actions=(ACTION_BACKUP_NOW,) if not snapshot else (),
                   icon="dialog-error", category="transfer.error", about=(failure.disk, "failed"),
                   missed=lambda: self._record_missed(failure))

    # -- sending ----------------------------------------------------------------------

    def _reachable_snapshot(self, disk: str, event: CompleteEvent, status: AgentStatus) -> str | None:
        """The completed snapshot's directory when "Open backups" can honestly open it, else None.

        Only when the cycle left the disk mounted (as it found it) and the
        directory is there for this user: a locked disk has nothing to open.
        """
        snapshot = event.snapshot
        repository = self._repositories.get(disk)
        if status.disk_left != "mounted" or not snapshot or repository is None:
            return None
        path = os.path.join(repository, SNAPSHOTS, snapshot)
        return path if os.path.isdir(path) else None

    def _post(
        self,
        slot: str,
        text: Text,
        *,
        actions: tuple[str, ...] = (),
        icon: str,
        category: str,
        value: int | None = None,
        transient: bool = False,
        open_path: str | None = None,
        shown: Callable[[], None] | None = None,
        missed: Callable[[], None] | None = None,
        about: tuple[str, str],
    ) -> None:
        if self._closed:
            return
        self._settled(slot)
        queue = self._worker_queue()
        if queue is None:
            return
        queue.put_nowait(_Item(slot, text, actions, icon, category, value, transient, open_path, shown, missed,
                               about=about))

    def _withdraw(self, slot: str) -> None:
        """Close the slot's notification (if one is shown): what it says is no longer true."""
        if self._closed:
            return
        self._settled(slot)
        queue = self._worker_queue()
        if queue is not None:
            queue.put_nowait(_Item(slot, Text("", "", LOW), (), "", "", None, False, close=True))
        if slot == "cycle":
            self._card = None

    def _worker_queue(self) -> asyncio.Queue[_Item] | None:
        """The queue the worker sends from, the worker started if need be; None without an event loop."""
        queue = self._queue
        if queue is not None and self._worker is not None and not self._worker.done():
            return queue
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            log.debug("notifications: no event loop running; nothing shown")
            return None
        if queue is None:
            queue = self._queue = asyncio.Queue()
        self._worker = loop.create_task(self._work(queue))
        return queue

    async def _work(self, queue: asyncio.Queue[_Item]) -> None:
        while True:
            item = await queue.get()
            try:
                if item.close:
                    await self._close_slot(item.slot)
                    continue
                await self._send(item)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed(exc)
                self._then(item.missed)
            else:
                self._then(item.shown)
            finally:
                queue.task_done()

    @staticmethod
    def _then(callback: Callable[[], None] | None) -> None:
        if callback is None:
            return
        try:
            callback()
        except Exception:
            log.exception("notifications: keeping what was shown failed")

    async def _send(self, item: _Item) -> None:
        if self.capabilities is None:
            await self._capabilities()
        capabilities = self.capabilities or set()
        actions: list[str] = []
        if "actions" in capabilities:
            for key in item.actions:
                if self._controller is not None or key == ACTION_OPEN:
                    actions += [key, ACTION_LABELS[key]]
        summary, body, urgency = item.text
        hints: dict[str, Variant] = {
            "urgency": Variant("y", urgency),
            "category": Variant("s", item.category),
        }
        if item.value is not None:
            hints["value"] = Variant("i", item.value)
        if item.transient:
            hints["transient"] = Variant("b", True)
        replaces = self._ids.get(item.slot, 0)
        new_id = await sender.notify(
            self._bus(), app_name=self._app_name, replaces=replaces, icon=item.icon, summary=summary, body=body,
            actions=actions, hints=hints, expire=0 if urgency == CRITICAL else -1, server_can=capabilities,
        )
        if replaces and replaces != new_id:
            self._ours.pop(replaces, None)
            self._open_paths.pop(replaces, None)
        self._ids[item.slot] = new_id
        disk, kind = item.about
        earlier = self._about.get(item.slot)
        same = earlier is not None and replaces == new_id and earlier[:2] == (disk, kind)
        self._about[item.slot] = (disk, kind, earlier[2] if same and earlier is not None else self._now())
        self._ours[new_id] = tuple(actions[::2])
        if item.open_path is not None and ACTION_OPEN in self._ours[new_id]:
            self._open_paths[new_id] = item.open_path
        else:
            self._open_paths.pop(new_id, None)
        if self._warned:
            log.info("desktop notifications work again")
            self._warned = False
        await self._learn_server()  # a server that started after the agent
        self._keep_cards()

    def _keep_cards(self) -> None:
        """Keep the ids of the cards on screen (with the server's name) for the next agent, when they changed."""
        if self._state_path is None or self._server is None:
            return
        cards = [
            ShownCard(slot, ident, *self._about[slot], server=self._server, actions=self._ours.get(ident, ()))
            for slot, ident in self._ids.items()
            if slot in self._about
        ]
        if cards != self._notice.cards:
            self._notice.cards = cards
            self._save_notice()

    async def _close_slot(self, slot: str) -> None:
        ident = self._ids.pop(slot, None)
        self._about.pop(slot, None)
        if ident is None:
            return
        self._ours.pop(ident, None)
        self._open_paths.pop(ident, None)
        self._keep_cards()
        try:
            await sender.close(self._bus(), ident)
        except BusCallError as exc:
            log.debug("notification %d not withdrawn: %s", ident, exc)

    async def _capabilities(self) -> None:
        try:
            self.capabilities = await sender.capabilities(self._bus())
        except Exception as exc:
            self._failed(exc)

    def _bus(self) -> MessageBus:
        if self.bus is None:
            raise RuntimeError("no session bus")
        return self.bus

    def _failed(self, exc: BaseException) -> None:
        self.capabilities = None  # ask again next time: the server may be a new one
        self._server = None
        if self._warned:
            log.debug("desktop notification not shown: %s", exc)
            return
        self._warned = True
        log.warning("cannot show desktop notifications (%s); backups go on without them", exc or type(exc).__name__)

    # -- signals from the server --------------------------------------------------------

    def _on_message(self, message: Message) -> bool:
        if (
            message.message_type is not MessageType.SIGNAL
            or message.interface != NOTIFICATIONS_INTERFACE
            or self._closed
        ):
            return False
        try:
            if message.member == "ActionInvoked" and message.signature == "us":
                ident, key = int(message.body[0]), str(message.body[1])
                if key in self._ours.get(ident, ()):
                    if key == ACTION_OPEN:
                        self._open(self._open_paths.get(ident))
                    else:
                        self._act(key)
            elif message.member == "NotificationClosed" and message.signature == "uu":
                ident, reason = int(message.body[0]), int(message.body[1])
                if ident in self._ours:
                    del self._ours[ident]
                    self._open_paths.pop(ident, None)
                    for slot, shown in list(self._ids.items()):
                        if shown == ident:
                            del self._ids[slot]
                            self._about.pop(slot, None)
                            if slot == "cycle" and reason == CLOSED_BY_USER and self._completed is None:
                                self._muted = True  # dismissed: no more progress for this cycle
                    self._keep_cards()
        except Exception:
            log.exception("notifications: a signal from the server could not be handled")
        return False

    def _act(self, key: str) -> None:
        controller = self._controller
        if controller is None:
            return
        try:
            if key == ACTION_STOP:
                reply = controller.stop()
            elif key == ACTION_NOT_NOW:
                reply = controller.not_now()
            else:
                reply = controller.backup_now()
            log.info("notification action %s: %s", ACTION_LABELS.get(key, key), reply)
        except Exception:
            log.exception("notification action %s failed", key)


    def _open(self, path: str | None) -> None:
        """"Open backups": the snapshot's folder in the file manager (agent.desktop.dbus.actions, as the tray does)."""
        if path is None or not os.path.isdir(path):
            log.warning("cannot open the backups: %s is not there any more (the disk was unmounted?)", path)
            return
        task = asyncio.get_running_loop().create_task(self._show(path))
        self._opening.add(task)
        task.add_done_callback(self._opening.discard)

    async def _show(self, path: str) -> None:
        problem = await show_folder(path)
        if problem is not None:
            log.warning("cannot open the backups in %s: %s", path, problem)


def _unresolved(status: AgentStatus, disk: str) -> bool:
    """The disk's last run failed or was stopped and no success followed (a notice must not hide it)."""
    for entry in status.disks:
        if entry.name == disk:
            return entry.unfinished or entry.last_result == "failure"
    return status.disk == disk and status.last_result == "failure"


def _listener(notifier: Notifier) -> Listener:
    return notifier  # mypy checks here that Notifier is a Listener


async def start(
    bus: MessageBus | None,
    controller: Controller | None = None,
    *,
    disks: DiskSource | None = None,
    settings: Settings | None = None,
    state_path: str | None = None,
    clock: Callable[[], float] = time.monotonic,
    now: Callable[[], float] = time.time,
    tz: dt.tzinfo | None = None,
    min_interval: float = PROGRESS_INTERVAL,
) -> Notifier:
    """A running :class:`Notifier` on ``bus`` (the session bus); nothing raises.

    Without a bus (logged here, once) it shows nothing but keeps failures
    for the next login. A notification server that is missing now is logged
    once and asked again at the next notification (one may start later).
    """
    if bus is None:
        log.warning("no session bus: no desktop notifications (a failed backup is shown at the next login)")
    notifier = Notifier(bus, controller, disks=disks, settings=settings, state_path=state_path, clock=clock, now=now,
                        tz=tz, min_interval=min_interval)
    try:
        await notifier.open()
    except Exception as exc:  # open() already keeps its failures; this is a last guard
        notifier._failed(exc)
    return notifier


__all__ = [
    "CRITICAL",
    "LOW",
    "NORMAL",
    "DiskSource",
    "Notifier",
    "PROGRESS_INTERVAL",
    "Text",
    "age",
    "completed_text",
    "duration",
    "day",
    "failed_text",
    "failure_hint",
    "missed_text",
    "past",
    "progress_text",
    "reminder_text",
    "removed_text",
    "skipped_text",
    "start",
    "stopped_text",
    "started_text",
    "waiting_text",
    "step_words",
    "when",
]
