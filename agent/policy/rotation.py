"""Rotation planning: snapshot names and a scheme in, keep/delete out.

Pure: no I/O. The executor that deletes lives in :mod:`agent.repository.store`.

Snapshot names are ``YYYY-MM-DDTHH-MM-SS±HHMM``: the local wall-clock time a
snapshot started, and its UTC offset. They hold no colon (exFAT, Samba) and,
thanks to the offset, stay unambiguous across DST changes.

The planner reproduces rotate-backups 8.1 (``RotateBackups.group_backups``,
``apply_rotation_scheme`` and ``find_preservation_criteria``), the tool that
rsync-system-backup hands its snapshots to, so that users switching over keep
exactly the snapshots they would have kept. Like rotate-backups it works on
the naive wall-clock time of the name (the offset is ignored) and orders
snapshots by name:

- each frequency groups snapshots into periods (hour, day, week, month, year)
  and picks one per period: the oldest, or the newest with ``prefer_recent``;
- with ``strict``, a period whose pick is older than ``newest - count * unit``
  is dropped (months and years clamp the day to the month's end, as
  dateutil's relativedelta does: Mar 31 - 1 month = Feb 28/29);
- then only the newest ``count`` periods remain (all with ``"always"``);
- a snapshot picked by no frequency is deleted.

It differs from rotate-backups in exactly two ways, both deliberate:

1. Weekly periods are ISO weeks, ``(ISO year, ISO week)`` from
   ``isocalendar()``. rotate-backups keys weeks by ``(calendar year, ISO
   week)``, which splits the week that contains New Year in two (Thu
   2026-12-31 is ``(2026, 53)``, Fri 2027-01-01 becomes ``(2027, 53)`` and
   sorts as the newest week of 2027) and merges days a year apart (Mon
   2025-12-29, ISO week 1 of 2026, lands in ``(2025, 1)`` together with Wed
   2025-01-01).
2. The newest snapshot (the last name, in name order, among those that take
   part) is never deleted: when the scheme would delete it, it is kept with
   the single reason ``"newest"``. rotate-backups can delete it, e.g. two
   snapshots within one hour under an hourly-only scheme (it keeps the
   oldest of the period).

Beyond rotate-backups, the planner also leaves alone names it is told to
protect (``protected``, e.g. partial or flagged snapshots) and names that are
not snapshot names: both are kept and take no part in the computation. It
never fails on huge counts, where rotate-backups' window arithmetic would run
before year 1 and crash: nothing is older than such a window start.
"""

from __future__ import annotations

import calendar
import datetime
import re
from dataclasses import dataclass, field
from typing import Iterable, Literal, Mapping, NamedTuple, Union

FREQUENCIES = ("hourly", "daily", "weekly", "monthly", "yearly")

Count = Union[int, Literal["always"]]


@dataclass(frozen=True)
class Scheme:
    """How many periods of each frequency to keep (absent: none)."""

    counts: Mapping[str, Count] = field(default_factory=dict)
    prefer_recent: bool = False
    strict: bool = True


# rsync-system-backup's default scheme (it hands it to rotate-backups).
DEFAULT_SCHEME = Scheme(counts={"hourly": 24, "daily": 7, "weekly": 4, "monthly": "always"})

NOT_A_SNAPSHOT = "not a snapshot name"
NEWEST = "newest"

# ASCII digits only: \d would also accept other scripts' digits.
SNAPSHOT_NAME_RE = re.compile(
    r"(?P<year>[0-9]{4})-(?P<month>[0-9]{2})-(?P<day>[0-9]{2})"
    r"T(?P<hour>[0-9]{2})-(?P<minute>[0-9]{2})-(?P<second>[0-9]{2})"
    r"(?P<sign>[+-])(?P<offset_hours>[0-9]{2})(?P<offset_minutes>[0-9]{2})"
)


def parse_snapshot_name(name: str) -> datetime.datetime | None:
    """The aware start time a snapshot name encodes, or None if it is not one.

    None also for impossible dates (month 13, Feb 30, second 60) and offsets
    (hours over 23, minutes over 59), and for ``-0000``, which
    :func:`format_snapshot_name` never writes (it writes ``+0000``): every
    name accepted here is exactly the name of its datetime.
    """
    match = SNAPSHOT_NAME_RE.fullmatch(name)
    if match is None:
        return None
    offset_hours = int(match["offset_hours"])
    offset_minutes = int(match["offset_minutes"])
    if offset_hours > 23 or offset_minutes > 59:
        return None
    if match["sign"] == "-" and offset_hours == offset_minutes == 0:
        return None
    offset = datetime.timedelta(hours=offset_hours, minutes=offset_minutes)
    if match["sign"] == "-":
        offset = -offset
    try:
        return datetime.datetime(
            int(match["year"]),
            int(match["month"]),
            int(match["day"]),
            int(match["hour"]),
            int(match["minute"]),
            int(match["second"]),
            tzinfo=datetime.timezone(offset),
        )
    except ValueError:
        return None


def format_snapshot_name(moment: datetime.datetime) -> str:
    """The snapshot name for an aware start time (microseconds are dropped).

    Raises ValueError for a naive datetime or an offset that is not a whole
    number of minutes: neither can be written in a name.
    """
    offset = moment.utcoffset()
    if offset is None:
        raise ValueError(f"snapshot time must be timezone-aware, got naive {moment.isoformat()}")
    if offset % datetime.timedelta(minutes=1):
        raise ValueError(f"UTC offset {offset} is not a whole number of minutes")
    offset_minutes = offset // datetime.timedelta(minutes=1)
    sign = "-" if offset_minutes < 0 else "+"
    offset_hours, offset_minutes = divmod(abs(offset_minutes), 60)
    return (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}"
        f"T{moment.hour:02d}-{moment.minute:02d}-{moment.second:02d}"
        f"{sign}{offset_hours:02d}{offset_minutes:02d}"
    )


@dataclass(frozen=True)
class Plan:
    """What rotation keeps (name → reasons) and deletes, both in name order."""

    keep: dict[str, tuple[str, ...]]
    delete: tuple[str, ...]


class _Snapshot(NamedTuple):
    """A snapshot taking part in rotation, with its naive wall-clock time."""

    name: str
    wall: datetime.datetime


def _validated_counts(scheme: Scheme) -> dict[str, Count]:
    """The scheme's counts in FREQUENCIES order; ValueError if unusable.

    An empty scheme would delete everything but the newest snapshot, so it
    is refused rather than obeyed.
    """
    unknown = sorted(set(scheme.counts) - set(FREQUENCIES))
    if unknown:
        raise ValueError(f"unknown rotation frequency {unknown[0]!r}, expected one of {', '.join(FREQUENCIES)}")
    for frequency, count in scheme.counts.items():
        valid = count == "always" or (isinstance(count, int) and not isinstance(count, bool) and count >= 1)
        if not valid:
            raise ValueError(f"rotation count for {frequency} must be an integer >= 1 or 'always', got {count!r}")
    if not scheme.counts:
        raise ValueError("empty rotation scheme: it would delete all snapshots but the newest")
    return {frequency: scheme.counts[frequency] for frequency in FREQUENCIES if frequency in scheme.counts}


def _period(frequency: str, wall: datetime.datetime) -> tuple[int, ...]:
    """The period of a frequency that a wall-clock time falls in (sortable)."""
    if frequency == "hourly":
        return (wall.year, wall.month, wall.day, wall.hour)
    if frequency == "daily":
        return (wall.year, wall.month, wall.day)
    if frequency == "weekly":
        iso = wall.isocalendar()
        return (iso.year, iso.week)  # difference 1: ISO year, not calendar year
    if frequency == "monthly":
        return (wall.year, wall.month)
    if frequency == "yearly":
        return (wall.year,)
    raise ValueError(f"unknown rotation frequency {frequency!r}")


def _months_before(wall: datetime.datetime, months: int) -> datetime.datetime | None:
    """``wall`` minus whole months, day clamped to the month's end, as relativedelta."""
    year, month_index = divmod(wall.year * 12 + wall.month - 1 - months, 12)
    if year < datetime.MINYEAR:
        return None
    month = month_index + 1
    day = min(wall.day, calendar.monthrange(year, month)[1])
    return wall.replace(year=year, month=month, day=day)


def _window_start(frequency: str, newest: datetime.datetime, count: int) -> datetime.datetime | None:
    """Where the strict window of ``count`` units before ``newest`` starts.

    None when it would start before year 1: then nothing is outside it.
    """
    if frequency == "monthly":
        return _months_before(newest, count)
    if frequency == "yearly":
        return _months_before(newest, 12 * count)
    units = {"hourly": "hours", "daily": "days", "weekly": "weeks"}
    try:
        return newest - datetime.timedelta(**{units[frequency]: count})
    except OverflowError:
        return None


def _picks(frequency: str, snapshots: list[_Snapshot], prefer_recent: bool) -> list[tuple[tuple[int, ...], _Snapshot]]:
    """One snapshot per period (oldest, or newest if preferred), oldest period first.

    ``snapshots`` is in name order, which is wall-clock order (ties: offset
    text), the order rotate-backups sorts its backups in.
    """
    picks: dict[tuple[int, ...], _Snapshot] = {}
    for snapshot in snapshots:
        period = _period(frequency, snapshot.wall)
        if prefer_recent or period not in picks:
            picks[period] = snapshot
    return sorted(picks.items())


def _kept_by(frequency: str, count: Count, snapshots: list[_Snapshot], scheme: Scheme) -> list[str]:
    """Names one frequency keeps: its picks in the newest ``count`` periods."""
    picks = _picks(frequency, snapshots, scheme.prefer_recent)
    if count != "always":
        start = _window_start(frequency, snapshots[-1].wall, count) if scheme.strict else None
        if start is not None:
            picks = [(period, pick) for period, pick in picks if pick.wall >= start]
        picks = picks[-count:]
    return [pick.name for _, pick in picks]


def plan_rotation(names: Iterable[str], scheme: Scheme, protected: Mapping[str, str] = {}) -> Plan:
    """Decide which snapshots to keep and why, and which to delete.

    ``protected`` names are kept with their given reason and names that do not
    parse are kept as "not a snapshot name"; neither takes part in choosing
    periods, as if absent. Raises ValueError for an unusable scheme.
    """
    counts = _validated_counts(scheme)
    all_names = sorted(set(names))
    reasons: dict[str, list[str]] = {}
    snapshots: list[_Snapshot] = []
    for name in all_names:
        moment = parse_snapshot_name(name)
        if name in protected:
            reasons[name] = [protected[name]]
        elif moment is None:
            reasons[name] = [NOT_A_SNAPSHOT]
        else:
            snapshots.append(_Snapshot(name, moment.replace(tzinfo=None)))
    if snapshots:
        for frequency, count in counts.items():
            for name in _kept_by(frequency, count, snapshots, scheme):
                reasons.setdefault(name, []).append(frequency)
        reasons.setdefault(snapshots[-1].name, [NEWEST])  # difference 2
    return Plan(
        keep={name: tuple(reasons[name]) for name in all_names if name in reasons},
        delete=tuple(name for name in all_names if name not in reasons),
    )
