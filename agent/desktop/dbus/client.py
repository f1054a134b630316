"""The client side of the control interface: ``backup-agent now``, ``stop``, ``status``.

Calls go to the well-known name on the session bus, never start anything
(``NO_AUTOSTART``), and fail with one clear line when no agent answers
(:class:`NoAgentError`, exit status :data:`~agent.desktop.dbus.EXIT_NO_AGENT`).

``status`` also works when no agent runs: the agent saves its status in
:func:`agent.desktop.statefile.state_file_path` (``$XDG_STATE_HOME/backup-agent/state.json``, by
default ``~/.local/state/backup-agent/state.json``), and :func:`read_saved_status`
reads it back. The file is one JSON object::

    {"version": 1, "saved": 1763816400.0,
     "status": {"state": "disk-attached", "disk": "backup1",
                "last_success": 1763812800.0, "last_result": "success",
                "last_message": "2026-11-22T13-00-00+0100",
                "next_due": 1763816400.0, "step": null,
                "progress": {}, "cycle_pid": null}}

``status`` holds the :class:`~agent.desktop.state.AgentStatus` fields under their own
names (``AgentStatus.as_dict()``), times as epoch seconds, null for None.
``version`` is 1; ``saved`` is when it was written (epoch seconds; the file's
mtime when missing). Missing fields take AgentStatus's defaults, unknown ones
are ignored, and a field of the wrong type is ignored with a warning.
:func:`agent.desktop.statefile.save_state` writes it atomically (a temporary file renamed over it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from typing import Any, Iterator, Mapping, cast, get_args

from dbus_fast import Message, MessageFlag, MessageType, Variant, unpack_variants
from dbus_fast.aio import MessageBus

from agent.core.errors import EXIT_DISK_MISSING, EXIT_OK, EXIT_STEP_FAILED, EXIT_UNREACHABLE, BackupAgentError, UsageError
from agent.desktop import statefile
from agent.desktop.state import AgentStatus, DiskLeft, DiskStatus, OffsiteStatus, Result, State, offsite_from
from agent.desktop.statefile import state_file_path
from agent.desktop.dbus import BUS_NAME, EXIT_NO_AGENT, INTERFACE, OBJECT_PATH, session_bus_address
from agent.desktop.dbus.bus import CALL_TIMEOUT, send

log = logging.getLogger(__name__)


_NO_OWNER = ("org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner")
_START_HINT = "start it with `systemctl --user start backup-agent` (or run `backup-agent run`)"


class NoAgentError(BackupAgentError):
    """No agent answers: none runs in this session, there is no session bus, or it is stuck."""

    exit_code = EXIT_NO_AGENT


class AgentCallError(BackupAgentError):
    """The agent answered with an error."""

    exit_code = EXIT_STEP_FAILED


# -- calls ------------------------------------------------------------------------


async def call(
    member: str, signature: str, *, bus: MessageBus | None = None, timeout: float = CALL_TIMEOUT, disk: str | None = None
) -> Any:
    """Call a method of the agent (no arguments, or one: ``disk``) and return its one reply value, variants unpacked."""
    own = bus is None
    if bus is None:
        address = session_bus_address()
        if address is None:
            raise NoAgentError(
                "no backup agent can be reached: there is no session bus (DBUS_SESSION_BUS_ADDRESS is not set); "
                "run this from your desktop session"
            )
        try:
            bus = await asyncio.wait_for(MessageBus(bus_address=address).connect(), timeout)
        except Exception as exc:
            raise NoAgentError(f"no backup agent can be reached: cannot connect to the session bus at {address} ({exc})") from exc
    try:
        message = Message(
            destination=BUS_NAME,
            path=OBJECT_PATH,
            interface=INTERFACE,
            member=member,
            flags=MessageFlag.NO_AUTOSTART,
            signature="" if disk is None else "s",
            body=[] if disk is None else [disk],
        )
        try:
            reply = await send(bus, message, timeout=timeout)
        except asyncio.TimeoutError:
            raise NoAgentError(f"the backup agent did not answer {member} within {timeout:g} s; it may be stuck") from None
    finally:
        if own:
            bus.disconnect()
    if reply.message_type is MessageType.ERROR:
        text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
        if reply.error_name in _NO_OWNER:
            raise NoAgentError(f"no backup agent runs in this session (nothing owns {BUS_NAME} on the session bus): {_START_HINT}")
        raise AgentCallError(f"the backup agent refused {member}: {text or reply.error_name}")
    if reply.signature != signature or len(reply.body) != 1:
        raise AgentCallError(f"the backup agent answered {member} with {reply.signature!r}, expected {signature!r}: is it another version?")
    return unpack_variants(reply.body[0])


async def backup_now(bus: MessageBus | None = None, disk: str | None = None) -> str:
    """Ask the agent to back up now (to ``disk``): "started", "running", "no-disk" or "unknown-disk"."""
    if disk is None:
        return str(await call("BackupNow", "s", bus=bus))
    return str(await call("BackupNowDisk", "s", bus=bus, disk=disk))


async def stop(bus: MessageBus | None = None) -> str:
    """Ask the agent to stop the running cycle: "stopping" or "not-running"."""
    return str(await call("Stop", "s", bus=bus))


async def get_status(bus: MessageBus | None = None) -> AgentStatus:
    """The running agent's status."""
    values = await call("GetStatus", "a{sv}", bus=bus)
    return status_from_mapping(values, source=f"{BUS_NAME} GetStatus")


# -- the saved state file ---------------------------------------------------------


_STATE_VALUES = frozenset(get_args(State))
_RESULT_VALUES = frozenset(get_args(Result))
_DISK_LEFT_VALUES = frozenset(get_args(DiskLeft))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def status_from_mapping(values: Any, *, source: str) -> AgentStatus:
    """An AgentStatus from its fields (GetStatus's reply, the state file's "status").

    Missing fields keep their defaults, unknown ones are ignored, a field of
    the wrong type is ignored with a warning naming ``source``.
    """
    status = AgentStatus()
    if not isinstance(values, Mapping):
        log.warning("%s: the status is not an object; ignored", source)
        return status

    def bad(name: str, expected: str) -> None:
        log.warning("%s: status field %s is %r, expected %s; ignored", source, name, values[name], expected)

    for name, value in values.items():
        if name == "state":
            if isinstance(value, str) and value:
                if value not in _STATE_VALUES:
                    log.warning("%s: unknown state %r (a newer agent?); shown as it is", source, value)
                status.state = cast(State, value)
            else:
                bad(name, "one of " + ", ".join(sorted(_STATE_VALUES)))
        elif name == "last_result":
            if isinstance(value, str) and value:
                status.last_result = cast(Result, value)
            else:
                bad(name, "one of " + ", ".join(sorted(_RESULT_VALUES)))
        elif name in ("disk", "step"):
            if value is None or isinstance(value, str):
                setattr(status, name, value)
            else:
                bad(name, "a string or null")
        elif name in ("last_message", "skipped"):
            if isinstance(value, str):
                setattr(status, name, value)
            else:
                bad(name, "a string")
        elif name == "disk_left":
            if value in _DISK_LEFT_VALUES:
                status.disk_left = cast(DiskLeft, value)
            else:
                bad(name, "one of " + ", ".join(repr(v) for v in sorted(_DISK_LEFT_VALUES)))
        elif name == "disk_left_detail":
            if isinstance(value, str):
                status.disk_left_detail = value
            else:
                bad(name, "a string")
        elif name in ("last_success", "next_due"):
            if value is None or _number(value):
                setattr(status, name, None if value is None else float(value))
            else:
                bad(name, "epoch seconds or null")
        elif name == "progress":
            if isinstance(value, Mapping):
                status.progress = dict(value)
            elif value is not None:
                bad(name, "an object")
        elif name == "disks":
            if isinstance(value, list):
                status.disks = [disk for disk in (_disk_from(item, source) for item in value) if disk is not None]
            else:
                bad(name, "a list of objects")
        elif name == "offsite":
            if isinstance(value, list):
                status.offsite = [record for record in (offsite_from(item) for item in value) if record is not None]
            else:
                bad(name, "a list of objects")
        elif name == "cycle_pid":
            if value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                status.cycle_pid = value
            else:
                bad(name, "a process id or null")
    return status


def _disk_from(value: Any, source: str) -> DiskStatus | None:
    """One entry of the status's "disks" (a malformed one is warned about and left out)."""
    name = value.get("name") if isinstance(value, Mapping) else None
    if not isinstance(name, str) or not name:
        log.warning("%s: an entry of disks has no name; ignored", source)
        return None
    disk = DiskStatus(name=name)
    for key in ("attached", "ejected", "unfinished", "remote"):
        if isinstance(value.get(key), bool):
            setattr(disk, key, value[key])
    for key in ("last_success", "next_due", "last_failure"):
        if _number(value.get(key)):
            setattr(disk, key, float(value[key]))
    result = value.get("last_result")
    if isinstance(result, str) and result:
        disk.last_result = cast(Result, result)
    message = value.get("last_message")
    if isinstance(message, str):
        disk.last_message = message
    skipped = value.get("skipped")
    if isinstance(skipped, str):
        disk.skipped = skipped
    waiting = value.get("waiting")
    if isinstance(waiting, str):
        disk.waiting = waiting
    return disk


def read_saved_status(path: str) -> AgentStatus | None:
    """The status the agent last saved in ``path``, or None when there is none (or it is unreadable: warned)."""
    saved = _read_state_file(path)
    return None if saved is None else saved[0]


def _read_state_file(path: str) -> tuple[AgentStatus, float | None] | None:
    """The saved status and when it was saved, through the agent's own reader (:func:`agent.desktop.statefile.read`)."""
    saved = statefile.read(path)
    if saved is None:
        return None
    if saved.status is None:
        log.warning('the agent\'s saved state %s has no "status" object; ignored', path)
        return None
    return status_from_mapping(saved.status, source=path), saved.saved_at


# -- what the three commands print ----------------------------------------------

_NOW_LINES = {
    "started": "backup started",
    "running": "a backup is already running",
    "no-disk": "no backup disk is attached: plug one in and the agent backs it up",
}
_STOP_LINES = {
    "stopping": "stopping the running backup (it cleans up first; earlier snapshots are untouched)",
    "not-running": "no backup is running",
}


def run_now(disk: str | None = None, *, notify: bool = False) -> int:
    """``backup-agent now [--disk NAME] [--notify]``."""
    with _told_on_failure(notify):
        word = asyncio.run(backup_now(disk=disk))
        if word == "unknown-disk":
            raise UsageError(f"{disk} is not a configured backup disk: `backup-agent status` lists them")
    if word == "no-disk" and disk is not None:
        line = f"{disk} is not attached: plug it in and the agent backs it up"
    elif word == "no-network":
        line = f"{disk} cannot be reached: there is no network; the agent backs it up when there is"
    else:
        line = _NOW_LINES.get(word, word)
    print(line)
    if notify and word != "started":  # once started, the agent's own card says so
        tell(line)
    if word == "no-network":
        return EXIT_UNREACHABLE
    return EXIT_DISK_MISSING if word == "no-disk" else EXIT_OK


def run_stop(*, notify: bool = False) -> int:
    """``backup-agent stop [--notify]``."""
    with _told_on_failure(notify):
        word = asyncio.run(stop())
    line = _STOP_LINES.get(word, word)
    print(line)
    if notify and word != "stopping":  # the agent's card says when it has stopped
        tell(line)
    return EXIT_OK


# -- --notify: the answer where no terminal shows it -------------------------------


@contextlib.contextmanager
def _told_on_failure(notify: bool) -> Iterator[None]:
    """With ``notify``, an error's one line is shown as a notification too, then raised as before."""
    try:
        yield
    except BackupAgentError as exc:
        if notify:
            tell(exc.message, failed=True)
        raise


def tell(line: str, *, failed: bool = False) -> None:
    """``line`` as a desktop notification: ``now`` and ``stop`` from a launcher (``backup-agent.desktop``)
    print into nothing, so ``--notify`` shows what they print. A notification that cannot be shown is
    logged; the command's output and exit status stay as they are."""
    try:
        asyncio.run(_tell(line, failed))
    except Exception as exc:
        log.warning("could not show this as a notification (%s): %s", exc, line)


async def _tell(line: str, failed: bool) -> None:
    from agent.desktop.dbus import sender
    from agent.desktop.dbus.notify import APP_NAME

    address = session_bus_address()
    if address is None:
        raise NoAgentError("there is no session bus (DBUS_SESSION_BUS_ADDRESS is not set)")
    bus = await asyncio.wait_for(MessageBus(bus_address=address).connect(), CALL_TIMEOUT)
    try:
        can = await sender.capabilities(bus)
        hints = {"urgency": Variant("y", 1 if failed else 0), "desktop-entry": Variant("s", "backup-agent")}
        await sender.notify(bus, app_name=APP_NAME, replaces=0, icon="dialog-error" if failed else "drive-harddisk",
                            summary=APP_NAME, body=f"{line[:1].upper()}{line[1:]}.", actions=(), hints=hints,
                            expire=-1, server_can=can)
    finally:
        bus.disconnect()


def run_status(as_json: bool) -> int:
    """``backup-agent status [--json]``: the running agent's status, else the last one it saved."""
    path = state_file_path()
    saved_at: float | None = None
    try:
        status = asyncio.run(get_status())
        live = True
    except NoAgentError as exc:
        saved = _read_state_file(path)
        if saved is None:
            raise NoAgentError(f"{exc.message}; and no agent has saved its state yet ({path})") from exc
        status, saved_at = saved
        live = False
    if as_json:
        document = {"agent": "running" if live else "not-running", "saved": saved_at, "state_file": path, "status": status.as_dict()}
        print(json.dumps(document, indent=2, ensure_ascii=False, default=str))
    else:
        sys.stdout.write(format_status(status, live=live, saved_at=saved_at))
    return EXIT_OK


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(epoch))


def format_status(status: AgentStatus, *, live: bool, saved_at: float | None = None) -> str:
    """The human ``status`` text (pure but for the local time zone)."""
    lines = []
    if live:
        lines.append("agent:        running")
    else:
        when = f" (saved {_when(saved_at)})" if saved_at is not None else ""
        lines.append(f"agent:        not running; its last saved state{when}")
    state = str(status.state)
    if status.state == "running":
        details = [status.step or "starting"]
        percent = status.progress.get("percent")
        if _number(percent):
            details.append(f"{percent:.0f}%")
        state += f" ({', '.join(details)})"
    lines.append(f"state:        {state}")
    lines.append(f"disk:         {status.disk or 'none'}")
    lines.append(f"last success: {_when(status.last_success) if status.last_success is not None else 'never'}")
    result = str(status.last_result)
    if status.last_message:
        result += f": {status.last_message}"
    lines.append(f"last result:  {result}")
    ejected = [disk.name for disk in status.disks if disk.ejected]
    why_none = f"{', '.join(ejected)} ejected" if ejected and not status.next_due else "no disk attached"
    if status.skipped and live:  # a saved wait may be over: only a running agent says it
        why_none = f"waiting: {status.skipped}"
    lines.append(f"next backup:  {_when(status.next_due) if status.next_due is not None else f'none scheduled ({why_none})'}")
    if status.skipped and live:
        lines.append(f"waiting:      {status.skipped} (the due backup starts when this ends; not a failure)")
    if status.cycle_pid is not None:
        lines.append(f"cycle:        pid {status.cycle_pid}")
    if len(status.disks) > 1 or any(disk.ejected or disk.remote for disk in status.disks):
        lines.append("disks:")
        for disk in status.disks:
            lines.append(f"  {disk.name}: {_disk_line(disk, live=live)}")
    if status.offsite:
        lines.append("off-site:")
        for record in status.offsite:
            lines.append(f"  {record.name}: {offsite_line(record, time.time())}")
    return "\n".join(lines) + "\n"


def offsite_line(record: OffsiteStatus, now: float) -> str:
    """One [[offsite]] in ``status``: its newest copy and how old it is, and the last try's trouble (pure)."""
    if record.last_copy is None:
        parts = ["no copy yet"]
    else:
        days, rest = divmod(max(0, int(now - record.last_copy)), 86400)
        old = f"{days} d {rest // 3600} h" if days else f"{rest // 3600} h {rest % 3600 // 60} min"
        parts = [f"newest copy {record.snapshot or '?'}, made {_when(record.last_copy)} ({old} old)"]
    if record.result == "failed":
        parts.append(f"last try failed: {record.message}")
    elif record.message:
        parts.append(record.message)
    if record.retention:
        parts.append(record.retention)
    if record.check:
        parts.append(f"last check {record.check}")
    return "; ".join(parts)


def _disk_line(disk: DiskStatus, *, live: bool) -> str:
    """One configured disk in ``status``: attached or not, its last success and result, when it is due."""
    if disk.remote:
        where = "server, reachable" if disk.attached else "server"
    else:
        where = "ejected (closed until plugged in again)" if disk.ejected else "attached" if disk.attached else "not attached"
    parts = [where, f"last success {_when(disk.last_success) if disk.last_success is not None else 'never'}"]
    if disk.last_result in ("failure", "stopped"):
        parts.append(f"last run {disk.last_result}" + (f": {disk.last_message}" if disk.last_message else ""))
    if disk.unfinished:
        parts.append(f"the next {'run' if disk.remote else 'plug-in'} carries on with the unfinished backup")
    if live and disk.skipped:
        parts.append(f"waiting: {disk.skipped}")
    if live and disk.waiting:
        parts.append(disk.waiting)
    if live and disk.next_due is not None:
        parts.append(f"next backup {_when(disk.next_due)}")
    return "; ".join(parts)
