"""Hooks with real processes: each hook is a small real command that appends to
a log file, so the tests read the order and the environment the hooks really
saw (docs/ARCHITECTURE.md, rule 3: every entered hook gets its after, in reverse order)."""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Iterator

import pytest

from agent.core.commands import Runner, clean_environment
from agent.config.model import Hook
from agent.core.errors import CommandError, HookError, Interrupted
from agent.engine.hooks import HookContext, around, describe_exception, hook_environment

# What every recording hook writes: who, when, and how it went.
_RECORD = 'echo "$0 $BACKUP_AGENT_STEP $BACKUP_AGENT_OUTCOME $BACKUP_AGENT_ERROR" >> "$1"'


class Stop(BaseException):
    """Not an Exception: stands for KeyboardInterrupt and its kin."""


def record(name: str, log: Path) -> tuple[str, ...]:
    """argv that appends '<name> <step> <outcome> <error>' to the log."""
    return ("/bin/sh", "-c", _RECORD, name, str(log))


def recording_hook(name: str, log: Path, *, around: str = "backup", critical: bool = True) -> Hook:
    return Hook(name=name, around=around, before=record(name, log), after=record(name, log), critical=critical)


def lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


class Warnings(list[str]):
    def __call__(self, message: str) -> None:
        self.append(message)


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "hooks.log"


@pytest.fixture
def warnings() -> Warnings:
    return Warnings()


def block_line(log: Path) -> None:
    with log.open("a") as stream:
        stream.write("block\n")


@pytest.fixture
def alarm() -> Iterator[None]:
    """SIGALRM raises Stop: an interruption that arrives while a hook runs."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Stop()

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------
# The environment (pure)


def test_environment_before_a_hook() -> None:
    context = HookContext(disk="usb1", repository="/mnt/usb1/host")
    assert hook_environment(context, "before_backup", None, None) == {
        "BACKUP_AGENT_DISK": "usb1",
        "BACKUP_AGENT_REPOSITORY": "/mnt/usb1/host",
        "BACKUP_AGENT_SNAPSHOT": "",
        "BACKUP_AGENT_STEP": "before_backup",
    }


def test_environment_after_success_and_after_failure() -> None:
    context = HookContext(disk="usb1", repository="/mnt/usb1/host", snapshot="2026-11-22T13-00-00+0100")
    success = hook_environment(context, "after_snapshot", "success", None)
    assert success["BACKUP_AGENT_OUTCOME"] == "success"
    assert success["BACKUP_AGENT_SNAPSHOT"] == "2026-11-22T13-00-00+0100"
    assert "BACKUP_AGENT_ERROR" not in success
    failure = hook_environment(context, "after_snapshot", "failure", "rsync failed\n  (exit status 11)\x00")
    assert failure["BACKUP_AGENT_OUTCOME"] == "failure"
    assert failure["BACKUP_AGENT_ERROR"] == "rsync failed (exit status 11)"


@pytest.mark.parametrize(
    ("step", "outcome", "error"),
    [
        ("before_rsync", None, None),
        ("after_backup", None, None),
        ("after_backup", "maybe", None),
        ("before_backup", "success", None),
        ("after_backup", "success", "an error on success"),
    ],
)
def test_environment_refuses_what_cannot_be_meant(step: str, outcome: str | None, error: str | None) -> None:
    with pytest.raises(ValueError):
        hook_environment(HookContext(), step, outcome, error)


def test_exceptions_are_described_on_one_line() -> None:
    assert describe_exception(ValueError("bad\nvalue")) == "ValueError: bad value"
    assert describe_exception(KeyboardInterrupt()) == "KeyboardInterrupt"
    assert describe_exception(Interrupted(signal.SIGTERM)) == "interrupted by SIGTERM"


# --------------------------------------------------------------------------
# Order


def test_befores_in_config_order_afters_in_reverse(log: Path, warnings: Warnings) -> None:
    hooks = [recording_hook(name, log) for name in ("a", "b", "c")]
    with around("backup", hooks, Runner(), HookContext(), warnings):
        block_line(log)
    assert [line.split()[:3] for line in lines(log)] == [
        ["a", "before_backup"],
        ["b", "before_backup"],
        ["c", "before_backup"],
        ["block"],
        ["c", "after_backup", "success"],
        ["b", "after_backup", "success"],
        ["a", "after_backup", "success"],
    ]
    assert warnings == []


def test_hook_with_only_before_or_only_after(log: Path, warnings: Warnings) -> None:
    hooks = [
        Hook(name="only-after", around="backup", after=record("only-after", log)),
        Hook(name="only-before", around="backup", before=record("only-before", log)),
    ]
    with around("backup", hooks, Runner(), HookContext(), warnings):
        block_line(log)
    assert lines(log) == ["only-before before_backup  ", "block", "only-after after_backup success "]


def test_stages_take_only_their_own_hooks(log: Path, warnings: Warnings) -> None:
    hooks = [
        recording_hook("service", log, around="backup"),
        recording_hook("dump", log, around="snapshot"),
        recording_hook("service2", log, around="backup"),
    ]
    with around("snapshot", hooks, Runner(), HookContext(), warnings):
        block_line(log)
    assert [line.split()[0] for line in lines(log)] == ["dump", "block", "dump"]

    log.unlink()
    with around("backup", hooks, Runner(), HookContext(), warnings):
        with around("snapshot", hooks, Runner(), HookContext(), warnings):
            block_line(log)
    assert [" ".join(line.split()[:2]) for line in lines(log)] == [
        "service before_backup",
        "service2 before_backup",
        "dump before_snapshot",
        "block",
        "dump after_snapshot",
        "service2 after_backup",
        "service after_backup",
    ]


def test_unknown_stage_is_refused(warnings: Warnings) -> None:
    with pytest.raises(ValueError, match="unknown hook stage 'transfer'"):
        with around("transfer", [], Runner(), HookContext(), warnings):
            pass


# --------------------------------------------------------------------------
# Environment seen by real hooks


def test_hooks_see_the_context_as_the_block_updates_it(tmp_path: Path, warnings: Warnings) -> None:
    dump = ("/bin/sh", "-c", 'env > "$1/$BACKUP_AGENT_STEP"', "sh", str(tmp_path))
    hooks = [Hook(name="env", around="snapshot", before=dump, after=dump)]
    context = HookContext(disk="usb1", repository="/mnt/usb1/host")
    with around("snapshot", hooks, Runner(), context, warnings):
        context.snapshot = "2026-11-22T13-00-00+0100"

    def seen(step: str) -> dict[str, str]:
        return dict(line.split("=", 1) for line in (tmp_path / step).read_text().splitlines())

    base = {**clean_environment(), "BACKUP_AGENT_DISK": "usb1", "BACKUP_AGENT_REPOSITORY": "/mnt/usb1/host"}
    before = seen("before_snapshot")
    before.pop("PWD", None)  # the shell adds it
    assert before == {**base, "BACKUP_AGENT_SNAPSHOT": "", "BACKUP_AGENT_STEP": "before_snapshot"}
    after = seen("after_snapshot")
    after.pop("PWD", None)
    assert after == {
        **base,
        "BACKUP_AGENT_SNAPSHOT": "2026-11-22T13-00-00+0100",
        "BACKUP_AGENT_STEP": "after_snapshot",
        "BACKUP_AGENT_OUTCOME": "success",
    }


# --------------------------------------------------------------------------
# A before-hook fails


def test_critical_before_failing_stops_and_runs_the_entered_afters_in_reverse(log: Path, warnings: Warnings) -> None:
    hooks = [
        recording_hook("a", log),
        Hook(name="tail", around="backup", after=record("tail", log)),
        Hook(name="db", around="backup", before=("/bin/false",), after=record("db", log)),
        recording_hook("c", log),
    ]
    ran = False
    with pytest.raises(HookError) as caught:
        with around("backup", hooks, Runner(), HookContext(), warnings):
            ran = True
    message = "backup hook 'db' failed: false failed (exit status 1); nothing was written"
    assert str(caught.value) == message
    assert caught.value.step == "before_backup"
    assert isinstance(caught.value.__cause__, CommandError)
    assert not ran
    assert lines(log) == [
        "a before_backup  ",
        f"tail after_backup failure {message}",
        f"a after_backup failure {message}",
    ]
    assert warnings == []


def test_missing_program_is_a_failed_before(log: Path, warnings: Warnings) -> None:
    hooks = [Hook(name="gone", around="snapshot", before=("/nonexistent/dump",))]
    with pytest.raises(HookError, match=r"snapshot hook 'gone' failed: /nonexistent/dump was not found"):
        with around("snapshot", hooks, Runner(), HookContext(), warnings):
            pytest.fail("the block ran after a critical hook failed")


def test_non_critical_before_failing_warns_and_skips_its_after(log: Path, warnings: Warnings) -> None:
    hooks = [
        recording_hook("a", log),
        Hook(name="b", around="backup", before=("/bin/false",), after=record("b", log), critical=False),
        recording_hook("c", log),
    ]
    with around("backup", hooks, Runner(), HookContext(), warnings):
        block_line(log)
    assert [line.split()[:2] for line in lines(log)] == [
        ["a", "before_backup"],
        ["c", "before_backup"],
        ["block"],
        ["c", "after_backup"],
        ["a", "after_backup"],
    ]
    assert len(warnings) == 1
    assert "backup hook 'b' failed" in warnings[0] and "exit status 1" in warnings[0]
    assert "\n" not in warnings[0]


@pytest.mark.parametrize("critical", [True, False])
def test_timeout_counts_as_failure(log: Path, warnings: Warnings, critical: bool) -> None:
    hooks = [
        recording_hook("a", log),
        # Hook.timeout is whole seconds from the config; the runner takes any float.
        Hook(
            name="slow",
            around="backup",
            before=("/bin/sleep", "5"),
            after=record("slow", log),
            timeout=0.3,  # type: ignore[arg-type]
            critical=critical,
        ),
    ]
    started = time.monotonic()
    if critical:
        with pytest.raises(HookError, match=r"backup hook 'slow' failed: sleep did not finish within 0.3 s"):
            with around("backup", hooks, Runner(kill_grace=1), HookContext(), warnings):
                block_line(log)
    else:
        with around("backup", hooks, Runner(kill_grace=1), HookContext(), warnings):
            block_line(log)
        assert len(warnings) == 1 and "did not finish within 0.3 s" in warnings[0]
    assert time.monotonic() - started < 3
    if critical:
        expected = ["a before_backup", "a after_backup failure"]
    else:
        expected = ["a before_backup", "block", "a after_backup success"]
    assert [" ".join(line.split()[:3]) for line in lines(log)] == expected


def test_interrupted_during_a_before_hook_still_runs_the_entered_afters(
    log: Path, warnings: Warnings, alarm: None
) -> None:
    hooks = [
        recording_hook("a", log),
        Hook(name="slow", around="backup", before=("/bin/sleep", "5"), after=record("slow", log)),
    ]
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    started = time.monotonic()
    with pytest.raises(Stop):
        with around("backup", hooks, Runner(kill_grace=1), HookContext(), warnings):
            block_line(log)
    assert time.monotonic() - started < 3
    assert lines(log) == ["a before_backup  ", "a after_backup failure Stop"]


# --------------------------------------------------------------------------
# The block fails


@pytest.mark.parametrize(
    ("exception", "told"),
    [
        (ValueError("disk\nfull"), "ValueError: disk full"),
        (Stop(), "Stop"),
        (KeyboardInterrupt(), "KeyboardInterrupt"),
        (Interrupted(signal.SIGTERM, step="transfer"), "interrupted by SIGTERM"),
    ],
)
def test_block_failing_runs_the_afters_with_the_error_and_reraises_it(
    log: Path, warnings: Warnings, exception: BaseException, told: str
) -> None:
    hooks = [recording_hook("a", log, around="snapshot"), recording_hook("b", log, around="snapshot")]
    with pytest.raises(type(exception)) as caught:
        with around("snapshot", hooks, Runner(), HookContext(), warnings):
            raise exception
    assert caught.value is exception
    assert lines(log) == [
        "a before_snapshot  ",
        "b before_snapshot  ",
        f"b after_snapshot failure {told}",
        f"a after_snapshot failure {told}",
    ]
    assert warnings == []


# --------------------------------------------------------------------------
# An after-hook fails


def failing_after(name: str, log: Path) -> Hook:
    """A hook whose after leaves a trace, then fails."""
    script = f'echo {name} >> "$1"; echo broken >&2; exit 3'
    return Hook(name=name, around="backup", after=("/bin/sh", "-c", script, "sh", str(log)))


def test_failing_after_is_a_warning_and_the_others_still_run(log: Path, warnings: Warnings) -> None:
    hooks = [recording_hook("a", log), failing_after("b", log), recording_hook("c", log)]
    with around("backup", hooks, Runner(), HookContext(), warnings):
        block_line(log)
    assert [line.split()[0] for line in lines(log)] == ["a", "c", "block", "c", "b", "a"]
    assert len(warnings) == 1
    assert warnings[0].startswith("backup hook 'b' failed after the backup: ")
    assert "exit status 3" in warnings[0] and "broken" in warnings[0]


def test_failing_after_never_masks_the_blocks_error(log: Path, warnings: Warnings) -> None:
    hooks = [recording_hook("a", log), failing_after("b", log), recording_hook("c", log)]
    error = ValueError("the transfer broke")
    with pytest.raises(ValueError) as caught:
        with around("backup", hooks, Runner(), HookContext(), warnings):
            raise error
    assert caught.value is error
    assert [line.split()[0] for line in lines(log)] == ["a", "c", "c", "b", "a"]
    assert len(warnings) == 1 and "'b'" in warnings[0]


def test_interrupted_during_an_after_hook_runs_the_rest_then_stops(
    log: Path, warnings: Warnings, alarm: None
) -> None:
    hooks = [
        recording_hook("a", log),
        Hook(name="slow", around="backup", after=("/bin/sleep", "5")),
    ]
    with pytest.raises(Stop):
        with around("backup", hooks, Runner(kill_grace=1), HookContext(), warnings):
            signal.setitimer(signal.ITIMER_REAL, 0.3)
    assert lines(log) == ["a before_backup  ", "a after_backup success "]
    assert len(warnings) == 1 and "'slow'" in warnings[0]


# --------------------------------------------------------------------------
# Dry run and logging


def test_dry_run_runs_nothing_and_says_what_it_would_run(
    log: Path, warnings: Warnings, caplog: pytest.LogCaptureFixture
) -> None:
    hooks = [
        recording_hook("a", log),
        Hook(name="db", around="backup", before=("/bin/false",), after=record("db", log)),
    ]
    caplog.set_level(logging.INFO, logger="agent")
    ran = False
    with around("backup", hooks, Runner(), HookContext(), warnings, dry_run=True):
        ran = True
    assert ran
    assert not log.exists()
    assert warnings == []
    said = [record.getMessage() for record in caplog.records if "would run" in record.getMessage()]
    assert len(said) == 4
    assert said[0].startswith("dry run: would run backup hook 'a' (before_backup): /bin/sh -c")
    assert said[1] == "dry run: would run backup hook 'db' (before_backup): /bin/false"
    assert said[2].startswith("dry run: would run backup hook 'db' (after_backup)")
    assert said[3].startswith("dry run: would run backup hook 'a' (after_backup)")


def test_each_run_is_logged_with_name_and_stage(
    log: Path, warnings: Warnings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent.engine.hooks")
    with around("snapshot", [recording_hook("dump", log, around="snapshot")], Runner(), HookContext(), warnings):
        pass
    said = [record.getMessage() for record in caplog.records if record.name == "agent.engine.hooks"]
    assert said == [
        "running snapshot hook 'dump' (before_snapshot)",
        "running snapshot hook 'dump' (after_snapshot)",
    ]
