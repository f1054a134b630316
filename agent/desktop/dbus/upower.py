"""UPower on the system bus: is the machine on battery, and how full is it.

Read once at the start (``OnBattery`` of ``/org/freedesktop/UPower`` and
``Percentage`` of the display device, the one battery figure desktops show),
then followed through ``PropertiesChanged``: every change reaches the agent
as :class:`agent.policy.conditions.Circumstances`' battery part, so a backup
skipped on battery starts as soon as the charger is plugged in, without
polling. Without UPower (a desktop machine, no system bus) nothing is known
and nothing is held.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from dbus_fast.aio import MessageBus

from agent.desktop.dbus.properties import PropertyWatch, get_property, watch_properties

log = logging.getLogger(__name__)

UPOWER_NAME = "org.freedesktop.UPower"
UPOWER_PATH = "/org/freedesktop/UPower"
UPOWER_INTERFACE = "org.freedesktop.UPower"
DISPLAY_DEVICE_PATH = "/org/freedesktop/UPower/devices/DisplayDevice"
DEVICE_INTERFACE = "org.freedesktop.UPower.Device"


def _percent(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class PowerWatch:
    """The battery as UPower says it now; ``on_change(on_battery, percent)`` after each change."""

    def __init__(self, on_change: Callable[[bool, float | None], None]) -> None:
        self.on_battery = False
        self.percent: float | None = None
        self._on_change = on_change
        self._watch: PropertyWatch | None = None

    def changed(self, path: str, interface: str, values: dict[str, Any]) -> None:
        before = (self.on_battery, self.percent)
        if path == UPOWER_PATH and interface == UPOWER_INTERFACE and "OnBattery" in values:
            self.on_battery = values["OnBattery"] is True
        if path == DISPLAY_DEVICE_PATH and interface == DEVICE_INTERFACE and "Percentage" in values:
            self.percent = _percent(values["Percentage"])
        if (self.on_battery, self.percent) != before:
            self._on_change(self.on_battery, self.percent)

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None


async def watch_power(bus: MessageBus | None, on_change: Callable[[bool, float | None], None]) -> PowerWatch | None:
    """Follow UPower: ``on_change`` once with what it says now, then after each change; None without a bus."""
    if bus is None:
        return None
    power = PowerWatch(on_change)
    power._watch = await watch_properties(bus, UPOWER_NAME, (UPOWER_PATH, DISPLAY_DEVICE_PATH), power.changed)
    on_battery = await get_property(bus, UPOWER_NAME, UPOWER_PATH, UPOWER_INTERFACE, "OnBattery")
    percent = await get_property(bus, UPOWER_NAME, DISPLAY_DEVICE_PATH, DEVICE_INTERFACE, "Percentage")
    if on_battery is None:
        log.info("UPower does not answer on the system bus: backups do not wait for the battery")
    power.on_battery, power.percent = on_battery is True, _percent(percent)
    on_change(power.on_battery, power.percent)
    return power


__all__ = ["DEVICE_INTERFACE", "DISPLAY_DEVICE_PATH", "PowerWatch", "UPOWER_NAME", "UPOWER_PATH", "watch_power"]
