"""Tests of the scheduler: each rule with concrete numbers, then properties
over random sequences of events with a clock the test drives.

The properties check the scheduler against a separate, deliberately plain
model of the rules (``Model``), kept by the test itself.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.policy import schedule
from agent.policy.schedule import (
    CLOCK_SKEW,
    Decision,
    DiskState,
    Policy,
    Trigger,
    handle,
    next_due,
    on_asked,
    on_finished,
    on_plugged,
    on_resumed,
    on_started,
    on_stopped,
    on_tick,
    on_unplugged,
    retry_delay,
    seconds_until,
)

T0 = 1_790_000_000.0  # some wall-clock time in 2026
HOUR = 3600.0
P = Policy()  # interval 1 h, if-due, retries 5 min doubling up to 4 h
ALWAYS = Policy(on_plug="always")


def attached(**kw: object) -> DiskState:
    return dataclasses.replace(DiskState(attached=True), **kw)  # type: ignore[arg-type]


# --- Policy ---------------------------------------------------------------


def test_policy_defaults() -> None:
    assert P == Policy(interval=3600.0, on_plug="if-due", retry_first=300.0, retry_max=14400.0)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"interval": 0}, "interval"),
        ({"interval": -5.0}, "interval"),
        ({"interval": math.inf}, "interval"),
        ({"interval": math.nan}, "interval"),
        ({"interval": True}, "interval"),
        ({"interval": "3600"}, "interval"),
        ({"retry_first": 0.0}, "retry_first"),
        ({"retry_max": -1.0}, "retry_max"),
        ({"retry_first": 600.0, "retry_max": 300.0}, "at least retry_first"),
        ({"on_plug": "never"}, "on_plug"),
    ],
)
def test_policy_refuses_nonsense(kwargs: dict[str, object], word: str) -> None:
    with pytest.raises(ValueError, match=word):
        Policy(**kwargs)  # type: ignore[arg-type]


# --- next_due and the retry delay ----------------------------------------


def test_next_due_not_attached_is_none() -> None:
    assert next_due(DiskState(last_success=T0), P, T0) is None
    assert next_due(DiskState(failures=3, last_failure=T0), P, T0) is None


def test_next_due_never_backed_up_is_now() -> None:
    assert next_due(attached(), P, T0) == T0


def test_next_due_is_last_success_plus_interval() -> None:
    assert next_due(attached(last_success=T0), P, T0 + 10) == T0 + HOUR
    assert next_due(attached(last_success=T0), Policy(interval=900.0), T0) == T0 + 900


def test_retry_delays_double_and_are_capped() -> None:
    delays = [retry_delay(n, P) for n in range(1, 10)]
    assert delays == [300, 600, 1200, 2400, 4800, 9600, 14400, 14400, 14400]
    odd = Policy(retry_first=100.0, retry_max=250.0)
    assert [retry_delay(n, odd) for n in (1, 2, 3, 50)] == [100, 200, 250, 250]
    assert retry_delay(10**6, P) == 14400  # no overflow, whatever the count
    with pytest.raises(ValueError):
        retry_delay(0, P)


def test_next_due_after_failures_is_the_retry_time() -> None:
    for failures, delay in [(1, 300), (2, 600), (3, 1200), (7, 14400), (40, 14400)]:
        state = attached(last_success=T0 - 10 * HOUR, failures=failures, last_failure=T0)
        assert next_due(state, P, T0) == T0 + delay


def test_next_due_failures_without_a_time_fall_back_to_the_interval() -> None:
    assert next_due(attached(last_success=T0, failures=2), P, T0) == T0 + HOUR


# --- on_plugged ------------------------------------------------------------


def test_plug_in_due() -> None:
    state, d = on_plugged(DiskState(last_success=T0), P, T0 + HOUR + 1)
    assert state == attached(last_success=T0)
    assert d == Decision(True, "plugged in, due", T0 + HOUR + 1)


def test_plug_in_due_exactly_at_the_interval() -> None:
    _, d = on_plugged(DiskState(last_success=T0), P, T0 + HOUR)
    assert d.start_now and d.reason == "plugged in, due"


def test_plug_in_never_backed_up_is_due() -> None:
    _, d = on_plugged(DiskState(), P, T0)
    assert d == Decision(True, "plugged in, due", T0)


def test_plug_in_not_due_says_when() -> None:
    state, d = on_plugged(DiskState(last_success=T0), P, T0 + 20 * 60)
    assert state.attached
    assert d == Decision(False, "not due", T0 + HOUR)
    assert seconds_until(d, T0 + 20 * 60) == 40 * 60


def test_plug_in_always() -> None:
    _, d = on_plugged(DiskState(last_success=T0), ALWAYS, T0 + 1)
    assert d == Decision(True, "plugged in, always", T0 + 1)


def test_plug_in_resumes_an_interrupted_transfer_despite_the_back_off() -> None:
    # The last success is 3 h old; the disk was pulled out 2 minutes ago
    # (one failure, retry not before 5 minutes): the next plug-in resumes.
    state = DiskState(last_success=T0 - 3 * HOUR, failures=1, last_failure=T0 - 120)
    _, d = on_plugged(state, P, T0)
    assert d == Decision(True, "plugged in, due", T0)


def test_a_plug_in_after_a_failed_or_stopped_run_carries_on_with_it() -> None:
    # Success 20 minutes ago (not due), then the disk was pulled out during a
    # "back up now": the retry is 5 minutes away, the plug-in resumes at once.
    state = on_finished(DiskState(attached=True, last_success=T0 - 1200, running=True), T0 - 60, False)
    state = on_unplugged(state)
    _, d = on_plugged(state, P, T0)
    assert d == Decision(True, "plugged in, unfinished", T0)
    # A stop the user asked for: same on plug-in, and a success ends it.
    stopped = on_stopped(dataclasses.replace(state, attached=True, running=True), T0)
    assert stopped.unfinished and stopped.failures == state.failures
    _, d = on_plugged(on_unplugged(stopped), P, T0 + 5)
    assert d == Decision(True, "plugged in, unfinished", T0 + 5)
    done = on_finished(stopped, T0 + 9, True)
    assert not done.unfinished and done.stopped_at is None


def test_a_stop_is_not_retried_before_an_interval_has_passed() -> None:
    # Never backed up (due at once), the user stops the first run: no retry
    # at once or after the back-off, only an interval after the stop.
    stopped = on_stopped(DiskState(attached=True, running=True), T0)
    _, d = on_tick(stopped, P, T0 + 1)
    assert d == Decision(False, "not due", T0 + P.interval)
    _, d = on_tick(stopped, P, T0 + P.interval)
    assert d.start_now
    # "Back up now" is not held back by it.
    assert on_asked(stopped, T0 + 1)[1].start_now


def test_plug_in_starts_a_due_retry_even_when_the_interval_has_not_elapsed() -> None:
    # Success 20 min ago, then "back up now" failed 10 min ago: the retry
    # (5 min after) is due, so a plug-in starts it rather than wait for a tick.
    state = DiskState(last_success=T0 - 1200, failures=1, last_failure=T0 - 600)
    _, d = on_plugged(state, P, T0)
    assert d == Decision(True, "plugged in, due", T0)
    # ... and when the retry is not due either, next_due is the retry time.
    state = DiskState(last_success=T0 - 1200, failures=2, last_failure=T0 - 60)
    _, d = on_plugged(state, P, T0)
    assert d == Decision(False, "not due", T0 - 60 + 600)


def test_plug_in_while_the_previous_cycle_still_runs() -> None:
    # Pulled out mid-cycle and plugged back before the cycle has exited.
    state = on_unplugged(on_started(attached(last_success=T0 - 5 * HOUR)))
    state, d = on_plugged(state, ALWAYS, T0)
    assert state.attached and state.running
    assert d == Decision(False, "running", T0)
    assert seconds_until(d, T0) is None


def test_a_repeated_plug_event_is_a_tick_not_a_new_plug_in() -> None:
    # "always" starts on plug-in; after that backup succeeded, a udev
    # "change" for the same disk must not start another one.
    state, d = on_plugged(DiskState(last_success=T0 - 60), ALWAYS, T0)
    assert d.start_now
    state = on_finished(on_started(state), T0 + 100, True)
    state, d = on_plugged(state, ALWAYS, T0 + 101)
    assert d == Decision(False, "not due", T0 + 100 + HOUR)
    # ... but it still starts what a tick would start.
    state, d = on_plugged(state, ALWAYS, T0 + 100 + HOUR)
    assert d == Decision(True, "interval elapsed", T0 + 100 + HOUR)


# --- on_unplugged ----------------------------------------------------------


def test_unplug_keeps_the_bookkeeping_and_a_running_cycle() -> None:
    state = attached(last_success=T0, failures=2, last_failure=T0 + 5, running=True)
    assert on_unplugged(state) == dataclasses.replace(state, attached=False)


# --- on_tick ---------------------------------------------------------------


def test_tick_not_attached() -> None:
    _, d = on_tick(DiskState(last_success=T0 - 10 * HOUR), P, T0)
    assert d == Decision(False, "not attached", None)
    assert seconds_until(d, T0) is None


def test_tick_before_and_at_the_interval() -> None:
    state = attached(last_success=T0)
    assert on_tick(state, P, T0 + HOUR - 1) == (state, Decision(False, "not due", T0 + HOUR))
    assert on_tick(state, P, T0 + HOUR) == (state, Decision(True, "interval elapsed", T0 + HOUR))


def test_tick_while_running() -> None:
    state = attached(last_success=T0 - 5 * HOUR, running=True)
    for now in (T0, T0 + 60, T0 + 3 * HOUR):
        _, d = on_tick(state, P, now)
        assert d == Decision(False, "running", now)
        assert seconds_until(d, now) is None


def test_tick_retries_after_a_failure_with_back_off() -> None:
    state = on_finished(on_started(attached(last_success=T0 - 5 * HOUR)), T0, False)
    assert state == attached(last_success=T0 - 5 * HOUR, failures=1, last_failure=T0, unfinished=True)
    assert on_tick(state, P, T0 + 299)[1] == Decision(False, "not due", T0 + 300)
    assert on_tick(state, P, T0 + 300)[1] == Decision(True, "retry after failure", T0 + 300)
    state = on_finished(on_started(state), T0 + 400, False)
    assert on_tick(state, P, T0 + 400)[1] == Decision(False, "not due", T0 + 1000)
    state = on_finished(on_started(state), T0 + 1000, False)
    assert on_tick(state, P, T0 + 1000)[1] == Decision(False, "not due", T0 + 2200)


def test_a_success_resets_the_back_off() -> None:
    state = attached(last_success=T0 - 9 * HOUR, failures=6, last_failure=T0 - HOUR)
    state = on_finished(on_started(state), T0, True)
    assert state == attached(last_success=T0)
    assert on_tick(state, P, T0)[1] == Decision(False, "not due", T0 + HOUR)
    state = on_finished(on_started(state), T0 + HOUR, False)
    assert next_due(state, P, T0 + HOUR) == T0 + HOUR + 300


# --- on_resumed ------------------------------------------------------------


def test_resumed_after_sleeping_through_the_hour() -> None:
    state = attached(last_success=T0)
    _, d = on_resumed(state, P, T0 + 5 * HOUR + 17)
    assert d == Decision(True, "resumed from sleep, due", T0 + 5 * HOUR + 17)


def test_resumed_not_due_running_not_attached() -> None:
    assert on_resumed(attached(last_success=T0), P, T0 + 60)[1] == Decision(False, "not due", T0 + HOUR)
    assert on_resumed(attached(running=True), P, T0)[1] == Decision(False, "running", T0)
    assert on_resumed(DiskState(), P, T0)[1] == Decision(False, "not attached", None)


def test_resumed_with_a_pending_retry() -> None:
    state = attached(last_success=T0 - 9 * HOUR, failures=2, last_failure=T0)
    assert on_resumed(state, P, T0 + 599)[1].reason == "not due"
    assert on_resumed(state, P, T0 + 600)[1] == Decision(True, "resumed from sleep, due", T0 + 600)


# --- on_asked --------------------------------------------------------------


def test_asked_starts_even_when_not_due() -> None:
    state = attached(last_success=T0 - 10)
    assert on_asked(state, T0) == (state, Decision(True, "asked", T0))
    # ... and in the middle of a retry back-off.
    state = attached(last_success=T0 - 10, failures=5, last_failure=T0 - 10)
    assert on_asked(state, T0)[1] == Decision(True, "asked", T0)


def test_asked_while_running_or_not_attached() -> None:
    assert on_asked(attached(running=True), T0)[1] == Decision(False, "running", T0)
    assert on_asked(DiskState(last_success=T0 - 9 * HOUR), T0)[1] == Decision(False, "not attached", None)


# --- on_started / on_finished ---------------------------------------------


def test_started_and_finished_bookkeeping() -> None:
    state = on_started(attached(last_success=T0 - HOUR))
    assert state.running
    assert on_started(state) == state  # idempotent (a restarted agent sees a running cycle)
    failed = on_finished(state, T0, False)
    assert failed == attached(last_success=T0 - HOUR, failures=1, last_failure=T0, unfinished=True)
    assert on_finished(on_started(failed), T0 + 300, False).failures == 2
    ok = on_finished(on_started(failed), T0 + 300, True)
    assert ok == attached(last_success=T0 + 300)


def test_finished_with_the_snapshot_time() -> None:
    # Interval measured from the snapshot's name (the cycle's start), as a
    # restarted agent would read it from the repository: no drift.
    state = on_finished(on_started(attached()), T0 + 600, True, snapshot_time=T0)
    assert state.last_success == T0
    assert next_due(state, P, T0 + 600) == T0 + HOUR


def test_finished_after_the_disk_was_pulled_out() -> None:
    state = on_unplugged(on_started(attached(last_success=T0 - 2 * HOUR)))
    state = on_finished(state, T0, False)
    assert state == DiskState(last_success=T0 - 2 * HOUR, failures=1, last_failure=T0, unfinished=True)
    assert on_tick(state, P, T0 + 10 * HOUR)[1] == Decision(False, "not attached", None)


# --- seconds_until ---------------------------------------------------------


def test_seconds_until() -> None:
    assert seconds_until(Decision(False, "not due", T0 + 90), T0) == 90
    assert seconds_until(Decision(False, "not due", T0 + 90), T0 + 100) == 0  # late: never negative
    assert seconds_until(Decision(False, "not attached", None), T0) is None
    assert seconds_until(Decision(False, "running", T0), T0) is None
    assert seconds_until(Decision(True, "asked", T0), T0) is None


# --- the wall clock set back ----------------------------------------------


def test_clock_set_back_far_does_not_block_backups() -> None:
    # The newest snapshot says tomorrow: the clock was set back a day.
    state = attached(last_success=T0 + 24 * HOUR)
    assert next_due(state, P, T0) == T0
    assert on_tick(state, P, T0)[1] == Decision(True, "interval elapsed", T0)
    _, d = on_plugged(dataclasses.replace(state, attached=False), P, T0)
    assert d == Decision(True, "plugged in, due", T0)
    # One backup, then the normal rhythm from the new (earlier) time.
    state = on_finished(on_started(state), T0 + 60, True)
    assert on_tick(state, P, T0 + 61)[1] == Decision(False, "not due", T0 + 60 + HOUR)


def test_clock_jitter_within_a_minute_is_taken_as_is() -> None:
    state = attached(last_success=T0 + CLOCK_SKEW)
    assert on_tick(state, P, T0)[1] == Decision(False, "not due", T0 + CLOCK_SKEW + HOUR)
    state = attached(last_success=T0 + CLOCK_SKEW + 1)
    assert on_tick(state, P, T0)[1].start_now


def test_clock_set_back_after_a_failure_does_not_block_the_retry() -> None:
    state = attached(last_success=T0 - 9 * HOUR, failures=4, last_failure=T0 + 24 * HOUR)
    assert on_tick(state, P, T0)[1] == Decision(True, "retry after failure", T0)


# --- one cycle at a time: triggers at the same instant ---------------------


def test_plug_timer_and_ask_at_the_same_instant_start_one_cycle() -> None:
    # The documented protocol: apply on_started before the next trigger.
    state = DiskState(last_success=T0 - 2 * HOUR)
    starts = 0
    state, d = on_plugged(state, P, T0)
    if d.start_now:
        starts += 1
        state = on_started(state)
    steps: list[Callable[[DiskState], tuple[DiskState, Decision]]] = [
        lambda s: on_tick(s, P, T0),
        lambda s: on_asked(s, T0),
        lambda s: on_resumed(s, P, T0),
    ]
    for step in steps:
        state, d = step(state)
        assert d == Decision(False, "running", T0)
    assert starts == 1 and state.running


def test_forgetting_on_started_would_start_twice() -> None:
    # Why the protocol matters: the scheduler cannot know a cycle was spawned.
    state, d1 = on_plugged(DiskState(last_success=T0 - 2 * HOUR), P, T0)
    _, d2 = on_asked(state, T0)
    assert d1.start_now and d2.start_now


def test_handle_marks_the_cycle_started() -> None:
    state, d = handle(DiskState(), P, T0, "plugged")
    assert d.start_now and state.running
    state, d = handle(state, P, T0, "unplugged")
    assert d == Decision(False, "not attached", None) and state.running and not state.attached
    with pytest.raises(ValueError):
        handle(state, P, T0, "bogus")  # type: ignore[arg-type]


# --- purity ---------------------------------------------------------------


def test_the_module_reads_no_clock_and_does_no_io() -> None:
    tree = ast.parse(inspect.getsource(schedule))
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])
    }
    assert imported <= {"__future__", "math", "dataclasses", "typing"}
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    assert not names & {"open", "print", "input"}


# --- properties over random event sequences -------------------------------


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    interval = float(draw(st.integers(60, 6 * 3600)))
    retry_first = float(draw(st.integers(1, 3600)))
    retry_max = retry_first + float(draw(st.integers(0, 8 * 3600)))
    return Policy(interval, draw(st.sampled_from(["if-due", "always"])), retry_first, retry_max)


@st.composite
def initial_states(draw: st.DrawFn) -> DiskState:
    """A disk as the agent finds it at start: not attached, maybe a history."""
    last_success = draw(st.none() | st.integers(0, 30 * 86400).map(lambda ago: T0 - ago))
    failures = draw(st.integers(0, 12))
    last_failure = T0 - draw(st.integers(0, 86400)) if failures else None
    return DiskState(False, last_success, failures, last_failure, False)


EVENTS = ("plug", "unplug", "tick", "resume", "ask", "finish_ok", "finish_fail")
# Mostly small steps, sometimes a long sleep (many intervals).
GAPS = st.integers(0, 900) | st.integers(0, 3 * 86400)
event_lists = st.lists(st.tuples(st.sampled_from(EVENTS), GAPS), max_size=80)


def model_delay(failures: int, policy: Policy) -> float:
    """Retry delay recomputed independently: doubling, capped."""
    return float(min(policy.retry_first * 2 ** min(failures - 1, 200), policy.retry_max))


@dataclass
class Model:
    """The rules as the issue states them, kept apart from the scheduler."""

    policy: Policy
    attached: bool
    last_success: float | None
    failures: int
    last_failure: float | None
    running: bool = False
    unfinished: bool = False

    def regular_due(self) -> float:
        return -math.inf if self.last_success is None else self.last_success + self.policy.interval

    def retry_due(self) -> float | None:
        if self.failures and self.last_failure is not None:
            return self.last_failure + model_delay(self.failures, self.policy)
        return None

    def due(self) -> float:
        retry = self.retry_due()
        return self.regular_due() if retry is None else retry

    def as_state(self) -> DiskState:
        return DiskState(
            self.attached, self.last_success, self.failures, self.last_failure, self.running, self.unfinished
        )


@given(policies(), initial_states(), event_lists)
@settings(max_examples=300, deadline=None)
def test_random_event_sequences_keep_every_rule(
    policy: Policy, initial: DiskState, events: list[tuple[str, int]]
) -> None:
    state = initial
    model = Model(policy, initial.attached, initial.last_success, initial.failures, initial.last_failure)
    now = T0
    starts_since_finish = 0
    # Retry delays of the current failure streak (the initial history included).
    streak_delays = [model_delay(initial.failures, policy)] if initial.failures else []
    for kind, gap in events:
        now += gap
        before = dataclasses.replace(model)
        decision: Decision | None = None
        if kind == "plug":
            state, decision = on_plugged(state, policy, now)
            model.attached = True
        elif kind == "unplug":
            state = on_unplugged(state)
            model.attached = False
        elif kind == "tick":
            state, decision = on_tick(state, policy, now)
        elif kind == "resume":
            state, decision = on_resumed(state, policy, now)
        elif kind == "ask":
            state, decision = on_asked(state, now)
        elif kind in ("finish_ok", "finish_fail"):
            if not model.running:
                continue  # nothing to finish
            ok = kind == "finish_ok"
            state = on_finished(state, now, ok)
            model.running = False
            starts_since_finish = 0
            expected: float | None = None
            if ok:
                model.last_success, model.failures, model.last_failure = now, 0, None
                model.unfinished = False
                streak_delays = []
            else:
                model.unfinished = True
                model.failures += 1
                model.last_failure = now
                # Retry delays: first retry_first, then doubling, capped; reset by a
                # success. Failures while unplugged count too.
                expected = policy.retry_first if not streak_delays else min(2 * streak_delays[-1], policy.retry_max)
                streak_delays.append(expected)
            if model.attached:
                due = next_due(state, policy, now)
                assert due is not None
                if ok:
                    assert due == now + policy.interval
                else:
                    assert due - now == expected == model_delay(model.failures, policy)
            # The documented follow-up: ask for the next decision.
            state, decision = on_tick(state, policy, now)
            assert not decision.start_now  # due only after a positive delay
        assert state == model.as_state()
        if decision is None:
            continue

        wait = seconds_until(decision, now)
        if decision.start_now:
            # Never two starts without a finish in between; never when not attached.
            assert not before.running and starts_since_finish == 0
            assert model.attached
            assert decision.next_due == now and wait is None
            reason = decision.reason
            if reason == "asked":
                assert kind == "ask"
            elif reason == "plugged in, always":
                assert kind == "plug" and not before.attached and policy.on_plug == "always"
            elif reason == "plugged in, unfinished":
                assert kind == "plug" and not before.attached and before.unfinished
            elif reason == "plugged in, due":
                assert kind == "plug" and not before.attached and not before.unfinished
                retry = before.retry_due()
                assert now >= before.regular_due() or (retry is not None and now >= retry)
            else:
                assert kind in ("tick", "resume", "plug")
                assert reason == ("resumed from sleep, due" if kind == "resume" else
                                  "retry after failure" if before.retry_due() is not None else
                                  "interval elapsed")
                assert now >= before.due()
            # After a success (and no failure since), nothing but "asked" or a
            # plug-in with on_plug="always" starts before last_success + interval.
            if before.last_success is not None and before.failures == 0 and reason not in (
                "asked",
                "plugged in, always",
            ):
                assert now >= before.last_success + policy.interval
            state = on_started(state)
            model.running = True
            starts_since_finish += 1
        elif not model.attached:
            # An idle, unattached disk never asks to be woken up.
            assert decision == Decision(False, "not attached", None) and wait is None
        elif model.running:
            assert decision.reason == "running" and wait is None
        else:
            # Attached and idle: a finite wait, no busy loop, and a tick at its
            # end starts (no stall).
            assert decision.reason == "not due"
            assert wait is not None and wait > 0
            assert decision.next_due == now + wait == model.due()
            assert on_tick(state, policy, now + wait)[1].start_now


@given(st.lists(st.tuples(st.sampled_from(EVENTS), GAPS), max_size=40), st.integers(0, 10 * 86400))
def test_an_unattached_disk_never_asks_to_wake_up(events: list[tuple[str, int]], later: int) -> None:
    state = DiskState(last_success=T0 - 5 * HOUR)
    now = T0
    for kind, gap in events:
        now += gap
        if kind == "plug":
            state, _ = handle(state, P, now, "plugged")
        elif kind in ("finish_ok", "finish_fail") and state.running:
            state = on_finished(state, now, kind == "finish_ok")
    state = on_unplugged(state)
    for trigger in ("tick", "resumed", "asked", "unplugged"):
        _, d = handle(state, P, now + later, trigger)
        assert d.next_due is None and seconds_until(d, now + later) is None and not d.start_now


FOLLOWERS: tuple[Trigger, ...] = ("tick", "resumed", "asked", "plugged")


@given(
    policies(),
    st.integers(2, 100_000),  # intervals slept through
    st.integers(0, 3599),
    st.sampled_from(("resumed", "tick")),
    st.lists(st.tuples(st.sampled_from(FOLLOWERS), st.integers(0, 300)), max_size=30),
    st.integers(1, 3 * 3600),  # how long the cycle runs
    st.booleans(),  # use handle() or the individual functions + on_started
)
def test_after_a_long_sleep_exactly_one_start_follows(
    policy: Policy,
    intervals: int,
    extra: int,
    first: Trigger,
    followers: list[tuple[Trigger, int]],
    duration: int,
    use_handle: bool,
) -> None:
    step: Callable[[DiskState, float, Trigger], tuple[DiskState, Decision]]
    if use_handle:
        step = lambda s, t, trig: handle(s, policy, t, trig)  # noqa: E731
    else:

        def step(s: DiskState, t: float, trig: Trigger) -> tuple[DiskState, Decision]:
            if trig == "tick":
                s, d = on_tick(s, policy, t)
            elif trig == "resumed":
                s, d = on_resumed(s, policy, t)
            elif trig == "asked":
                s, d = on_asked(s, t)
            else:
                s, d = on_plugged(s, policy, t)
            return (on_started(s) if d.start_now else s), d

    state = attached(last_success=T0)
    now = T0 + intervals * policy.interval + extra
    state, d = step(state, now, first)
    assert d.start_now
    assert d.reason == ("resumed from sleep, due" if first == "resumed" else "interval elapsed")
    starts = 1
    for trigger, gap in followers:
        now += gap
        state, d = step(state, now, trigger)
        starts += d.start_now
        assert d == Decision(False, "running", now)
    assert starts == 1
    # The cycle succeeds: the next one is due a full interval later, not at once.
    now += duration
    state = on_finished(state, now, True)
    _, d = on_tick(state, policy, now + policy.interval - 1)
    assert d == Decision(False, "not due", now + policy.interval)
    assert on_tick(state, policy, now + policy.interval)[1].start_now


@given(policies(), st.integers(1, 300))
def test_retry_delays_grow_then_stay_capped(policy: Policy, n: int) -> None:
    delays = [retry_delay(k, policy) for k in range(1, n + 1)]
    assert delays[0] == policy.retry_first
    for a, b in zip(delays, delays[1:]):
        assert b == min(2 * a, policy.retry_max)
    assert all(policy.retry_first <= d <= policy.retry_max for d in delays)
