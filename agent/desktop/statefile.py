"""The agent's state file: what it remembers across restarts, and what ``status`` shows when no agent runs.

``$XDG_STATE_HOME/backup-agent/state.json``: the per-disk records (last
success, failures, ejected, ...) and the last :class:`agent.desktop.state.AgentStatus`.
The agent writes it with :func:`save_state` after every change; it reads it
back at start (:func:`load_state`), and ``backup-agent status`` reads it when
no agent answers (:mod:`agent.desktop.dbus.client`). Both read through :func:`read`,
so a damaged or newer file is judged the same way by both.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Mapping

from agent.core.files import write_atomic
from agent.desktop.state import AgentStatus, Result

log = logging.getLogger(__name__)

STATE_FILE_VERSION = 1


def state_file_path(environ: Mapping[str, str] | None = None) -> str:
    """``$XDG_STATE_HOME/backup-agent/state.json`` (a relative XDG_STATE_HOME is ignored, as the spec says)."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_STATE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(env.get("HOME") or os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "backup-agent", "state.json")


@dataclass(frozen=True)
class DiskRecord:
    """What the agent remembers about one disk across restarts."""

    last_success: float | None = None  # epoch seconds the last complete snapshot is named after
    last_failure: float | None = None
    failures: int = 0  # consecutive failures since the last success
    last_result: Result = "none"
    last_message: str = ""
    last_snapshot: str | None = None
    unfinished: bool = False  # the last run failed or was stopped; no success since
    stopped_at: float | None = None  # the user stopped the last run then
    ejected: bool = False  # the user ejected the disk: closed until plugged in again or asked for
    postponed_until: float | None = None  # "Not now": the next try is then

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Saved:
    """What one reading of the state file found."""

    records: dict[str, DiskRecord]
    status: dict[str, Any] | None  # the saved AgentStatus's fields; None when the file holds none
    saved_at: float  # when it was saved (its "saved", else the file's mtime)


def _epoch(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _record_from(value: object) -> DiskRecord | None:
    if not isinstance(value, dict):
        return None
    failures = value.get("failures", 0)
    result = value.get("last_result", "none")
    snapshot = value.get("last_snapshot")
    message = value.get("last_message", "")
    return DiskRecord(
        last_success=_epoch(value.get("last_success")),
        last_failure=_epoch(value.get("last_failure")),
        failures=failures if isinstance(failures, int) and not isinstance(failures, bool) and failures >= 0 else 0,
        last_result=result if result in ("none", "success", "partial", "failure", "stopped") else "none",
        last_message=message if isinstance(message, str) else "",
        last_snapshot=snapshot if isinstance(snapshot, str) else None,
        unfinished=value.get("unfinished") is True,
        stopped_at=_epoch(value.get("stopped_at")),
        ejected=value.get("ejected") is True,
        postponed_until=_epoch(value.get("postponed_until")),
    )


def read(path: str) -> Saved | None:
    """The state file's records and status; None when it is missing, or unreadable (warned).

    A damaged file only makes the agent know less (a plugged disk is backed
    up as if never before): it is never a reason to refuse to run.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
            mtime = os.fstat(handle.fileno()).st_mtime
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read the agent's saved state %s: %s", path, exc.strerror or exc)
        return None
    try:
        document = json.loads(text)
    except ValueError as exc:
        log.warning("the agent's saved state %s is not JSON (%s); ignored", path, exc)
        return None
    if not isinstance(document, dict):
        log.warning("the agent's saved state %s is not a JSON object; ignored", path)
        return None
    version = document.get("version", STATE_FILE_VERSION)
    if version != STATE_FILE_VERSION:
        log.warning("the agent's saved state %s has version %r (this reader knows %d); read as far as possible",
                    path, version, STATE_FILE_VERSION)
    records: dict[str, DiskRecord] = {}
    disks = document.get("disks")
    if isinstance(disks, dict):
        for name, value in disks.items():
            record = _record_from(value)
            if isinstance(name, str) and record is not None:
                records[name] = record
    status = document.get("status")
    saved_at = _epoch(document.get("saved"))
    return Saved(records, status if isinstance(status, dict) else None, mtime if saved_at is None else saved_at)


def load_state(path: str) -> tuple[dict[str, DiskRecord], dict[str, Any]]:
    """The agent's view at start: the per-disk records and the last status's fields; empty when there are none."""
    saved = read(path)
    if saved is None:
        return {}, {}
    return saved.records, saved.status or {}


def save_state(
    path: str, records: Mapping[str, DiskRecord], status: AgentStatus, *, now: float | None = None
) -> None:
    """Write the state file atomically; ``backup-agent status`` reads it when no agent runs."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o700, exist_ok=True)
    data = {
        "version": STATE_FILE_VERSION,
        "saved": time.time() if now is None else now,
        "disks": {name: record.as_dict() for name, record in records.items()},
        "status": status.as_dict(),
    }
    text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n"
    write_atomic(path, text.encode(), mode=0o600, prefix=".state-")
