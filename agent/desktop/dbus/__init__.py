"""D-Bus: the agent's control interface, its client, and the logind inhibitor.

* :mod:`agent.desktop.dbus.control`: the service the agent exports on the session bus
  (``org.backupagent.Agent``); it is also a :class:`agent.desktop.state.Listener`.
* :mod:`agent.desktop.dbus.client`: what ``backup-agent now``, ``stop`` and ``status``
  call, and the state file ``status`` reads when no agent runs.
* :mod:`agent.desktop.dbus.logind`: the sleep inhibitor held during a cycle, and
  resume notices (``PrepareForSleep``) from the system bus.

This module holds only names, the session bus address and the message for a
call to the bus itself; it imports dbus_fast only when that message is made,
so importing it costs nothing.
"""

from __future__ import annotations

import logging
import os
import stat
from typing import TYPE_CHECKING, Any, Mapping

# Exit status of `backup-agent now`, `stop` and `status` when no agent answers
# (none runs, no session bus, or it did not answer in time).
from agent.core.errors import EXIT_NO_AGENT as EXIT_NO_AGENT

if TYPE_CHECKING:
    from dbus_fast import Message

log = logging.getLogger(__name__)

BUS_NAME = "org.backupagent.Agent"
OBJECT_PATH = "/org/backupagent/Agent"
INTERFACE = "org.backupagent.Agent1"
ERROR_PREFIX = INTERFACE + ".Error"



def session_bus_address(environ: Mapping[str, str] | None = None) -> str | None:
    """The session bus's address, or None when there is none.

    ``DBUS_SESSION_BUS_ADDRESS`` when set; else the systemd user bus,
    ``$XDG_RUNTIME_DIR/bus``, when that socket exists (as sd-bus and libdbus
    look for it). No X11 autolaunch: a desktop session sets one of the two.
    """
    env = os.environ if environ is None else environ
    address = env.get("DBUS_SESSION_BUS_ADDRESS", "").strip()
    if address:
        return address
    runtime = env.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime):
        path = os.path.join(runtime, "bus")
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                return f"unix:path={path}"
        except OSError:
            pass
    return None


def driver_call(member: str, signature: str, body: list[Any], *, no_reply: bool = False) -> Message:
    """A call to the bus itself (org.freedesktop.DBus); ``no_reply``: to be sent, its answer not awaited."""
    from dbus_fast import Message, MessageFlag  # here, so that importing this module loads no dbus_fast

    return Message(
        destination="org.freedesktop.DBus",
        path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus",
        member=member,
        signature=signature,
        body=body,
        flags=MessageFlag.NO_REPLY_EXPECTED if no_reply else MessageFlag.NONE,
    )
