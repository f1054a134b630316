"""The JSON-lines events: the only interface between the cycle and the agent.

One JSON object per line on stdout. Every object has ``event`` (its type) and
``time`` (ISO 8601 with offset). The types and their fields are documented in
the README; the agent reads them back with :func:`decode`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import IO, Any, Callable

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
EVENT_TYPES = ("step", "progress", "warning", "complete", "error")


def now_iso() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def step(name: str, state: str, **detail: Any) -> dict[str, Any]:
    """A step started (``state="start"``) or finished (``"done"``, ``"skipped"``)."""
    return {"event": "step", "step": name, "state": state, **detail}


def progress(
    percent: float | None,
    bytes_done: int,
    files: int,
    rate: float | None,
    eta: int | None,
) -> dict[str, Any]:
    return {"event": "progress", "percent": percent, "bytes": bytes_done, "files": files, "rate": rate, "eta": eta}


def warning(step_name: str, message: str, **detail: Any) -> dict[str, Any]:
    return {"event": "warning", "step": step_name, "message": message, **detail}


def complete(snapshot: str | None, **detail: Any) -> dict[str, Any]:
    return {"event": "complete", "snapshot": snapshot, **detail}


def error(step_name: str | None, message: str, exit_code: int, snapshots_untouched: bool) -> dict[str, Any]:
    return {
        "event": "error",
        "step": step_name,
        "message": message,
        "exit_code": exit_code,
        "snapshots_untouched": snapshots_untouched,
    }


def encode(event: dict[str, Any]) -> str:
    """One line of JSON; ``time`` and ``version`` are added when missing."""
    if event.get("event") not in EVENT_TYPES:
        raise ValueError(f"unknown event type {event.get('event')!r}")
    full = {"version": PROTOCOL_VERSION, "time": now_iso(), **event}
    return json.dumps(full, ensure_ascii=False, separators=(",", ":"), sort_keys=False)


def decode(line: str) -> dict[str, Any]:
    """Parse one line back; raises ValueError for anything that is not an event."""
    value = json.loads(line)
    if not isinstance(value, dict) or value.get("event") not in EVENT_TYPES:
        raise ValueError(f"not a backup-agent event: {line[:80]!r}")
    return value


class Emitter:
    """Sends events to subscribers: JSON lines on a stream and/or callbacks.

    Losing the reader (the agent died) must never stop a backup: a write that
    fails is logged once and the stream is dropped.
    """

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream
        self._subscribers: list[Callable[[dict[str, Any]], None]] = []

    def subscribe(self, callback: Callable[[dict[str, Any]], None]) -> None:
        self._subscribers.append(callback)

    def emit(self, event: dict[str, Any]) -> None:
        if self._stream is not None:
            try:
                self._stream.write(encode(event) + "\n")
                self._stream.flush()
            except (BrokenPipeError, OSError) as exc:
                log.warning("event reader went away (%s); the backup goes on without it", exc)
                self._stream = None
        for callback in self._subscribers:
            callback(event)
