"""NetworkManager on the system bus: is the connection metered, and how far does it reach.

One query for anyone who needs it (:func:`network_state`: a remote
destination before it sends, an off-site copy), and a watch that follows
``PropertiesChanged`` of ``/org/freedesktop/NetworkManager`` for the agent,
so a backup to a remote destination skipped on a metered connection starts
once the connection is not metered any more. ``Metered`` is NMMetered
(yes and guessed yes are metered, :func:`agent.policy.conditions.metered_from_networkmanager`);
``Connectivity`` is NMConnectivityState. Without NetworkManager both are
unknown: not metered, connectivity "unknown".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Literal

from dbus_fast.aio import MessageBus

from agent.desktop.dbus.properties import PropertyWatch, get_property, watch_properties
from agent.policy.conditions import metered_from_networkmanager

log = logging.getLogger(__name__)

NM_NAME = "org.freedesktop.NetworkManager"
NM_PATH = "/org/freedesktop/NetworkManager"
NM_INTERFACE = "org.freedesktop.NetworkManager"

Connectivity = Literal["unknown", "none", "portal", "limited", "full"]
_CONNECTIVITY: dict[int, Connectivity] = {0: "unknown", 1: "none", 2: "portal", 3: "limited", 4: "full"}


@dataclass(frozen=True)
class NetworkState:
    """What NetworkManager says of the connection: ``metered`` (None: not known) and its reach."""

    metered: bool | None = None
    connectivity: Connectivity = "unknown"

    @property
    def online(self) -> bool | None:
        """Whether the internet is reachable (None: not known): what a remote destination asks first."""
        return {"full": True, "none": False, "portal": False, "limited": False}.get(self.connectivity)


def state_from(metered: Any, connectivity: Any) -> NetworkState:
    """The two properties' raw values as a :class:`NetworkState` (pure; anything unexpected is unknown)."""
    known_metered = (
        metered_from_networkmanager(metered) if isinstance(metered, int) and not isinstance(metered, bool) else None
    )
    reach = _CONNECTIVITY.get(connectivity, "unknown") if isinstance(connectivity, int) else "unknown"
    return NetworkState(known_metered, reach)


async def network_state(bus: MessageBus | None) -> NetworkState:
    """Ask NetworkManager once (the system bus; None or no NetworkManager: all unknown)."""
    if bus is None:
        return NetworkState()
    metered = await get_property(bus, NM_NAME, NM_PATH, NM_INTERFACE, "Metered")
    connectivity = await get_property(bus, NM_NAME, NM_PATH, NM_INTERFACE, "Connectivity")
    return state_from(metered, connectivity)


class NetworkWatch:
    """The connection as NetworkManager says it now; ``on_change(state)`` after each change."""

    def __init__(self, on_change: Callable[[NetworkState], None]) -> None:
        self.state = NetworkState()
        self._raw: dict[str, Any] = {}
        self._on_change = on_change
        self._watch: PropertyWatch | None = None

    def changed(self, path: str, interface: str, values: dict[str, Any]) -> None:
        if path != NM_PATH or interface != NM_INTERFACE:
            return
        self._raw.update({key: values[key] for key in ("Metered", "Connectivity") if key in values})
        state = state_from(self._raw.get("Metered"), self._raw.get("Connectivity"))
        if state != self.state:
            self.state = state
            self._on_change(state)

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None


async def watch_network(bus: MessageBus | None, on_change: Callable[[NetworkState], None]) -> NetworkWatch | None:
    """Follow NetworkManager: ``on_change`` once with what it says now, then after each change; None without a bus."""
    if bus is None:
        return None
    watch = NetworkWatch(on_change)
    watch._watch = await watch_properties(bus, NM_NAME, (NM_PATH,), watch.changed)
    metered = await get_property(bus, NM_NAME, NM_PATH, NM_INTERFACE, "Metered")
    connectivity = await get_property(bus, NM_NAME, NM_PATH, NM_INTERFACE, "Connectivity")
    if metered is None:
        log.info("NetworkManager does not answer on the system bus: no connection is taken as metered")
    watch._raw = {"Metered": metered, "Connectivity": connectivity}
    watch.state = state_from(metered, connectivity)
    on_change(watch.state)
    return watch


__all__ = ["NM_NAME", "NM_PATH", "NetworkState", "NetworkWatch", "network_state", "state_from", "watch_network"]
