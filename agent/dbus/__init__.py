"""D-Bus: the agent's control interface, its client, and the logind inhibitor.

* :mod:`agent.dbus.control`: the service the agent exports on the session bus
  (``org.backupagent.Agent``); it is also a :class:`agent.state.Listener`.
* :mod:`agent.dbus.client`: what ``backup-agent now``, ``stop`` and ``status``
  call, and the state file ``status`` reads when no agent runs.
* :mod:`agent.dbus.logind`: the sleep inhibitor held during a cycle, and
  resume notices (``PrepareForSleep``) from the system bus.

This module holds only names and the session bus address; it does not import
dbus_fast, so importing it costs nothing.
"""

from __future__ import annotations

import logging
import os
import stat
from typing import Mapping

# Exit status of `backup-agent now`, `stop` and `status` when no agent answers
# (none runs, no session bus, or it did not answer in time).
from ..errors import EXIT_NO_AGENT as EXIT_NO_AGENT

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
