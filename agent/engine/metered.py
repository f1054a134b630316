"""Whether the connection is metered, as NetworkManager says on the system bus: the off-site copy's check.

The root cycle asks it itself (docs/ARCHITECTURE.md, "The off-site copy"):
a disk backup the agent starts on a metered connection must not send its
off-site copy over it unless ``[[offsite]] metered = true``. ``busctl``
(systemd's) reads one property through the one runner; no D-Bus library
runs as root. No NetworkManager, or no busctl, means "not known", which
counts as not metered: a server without NetworkManager is on a wired line.
"""

from __future__ import annotations

import logging
import os

from agent.core.commands import Runner
from agent.core.errors import CommandError

log = logging.getLogger(__name__)

BUSCTL = "/usr/bin/busctl"
# NMMetered: 0 unknown, 1 yes, 2 no, 3 guess-yes, 4 guess-no.
_METERED = {0: None, 1: True, 2: False, 3: True, 4: False}


def busctl_argv(busctl: str = BUSCTL) -> tuple[str, ...]:
    """``busctl`` reading NetworkManager's ``Metered`` on the system bus."""
    return (
        busctl, "--system", "get-property",
        "org.freedesktop.NetworkManager", "/org/freedesktop/NetworkManager", "org.freedesktop.NetworkManager", "Metered",
    )


def parse_metered(text: str) -> bool | None:
    """busctl's answer (``u 1``) as metered (True), not (False) or not known (None)."""
    words = text.split()
    if len(words) != 2 or words[0] != "u" or not words[1].isdigit():
        return None
    return _METERED.get(int(words[1]))


class NetworkManagerMetered:
    """The ``metered`` callable the off-site copy asks (agent.engine.offsite.Metered)."""

    def __init__(self, runner: Runner, busctl: str = BUSCTL) -> None:
        self.runner = runner
        self.busctl = busctl

    def __call__(self) -> bool | None:
        if not os.path.exists(self.busctl):
            log.debug("%s is not installed: whether the connection is metered is not known", self.busctl)
            return None
        # The system bus's address when one is set (root's own environment: sudo does not pass a caller's).
        address = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
        lines: list[str] = []
        try:
            self.runner.run(
                busctl_argv(self.busctl), step="offsite", on_stdout=lines.append, mutating=False, timeout=10,
                env={"DBUS_SYSTEM_BUS_ADDRESS": address} if address else None,
            )
        except CommandError as exc:
            log.info("NetworkManager did not say whether the connection is metered (%s): taken as not metered", exc.message)
            return None
        answer = parse_metered("\n".join(lines))
        log.debug("NetworkManager: metered %s", answer)
        return answer
