"""The agent's agenda across all disks: one pure step, ``(agenda, event, now) -> (agenda, actions)``.

:mod:`agent.policy.schedule` decides for one disk; this module decides for the
agent as a whole, and nothing else does: which disk's cycle runs (one at a
time across disks and across agents), which triggers wait for it and are
replayed when it ends, which disks the user ejected (closed until they are
plugged in again or asked for, also across a restart of the agent), how a
stop the user asked for ends (not a failure, no retry), and when the agent
must wake up next. :class:`agent.desktop.daemon.Agent` feeds it what happened
(:data:`Event`) and only carries out the :data:`Action` values it returns:
start or stop a cycle, answer a caller, save the state file, arm its timer.

Values in, values out: no clock, no I/O. ``now`` is wall-clock epoch seconds.

Rules (besides the schedule's):

- At most one cycle runs, and none while something else holds the machine
  (:class:`Blocked`: a cycle started elsewhere, an eject under way). A
  plug-in or "Back up now" that cannot start then is held back and replayed,
  first, when the way is clear; a timer is not held (it is asked again).
- An ejected disk is opened by nothing but a plug-in seen while the agent
  runs, or "Back up now": finding it present when the agent starts again
  does not reopen it (a disk that was not ejected is then backed up as on a
  plug-in). An ejected disk has no next due time.
- A stop the user asked for ends as "stopped": no failure, no retry before
  the next regular time; the unfinished transfer is carried on by the next
  plug-in (see :func:`agent.policy.schedule.on_stopped`).
- A cycle that lost the machine lock to another cycle ("busy") is no
  failure: its trigger waits for that cycle.
- A due backup is skipped while a condition of :mod:`agent.policy.conditions`
  holds (quiet hours, the battery, a metered connection for a remote
  destination): no start, no failure, the disk's ``skipped`` says why, and
  it starts as soon as the condition ends (:class:`Circumstance` from UPower
  or NetworkManager, or the timer at the end of quiet hours). A skipped
  plug-in is replayed as a plug-in then. "Back up now" is never skipped.
- "Not now" (:class:`NotNow`) stops the running cycle as a stop does, and
  the next try is exactly one interval after it was said
  (:func:`agent.policy.schedule.on_postponed`).
- A remote destination (a server: the agenda's ``servers``) is "attached"
  while the network may reach it: from :class:`Watching` (the agent runs),
  and until NetworkManager says there is no network (``Circumstances.offline``), so without a network
  it is never due and never tried. A try that finds the server silent ends
  as ``unreachable``: no failure, the entry is ``waiting``
  (:mod:`agent.policy.reach`) and looked for again after a growing delay;
  a network that comes back looks at once. See ``docs/ARCHITECTURE.md``,
  "Remote destinations".
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, replace
from typing import Literal, Mapping, Sequence, Union

from agent.policy import conditions, reach, schedule

Held = Literal["plugged", "asked"]
Outcome = Literal["success", "failure", "busy", "skipped", "unreachable"]


@dataclass(frozen=True)
class DiskAgenda:
    """One disk: the schedule's state, and what the agenda adds to it."""

    state: schedule.DiskState = schedule.DiskState()
    ejected: bool = False  # closed by the user: no scheduled backup opens it
    held: Held | None = None  # a trigger waiting for the running cycle to end
    next_due: float | None = None  # the last decision's due time (None: not attached, or ejected)
    skipped: conditions.Hold | None = None  # a due backup waits for this condition to end
    waiting: reach.Waiting | None = None  # a server that did not answer: looked for again at its retry_at


@dataclass(frozen=True)
class Running:
    """The one cycle this agent runs."""

    disk: str
    reason: str
    trigger: schedule.Trigger  # what started it (replayed if it loses the lock to another cycle)
    stopping: bool = False  # the user asked to stop it
    postponed_at: float | None = None  # "Not now" was said then: the next try one interval later


@dataclass(frozen=True)
class Agenda:
    """Everything the agent decides from; ``order`` is the configuration's order of disks."""

    policy: schedule.Policy
    order: tuple[str, ...]
    disks: Mapping[str, DiskAgenda] = field(default_factory=dict)
    running: Running | None = None
    blocked: str | None = None  # why no cycle may start (another cycle, an eject), or None
    rules: conditions.Rules = conditions.Rules()  # [conditions]: moments not to back up
    circumstances: conditions.Circumstances = conditions.Circumstances()  # battery and network, as last told
    remote: frozenset[str] = frozenset()  # disks whose destination is remote (a metered connection holds them)
    tz: dt.tzinfo | None = None  # the zone quiet hours are read in (None: the machine's)
    servers: frozenset[str] = frozenset()  # remote destinations: attached while the network may reach them
    policies: Mapping[str, schedule.Policy] = field(default_factory=dict)  # a destination's own (a [[remote]] interval)
    watching: bool = False  # the agent runs (Watching): servers may be attached

    def disk(self, name: str) -> DiskAgenda:
        return self.disks.get(name, DiskAgenda())

    def policy_for(self, name: str) -> schedule.Policy:
        """The schedule of one destination: its own when it has one, else the agent's."""
        return self.policies.get(name, self.policy)

    def attached(self) -> tuple[str, ...]:
        return tuple(name for name in self.order if self.disk(name).state.attached)


def new(
    policy: schedule.Policy,
    order: Sequence[str],
    states: Mapping[str, schedule.DiskState] | None = None,
    ejected: Sequence[str] = (),
    *,
    rules: conditions.Rules = conditions.Rules(),
    remote: Sequence[str] = (),
    tz: dt.tzinfo | None = None,
    servers: Sequence[str] = (),
    policies: Mapping[str, schedule.Policy] | None = None,
) -> Agenda:
    """The agenda at start: each disk's remembered state (not attached, nothing running).

    ``servers`` (remote destinations, in ``order`` too) are attached by
    :class:`Watching`: the network may reach them until NetworkManager says otherwise.
    """
    known = states or {}
    disks = {
        name: DiskAgenda(
            state=replace(known.get(name, schedule.DiskState()), attached=False, running=False),
            ejected=name in ejected and name not in servers,
        )
        for name in order
    }
    return Agenda(
        policy, tuple(order), disks, rules=rules, remote=frozenset(remote), tz=tz, servers=frozenset(servers),
        policies=dict(policies or {}),
    )


# -- events ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Plugged:
    """A configured disk appeared; ``at_start``: found present when the agent started (not a plug-in)."""

    disk: str
    at_start: bool = False


@dataclass(frozen=True)
class Unplugged:
    disk: str


@dataclass(frozen=True)
class Tick:
    """The agent's timer fired."""


@dataclass(frozen=True)
class Resumed:
    """The machine woke from sleep."""


@dataclass(frozen=True)
class Asked:
    """"Back up now" (``disk`` None: the first attached disk in the configuration's order)."""

    disk: str | None = None


@dataclass(frozen=True)
class StopAsked:
    """The user asked to stop the running cycle."""


@dataclass(frozen=True)
class Finished:
    """The cycle of ``disk`` ended: ``success``, ``failure``, ``busy`` (it lost the lock to another cycle),
    or ``skipped`` (it did not run, and that is no failure: the user cancelled the passphrase prompt).

    ``snapshot_time``: what the new snapshot is named after (a success).
    ``unreachable``: a server did not answer (``why`` says how); no failure.
    """

    disk: str
    outcome: Outcome
    snapshot_time: float | None = None
    why: str = ""


@dataclass(frozen=True)
class Ejected:
    """The user ejected ``disk``: it is unmounted and locked."""

    disk: str


@dataclass(frozen=True)
class Blocked:
    """Something else holds the machine (``reason``), or nothing any more (None)."""

    reason: str | None


@dataclass(frozen=True)
class Circumstance:
    """UPower or NetworkManager told something new: the machine's circumstances now."""

    now: conditions.Circumstances


@dataclass(frozen=True)
class Watching:
    """The agent runs and can start cycles: the servers are attached (unless there is no network)."""


@dataclass(frozen=True)
class NotNow:
    """"Not now" on the started notification: stop the running cycle; the next try one interval later."""


Event = Union[
    Plugged, Unplugged, Tick, Resumed, Asked, StopAsked, Finished, Ejected, Blocked, Circumstance, NotNow, Watching
]

# -- actions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """Start the cycle for ``disk``; ``reason`` is the schedule's (for listeners and logs)."""

    disk: str
    reason: str


@dataclass(frozen=True)
class Stop:
    """Stop the running cycle (SIGTERM: it cleans up)."""

    disk: str


@dataclass(frozen=True)
class Answer:
    """The reply to the caller of :class:`Asked` or :class:`StopAsked` (a short word)."""

    word: str


@dataclass(frozen=True)
class Waits:
    """A trigger for ``disk`` waits (``why``): for the log."""

    disk: str
    reason: str
    why: str


@dataclass(frozen=True)
class Save:
    """What must survive a restart changed (ejected disks, failures, unfinished runs)."""


@dataclass(frozen=True)
class Wake:
    """Arm the one timer for ``at`` (wall clock), or none (None)."""

    at: float | None


@dataclass(frozen=True)
class Skipped:
    """A due backup of ``disk`` is skipped for a condition (a new one, or another kind): for the log."""

    disk: str
    reason: str


Action = Union[Start, Stop, Answer, Waits, Save, Wake, Skipped]


# -- the step ----------------------------------------------------------------------------------


def step(agenda: Agenda, event: Event, now: float) -> tuple[Agenda, tuple[Action, ...]]:
    """Apply one event; the new agenda and what to do, ending with one :class:`Wake`."""
    before = persisted(agenda)
    actions: list[Action] = []
    agenda = _apply(agenda, event, now, actions)
    agenda = _settle(agenda, now, actions)
    if persisted(agenda) != before:
        actions.append(Save())
    actions.append(Wake(wake_at(agenda)))
    return agenda, tuple(actions)


def persisted(agenda: Agenda) -> tuple[tuple[str, schedule.DiskState, bool], ...]:
    """What the state file keeps of the agenda (attached and running are not kept)."""
    return tuple(
        (name, replace(agenda.disk(name).state, attached=False, running=False), agenda.disk(name).ejected)
        for name in agenda.order
    )


def wake_at(agenda: Agenda) -> float | None:
    """The earliest due time among attached, not ejected disks; None while a cycle runs or is blocked.

    A skipped disk wakes the agent at the end of its condition when that is a
    time (quiet hours); the end of the others is an event, not a timer.
    """
    if agenda.running is not None or agenda.blocked is not None:
        return None
    dues: list[float] = []
    for name in agenda.attached():
        entry = agenda.disk(name)
        if entry.ejected or entry.next_due is None:
            continue
        if entry.skipped is not None:
            if entry.skipped.until is not None:
                dues.append(entry.skipped.until)
            continue
        dues.append(entry.next_due)
    return min(dues) if dues else None


def _with(agenda: Agenda, name: str, entry: DiskAgenda) -> Agenda:
    return replace(agenda, disks={**agenda.disks, name: entry})


def _apply(agenda: Agenda, event: Event, now: float, actions: list[Action]) -> Agenda:
    if isinstance(event, Plugged):
        if event.disk not in agenda.order:
            return agenda
        entry = agenda.disk(event.disk)
        if entry.state.attached:  # a repeated event: a tick for this disk
            return _try(agenda, event.disk, "tick", now, actions)
        if event.at_start and entry.ejected:
            # Still the disk the user ejected: attached, closed, nothing due.
            state = replace(entry.state, attached=True)
            return _with(agenda, event.disk, replace(entry, state=state, next_due=None))
        agenda = _with(agenda, event.disk, replace(entry, ejected=False))
        return _try(agenda, event.disk, "plugged", now, actions)
    if isinstance(event, Unplugged):
        if event.disk not in agenda.order:
            return agenda
        entry = agenda.disk(event.disk)
        state = schedule.on_unplugged(entry.state)
        return _with(agenda, event.disk, DiskAgenda(state=state))
    if isinstance(event, (Tick, Resumed)):
        trigger: schedule.Trigger = "tick" if isinstance(event, Tick) else "resumed"
        for name in agenda.attached():
            agenda = _try(agenda, name, trigger, now, actions)
        return agenda
    if isinstance(event, Asked):
        return _ask(agenda, event.disk, now, actions)
    if isinstance(event, StopAsked):
        if agenda.running is None:
            actions.append(Answer("not-running"))
            return agenda
        actions += [Stop(agenda.running.disk), Answer("stopping")]
        return replace(agenda, running=replace(agenda.running, stopping=True))
    if isinstance(event, Finished):
        return _finish(agenda, event, now)
    if isinstance(event, Ejected):
        entry = agenda.disk(event.disk)
        if event.disk not in agenda.order or not entry.state.attached:
            return agenda
        return _with(agenda, event.disk, replace(entry, ejected=True, held=None, next_due=None, skipped=None))
    if isinstance(event, Blocked):
        return replace(agenda, blocked=event.reason)
    if isinstance(event, Circumstance):
        agenda = _network(agenda, event.now)
        return replace(agenda, circumstances=event.now)  # _settle then starts what no longer waits
    if isinstance(event, Watching):
        agenda = replace(agenda, watching=True)
        if agenda.circumstances.offline:
            return agenda
        for name in agenda.order:
            if name in agenda.servers:
                entry = agenda.disk(name)
                agenda = _with(agenda, name, replace(entry, state=replace(entry.state, attached=True)))
        return agenda  # _settle then starts those due
    if isinstance(event, NotNow):
        if agenda.running is None:
            actions.append(Answer("not-running"))
            return agenda
        actions += [Stop(agenda.running.disk), Answer("postponed")]
        return replace(agenda, running=replace(agenda.running, stopping=True, postponed_at=now))
    raise ValueError(f"unknown event {event!r}")


def _network(agenda: Agenda, now: conditions.Circumstances) -> Agenda:
    """Servers follow the network: gone while there is none; back (and looked for at once) when it returns."""
    if now.offline == agenda.circumstances.offline:
        return agenda
    for name in agenda.order:
        if name not in agenda.servers:
            continue
        entry = agenda.disk(name)
        if now.offline:
            state = schedule.on_unplugged(entry.state)
            agenda = _with(agenda, name, replace(entry, state=state, held=None, next_due=None, skipped=None, waiting=None))
        elif agenda.watching:
            agenda = _with(agenda, name, replace(entry, state=replace(entry.state, attached=True), waiting=None))
    return agenda


def _ask(agenda: Agenda, disk: str | None, now: float, actions: list[Action]) -> Agenda:
    if disk is not None and disk not in agenda.order:
        actions.append(Answer("unknown-disk"))
        return agenda
    if agenda.running is not None:
        actions.append(Answer("running"))
        return agenda
    attached = agenda.attached()
    name = disk if disk is not None else (attached[0] if attached else None)
    if name is None or not agenda.disk(name).state.attached:
        actions.append(Answer("no-network" if name in agenda.servers else "no-disk"))
        return agenda
    agenda = _with(agenda, name, replace(agenda.disk(name), ejected=False))
    agenda = _try(agenda, name, "asked", now, actions)
    started = agenda.running is not None and agenda.running.disk == name
    actions.append(Answer("started" if started else "running"))
    return agenda


def _decide(entry: DiskAgenda, policy: schedule.Policy, now: float, trigger: schedule.Trigger) -> tuple[schedule.DiskState, schedule.Decision]:
    state = entry.state
    if trigger == "plugged":
        return schedule.on_plugged(replace(state, attached=False), policy, now)
    if trigger == "asked":
        return schedule.on_asked(state, now)
    if trigger == "resumed":
        return schedule.on_resumed(state, policy, now)
    return schedule.on_tick(state, policy, now)


def _try(agenda: Agenda, name: str, trigger: schedule.Trigger, now: float, actions: list[Action]) -> Agenda:
    """One trigger for one disk: start it when the schedule says so and the way is clear, else hold or wait."""
    entry = agenda.disk(name)
    if entry.ejected and trigger in ("tick", "resumed"):
        return _with(agenda, name, replace(entry, next_due=None))
    state, decision = _decide(entry, agenda.policy_for(name), now, trigger)
    if not decision.start_now:
        due = decision.next_due if decision.reason != "running" else entry.next_due
        skipped = entry.skipped if entry.held == "plugged" else None  # a skipped plug-in still waits
        return _with(agenda, name, replace(entry, state=state, next_due=due, skipped=skipped))
    waiting = entry.waiting
    if trigger != "asked" and waiting is not None and now < waiting.retry_at:
        return _with(agenda, name, replace(entry, state=state, next_due=waiting.retry_at, skipped=None))
    if trigger != "asked":
        held_by = conditions.hold(agenda.rules, agenda.circumstances, now, remote=name in agenda.remote, tz=agenda.tz)
        if held_by is not None:
            if entry.skipped is None or entry.skipped.kind != held_by.kind:
                actions.append(Skipped(name, held_by.text))
            # A skipped plug-in is replayed as one when the condition ends (on_plug "always", unfinished).
            keep: Held | None = "plugged" if trigger == "plugged" else entry.held
            return _with(agenda, name, replace(entry, state=state, held=keep, next_due=now, skipped=held_by))
    why = agenda.blocked or (f"the backup of {agenda.running.disk} is running" if agenda.running else None)
    if why is not None:
        held: Held | None = "plugged" if trigger == "plugged" else "asked" if trigger == "asked" else entry.held
        actions.append(Waits(name, decision.reason, why))
        return _with(agenda, name, replace(entry, state=state, held=held, next_due=now, skipped=None))
    state = schedule.on_started(state)
    actions.append(Start(name, decision.reason))
    running = Running(name, decision.reason, trigger)
    return replace(
        _with(agenda, name, replace(entry, state=state, held=None, next_due=now, skipped=None)), running=running
    )


def _finish(agenda: Agenda, event: Finished, now: float) -> Agenda:
    running = agenda.running
    if running is None or running.disk != event.disk:
        return agenda
    entry = agenda.disk(event.disk)
    agenda = replace(agenda, running=None)
    if event.outcome == "busy":
        held: Held | None = (
            "plugged" if running.trigger == "plugged" else "asked" if running.trigger == "asked" else entry.held
        )
        if not entry.state.attached or entry.ejected or running.postponed_at is not None:
            held = None  # gone or closed meanwhile, or "not now": nothing to carry on with
        state = replace(entry.state, running=False)
        if running.postponed_at is not None:
            state = replace(state, postponed_until=running.postponed_at + agenda.policy_for(event.disk).interval)
        return _with(agenda, event.disk, replace(entry, state=state, held=held))
    if event.outcome == "unreachable":
        # Not a failure, and nothing was sent: the server is looked for again later.
        waiting = reach.missed(entry.waiting, now, event.why or "no answer", agenda.policy_for(event.disk).interval)
        state = replace(entry.state, running=False)
        return _with(agenda, event.disk, replace(entry, state=state, next_due=waiting.retry_at, waiting=waiting))
    entry = replace(entry, waiting=None)  # it answered
    if event.outcome == "skipped":
        # As after a stop, the next regular try is an interval away; nothing was transferred.
        state = replace(entry.state, running=False, stopped_at=now)
    elif event.outcome == "success":
        state = schedule.on_finished(entry.state, now, True, snapshot_time=event.snapshot_time)
    elif running.stopping and running.postponed_at is not None:
        state = schedule.on_postponed(entry.state, agenda.policy_for(event.disk), running.postponed_at)
    elif running.stopping:
        state = schedule.on_stopped(entry.state, now)
    else:
        state = schedule.on_finished(entry.state, now, False)
    # When it is due again, said now: another disk may start at once and hold the settling back (status, the timer).
    due = None if entry.ejected else schedule.next_due(state, agenda.policy_for(event.disk), now)
    return _with(agenda, event.disk, replace(entry, state=state, next_due=due))


def _settle(agenda: Agenda, now: float, actions: list[Action]) -> Agenda:
    """When the way is clear: replay held triggers first (configuration order), then each attached disk's tick."""
    if agenda.running is not None or agenda.blocked is not None:
        return agenda
    for name in agenda.order:
        entry = agenda.disk(name)
        if entry.held is not None and entry.state.attached:
            agenda = _with(agenda, name, replace(entry, held=None))  # replayed once: it starts or it is not due
            agenda = _try(agenda, name, entry.held, now, actions)
            if agenda.running is not None:
                return agenda
    for name in agenda.attached():
        if agenda.disk(name).held is not None:
            continue  # replayed just above, and skipped again
        agenda = _try(agenda, name, "tick", now, actions)
        if agenda.running is not None:
            return agenda
    return agenda


__all__ = [
    "Action", "Agenda", "Answer", "Asked", "Blocked", "Circumstance", "DiskAgenda", "Ejected", "Event", "Finished",
    "NotNow", "Plugged", "Resumed", "Running", "Save", "Skipped", "Start", "Stop", "StopAsked", "Tick", "Unplugged",
    "Wake", "Waits", "Watching",
    "new", "persisted", "step", "wake_at",
]
