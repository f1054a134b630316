"""What the notifications must remember across logins: reminders and missed failures.

Two decisions, both pure (values in, values out, tested directly):

* :func:`plan_reminders`: which disks are due a "no backup for N days"
  reminder now, and when to look again (one timer for all disks). A disk
  that never had a successful backup counts from the day the agent first
  knew it, so a fresh install does not greet its user with a reminder.
* :func:`missed_to_show`: the failures that no one could be told about
  (no session bus, no notification server, the notification failed), one per
  disk, without those a later successful backup made moot.
* :func:`stale_cards`: which of the cards an earlier agent left on screen
  are untrue now, so that the next agent withdraws them (it cannot know
  their ids otherwise: they are kept here, with the server that showed them).

What they need from one login to the next is kept in a small JSON file
beside the agent's state file (:func:`notice_state_path`), written only by
the notifications: when each disk was first known and last reminded, and
the missed failures, the cards still on screen. The agent's own state file
stays the agent's.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Collection, Mapping, NamedTuple, Sequence

from agent.core.files import write_atomic

log = logging.getLogger(__name__)

DAY = 86400.0
NOTICE_FILE = "notifications.json"
NOTICE_FILE_VERSION = 1
MAX_MISSED = 20  # missed failures kept; older ones are dropped first


class Reminder(NamedTuple):
    """A reminder due now: the disk, and its last successful backup (None: never)."""

    disk: str
    last_success: float | None


@dataclass(frozen=True)
class DiskView:
    """What the reminder decision knows about one disk."""

    last_success: float | None  # epoch seconds; None: never
    attached: bool = False
    known_since: float | None = None  # when the agent first knew the disk (the start when it never succeeded)
    reminded: float | None = None  # when the last reminder was shown


class ReminderPlan(NamedTuple):
    due: tuple[Reminder, ...]
    next_check: float | None  # epoch seconds of the next moment one falls due; None: nothing to wait for


def _next_midnight(moment: float, tz: dt.tzinfo | None) -> float:
    """The start of the day after ``moment``'s (local time when tz is None)."""
    day = dt.datetime.fromtimestamp(moment, tz).date() + dt.timedelta(days=1)
    return dt.datetime.combine(day, dt.time(), tzinfo=tz).timestamp()


def _ready_at(view: DiskView, days: int, now: float, login: bool, tz: dt.tzinfo | None) -> float | None:
    if view.attached:
        return None  # the disk is here: the backup itself is the answer
    since = view.last_success if view.last_success is not None else view.known_since
    overdue = (since if since is not None else now) + days * DAY
    if view.reminded is None:
        return overdue
    again = view.reminded + DAY
    if login:
        # A new login on a new day reminds at once, even if the last one
        # was less than 24 hours ago.
        again = min(again, _next_midnight(view.reminded, tz))
    return max(overdue, again)


def plan_reminders(
    now: float, disks: Mapping[str, DiskView], remind_after: int, *, login: bool = False, tz: dt.tzinfo | None = None
) -> ReminderPlan:
    """Reminders due at ``now``, and when the next one falls due.

    A disk is due when no backup to it succeeded for ``remind_after`` days
    (0: never remind), it is not attached, and it was not reminded in the
    last 24 hours, or, at ``login``, not since the last local midnight
    (``tz``; None: local time). The next check is the earliest moment a
    disk not due now would be, as the agent runs on without a new login.
    """
    if remind_after <= 0:
        return ReminderPlan((), None)
    due: list[Reminder] = []
    later: list[float] = []
    for name, view in disks.items():
        ready = _ready_at(view, remind_after, now, login, tz)
        if ready is None:
            continue
        if ready <= now:
            due.append(Reminder(name, view.last_success))
            after = _ready_at(DiskView(view.last_success, False, view.known_since, now), remind_after, now, False, tz)
            if after is not None:
                later.append(after)
        else:
            running = _ready_at(view, remind_after, now, False, tz)
            if running is not None:
                later.append(running)
    return ReminderPlan(tuple(due), min(later) if later else None)


# -- missed failures -----------------------------------------------------------------------


@dataclass(frozen=True)
class MissedFailure:
    """A failure notification that could not be shown."""

    time: float
    disk: str
    step: str | None
    message: str
    snapshot: str | None = None  # completed before the failure (it could not unmount or lock)
    exit_code: int | None = None  # the cycle's exit status: what the user can do depends on it


class MissedSummary(NamedTuple):
    latest: MissedFailure
    times: int  # failures of this disk missed, the latest included
    first: float  # the time of the first of them


def missed_to_show(missed: Sequence[MissedFailure], last_successes: Mapping[str, float | None]) -> list[MissedSummary]:
    """One summary per disk (the latest failure, how many, since when), in time order.

    A failure followed by a successful backup of the same disk is left out:
    showing it would tell something no longer true.
    """
    by_disk: dict[str, list[MissedFailure]] = {}
    for failure in sorted(missed, key=lambda f: f.time):
        success = last_successes.get(failure.disk)
        if success is not None and success >= failure.time:
            continue
        by_disk.setdefault(failure.disk, []).append(failure)
    summaries = [MissedSummary(items[-1], len(items), items[0].time) for items in by_disk.values()]
    return sorted(summaries, key=lambda s: s.latest.time)


# -- cards left on screen -----------------------------------------------------------------

#: What a card says, as far as whether it stays true goes: "running" (a cycle in progress, or its
#: disk being locked), "complete" and "stopped" (how the cycle ended: safe to unplug, or how the
#: disk was left), "removed" (unplugged during the backup), "failed", "skipped" ("no backup needed
#: yet: leave the disk plugged in"), "missed" (a failure shown at login), "reminder".
CARD_KINDS = ("running", "complete", "stopped", "removed", "failed", "skipped", "missed", "reminder")


@dataclass(frozen=True)
class ShownCard:
    """A notification on screen: where the notifier keeps it, the server's id for it, and what it is about."""

    slot: str  # "cycle", "disk", "missed:DISK" or "reminder:DISK"
    ident: int
    disk: str
    kind: str  # one of CARD_KINDS
    time: float  # epoch seconds it was first shown as this kind
    server: str  # the server that showed it (the bus's id and the server's unique name): ids are its own
    actions: tuple[str, ...] = ()


def stale_cards(
    cards: Sequence[ShownCard],
    *,
    attached: Collection[str],
    open_disks: Collection[str],
    last_successes: Mapping[str, float | None],
) -> list[ShownCard]:
    """The cards an earlier agent showed that are untrue now (to withdraw); the rest may stay.

    A cycle's progress and "no backup needed yet" belong to the agent that
    showed them (the next one decides afresh); "safe to unplug" (complete,
    stopped) is done with once the disk is gone and untrue while it is open
    (mounted, e.g. for browsing); "unplugged during the backup" once it is
    back; a failure once a backup of its disk succeeded after it; a reminder
    once the disk is here or backed up.
    """
    stale: list[ShownCard] = []
    for card in cards:
        success = last_successes.get(card.disk)
        succeeded = success is not None and success >= card.time
        here = card.disk in attached
        if card.kind in ("complete", "stopped"):
            untrue = not here or card.disk in open_disks
        elif card.kind == "removed":
            untrue = here
        elif card.kind in ("failed", "missed"):
            untrue = succeeded
        elif card.kind == "reminder":
            untrue = here or succeeded
        else:  # running, skipped, and a kind this version does not know
            untrue = True
        if untrue:
            stale.append(card)
    return stale


# -- the file ------------------------------------------------------------------------------


@dataclass
class NoticeState:
    """What the notifications keep across logins."""

    known_since: dict[str, float] = field(default_factory=dict)
    reminded: dict[str, float] = field(default_factory=dict)
    missed: list[MissedFailure] = field(default_factory=list)
    cards: list[ShownCard] = field(default_factory=list)  # on screen when last written

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": NOTICE_FILE_VERSION,
            "known_since": dict(self.known_since),
            "reminded": dict(self.reminded),
            "missed": [vars(failure) for failure in self.missed[-MAX_MISSED:]],
            "cards": [{**vars(card), "actions": list(card.actions)} for card in self.cards],
        }


def notice_state_path(state_file: str) -> str:
    """The notifications' file, beside the agent's state file."""
    return os.path.join(os.path.dirname(state_file) or ".", NOTICE_FILE)


def _times(value: object) -> dict[str, float]:
    if not isinstance(value, dict):
        return {}
    return {
        str(k): float(v) for k, v in value.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _missed(value: object) -> list[MissedFailure]:
    found: list[MissedFailure] = []
    for item in value if isinstance(value, list) else []:
        if not isinstance(item, dict):
            continue
        when, disk, step, message, snapshot, code = (
            item.get(k) for k in ("time", "disk", "step", "message", "snapshot", "exit_code")
        )
        if isinstance(when, (int, float)) and not isinstance(when, bool) and isinstance(disk, str):
            found.append(
                MissedFailure(
                    float(when),
                    disk,
                    step if isinstance(step, str) else None,
                    message if isinstance(message, str) else "",
                    snapshot if isinstance(snapshot, str) else None,
                    code if isinstance(code, int) and not isinstance(code, bool) else None,
                )
            )
    return found


def _cards(value: object) -> list[ShownCard]:
    found: list[ShownCard] = []
    for item in value if isinstance(value, list) else []:
        if not isinstance(item, dict):
            continue
        slot, ident, disk, kind, when, server, actions = (
            item.get(k) for k in ("slot", "ident", "disk", "kind", "time", "server", "actions")
        )
        if (
            isinstance(slot, str) and isinstance(disk, str) and isinstance(kind, str) and isinstance(server, str)
            and isinstance(ident, int) and not isinstance(ident, bool) and ident > 0
            and isinstance(when, (int, float)) and not isinstance(when, bool)
        ):
            keys = tuple(a for a in actions if isinstance(a, str)) if isinstance(actions, list) else ()
            found.append(ShownCard(slot, ident, disk, kind, float(when), server, keys))
    return found


def load_notice_state(path: str) -> NoticeState:
    """The file's contents; empty when missing, and when damaged (logged): it only costs a reminder."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return NoticeState()
    except (OSError, ValueError) as exc:
        log.warning("ignoring the notifications' state file %s: %s", path, exc)
        return NoticeState()
    if not isinstance(data, dict):
        log.warning("ignoring the notifications' state file %s: not a JSON object", path)
        return NoticeState()
    return NoticeState(
        _times(data.get("known_since")), _times(data.get("reminded")), _missed(data.get("missed")),
        _cards(data.get("cards")),
    )


def save_notice_state(path: str, state: NoticeState) -> None:
    """Write it atomically (mode 0600: failure messages may name the user's paths)."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    text = json.dumps(state.as_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    write_atomic(path, text.encode(), mode=0o600, prefix=".notifications-")


__all__ = [
    "DAY",
    "DiskView",
    "MissedFailure",
    "MissedSummary",
    "NoticeState",
    "Reminder",
    "ReminderPlan",
    "ShownCard",
    "load_notice_state",
    "missed_to_show",
    "notice_state_path",
    "plan_reminders",
    "save_notice_state",
    "stale_cards",
]
