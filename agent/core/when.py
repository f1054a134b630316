"""Times as people write them, for ``restore --at`` (pure: "now" is given).

A day without a time of day means the end of that day ("as it was on
Monday"); a time without a day means today. Wall-clock results take the
local zone given by the caller, so "yesterday 14:00" is 14:00 on the clock
even across a DST change.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import zoneinfo

from agent.core.errors import UsageError

FORMS = (
    'accepted: "2026-11-20", "2026-11-20 14:00", "2026-11-20T14:00:05+01:00", "14:00", "now", "today", '
    '"yesterday 14:00", "2 days ago", "3 hours ago", "last monday", "monday 9:30"'
)
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_UNITS = {"minute": 60, "hour": 3600, "day": 86400, "week": 7 * 86400}
_CLOCK = re.compile(r"^(\d{1,2}):(\d{2})(?::(\d{2}))?$")
_AGO = re.compile(r"^(\d+)\s*(minute|hour|day|week)s?\s+ago$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_END_OF_DAY = dt.time(23, 59, 59, 999999)


def local_zone() -> dt.tzinfo | None:
    """The machine's zone with its DST rules (TZ, else /etc/localtime), or None to use now's offset."""
    name = os.environ.get("TZ", "").lstrip(":")
    try:
        if name:
            return zoneinfo.ZoneInfo(name)
        with open("/etc/localtime", "rb") as handle:
            return zoneinfo.ZoneInfo.from_file(handle)
    except (OSError, ValueError, zoneinfo.ZoneInfoNotFoundError):
        return None


def _clock(text: str) -> dt.time | None:
    match = _CLOCK.match(text)
    if match is None:
        return None
    hour, minute, second = int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)
    if hour > 23 or minute > 59 or second > 59:
        return None
    return dt.time(hour, minute, second)


def _day(text: str, today: dt.date) -> dt.date | None:
    if text == "today":
        return today
    if text == "yesterday":
        return today - dt.timedelta(days=1)
    if _DATE.match(text):
        try:
            return dt.date.fromisoformat(text)
        except ValueError:
            return None
    words = text.split()
    if len(words) == 2 and words[0] == "last" and words[1] in WEEKDAYS:
        back = (today.weekday() - WEEKDAYS.index(words[1])) % 7 or 7
        return today - dt.timedelta(days=back)
    if len(words) == 1 and words[0] in WEEKDAYS:
        return today - dt.timedelta(days=(today.weekday() - WEEKDAYS.index(words[0])) % 7)
    return None


def parse_when(text: str, now: dt.datetime, zone: dt.tzinfo | None = None) -> dt.datetime:
    """The moment ``text`` names, as an aware datetime; UsageError listing the accepted forms otherwise.

    ``now`` must be aware; ``zone`` (default: now's own offset) places wall-clock times.
    """
    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime")
    zone = zone or now.tzinfo
    spoken = " ".join(text.strip().lower().split())
    if spoken == "now":
        return now
    ago = _AGO.match(spoken)
    if ago is not None:
        return now - dt.timedelta(seconds=int(ago.group(1)) * _UNITS[ago.group(2)])
    today = now.astimezone(zone).date()
    clock = _clock(spoken)
    if clock is not None:
        return dt.datetime.combine(today, clock, tzinfo=zone)
    day = _day(spoken, today)
    if day is not None:
        return dt.datetime.combine(day, _END_OF_DAY, tzinfo=zone)
    head, _, tail = spoken.rpartition(" ")
    day, clock = _day(head, today), _clock(tail)
    if day is not None and clock is not None:
        return dt.datetime.combine(day, clock, tzinfo=zone)
    try:
        moment = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(f"--at {text!r}: not a time backup-agent understands; {FORMS}") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=zone)
