"""The words of the desktop notifications and of the tray's answers (pure: values in, Text out).

Kept apart from the notifier (agent.desktop.dbus.notify), which decides when to show
them, and from the sender (agent.desktop.dbus.sender), which puts them on the bus, so
that every sentence a user reads can be tested without a bus.
"""

from __future__ import annotations

import datetime as dt
import posixpath
from typing import NamedTuple

from agent.engine.cycle import human_size
from agent.core.errors import (
    EXIT_BUSY, EXIT_CONNECTION_LOST, EXIT_DISK_BUSY, EXIT_DISK_FULL, EXIT_DISK_MISSING, EXIT_HOST_KEY, EXIT_REFUSED,
    EXIT_REPOSITORY, EXIT_USAGE,
)
from agent.core.events import CompleteEvent, ProgressEvent
from agent.desktop.reminder import DAY, MissedSummary
from agent.desktop.state import DiskLeft

LOW, NORMAL, CRITICAL = 0, 1, 2

class Text(NamedTuple):
    """One notification's words."""

    summary: str
    body: str
    urgency: int  # LOW, NORMAL or CRITICAL


# -- words (pure) ---------------------------------------------------------------------

_STEPS: dict[str, str] = {
    "lock": "getting ready",
    "disk": "looking for the disk",
    "unlock": "unlocking the disk",
    "mount": "mounting the disk",
    "verify": "checking the disk",
    "prepare": "preparing",
    "make-room": "making room on the disk",
    "transfer": "copying files",
    "system-state": "storing database dumps and the package lists",
    "snapshot": "saving the snapshot",
    "rotate": "removing old snapshots",
    "empty-trash": "freeing the space of old snapshots",
    "unmount": "unmounting the disk",
    "lock-disk": "locking the disk",
    "offsite": "copying the snapshot off-site",
    "offsite-forget": "forgetting old off-site snapshots",
    "offsite-prune": "pruning the off-site repository",
    "offsite-check": "checking the off-site repository",
}

# What to do, by the cause when the cycle's exit status tells it (agent.core.errors),
# else by the step that failed.
_CAUSE_HINTS: dict[int, str] = {
    EXIT_USAGE: "Correct what it names, then try again with Back up now.",
    EXIT_REPOSITORY: "Check that this is the right backup disk for this computer, then try again.",
    EXIT_BUSY: "Wait until the other backup has finished, then try again.",
    EXIT_DISK_MISSING: "Plug the backup disk in and try again.",
    EXIT_DISK_BUSY: "Close the programs it names, then eject the disk from the file manager.",
    EXIT_DISK_FULL: "Make room on the disk as it says, then try again with Back up now.",
    # A server ([[remote]]): README, "Backing up to a server".
    EXIT_HOST_KEY: "Compare the server's host key with its fingerprint and record it in the configured known_hosts as root; "
    "nothing was sent.",
    EXIT_REFUSED: "Give the server the backup key (its authorized_keys), or the rsync daemon the right password, then try again.",
    EXIT_CONNECTION_LOST: "The next backup carries on from where this one stopped; earlier snapshots are untouched.",
}
_STOPPED_HINT = "Back up now starts it again."  # exit status 128 + the signal: stopped, not broken
_HINTS: dict[str, str] = {
    "disk": "Plug the backup disk in and try again.",
    "unlock": "Check the disk's key or passphrase, then try again.",
    "mount": "Check the disk (for example with GNOME Disks), then try again.",
    "verify": "Check that this is the right backup disk and that it is healthy, then try again.",
    "make-room": "Free space on the backup disk or use a bigger one.",
    "transfer": "Keep the disk plugged in and try again.",
    "system-state": "Run the command source it names by hand as root to see why it fails, then try again.",
    "unmount": "Close whatever has files open on the disk, then eject it from the file manager.",
    "lock-disk": "Eject the disk from the file manager before you unplug it.",
}
_DEFAULT_HINT = "Try again with Back up now; the log has the details (journalctl --user -u backup-agent)."


def failure_hint(step: str | None, exit_code: int | None) -> str:
    """What the user can do about a failure: by its cause (the exit status) when known, else by its step."""
    if exit_code is not None:
        if exit_code in _CAUSE_HINTS:
            return _CAUSE_HINTS[exit_code]
        if 128 < exit_code < 160:
            return _STOPPED_HINT
    return _HINTS.get(step or "", _DEFAULT_HINT)

_REASONS: dict[str, str] = {
    "plugged in, due": "the disk was plugged in",
    "plugged in, always": "the disk was plugged in",
    "asked": "you asked for it",
    "interval elapsed": "one was due",
    "resumed from sleep, due": "one was due when the computer woke up",
    "retry after failure": "the last one failed",
    "plugged in, unfinished": "the disk was plugged in again: it carries on with the unfinished backup",
}


def step_words(step: str | None) -> str:
    """A cycle step in the user's words ("transfer" → "copying files")."""
    if not step:
        return "working"
    return _STEPS.get(step, step.replace("-", " "))


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def age(then: float | None, now: float) -> str:
    """How long ago: "just now", "5 minutes ago", "3 hours ago", "4 days ago"; "never" for None."""
    if then is None:
        return "never"
    seconds = max(0.0, now - then)
    if seconds < 60:
        return "just now"
    if seconds < 3600:
        return _plural(int(seconds // 60), "minute") + " ago"
    if seconds < 48 * 3600:
        return _plural(int(seconds // 3600), "hour") + " ago"
    return _plural(int(seconds // 86400), "day") + " ago"


def when(moment: float, now: float, tz: dt.tzinfo | None = None) -> str:
    """A coming moment: "at 16:00", "tomorrow at 09:00", "on Mon 24 Nov at 09:00" (local time unless tz)."""
    at = dt.datetime.fromtimestamp(moment, tz)
    today = dt.datetime.fromtimestamp(now, tz).date()
    clock = at.strftime("%H:%M")
    if at.date() <= today:
        return f"at {clock}"
    if at.date() == today + dt.timedelta(days=1):
        return f"tomorrow at {clock}"
    return f"on {at.strftime('%a')} {at.day} {at.strftime('%b')} at {clock}"


def day(moment: float, now: float, tz: dt.tzinfo | None = None) -> str:
    """A past day: "Sat 15 Nov", with the year when it is not this one's (local time unless tz)."""
    at = dt.datetime.fromtimestamp(moment, tz)
    year = f" {at.year}" if at.year != dt.datetime.fromtimestamp(now, tz).year else ""
    return f"{at.strftime('%a')} {at.day} {at.strftime('%b')}{year}"


def past(moment: float, now: float, tz: dt.tzinfo | None = None) -> str:
    """A past moment: "today at 14:03", "yesterday at 14:03", "on Sat 15 Nov at 14:03"."""
    at = dt.datetime.fromtimestamp(moment, tz)
    today = dt.datetime.fromtimestamp(now, tz).date()
    clock = at.strftime("%H:%M")
    if at.date() == today:
        return f"today at {clock}"
    if at.date() == today - dt.timedelta(days=1):
        return f"yesterday at {clock}"
    return f"on {day(moment, now, tz)} at {clock}"


def duration(seconds: float) -> str:
    """A span: "9 s", "3 min 20 s", "1 h 5 min"."""
    total = int(round(max(0.0, seconds)))
    if total < 60:
        return f"{total} s"
    if total < 3600:
        minutes, rest = divmod(total, 60)
        return f"{minutes} min {rest} s" if rest else f"{minutes} min"
    hours, rest = divmod(total, 3600)
    minutes = rest // 60
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def _time_left(seconds: float) -> str:
    if seconds < 60:
        return "less than a minute left"
    if seconds < 3600:
        return "about " + _plural(int(round(seconds / 60)), "minute") + " left"
    hours, rest = divmod(int(seconds), 3600)
    minutes = rest // 60
    return f"about {_plural(hours, 'hour')}" + (f" {minutes} min" if minutes else "") + " left"


def started_text(disk: str, reason: str, last_success: float | None, now: float, *, remote: bool = False) -> Text:
    """Backup started: which disk (or server, ``remote``), why, and the last backup's age."""
    why = _REASONS.get(reason, reason)
    if last_success is None:
        first = f"First backup to this {'server' if remote else 'disk'}: it can take a while."
    else:
        first = f"Last backup {age(last_success, now)}."
    because = f" Started because {why}." if why else ""
    keep = " Stay on this network until it is complete." if remote else " Keep the disk plugged in until it is safe to unplug."
    return Text(f"Backing up to {disk}", f"{first}{because}{keep}", NORMAL)


def progress_text(disk: str, event: ProgressEvent | None, step: str | None) -> Text:
    """Progress: percent, time left, the current step (and what was copied so far).

    ``event``: None before the transfer's first progress (the tooltip while unlocking).
    """
    percent = event.percent if event is not None else None
    summary = f"Backing up to {disk}" + (f": {int(min(100.0, max(0.0, percent)))}%" if percent is not None else "")
    eta = event.eta if event is not None else None
    left = _time_left(eta) if eta is not None else "working out the time left"
    copied = []
    if event is not None:
        copied = [_plural(event.files, "file"), human_size(event.bytes)]
    so_far = f" ({', '.join(copied)} so far)" if copied else ""
    now = f"\nNow: {_short(posixpath.basename(event.current.rstrip('/')) or event.current)}" if event and event.current else ""
    return Text(summary, f"{left[0].upper()}{left[1:]}: {step_words(step or 'transfer')}{so_far}.{now}", LOW)


def _short(name: str, room: int = 48) -> str:
    """``name`` in at most ``room`` characters: a long one keeps its start and its end (the extension)."""
    if len(name) <= room:
        return name
    keep = room - 1
    return f"{name[: keep - keep // 3]}…{name[len(name) - keep // 3:]}"


def _left_words(disk: str, left: DiskLeft | None, detail: str) -> str:
    if left is None:
        return "The disk is being locked… do not unplug it yet."
    if left == "locked":
        return f"It is safe to unplug {disk}."
    if left == "mounted":
        where = f" at {detail}" if detail else ""
        return f"{disk} stays unlocked and mounted{where}, as it was found: eject it before you unplug it."
    if left == "unlocked":
        return f"{disk} was unmounted but stays unlocked, as it was found: eject it before you unplug it."
    if left == "lock-failed":
        why = detail.strip().rstrip(".") or "it is still unlocked"
        return f"Could not lock {disk}: {why}. Do not unplug it yet."
    return f"Eject {disk} from the file manager before you unplug it."


def completed_text(disk: str, event: CompleteEvent, left: DiskLeft | None, detail: str = "", *, remote: bool = False) -> Text:
    """Completed: what changed, how long it took, the snapshot, and how the disk was left.

    ``left``: None while the disk is still being closed; otherwise the
    status's ``disk_left`` ("locked" is the only one that says "safe to
    unplug"), with ``disk_left_detail`` (the mount point, or why locking failed).
    """
    stats = event.statistics
    files = stats.get("transferred_files")
    changed_bytes = stats.get("transferred_size")
    if files == 0:
        changed = "Nothing changed since the last backup"
    elif files is not None:
        changed = f"{_plural(int(files), 'file')} changed" + (
            f" ({human_size(changed_bytes)})" if changed_bytes is not None else ""
        )
    else:
        changed = "Backed up"
    took = event.duration
    line = changed + (f" in {duration(took)}" if took is not None else "") + "."
    if event.snapshot:
        line += f" Snapshot {event.snapshot}."
    partial = event.partial
    if partial:
        line += " Some files could not be read: the log lists them."
    if event.flagged:
        line += " This snapshot has far fewer files than the last one: check that nothing is missing."
    summary = f"Backup to {disk} finished with problems" if partial else f"Backup to {disk} complete"
    if remote:  # a server: nothing to unplug or lock
        return Text(summary, f"{line}\nThe snapshot is complete on {disk}.", NORMAL)
    if left == "lock-failed":
        summary += ", but the disk is still unlocked"
    return Text(summary, f"{line}\n{_left_words(disk, left, detail)}", NORMAL)


def failed_text(
    disk: str | None, step: str | None, message: str, snapshot: str | None = None, exit_code: int | None = None
) -> Text:
    """Failed: the step, the cause, what to do, and that earlier snapshots are untouched (critical).

    ``snapshot``: the cycle completed this snapshot before failing (it could
    not unmount or lock the disk). ``exit_code``: the cycle's exit status,
    which tells the cause (a full disk, a missing one, ...) and so what to do.
    """
    hint = failure_hint(step, exit_code)
    cause = message.strip().rstrip(".") or "the backup failed"
    if snapshot:
        return Text(
            f"Backed up to {disk or 'the disk'}, but the disk is still open",
            f"Snapshot {snapshot} is complete, but {step_words(step)} failed: {cause}.\n"
            f"{hint} Do not unplug it yet. Earlier snapshots are untouched.",
            CRITICAL,
        )
    where = f"to {disk} " if disk else ""
    return Text(
        f"Backup {where}failed while {step_words(step)}",
        f"{cause[0].upper()}{cause[1:]}.\n{hint}\nEarlier snapshots are untouched.",
        CRITICAL,
    )


def stopped_text(disk: str, left: DiskLeft | None, detail: str = "") -> Text:
    """Stopped as the user asked: not a failure (normal urgency); what was copied is kept, and how the disk was left."""
    return Text(
        f"Backup to {disk} stopped",
        "Stopped as you asked. What was copied so far is kept: the next backup carries on from there. "
        f"Earlier snapshots are untouched.\n{_left_words(disk, left, detail)}",
        NORMAL,
    )


def missed_text(missed: MissedSummary, now: float, tz: dt.tzinfo | None = None) -> Text:
    """A failure no one could be told about, shown at the next login: when, and how many since."""
    failure = missed.latest
    text = failed_text(failure.disk, failure.step, failure.message, failure.snapshot, failure.exit_code)
    body = text.body
    if missed.times > 1:
        body += f"\nBackups to {failure.disk} failed {missed.times} times since {day(missed.first, now, tz)}."
    return Text(f"{text.summary} {past(failure.time, now, tz)}", body, CRITICAL)


def reminder_text(disk: str, last_success: float | None, now: float, tz: dt.tzinfo | None = None) -> Text:
    """No backup succeeded for a while: the disk, and the date of its last backup ("never")."""
    plug = f"Plug {disk} in: the backup starts by itself."
    if last_success is None:
        return Text(f"No backup to {disk} yet", f"Last backup: never. {plug}", NORMAL)
    days = max(0, int((now - last_success) // DAY))
    return Text(
        f"No backup to {disk} for {_plural(days, 'day')}", f"Last backup on {day(last_success, now, tz)}. {plug}", NORMAL
    )


def remote_reminder_text(name: str, last_success: float | None, now: float, tz: dt.tzinfo | None = None) -> Text:
    """No backup to a server succeeded for a while: it was not reachable (or failed) all that time."""
    reach = f"The backup starts by itself whenever {name} can be reached: `backup-agent status` says why it waits."
    if last_success is None:
        return Text(f"No backup to {name} yet", f"Last backup: never. {reach}", NORMAL)
    days = max(0, int((now - last_success) // DAY))
    return Text(
        f"No backup to {name} for {_plural(days, 'day')}", f"Last backup on {day(last_success, now, tz)}. {reach}", NORMAL
    )


def offsite_text(name: str, state: str, snapshot: str | None, message: str) -> Text:
    """An off-site copy ended: "copied off-site", or why not (the local backup stands either way)."""
    if state == "done":
        what = f"The snapshot {snapshot}" if snapshot else "The newest snapshot"
        return Text(f"Copied off-site to {name}", f"{what} is copied, encrypted, to {name}.", LOW)
    why = sentence_of(message) or "The off-site copy failed."
    return Text(f"Not copied off-site to {name}", f"{why} The backup on the disk is complete and untouched.", NORMAL)


def offsite_reminder_text(name: str, last_copy: float | None, now: float, tz: dt.tzinfo | None = None) -> Text:
    """No off-site copy for a while: the repository, and the date of its last copy ("never")."""
    if last_copy is None:
        return Text(f"No off-site copy to {name} yet", "Back up with the disk while online, or run backup-agent init --offsite.", NORMAL)
    days = max(0, int((now - last_copy) // DAY))
    return Text(
        f"No off-site copy to {name} for {_plural(days, 'day')}",
        f"Last copy on {day(last_copy, now, tz)}. The next backup while online copies the newest snapshot.",
        NORMAL,
    )


def sentence_of(text: str) -> str:
    text = text.strip().rstrip(".")
    return f"{text[0].upper()}{text[1:]}." if text else ""


def removed_text(disk: str) -> Text:
    """The disk was unplugged while a backup was being written to it."""
    return Text(
        f"{disk} was unplugged during the backup",
        "This backup did not finish. Plug the disk back in to carry on where it stopped. "
        "Earlier snapshots are untouched.",
        CRITICAL,
    )


def skipped_text(
    disk: str, last_success: float | None, next_due: float, now: float, tz: dt.tzinfo | None = None
) -> Text:
    """The user plugged the disk in, but the last backup is recent: when the next one is due."""
    last = f"Last backup {age(last_success, now)}. " if last_success is not None else ""
    return Text(
        f"{disk}: no backup needed yet",
        f"{last}The next one is due {when(next_due, now, tz)}; leave the disk plugged in, "
        "or plug it in again then.",
        LOW,
    )


def waiting_text(disk: str, reason: str, until: float | None, now: float, tz: dt.tzinfo | None = None) -> Text:
    """A due backup waits for a condition (battery, quiet hours, a metered connection): not a failure, low urgency."""
    end = f" It starts by itself {when(until, now, tz)}, when that ends." if until is not None else (
        " It starts by itself when that ends."
    )
    return Text(f"{disk}: backup waits", f"A backup is due, but it waits: {reason}.{end}", LOW)
