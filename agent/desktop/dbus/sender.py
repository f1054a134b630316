"""The one sender of desktop notifications (org.freedesktop.Notifications), for the notifier and the tray.

A notification's body may be read as markup by the server (it says so with
the ``body-markup`` capability): a snapshot's path or an error message with
``<`` or ``&`` in it would then be cut or shown wrong, so every body sent
from here is escaped whenever the server reads markup.
"""

from __future__ import annotations

import html
from typing import Any, Collection, Mapping, Sequence

from dbus_fast import Variant
from dbus_fast.aio import MessageBus

from agent.desktop.dbus import driver_call
from agent.desktop.dbus.bus import call, checked, send

NOTIFICATIONS_NAME = "org.freedesktop.Notifications"
NOTIFICATIONS_PATH = "/org/freedesktop/Notifications"
NOTIFICATIONS_INTERFACE = "org.freedesktop.Notifications"


def body_for(body: str, capabilities: Collection[str]) -> str:
    """The body as the server will read it (pure): escaped where it reads markup."""
    return html.escape(body, quote=False) if "body-markup" in capabilities else body


async def _call(bus: MessageBus, member: str, signature: str, body: list[Any]) -> Any:
    reply = checked(await call(bus, NOTIFICATIONS_NAME, NOTIFICATIONS_PATH, NOTIFICATIONS_INTERFACE,
                               member, signature, body), member)
    return reply.body


async def capabilities(bus: MessageBus) -> set[str]:
    """What the server can do (``actions``, ``body-markup``, ``persistence``, ...)."""
    body = await _call(bus, "GetCapabilities", "", [])
    return {str(name) for name in body[0]}


async def notify(
    bus: MessageBus,
    *,
    app_name: str,
    replaces: int,
    icon: str,
    summary: str,
    body: str,
    actions: Sequence[str],
    hints: Mapping[str, Variant],
    expire: int,
    server_can: Collection[str],
) -> int:
    """Show (or replace) one notification; its id. ``server_can``: the server's capabilities."""
    reply = await _call(bus, "Notify", "susssasa{sv}i",
                        [app_name, replaces, icon, summary, body_for(body, server_can), list(actions), dict(hints),
                         expire])
    return int(reply[0])


async def close(bus: MessageBus, ident: int) -> None:
    """Withdraw one notification (BusCallError when the server says it is not there)."""
    await _call(bus, "CloseNotification", "u", [ident])


async def server(bus: MessageBus) -> str:
    """Which server shows the notifications now: the bus's id and the server's unique name.

    A notification's id is the server's own: a new server (a new login, a
    restarted daemon) gives the same numbers to other cards, so an id kept
    across agent restarts may be withdrawn only while this is unchanged.
    """
    bus_id = checked(await send(bus, driver_call("GetId", "", [])), "GetId").body[0]
    owner = checked(await send(bus, driver_call("GetNameOwner", "s", [NOTIFICATIONS_NAME])), "GetNameOwner").body[0]
    return f"{bus_id}/{owner}"
