"""The agent's control interface on the session bus (``org.backupagent.Agent1``).

Exported by ``backup-agent run`` at :data:`~agent.desktop.dbus.OBJECT_PATH` under the
well-known name :data:`~agent.desktop.dbus.BUS_NAME`. Any program of the user may call
it, so its methods take no arguments at all: no path, no command, nothing that
could change what the root cycle reads, writes or runs. They only ask the
agent's :class:`~agent.desktop.state.Controller` to do what the tray's menu does.

:class:`ControlInterface` is also a :class:`~agent.desktop.state.Listener`: the daemon
calls its methods from the event loop's thread, and it relays them as D-Bus
signals and ``PropertiesChanged``. The README documents every member and the
sentinels used where a value is unknown (D-Bus has no null).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Annotated, Any, Callable, Mapping

from dbus_fast import DBusError, MessageType, NameFlag, RequestNameReply, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusDict, DBusDouble, DBusInt64, DBusSignature, DBusStr
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property, dbus_signal

from agent.core.errors import EXIT_BUSY, BackupAgentError
from agent.core.events import CompleteEvent, ProgressEvent
from agent.desktop.state import AgentStatus, Controller, Listener, OffsiteStatus
from agent.desktop.dbus import BUS_NAME, ERROR_PREFIX, INTERFACE, OBJECT_PATH, driver_call, session_bus_address

log = logging.getLogger(__name__)

_INT64 = (-(2**63), 2**63 - 1)

# GetStatus: each AgentStatus field and its D-Bus type. A field that is None
# is left out of the dictionary.
STATUS_SIGNATURES: dict[str, str] = {
    "state": "s",
    "disk": "s",
    "last_success": "d",
    "last_result": "s",
    "last_message": "s",
    "next_due": "d",
    "step": "s",
    "progress": "a{sv}",
    "cycle_pid": "u",
    "disk_left": "s",
    "disk_left_detail": "s",
    "disks": "aa{sv}",
    "skipped": "s",
    "offsite": "aa{sv}",
}


# BackupCompleted: besides the event's "statistics", these fields of the
# complete event are added to the dictionary when present.
_COMPLETE_EXTRAS: dict[str, str] = {"duration": "d", "partial": "b", "flagged": "s", "warnings": "x"}


class AgentAlreadyRunningError(BackupAgentError):
    """The well-known name has an owner: another agent runs in this session."""

    exit_code = EXIT_BUSY


# -- plain values <-> variants (pure) -------------------------------------------


def to_variant(value: Any) -> Variant | None:
    """A JSON-like value as a variant; None for None (left out by the callers).

    bool → b, int → x (d beyond 64 bits), float → d, str → s, a mapping →
    a{sv}, a list of strings → as, another list → av; anything else → its str.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        return Variant("b", value)
    if isinstance(value, int):
        if _INT64[0] <= value <= _INT64[1]:
            return Variant("x", value)
        return Variant("d", float(value))
    if isinstance(value, float):
        return Variant("d", value)
    if isinstance(value, str):
        return Variant("s", value)
    if isinstance(value, Mapping):
        return Variant("a{sv}", to_vardict(value))
    if isinstance(value, (list, tuple)):
        if all(isinstance(item, str) for item in value):
            return Variant("as", list(value))
        return Variant("av", [v for v in (to_variant(item) for item in value) if v is not None])
    return Variant("s", str(value))


def to_vardict(values: Mapping[Any, Any]) -> dict[str, Variant]:
    """A mapping as a{sv}: keys made strings, None values left out."""
    result: dict[str, Variant] = {}
    for key, value in values.items():
        variant = to_variant(value)
        if variant is not None:
            result[str(key)] = variant
    return result


def _typed(signature: str, value: Any) -> Variant | None:
    """value as a variant of exactly this signature, or None when it cannot be one."""
    if value is None:
        return None
    try:
        if signature in ("x", "u"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return None
            number = int(value)
            low, high = (0, 2**32 - 1) if signature == "u" else _INT64
            return Variant(signature, number) if low <= number <= high else None
        if signature == "d":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return None
            return Variant("d", float(value))
        if signature == "b":
            return Variant("b", bool(value))
        if signature == "s":
            return Variant("s", str(value))
        if signature == "a{sv}":
            return Variant("a{sv}", to_vardict(value)) if isinstance(value, Mapping) else None
        if signature == "aa{sv}":
            if not isinstance(value, (list, tuple)):
                return None
            return Variant("aa{sv}", [to_vardict(item) for item in value if isinstance(item, Mapping)])
    except (TypeError, ValueError, OverflowError):
        return None
    raise ValueError(f"no conversion to {signature}")


def status_vardict(status: AgentStatus) -> dict[str, Variant]:
    """GetStatus's reply: the AgentStatus fields with their fixed types; None fields left out."""
    result: dict[str, Variant] = {}
    for name, value in status.as_dict().items():
        if name == "offsite" and not value:
            continue  # no [[offsite]]: the reply stays as it was before off-site copies
        signature = STATUS_SIGNATURES.get(name)
        variant = _typed(signature, value) if signature else to_variant(value)
        if variant is not None:
            result[name] = variant
    return result


def progress_vardict(event: ProgressEvent, elapsed: float | None) -> dict[str, Variant]:
    """The Progress signal's dictionary from a progress event: only what is known.

    The signal's names (README, D-Bus interface) for the event's fields:
    bytes -> bytes_done, files -> files_done, eta -> remaining; "elapsed" comes from the agent.
    """
    given: dict[str, tuple[str, float | str | None]] = {
        "percent": ("d", event.percent),
        "bytes_done": ("x", event.bytes),
        "files_done": ("x", event.files),
        "rate": ("d", event.rate),
        "remaining": ("x", event.eta),
        "elapsed": ("d", elapsed),
        # The off-site step's (restic's) fields; the local transfer leaves them out.
        "step": ("s", event.step),
        "bytes_total": ("x", event.bytes_total),
        "files_total": ("x", event.files_total),
        "errors": ("x", event.errors),
        "current": ("s", event.current),
    }
    result: dict[str, Variant] = {}
    for key, (signature, value) in given.items():
        variant = _typed(signature, value)
        if variant is not None:
            result[key] = variant
    return result


def completed_vardict(event: CompleteEvent) -> dict[str, Variant]:
    """BackupCompleted's statistics: the event's statistics, plus duration, partial, flagged, warnings."""
    result = to_vardict(event.detail.get("statistics", {}))
    for key, signature in _COMPLETE_EXTRAS.items():
        variant = _typed(signature, event.detail.get(key))
        if variant is not None:
            result[key] = variant
    return result


def property_values(status: AgentStatus) -> dict[str, Any]:
    """The D-Bus properties for a status, with the sentinels the README documents."""
    percent = status.progress.get("percent") if isinstance(status.progress, Mapping) else None
    return {
        "State": str(status.state),
        "Disk": status.disk or "",
        "LastSuccess": _epoch(status.last_success),
        "LastResult": str(status.last_result),
        "LastMessage": status.last_message or "",
        "NextDue": _epoch(status.next_due),
        "Step": status.step or "",
        "Percent": float(percent) if isinstance(percent, (int, float)) and not isinstance(percent, bool) else -1.0,
    }


def _epoch(value: float | None) -> int:
    if value is None or not math.isfinite(value):
        return 0
    return int(value)


# -- the interface ----------------------------------------------------------------


class ControlInterface(ServiceInterface):
    """org.backupagent.Agent1 over a Controller; also the agent's D-Bus Listener."""

    def __init__(self, controller: Controller) -> None:
        super().__init__(INTERFACE)
        self._controller = controller
        self._published = property_values(controller.status())
        self._started: float | None = None  # monotonic time of BackupStarted

    # methods

    @dbus_method(name="BackupNow")
    def _backup_now(self) -> DBusStr:
        return self._ask("BackupNow", self._controller.backup_now)

    @dbus_method(name="BackupNowDisk")
    def _backup_now_disk(self, disk: DBusStr) -> DBusStr:
        return self._ask("BackupNowDisk", lambda: self._controller.backup_now(disk))

    @dbus_method(name="Stop")
    def _stop(self) -> DBusStr:
        return self._ask("Stop", self._controller.stop)

    @dbus_method(name="GetStatus")
    def _get_status(self) -> DBusDict:
        try:
            status = self._controller.status()
        except Exception as exc:
            raise self._failure("GetStatus", exc) from exc
        return status_vardict(status)

    def _ask(self, member: str, call: Callable[[], str]) -> str:
        try:
            word = call()
        except Exception as exc:
            raise self._failure(member, exc) from exc
        return str(word)

    @staticmethod
    def _failure(member: str, exc: Exception) -> DBusError:
        if isinstance(exc, BackupAgentError):
            return DBusError(f"{ERROR_PREFIX}.Failed", exc.message)
        log.exception("D-Bus %s failed inside the agent", member)
        return DBusError(f"{ERROR_PREFIX}.Failed", f"{member} failed inside the agent; its log says why")

    # properties (read-only; PropertiesChanged is sent from status_changed)

    @dbus_property(access=PropertyAccess.READ, name="State")
    def _state(self) -> DBusStr:
        return str(self._current()["State"])

    @dbus_property(access=PropertyAccess.READ, name="Disk")
    def _disk(self) -> DBusStr:
        return str(self._current()["Disk"])

    @dbus_property(access=PropertyAccess.READ, name="LastSuccess")
    def _last_success(self) -> DBusInt64:
        return int(self._current()["LastSuccess"])

    @dbus_property(access=PropertyAccess.READ, name="LastResult")
    def _last_result(self) -> DBusStr:
        return str(self._current()["LastResult"])

    @dbus_property(access=PropertyAccess.READ, name="LastMessage")
    def _last_message(self) -> DBusStr:
        return str(self._current()["LastMessage"])

    @dbus_property(access=PropertyAccess.READ, name="NextDue")
    def _next_due(self) -> DBusInt64:
        return int(self._current()["NextDue"])

    @dbus_property(access=PropertyAccess.READ, name="Step")
    def _step(self) -> DBusStr:
        return str(self._current()["Step"])

    @dbus_property(access=PropertyAccess.READ, name="Percent")
    def _percent(self) -> DBusDouble:
        return float(self._current()["Percent"])

    def _current(self) -> dict[str, Any]:
        return property_values(self._controller.status())

    # signals (the Python methods return the signal's arguments)

    @dbus_signal(name="BackupStarted")
    def _backup_started_signal(self, disk: str, reason: str) -> Annotated[tuple[str, str], DBusSignature("ss")]:
        return disk, reason

    @dbus_signal(name="Progress")
    def _progress_signal(self, values: dict[str, Variant]) -> DBusDict:
        return values

    @dbus_signal(name="BackupCompleted")
    def _backup_completed_signal(
        self, snapshot: str, statistics: dict[str, Variant]
    ) -> Annotated[tuple[str, dict[str, Variant]], DBusSignature("sa{sv}")]:
        return snapshot, statistics

    @dbus_signal(name="Error")
    def _error_signal(self, step: str, message: str) -> Annotated[tuple[str, str], DBusSignature("ss")]:
        return step, message

    @dbus_signal(name="OffsiteFinished")
    def _offsite_finished_signal(
        self, name: str, state: str, message: str
    ) -> Annotated[tuple[str, str, str], DBusSignature("sss")]:
        return (name, state, message)

    @dbus_signal(name="DiskAttached")
    def _disk_attached_signal(self, disk: str) -> DBusStr:
        return disk

    @dbus_signal(name="DiskRemoved")
    def _disk_removed_signal(
        self, disk: str, during_backup: bool
    ) -> Annotated[tuple[str, bool], DBusSignature("sb")]:
        return disk, during_backup

    # Listener: called by the daemon, in the event loop's thread

    def status_changed(self, status: AgentStatus) -> None:
        values = property_values(status)
        changed = {name: value for name, value in values.items() if self._published.get(name) != value}
        self._published = values
        if changed:
            self.emit_properties_changed(changed)

    def disk_attached(self, disk: str) -> None:
        self._disk_attached_signal(disk)

    def disk_removed(self, disk: str, during_backup: bool) -> None:
        self._disk_removed_signal(disk, bool(during_backup))

    def disk_opened(self, disk: str) -> None:
        """Nothing to signal: the caller of Browse gets the reply, and the status does not change."""

    def backup_started(self, disk: str, reason: str) -> None:
        self._started = time.monotonic()
        self._backup_started_signal(disk or "", reason or "")

    def progress(self, event: ProgressEvent) -> None:
        elapsed = time.monotonic() - self._started if self._started is not None else None
        self._progress_signal(progress_vardict(event, elapsed))

    def backup_completed(self, event: CompleteEvent) -> None:
        self._started = None
        self._backup_completed_signal(event.snapshot or "", completed_vardict(event))

    def backup_failed(self, step: str | None, message: str, exit_code: int | None = None) -> None:
        self._started = None
        self._error_signal(step or "", message)

    def offsite_finished(self, offsite: OffsiteStatus, state: str) -> None:
        """OffsiteFinished(name, state, message): "done" (copied), "failed" or "skipped", and why."""
        self._offsite_finished_signal(offsite.name, state, offsite.message)


# Argument names for the introspection XML (dbus-fast leaves them out).
ARGUMENT_NAMES: dict[str, tuple[str, ...]] = {
    "BackupNow": ("reply",),
    "BackupNowDisk": ("reply",),
    "Stop": ("reply",),
    "GetStatus": ("status",),
    "BackupStarted": ("disk", "reason"),
    "Progress": ("progress",),
    "BackupCompleted": ("snapshot", "statistics"),
    "Error": ("step", "message"),
    "DiskAttached": ("disk",),
    "DiskRemoved": ("disk", "during_backup"),
    "OffsiteFinished": ("name", "state", "message"),
}


def _name_arguments(cls: type[ServiceInterface]) -> None:
    """Give the introspected arguments the names of :data:`ARGUMENT_NAMES`.

    The one place that reads dbus-fast's private marks (``__DBUS_METHOD``,
    ``__DBUS_SIGNAL``): its decorators keep a member's introspection there
    and offer no public way to name arguments. Should a dbus-fast release
    move them, the names are simply left out, and the introspection test
    (tests/test_dbus_control.py) says so.
    """
    for member in vars(cls).values():
        marks = getattr(member, "__dict__", {})
        for key in ("__DBUS_METHOD", "__DBUS_SIGNAL"):
            item = marks.get(key)
            if item is None:
                continue
            args = item.introspection.out_args if key == "__DBUS_METHOD" else item.introspection.args
            for arg, name in zip(args, ARGUMENT_NAMES.get(item.name, ())):
                arg.name = name


_name_arguments(ControlInterface)


def _listener(interface: ControlInterface) -> Listener:
    return interface  # mypy checks here that ControlInterface is a Listener


# -- serving ----------------------------------------------------------------------


class ControlService:
    """The exported interface on its bus; ``listener`` is what the daemon subscribes."""

    def __init__(self, bus: MessageBus, listener: ControlInterface, owns_bus: bool) -> None:
        self.bus = bus
        self.listener = listener
        self._owns_bus = owns_bus
        self._closed = False

    def close(self) -> None:
        """Stop serving: unexport, give the name back (or disconnect the bus we opened)."""
        if self._closed:
            return
        self._closed = True
        if not self.bus.connected:
            return
        self.bus.unexport(OBJECT_PATH, self.listener)
        if self._owns_bus:
            self.bus.disconnect()  # the bus daemon releases the name with the connection
            return
        self.bus.send(driver_call("ReleaseName", "s", [BUS_NAME], no_reply=True))


async def serve(controller: Controller, bus: MessageBus | None = None) -> ControlService | None:
    """Export the control interface and take the well-known name.

    Without ``bus``, connects to the session bus (:func:`agent.desktop.dbus.session_bus_address`);
    when there is none, or it cannot be reached, logs one line and returns
    None: the agent goes on without D-Bus. Raises :class:`AgentAlreadyRunningError`
    when another connection owns the name.
    """
    owns_bus = bus is None
    if bus is None:
        address = session_bus_address()
        if address is None:
            log.warning(
                "no session bus (DBUS_SESSION_BUS_ADDRESS is not set and there is no $XDG_RUNTIME_DIR/bus): "
                "going on without the D-Bus interface; `backup-agent now`, `stop` and live `status` will not reach this agent"
            )
            return None
        try:
            bus = await MessageBus(bus_address=address).connect()
        except Exception as exc:  # OSError, AuthError, InvalidAddressError, ...
            log.warning(
                "cannot connect to the session bus at %s (%s): going on without the D-Bus interface", address, exc
            )
            return None
    interface = ControlInterface(controller)
    bus.export(OBJECT_PATH, interface)
    try:
        reply = await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
    except BaseException:
        _abandon(bus, interface, owns_bus)
        raise
    if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
        owner = await _owner_pid(bus)
        _abandon(bus, interface, owns_bus)
        who = f" (pid {owner})" if owner is not None else ""
        raise AgentAlreadyRunningError(
            f"another backup-agent already runs in this session{who}: it owns {BUS_NAME} on the session bus; "
            "stop it first (systemctl --user stop backup-agent) or use it (backup-agent status)"
        )
    log.debug("serving %s at %s on %s as %s", INTERFACE, OBJECT_PATH, BUS_NAME, bus.unique_name)
    return ControlService(bus, interface, owns_bus)


def _abandon(bus: MessageBus, interface: ControlInterface, owns_bus: bool) -> None:
    if bus.connected:
        bus.unexport(OBJECT_PATH, interface)
    if owns_bus:
        bus.disconnect()


async def _owner_pid(bus: MessageBus) -> int | None:
    """The pid of the connection that owns the name, when the bus will tell."""
    try:
        reply = await bus.call(driver_call("GetConnectionUnixProcessID", "s", [BUS_NAME]))
    except Exception:
        return None
    if reply.message_type is not MessageType.METHOD_RETURN or reply.error_name or not reply.body:
        return None
    pid = reply.body[0]
    return pid if isinstance(pid, int) else None


__all__ = [
    "AgentAlreadyRunningError",
    "ControlInterface",
    "ControlService",
    "STATUS_SIGNATURES",
    "completed_vardict",
    "progress_vardict",
    "property_values",
    "serve",
    "status_vardict",
    "to_variant",
    "to_vardict",
]
