"""``restore --at``: times as people write them (agent/core/when.py), against fixed "now" values."""

from __future__ import annotations

import datetime as dt
import zoneinfo

import pytest

from agent.core.errors import UsageError
from agent.core.when import FORMS, parse_when

UTC = dt.timezone.utc
# A Wednesday afternoon.
NOW = dt.datetime(2026, 11, 25, 16, 30, 12, tzinfo=UTC)
END = dt.time(23, 59, 59, 999999)


def at(*parts: int) -> dt.datetime:
    return dt.datetime(*parts, tzinfo=UTC)


CASES = [
    ("now", NOW),
    ("today", dt.datetime.combine(dt.date(2026, 11, 25), END, tzinfo=UTC)),
    ("yesterday", dt.datetime.combine(dt.date(2026, 11, 24), END, tzinfo=UTC)),
    ("yesterday 14:00", at(2026, 11, 24, 14, 0)),
    ("Yesterday  9:05:30", at(2026, 11, 24, 9, 5, 30)),
    ("today 08:00", at(2026, 11, 25, 8, 0)),
    ("14:00", at(2026, 11, 25, 14, 0)),
    ("2 days ago", NOW - dt.timedelta(days=2)),
    ("1 day ago", NOW - dt.timedelta(days=1)),
    ("3 hours ago", NOW - dt.timedelta(hours=3)),
    ("45 minutes ago", NOW - dt.timedelta(minutes=45)),
    ("2 weeks ago", NOW - dt.timedelta(weeks=2)),
    ("last monday", dt.datetime.combine(dt.date(2026, 11, 23), END, tzinfo=UTC)),
    ("last wednesday", dt.datetime.combine(dt.date(2026, 11, 18), END, tzinfo=UTC)),  # a week back, not today
    ("wednesday", dt.datetime.combine(dt.date(2026, 11, 25), END, tzinfo=UTC)),  # today
    ("thursday", dt.datetime.combine(dt.date(2026, 11, 19), END, tzinfo=UTC)),
    ("last monday 14:00", at(2026, 11, 23, 14, 0)),
    ("2026-11-20", dt.datetime.combine(dt.date(2026, 11, 20), END, tzinfo=UTC)),
    ("2026-11-20 14:00", at(2026, 11, 20, 14, 0)),
    ("2026-11-20T14:00:05", at(2026, 11, 20, 14, 0, 5)),
    ("2026-11-20T14:00:05+01:00", dt.datetime(2026, 11, 20, 14, 0, 5, tzinfo=dt.timezone(dt.timedelta(hours=1)))),
]


@pytest.mark.parametrize(("text", "expected"), CASES, ids=[text for text, _ in CASES])
def test_forms(text: str, expected: dt.datetime) -> None:
    assert parse_when(text, NOW) == expected


def test_wall_clock_follows_the_zone_across_a_dst_change() -> None:
    try:
        berlin = zoneinfo.ZoneInfo("Europe/Berlin")
    except zoneinfo.ZoneInfoNotFoundError:
        pytest.skip(reason="no time zone data (tzdata) on this machine")
    # The Monday after clocks went back (2026-10-25): "yesterday 14:00" is 14:00 CET, not CEST.
    now = dt.datetime(2026, 10, 26, 10, 0, tzinfo=berlin)
    got = parse_when("yesterday 14:00", now, berlin)
    assert got.utcoffset() == dt.timedelta(hours=1)
    assert (got.hour, got.minute, got.day) == (14, 0, 25)
    assert parse_when("2 days ago", now, berlin) == now - dt.timedelta(days=2)


@pytest.mark.parametrize("text", ["", "tomorrow-ish", "25:00", "yesterday 14:61", "2026-13-01", "last funday", "3 fortnights ago"])
def test_anything_else_is_one_line_listing_the_forms(text: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_when(text, NOW)
    assert caught.value.message == f"--at {text!r}: not a time backup-agent understands; {FORMS}"
    assert "\n" not in caught.value.message


def test_now_must_be_aware() -> None:
    with pytest.raises(ValueError):
        parse_when("today", NOW.replace(tzinfo=None))
