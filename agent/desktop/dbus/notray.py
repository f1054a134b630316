"""Where each tray action is, on a desktop without a tray (GNOME without the AppIndicator extension).

Such a session has no ``org.kde.StatusNotifierWatcher``, so no icon and no
menu. Every menu item has a way there too: a notification's action button
where the moment calls for one, and a ``backup-agent`` command at any time.
:data:`WITHOUT_TRAY` is that list (pure data); the README's "Without a tray"
says the same, and a test holds the three (the menu, this list, the README)
together. The agent logs the list once when it finds no watcher.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from dbus_fast import MessageType
from dbus_fast.aio import MessageBus

from agent.desktop.dbus import driver_call
from agent.desktop.dbus.bus import send
from agent.desktop.dbus.sni import WATCHER_NAME

log = logging.getLogger(__name__)


class Elsewhere(NamedTuple):
    """A tray menu item (its label's start) and where else it is."""

    item: str
    notification: str  # the action button, and on which card ("" when no card offers it)
    command: str  # the command line that does it


WITHOUT_TRAY: tuple[Elsewhere, ...] = (
    Elsewhere("Back up now", "Back up now, on the cards of a failed, stopped or waiting backup and of a plug-in "
              "with no backup due", "backup-agent now [DISK]"),
    Elsewhere("Stop the backup", "Stop (and Not now), on the running backup's card", "backup-agent stop"),
    Elsewhere("Open latest backup", "Open backups, on the completed backup's card when the disk stays mounted",
              "sudo -n backup-agent open --json --disk NAME"),
    Elsewhere("Eject", "", "sudo -n backup-agent eject --json --disk NAME"),
    Elsewhere("Browse backups", "", "sudo -n backup-agent open --json --disk NAME"),
    Elsewhere("Quit", "", "systemctl --user stop backup-agent"),
)


def hint() -> str:
    """One log line: what replaces the tray here."""
    return "; ".join(f"{entry.item}: {entry.command}" for entry in WITHOUT_TRAY)


async def has_tray(bus: MessageBus | None) -> bool | None:
    """Whether a StatusNotifierWatcher is on the session bus (None: not known)."""
    if bus is None:
        return None
    try:
        reply = await send(bus, driver_call("NameHasOwner", "s", [WATCHER_NAME]))
    except Exception as exc:
        log.debug("cannot ask for a StatusNotifierWatcher: %s", exc)
        return None
    if reply.message_type is not MessageType.METHOD_RETURN:
        return None
    return bool(reply.body[0])


async def tell_if_no_tray(bus: MessageBus | None) -> None:
    """Log once, at the start, where the tray's actions are when this desktop shows no tray."""
    if await has_tray(bus) is False:
        log.info("no tray on this desktop (no %s): notifications carry the actions, and so do commands: %s",
                 WATCHER_NAME, hint())


__all__ = ["Elsewhere", "WITHOUT_TRAY", "has_tray", "hint", "tell_if_no_tray"]
