"""Command sources (``[[command_source]]``): a command's output stored in every snapshot.

A real program stands in for a database server: ``sqlite3 DB .dump`` of a
real SQLite database, which prints SQL text as ``mariadb-dump`` would. The
cycles are real (rsync, the layout, the manifest); nothing is faked.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import sqlite3
import sys
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]
from hypothesis import given, settings as hsettings, strategies as st

from agent.cli import main
from agent.config.load import load_settings
from agent.core.errors import ConfigError
from agent.config.model import CommandSource
from agent.config.validate import settings_from_mapping
from agent.core.commands import Runner
from agent.core.errors import EXIT_DAMAGED, HookError
from agent.core.events import Emitter, ErrorEvent, Event, StepEvent
from agent.engine.cycle import Cycle, Request
from agent.engine.sysstate.dumps import ComparingWriter
from agent.repository.store import Repository

SQLITE3 = shutil.which("sqlite3") or "/usr/bin/sqlite3"
FAST = '[backup]\nionice = "none"\nnice = 0\n[rotation]\nhourly = "always"\n'


# --------------------------------------------------------------------------
# The configuration (pure)


def _parse(table: dict[str, Any]) -> Any:
    return settings_from_mapping({"command_source": [table]}, "/etc/backup-agent/config.toml", hostname="h")


def test_a_command_source_is_read_with_its_defaults() -> None:
    settings = _parse({"name": "db", "command": ["/usr/bin/mariadb-dump", "--all-databases"], "file": "mariadb.sql"})
    assert settings.command_sources == (
        CommandSource(name="db", command=("/usr/bin/mariadb-dump", "--all-databases"), file="mariadb.sql"),
    )
    gz = _parse({"name": "db", "command": ["/usr/bin/x"], "file": "db.sql", "compress": "gzip", "critical": False, "timeout": "5m"})
    assert (gz.command_sources[0].file, gz.command_sources[0].critical, gz.command_sources[0].timeout) == ("db.sql.gz", False, 300)


@pytest.mark.parametrize(
    ("table", "named"),
    [
        ({"name": "db", "command": ["mariadb-dump"], "file": "a.sql"}, "command_source[0].command[0]"),
        ({"name": "db", "command": ["/usr/bin/x"], "file": "../etc/passwd"}, "command_source[0].file"),
        ({"name": "db", "command": ["/usr/bin/x"], "file": ".hidden"}, "command_source[0].file"),
        ({"name": "db", "command": ["/usr/bin/x"], "file": "a.sql", "compress": "xz"}, "command_source[0].compress"),
        ({"name": "db", "command": ["/usr/bin/x"]}, "command_source[0].file"),
        ({"name": "db", "command": ["/usr/bin/x"], "file": "a", "timeout": "0"}, "command_source[0].timeout"),
        ({"name": "db", "command": "/usr/bin/x", "file": "a"}, "command_source[0].command"),
        ({"name": "db", "command": ["/usr/bin/x"], "file": "a", "shell": True}, "command_source[0].shell"),
    ],
)
def test_bad_command_sources_are_refused_naming_the_key(table: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _parse(table)
    assert named in str(caught.value)


def test_the_example_config_s_command_source_is_valid() -> None:
    from tests.test_config import uncommented_block

    data = tomllib.loads(uncommented_block("# [[command_source]]"))
    (source,) = settings_from_mapping(data, "example.toml").command_sources
    assert (source.file, source.compress, source.timeout) == ("mariadb.sql.gz", "gzip", 3600)


def test_two_command_sources_may_not_share_a_file() -> None:
    with pytest.raises(ConfigError, match=r"command_source\[1\]\.file"):
        settings_from_mapping(
            {"command_source": [
                {"name": "a", "command": ["/usr/bin/x"], "file": "d.sql"},
                {"name": "b", "command": ["/usr/bin/y"], "file": "d.sql"},
            ]},
            "c.toml",
        )


def test_command_sources_are_read_as_root_only_from_a_file_root_controls(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip(reason="only root refuses an untrusted file")
    config = tmp_path / "config.toml"  # under /tmp: anyone may write there
    config.write_text('[[command_source]]\nname = "db"\ncommand = ["/bin/true"]\nfile = "d.sql"\n')
    with pytest.raises(ConfigError, match=r"command_source: got \[\[command_source\]\] in a file that root does not control"):
        load_settings(str(config))


# --------------------------------------------------------------------------
# Comparing while writing


def _written(old: bytes | None, chunks: list[bytes], tmp_path: Path) -> tuple[bool, bytes]:
    out_path, old_path = tmp_path / "out", tmp_path / "old"
    out_path.unlink(missing_ok=True)
    previous = None
    if old is not None:
        old_path.write_bytes(old)
        previous = os.open(old_path, os.O_RDONLY)
    out = os.open(out_path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        writer = ComparingWriter(out, previous)
        for chunk in chunks:
            writer.write(chunk)
        same = writer.finish()
    finally:
        os.close(out)
        if previous is not None:
            os.close(previous)
    return same, out_path.read_bytes()


@hsettings(max_examples=150, deadline=None)
@given(
    old=st.one_of(st.none(), st.binary(max_size=300)),
    new=st.binary(max_size=300),
    cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=6),
)
def test_the_output_is_stored_whole_unless_it_repeats_the_previous_copy(
    old: bytes | None, new: bytes, cuts: list[int], tmp_path_factory: pytest.TempPathFactory
) -> None:
    bounds = sorted({0, len(new), *(c for c in cuts if c <= len(new))})
    chunks = [new[a:b] for a, b in zip(bounds, bounds[1:])]
    same, stored = _written(old, chunks, tmp_path_factory.mktemp("w"))
    if old == new:
        assert same and stored == b""  # nothing written: the caller links the old copy
    else:
        assert not same and stored == new


def test_a_prefix_of_the_previous_copy_is_not_the_same(tmp_path: Path) -> None:
    assert _written(b"abcdef", [b"abc"], tmp_path) == (False, b"abc")
    assert _written(b"abc", [b"abc", b"def"], tmp_path) == (False, b"abcdef")


# --------------------------------------------------------------------------
# Real cycles with a real dump


def _database(path: Path, rows: int) -> None:
    with sqlite3.connect(path) as db:
        db.execute("create table if not exists t (id integer primary key, text)")
        db.executemany("insert into t (text) values (?)", [(f"row {i} " + "x" * 50,) for i in range(rows)])


def _settings(directory: Path, rsync: str, database: Path, *, compress: str = "none", critical: bool = True,
              command: list[str] | None = None) -> Any:
    config = directory / "config.toml"
    argv = command or [SQLITE3, str(database), ".dump"]
    config.write_text(
        FAST + f'[commands]\nrsync = "{rsync}"\n'
        f"[[command_source]]\nname = \"sqlite\"\ncommand = {json.dumps(argv)}\nfile = \"db.sql\"\n"
        f'compress = "{compress}"\ncritical = {"true" if critical else "false"}\n'
    )
    return load_settings(str(config))


def _backup(settings: Any, source: Path, repo: Path, events: list[Event] | None = None) -> Any:
    emitter = Emitter()
    if events is not None:
        emitter.subscribe(events.append)
    return Cycle(Request(settings=settings, source=str(source), repository=str(repo)), emitter, Runner()).run()


def _dump(repo: Path, name: str, file: str = "db.sql") -> Path:
    return repo / "snapshots" / name / ".backup-agent" / "commands" / file


@pytest.mark.integration
def test_a_sqlite_dump_is_stored_then_linked_while_unchanged_then_stored_again(
    tmp_path: Path, trusted_dir: Path, rsync_path: str
) -> None:
    source, repo, database = tmp_path / "source", tmp_path / "repo", tmp_path / "shop.sqlite"
    source.mkdir()
    (source / "file").write_text("data\n")
    _database(database, 2000)
    settings = _settings(trusted_dir, rsync_path, database)
    events: list[Event] = []
    first = _backup(settings, source, repo, events).snapshot
    second = _backup(settings, source, repo).snapshot
    # Unchanged: the second snapshot's copy is the first's inode.
    assert _dump(repo, second).stat().st_ino == _dump(repo, first).stat().st_ino
    recorded = Repository.open(str(repo)).read_metadata(second) or {}
    assert recorded["system_state"]["commands"]["sqlite"]["linked"] is True
    _database(database, 1)
    third = _backup(settings, source, repo).snapshot  # (rotation keeps one an hour: the second goes)

    expected = subprocess.run([SQLITE3, str(database), ".dump"], capture_output=True, check=True).stdout
    assert _dump(repo, third).read_bytes() == expected
    assert b"INSERT INTO t VALUES(2001," in expected
    # Changed: a new inode.
    assert _dump(repo, third).stat().st_ino != _dump(repo, first).stat().st_ino
    assert _dump(repo, first).stat().st_mode & 0o777 == 0o600
    assert (repo / "snapshots" / first / ".backup-agent" / "commands").stat().st_mode & 0o777 == 0o700
    # The step is announced between the transfer and the snapshot.
    steps = [e.step for e in events if isinstance(e, StepEvent) and e.state == "start"]
    assert steps.index("transfer") < steps.index("system-state") < steps.index("snapshot")
    # No partial file is left beside it.
    assert sorted(os.listdir(_dump(repo, third).parent)) == ["db.sql"]


@pytest.mark.integration
def test_a_gzip_dump_loads_back_into_sqlite_and_verify_checks_it(
    tmp_path: Path, trusted_dir: Path, rsync_path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    source, repo, database = tmp_path / "source", tmp_path / "repo", tmp_path / "shop.sqlite"
    source.mkdir()
    _database(database, 500)
    settings = _settings(trusted_dir, rsync_path, database, compress="gzip")
    first = _backup(settings, source, repo).snapshot
    second = _backup(settings, source, repo).snapshot
    dump = _dump(repo, second, "db.sql.gz")
    assert dump.stat().st_ino == _dump(repo, first, "db.sql.gz").stat().st_ino  # the same bytes: linked
    # Load it back as the README says: gunzip into sqlite3.
    restored = tmp_path / "restored.sqlite"
    subprocess.run([SQLITE3, str(restored)], input=gzip.decompress(dump.read_bytes()), check=True)
    with sqlite3.connect(restored) as db:
        assert db.execute("select count(*) from t").fetchone() == (500,)
    # The manifest covers it: a flipped byte is found by verify.
    data = bytearray(dump.read_bytes())
    data[len(data) // 2] ^= 0xFF
    dump.write_bytes(bytes(data))
    capsys.readouterr()
    status = main(["verify", "--repository", str(repo), second, "--json"])
    report = json.loads(capsys.readouterr().out)
    assert status == EXIT_DAMAGED
    assert ".backup-agent/commands/db.sql.gz" in json.dumps(report)


@pytest.mark.integration
def test_a_failed_critical_command_completes_no_snapshot_and_a_non_critical_one_warns(
    tmp_path: Path, trusted_dir: Path, rsync_path: str
) -> None:
    source, repo = tmp_path / "source", tmp_path / "repo"
    source.mkdir()
    missing = tmp_path / "absent" / "db.sqlite"  # sqlite3 cannot open it: exit status 1
    failing = [SQLITE3, "-bail", "-readonly", str(missing), ".dump"]
    critical = _settings(trusted_dir, rsync_path, missing, command=failing)
    events: list[Event] = []
    with pytest.raises(HookError, match="command source 'sqlite' failed.*no snapshot was completed"):
        _backup(critical, source, repo, events)
    errors = [e for e in events if isinstance(e, ErrorEvent)]
    assert errors and errors[0].step == "system-state" and errors[0].snapshots_untouched
    opened = Repository.open(str(repo))
    assert opened.snapshot_names() == []
    assert len(opened.in_progress_names()) == 1  # kept to resume from, as after any failed transfer
    leftover = Path(opened.in_progress_path(opened.in_progress_names()[0]))
    assert os.listdir(leftover / ".backup-agent" / "commands") == []  # no half-written dump

    lenient = _settings(trusted_dir, rsync_path, missing, command=failing, critical=False)
    outcome = _backup(lenient, source, repo)
    assert outcome.snapshot is not None
    assert any("command source 'sqlite' failed" in w and "not critical" in w for w in outcome.warnings)
    assert not _dump(repo, outcome.snapshot).exists()
    # That run resumed from the unfinished transfer (its .backup-agent/ did not get in the way) and discarded it.
    metadata = Repository.open(str(repo)).read_metadata(outcome.snapshot) or {}
    assert metadata["resumed_from"] == [leftover.name.removesuffix(".in-progress")]
    assert Repository.open(str(repo)).in_progress_names() == []


@pytest.mark.integration
def test_a_live_backup_agent_directory_of_the_source_never_mixes_with_the_captured_one(
    tmp_path: Path, trusted_dir: Path, rsync_path: str
) -> None:
    source, repo, database = tmp_path / "source", tmp_path / "repo", tmp_path / "shop.sqlite"
    (source / ".backup-agent" / "commands").mkdir(parents=True)
    (source / ".backup-agent" / "commands" / "db.sql").write_text("not a dump\n")
    _database(database, 3)
    name = _backup(_settings(trusted_dir, rsync_path, database), source, repo).snapshot
    assert b"CREATE TABLE t" in _dump(repo, name).read_bytes()


def test_a_dump_is_streamed_not_held(tmp_path: Path) -> None:
    """The writer gets the output in pipe-sized chunks (agent.core.commands), never whole."""
    sizes: list[int] = []
    Runner().run(["/usr/bin/head", "-c", str(4 * 1024 * 1024), "/dev/zero"], step="t", on_stdout_data=lambda c: sizes.append(len(c)))
    assert sum(sizes) == 4 * 1024 * 1024 and max(sizes) <= 65536


def test_the_desktop_names_the_step_and_what_to_do_when_it_fails() -> None:
    from agent.desktop.dbus.texts import failure_hint, step_words

    assert step_words("system-state") == "storing database dumps and the package lists"
    assert "command source" in failure_hint("system-state", 5)


class Stop(BaseException):
    """Stands for a stop (SIGTERM turned into an exception) that arrives while the dump runs."""


@pytest.mark.integration
def test_a_backup_stopped_while_dumping_leaves_no_partial_dump_and_the_next_one_completes(
    tmp_path: Path, trusted_dir: Path, rsync_path: str
) -> None:
    source, repo, marker = tmp_path / "source", tmp_path / "repo", tmp_path / "started"
    source.mkdir()
    (source / "file").write_text("data\n")
    slow = ["/bin/sh", "-c", f'echo "-- a partial dump"; touch {marker}; exec sleep 30']
    settings = _settings(trusted_dir, rsync_path, tmp_path / "unused", command=slow)

    def stop(signum: int, frame: Any) -> None:
        raise Stop()

    def stop_when_dumping() -> None:
        deadline = time.monotonic() + 20
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGALRM)  # handled in the main thread, where the cycle runs

    previous = signal.signal(signal.SIGALRM, stop)
    stopper = threading.Thread(target=stop_when_dumping)
    try:
        stopper.start()
        started = time.monotonic()
        with pytest.raises(Stop):
            _backup(settings, source, repo)
        assert time.monotonic() - started < 20  # the dump was stopped, not waited for
    finally:
        stopper.join()
        signal.signal(signal.SIGALRM, previous)
    assert marker.exists()  # it was stopped while dumping, after the transfer
    opened = Repository.open(str(repo))
    assert opened.snapshot_names() == []
    (leftover,) = opened.in_progress_names()
    assert os.listdir(Path(opened.in_progress_path(leftover)) / ".backup-agent" / "commands") == []

    database = tmp_path / "shop.sqlite"
    _database(database, 3)
    outcome = _backup(_settings(trusted_dir, rsync_path, database), source, repo)
    assert outcome.snapshot is not None and b"CREATE TABLE t" in _dump(repo, outcome.snapshot).read_bytes()
    assert Repository.open(str(repo)).in_progress_names() == []


@pytest.mark.integration
def test_a_dump_compressed_by_zstd_in_the_command_is_linked_while_unchanged_and_a_failing_dump_fails(
    tmp_path: Path, trusted_dir: Path, rsync_path: str
) -> None:
    """The README's way to another compressor: a shell with pipefail running the dump into zstd."""
    zstd = shutil.which("zstd")
    if zstd is None:
        pytest.skip(reason="zstd is not installed (scripts/test installs it)")
    source, repo, database = tmp_path / "source", tmp_path / "repo", tmp_path / "shop.sqlite"
    source.mkdir()
    _database(database, 300)
    piped = ["/bin/bash", "-o", "pipefail", "-c", f"{SQLITE3} {database} .dump | {zstd} -q"]
    settings = _settings(trusted_dir, rsync_path, database, command=piped)
    first, second = (_backup(settings, source, repo).snapshot for _ in range(2))
    assert _dump(repo, second).stat().st_ino == _dump(repo, first).stat().st_ino
    plain = subprocess.run([zstd, "-dqc", str(_dump(repo, second))], capture_output=True, check=True).stdout
    assert b"INSERT INTO t VALUES(300," in plain
    broken = ["/bin/bash", "-o", "pipefail", "-c", f"{SQLITE3} -bail {tmp_path}/absent/db .dump | {zstd} -q"]
    with pytest.raises(HookError):
        _backup(_settings(trusted_dir, rsync_path, database, command=broken), source, repo)


@pytest.mark.integration
def test_an_unchanged_dump_in_a_btrfs_repository_shares_its_extents_where_no_link_can_cross(
    btrfs_dir: Path, trusted_dir: Path, tmp_path: Path, rsync_path: str
) -> None:
    """Each snapshot of the btrfs layout is its own subvolume, and a hard link between two fails with EXDEV."""
    source, repo, database = tmp_path / "source", btrfs_dir / "repo", tmp_path / "shop.sqlite"
    source.mkdir()
    (source / "file").write_text("data\n")
    _database(database, 500)
    settings = _settings(trusted_dir, rsync_path, database)
    first = _backup(settings, source, repo).snapshot
    stored = _dump(repo, first).read_bytes()
    second = _backup(settings, source, repo).snapshot
    assert Repository.open(str(repo)).marker.layout == "btrfs" and first != second
    assert _dump(repo, second).read_bytes() == stored
    assert b"INSERT INTO t VALUES(500," in stored
    recorded = Repository.open(str(repo)).read_metadata(second) or {}
    assert recorded["system_state"]["commands"]["sqlite"]["linked"] is True
    assert _dump(repo, second).stat().st_mode & 0o777 == 0o600
