"""Tests of agent.core.lock's errors: who holds a lock is read from the error, not from its words.

Real flock locks on files in a temporary directory: a lock held through one
open file description refuses another, also within one process.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

from agent.core import lock
from agent.core.errors import EXIT_BUSY, BusyError, LockFileError


def _hold(path: str) -> None:
    with lock.hold(path, {"pid": 999999}):
        pass


def _probe(path: str) -> None:
    lock.probe(path)


TAKERS: dict[str, Callable[[str], None]] = {"hold": _hold, "probe": _probe}


@pytest.mark.parametrize("take", sorted(TAKERS))
def test_a_held_lock_names_its_holder_in_the_error(tmp_path: Path, take: str) -> None:
    path = str(tmp_path / "machine.lock")
    holder = {"pid": 4242, "started": "2026-11-22T13:00:00+01:00", "command": "eject", "disk": "backup"}
    with lock.hold(path, holder), pytest.raises(BusyError) as caught:
        TAKERS[take](path)
    error = caught.value
    assert not isinstance(error, LockFileError)
    assert error.holder == holder and error.pid == 4242
    assert error.step == "lock" and error.exit_code == EXIT_BUSY
    assert error.message.startswith("backup-agent eject is running (pid 4242, started 2026-11-22T13:00:00+01:00")


@pytest.mark.parametrize("take", sorted(TAKERS))
def test_a_lock_file_that_cannot_be_opened_is_its_own_error(tmp_path: Path, take: str) -> None:
    # A link in the lock's place is never followed (O_NOFOLLOW): the lock
    # cannot be opened, which says nothing about anyone holding it.
    path = tmp_path / "machine.lock"
    os.symlink(tmp_path / "elsewhere", path)
    with pytest.raises(LockFileError) as caught:
        TAKERS[take](str(path))
    error = caught.value
    assert isinstance(error, BusyError) and error.exit_code == EXIT_BUSY  # callers asking "busy?" see no change
    assert error.holder == {} and error.pid is None
    assert error.message.startswith(f"cannot open the lock file {path}: ")
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize(
    ("written", "pid"),
    [({"pid": 17}, 17), ({}, None), ({"pid": True}, None), ({"pid": 0}, None), ({"pid": -3}, None), ({"pid": "17"}, None)],
)
def test_the_holder_pid_is_only_a_plausible_one(tmp_path: Path, written: dict[str, object], pid: int | None) -> None:
    path = str(tmp_path / "repo.lock")
    with lock.hold(path, written), pytest.raises(BusyError) as caught:
        lock.probe(path)
    assert caught.value.pid == pid
