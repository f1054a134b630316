"""The agent's agenda across disks (agent/desktop/agenda.py): pure, so tested directly, by example and with hypothesis."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.desktop import agenda
from agent.policy import schedule
from agent.desktop.agenda import (
    Answer,
    Asked,
    Blocked,
    Ejected,
    Finished,
    Plugged,
    Resumed,
    Save,
    Start,
    Stop,
    StopAsked,
    Tick,
    Unplugged,
    Wake,
    Waits,
)

T0 = 1_800_000_000.0
HOUR = 3600.0
P = schedule.Policy()
DISKS = ("a", "b")


def fresh(**states: schedule.DiskState) -> agenda.Agenda:
    return agenda.new(P, DISKS, states)


def run(plan: agenda.Agenda, *events: tuple[agenda.Event, float]) -> tuple[agenda.Agenda, list[agenda.Action]]:
    done: list[agenda.Action] = []
    for event, now in events:
        plan, actions = agenda.step(plan, event, now)
        done += actions
    return plan, done


def starts(actions: list[agenda.Action]) -> list[tuple[str, str]]:
    return [(a.disk, a.reason) for a in actions if isinstance(a, Start)]


# -- the user story, by example ------------------------------------------------------------------


def test_a_plug_in_starts_one_cycle_and_the_timer_waits_for_the_interval_after_it() -> None:
    plan, actions = agenda.step(fresh(), Plugged("a"), T0)
    assert starts(list(actions)) == [("a", "plugged in, due")] and actions[-1] == Wake(None)
    plan, actions = agenda.step(plan, Finished("a", "success", snapshot_time=T0), T0 + 60)
    assert Save() in actions and actions[-1] == Wake(T0 + HOUR)
    assert plan.running is None and plan.disk("a").next_due == T0 + HOUR


def test_a_stop_is_not_a_failure_and_is_not_retried() -> None:
    plan, _ = run(fresh(a=schedule.DiskState(last_success=T0 - 2 * HOUR)), (Plugged("a"), T0))
    plan, actions = agenda.step(plan, StopAsked(), T0 + 10)
    assert actions[:2] == (Stop("a"), Answer("stopping"))
    plan, actions = agenda.step(plan, Finished("a", "failure"), T0 + 12)
    state = plan.disk("a").state
    assert state.failures == 0 and state.unfinished and state.stopped_at == T0 + 12
    # no retry after 5 minutes, although the last success is 2 hours old: the next regular time
    assert actions[-1] == Wake(T0 + 12 + HOUR)
    assert starts(run(plan, (Tick(), T0 + 12 + 300))[1]) == []
    assert starts(run(plan, (Tick(), T0 + 12 + HOUR))[1]) == [("a", "interval elapsed")]
    # "Back up now" is not held back, and a re-plug carries on with the unfinished run
    assert starts(run(plan, (Asked(), T0 + 20))[1]) == [("a", "asked")]
    assert starts(run(plan, (Unplugged("a"), T0 + 20), (Plugged("a"), T0 + 30))[1]) == [("a", "plugged in, unfinished")]


def test_a_skipped_cycle_is_no_failure_and_the_next_try_is_an_interval_away() -> None:
    # The user cancelled the passphrase prompt: nothing ran, nothing failed.
    plan, _ = run(fresh(a=schedule.DiskState(last_success=T0 - 2 * HOUR, unfinished=False)), (Plugged("a"), T0))
    plan, actions = agenda.step(plan, Finished("a", "skipped"), T0 + 5)
    state = plan.disk("a").state
    assert state.failures == 0 and state.last_failure is None and not state.unfinished and not state.running
    assert state.stopped_at == T0 + 5 and plan.running is None
    assert Save() in actions and actions[-1] == Wake(T0 + 5 + HOUR)
    assert starts(run(plan, (Tick(), T0 + 300))[1]) == []  # not asked again at once
    assert starts(run(plan, (Tick(), T0 + 5 + HOUR))[1]) == [("a", "interval elapsed")]
    assert starts(run(plan, (Asked(), T0 + 20))[1]) == [("a", "asked")]  # "Back up now" asks again


def test_stop_with_nothing_running_says_so() -> None:
    assert agenda.step(fresh(), StopAsked(), T0)[1] == (Answer("not-running"), Wake(None))


def test_a_re_plug_after_a_failure_carries_on_although_the_last_success_is_recent() -> None:
    plan, _ = run(
        fresh(a=schedule.DiskState(last_success=T0 - 600)),
        (Plugged("a"), T0), (Asked(), T0), (Unplugged("a"), T0 + 5), (Finished("a", "failure"), T0 + 6),
    )
    assert plan.disk("a").state.unfinished and plan.disk("a").state.failures == 1
    plan, actions = agenda.step(plan, Plugged("a"), T0 + 30)
    assert starts(list(actions)) == [("a", "plugged in, unfinished")]
    plan, _ = agenda.step(plan, Finished("a", "success", snapshot_time=T0 + 30), T0 + 60)
    assert not plan.disk("a").state.unfinished
    # resolved: the next plug-in is "not due" again
    assert starts(run(plan, (Unplugged("a"), T0 + 70), (Plugged("a"), T0 + 80))[1]) == []


def test_an_ejected_disk_stays_closed_across_a_restart_until_plugged_in_or_asked() -> None:
    plan, actions = run(
        fresh(a=schedule.DiskState(last_success=T0 - 600)), (Plugged("a"), T0), (Ejected("a"), T0 + 1)
    )
    assert Save() in actions and plan.disk("a").ejected and plan.disk("a").next_due is None
    assert starts(run(plan, (Tick(), T0 + 2 * HOUR), (Resumed(), T0 + 3 * HOUR))[1]) == []
    # the agent restarts; what it kept: the state and the ejected disk
    kept = {name: state for name, state, _ in agenda.persisted(plan)}
    ejected = [name for name, _, was in agenda.persisted(plan) if was]
    restarted = agenda.new(P, DISKS, kept, ejected=ejected)
    later, actions = agenda.step(restarted, Plugged("a", at_start=True), T0 + 5 * HOUR)  # due, but still ejected
    assert starts(list(actions)) == [] and actions[-1] == Wake(None)
    assert later.disk("a").state.attached and later.disk("a").next_due is None
    assert starts(run(later, (Tick(), T0 + 6 * HOUR))[1]) == []
    # asked for: it opens, and it is not ejected any more
    asked, actions = agenda.step(later, Asked("a"), T0 + 6 * HOUR)
    assert starts(list(actions)) == [("a", "asked")] and Answer("started") in actions and not asked.disk("a").ejected
    # really plugged in again (unplug, plug): it opens
    assert starts(run(later, (Unplugged("a"), T0 + 6 * HOUR), (Plugged("a"), T0 + 6 * HOUR + 5))[1]) == [
        ("a", "plugged in, due")
    ]


def test_a_disk_present_at_start_that_was_not_ejected_is_backed_up_when_due() -> None:
    assert starts(run(fresh(), (Plugged("a", at_start=True), T0))[1]) == [("a", "plugged in, due")]


def test_two_disks_one_cycle_at_a_time_and_back_up_now_can_name_either() -> None:
    plan, actions = run(fresh(), (Plugged("a"), T0), (Plugged("b"), T0 + 1))
    assert starts(actions) == [("a", "plugged in, due")]
    assert any(isinstance(a, Waits) and a.disk == "b" for a in actions) and plan.disk("b").held == "plugged"
    plan, actions = run(plan, (Finished("a", "success", snapshot_time=T0), T0 + 60))
    assert starts(actions) == [("b", "plugged in, due")]  # the held plug-in, replayed
    plan, _ = run(plan, (Finished("b", "success", snapshot_time=T0 + 60), T0 + 120))
    # both backed up: "now" takes the first attached disk, or the one named
    assert Answer("started") in run(plan, (Asked(), T0 + 200))[1]
    assert starts(run(plan, (Asked(), T0 + 200))[1]) == [("a", "asked")]
    assert starts(run(plan, (Asked("b"), T0 + 200))[1]) == [("b", "asked")]
    assert run(plan, (Asked("c"), T0 + 200))[1][0] == Answer("unknown-disk")
    assert run(plan, (Unplugged("b"), T0), (Asked("b"), T0 + 200))[1][-2] == Answer("no-disk")


def test_a_cycle_that_lost_the_lock_waits_for_the_other_and_is_no_failure() -> None:
    plan, _ = run(fresh(), (Plugged("a"), T0))
    plan, actions = run(plan, (Blocked("another backup is running (pid 7)"), T0 + 1), (Finished("a", "busy"), T0 + 2))
    assert starts(actions) == [] and plan.disk("a").state.failures == 0 and plan.disk("a").held == "plugged"
    assert actions[-1] == Wake(None)  # nothing to time while blocked: the end of the other cycle is the event
    plan, actions = run(plan, (Blocked(None), T0 + 30))
    assert starts(actions) == [("a", "plugged in, due")]


# -- properties ----------------------------------------------------------------------------------

event_strategy = st.one_of(
    st.builds(Plugged, st.sampled_from(DISKS), st.booleans()),
    st.builds(Unplugged, st.sampled_from(DISKS)),
    st.just(Tick()),
    st.just(Resumed()),
    st.builds(Asked, st.sampled_from((None, *DISKS))),
    st.just(StopAsked()),
    st.builds(Ejected, st.sampled_from(DISKS)),
    st.builds(Blocked, st.sampled_from((None, "another backup is running"))),
    st.sampled_from(("success", "failure", "busy", "skipped")),  # the running cycle ends (below)
)
initial_states = st.builds(
    schedule.DiskState,
    last_success=st.one_of(st.none(), st.floats(T0 - 30 * HOUR, T0)),
    failures=st.integers(0, 4),
    last_failure=st.one_of(st.none(), st.floats(T0 - 30 * HOUR, T0)),
    unfinished=st.booleans(),
)


@given(
    st.lists(st.tuples(event_strategy, st.floats(0, 2 * HOUR)), max_size=40),
    initial_states,
    initial_states,
    st.lists(st.sampled_from(DISKS), max_size=2),
)
@settings(max_examples=400, deadline=None)
def test_random_event_sequences_keep_every_rule(
    events: list[tuple[object, float]], a: schedule.DiskState, b: schedule.DiskState, ejected: list[str]
) -> None:
    plan = agenda.new(P, DISKS, {"a": a, "b": b}, ejected=ejected)
    now = T0
    stopped_at: dict[str, float] = {}  # a disk's cycle ended by a stop, and no other start since
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

        # one Wake, last; none armed while a cycle runs or something else holds the machine
        assert isinstance(actions[-1], Wake) and sum(isinstance(x, Wake) for x in actions) == 1
        if plan.running is not None or plan.blocked is not None:
            assert actions[-1] == Wake(None)
        else:  # nothing runs: the timer is for a moment still to come (never a busy loop)
            assert actions[-1].at is None or actions[-1].at > now
        # a caller always gets exactly one answer
        answers = [x for x in actions if isinstance(x, Answer)]
        assert len(answers) == (1 if isinstance(event, (Asked, StopAsked)) else 0)

        started = [x for x in actions if isinstance(x, Start)]
        # never two cycles: at most one start, only when none ran and nothing else held the machine
        assert len(started) <= 1
        if started:
            assert before.running is None or isinstance(event, Finished)
            assert plan.blocked is None and plan.running is not None and plan.running.disk == started[0].disk
            disk = started[0].disk
            assert plan.disk(disk).state.attached
            # an ejected disk opens only for a plug-in seen while running, or when asked for
            if before.disk(disk).ejected:
                assert (isinstance(event, Plugged) and event.disk == disk and not event.at_start) or (
                    isinstance(event, Asked) and event.disk in (None, disk)
                )
            # a stop is never retried: only a plug-in, a request or the next regular time start it again
            if disk in stopped_at and started[0].reason not in ("asked", "plugged in, unfinished", "plugged in, always"):
                assert now >= stopped_at[disk] + P.interval
            stopped_at.pop(disk, None)
        else:
            assert plan.running == before.running or isinstance(event, (Finished, StopAsked))
        if isinstance(event, Finished) and event.outcome == "skipped" and before.running is not None:
            # a skip (a cancelled passphrase prompt) is no failure, and is not asked again before the interval
            assert plan.disk(event.disk).state.failures == before.disk(event.disk).state.failures
            stopped_at[event.disk] = now
        if isinstance(event, Finished) and before.running is not None and before.running.stopping:
            if event.outcome == "failure":
                assert plan.disk(event.disk).state.failures == before.disk(event.disk).state.failures
                stopped_at[event.disk] = now
        # an ejected disk has no due time; nothing stays held while the way is clear
        for name in DISKS:
            if plan.disk(name).ejected:
                assert plan.disk(name).next_due is None
            if plan.running is None and plan.blocked is None:
                assert plan.disk(name).held is None
        # Save exactly when what is kept across a restart changed
        assert (Save() in actions) == (agenda.persisted(plan) != agenda.persisted(before))


def test_every_event_and_action_is_a_plain_value() -> None:
    plan = fresh()
    again = dataclasses.replace(plan)
    assert agenda.step(plan, Plugged("a"), T0) == agenda.step(again, Plugged("a"), T0)
