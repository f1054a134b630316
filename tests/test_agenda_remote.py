"""Remote destinations in the agenda, and the pure pieces around them: no mocks, values in and out.

The agenda (agent/desktop/agenda.py) decides for disks and servers alike;
agent/policy/reach.py says when to look for a silent server again. The
agent's wiring against a real sshd and a NetworkManager stand-in is
tests/test_agent_remote.py.
"""

from __future__ import annotations

import pytest

from agent.config.validate import settings_from_mapping
from agent.core.errors import ConfigError
from agent.desktop import agenda
from agent.desktop.dbus.texts import failure_hint
from agent.desktop.dbus.traylook import BACK_UP_NOW, BACKUP_BASE, EJECT_BASE, menu_items, tooltip
from agent.desktop.state import AgentStatus, DiskStatus
from agent.desktop.daemon import destination_args, own_policies, remote_destinations
from agent.desktop.servers import address
from agent.policy import conditions, reach, schedule
from agent.system.install import agent_argvs, sudoers_rule

HOUR = 3600.0
T0 = 1_800_000_000.0
POLICY = schedule.Policy(interval=HOUR)
METERED = conditions.Circumstances(metered=True)
OFFLINE = conditions.Circumstances(offline=True)
ONLINE = conditions.Circumstances()


def starts(actions: tuple[agenda.Action, ...]) -> list[str]:
    return [action.disk for action in actions if isinstance(action, agenda.Start)]


def wake(actions: tuple[agenda.Action, ...]) -> float | None:
    last = actions[-1]
    assert isinstance(last, agenda.Wake)
    return last.at


def fresh(order: tuple[str, ...] = ("usb", "nas"), servers: tuple[str, ...] = ("nas",), remote: tuple[str, ...] = ("nas",),
          states: dict[str, schedule.DiskState] | None = None) -> agenda.Agenda:
    return agenda.new(POLICY, order, states, servers=servers, remote=remote)


# -- reach (pure) ----------------------------------------------------------------------------


def test_the_look_for_a_silent_server_backs_off_and_is_capped() -> None:
    assert [reach.retry_after(n, HOUR) for n in range(1, 7)] == [60.0, 120.0, 240.0, 480.0, 900.0, 900.0]
    assert reach.retry_after(10**6, HOUR) == reach.RETRY_MAX  # no overflow, whatever the count
    assert reach.retry_after(5, 300.0) == 300.0  # never later than one interval
    with pytest.raises(ValueError):
        reach.retry_after(0, HOUR)
    first = reach.missed(None, T0, "no answer", HOUR)
    second = reach.missed(first, T0 + 60, "refused", HOUR)
    assert first == reach.Waiting(T0, 1, "no answer", T0 + 60)
    assert second == reach.Waiting(T0, 2, "refused", T0 + 180)
    assert reach.waiting_text("nas", second) == "waiting for nas (refused)"


def test_where_a_server_listens() -> None:
    settings = settings_from_mapping({"remote": [
        {"name": "nas", "host": "nas.home.arpa", "path": "/srv/b"},
        {"name": "pi", "host": "::1", "path": "/b", "port": 2222},
        {"name": "syno", "host": "syno", "module": "laptop"},
    ]}, "c.toml")  # fmt: skip
    assert [address(remote) for remote in settings.remotes] == [("nas.home.arpa", 22), ("::1", 2222), ("syno", 873)]


# -- configuration ------------------------------------------------------------------------------


def test_a_remote_may_allow_a_metered_connection_and_its_name_is_its_own() -> None:
    settings = settings_from_mapping({"remote": [
        {"name": "nas", "host": "nas", "path": "/b"},
        {"name": "cloud", "host": "cloud", "path": "/b", "metered": True},
    ]}, "c.toml")  # fmt: skip
    assert [remote.metered for remote in settings.remotes] == [False, True]
    assert remote_destinations(settings) == ("nas",)  # only those a metered connection holds back
    with pytest.raises(ConfigError, match=r"remote\[0\]\.metered.*expected a boolean") as bad:
        settings_from_mapping({"remote": [{"name": "nas", "host": "nas", "path": "/b", "metered": "yes"}]}, "c.toml")
    assert "\n" not in str(bad.value)
    disk = {"name": "nas", "luks_uuid": "0b5c3c4e-3a6f-4c39-9d2e-1c2b3a4d5e6f", "mount_point": "/mnt/nas"}
    with pytest.raises(ConfigError, match=r"remote\[0\]\.name.*\[\[disk\]\] too"):
        settings_from_mapping({"disk": [disk], "remote": [{"name": "nas", "host": "nas", "path": "/b"}]}, "c.toml")


def test_the_agent_asks_sudo_for_exactly_the_form_the_rule_has_for_each_remote() -> None:
    forms = agent_argvs(["usb"], ["nas", "attic"])
    for name, remote in (("usb", False), ("nas", True), ("attic", True)):
        assert ("backup", "--json", *destination_args(name, remote=remote)) in forms
    rule = sudoers_rule("alice", "/usr/local/bin/backup-agent", ["usb"], ["nas"])
    assert "/usr/local/bin/backup-agent backup --json --remote nas" in rule
    assert "--remote *" not in rule and "--remote ALL" not in rule  # nothing takes a host or path from the caller


# -- the agenda ----------------------------------------------------------------------------------


def test_a_due_server_starts_with_no_plug_in_and_is_due_again_an_interval_later() -> None:
    plan = fresh()
    # NetworkManager may speak before the agent runs: nothing starts before it watches
    plan, actions = agenda.step(plan, agenda.Circumstance(conditions.Circumstances(on_battery=False)), T0 - 1)
    plan, actions = agenda.step(plan, agenda.Tick(), T0 - 1)
    assert starts(actions) == [] and not plan.disk("nas").state.attached
    plan, actions = agenda.step(plan, agenda.Watching(), T0)
    assert starts(actions) == ["nas"] and plan.disk("nas").state.attached
    plan, actions = agenda.step(plan, agenda.Finished("nas", "success", snapshot_time=T0), T0 + 30)
    assert starts(actions) == [] and plan.disk("nas").next_due == T0 + HOUR and wake(actions) == T0 + HOUR
    plan, actions = agenda.step(plan, agenda.Tick(), T0 + HOUR)
    assert starts(actions) == ["nas"]


def test_without_a_network_a_server_is_not_due_and_not_tried_and_is_tried_when_the_network_returns() -> None:
    plan = fresh()
    plan, actions = agenda.step(plan, agenda.Circumstance(OFFLINE), T0)
    plan, actions = agenda.step(plan, agenda.Watching(), T0)
    assert starts(actions) == [] and not plan.disk("nas").state.attached and plan.disk("nas").next_due is None
    assert wake(actions) is None  # no timer for it: the network's return is an event
    for later in (T0 + 60, T0 + 5 * HOUR):
        plan, actions = agenda.step(plan, agenda.Tick(), later)
        assert starts(actions) == []
    plan, actions = agenda.step(plan, agenda.Circumstance(ONLINE), T0 + 5 * HOUR + 1)
    assert starts(actions) == ["nas"]


def test_a_metered_connection_holds_a_server_unless_it_allows_one_and_the_backup_is_caught_up_after() -> None:
    plan = fresh(order=("nas", "cloud"), servers=("nas", "cloud"), remote=("nas",))
    plan, actions = agenda.step(plan, agenda.Circumstance(METERED), T0)
    assert starts(actions) == []  # before the agent watches
    plan, actions = agenda.step(plan, agenda.Watching(), T0)
    assert starts(actions) == ["cloud"]  # metered = true: it goes
    assert [a.reason for a in actions if isinstance(a, agenda.Skipped)] == ["on a metered connection"]
    skipped = plan.disk("nas").skipped
    assert skipped is not None and skipped.kind == "metered"
    plan, actions = agenda.step(plan, agenda.Finished("cloud", "success", snapshot_time=T0), T0 + 10)
    assert starts(actions) == []  # still metered
    plan, actions = agenda.step(plan, agenda.Circumstance(ONLINE), T0 + 20)
    assert starts(actions) == ["nas"] and plan.disk("nas").skipped is None
    # a local disk is never held by a metered connection
    disks = fresh(order=("usb",), servers=(), remote=())
    disks, _ = agenda.step(disks, agenda.Circumstance(METERED), T0)
    disks, actions = agenda.step(disks, agenda.Plugged("usb"), T0)
    assert starts(actions) == ["usb"]


def test_a_silent_server_waits_without_a_failure_looks_again_later_and_at_once_on_a_new_network() -> None:
    plan = fresh(order=("nas",))
    plan, actions = agenda.step(plan, agenda.Watching(), T0)
    assert starts(actions) == ["nas"]
    plan, actions = agenda.step(plan, agenda.Finished("nas", "unreachable", why="no answer from nas:22"), T0 + 2)
    entry = plan.disk("nas")
    assert entry.state.failures == 0 and entry.state.last_failure is None and not entry.state.unfinished
    assert entry.waiting == reach.Waiting(T0 + 2, 1, "no answer from nas:22", T0 + 62)
    assert starts(actions) == [] and wake(actions) == T0 + 62 and entry.next_due == T0 + 62
    plan, actions = agenda.step(plan, agenda.Tick(), T0 + 30)
    assert starts(actions) == []  # not before its look
    plan, actions = agenda.step(plan, agenda.Tick(), T0 + 62)
    assert starts(actions) == ["nas"]
    plan, actions = agenda.step(plan, agenda.Finished("nas", "unreachable", why="refused"), T0 + 63)
    assert plan.disk("nas").waiting == reach.Waiting(T0 + 2, 2, "refused", T0 + 183)
    # "Back up now" tries at once (and without a network says so)
    offline, actions = agenda.step(plan, agenda.Circumstance(OFFLINE), T0 + 65)
    _, actions = agenda.step(offline, agenda.Asked("nas"), T0 + 66)
    assert [a.word for a in actions if isinstance(a, agenda.Answer)] == ["no-network"] and starts(actions) == []
    plan, actions = agenda.step(plan, agenda.Asked("nas"), T0 + 70)
    assert starts(actions) == ["nas"]
    plan, _ = agenda.step(plan, agenda.Finished("nas", "unreachable", why="refused"), T0 + 71)
    # the network went and came back (home again): looked for at once
    plan, _ = agenda.step(plan, agenda.Circumstance(OFFLINE), T0 + 80)
    plan, actions = agenda.step(plan, agenda.Circumstance(ONLINE), T0 + 90)
    assert starts(actions) == ["nas"] and plan.disk("nas").waiting is None
    # it answered: the waiting ends with the run, whatever its end
    plan, _ = agenda.step(plan, agenda.Finished("nas", "unreachable", why="refused"), T0 + 91)
    plan, _ = agenda.step(plan, agenda.Tick(), T0 + 151)
    plan, _ = agenda.step(plan, agenda.Finished("nas", "failure"), T0 + 160)
    assert plan.disk("nas").waiting is None and plan.disk("nas").state.failures == 1


def test_a_disk_and_a_server_keep_their_own_schedules_one_cycle_at_a_time() -> None:
    plan = fresh()
    plan, actions = agenda.step(plan, agenda.Plugged("usb"), T0)
    assert starts(actions) == ["usb"]  # the server is due too, and waits for the disk's cycle
    plan, actions = agenda.step(plan, agenda.Watching(), T0)  # the agent started with the disk in: it came first
    assert starts(actions) == [] and plan.disk("nas").state.attached  # and waits for the disk's cycle
    plan, actions = agenda.step(plan, agenda.Finished("usb", "success", snapshot_time=T0), T0 + 100)
    assert starts(actions) == ["nas"]
    plan, actions = agenda.step(plan, agenda.Finished("nas", "failure"), T0 + 200)
    usb, nas = plan.disk("usb"), plan.disk("nas")
    assert usb.state.last_success == T0 and usb.state.failures == 0 and usb.next_due == T0 + HOUR
    assert nas.state.last_success is None and nas.state.failures == 1 and nas.next_due == T0 + 200 + POLICY.retry_first
    plan, actions = agenda.step(plan, agenda.Tick(), T0 + 200 + POLICY.retry_first)
    assert starts(actions) == ["nas"]  # its retry, while the disk is not due
    plan, actions = agenda.step(plan, agenda.Finished("nas", "success", snapshot_time=T0 + 500), T0 + 600)
    assert plan.disk("nas").next_due == T0 + 500 + HOUR and plan.disk("usb").next_due == T0 + HOUR
    # the disk leaves; the server stays on its own schedule
    plan, actions = agenda.step(plan, agenda.Unplugged("usb"), T0 + 700)
    assert wake(actions) == T0 + 500 + HOUR
    plan, actions = agenda.step(plan, agenda.Tick(), T0 + 500 + HOUR)
    assert starts(actions) == ["nas"]
    # the state file keeps both, each its own
    kept = dict((name, state) for name, state, _ in agenda.persisted(plan))
    assert kept["usb"].last_success == T0 and kept["nas"].last_success == T0 + 500


def test_a_server_remembered_from_before_is_due_by_its_own_last_success() -> None:
    plan = fresh(states={"nas": schedule.DiskState(last_success=T0 - 600)})
    plan, actions = agenda.step(plan, agenda.Watching(), T0)
    assert starts(actions) == [] and plan.disk("nas").next_due == T0 - 600 + HOUR


def test_the_tooltip_shows_each_server_on_its_own() -> None:
    status = AgentStatus(disks=[
        DiskStatus("nas", attached=True, last_success=T0 - 2 * HOUR, next_due=T0 + 600, remote=True),
        DiskStatus("attic", remote=True, waiting="waiting for attic (no network)"),
    ])  # fmt: skip
    title, text = tooltip(status, None, T0)
    assert title == "Backups" and "Plug in" not in text, text
    assert " nas: last backup 2 hours ago; next backup " in text and " attic: no backup yet; waiting for attic (no network)." in text
    status.disks.append(DiskStatus("usb"))
    assert tooltip(status, None, T0)[1].endswith("Plug in the backup disk to back up.")


def test_the_tray_backs_up_to_a_reachable_server_and_never_ejects_one() -> None:
    status = AgentStatus(state="disk-attached", disk="usb")
    items = {item.id: item for item in menu_items(status, ["usb"], ["usb", "nas", "attic"], None, ["nas"])}
    assert items[BACKUP_BASE + 0].label == "Back up now to usb" and items[BACKUP_BASE + 1].label == "Back up now to nas"
    assert BACKUP_BASE + 2 not in items  # attic is not reachable now
    assert [item.label for item in items.values() if item.id >= EJECT_BASE and item.id < BACKUP_BASE] == ["Eject usb"]
    alone = {item.id: item for item in menu_items(AgentStatus(), [], ["nas"], None, ["nas"])}
    assert alone[BACK_UP_NOW].enabled and not any(EJECT_BASE <= ident < BACKUP_BASE for ident in alone)


def test_a_remote_may_have_its_own_interval() -> None:
    settings = settings_from_mapping({"agent": {"interval": "1h"}, "remote": [
        {"name": "nas", "host": "nas", "path": "/b", "interval": "1d"},
        {"name": "pi", "host": "pi", "path": "/b"},
    ]}, "c.toml")  # fmt: skip
    assert [remote.interval for remote in settings.remotes] == [86400, None]
    policies = own_policies(settings, POLICY)
    assert policies == {"nas": schedule.Policy(interval=86400.0)}
    for bad in ("30s", "400d", 5):
        with pytest.raises(ConfigError, match=r"remote\[0\]\.interval"):
            settings_from_mapping({"remote": [{"name": "nas", "host": "nas", "path": "/b", "interval": bad}]}, "c.toml")
    plan = agenda.new(POLICY, ("usb", "nas"), servers=("nas",), policies=policies)
    plan, actions = agenda.step(plan, agenda.Plugged("usb"), T0)
    plan, actions = agenda.step(plan, agenda.Watching(), T0)
    plan, actions = agenda.step(plan, agenda.Finished("usb", "success", snapshot_time=T0), T0 + 10)
    assert starts(actions) == ["nas"]
    plan, actions = agenda.step(plan, agenda.Finished("nas", "success", snapshot_time=T0 + 10), T0 + 20)
    assert plan.disk("usb").next_due == T0 + HOUR and plan.disk("nas").next_due == T0 + 10 + 86400
    plan, actions = agenda.step(plan, agenda.Tick(), T0 + HOUR)
    assert starts(actions) == ["usb"]
    plan, actions = agenda.step(plan, agenda.Finished("usb", "success", snapshot_time=T0 + HOUR), T0 + HOUR + 10)
    assert starts(actions) == [] and wake(actions) == T0 + 2 * HOUR


def test_a_server_failure_card_says_what_to_do_about_its_cause() -> None:
    assert "known_hosts" in failure_hint("connect", 20) and "authorized_keys" in failure_hint("connect", 21)
    assert "carries on" in failure_hint("transfer", 23) and "plugged in" not in failure_hint("transfer", 23)


def test_the_look_is_a_real_connect_that_never_waits_longer_than_its_timeout() -> None:
    """agent/desktop/servers.unreachable against real sockets on 127.0.0.1: one that accepts, a closed port,
    and one whose queue is full (the kernel drops the connect: what a server that does not answer looks like)."""
    import asyncio
    import socket
    import time

    from agent.desktop.servers import unreachable

    with socket.socket() as open_one, socket.socket() as full, socket.socket() as closed:
        open_one.bind(("127.0.0.1", 0))
        open_one.listen(8)
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        closed.bind(("127.0.0.1", 0))  # bound, not listening: refused
        closed_port = closed.getsockname()[1]
        fillers = [socket.socket() for _ in range(3)]
        try:
            for filler in fillers:
                filler.setblocking(False)
                filler.connect_ex(full.getsockname())
            time.sleep(0.05)

            async def looks() -> list[str | None]:
                return [await unreachable("127.0.0.1", sock.getsockname()[1], 0.4) for sock in (open_one, closed, full)]

            started = time.monotonic()
            here, refused, silent = asyncio.run(looks())
            took = time.monotonic() - started
        finally:
            for filler in fillers:
                filler.close()
    assert here is None
    assert refused == f"127.0.0.1:{closed_port}: the connection was refused"
    assert silent is not None and silent.startswith("no answer from 127.0.0.1:") and silent.endswith("within 0.4 s")
    assert took < 1.5  # the silent one costs its timeout, no more
