"""The D-Bus plumbing every adapter shares: a call with a timeout, match rules, errors as exceptions.

The notifications, the tray, the client of ``backup-agent now``/``status``
and the logind inhibitor all call methods on other programs over a bus.
A peer that hangs (a stuck notification server, logind under load) must not
hang the agent, so every call here has one timeout, :data:`CALL_TIMEOUT`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from dbus_fast import Message, MessageFlag, MessageType
from dbus_fast.aio import MessageBus

#: Seconds a peer may take to answer one call. Long enough for a
#: notification server or logind started on demand (bus activation) on a
#: loaded machine; short enough that a hung peer is told as such while the
#: user still waits for an answer to a click.
CALL_TIMEOUT = 10.0


class BusCallError(RuntimeError):
    """A peer answered a call with a D-Bus error (the name and the peer's words)."""

    def __init__(self, member: str, reply: Message) -> None:
        super().__init__(f"{member}: {reply.error_name}: {' '.join(str(part) for part in reply.body)}")
        self.error_name = reply.error_name or ""


async def call(
    bus: MessageBus,
    destination: str,
    path: str,
    interface: str,
    member: str,
    signature: str = "",
    body: list[Any] | None = None,
    *,
    timeout: float = CALL_TIMEOUT,
    flags: MessageFlag = MessageFlag.NONE,
) -> Message:
    """Call ``member`` and return the reply (an error reply too: see :func:`checked`).

    Raises asyncio.TimeoutError when the peer does not answer in ``timeout`` seconds.
    """
    message = Message(destination=destination, path=path, interface=interface, member=member,
                      signature=signature, body=body or [], flags=flags)
    return await send(bus, message, timeout=timeout)


async def send(bus: MessageBus, message: Message, *, timeout: float = CALL_TIMEOUT) -> Message:
    """Send a prepared call and return its reply, within ``timeout`` seconds."""
    reply = await asyncio.wait_for(bus.call(message), timeout)
    if reply is None:  # only a call flagged "no reply expected" gives none: a bug of the caller
        raise RuntimeError(f"{message.member}: the bus gave no reply")
    return reply


def checked(reply: Message, member: str) -> Message:
    """The reply itself, or :class:`BusCallError` when it is an error reply."""
    if reply.message_type is MessageType.ERROR:
        raise BusCallError(member, reply)
    return reply


def _quoted(value: str) -> str:
    """A match rule's value: in single quotes; a quote inside is written '\\'' as the spec says."""
    return "'" + value.replace("'", "'\\''") + "'"


def match_rule(*, type: str = "signal", **fields: str) -> str:
    """A match rule (``AddMatch``) from its keys: ``sender``, ``path``, ``interface``, ``member``, ``arg0``...

    Built, not written by hand, so that every value is quoted as the
    D-Bus specification says, whatever it holds.
    """
    parts = [f"type={_quoted(type)}"] + [f"{key}={_quoted(value)}" for key, value in fields.items()]
    return ",".join(parts)
