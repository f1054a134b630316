"""Durable before visible: the order of the system calls a backup makes, recorded by strace.

A power cut keeps only what reached the disk. The snapshot's files, its
metadata and manifest must be on the disk (syncfs) before the rename names
it complete; the rename and ``latest`` must be durable (fsync of their
directories) before rotation takes an old snapshot out of the listing (its
rename into .trash) and before success is reported; the old snapshot's files
are removed (rm) only after success was reported, so the result does not
wait for the slowest part of a run. strace records the real calls of the
real command; nothing is replaced.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.repository.store import Repository

pytestmark = pytest.mark.integration

OLD = "2020-01-01T00-00-00+0000"


def test_syncfs_rename_fsync_then_report_then_delete(tmp_path: Path, rsync_path: str) -> None:
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip(reason="strace is not installed: run scripts/test, which installs it")
    source = tmp_path / "source"
    source.mkdir()
    for index in range(5):
        (source / f"file-{index}").write_text(f"data {index}")
    repo = Repository.create(str(tmp_path / "repo"))
    os.mkdir(repo.snapshot_path(OLD))
    (Path(repo.snapshot_path(OLD)) / "old").write_text("old")
    config = tmp_path / "config.toml"
    config.write_text('[backup]\nionice = "none"\nnice = 0\n[rotation]\nhourly = 1\n')
    log = tmp_path / "strace.log"
    result = subprocess.run(
        [strace, "-f", "-qq", "-s", "120", "-o", str(log),
         "-e", "trace=syncfs,fsync,fdatasync,rename,renameat,renameat2,execve,write",
         sys.executable, "-m", "agent.cli", "backup", "--no-sudo", "--json", "--config", str(config), str(source), repo.root],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    made = repo.snapshot_names()
    assert OLD not in made and len(made) == 1
    new = made[0]
    calls = [re.sub(r"^\d+\s+", "", line) for line in log.read_text().splitlines()]

    def first(pattern: str, after: int = -1) -> int:
        for index, call in enumerate(calls):
            if index > after and re.search(pattern, call):
                return index
        raise AssertionError(f"no call matching {pattern!r} after #{after}:\n" + "\n".join(calls[-60:]))

    completed = first(rf'^rename(at2?)?\(.*{re.escape(new)}\.in-progress".*{re.escape(new)}"')
    synced = first(r"^syncfs\(")
    assert synced < completed, "the snapshot's data must reach the disk before its name says complete"
    # No fsync of the new snapshot's directory entries happens before: after the rename, both directories.
    latest = first(r'^rename(at2?)?\(.*latest\.new-\d+".*latest"', completed)
    durable = first(r"^fsync\(", latest)
    first(r"^fsync\(", durable)  # snapshots/ and the repository itself
    reported = first(r'^write\(1, .*\\"event\\":\\"complete\\"')
    trashed = first(rf'^rename(at2?)?\(.*{re.escape(OLD)}".*{re.escape(OLD)}\.[0-9a-f]+"')
    removed = first(r'^execve\("[^"]*/rm"', trashed)
    assert completed < latest < durable < trashed < reported < removed
    emptying = first(r'^write\(1, .*\\"step\\":\\"empty-trash\\".*\\"state\\":\\"start\\"', reported)
    assert emptying < removed
    assert os.listdir(repo.trash_dir) == []
