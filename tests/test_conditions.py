"""Moments not to back up (agent/policy/conditions.py) and how the agenda keeps them (agent/desktop/agenda.py).

Both are pure: tested directly, by example and with hypothesis, with no
clock, bus or mock. Quiet hours are read in UTC here (the agenda's ``tz``),
so the examples do not depend on the machine's time zone.
"""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.desktop import agenda
from agent.desktop.agenda import (
    Answer,
    Asked,
    Circumstance,
    Finished,
    NotNow,
    Plugged,
    Skipped,
    Start,
    Stop,
    Tick,
    Unplugged,
    Wake,
)
from agent.policy import conditions, schedule
from agent.policy.conditions import Circumstances, Hold, QuietHours, Rules

UTC = dt.timezone.utc
HOUR = 3600.0
P = schedule.Policy()
DISKS = ("a", "b")


def at(hour: int, minute: int = 0, day: int = 15) -> float:
    return dt.datetime(2027, 1, day, hour, minute, tzinfo=UTC).timestamp()


T0 = at(12)
QUIET = QuietHours(23 * 60, 7 * 60)  # "23:00-07:00"
BATTERY_LOW = Circumstances(on_battery=True, battery_percent=12.0)
MAINS = Circumstances()


def plan_with(rules: Rules = Rules(), remote: tuple[str, ...] = (), **states: schedule.DiskState) -> agenda.Agenda:
    return agenda.new(P, DISKS, states, rules=rules, remote=remote, tz=UTC)


def run(plan: agenda.Agenda, *events: tuple[agenda.Event, float]) -> tuple[agenda.Agenda, list[agenda.Action]]:
    done: list[agenda.Action] = []
    for event, now in events:
        plan, actions = agenda.step(plan, event, now)
        done += actions
    return plan, done


def starts(actions: list[agenda.Action]) -> list[tuple[str, str]]:
    return [(a.disk, a.reason) for a in actions if isinstance(a, Start)]


# -- the pure decision -------------------------------------------------------------------------


def test_quiet_hours_are_read_as_people_write_them() -> None:
    assert conditions.parse_quiet_hours("23:00-07:00") == QUIET
    assert conditions.parse_quiet_hours(" 9:30 - 12:00 ") == QuietHours(570, 720)
    for bad, words in [("23:00", "two times of day"), ("24:00-07:00", "'24:00' is not a time of day"),
                       ("7-8", "'7' is not a time of day"), ("08:00-08:00", "same time")]:
        with pytest.raises(ValueError, match=words):
            conditions.parse_quiet_hours(bad)
    # across midnight, and within a day; the end is not quiet any more
    assert [QUIET.holds(m) for m in (23 * 60 - 1, 23 * 60, 0, 7 * 60 - 1, 7 * 60)] == [False, True, True, True, False]
    day = QuietHours(9 * 60, 17 * 60)
    assert [day.holds(m) for m in (8 * 60 + 59, 9 * 60, 16 * 60 + 59, 17 * 60)] == [False, True, True, False]


def test_what_holds_a_due_backup_and_why() -> None:
    rules = Rules(battery_below=30, skip_metered=True, quiet_hours=QUIET)
    assert conditions.hold(rules, MAINS, at(12), tz=UTC) is None
    # quiet hours first: they end at a known time, tomorrow morning when it is late evening
    assert conditions.hold(rules, BATTERY_LOW, at(23, 30), tz=UTC) == Hold(
        "quiet", "quiet hours until 07:00", at(7, day=16)
    )
    assert conditions.hold(rules, MAINS, at(3), tz=UTC) == Hold("quiet", "quiet hours until 07:00", at(7))
    assert conditions.hold(rules, BATTERY_LOW, at(12), tz=UTC) == Hold("battery", "on battery at 12% (below 30%)")
    assert conditions.hold(rules, Circumstances(on_battery=True, battery_percent=30.0), at(12), tz=UTC) is None
    assert conditions.hold(rules, Circumstances(on_battery=True), at(12), tz=UTC) == Hold("battery", "on battery")
    assert conditions.hold(Rules(battery_below=0), BATTERY_LOW, at(12), tz=UTC) is None
    # a metered connection holds only a remote destination
    metered = Circumstances(metered=True)
    assert conditions.hold(rules, metered, at(12), tz=UTC) is None
    assert conditions.hold(rules, metered, at(12), remote=True, tz=UTC) == Hold("metered", "on a metered connection")
    assert conditions.hold(Rules(skip_metered=False), metered, at(12), remote=True, tz=UTC) is None


def test_networkmanager_and_upower_values() -> None:
    assert [conditions.metered_from_networkmanager(v) for v in range(5)] == [False, True, False, True, False]
    assert conditions.on_battery_percent(True, 101.0) == Circumstances(on_battery=True, battery_percent=None)
    assert conditions.on_battery_percent(False, 55.5) == Circumstances(on_battery=False, battery_percent=55.5)


# -- the agenda, by example ----------------------------------------------------------------------


def test_a_plug_in_on_a_low_battery_waits_and_starts_when_the_charger_is_plugged_in() -> None:
    plan, actions = run(plan_with(), (Circumstance(BATTERY_LOW), T0 - 60), (Plugged("a"), T0))
    assert starts(actions) == [] and Skipped("a", "on battery at 12% (below 30%)") in actions
    assert plan.disk("a").skipped == Hold("battery", "on battery at 12% (below 30%)")
    assert actions[-1] == Wake(None)  # no timer: the charger is the event
    # told once: the timer or a repeated event does not skip it again in words
    plan, actions = run(plan, (Tick(), T0 + 60), (Circumstance(Circumstances(True, 11.0)), T0 + 120))
    assert not [x for x in actions if isinstance(x, Skipped)] and starts(actions) == []
    # "Back up now" is never held back
    assert starts(run(plan, (Asked("a"), T0 + 130))[1]) == [("a", "asked")]
    # the charger: caught up at once, as the plug-in it was
    plan, actions = run(plan, (Circumstance(MAINS), T0 + 600))
    assert starts(actions) == [("a", "plugged in, due")] and plan.disk("a").skipped is None


def test_on_plug_always_is_replayed_as_a_plug_in_when_the_condition_ends() -> None:
    recent = schedule.DiskState(last_success=T0 - 60)
    plan = agenda.new(schedule.Policy(on_plug="always"), DISKS, {"a": recent}, tz=UTC)
    plan, actions = run(plan, (Circumstance(BATTERY_LOW), T0 - 1), (Plugged("a"), T0), (Tick(), T0 + 5))
    assert starts(actions) == [] and plan.disk("a").skipped is not None and plan.disk("a").held == "plugged"
    plan, actions = run(plan, (Circumstance(MAINS), T0 + 10))
    assert starts(actions) == [("a", "plugged in, always")]


def test_quiet_hours_wake_the_agent_at_their_end_and_it_catches_up_then() -> None:
    plan = plan_with(Rules(quiet_hours=QUIET), a=schedule.DiskState(last_success=at(22)))
    plan, actions = run(plan, (Plugged("a"), at(22, 10)))
    assert starts(actions) == [] and actions[-1] == Wake(at(23))  # due at 23:00, the start of quiet hours
    plan, actions = run(plan, (Tick(), at(23)))
    assert starts(actions) == [] and actions[-1] == Wake(at(7, day=16))
    assert Skipped("a", "quiet hours until 07:00") in actions
    plan, actions = run(plan, (Tick(), at(7, day=16)))
    assert starts(actions) == [("a", "interval elapsed")]


def test_metered_holds_only_the_disks_named_remote() -> None:
    plan = plan_with(remote=("b",))
    plan, actions = run(plan, (Circumstance(Circumstances(metered=True)), T0), (Plugged("b"), T0 + 1))
    assert starts(actions) == [] and plan.disk("b").skipped == Hold("metered", "on a metered connection")
    plan, actions = run(plan, (Plugged("a"), T0 + 2))
    assert starts(actions) == [("a", "plugged in, due")]


def test_not_now_stops_the_cycle_and_postpones_exactly_one_interval() -> None:
    plan, _ = run(plan_with(a=schedule.DiskState(last_success=T0 - 2 * HOUR, failures=2, last_failure=T0 - 60)),
                  (Plugged("a"), T0))
    plan, actions = agenda.step(plan, NotNow(), T0 + 10)
    assert actions[:2] == (Stop("a"), Answer("postponed"))
    plan, actions = run(plan, (Finished("a", "failure"), T0 + 14))  # SIGTERM ends it as an error: not a failure
    state = plan.disk("a").state
    assert state.failures == 2 and state.unfinished and state.postponed_until == T0 + 10 + HOUR
    assert actions[-1] == Wake(T0 + 10 + HOUR) and plan.disk("a").next_due == T0 + 10 + HOUR
    assert starts(run(plan, (Tick(), T0 + 10 + HOUR - 1))[1]) == []
    later, actions = run(plan, (Tick(), T0 + 10 + HOUR))
    assert starts(actions) == [("a", "interval elapsed")]
    # whatever the next run's end, the postponement is over
    later, _ = run(later, (Finished("a", "success", snapshot_time=T0 + 10 + HOUR), T0 + 11 + HOUR))
    assert later.disk("a").state.postponed_until is None and later.disk("a").next_due == T0 + 10 + 2 * HOUR
    # nothing runs: nothing to postpone
    assert agenda.step(plan, NotNow(), T0 + 20)[1][0] == Answer("not-running")


# -- properties ----------------------------------------------------------------------------------

circumstances = st.builds(
    Circumstances,
    on_battery=st.booleans(),
    battery_percent=st.one_of(st.none(), st.floats(0, 100)),
    metered=st.booleans(),
)
event_strategy = st.one_of(
    st.builds(Plugged, st.sampled_from(DISKS), st.booleans()),
    st.builds(Unplugged, st.sampled_from(DISKS)),
    st.just(Tick()),
    st.just(agenda.Resumed()),
    st.builds(Asked, st.sampled_from((None, *DISKS))),
    st.just(agenda.StopAsked()),
    st.just(NotNow()),
    st.builds(agenda.Ejected, st.sampled_from(DISKS)),
    st.builds(agenda.Blocked, st.sampled_from((None, "another backup is running"))),
    st.builds(Circumstance, circumstances),
    st.sampled_from(("success", "failure", "busy")),  # the running cycle ends (below)
)
rules_strategy = st.builds(
    Rules,
    battery_below=st.integers(0, 100),
    skip_metered=st.booleans(),
    quiet_hours=st.one_of(
        st.none(),
        st.tuples(st.integers(0, 1439), st.integers(0, 1439)).filter(lambda t: t[0] != t[1]).map(lambda t: QuietHours(*t)),
    ),
)


@given(
    st.lists(st.tuples(event_strategy, st.floats(0, 3 * HOUR)), max_size=40),
    rules_strategy,
    st.lists(st.sampled_from(DISKS), max_size=2, unique=True),
    st.floats(T0 - 30 * HOUR, T0),
)
@settings(max_examples=400, deadline=None)
def test_random_sequences_never_back_up_while_held_catch_up_after_and_postpone_one_interval(
    events: list[tuple[object, float]], rules: Rules, remote: list[str], last: float
) -> None:
    states = {name: schedule.DiskState(last_success=last) for name in DISKS}
    plan = agenda.new(P, DISKS, states, rules=rules, remote=remote, tz=UTC)
    now = T0
    postponed: dict[str, float] = {}  # "not now" ended this disk's cycle: no regular start before then
    for raw, gap in events:
        now += gap
        event: agenda.Event
        if isinstance(raw, str):
            if plan.running is None:
                continue
            event = Finished(plan.running.disk, raw, snapshot_time=now if raw == "success" else None)  # type: ignore[arg-type]
        else:
            event = raw  # type: ignore[assignment]
        before = plan
        plan, actions = agenda.step(plan, event, now)

        def held(name: str) -> Hold | None:
            return conditions.hold(rules, plan.circumstances, now, remote=name in remote, tz=UTC)

        # never a backup while a condition holds, unless the user asked for it
        for start in (x for x in actions if isinstance(x, Start)):
            if start.reason != "asked":
                assert held(start.disk) is None, (start, plan.circumstances, now)
            if start.disk in postponed and start.reason in ("interval elapsed", "retry after failure",
                                                             "resumed from sleep, due"):
                assert now >= postponed[start.disk]
            postponed.pop(start.disk, None)
        # caught up when it ends: with the way clear, a disk stays skipped only while something holds it,
        # and a skipped disk says why
        if plan.running is None and plan.blocked is None:
            for name in plan.attached():
                entry = plan.disk(name)
                if entry.skipped is not None:
                    assert held(name) == entry.skipped
                    if entry.skipped.until is not None and not entry.ejected:  # quiet hours: the timer ends them
                        wake_at = actions[-1]
                        assert isinstance(wake_at, Wake) and wake_at.at is not None
                        assert wake_at.at <= entry.skipped.until
                else:
                    assert entry.held is None
        # the timer is never for a moment already past (no busy loop, quiet hours included)
        wake = actions[-1]
        assert isinstance(wake, Wake) and (wake.at is None or wake.at > now or plan.running is not None)
        # "not now": the next regular try exactly one interval after it was said
        if (
            isinstance(event, Finished)
            and before.running is not None
            and before.running.postponed_at is not None
            and event.outcome != "success"
        ):
            until = before.running.postponed_at + P.interval
            assert plan.disk(event.disk).state.postponed_until == until
            postponed[event.disk] = until
            entry = plan.disk(event.disk)
            again = plan.running is not None and plan.running.disk == event.disk  # due already: started again
            if entry.state.attached and not entry.ejected and entry.skipped is None and not again and not plan.blocked:
                assert entry.next_due == until


# -- the configuration ---------------------------------------------------------------------------


def test_the_conditions_table_and_its_defaults() -> None:
    from agent.config.validate import settings_from_mapping
    from agent.desktop.daemon import rules_of

    default = settings_from_mapping({}, "/etc/backup-agent/config.toml", hostname="h")
    assert rules_of(default) == Rules(battery_below=30, skip_metered=True, quiet_hours=None)
    given = settings_from_mapping(
        {"conditions": {"battery_below": 0, "skip_metered": False, "quiet_hours": "22:30-06:15"}}, "/c.toml", hostname="h"
    )
    assert rules_of(given) == Rules(0, False, QuietHours(22 * 60 + 30, 6 * 60 + 15))
    assert settings_from_mapping({"conditions": {"quiet_hours": ""}}, "/c.toml", hostname="h").quiet_hours is None


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"battery_below": 101}, "conditions.battery_below: got 101; expected a whole percent from 0"),
        ({"battery_below": True}, "conditions.battery_below: got a boolean (true); expected a whole percent"),
        ({"skip_metered": "yes"}, "conditions.skip_metered: got a string (\"yes\"); expected a boolean"),
        ({"quiet_hours": "23-07"}, "conditions.quiet_hours: got \"23-07\": '23' is not a time of day"),
        ({"quiet_hours": 23}, "conditions.quiet_hours: got an integer (23); expected a string such as \"23:00-07:00\""),
        ({"quiet": "23:00-07:00"}, "unknown key \"quiet\" in [conditions], did you mean quiet_hours?"),
    ],
)
def test_a_bad_condition_is_one_line_naming_the_key(table: dict[str, object], message: str) -> None:
    from agent.config.validate import settings_from_mapping
    from agent.core.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        settings_from_mapping({"conditions": table}, "/c.toml", hostname="h")
    assert message in str(info.value), str(info.value)


# -- where the reason shows (pure words) -----------------------------------------------------------


def test_the_reason_shows_in_status_and_the_tooltip_never_as_a_failure() -> None:
    from agent.desktop.dbus.client import format_status
    from agent.desktop.dbus.traylook import tooltip
    from agent.desktop.state import AgentStatus, DiskStatus

    reason = "on battery at 12% (below 30%)"
    status = AgentStatus(state="disk-attached", disk="backup1", last_success=T0 - 3 * HOUR, last_result="success",
                         skipped=reason,
                         disks=[DiskStatus("backup1", attached=True, skipped=reason), DiskStatus("other")])
    title, body = tooltip(status, None, T0)
    assert title == "backup1 attached" and f"A backup is due and waits: {reason}. It starts when that ends." in body
    assert "fail" not in body.lower()
    text = format_status(status, live=True)
    assert f"waiting:      {reason} (the due backup starts when this ends; not a failure)" in text
    assert f"next backup:  none scheduled (waiting: {reason})" in text
    assert f"  backup1: attached; last success never; waiting: {reason}" in text
    # the saved state (no agent running) does not claim a wait it cannot know is still true
    assert "waiting" not in format_status(status, live=False)
