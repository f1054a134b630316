"""The one runner: real processes, no mocks."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from agent.core.commands import Runner, clean_environment, describe_status, priority_prefix
from agent.core.errors import CommandError


def test_lines_end_at_newline_and_carriage_return() -> None:
    lines: list[str] = []
    Runner().run(["/bin/sh", "-c", r"printf 'a\rb\r\nc\n\nd'"], step="t", on_stdout=lines.append)
    assert lines == ["a", "b", "c", "d"]


def test_error_carries_the_stderr_tail_and_status() -> None:
    with pytest.raises(CommandError) as caught:
        Runner(stderr_tail=2).run(["/bin/sh", "-c", "echo one >&2; echo two >&2; echo three >&2; exit 3"], step="t")
    assert caught.value.returncode == 3
    assert caught.value.stderr_tail == ("two", "three")
    assert "exit status 3" in str(caught.value) and "three" in str(caught.value)


def test_exit_table_decides_what_is_an_error() -> None:
    result = Runner().run(["/bin/sh", "-c", "exit 24"], step="t", exit_table={0: ("ok", "ok"), 24: ("warning", "vanished")})
    assert (result.kind, result.meaning) == ("warning", "vanished")


def test_death_by_signal_is_named() -> None:
    assert describe_status(-9, {}) == ("error", "killed by SIGKILL")
    result = Runner().run(["/bin/sh", "-c", "kill -TERM $$"], step="t", check=False)
    assert result.meaning == "killed by SIGTERM"


def test_missing_program_says_how_to_fix() -> None:
    with pytest.raises(CommandError, match=r"/nonexistent/rsync was not found: install it, or set its path in the \[commands\]"):
        Runner().run(["/nonexistent/rsync"], step="t")


def test_environment_is_clean_plus_what_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LD_PRELOAD", "/tmp/evil.so")
    monkeypatch.setenv("PATH", "/tmp/evil:" + os.environ["PATH"])
    lines: list[str] = []
    Runner().run(["/usr/bin/env"], step="t", on_stdout=lines.append, env={"BACKUP_AGENT_STEP": "before_backup"})
    seen = dict(line.split("=", 1) for line in lines)
    assert seen == {**clean_environment(), "BACKUP_AGENT_STEP": "before_backup"}


def test_passed_descriptors_reach_the_child_and_no_other_does(tmp_path: Path) -> None:
    """A directory opened here is written through ``/proc/self/fd/N`` in the child, whatever its name is now."""
    (tmp_path / "d").mkdir()
    passed = os.open(tmp_path / "d", os.O_RDONLY | os.O_DIRECTORY)
    kept = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rename(tmp_path / "d", tmp_path / "renamed")
        script = f"echo via-fd > /proc/self/fd/{passed}/written; if ls /proc/self/fd/{kept} >/dev/null 2>&1; then echo leaked; fi"
        lines: list[str] = []
        Runner().run(["/bin/sh", "-c", script], step="t", pass_fds=(passed,), on_stdout=lines.append)
    finally:
        os.close(passed)
        os.close(kept)
    assert (tmp_path / "renamed" / "written").read_text() == "via-fd\n"
    assert lines == []


def test_timeout_stops_the_command_and_what_it_started(tmp_path: Path) -> None:
    marker = tmp_path / "child-alive"
    script = f"(sleep 2; touch {marker}) & sleep 5"
    started = time.monotonic()
    with pytest.raises(CommandError, match="did not finish within 0.3 s"):
        Runner(kill_grace=1).run(["/bin/sh", "-c", script], step="hook", timeout=0.3)
    assert time.monotonic() - started < 2
    time.sleep(2.3)
    assert not marker.exists(), "a child of the timed-out command kept running"


def test_dry_run_runs_only_what_changes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "made"
    runner = Runner(dry_run=True)
    assert runner.run(["/usr/bin/touch", str(target)], step="t").meaning == "not run (dry run)"
    assert not target.exists()
    lines: list[str] = []
    runner.run(["/bin/echo", "read-only"], step="t", mutating=False, on_stdout=lines.append)
    assert lines == ["read-only"]


def test_priority_prefix() -> None:
    assert priority_prefix("/usr/bin/ionice", "/usr/bin/nice", "idle", 19) == (
        "/usr/bin/ionice", "-c", "3", "/usr/bin/nice", "-n", "19")
    assert priority_prefix("/i", "/n", "none", 0) == ()
    assert priority_prefix("/i", "/n", "best-effort", None) == ("/i", "-c", "2")


def test_logs_carry_syslog_priorities_when_stderr_is_the_journal(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import REPO

    (tmp_path / "source").mkdir()
    journal = {**os.environ, "JOURNAL_STREAM": "8:12345", "BACKUP_AGENT_RUNTIME_DIR": str(tmp_path)}
    plain = {k: v for k, v in journal.items() if k != "JOURNAL_STREAM"}

    def backup(source: str, env: dict[str, str]) -> list[str]:
        argv = [sys.executable, "-m", "agent.cli", "backup", "-u", "-n", str(tmp_path / source), str(tmp_path / "repo")]
        return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=60).stderr.splitlines()

    ran = backup("source", journal)
    assert ran and all(line.startswith(("<6>", "<7>", "<4>")) for line in ran), ran  # info lines of a dry run
    failed = backup("missing", journal)
    assert failed[-1].startswith("<3>backup-agent: prepare failed: source"), failed
    assert not any(line.startswith("<") for line in backup("source", plain) + backup("missing", plain))


def test_the_commands_run_are_shown_with_verbose_only(tmp_path: Path) -> None:
    """The README ties "running: ARGV" to -v: at the default level it is not on stderr."""
    import subprocess
    import sys

    from tests.conftest import REPO

    (tmp_path / "source").mkdir()
    env = {**os.environ, "BACKUP_AGENT_RUNTIME_DIR": str(tmp_path)}
    env.pop("JOURNAL_STREAM", None)

    def backup(*options: str) -> str:
        argv = [sys.executable, "-m", "agent.cli", *options, "backup", "-u", "-n", str(tmp_path / "source"), str(tmp_path / "repo")]
        done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stderr

    assert "backup-agent: running: " not in backup()
    assert "backup-agent: running: " in backup("-v")  # -v before the subcommand, as a global option


def test_stdout_as_raw_chunks_keeps_every_byte_and_splits_nothing() -> None:
    # Binary output with line ends and \r, as a compressed or SQL dump holds.
    payload = bytes(range(256)) * 800  # 200 KiB: several pipe reads
    chunks: list[bytes] = []
    lines: list[str] = []
    Runner().run(
        ["/usr/bin/python3", "-c", "import sys; sys.stdout.buffer.write(bytes(range(256)) * 800)"],
        step="t",
        on_stdout=lines.append,
        on_stdout_data=chunks.append,
    )
    assert b"".join(chunks) == payload
    assert len(chunks) > 1
    assert lines == []


def test_a_failing_chunk_consumer_stops_the_command() -> None:
    def full(chunk: bytes) -> None:
        raise OSError(28, "No space left on device")

    started = time.monotonic()
    with pytest.raises(OSError):
        Runner(kill_grace=1).run(["/usr/bin/yes"], step="t", on_stdout_data=full)
    assert time.monotonic() - started < 5
