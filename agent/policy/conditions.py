"""Moments not to back up: on battery below a charge, on a metered connection, in quiet hours (pure).

The agenda (:mod:`agent.desktop.agenda`) asks :func:`hold` before it starts a
*due* backup; a hold skips it (never a failure) until the condition ends,
and the agenda then catches it up. "Back up now" is never held: the user
asked. The agent learns the machine's circumstances from UPower and
NetworkManager (``agent/desktop/dbus/upower.py``, ``networkmanager.py``) and
hands them over as a :class:`Circumstances` value; quiet hours are a matter
of the clock alone, so their end is a time the agent can wake up for.

Values in, values out: no clock, no bus. ``now`` is epoch seconds; the time
of day is read in ``tz`` (None: the machine's local time zone).

A metered connection holds only backups whose destination is remote: a
local disk costs no data. Today every destination is a local disk, so the
setting has nothing to hold yet; remote destinations name themselves to the
agenda (its ``remote`` set) and are held from then on. See
``docs/ARCHITECTURE.md``, "Moments not to back up".
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Final, Literal

#: ``[conditions] battery_below``: a due backup waits while the laptop runs on
#: battery with less charge than this (percent). 30: well above the 10-20 %
#: where desktops warn and turn on power saving, so a backup never pushes a
#: laptop into them, and low enough that a charged laptop away from its
#: charger still backs up. 0: never wait for the battery.
DEFAULT_BATTERY_BELOW: Final = 30
#: ``[conditions] skip_metered``: a remote destination waits while the connection is metered.
DEFAULT_SKIP_METERED: Final = True

HoldKind = Literal["battery", "metered", "quiet"]

_CLOCK = re.compile(r"([01]?[0-9]|2[0-3]):([0-5][0-9])")


@dataclass(frozen=True)
class QuietHours:
    """A daily window, in minutes after midnight; ``start > end`` crosses midnight ("23:00-07:00")."""

    start: int
    end: int

    def __post_init__(self) -> None:
        for value in (self.start, self.end):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 24 * 60:
                raise ValueError(f"a time of day must be minutes from 0 to 1439, got {value!r}")
        if self.start == self.end:
            raise ValueError("quiet hours must not start and end at the same time")

    def holds(self, minute: int) -> bool:
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end

    def text(self) -> str:
        return f"{_hhmm(self.start)}-{_hhmm(self.end)}"


def _hhmm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


def parse_quiet_hours(text: str) -> QuietHours:
    """``"HH:MM-HH:MM"`` (local time) as :class:`QuietHours`; ValueError names what is wrong."""
    parts = text.split("-")
    if len(parts) != 2:
        raise ValueError("expected two times of day joined by a dash, such as \"23:00-07:00\"")
    minutes: list[int] = []
    for part in parts:
        match = _CLOCK.fullmatch(part.strip())
        if match is None:
            raise ValueError(f"{part.strip()!r} is not a time of day: expected HH:MM from 00:00 to 23:59")
        minutes.append(int(match.group(1)) * 60 + int(match.group(2)))
    return QuietHours(minutes[0], minutes[1])


@dataclass(frozen=True)
class Rules:
    """What the configuration's ``[conditions]`` says."""

    battery_below: int = DEFAULT_BATTERY_BELOW  # percent; 0: the battery holds nothing
    skip_metered: bool = DEFAULT_SKIP_METERED
    quiet_hours: QuietHours | None = None


@dataclass(frozen=True)
class Circumstances:
    """What the machine says now. Unknown is taken as "nothing holds": an agent without
    UPower or NetworkManager backs up as it always did."""

    on_battery: bool = False
    battery_percent: float | None = None  # the display device's charge; None: not known
    metered: bool = False
    offline: bool = False  # NetworkManager says there is no network at all: no server can be reached


@dataclass(frozen=True)
class Hold:
    """Why a due backup waits now: the kind, the words for people, and (quiet hours) until when."""

    kind: HoldKind
    text: str
    until: float | None = None  # epoch seconds the hold ends by itself; None: an event ends it


def hold(rules: Rules, circumstances: Circumstances, now: float, *, remote: bool = False,
         tz: dt.tzinfo | None = None) -> Hold | None:
    """The first condition that holds a due backup now, or None.

    Quiet hours first (they end at a known time), then the battery, then a
    metered connection (``remote`` destinations only).
    """
    quiet = rules.quiet_hours
    if quiet is not None:
        local = dt.datetime.fromtimestamp(now, tz)
        if quiet.holds(local.hour * 60 + local.minute):
            end = quiet_end(quiet, now, tz)
            return Hold("quiet", f"quiet hours until {_hhmm(quiet.end)}", end)
    if rules.battery_below > 0 and circumstances.on_battery:
        percent = circumstances.battery_percent
        if percent is None:
            return Hold("battery", "on battery")
        if percent < rules.battery_below:
            return Hold("battery", f"on battery at {percent:.0f}% (below {rules.battery_below}%)")
    if rules.skip_metered and remote and circumstances.metered:
        return Hold("metered", "on a metered connection")
    return None


def quiet_end(quiet: QuietHours, now: float, tz: dt.tzinfo | None = None) -> float:
    """Epoch seconds of the next end of the quiet window after ``now`` (the window need not hold now)."""
    local = dt.datetime.fromtimestamp(now, tz)
    end = local.replace(hour=quiet.end // 60, minute=quiet.end % 60, second=0, microsecond=0)
    if end <= local:
        end += dt.timedelta(days=1)
    at = end.timestamp()
    return at if at > now else now + 60.0  # a clock change on the way: look again in a minute


def metered_from_networkmanager(value: int) -> bool:
    """NetworkManager's ``Metered`` (NMMetered): 1 yes and 3 guessed yes are metered; 0 unknown, 2 no, 4 guessed no are not."""
    return value in (1, 3)


def on_battery_percent(on_battery: bool, percent: float | None) -> Circumstances:
    """UPower's two values as circumstances (a percent outside 0..100 is not known)."""
    known = percent if percent is not None and 0.0 <= percent <= 100.0 else None
    return Circumstances(on_battery=on_battery, battery_percent=known)


__all__ = [
    "Circumstances", "DEFAULT_BATTERY_BELOW", "DEFAULT_SKIP_METERED", "Hold", "HoldKind", "QuietHours", "Rules",
    "hold", "metered_from_networkmanager", "on_battery_percent", "parse_quiet_hours", "quiet_end",
]
