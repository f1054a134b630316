"""When to back up: a pure scheduler, one small state machine per disk.

Values in, values out: nothing here reads a clock, sleeps or touches a file.
The agent reads the wall clock itself (``time.time()``) and passes it as
``now`` (epoch seconds); tests drive time directly.

The agent keeps one :class:`DiskState` per configured disk, seeded with the
last successful snapshot read from that disk's repository, and feeds it every
event:

- the disk appears (udev): :func:`on_plugged`
- the disk disappears: :func:`on_unplugged`
- the agent's timer fires: :func:`on_tick`
- logind's ``PrepareForSleep(false)`` (within a minute of resuming):
  :func:`on_resumed`
- "Back up now" (D-Bus, CLI): :func:`on_asked`
- the cycle was spawned: :func:`on_started`
- the cycle exited: :func:`on_finished`, then :func:`on_tick` for the next
  decision (what to wait for)

**One cycle at a time.** Every decision depends on ``DiskState.running``, so
the agent must apply :func:`on_started` to the state *before it handles the
next trigger*. Then a plug-in, a timer and a "back up now" arriving at the same
instant start exactly one cycle: the first trigger says "start", the others
say ``"running"``. :func:`handle` does both steps in one call (decide, and mark
the cycle started when the decision is to start); an agent that only ever uses
:func:`handle` cannot get this wrong.

**Sleeping.** After each decision the agent may sleep :func:`seconds_until`
seconds before calling :func:`on_tick` again. It is ``None`` when there is
nothing to wait for: no disk attached (an idle agent never wakes up, only
events wake it), a cycle running (its exit is the next event), or a cycle to
start now. The agent's sleep runs on the monotonic clock, which stops while
the machine is suspended; that is what :func:`on_resumed` is for.

Rules, including those chosen here:

- The interval is measured on the wall clock from the last *successful*
  snapshot, so a machine that slept through the hour is due at once, and the
  next decision (resume or tick) starts one cycle, never a burst: later
  triggers see ``running``, and after the cycle succeeds the next one is due a
  full interval later.
- On plug-in with ``on_plug = "if-due"`` a cycle starts when the last success
  is at least ``interval`` old (or there is none) -- the retry back-off does
  not hold back a plug-in, so a transfer interrupted by pulling the disk out is
  resumed by the next plug-in. It also starts when a pending retry is due.
  With ``"always"`` every plug-in starts one. A second plug-in event for a
  disk already attached (a udev ``change`` after ``add``) is not a new plug-in:
  it is handled like a tick, so it never starts a second backup by itself.
- After ``n`` consecutive failures the next try is due ``retry_first *
  2**(n-1)`` seconds (capped at ``retry_max``) after the last failure,
  instead of the interval: 5 min, 10 min, 20 min ... 4 h with the defaults.
  A success resets the count. Failures are kept across unplugging.
- A plug-in after a run that failed or was stopped (``unfinished``) starts a
  cycle with ``on_plug = "if-due"`` too: it carries on with that run.
- A stop the user asked for (:func:`on_stopped`) is not a failure: no retry,
  the next regular try at least ``interval`` after the stop.
- "Not now" (:func:`on_postponed`) is such a stop that names the next try
  itself: exactly one ``interval`` after the user said it, whatever the
  last success, failure or stop say; the next run, whatever its end, clears it.
- "Back up now" starts a cycle whenever the disk is attached and none runs,
  due or not.
- Clock set back: a ``last_success`` (or ``last_failure``) more than
  :data:`CLOCK_SKEW` (60 s) later than ``now`` cannot be trusted -- the clock
  was set back, or the snapshot was made while it was wrong -- and how long
  ago the backup really was is unknown, so the disk is *due now*. This costs
  at most one extra (incremental, cheap) snapshot per plug-in or agent start,
  and never blocks backups until the clock catches up. Up to 60 s in the future
  is taken as clock jitter and the time is used as it is.
- ``Decision.next_due`` is the wall-clock time of the next backup: ``None``
  when the disk is not attached, ``now`` when a cycle starts or runs, else the
  time it will be due (always later than ``now`` for "not due").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Final, Literal

#: The defaults of ``[agent]``, here once: the configuration's model and the Policy take them from here.
DEFAULT_INTERVAL: Final = 3600  # seconds between backups while the disk stays attached
DEFAULT_ON_PLUG: Final = "if-due"
ON_PLUG_CHOICES = (DEFAULT_ON_PLUG, "always")

#: How far in the future (seconds) a last success or failure may be before it
#: is taken as a sign that the wall clock was set back (see the module notes).
CLOCK_SKEW = 60.0

Reason = Literal[
    "plugged in, due",
    "plugged in, always",
    "interval elapsed",
    "retry after failure",
    "asked",
    "not due",
    "running",
    "not attached",
    "resumed from sleep, due",
    "plugged in, unfinished",
]

Trigger = Literal["plugged", "unplugged", "tick", "resumed", "asked"]


@dataclass(frozen=True)
class Policy:
    """When to back up one disk (from the configuration)."""

    interval: float = float(DEFAULT_INTERVAL)  # seconds between backups while the disk stays attached
    on_plug: str = DEFAULT_ON_PLUG  # one of ON_PLUG_CHOICES
    retry_first: float = 300.0  # first retry delay after a failure; doubles each failure
    retry_max: float = 3600.0 * 4  # cap of the retry delay (at least retry_first)

    def __post_init__(self) -> None:
        for name in ("interval", "retry_first", "retry_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number of seconds, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive, finite number of seconds, got {value!r}")
        if self.retry_max < self.retry_first:
            raise ValueError(
                f"retry_max ({self.retry_max!r}) must be at least retry_first ({self.retry_first!r})"
            )
        if self.on_plug not in ON_PLUG_CHOICES:
            raise ValueError(f"on_plug must be one of {', '.join(ON_PLUG_CHOICES)}, got {self.on_plug!r}")


@dataclass(frozen=True)
class DiskState:
    """What the scheduler knows about one disk."""

    attached: bool = False
    last_success: float | None = None  # wall-clock epoch seconds of the last successful snapshot
    failures: int = 0  # consecutive failures since the last success
    last_failure: float | None = None
    running: bool = False
    # The last run failed or was stopped, and no success followed: its
    # transfer is unfinished, and the next plug-in carries on with it.
    unfinished: bool = False
    stopped_at: float | None = None  # the user stopped the last run then: no retry before an interval passed
    postponed_until: float | None = None  # "Not now": the next try is then, exactly


@dataclass(frozen=True)
class Decision:
    """What the agent should do now, and when the next backup is due."""

    start_now: bool
    reason: Reason
    next_due: float | None  # wall-clock time of the next backup (None when not attached)


def retry_delay(failures: int, policy: Policy) -> float:
    """Seconds from the last failure to the next try after ``failures`` failures in a row."""
    if failures < 1:
        raise ValueError(f"retry_delay needs at least one failure, got {failures}")
    delay = policy.retry_first
    # Doubling in a loop (not 2**n) cannot overflow a float, whatever the count.
    for _ in range(failures - 1):
        if delay >= policy.retry_max:
            break
        delay *= 2
    return min(delay, policy.retry_max)


def _from_the_future(when: float, now: float) -> bool:
    return when > now + CLOCK_SKEW


def _regular_due(state: DiskState, policy: Policy, now: float) -> float:
    """Due time from the last success alone: ``now`` if none (or from the future)."""
    if state.last_success is None or _from_the_future(state.last_success, now):
        return now
    return state.last_success + policy.interval


def _retry_due(state: DiskState, policy: Policy, now: float) -> float | None:
    """Due time of the next retry, or None when the last attempt did not fail."""
    if state.failures < 1 or state.last_failure is None:
        return None
    if _from_the_future(state.last_failure, now):
        return now
    return state.last_failure + retry_delay(state.failures, policy)


def next_due(state: DiskState, policy: Policy, now: float) -> float | None:
    """Wall-clock time the next backup of this disk is due; None if not attached.

    After failures it is the retry time (last failure + back-off delay), else
    last success + interval, or ``now`` when there was never a success (or the
    last one is from the future: the clock was set back).

    ``now`` is needed for those two cases only; nothing is compared with it
    otherwise, so the result is a fixed point in time that a later ``now``
    reaches.
    """
    if not state.attached:
        return None
    return _due(state, policy, now)


def _due(state: DiskState, policy: Policy, now: float) -> float:
    """:func:`next_due` of an attached disk."""
    if state.postponed_until is not None:
        return state.postponed_until
    retry = _retry_due(state, policy, now)
    due = retry if retry is not None else _regular_due(state, policy, now)
    stopped = state.stopped_at
    if stopped is not None and not _from_the_future(stopped, now):
        # A stop the user asked for is not retried: the next try is a
        # regular one, at least an interval after the stop.
        due = max(due, stopped + policy.interval)
    return due


def _not_attached() -> Decision:
    return Decision(False, "not attached", None)


def _evaluate(state: DiskState, policy: Policy, now: float, *, resumed: bool) -> Decision:
    if not state.attached:
        return _not_attached()
    if state.running:
        return Decision(False, "running", now)
    due = _due(state, policy, now)
    if now < due:
        return Decision(False, "not due", due)
    if resumed:
        return Decision(True, "resumed from sleep, due", now)
    if state.postponed_until is None and _retry_due(state, policy, now) is not None:
        return Decision(True, "retry after failure", now)
    return Decision(True, "interval elapsed", now)


def on_plugged(state: DiskState, policy: Policy, now: float) -> tuple[DiskState, Decision]:
    """The disk appeared. Start per ``policy.on_plug``; a repeated event is a tick."""
    if state.attached:
        return state, _evaluate(state, policy, now, resumed=False)
    state = replace(state, attached=True)
    if state.running:  # a cycle still cleaning up after the disk was pulled out
        return state, Decision(False, "running", now)
    if policy.on_plug == "always":
        return state, Decision(True, "plugged in, always", now)
    if state.unfinished:
        # Plugging the disk back in after a failed or stopped run carries on
        # with it, whatever the last success says.
        return state, Decision(True, "plugged in, unfinished", now)
    retry = _retry_due(state, policy, now)
    if now >= _regular_due(state, policy, now) or (retry is not None and now >= retry):
        return state, Decision(True, "plugged in, due", now)
    return state, Decision(False, "not due", next_due(state, policy, now))


def on_unplugged(state: DiskState) -> DiskState:
    """The disk disappeared. A running cycle stays running until it exits."""
    return replace(state, attached=False)


def on_tick(state: DiskState, policy: Policy, now: float) -> tuple[DiskState, Decision]:
    """The agent's timer fired (or it wants the next decision after a cycle)."""
    return state, _evaluate(state, policy, now, resumed=False)


def on_resumed(state: DiskState, policy: Policy, now: float) -> tuple[DiskState, Decision]:
    """The machine woke from sleep: a tick, with its own reason when due."""
    return state, _evaluate(state, policy, now, resumed=True)


def on_asked(state: DiskState, now: float) -> tuple[DiskState, Decision]:
    """"Back up now": start unless a cycle runs or the disk is not attached."""
    if not state.attached:
        return state, _not_attached()
    if state.running:
        return state, Decision(False, "running", now)
    return state, Decision(True, "asked", now)


def on_started(state: DiskState) -> DiskState:
    """The cycle was spawned. Apply before handling the next trigger."""
    return replace(state, running=True)


def on_finished(
    state: DiskState, now: float, success: bool, *, snapshot_time: float | None = None
) -> DiskState:
    """The cycle exited. A success resets the failure count; a failure adds one.

    ``snapshot_time``, when given, is the time the new snapshot is named after
    (the cycle's start); it becomes ``last_success`` instead of ``now``, so the
    state matches what a restarted agent would read from the repository.
    """
    if success:
        return replace(
            state,
            running=False,
            last_success=now if snapshot_time is None else snapshot_time,
            failures=0,
            last_failure=None,
            unfinished=False,
            stopped_at=None,
            postponed_until=None,
        )
    return replace(
        state, running=False, failures=state.failures + 1, last_failure=now, unfinished=True, stopped_at=None,
        postponed_until=None,
    )


def on_stopped(state: DiskState, now: float) -> DiskState:
    """The user stopped the cycle: not a failure (no retry), but its transfer is unfinished.

    The failure count is kept as it was; the next scheduled try is a regular
    one, at least ``interval`` after the stop; a plug-in carries on with it.
    """
    return replace(state, running=False, unfinished=True, stopped_at=now, postponed_until=None)


def on_postponed(state: DiskState, policy: Policy, at: float) -> DiskState:
    """"Not now" at ``at`` stopped the cycle: as a stop, with the next try exactly one interval after ``at``."""
    return replace(state, running=False, unfinished=True, stopped_at=None, postponed_until=at + policy.interval)


def seconds_until(decision: Decision, now: float) -> float | None:
    """How long the agent may sleep before calling :func:`on_tick` again.

    None when no timer is needed: the disk is not attached (only an event can
    change that), a cycle runs (its exit is the next event), or the decision
    is to start now (after the cycle, :func:`on_finished` then :func:`on_tick`
    give the next decision). Never negative.
    """
    if decision.next_due is None or decision.start_now or decision.reason == "running":
        return None
    return max(0.0, decision.next_due - now)


def handle(state: DiskState, policy: Policy, now: float, trigger: Trigger) -> tuple[DiskState, Decision]:
    """One trigger: decide, and mark the cycle started when the decision is to start.

    The returned state already has ``running`` set when ``decision.start_now``:
    the agent spawns the cycle and, should spawning fail, calls
    :func:`on_finished` with ``success=False``.
    """
    if trigger == "plugged":
        state, decision = on_plugged(state, policy, now)
    elif trigger == "unplugged":
        state, decision = on_unplugged(state), _not_attached()
    elif trigger == "tick":
        state, decision = on_tick(state, policy, now)
    elif trigger == "resumed":
        state, decision = on_resumed(state, policy, now)
    elif trigger == "asked":
        state, decision = on_asked(state, now)
    else:
        raise ValueError(f"unknown trigger {trigger!r}")
    if decision.start_now:
        state = on_started(state)
    return state, decision

