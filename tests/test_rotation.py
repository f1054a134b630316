"""Tests of the rotation planner: names, properties, and parity with rotate-backups.

The parity tests run the real rotate-backups 8.1 in a separate virtualenv
(it is never a dependency of backup-agent) through
``tests/peers/rotate_backups_oracle.py``: one process for the whole module,
spoken to in JSON lines.
"""

from __future__ import annotations

import calendar
import datetime
import json
import os
import subprocess
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import pytest
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from agent.policy.rotation import (
    FREQUENCIES,
    SNAPSHOT_NAME_RE,
    Count,
    Plan,
    Scheme,
    format_snapshot_name,
    parse_snapshot_name,
    plan_rotation,
)

REPO = Path(__file__).resolve().parent.parent
ORACLE_SCRIPT = REPO / "tests" / "peers" / "rotate_backups_oracle.py"

UTC_OFFSETS = ("+0100", "+0200", "-0500")
JUNK_NAMES = (
    "latest",
    "lost+found",
    "2026-11-22T14-00-00+0100.in-progress",
    "2026-13-01T00-00-00+0100",
    "2026-11-22T13:00:00+0100",
)


# --- helpers -----------------------------------------------------------------


def utc_offset(**delta: int) -> datetime.timezone:
    """A fixed UTC offset."""
    return datetime.timezone(datetime.timedelta(**delta))


def wall(name: str) -> datetime.datetime:
    """The naive wall-clock time of a valid snapshot name."""
    moment = parse_snapshot_name(name)
    assert moment is not None, name
    return moment.replace(tzinfo=None)


def period(frequency: str, name: str) -> tuple[int, ...]:
    """Our period of a name, written independently of the planner."""
    t = wall(name)
    iso = t.isocalendar()
    return {
        "hourly": (t.year, t.month, t.day, t.hour),
        "daily": (t.year, t.month, t.day),
        "weekly": (iso.year, iso.week),
        "monthly": (t.year, t.month),
        "yearly": (t.year,),
    }[frequency]


def kept_for(plan: Plan, frequency: str) -> list[str]:
    """Names the plan keeps because of one frequency."""
    return [name for name, reasons in plan.keep.items() if frequency in reasons]


def as_json(plan: Plan) -> dict[str, Any]:
    """A plan in the oracle's answer format."""
    return {"keep": {name: list(reasons) for name, reasons in plan.keep.items()}, "delete": list(plan.delete)}


def weeks_agree(names: set[str]) -> bool:
    """Whether rotate-backups' (calendar year, ISO week) equals the ISO week for all names."""
    return all(wall(n).year == wall(n).isocalendar().year for n in names)


# --- strategies --------------------------------------------------------------

counts: st.SearchStrategy[Count] = st.one_of(st.integers(1, 30), st.integers(1, 4), st.just("always"))
schemes = st.builds(
    Scheme,
    counts=st.dictionaries(st.sampled_from(FREQUENCIES), counts, min_size=1),
    prefer_recent=st.booleans(),
    strict=st.booleans(),
)

UNITS = ("hours", "days", "weeks", "months", "years")
UNIT_SECONDS = {"hours": 3600, "days": 86400, "weeks": 7 * 86400, "months": 31 * 86400, "years": 366 * 86400}


def shifted(start: datetime.datetime, unit: str, steps: int) -> datetime.datetime:
    """``start`` plus whole units; months and years clamp the day, as calendars do."""
    if unit not in ("months", "years"):
        return start + datetime.timedelta(**{unit: steps})
    year, month_index = divmod(start.month - 1 + steps * (12 if unit == "years" else 1), 12)
    year += start.year
    day = min(start.day, calendar.monthrange(year, month_index + 1)[1])
    return start.replace(year=year, month=month_index + 1, day=day)


@st.composite
def name_sets(draw: st.DrawFn) -> set[str]:
    """1..60 snapshot names: hours to years, New Year, bursts, mixed offsets.

    Most snapshots sit a whole number of units (hours ... years) after a
    start, often exactly, so that strict windows' boundaries get hit; bursts
    add siblings up to an hour earlier (several per hour).
    """
    near_new_year = st.builds(
        lambda year, before: datetime.datetime(year, 12, 31, 23, 59) - datetime.timedelta(minutes=before),
        st.integers(2000, 2035),
        st.integers(0, 21 * 24 * 60),
    )
    anywhere = st.datetimes(datetime.datetime(2000, 1, 1), datetime.datetime(2035, 12, 31))
    start = draw(st.one_of(near_new_year, anywhere)).replace(microsecond=0)
    unit = draw(st.sampled_from(UNITS))
    jitter = st.one_of(st.just(0), st.just(0), st.integers(0, 3600), st.integers(0, UNIT_SECONDS[unit]))
    offset = st.sampled_from(UTC_OFFSETS)
    points = draw(st.lists(st.tuples(st.integers(0, 40), jitter, offset), min_size=1, max_size=45))
    named = [(shifted(start, unit, steps) + datetime.timedelta(seconds=s), o) for steps, s, o in points]
    bursts = draw(st.lists(st.tuples(st.sampled_from(named), st.integers(-3600, -1), offset), max_size=15))
    named += [(time + datetime.timedelta(seconds=gap), o) for (time, _), gap, o in bursts]
    return {time.strftime("%Y-%m-%dT%H-%M-%S") + o for time, o in named}


aware_datetimes = st.datetimes(
    min_value=datetime.datetime(1, 1, 1),
    max_value=datetime.datetime(9999, 12, 31, 23, 59, 59),
    timezones=st.builds(lambda m: utc_offset(minutes=m), st.integers(-1439, 1439)),
)


# --- snapshot names ----------------------------------------------------------


def test_name_examples() -> None:
    moment = datetime.datetime(2026, 11, 22, 13, 0, 0, tzinfo=utc_offset(hours=1))
    assert format_snapshot_name(moment) == "2026-11-22T13-00-00+0100"
    assert parse_snapshot_name("2026-11-22T13-00-00+0100") == moment
    west = datetime.datetime(2026, 1, 2, 3, 4, 5, 999999, tzinfo=utc_offset(hours=-5, minutes=-30))
    assert format_snapshot_name(west) == "2026-01-02T03-04-05-0530"
    utc = datetime.datetime(2026, 1, 2, tzinfo=datetime.timezone.utc)
    assert format_snapshot_name(utc) == "2026-01-02T00-00-00+0000"


@given(aware_datetimes)
def test_name_round_trip(moment: datetime.datetime) -> None:
    name = format_snapshot_name(moment)
    assert SNAPSHOT_NAME_RE.fullmatch(name)
    assert ":" not in name
    parsed = parse_snapshot_name(name)
    assert parsed is not None
    assert parsed.replace(tzinfo=None) == moment.replace(tzinfo=None, microsecond=0)
    assert parsed.utcoffset() == moment.utcoffset()
    assert format_snapshot_name(parsed) == name


@given(st.from_regex(SNAPSHOT_NAME_RE, fullmatch=True))
def test_every_accepted_name_is_its_own_format(name: str) -> None:
    parsed = parse_snapshot_name(name)
    if parsed is not None:
        assert format_snapshot_name(parsed) == name


@given(aware_datetimes, aware_datetimes)
def test_names_with_one_offset_sort_in_time_order(a: datetime.datetime, b: datetime.datetime) -> None:
    a, b = a.replace(microsecond=0), b.replace(tzinfo=a.tzinfo, microsecond=0)
    assert (format_snapshot_name(a) < format_snapshot_name(b)) == (a < b)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "latest",
        "2026-11-22 13-00-00+0100",  # space, not T
        "2026_11_22T13-00-00+0100",  # wrong date separators
        "2026-11-22T13_00_00+0100",  # wrong time separators
        "2026-11-22t13-00-00+0100",  # lower-case t
        "2026-11-22T13:00:00+0100",  # colons in the time
        "2026-11-22T13-00-00+01:00",  # colon in the offset
        "2026-13-22T13-00-00+0100",  # month 13
        "2026-00-22T13-00-00+0100",  # month 0
        "2026-02-29T13-00-00+0100",  # not a leap year
        "2026-11-31T13-00-00+0100",  # November 31
        "2026-11-22T24-00-00+0100",  # hour 24
        "2026-11-22T13-60-00+0100",  # minute 60
        "2026-11-22T13-00-60+0100",  # leap second
        "0000-01-01T00-00-00+0100",  # year 0
        "2026-11-22T13-00-00+2400",  # offset of a day
        "2026-11-22T13-00-00+0160",  # offset minute 60
        "2026-11-22T13-00-00-0000",  # unknown offset (RFC 3339); we write +0000
        "2026-11-22T13-00-00",  # no offset
        "2026-11-22T13-00-00Z",
        "2026-11-22T13-00-00+01",
        "2026-11-22T13-00-00.5+0100",  # fractions
        "2026-11-22T13-00-00+0100x",  # trailing text
        "2026-11-22T13-00-00+0100\n",
        " 2026-11-22T13-00-00+0100",
        "2026-11-22T13-00-00+0100.in-progress",
        "snapshot-2026-11-22T13-00-00+0100",
        "\u0662\u0660\u0662\u0666-11-22T13-00-00+0100",  # Arabic-Indic digits
    ],
)
def test_invalid_names_are_rejected(name: str) -> None:
    assert parse_snapshot_name(name) is None


def test_format_rejects_what_a_name_cannot_hold() -> None:
    with pytest.raises(ValueError, match="naive"):
        format_snapshot_name(datetime.datetime(2026, 11, 22, 13))
    with pytest.raises(ValueError, match="whole number of minutes"):
        format_snapshot_name(datetime.datetime(2026, 11, 22, tzinfo=utc_offset(seconds=30)))


# --- schemes -----------------------------------------------------------------


@pytest.mark.parametrize(
    "scheme_counts",
    [
        {},
        {"hourly": 0},
        {"daily": -1},
        {"daily": 1.5},
        {"daily": True},
        {"daily": "7"},
        {"daily": "never"},
        {"minutely": 5},
        {"daily": 7, "fortnightly": 1},
    ],
)
def test_unusable_schemes_are_refused(scheme_counts: Mapping[str, Any]) -> None:
    with pytest.raises(ValueError):
        plan_rotation(["2026-11-22T13-00-00+0100"], Scheme(counts=scheme_counts))
    with pytest.raises(ValueError):
        plan_rotation([], Scheme(counts=scheme_counts))


def test_no_names_no_plan() -> None:
    assert plan_rotation([], Scheme(counts={"daily": 7})) == Plan(keep={}, delete=())


@pytest.mark.parametrize("huge", [10**4, 10**6, 10**12])
def test_huge_counts_keep_everything_instead_of_overflowing(huge: int) -> None:
    # rotate-backups crashes here: its window would start before year 1.
    names = ["0001-01-01T00-00-00+0100", "0001-06-15T12-00-00+0100", "0002-12-31T23-59-59+0100"]
    plan = plan_rotation(names, Scheme(counts={f: huge for f in FREQUENCIES}))
    assert plan.delete == ()


# --- concrete semantics ------------------------------------------------------


def test_a_small_plan() -> None:
    names = [
        "2026-11-22T12-00-00+0100",
        "2026-11-22T12-20-00+0100",
        "2026-11-22T13-00-00+0100",
        "2026-11-21T09-00-00+0100",
        "junk",
    ]
    scheme = Scheme(counts={"hourly": 2, "daily": 7})
    plan = plan_rotation(names, scheme, protected={"2026-11-22T12-20-00+0100": "flagged"})
    assert plan == Plan(
        keep={
            "2026-11-21T09-00-00+0100": ("daily",),
            "2026-11-22T12-00-00+0100": ("hourly", "daily"),
            "2026-11-22T12-20-00+0100": ("flagged",),
            "2026-11-22T13-00-00+0100": ("hourly",),
            "junk": ("not a snapshot name",),
        },
        delete=(),
    )


def test_difference_2_newest_is_kept() -> None:
    names = ["2026-11-22T13-00-00+0100", "2026-11-22T13-30-00+0100"]
    plan = plan_rotation(names, Scheme(counts={"hourly": 24}))
    assert plan == Plan(keep={names[0]: ("hourly",), names[1]: ("newest",)}, delete=())


# Thu 2026-12-31 and Fri 2027-01-01 are both in ISO week 2026-W53.
WEEK_SPLIT = ["2026-12-31T12-00-00+0100", "2027-01-01T12-00-00+0100", "2027-01-04T12-00-00+0100"]
# Wed 2025-01-01 is 2025-W01, Mon 2025-12-29 is 2026-W01: a year apart.
WEEK_MERGE = ["2025-01-01T12-00-00+0100", "2025-12-29T12-00-00+0100", "2026-01-10T12-00-00+0100"]


def test_difference_1_new_year_week_is_one_week() -> None:
    plan = plan_rotation(WEEK_SPLIT, Scheme(counts={"weekly": 4}))
    first, second, third = WEEK_SPLIT
    assert plan == Plan(keep={first: ("weekly",), third: ("weekly",)}, delete=(second,))


def test_difference_1_weeks_a_year_apart_stay_apart() -> None:
    plan = plan_rotation(WEEK_MERGE, Scheme(counts={"weekly": "always"}))
    assert plan == Plan(keep={name: ("weekly",) for name in WEEK_MERGE}, delete=())


@pytest.mark.parametrize(
    ("names", "counts", "deleted"),
    [
        # Months clamp the day: 2024-04-30 - 2 months = 2024-02-29 (no March here).
        (["2024-02-29T12-00-00+0100", "2024-04-30T12-00-00+0200"], {"monthly": 2}, []),
        (["2024-02-29T11-59-59+0100", "2024-04-30T12-00-00+0200"], {"monthly": 2}, ["2024-02-29T11-59-59+0100"]),
        # Years too: 2024-02-29 - 2 years = 2022-02-28.
        (["2022-02-28T12-00-00+0100", "2024-02-29T12-00-00+0100"], {"yearly": 2}, []),
        (["2022-02-28T11-00-00+0100", "2024-02-29T12-00-00+0100"], {"yearly": 2}, ["2022-02-28T11-00-00+0100"]),
    ],
)
def test_strict_window_clamps_months(names: list[str], counts: dict[str, Count], deleted: list[str]) -> None:
    assert list(plan_rotation(names, Scheme(counts=counts)).delete) == deleted


# --- properties --------------------------------------------------------------


@given(name_sets(), schemes)
def test_every_name_in_exactly_one_set(names: set[str], scheme: Scheme) -> None:
    plan = plan_rotation(sorted(names, reverse=True), scheme)
    assert set(plan.keep).isdisjoint(plan.delete)
    assert set(plan.keep) | set(plan.delete) == names
    assert list(plan.keep) == sorted(plan.keep)
    assert list(plan.delete) == sorted(plan.delete)
    for reasons in plan.keep.values():
        in_order = tuple(f for f in FREQUENCIES if f in reasons and f in scheme.counts)
        assert reasons == ("newest",) or reasons == in_order != ()


@given(name_sets(), schemes)
def test_newest_is_never_deleted(names: set[str], scheme: Scheme) -> None:
    assert max(names) in plan_rotation(names, scheme).keep


@given(name_sets(), schemes, st.data())
def test_protected_and_unparseable_are_kept_and_not_counted(
    names: set[str], scheme: Scheme, data: st.DataObject
) -> None:
    reasons = st.sampled_from(["partial", "flagged"])
    protected = data.draw(st.dictionaries(st.sampled_from(sorted(names)), reasons))
    junk = set(data.draw(st.lists(st.sampled_from(JUNK_NAMES))))
    plan = plan_rotation(names | junk, scheme, protected)
    for name, reason in protected.items():
        assert plan.keep[name] == (reason,)
    for name in junk:
        assert plan.keep[name] == ("not a snapshot name",)
    alone = plan_rotation(names - set(protected), scheme)
    assert {n: r for n, r in plan.keep.items() if n not in protected and n not in junk} == alone.keep
    assert plan.delete == alone.delete


@given(name_sets(), schemes, st.sampled_from(FREQUENCIES))
def test_always_keeps_one_per_period(names: set[str], scheme: Scheme, frequency: str) -> None:
    scheme = Scheme({**scheme.counts, frequency: "always"}, scheme.prefer_recent, scheme.strict)
    kept = kept_for(plan_rotation(names, scheme), frequency)
    assert sorted(period(frequency, n) for n in kept) == sorted({period(frequency, n) for n in names})


@given(name_sets(), schemes)
def test_counts_bound_the_kept_periods(names: set[str], scheme: Scheme) -> None:
    plan = plan_rotation(names, scheme)
    all_periods = {f: sorted({period(f, n) for n in names}) for f in FREQUENCIES}
    for frequency, count in scheme.counts.items():
        periods = [period(frequency, n) for n in kept_for(plan, frequency)]
        assert len(periods) == len(set(periods)), "one per period"
        if count != "always":
            assert len(periods) <= count
            # The kept periods are the newest ones: all of them when not strict.
            newest = all_periods[frequency][-count:]
            assert set(periods) <= set(newest)
            if not scheme.strict:
                assert sorted(periods) == newest


@given(name_sets(), schemes, st.data())
def test_planning_again_deletes_nothing(names: set[str], scheme: Scheme, data: st.DataObject) -> None:
    protected = data.draw(st.dictionaries(st.sampled_from(sorted(names)), st.just("partial")))
    plan = plan_rotation(names | {"latest"}, scheme, protected)
    again = plan_rotation(plan.keep, scheme, protected)
    assert again.delete == ()
    assert set(again.keep) == set(plan.keep)


@given(name_sets(), schemes)
def test_pick_is_oldest_or_newest_of_its_period(names: set[str], scheme: Scheme) -> None:
    plan = plan_rotation(names, scheme)
    for frequency in scheme.counts:
        for name in kept_for(plan, frequency):
            members = sorted(n for n in names if period(frequency, n) == period(frequency, name))
            assert name == (members[-1] if scheme.prefer_recent else members[0])


# --- parity with the real rotate-backups --------------------------------------


class Oracle:
    """One rotate-backups process, asked in JSON lines."""

    def __init__(self, python: str) -> None:
        self.process = subprocess.Popen(
            [python, str(ORACLE_SCRIPT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def ask(self, names: Iterable[str], scheme: Scheme) -> dict[str, Any]:
        """rotate-backups' keep/delete for these names and this scheme."""
        assert self.process.stdin is not None and self.process.stdout is not None
        request = {
            "names": sorted(names),
            "scheme": dict(scheme.counts),
            "prefer_recent": scheme.prefer_recent,
            "strict": scheme.strict,
        }
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"rotate-backups oracle exited with {self.process.wait()}")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise AssertionError(f"rotate-backups failed on {request}: {answer['error']}")
        return answer

    def close(self) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


def peers_python() -> str:
    """The peers venv's interpreter, or skip saying how to make one."""
    python = os.environ.get("BACKUP_AGENT_PEERS_PYTHON") or str(REPO / ".venv-peers" / "bin" / "python")
    how = (
        "rotate-backups parity: needs a virtualenv with rotate-backups at "
        f"{python} (or set BACKUP_AGENT_PEERS_PYTHON); run scripts/test, which creates .venv-peers"
    )
    if not Path(python).exists():
        pytest.skip(reason=how)
    probe = subprocess.run([python, "-c", "import rotate_backups"], capture_output=True, timeout=60)
    if probe.returncode != 0:
        last_line = (probe.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        pytest.skip(reason=f"{how} ({python}: {last_line})")
    return python


@pytest.fixture(scope="module")
def oracle() -> Iterator[Oracle]:
    oracle = Oracle(peers_python())
    yield oracle
    oracle.close()


def with_newest_kept(answer: dict[str, Any]) -> dict[str, Any]:
    """rotate-backups' answer with difference 2 applied: the newest is never deleted."""
    keep = dict(answer["keep"])
    delete = list(answer["delete"])
    newest = max([*keep, *delete])
    if newest in delete:
        delete.remove(newest)
        keep[newest] = ["newest"]
    return {"keep": dict(sorted(keep.items())), "delete": sorted(delete)}


@settings(max_examples=300, deadline=None)
@given(name_sets(), schemes)
def test_parity_with_rotate_backups(oracle: Oracle, names: set[str], scheme: Scheme) -> None:
    # Difference 1 (ISO weeks) only shows where a week's calendar and ISO
    # years differ: there, compare the other frequencies (they are
    # independent); the week difference has its own tests below.
    if "weekly" in scheme.counts and not weeks_agree(names):
        event("weekly left out: a week straddles New Year")
        counts = {f: c for f, c in scheme.counts.items() if f != "weekly"}
        scheme = Scheme(counts, scheme.prefer_recent, scheme.strict)
        assume(scheme.counts)
    expected = with_newest_kept(oracle.ask(names, scheme))
    plan = plan_rotation(names, scheme)
    event("newest saved" if plan.keep.get(max(names)) == ("newest",) else "newest kept by the scheme")
    event(f"deleted {'none' if not plan.delete else 'some'}")
    assert as_json(plan) == expected


@pytest.mark.parametrize(
    ("names", "counts"),
    [
        # DST fall-back: 02:10+0100 is 40 minutes after 02:30+0200, yet sorts first.
        (["2026-10-25T01-50-00+0200", "2026-10-25T02-30-00+0200", "2026-10-25T02-10-00+0100"], {"hourly": 24}),
        (["2026-10-25T02-30-00+0200", "2026-10-25T02-10-00+0100", "2026-10-25T03-10-00+0100"], {"hourly": 1}),
        # One wall-clock time, two offsets: ordered by the offset's text.
        (["2026-11-22T13-00-00+0100", "2026-11-22T13-00-00-0500", "2026-11-22T14-00-00+0100"], {"hourly": 2}),
        (["2024-02-29T12-00-00+0100", "2024-04-30T12-00-00+0200"], {"monthly": 2}),
        (["2024-02-29T11-59-59+0100", "2024-04-30T12-00-00+0200"], {"monthly": 2}),
        (["2022-02-28T11-00-00+0100", "2024-02-29T12-00-00+0100"], {"yearly": 2}),
        (["2024-03-31T00-00-00+0100", "2024-02-29T00-00-00+0100", "2024-01-31T00-00-00+0100"], {"monthly": 1}),
        (["2026-11-22T13-00-00+0100"], {"yearly": "always"}),
    ],
)
@pytest.mark.parametrize("prefer_recent", [False, True])
@pytest.mark.parametrize("strict", [True, False])
def test_parity_on_edge_cases(
    oracle: Oracle, names: list[str], counts: dict[str, Count], prefer_recent: bool, strict: bool
) -> None:
    scheme = Scheme(counts, prefer_recent, strict)
    assert as_json(plan_rotation(names, scheme)) == with_newest_kept(oracle.ask(names, scheme))


def test_rotate_backups_can_delete_the_newest(oracle: Oracle) -> None:
    names = ["2026-11-22T13-00-00+0100", "2026-11-22T13-30-00+0100"]
    scheme = Scheme(counts={"hourly": 24})
    assert oracle.ask(names, scheme) == {"keep": {names[0]: ["hourly"]}, "delete": [names[1]]}
    ours = {"keep": {names[0]: ["hourly"], names[1]: ["newest"]}, "delete": []}
    assert as_json(plan_rotation(names, scheme)) == ours


def test_rotate_backups_splits_the_new_year_week(oracle: Oracle) -> None:
    scheme = Scheme(counts={"weekly": 4})
    # (2026, 53), (2027, 53), (2027, 1): three weeks where there are two.
    assert oracle.ask(WEEK_SPLIT, scheme) == {"keep": {n: ["weekly"] for n in WEEK_SPLIT}, "delete": []}
    assert as_json(plan_rotation(WEEK_SPLIT, scheme))["delete"] == [WEEK_SPLIT[1]]


def test_rotate_backups_merges_weeks_a_year_apart(oracle: Oracle) -> None:
    scheme = Scheme(counts={"weekly": "always"})
    # 2025-01-01 and 2025-12-29 both fall in its (2025, 1): it keeps only the first.
    assert oracle.ask(WEEK_MERGE, scheme) == {
        "keep": {WEEK_MERGE[0]: ["weekly"], WEEK_MERGE[2]: ["weekly"]},
        "delete": [WEEK_MERGE[1]],
    }
    assert as_json(plan_rotation(WEEK_MERGE, scheme))["delete"] == []
