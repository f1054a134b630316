"""What the desktop agent knows and tells: its status, and who listens.

The agent (``daemon``) owns one :class:`AgentStatus` and changes it as udev,
the schedule and the cycle's JSON lines say; the D-Bus service, the
notifications and the tray are :class:`Listener` subscribers that only read
it and relay it. A listener's failure is logged and never stops a backup.
The controller protocol is what D-Bus methods (and so ``backup-agent now``,
``stop``, ``status``) call into: no paths, no commands, nothing a caller could
use to change what root reads, writes or runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Protocol, runtime_checkable

from agent.core.events import CompleteEvent, ProgressEvent

State = Literal["idle", "disk-attached", "running", "failed"]
#: "stopped": the user stopped the last cycle (not a failure; its transfer is kept for the next run).
Result = Literal["none", "success", "partial", "failure", "stopped"]
#: How the last cycle left the disk: "locked" (unmounted and locked by the
#: cycle: safe to unplug), "unlocked" (unmounted, but left unlocked as it was
#: found), "mounted" (left unlocked and mounted as it was found),
#: "lock-failed" (unmounted, but locking it failed); "" while a cycle runs or
#: when the cycle did not say.
DiskLeft = Literal["", "locked", "unlocked", "mounted", "lock-failed"]


def disk_left(closing: Mapping[str, str]) -> DiskLeft:
    """How a cycle left the disk, from its closing steps' reports (pure).

    ``closing`` maps "unmount" and "lock-disk" to the state the cycle
    reported for them ("done", "left-as-found" or "failed"); a cycle that
    reported neither (it never opened the disk) gives "".
    """
    lock = closing.get("lock-disk")
    if lock == "done":
        return "locked"  # a filesystem is never locked under a mount: unmounted too
    if lock == "failed":
        return "lock-failed"
    if lock == "left-as-found":
        return "unlocked" if closing.get("unmount") == "done" else "mounted"
    return ""


@dataclass
class DiskStatus:
    """One configured disk, attached or not: what ``status`` lists for each."""

    name: str
    attached: bool = False
    ejected: bool = False  # closed by the user: no backup until it is plugged in again or asked for
    last_success: float | None = None
    last_result: Result = "none"
    last_message: str = ""
    next_due: float | None = None  # None: not attached, ejected, or a backup runs
    unfinished: bool = False  # the last run failed or was stopped: the next plug-in carries on with it
    skipped: str = ""  # why a due backup waits now (agent.policy.conditions: battery, quiet hours...); "": it does not
    # A remote destination (a [[remote]]: a server) is listed here too; "attached": the network may reach it
    # and it answered the last look. "waiting": why it is not tried now ("waiting for nas (no network)"), never a failure.
    remote: bool = False
    waiting: str = ""
    last_failure: float | None = None  # epoch seconds of the last failed run (None: none since the last success)


@dataclass
class OffsiteStatus:
    """One ``[[offsite]]`` as the agent saw its last copy (the cycle's ``offsite`` steps).

    ``result``: "none" (no copy seen yet), "copied" or "failed"; a skipped
    copy (not due, metered) changes only ``message``.
    """

    name: str
    last_copy: float | None = None  # epoch seconds of the last copy that succeeded
    snapshot: str | None = None  # the local snapshot it copied
    result: str = "none"
    message: str = ""
    retention: str = ""  # why forget/prune did not run ("pruning belongs to the server's owner"), or failed
    check: str = ""  # the last rolling check: "ok (1/12)", or what it found


def offsite_maintained(previous: OffsiteStatus, step: str, state: str, detail: Mapping[str, Any]) -> OffsiteStatus:
    """What an ``offsite-forget``/``-prune``/``-check`` step's end makes of the record (pure)."""
    said = detail.get("message") if state == "failed" else detail.get("reason")
    why = said if isinstance(said, str) else ""
    if step == "offsite-check":
        if state == "done":
            return dataclasses.replace(previous, check=f"ok ({detail.get('subset', '?')})")
        return dataclasses.replace(previous, check=why) if why else previous
    if state == "done" and step == "offsite-forget":
        return dataclasses.replace(previous, retention="")
    return dataclasses.replace(previous, retention=why) if state in ("skipped", "failed") and why else previous


def offsite_from(value: Any) -> OffsiteStatus | None:
    """An OffsiteStatus from its saved or sent fields; None when it has no name (pure)."""
    name = value.get("name") if isinstance(value, Mapping) else None
    if not isinstance(name, str) or not name:
        return None
    found = OffsiteStatus(name)
    last = value.get("last_copy")
    if isinstance(last, (int, float)) and not isinstance(last, bool):
        found.last_copy = float(last)
    for key in ("snapshot", "result", "message", "retention", "check"):
        if isinstance(value.get(key), str):
            setattr(found, key, value[key])
    return found


def offsite_after(previous: OffsiteStatus, state: str, detail: Mapping[str, Any], now: float) -> OffsiteStatus:
    """What an ``offsite`` step event (``done``, ``failed``, ``skipped``) makes of the record (pure)."""
    said = detail.get("message") if state == "failed" else detail.get("reason")
    message = said if isinstance(said, str) else ""
    if state == "done":
        snapshot = detail.get("snapshot")
        return OffsiteStatus(previous.name, now, snapshot if isinstance(snapshot, str) else None, "copied", "")
    if state == "failed":
        return dataclasses.replace(previous, result="failed", message=message or "the off-site copy failed")
    return dataclasses.replace(previous, message=message)


@dataclass
class AgentStatus:
    """Everything a status query or a tray tooltip needs, as plain values."""

    state: State = "idle"
    disk: str | None = None  # the attached (or last seen) configured disk's name
    last_success: float | None = None  # epoch seconds of the last complete snapshot
    last_result: Result = "none"
    last_message: str = ""  # one line: the last snapshot's name, or the last error
    next_due: float | None = None  # epoch seconds; None when no disk is attached
    step: str | None = None  # the running cycle's current step
    progress: dict[str, Any] = field(default_factory=dict)  # the last progress event's fields
    cycle_pid: int | None = None  # the running cycle, also one another agent started
    disk_left: DiskLeft = ""  # how the last cycle left the disk (see DiskLeft)
    disk_left_detail: str = ""  # the mount point ("mounted"), or why locking failed ("lock-failed")
    disks: list[DiskStatus] = field(default_factory=list)  # every configured disk, in the configuration's order
    skipped: str = ""  # why the disk's due backup waits now (a condition, never a failure); "": it does not
    offsite: list[OffsiteStatus] = field(default_factory=list)  # every [[offsite]], in the configuration's order

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


EjectResult = Literal["ejected", "already", "refused", "busy", "failed"]


@dataclass(frozen=True)
class EjectReply:
    """How an eject ended: a word for programs, one line for people.

    ``ejected``: unmounted and locked now; ``already``: it was closed;
    ``refused``: a backup (or another eject) runs; ``busy``: a program keeps
    it mounted (the line names it); ``failed``: anything else (the line says what).
    """

    result: EjectResult
    message: str

    @property
    def safe(self) -> bool:
        """The disk is locked and not mounted: safe to unplug."""
        return self.result in ("ejected", "already")


BrowseResult = Literal["opened", "already", "refused", "failed"]


@dataclass(frozen=True)
class BrowseReply:
    """How opening a disk for browsing ended (``backup-agent open``).

    ``opened``: unlocked and mounted read-only now; ``already``: it was
    mounted; ``refused``: a backup or an eject runs; ``failed``: anything
    else (the line says what). ``snapshots``: the folder to show, once open.
    """

    result: BrowseResult
    message: str
    snapshots: str | None = None

    @property
    def open(self) -> bool:
        return self.result in ("opened", "already")


class Controller(Protocol):
    """What callers may ask of the agent. Replies are short words, not prose."""

    def backup_now(self, disk: str | None = None) -> str:
        """Start a cycle now (on ``disk``; None: the first attached one): "started", "running"
        (one already runs), "no-disk" or "unknown-disk"."""
        ...

    def stop(self) -> str:
        """Stop the running cycle (SIGTERM; it cleans up): "stopping" or "not-running"."""
        ...

    def not_now(self) -> str:
        """"Not now": stop the running cycle; the next try one interval later: "postponed" or "not-running"."""
        ...

    def status(self) -> AgentStatus: ...

    async def eject(self, disk: str) -> EjectReply:
        """Unmount and lock ``disk`` now (``backup-agent eject``, as root); refused while a backup runs."""
        ...

    async def browse(self, disk: str) -> BrowseReply:
        """Open ``disk`` read-only for browsing (``backup-agent open``, as root); closed again when idle."""
        ...


class Listener(Protocol):
    """A subscriber to the agent: D-Bus signals, notifications, the tray."""

    def status_changed(self, status: AgentStatus) -> None: ...

    def disk_attached(self, disk: str) -> None: ...

    def disk_removed(self, disk: str, during_backup: bool) -> None: ...

    def disk_opened(self, disk: str) -> None:
        """``disk`` was opened read-only for browsing: unlocked and mounted, so not safe to unplug now."""
        ...

    def backup_started(self, disk: str, reason: str) -> None: ...

    def progress(self, event: ProgressEvent) -> None: ...

    def backup_completed(self, event: CompleteEvent) -> None: ...

    def backup_failed(self, step: str | None, message: str, exit_code: int | None = None) -> None:
        """The cycle failed in ``step``; ``exit_code`` is the cycle's (agent.core.errors), None when not known."""
        ...


@runtime_checkable
class OffsiteListener(Protocol):
    """A listener that also hears how each off-site copy ended (the agent asks each listener whether it is one)."""

    def offsite_finished(self, offsite: OffsiteStatus, state: str) -> None:
        """``state``: the step's "done", "failed" or "skipped"; ``offsite``: the record after it."""
        ...
