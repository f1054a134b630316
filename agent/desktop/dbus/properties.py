"""Reading another service's D-Bus properties and following their ``PropertiesChanged``.

UPower and NetworkManager (``upower``, ``networkmanager``) are read the same
way: ``Get`` once at the start, then every change as it is signalled, so the
agent never polls. A service that is missing or answers with an error gives
None for that property: the callers take None as "not known", which holds
no backup back.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from agent.desktop.dbus import driver_call
from agent.desktop.dbus.bus import call, match_rule, send

log = logging.getLogger(__name__)

PROPERTIES_INTERFACE = "org.freedesktop.DBus.Properties"


def plain(value: Any) -> Any:
    """A variant's value, unwrapped (nested variants too)."""
    while isinstance(value, Variant):
        value = value.value
    return value


async def get_property(bus: MessageBus, name: str, path: str, interface: str, prop: str) -> Any | None:
    """One property's value, or None when the service is missing or refuses (logged at debug level)."""
    try:
        reply = await call(bus, name, path, PROPERTIES_INTERFACE, "Get", "ss", [interface, prop])
    except Exception as exc:
        log.debug("%s %s.%s: no answer (%s)", name, interface, prop, exc)
        return None
    if reply.message_type is MessageType.ERROR or not reply.body:
        log.debug("%s %s.%s: %s", name, interface, prop, reply.error_name)
        return None
    return plain(reply.body[0])


class PropertyWatch:
    """``PropertiesChanged`` of one service's objects, as (path, interface, {property: value}) calls.

    Made by :func:`watch_properties`; :meth:`close` ends it. The match rules
    name the service as the sender, so the bus delivers its signals only.
    """

    def __init__(self, bus: MessageBus, rules: Sequence[str], on_change: Callable[[str, str, dict[str, Any]], None]) -> None:
        self.bus = bus
        self._rules = tuple(rules)
        self._on_change = on_change
        self._closed = False

    def handle(self, message: Message) -> None:
        if (
            self._closed
            or message.message_type is not MessageType.SIGNAL
            or message.interface != PROPERTIES_INTERFACE
            or message.member != "PropertiesChanged"
            or message.signature != "sa{sv}as"
        ):
            return
        interface, changed = str(message.body[0]), message.body[1]
        try:
            self._on_change(str(message.path), interface, {str(k): plain(v) for k, v in changed.items()})
        except Exception:
            log.exception("a change of %s's properties could not be handled", interface)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.bus.remove_message_handler(self.handle)
        if self.bus.connected:
            for rule in self._rules:
                self.bus.send(driver_call("RemoveMatch", "s", [rule], no_reply=True))


async def watch_properties(
    bus: MessageBus, name: str, paths: Sequence[str], on_change: Callable[[str, str, dict[str, Any]], None]
) -> PropertyWatch | None:
    """Follow ``PropertiesChanged`` of ``name``'s objects at ``paths``; None when the bus refuses (logged)."""
    rules = [
        match_rule(sender=name, path=path, interface=PROPERTIES_INTERFACE, member="PropertiesChanged")
        for path in paths
    ]
    watch = PropertyWatch(bus, rules, on_change)
    for rule in rules:
        try:
            reply = await send(bus, driver_call("AddMatch", "s", [rule]))
        except Exception as exc:
            log.warning("cannot follow %s's changes (%s)", name, exc)
            watch.close()
            return None
        if reply.message_type is MessageType.ERROR:
            log.warning("the bus refused to pass on %s's changes (%s)", name, reply.error_name)
            watch.close()
            return None
    bus.add_message_handler(watch.handle)
    return watch


__all__ = ["PROPERTIES_INTERFACE", "PropertyWatch", "get_property", "plain", "watch_properties"]
