"""Reminders and missed failures: the pure decisions (agent.desktop.reminder), and the file kept across logins."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

from agent.desktop.reminder import (
    DAY,
    DiskView,
    MissedFailure,
    NoticeState,
    Reminder,
    ShownCard,
    load_notice_state,
    missed_to_show,
    notice_state_path,
    plan_reminders,
    save_notice_state,
    stale_cards,
)

UTC = dt.timezone.utc
NOW = dt.datetime(2025, 11, 22, 9, 0, tzinfo=UTC).timestamp()  # a Saturday, 09:00
HOUR = 3600.0


def plan(disks: dict[str, DiskView], *, now: float = NOW, days: int = 7, login: bool = False) -> tuple[tuple[Reminder, ...], float | None]:
    due, next_check = plan_reminders(now, disks, days, login=login, tz=UTC)
    return due, next_check


def test_a_disk_without_a_backup_for_remind_after_days_is_due_and_named_with_its_last_backup() -> None:
    last = NOW - 8 * DAY
    assert plan({"backup1": DiskView(last)}) == ((Reminder("backup1", last),), NOW + DAY)


def test_a_recent_backup_is_not_due_and_the_next_check_is_when_it_will_be() -> None:
    last = NOW - 2 * DAY
    assert plan({"backup1": DiskView(last)}) == ((), last + 7 * DAY)
    # exactly remind_after days: due
    assert plan({"backup1": DiskView(NOW - 7 * DAY)})[0] == (Reminder("backup1", NOW - 7 * DAY),)


def test_an_attached_disk_gets_no_reminder_and_no_timer() -> None:
    assert plan({"backup1": DiskView(NOW - 30 * DAY, attached=True)}) == ((), None)


def test_zero_days_means_never() -> None:
    assert plan({"backup1": DiskView(None, known_since=NOW - 365 * DAY)}, days=0) == ((), None)


def test_a_disk_never_backed_up_counts_from_when_it_was_first_known() -> None:
    fresh = {"backup1": DiskView(None, known_since=NOW - DAY)}
    assert plan(fresh) == ((), NOW + 6 * DAY)
    old = {"backup1": DiskView(None, known_since=NOW - 10 * DAY)}
    assert plan(old) == ((Reminder("backup1", None),), NOW + DAY)
    # not known yet: it is known from now on, nothing due
    assert plan({"backup1": DiskView(None)}) == ((), NOW + 7 * DAY)


def test_once_a_day_while_running() -> None:
    reminded = NOW - 20 * HOUR
    disks = {"backup1": DiskView(NOW - 30 * DAY, reminded=reminded)}
    assert plan(disks) == ((), reminded + DAY)
    assert plan(disks, now=reminded + DAY)[0] == (Reminder("backup1", NOW - 30 * DAY),)


def test_at_login_once_per_calendar_day() -> None:
    # reminded yesterday at 18:00, logging in today at 09:00 (15 hours later): a new day, so at once
    yesterday = NOW - 15 * HOUR
    disks = {"backup1": DiskView(NOW - 30 * DAY, reminded=yesterday)}
    assert plan(disks, login=True) == ((Reminder("backup1", NOW - 30 * DAY),), NOW + DAY)
    # reminded earlier today, a second login (an agent restart): not again; the next is 24 h after
    today = NOW - 2 * HOUR
    again = {"backup1": DiskView(NOW - 30 * DAY, reminded=today)}
    assert plan(again, login=True) == ((), today + DAY)


def test_one_timer_for_several_disks_at_the_earliest_moment() -> None:
    disks = {
        "a": DiskView(NOW - 3 * DAY),  # due in 4 days
        "b": DiskView(NOW - 6 * DAY),  # due in 1 day
        "c": DiskView(NOW - 9 * DAY, attached=True),  # here: none
        "d": DiskView(NOW - 9 * DAY, reminded=NOW - HOUR),  # reminded: in 23 hours
    }
    assert plan(disks) == ((), NOW + 23 * HOUR)


def test_missed_failures_one_per_disk_and_none_after_a_later_success() -> None:
    f1 = MissedFailure(NOW - 3 * DAY, "a", "transfer", "rsync failed")
    f2 = MissedFailure(NOW - 2 * DAY, "a", "unlock", "no key")
    f3 = MissedFailure(NOW - DAY, "b", "mount", "bad fs")
    f4 = MissedFailure(NOW - 4 * DAY, "c", "transfer", "gone")
    shown = missed_to_show([f3, f2, f1, f4], {"a": NOW - 10 * DAY, "b": None, "c": NOW - HOUR})
    assert [(s.latest, s.times, s.first) for s in shown] == [(f2, 2, f1.time), (f3, 1, f3.time)]
    assert missed_to_show([], {}) == []


def test_the_state_file_round_trips_beside_the_agent_s_and_a_damaged_one_is_ignored(tmp_path: Path) -> None:
    path = notice_state_path(str(tmp_path / "backup-agent" / "state.json"))
    assert path == str(tmp_path / "backup-agent" / "notifications.json")
    assert load_notice_state(path) == NoticeState()
    state = NoticeState({"a": NOW}, {"a": NOW + 1}, [MissedFailure(NOW, "a", None, "broke", "S1"),
                                                     MissedFailure(NOW, "a", "transfer", "full", None, 12)])
    save_notice_state(path, state)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert load_notice_state(path) == state
    assert json.loads(Path(path).read_text())["version"] == 1
    Path(path).write_text("{not json")
    assert load_notice_state(path) == NoticeState()
    Path(path).write_text(json.dumps({"reminded": {"a": "yesterday"}, "missed": [{"disk": 3}, "x"]}))
    assert load_notice_state(path) == NoticeState()


def test_cards_an_earlier_agent_left_are_stale_once_untrue() -> None:
    def card(kind: str, disk: str = "b1", slot: str = "cycle") -> ShownCard:
        return ShownCard(slot, 7, disk, kind, NOW, "bus/:1.5", ("backup-now",))

    def stale(kind: str, *, attached: tuple[str, ...] = (), open_disks: tuple[str, ...] = (),
              success: float | None = None) -> bool:
        cards = [card(kind), card(kind, "b2")]  # b2 is never asked about: its card is judged alone
        found = stale_cards(cards, attached=attached, open_disks=open_disks, last_successes={"b1": success})
        return card(kind) in found

    # another agent's cycle and its "leave the disk plugged in" are never this agent's to keep
    assert stale("running", attached=("b1",)) and stale("skipped", attached=("b1",)) and stale("new-kind")
    for kind in ("complete", "stopped"):  # "safe to unplug": true while it is here and closed
        assert not stale(kind, attached=("b1",))
        assert stale(kind) and stale(kind, attached=("b1",), open_disks=("b1",))
    assert stale("removed", attached=("b1",)) and not stale("removed")
    for kind in ("failed", "missed"):  # a failure: until a backup of its disk succeeds after it
        assert not stale(kind, success=NOW - 1) and not stale(kind, attached=("b1",))
        assert stale(kind, success=NOW + 1)
    assert not stale("reminder") and stale("reminder", attached=("b1",)) and stale("reminder", success=NOW + 1)


def test_the_cards_on_screen_round_trip_and_bad_entries_are_dropped(tmp_path: Path) -> None:
    path = str(tmp_path / "notifications.json")
    kept = ShownCard("missed:b1", 12, "b1", "missed", NOW, "abc/:1.9", ("backup-now",))
    save_notice_state(path, NoticeState(cards=[kept]))
    assert load_notice_state(path).cards == [kept]
    data = json.loads(Path(path).read_text())
    data["cards"] += [{"slot": "cycle", "ident": True, "disk": "b1", "kind": "failed", "time": NOW, "server": "x"},
                      {"slot": "cycle", "ident": 0, "disk": "b1", "kind": "failed", "time": NOW, "server": "x"}, "junk"]
    Path(path).write_text(json.dumps(data))
    assert load_notice_state(path).cards == [kept]
