"""The JSON-lines events: the only interface between the cycle and the agent.

One JSON object per line on stdout. Every object has ``version``, ``time``
(ISO 8601 with offset) and ``event`` (its type); the types and their fields
are documented in the README. Each type is one frozen dataclass here: the
cycle builds them with :func:`step`, :func:`progress`, :func:`warning`,
:func:`complete` and :func:`error` and writes them with :func:`encode`; the
agent reads them back with :func:`decode`, which checks the version and the
types of the fields once, so that its listeners get typed values and check
nothing again.

A line of a newer protocol than this one is refused with
:class:`ProtocolVersionError` (the cycle and the agent come from different
installs: the agent cannot tell what the new fields mean); an older or equal
version is read, since version 1 is the only one there has been.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
from dataclasses import dataclass, field
from typing import IO, Any, Callable, ClassVar, Mapping, Union

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
EVENT_TYPES = ("step", "progress", "warning", "complete", "error")


def now_iso() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


class ProtocolVersionError(ValueError):
    """A line of a newer protocol than this program reads."""

    def __init__(self, version: int) -> None:
        super().__init__(
            f"the backup cycle speaks event protocol version {version}, this agent reads up to {PROTOCOL_VERSION}: "
            "the agent and the cycle come from different installs; restart the agent after upgrading backup-agent"
        )
        self.version = version


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)  # type: ignore[arg-type]


def _check(kind: str, name: str, value: object, ok: bool) -> None:
    if not ok:
        raise ValueError(f"{kind} event: {name} is {value!r}, which is not what the protocol says")


@dataclass(frozen=True)
class StepEvent:
    """A step started (``state="start"``) or finished (``"done"``, ``"skipped"``, ...).

    ``detail`` holds the step's own fields as they are on the wire (the
    README lists them per step); nothing in the agent reads them but logs.
    """

    kind: ClassVar[str] = "step"
    step: str
    state: str
    detail: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self.kind, "step", self.step, isinstance(self.step, str))
        _check(self.kind, "state", self.state, isinstance(self.state, str))

    def fields(self) -> dict[str, Any]:
        return {"step": self.step, "state": self.state, **self.detail}


@dataclass(frozen=True)
class ProgressEvent:
    """The transfer's progress: ``percent`` (0-100, None before rsync knows), ``eta`` (s, or None).

    The off-site step (``step="offsite"``) adds what restic knows besides:
    the totals, the errors so far and the file being read (README,
    "JSON-lines protocol"); the local transfer leaves them out (None).
    """

    kind: ClassVar[str] = "progress"
    percent: float | None
    bytes: int
    files: int
    rate: float | None
    eta: int | None
    step: str | None = None
    bytes_total: int | None = None
    files_total: int | None = None
    errors: int | None = None
    current: str | None = None

    def __post_init__(self) -> None:
        _check(self.kind, "percent", self.percent, self.percent is None or _is_number(self.percent))
        _check(self.kind, "bytes", self.bytes, _is_int(self.bytes))
        _check(self.kind, "files", self.files, _is_int(self.files))
        _check(self.kind, "rate", self.rate, self.rate is None or _is_number(self.rate))
        _check(self.kind, "eta", self.eta, self.eta is None or _is_int(self.eta))
        _check(self.kind, "step", self.step, self.step is None or isinstance(self.step, str))
        for name in ("bytes_total", "files_total", "errors"):
            value = getattr(self, name)
            _check(self.kind, name, value, value is None or _is_int(value))
        _check(self.kind, "current", self.current, self.current is None or isinstance(self.current, str))

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"percent": self.percent, "bytes": self.bytes, "files": self.files, "rate": self.rate, "eta": self.eta}
        for name in _PROGRESS_EXTRA:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


_PROGRESS_EXTRA = ("step", "bytes_total", "files_total", "errors", "current")


@dataclass(frozen=True)
class WarningEvent:
    """Something the user should know that did not stop the cycle (rsync adds ``code`` and ``errors``)."""

    kind: ClassVar[str] = "warning"
    step: str
    message: str
    detail: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self.kind, "step", self.step, isinstance(self.step, str))
        _check(self.kind, "message", self.message, isinstance(self.message, str))

    def fields(self) -> dict[str, Any]:
        return {"step": self.step, "message": self.message, **self.detail}


# What each field of a complete event may be: the backup's (snapshot, skipped,
# partial, ...), open's (mount_point, snapshots, already_open, ...) and eject's
# (already_closed). A field not listed is carried as it is.
_STRING_OR_NULL = ("skipped", "flagged", "disk", "mount_point", "repository", "snapshots")
_BOOLEANS = ("partial", "dry_run", "already_open", "already_closed", "read_only")


@dataclass(frozen=True)
class CompleteEvent:
    """The command finished; ``detail`` holds its fields as on the wire, checked once.

    The properties are the typed reading of the fields the agent uses.
    """

    kind: ClassVar[str] = "complete"
    snapshot: str | None
    detail: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self.kind, "snapshot", self.snapshot, self.snapshot is None or isinstance(self.snapshot, str))
        for name in _STRING_OR_NULL:
            value = self.detail.get(name)
            _check(self.kind, name, value, value is None or isinstance(value, str))
        for name in _BOOLEANS:
            value = self.detail.get(name, False)
            _check(self.kind, name, value, isinstance(value, bool))
        statistics = self.detail.get("statistics", {})
        _check(self.kind, "statistics", statistics, isinstance(statistics, Mapping))
        duration = self.detail.get("duration")
        _check(self.kind, "duration", duration, duration is None or _is_number(duration))

    def fields(self) -> dict[str, Any]:
        return {"snapshot": self.snapshot, **self.detail}

    def _text(self, name: str) -> str | None:
        value = self.detail.get(name)
        return value if isinstance(value, str) else None

    @property
    def skipped(self) -> str | None:
        """Why nothing was done (the disk is not attached, ...); None when the backup ran."""
        return self._text("skipped")

    @property
    def flagged(self) -> str | None:
        """Why the snapshot looks suspicious (far fewer files than the last one)."""
        return self._text("flagged")

    @property
    def snapshots(self) -> str | None:
        """open: the folder of snapshots to show."""
        return self._text("snapshots")

    @property
    def partial(self) -> bool:
        return bool(self.detail.get("partial", False))

    @property
    def already_open(self) -> bool:
        return bool(self.detail.get("already_open", False))

    @property
    def already_closed(self) -> bool:
        return bool(self.detail.get("already_closed", False))

    @property
    def duration(self) -> float | None:
        value = self.detail.get("duration")
        return float(value) if value is not None else None

    @property
    def statistics(self) -> dict[str, int | float]:
        """rsync's counters (the README lists them); what is not a number is left out."""
        given: Mapping[str, Any] = self.detail.get("statistics", {})
        return {str(key): value for key, value in given.items() if _is_number(value)}


@dataclass(frozen=True)
class ErrorEvent:
    """The command stopped; ``exit_code`` is its exit status (agent.core.errors)."""

    kind: ClassVar[str] = "error"
    step: str | None
    message: str
    exit_code: int
    snapshots_untouched: bool

    def __post_init__(self) -> None:
        _check(self.kind, "step", self.step, self.step is None or isinstance(self.step, str))
        _check(self.kind, "message", self.message, isinstance(self.message, str))
        _check(self.kind, "exit_code", self.exit_code, _is_int(self.exit_code))
        _check(self.kind, "snapshots_untouched", self.snapshots_untouched, isinstance(self.snapshots_untouched, bool))

    def fields(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "message": self.message,
            "exit_code": self.exit_code,
            "snapshots_untouched": self.snapshots_untouched,
        }


Event = Union[StepEvent, ProgressEvent, WarningEvent, CompleteEvent, ErrorEvent]


# -- the producers' constructors (the cycle, open, eject) -------------------------


def step(name: str, state: str, **detail: Any) -> StepEvent:
    """A step started (``state="start"``) or finished (``"done"``, ``"skipped"``)."""
    return StepEvent(name, state, detail)


def progress(
    percent: float | None,
    bytes_done: int,
    files: int,
    rate: float | None,
    eta: int | None,
    **extra: Any,
) -> ProgressEvent:
    """``extra``: the off-site step's fields (``step``, ``bytes_total``, ``files_total``, ``errors``, ``current``)."""
    return ProgressEvent(percent, bytes_done, files, rate, eta, **extra)


def warning(step_name: str, message: str, **detail: Any) -> WarningEvent:
    return WarningEvent(step_name, message, detail)


def complete(snapshot: str | None, **detail: Any) -> CompleteEvent:
    return CompleteEvent(snapshot, detail)


def error(step_name: str | None, message: str, exit_code: int, snapshots_untouched: bool) -> ErrorEvent:
    return ErrorEvent(step_name, message, exit_code, snapshots_untouched)


# -- the wire -------------------------------------------------------------------------


def encode(event: Event) -> str:
    """One line of JSON: ``version``, ``time``, ``event``, then the event's fields."""
    full = {"version": PROTOCOL_VERSION, "time": now_iso(), "event": event.kind, **event.fields()}
    return json.dumps(full, ensure_ascii=False, separators=(",", ":"), sort_keys=False)


def _from_fields(kind: str, value: dict[str, Any]) -> Event:
    """The typed event from a line's fields (without version, time and event); KeyError when one is missing.

    A field whose value may be null (a complete event's ``snapshot``, an
    error's ``step``) is read as null when it is left out; an error without
    ``snapshots_untouched`` claims nothing (false).
    """
    if kind == "step":
        return StepEvent(value.pop("step"), value.pop("state"), value)
    if kind == "progress":
        extra = {name: value.get(name) for name in _PROGRESS_EXTRA}
        return ProgressEvent(value["percent"], value["bytes"], value["files"], value["rate"], value["eta"], **extra)
    if kind == "warning":
        return WarningEvent(value.pop("step"), value.pop("message"), value)
    if kind == "complete":
        return CompleteEvent(value.pop("snapshot", None), value)
    return ErrorEvent(value.get("step"), value["message"], value["exit_code"], value.get("snapshots_untouched", False))


def decode(line: str) -> Event:
    """Parse and check one line: the boundary where the wire's values become typed.

    Raises :class:`ProtocolVersionError` for a newer protocol, ValueError
    for anything else that is not an event of this protocol.
    """
    value = json.loads(line)
    if not isinstance(value, dict) or value.get("event") not in EVENT_TYPES:
        raise ValueError(f"not a backup-agent event: {line[:80]!r}")
    version = value.pop("version", PROTOCOL_VERSION)
    if not _is_int(version) or version < 1:
        raise ValueError(f"not a backup-agent event (version {version!r}): {line[:80]!r}")
    if version > PROTOCOL_VERSION:
        raise ProtocolVersionError(version)
    kind = value.pop("event")
    value.pop("time", None)
    try:
        return _from_fields(kind, value)
    except KeyError as exc:
        raise ValueError(f"{kind} event without {exc}: {line[:80]!r}") from None


class JsonLines:
    """One JSON object per line on a stream: the interface between the root cycle and the desktop agent.

    A report channel (agent/engine/channels.py). Losing the reader (the agent
    died) must never stop a backup: a write that fails is logged once and
    the stream is dropped.
    """

    def __init__(self, stream: IO[str]) -> None:
        self._stream: IO[str] | None = stream

    def send(self, event: Event) -> None:
        if self._stream is None:
            return
        line = encode(event) + "\n"
        try:
            self._stream.write(line)
            self._stream.flush()
        except OSError as exc:
            log.warning("event reader went away (%s); the backup goes on without it", exc)
            self._stream = None


class Emitter:
    """Sends events to subscribers, in the order they subscribed; ``stream``: JSON lines there first."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._subscribers: list[Callable[[Event], None]] = []
        if stream is not None:
            self.subscribe(JsonLines(stream).send)

    def subscribe(self, callback: Callable[[Event], None]) -> None:
        self._subscribers.append(callback)

    def emit(self, event: Event) -> None:
        for callback in self._subscribers:
            callback(event)
