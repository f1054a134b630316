"""logind on the system bus: a sleep inhibitor while a cycle runs, and resume notices.

``inhibit`` takes a **block** lock, not a delay lock. A delay lock only holds
a suspend off for ``InhibitDelayMaxSec`` (5 s by default) so a program can
prepare; the laptop would still suspend mid-transfer. A block lock makes
logind refuse suspend requests from the desktop (idle timeout, the menu,
``systemctl suspend``) while the cycle runs, which is what "a laptop does not
suspend mid-backup" asks. Closing the lid still suspends by default
(``LidSwitchIgnoreInhibited=yes``): a user who does that means it, and the
cycle then resumes or fails cleanly like after any interruption. Active
sessions may take block locks without a password (polkit's default for
``org.freedesktop.login1.inhibit-block-sleep``); no interactive
authorisation is ever asked for.

The lock is the file descriptor logind returns: it holds while the fd is
open, and :meth:`Inhibitor.close` (or the agent's death) releases it.

``watch_sleep`` subscribes to ``PrepareForSleep(b start)`` with a match rule
that names logind as the sender, so the bus delivers only logind's signal,
and calls ``on_resumed`` when ``start`` is false (the machine woke up).

Without a system bus, or without logind on it, each function logs once per
process and returns None: the agent goes on, unprotected from suspend.
"""

from __future__ import annotations

import asyncio
import logging
import os
from types import TracebackType
from typing import Any, Callable

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from agent.desktop.dbus import driver_call
from agent.desktop.dbus.bus import CALL_TIMEOUT, match_rule, send

log = logging.getLogger(__name__)

LOGIND_NAME = "org.freedesktop.login1"
LOGIND_PATH = "/org/freedesktop/login1"
LOGIND_MANAGER = "org.freedesktop.login1.Manager"
INHIBIT_WHAT = "sleep"
INHIBIT_MODE = "block"  # see the module's docstring
DEFAULT_SYSTEM_BUS = "unix:path=/run/dbus/system_bus_socket"
PREPARE_FOR_SLEEP_RULE = match_rule(sender=LOGIND_NAME, path=LOGIND_PATH, interface=LOGIND_MANAGER, member="PrepareForSleep")

_warned: set[str] = set()


def _warn_once(key: str, message: str, *args: Any) -> None:
    if key in _warned:
        log.debug(message, *args)
        return
    _warned.add(key)
    log.warning(message, *args)


def system_bus_address() -> str:
    return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS", "").strip() or DEFAULT_SYSTEM_BUS


async def system_bus() -> MessageBus | None:
    """A connection to the system bus that can receive file descriptors, or None (logged once)."""
    address = system_bus_address()
    try:
        return await asyncio.wait_for(MessageBus(bus_address=address, negotiate_unix_fd=True).connect(), CALL_TIMEOUT)
    except Exception as exc:
        _warn_once(
            "no-system-bus",
            "no system bus at %s (%s): backups run without a sleep inhibitor and resume notices",
            address,
            _describe(exc),
        )
        return None


async def _call(bus: MessageBus, message: Message) -> Message:
    return await send(bus, message)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return f"no answer within {CALL_TIMEOUT:g} s"
    return str(exc) or type(exc).__name__


def _error_text(reply: Message) -> str:
    text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
    return f"{reply.error_name}: {text}" if text else str(reply.error_name)


class Inhibitor:
    """A held logind inhibitor lock; released when :meth:`close` closes its fd."""

    def __init__(self, fd: int, who: str, why: str) -> None:
        self.fd: int | None = fd
        self.who = who
        self.why = why

    @property
    def held(self) -> bool:
        return self.fd is not None

    def close(self) -> None:
        """Release the lock (idempotent)."""
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)
            log.debug("released the sleep inhibitor (%s)", self.why)

    def __enter__(self) -> Inhibitor:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


async def inhibit(bus: MessageBus | None, who: str, why: str) -> Inhibitor | None:
    """Take a block lock on sleep: ``Inhibit("sleep", who, why, "block")``.

    ``bus`` is a system bus connection made with ``negotiate_unix_fd=True``
    (:func:`system_bus`); None, or any failure, logs once and returns None.
    """
    if bus is None:
        _warn_once("no-system-bus", "no system bus: backups run without a sleep inhibitor")
        return None
    # dbus-fast keeps negotiate_unix_fd only as a private attribute; read it
    # here alone, and a release without it counts as "negotiated".
    if not getattr(bus, "_negotiate_unix_fd", True):
        # The bus would drop logind's reply (it carries an fd) and the call would time out.
        _warn_once(
            "inhibit-no-fd",
            "the system bus connection was opened without negotiate_unix_fd=True, so it cannot receive "
            "logind's file descriptor: backups run without a sleep inhibitor",
        )
        return None
    try:
        message = Message(
            destination=LOGIND_NAME,
            path=LOGIND_PATH,
            interface=LOGIND_MANAGER,
            member="Inhibit",
            signature="ssss",
            body=[INHIBIT_WHAT, who, why, INHIBIT_MODE],
        )
        reply = await _call(bus, message)
    except Exception as exc:
        _warn_once("inhibit-failed", "cannot ask logind for a sleep inhibitor (%s): backups run without one", _describe(exc))
        return None
    fds = list(reply.unix_fds)
    if reply.message_type is MessageType.ERROR:
        for fd in fds:
            os.close(fd)
        _warn_once(f"inhibit-refused:{reply.error_name}", "logind gave no sleep inhibitor (%s): backups run without one", _error_text(reply))
        return None
    index = reply.body[0] if reply.signature == "h" and reply.body else None
    if not isinstance(index, int) or not 0 <= index < len(fds):
        for fd in fds:
            os.close(fd)
        _warn_once(
            "inhibit-no-fd",
            "logind's Inhibit reply carried no file descriptor (signature %r, %d fds; was the bus opened with "
            "negotiate_unix_fd=True?): backups run without a sleep inhibitor",
            reply.signature,
            len(fds),
        )
        return None
    for position, fd in enumerate(fds):
        if position != index:
            os.close(fd)
    log.debug("holding a sleep inhibitor (%s, %s): %s", INHIBIT_MODE, who, why)
    return Inhibitor(fds[index], who, why)


class SleepWatch:
    """A subscription to logind's PrepareForSleep; :meth:`close` ends it."""

    def __init__(self, bus: MessageBus, on_resumed: Callable[[], None]) -> None:
        self.bus = bus
        self._on_resumed = on_resumed
        self._closed = False

    def _handle(self, message: Message) -> None:
        if (
            message.message_type is not MessageType.SIGNAL
            or message.member != "PrepareForSleep"
            or message.interface != LOGIND_MANAGER
            or message.path != LOGIND_PATH
            or message.signature != "b"
        ):
            return
        start = bool(message.body[0])
        if start:
            log.debug("logind: the machine is about to sleep")
            return
        log.info("the machine woke up from sleep")
        try:
            self._on_resumed()
        except Exception:
            log.exception("the resume handler failed")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.bus.remove_message_handler(self._handle)
        if self.bus.connected:
            self.bus.send(driver_call("RemoveMatch", "s", [PREPARE_FOR_SLEEP_RULE], no_reply=True))


async def watch_sleep(bus: MessageBus | None, on_resumed: Callable[[], None]) -> SleepWatch | None:
    """Call ``on_resumed`` (in the loop's thread) each time logind says the machine woke up.

    Returns the subscription (``close()`` ends it), or None without a system
    bus or when the bus refuses the match rule (logged once). When logind is
    not on the bus yet, the subscription is kept (logind may start later) and
    that is logged once.
    """
    if bus is None:
        _warn_once("no-system-bus", "no system bus: a backup missed during sleep waits for the next hourly check")
        return None
    try:
        reply = await _call(bus, driver_call("AddMatch", "s", [PREPARE_FOR_SLEEP_RULE]))
    except Exception as exc:
        _warn_once("watch-failed", "cannot subscribe to logind's PrepareForSleep (%s)", _describe(exc))
        return None
    if reply.message_type is MessageType.ERROR:
        _warn_once("watch-failed", "the system bus refused the PrepareForSleep subscription (%s)", _error_text(reply))
        return None
    watch = SleepWatch(bus, on_resumed)
    bus.add_message_handler(watch._handle)
    try:
        owner = await _call(bus, driver_call("NameHasOwner", "s", [LOGIND_NAME]))
        if owner.message_type is MessageType.METHOD_RETURN and owner.body == [False]:
            _warn_once("no-logind", "logind is not on the system bus: no resume notices until it starts")
    except Exception as exc:
        # Only a hint for the log: the subscription above is made, notices come once logind runs.
        log.debug("could not ask whether logind is on the system bus: %s", _describe(exc))
    return watch
