"""When did a backup last succeed: the record the cycle writes, and ``check-stale``'s judgement.

The record lives under ``[system] state_dir`` (``last-success.json``), not
on the backup disk: the case to notice is the disk that went missing, and
then the repository cannot be read. It holds the time, the snapshot and the
repository of the last run that made a snapshot; a partial or flagged
snapshot counts (the run reports those as failures itself). When there is no
record yet, ``check-stale`` writes one that says since when it has watched,
so a machine that never managed a backup is noticed too, ``remind_after``
days after the first check.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import stat
from dataclasses import dataclass
from typing import Any, Final, Sequence

from agent.core.events import CompleteEvent, ErrorEvent, Event
from agent.core.files import write_atomic
from agent.engine.reports import Verdict

log = logging.getLogger(__name__)

RECORD: Final = "last-success.json"
_MAX_RECORD: Final = 64 * 1024


def record_path(state_dir: str) -> str:
    return os.path.join(state_dir, RECORD)


@dataclass(frozen=True)
class Record:
    """The last success (``snapshot`` set), or only since when ``check-stale`` watches (``snapshot`` None)."""

    time: dt.datetime
    snapshot: str | None = None
    repository: str | None = None

    def encode(self) -> bytes:
        value: dict[str, Any] = {"time": self.time.isoformat(timespec="seconds")}
        if self.snapshot is not None:
            value.update(snapshot=self.snapshot, repository=self.repository)
        else:
            value["watching_since"] = True
        return (json.dumps(value, indent=1) + "\n").encode("utf-8")


def read_record(state_dir: str) -> Record | None:
    """The record, or None when there is none; ValueError for one that cannot be read as such."""
    path = record_path(state_dir)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path}: not a regular file")
        raw = os.read(fd, _MAX_RECORD + 1)
    finally:
        os.close(fd)
    try:
        value = json.loads(raw[:_MAX_RECORD].decode("utf-8"))
        time = dt.datetime.fromisoformat(value["time"])
        if time.tzinfo is None:
            raise ValueError("a time without its offset")
        snapshot = value.get("snapshot")
        repository = value.get("repository")
        if not (snapshot is None or isinstance(snapshot, str)) or not (repository is None or isinstance(repository, str)):
            raise ValueError("snapshot or repository is not a string")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a record of backup-agent ({exc}); remove it, the next backup writes it again") from None
    return Record(time, snapshot, repository)


def write_record(state_dir: str, record: Record) -> None:
    """Atomically, readable by all (it holds no secret); the state directory is made root's if missing."""
    os.makedirs(state_dir, mode=0o755, exist_ok=True)
    write_atomic(record_path(state_dir), record.encode(), mode=0o644)


def made_snapshot(events: Sequence[Event]) -> str | None:
    """The snapshot a run made and kept to the end (no error after it), or None."""
    if any(isinstance(e, ErrorEvent) for e in events):
        return None
    done = next((e for e in reversed(events) if isinstance(e, CompleteEvent)), None)
    if done is None or done.skipped is not None or bool(done.detail.get("dry_run", False)):
        return None
    return done.snapshot


class SuccessRecord:
    """A channel that writes the record when the run made a snapshot (see the module's docstring)."""

    def __init__(self, state_dir: str, repository: str) -> None:
        self.state_dir = state_dir
        self.repository = repository
        self.events: list[Event] = []

    def send(self, event: Event) -> None:
        self.events.append(event)

    def finish(self, problem: BaseException | None, tail: Sequence[str]) -> None:
        snapshot = made_snapshot(self.events)
        if snapshot is None:
            return
        now = dt.datetime.now().astimezone()
        try:
            write_record(self.state_dir, Record(now, snapshot, self.repository))
        except OSError as exc:
            log.error("the record of this success could not be written in %s (%s); check-stale will not see it", self.state_dir, exc.strerror)


def stale_verdict(record: Record, now: dt.datetime, remind_after: int, host: str) -> Verdict | None:
    """A ``stale`` verdict when the record is ``remind_after`` days old or older (pure); None otherwise or when 0."""
    if remind_after <= 0:
        return None
    age = now - record.time
    if age < dt.timedelta(days=remind_after):
        return None
    days = age.days
    when = record.time.isoformat(timespec="minutes")
    if record.snapshot is None:
        first = f"No backup of {host} has succeeded since the check began watching, {days} days ago ({when})."
    else:
        first = f"No backup of {host} has succeeded for {days} days: the last was snapshot {record.snapshot} at {when}, in {record.repository}."
    text = "\n".join(
        [
            first,
            "",
            "Is the backup disk attached, and does the backup timer or the desktop agent run? "
            "`systemctl status backup-agent.timer` and `journalctl -u backup-agent` say what happened; "
            "`backup-agent backup` runs one now.",
        ]
    )
    return Verdict("stale", f"backup-agent on {host}: no backup for {days} days", text)
