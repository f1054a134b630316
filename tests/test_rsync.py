"""Tests of agent.engine.rsync: pure functions on captured output, and real rsync runs.

Samples marked "rsync 3.5.0" were captured from ``rsync version 3.5.0
protocol version 32`` (/usr/bin/rsync) run with the flags of build_argv;
the integration tests capture fresh output from the installed rsync.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from agent.core.commands import Runner
from agent.engine.cycle import transfer_progress
from agent.core.errors import CommandError
from agent.engine.rsync import (
    CACHEDIR_SIGNATURE,
    EXIT_TABLE,
    ErrorCollector,
    Progress,
    ProgressParser,
    Stats,
    build_argv,
    cachedir_filter_rules,
    exclude_repository_rule,
    is_cachedir_tag,
    parse_stats,
    readable_name,
)

RSYNC = shutil.which("rsync") or "/usr/bin/rsync"
needs_rsync = pytest.mark.skipif(not os.path.exists(RSYNC), reason="rsync is not installed")

# --- exit table ------------------------------------------------------------

DOCUMENTED_ERRORS = (1, 2, 3, 4, 5, 6, 10, 11, 12, 13, 14, 20, 21, 22, 25, 30, 35)


def test_exit_table_kinds() -> None:
    assert EXIT_TABLE[0] == ("ok", "success")
    assert EXIT_TABLE[23] == ("partial", "some files could not be transferred")
    assert EXIT_TABLE[24] == ("warning", "some source files vanished during the transfer")
    for code in DOCUMENTED_ERRORS:
        kind, meaning = EXIT_TABLE[code]
        assert kind == "error", code
        assert meaning and meaning[0].islower() and not meaning.endswith("."), code
    assert set(EXIT_TABLE) >= {0, 23, 24, *DOCUMENTED_ERRORS}
    assert "timeout" in EXIT_TABLE[30][1]
    assert "file I/O" in EXIT_TABLE[11][1]


def _stand_in_rsync(tmp_path: Path, body: str) -> str:
    script = tmp_path / "rsync"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(script)


PERMISSION_ERROR = 'rsync: [sender] send_files failed to open "/x/y": Permission denied (13)'


@pytest.mark.parametrize(
    ("code", "kind", "meaning", "stderr"),
    [
        (0, "ok", "success", ()),
        (
            23,
            "partial",
            "some files could not be transferred",
            (
                PERMISSION_ERROR,
                "rsync error: some files/attrs were not transferred (see previous errors) (code 23) at main.c(1394) [sender=3.5.0]",
            ),
        ),
        (
            24,
            "warning",
            "some source files vanished during the transfer",
            (
                'file has vanished: "/x/z"',
                "rsync warning: some files vanished before they could be transferred (code 24) at main.c(1394) [sender=3.5.0]",
            ),
        ),
        (
            12,
            "error",
            EXIT_TABLE[12][1],
            ("rsync error: error in rsync protocol data stream (code 12) at io.c(232) [sender=3.5.0]",),
        ),
    ],
)
def test_exit_status_through_runner(
    tmp_path: Path, code: int, kind: str, meaning: str, stderr: tuple[str, ...]
) -> None:
    lines = "".join(f"echo '{line}' >&2\n" for line in stderr)
    program = _stand_in_rsync(tmp_path, f"{lines}exit {code}\n")
    result = Runner().run([program, "-a", "/a/", "/b/"], step="transfer", exit_table=EXIT_TABLE, check=False)
    assert result.returncode == code
    assert result.kind == kind
    assert result.meaning == meaning
    assert result.stderr_tail == stderr


def test_exit_status_error_raises_with_meaning(tmp_path: Path) -> None:
    program = _stand_in_rsync(tmp_path, "echo 'rsync error: timeout in data send/receive (code 30)' >&2\nexit 30\n")
    with pytest.raises(CommandError) as caught:
        Runner().run([program], step="transfer", exit_table=EXIT_TABLE)
    assert caught.value.returncode == 30
    assert "timeout while sending or receiving data" in caught.value.message
    # 23 is "partial": not raised even with check=True.
    program = _stand_in_rsync(tmp_path, "exit 23\n")
    assert Runner().run([program], step="transfer", exit_table=EXIT_TABLE).kind == "partial"


def test_exit_status_killed(tmp_path: Path) -> None:
    program = _stand_in_rsync(tmp_path, f"echo '{PERMISSION_ERROR}' >&2\nkill -KILL $$\n")
    result = Runner().run([program], step="transfer", exit_table=EXIT_TABLE, check=False)
    assert result.returncode == -9
    assert (result.kind, result.meaning) == ("error", "killed by SIGKILL")
    assert result.stderr_tail == (PERMISSION_ERROR,)


# --- build_argv ------------------------------------------------------------


def test_build_argv_full() -> None:
    argv = build_argv(
        rsync="/usr/bin/rsync",
        source="/home",
        target="/media/disk/host/snapshots/2026-11-22T14-00-00+0100.in-progress",
        link_dests=["/media/disk/host/snapshots/A", "/media/disk/host/snapshots/B.in-progress"],
        one_file_system=True,
        excludes=["*.tmp", "/home/*/.cache", "name with space"],
        filter_rules=["--include=/a/b/CACHEDIR.TAG", "--exclude=/a/b/*"],
        io_timeout=300,
        dry_run=True,
        priority_prefix=["/usr/bin/ionice", "-c", "3", "/usr/bin/nice", "-n", "19"],
    )
    assert argv == (
        "/usr/bin/ionice",
        "-c",
        "3",
        "/usr/bin/nice",
        "-n",
        "19",
        "/usr/bin/rsync",
        "--archive",
        "--hard-links",
        "--acls",
        "--xattrs",
        "--numeric-ids",
        "--one-file-system",
        "--info=progress2",
        "--itemize-changes",
        "--stats",
        "--no-human-readable",
        "--link-dest=/media/disk/host/snapshots/A",
        "--link-dest=/media/disk/host/snapshots/B.in-progress",
        "--timeout=300",
        "--dry-run",
        "--include=/a/b/CACHEDIR.TAG",
        "--exclude=/a/b/*",
        "--exclude=*.tmp",
        "--exclude=/home/*/.cache",
        "--exclude=name with space",
        "/home/",
        "/media/disk/host/snapshots/2026-11-22T14-00-00+0100.in-progress/",
    )
    assert isinstance(argv, tuple)


def test_build_argv_minimal() -> None:
    argv = build_argv(rsync="rsync", source="/", target="/t/", link_dests=(), one_file_system=False, excludes=())
    assert argv == (
        "rsync",
        "--archive",
        "--hard-links",
        "--acls",
        "--xattrs",
        "--numeric-ids",
        "--info=progress2",
        "--itemize-changes",
        "--stats",
        "--no-human-readable",
        "/",
        "/t/",
    )


def test_build_argv_twenty_link_dests() -> None:
    dests = [f"/r/snapshots/{i}" for i in range(20)]
    argv = build_argv(rsync="rsync", source="/s", target="/t", link_dests=dests, one_file_system=True, excludes=())
    assert [a for a in argv if a.startswith("--link-dest=")] == [f"--link-dest={d}" for d in dests]
    with pytest.raises(ValueError, match="at most 20"):
        build_argv(rsync="rsync", source="/s", target="/t", link_dests=dests + ["/r/x"], one_file_system=True, excludes=())


@pytest.mark.parametrize(
    "changes",
    [
        {"source": "home"},
        {"source": ""},
        {"target": "snap/"},
        {"link_dests": ["/ok", "relative"]},
        {"io_timeout": -1},
        {"filter_rules": ["/a/b"]},
        {"filter_rules": ["-a"]},
        {"excludes": ["!"]},
        {"excludes": ["+ keep"]},
        {"excludes": ["- drop"]},
        {"excludes": [""]},
        {"rsync": ""},
    ],
)
def test_build_argv_refuses(changes: dict[str, object]) -> None:
    arguments: dict[str, object] = dict(
        rsync="rsync", source="/s", target="/t", link_dests=(), one_file_system=True, excludes=()
    )
    arguments.update(changes)
    with pytest.raises(ValueError):
        build_argv(**arguments)  # type: ignore[arg-type]


def test_build_argv_accepts_lookalike_excludes() -> None:
    argv = build_argv(
        rsync="rsync", source="/s", target="/t", link_dests=(), one_file_system=True, excludes=["!x", "-x", "+x", "[+] x"]
    )
    assert argv[-6:-2] == ("--exclude=!x", "--exclude=-x", "--exclude=+x", "--exclude=[+] x")


# --- progress --------------------------------------------------------------

# rsync 3.5.0, default human-readable level (thousands separators), a 3 MB
# file, 200 small ones and one hard link: the stdout split at \r and \n.
PROGRESS_SAMPLE_SEPARATORS = [
    "         32,768   0%    0.00kB/s    0:00:00  ",
    "      3,000,000  42%  707.44MB/s    0:00:00 (xfr#1, to-chk=202/205)",
    "      3,005,000  42%  566.91MB/s    0:00:00 (xfr#2, to-chk=200/205)",
    "      4,000,000  57%  135.12MB/s    0:00:00 (xfr#201, to-chk=1/205)",
    "      4,000,000  57%  135.12MB/s    0:00:00 (xfr#201, to-chk=201/205)",
    "      4,000,000  57%  114.65MB/s    0:00:00 (xfr#201, to-chk=0/205)  ",
]

# rsync 3.5.0 with --no-human-readable --bwlimit=1000, 3 MB + 2 MB: updates
# inside a file (estimated time left) and at the end of each file (time
# elapsed since the start).
PROGRESS_SAMPLE_SLOW = [
    "          32768   0%    0.00kB/s    0:00:00  ",
    "        1081344  21% 1000.98kB/s    0:00:03  ",
    "        2129920  42% 1000.98kB/s    0:00:02  ",
    "        3000000  60%    1.01MB/s    0:00:02 (xfr#1, to-chk=1/3)",
    "        3163840  63% 1000.55kB/s    0:00:01  ",
    "        5000000 100% 1000.58kB/s    0:00:04 (xfr#2, to-chk=0/3)",
]

# rsync 3.5.0, 300 directories of 10 files: incremental recursion.
PROGRESS_SAMPLE_INCREMENTAL = [
    "              3   0%    0.00kB/s    0:00:00 (xfr#1, ir-chk=1009/1311)",
    "           1965  28%  239.50kB/s    0:00:00 (xfr#397, ir-chk=1003/1701)",
    "          10965  77%   65.27kB/s    0:00:00 (xfr#2197, to-chk=803/3301)",
]


def test_progress_separators_and_monotonic_checked() -> None:
    parser = ProgressParser()
    got = [parser.feed(line) for line in PROGRESS_SAMPLE_SEPARATORS]
    assert got[0] == Progress(32768, 0, 0.0, None, 0, None, None)
    assert got[1] == Progress(3_000_000, 42, 707.44 * 1024**2, 0, 1, 3, 205)
    # Positions 3, 5, 204, 4, 205: each shown once the next one confirms it
    # (the median of the last three), so the position is one record late.
    assert got[2] is not None and (got[2].files, got[2].checked) == (2, 3)
    assert got[3] is not None and (got[3].bytes, got[3].files, got[3].checked, got[3].total) == (4_000_000, 201, 5, 205)
    # rsync goes back to to-chk=201/205 for the directories: checked does not.
    assert got[4] is not None and got[4].checked == 5
    # Nothing left to check: all of them.
    assert got[5] is not None and got[5].checked == 205 and got[5].rate == pytest.approx(114.65 * 1024**2)


# rsync 3.5.0, -aH --info=progress2 --bwlimit=3000, 12 files of 1 MB in
# photos/ and 15 small ones in docs/a/, the first snapshot: after the first
# (small) file rsync prints to-chk=12/32 once, between 26/32 and 25/32.
PROGRESS_SAMPLE_JUMP_AHEAD = [
    "              0   0%    0.00kB/s    0:00:00 (xfr#0, to-chk=27/32)",
    "              2   0%    0.00kB/s    0:00:00 (xfr#1, to-chk=26/32)",
    "              2   0%    0.00kB/s    0:00:00 (xfr#1, to-chk=12/32)",
    "              5   0%    2.93kB/s    0:00:00 (xfr#2, to-chk=25/32)",
    "              8   0%    5.86kB/s    0:00:00 (xfr#3, to-chk=24/32)",
]


def test_progress_drops_a_position_out_of_order() -> None:
    parser = ProgressParser()
    got = [parser.feed(line) for line in PROGRESS_SAMPLE_JUMP_AHEAD]
    # Taken as it came, the third record would say 20 of 32 checked (62%)
    # with one file copied, and checked would stay there.
    assert [p.checked if p else "-" for p in got] == [5, 5, 6, 7, 8]


def test_progress_eta_inside_and_at_end_of_file() -> None:
    parser = ProgressParser()
    got = [parser.feed(line) for line in PROGRESS_SAMPLE_SLOW]
    assert [p.eta if p else "-" for p in got] == [None, 3, 2, round(2 * 40 / 60), 1, 0]
    assert [p.files if p else "-" for p in got] == [0, 0, 0, 1, 1, 2]
    assert [p.checked if p else "-" for p in got] == [None, None, None, 2, 2, 3]
    assert [p.total if p else "-" for p in got] == [None, None, None, 3, 3, 3]
    assert [p.percent if p else "-" for p in got] == [0, 21, 42, 60, 63, 100]
    assert got[1] is not None and got[1].rate == pytest.approx(1000.98 * 1024)
    assert got[3] is not None and got[3].rate == pytest.approx(1.01 * 1024**2)


def test_progress_incremental_recursion() -> None:
    parser = ProgressParser()
    got = [parser.feed(line) for line in PROGRESS_SAMPLE_INCREMENTAL]
    assert got[0] == Progress(3, 0, 0.0, None, 1, 302, 1311, scanning=True)
    # Each position shown once the next one confirms it.
    assert got[1] == Progress(1965, 28, 239.5 * 1024, None, 397, 302, 1701, scanning=True)
    assert got[2] == Progress(10965, 77, 65.27 * 1024, 0, 2197, 698, 3301, scanning=False)


def test_progress_example_from_the_brief_and_units() -> None:
    parser = ProgressParser()
    assert parser.feed("    123,456,789  45%   12.34MB/s    0:01:02 (xfr#12, ir-chk=1000/2000)") == Progress(
        123456789, 45, 12.34 * 1024**2, None, 12, 1000, 2000, scanning=True
    )
    # A locale with '.' for thousands and ',' for decimals; GB/s, TB/s; hours.
    got = parser.feed("    123.456.789  50%   1,50GB/s  101:02:03  ")
    assert got == Progress(123456789, 50, 1.5 * 1024**3, 101 * 3600 + 2 * 60 + 3, 12, 1000, 2000, scanning=True)
    got = parser.feed("  5 100%    2.00TB/s      ??:??:??  ")
    assert got is not None and got.rate == 2 * 1024**4 and got.eta is None
    # rsync 3.0's wording.
    got = parser.feed("     1048576 100%   10.00MB/s    0:00:00 (xfer#3, to-check=5/10)")
    assert got is not None and (got.files, got.checked, got.total, got.scanning) == (3, 5, 10, False)


@pytest.mark.parametrize(
    "line",
    [
        "",
        "Number of files: 205 (reg: 202, dir: 3)",
        "sent 4012831 bytes  received 3873 bytes  8033408.00 bytes/sec",
        "total size is 7000000  speedup is 1.74",
        "sending incremental file list",
        "a/f1",
        "12345  45%",
        "12345  45%  1.00XB/s  0:00:01",
        "1,23,4  45%  1.00kB/s  0:00:01",
    ],
)
def test_progress_ignores_other_lines(line: str) -> None:
    assert ProgressParser().feed(line) is None


# --- stats -----------------------------------------------------------------

# rsync 3.5.0, default human-readable level (thousands separators).
STATS_SAMPLE = """\
      4,000,000  57%  114.65MB/s    0:00:00 (xfr#201, to-chk=0/205)

Number of files: 50,123 (reg: 50,000, dir: 120, link: 3)
Number of created files: 204 (reg: 202, dir: 2)
Number of deleted files: 0
Number of regular files transferred: 201
Total file size: 7,000,000 bytes
Total transferred file size: 4,000,000 bytes
Literal data: 3,999,000 bytes
Matched data: 1,000 bytes
File list size: 2,345
File list generation time: 0.001 seconds
File list transfer time: 0.000 seconds
Total bytes sent: 4,012,831
Total bytes received: 3,873

sent 4,012,831 bytes  received 3,873 bytes  8,033,408.00 bytes/sec
total size is 7,000,000  speedup is 1.74
""".splitlines()

# rsync 3.5.0 with --no-human-readable, second snapshot with --link-dest.
STATS_SAMPLE_PLAIN = """\
Number of files: 3 (reg: 2, dir: 1)
Number of created files: 0
Number of deleted files: 0
Number of regular files transferred: 0
Total file size: 5000000 bytes
Total transferred file size: 0 bytes
Literal data: 0 bytes
Matched data: 0 bytes
File list size: 0
Total bytes sent: 98
Total bytes received: 12
""".splitlines()


def test_parse_stats_with_separators() -> None:
    stats = parse_stats(STATS_SAMPLE)
    assert stats == Stats(
        files=50123,
        regular_files=50000,
        directories=120,
        created_files=204,
        transferred_files=201,
        total_size=7_000_000,
        transferred_size=4_000_000,
        literal_data=3_999_000,
        matched_data=1000,
        bytes_sent=4_012_831,
        bytes_received=3873,
        deleted_files=0,
        file_list_size=2345,
    )
    assert stats.as_dict()["files"] == 50123
    assert stats.as_dict()["bytes_received"] == 3873
    assert all(isinstance(value, int) for value in stats.as_dict().values())


def test_parse_stats_plain_and_absent() -> None:
    stats = parse_stats(STATS_SAMPLE_PLAIN)
    assert (stats.files, stats.regular_files, stats.directories) == (3, 2, 1)
    assert (stats.total_size, stats.transferred_size, stats.bytes_sent, stats.bytes_received) == (5000000, 0, 98, 12)
    assert parse_stats([]) == Stats()
    assert parse_stats(["Number of files: 0"]) == Stats()
    assert set(Stats().as_dict().values()) == {0}
    # A human-readable number (-h) is not a number we understand: left at 0.
    assert parse_stats(["Total file size: 7.00M bytes"]).total_size == 0


# --- stderr ----------------------------------------------------------------

# rsync 3.5.0 as an unprivileged user, with an unreadable file and directory
# and a target it does not own; then a run where files were deleted meanwhile.
STDERR_PERMISSION = [
    'rsync: [sender] opendir "/tmp/et/src/closed" failed: Permission denied (13)',
    'rsync: [generator] failed to set permissions on "/tmp/et/dst/.": Operation not permitted (1)',
    'rsync: [sender] send_files failed to open "/tmp/et/src/secret": Permission denied (13)',
    "rsync error: some files/attrs were not transferred (see previous errors) (code 23) at main.c(1394) [sender=3.5.0]",
]
STDERR_VANISHED = [
    'file has vanished: "/tmp/vt/src/f30"',
    'file has vanished: "/tmp/vt/src/f31"',
    "rsync warning: some files vanished before they could be transferred (code 24) at main.c(1394) [sender=3.5.0]",
]


def test_error_collector_counts_per_file_errors() -> None:
    collector = ErrorCollector()
    for line in STDERR_PERMISSION + STDERR_VANISHED:
        collector.feed(line)
    assert collector.count == 3
    assert collector.first == tuple(STDERR_PERMISSION[:3])
    assert collector.vanished == 2


def test_error_collector_keeps_first_ten() -> None:
    collector = ErrorCollector()
    assert (collector.count, collector.first, collector.vanished) == (0, (), 0)
    for index in range(25):
        collector.feed(f'rsync: [sender] send_files failed to open "/x/{index}": Permission denied (13)')
    collector.feed("")
    collector.feed("some unrelated line")
    assert collector.count == 25
    assert len(collector.first) == 10
    assert collector.first[0].endswith('"/x/0": Permission denied (13)')
    assert collector.first[-1].endswith('"/x/9": Permission denied (13)')


# --- CACHEDIR.TAG and the repository ----------------------------------------


def test_is_cachedir_tag() -> None:
    assert CACHEDIR_SIGNATURE == b"Signature: 8a477f597d28d172789f06886806bc55"
    assert len(CACHEDIR_SIGNATURE) == 43
    assert is_cachedir_tag(CACHEDIR_SIGNATURE)
    assert is_cachedir_tag(CACHEDIR_SIGNATURE + b"\n# This file is a cache directory tag.\n")
    assert not is_cachedir_tag(CACHEDIR_SIGNATURE[:-1])
    assert not is_cachedir_tag(b"signature: 8a477f597d28d172789f06886806bc55")
    assert not is_cachedir_tag(b" " + CACHEDIR_SIGNATURE)
    assert not is_cachedir_tag(b"")


def test_cachedir_filter_rules_escaping() -> None:
    assert cachedir_filter_rules("/src", ["/src/a/b"]) == ("--include=/a/b/CACHEDIR.TAG", "--exclude=/a/b/*")
    assert cachedir_filter_rules("/src/", ["/src/a/b/"]) == ("--include=/a/b/CACHEDIR.TAG", "--exclude=/a/b/*")
    assert cachedir_filter_rules("/", ["/var/cache"]) == ("--include=/var/cache/CACHEDIR.TAG", "--exclude=/var/cache/*")
    assert cachedir_filter_rules("/src", ["/src"]) == ("--include=/CACHEDIR.TAG", "--exclude=/*")
    # No wildcard in the include: the backslash stays literal there, but the
    # exclude has its '*' and so needs the backslash escaped.
    assert cachedir_filter_rules("/src", ["/src/a\\b c"]) == ("--include=/a\\b c/CACHEDIR.TAG", "--exclude=/a\\\\b c/*")
    assert cachedir_filter_rules("/src", ["/src/x*?[\\]"]) == (
        "--include=/x\\*\\?\\[\\\\]/CACHEDIR.TAG",
        "--exclude=/x\\*\\?\\[\\\\]/*",
    )
    assert cachedir_filter_rules("/src", []) == ()
    with pytest.raises(ValueError):
        cachedir_filter_rules("/src", ["/srcx/a"])
    with pytest.raises(ValueError):
        cachedir_filter_rules("/src", ["a/b"])
    with pytest.raises(ValueError):
        cachedir_filter_rules("src", ["/src/a"])


def test_exclude_repository_rule() -> None:
    assert exclude_repository_rule("/", "/media/disk/host") == ("--exclude=/media/disk/host",)
    assert exclude_repository_rule("/home", "/home/backup/host/") == ("--exclude=/backup/host",)
    assert exclude_repository_rule("/home", "/home/b*k") == ("--exclude=/b\\*k",)
    assert exclude_repository_rule("/home", "/home/b\\k") == ("--exclude=/b\\k",)
    assert exclude_repository_rule("/home", "/media/disk") == ()
    assert exclude_repository_rule("/home", "/home2/backup") == ()
    assert exclude_repository_rule("/home/user", "/home") == ()
    with pytest.raises(ValueError):
        exclude_repository_rule("/home", "/home/")
    with pytest.raises(ValueError):
        exclude_repository_rule("/home", "backup")


# --- with the real rsync ------------------------------------------------------

WEIRD_NAMES = ["plain", "st*ar", "q?m", "br[ack]et", "back\\slash", "sp ace", "all *?[\\ ] mix", "- dash", "+ plus"]


def _write(path: Path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _files(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*") if not path.is_dir()}


def _transfer(argv: tuple[str, ...]) -> tuple[list[str], list[str]]:
    stdout: list[str] = []
    stderr: list[str] = []
    Runner().run(argv, step="transfer", exit_table=EXIT_TABLE, on_stdout=stdout.append, on_stderr=stderr.append)
    return stdout, stderr


@pytest.mark.integration
@needs_rsync
def test_cachedir_rules_with_real_rsync(tmp_path: Path) -> None:
    source, target = tmp_path / "src", tmp_path / "dst"
    tag = CACHEDIR_SIGNATURE + b"\n# a cache\n"
    tagged = []
    for name in WEIRD_NAMES:
        directory = source / name / name
        _write(directory / "CACHEDIR.TAG", tag)
        _write(directory / "data")
        _write(directory / ".hidden")
        _write(directory / "sub" / "deep")
        tagged.append(str(directory))
    # Untagged neighbours that a pattern with a wrong escaping would also hit.
    for name in ["stXar", "qXm", "b", "backslash", "all Xxx  ] mix"]:
        _write(source / name / name / "data")
    for name in ["st*ar", "q?m", "b", "back\\slash"]:
        for neighbour in ["stXar", "qXm", "b", "backslash"]:
            _write(source / name / neighbour / "data")
    # An invalid signature: copied whole.
    _write(source / "fake" / "CACHEDIR.TAG", b"Signature: 00000000000000000000000000000000\n")
    _write(source / "fake" / "data")
    _write(source / "top")

    rules = cachedir_filter_rules(str(source), tagged)
    argv = build_argv(
        rsync=RSYNC,
        source=str(source),
        target=str(target),
        link_dests=(),
        one_file_system=True,
        excludes=["*.never"],
        filter_rules=rules,
    )
    _transfer(argv)
    expected = _files(source)
    for name in WEIRD_NAMES:
        expected -= {f"{name}/{name}/data", f"{name}/{name}/.hidden", f"{name}/{name}/sub/deep"}
    assert _files(target) == expected
    for name in WEIRD_NAMES:
        assert (target / name / name / "CACHEDIR.TAG").read_bytes() == tag
        assert (target / name / name).is_dir()
    assert (target / "fake" / "data").exists()


@pytest.mark.integration
@needs_rsync
def test_repository_inside_source_is_excluded(tmp_path: Path) -> None:
    source = tmp_path / "root"
    repository = source / "media" / "disk [1]" / "host"
    _write(source / "etc" / "hostname")
    _write(source / "media" / "disk [1]" / "other")
    _write(repository / "snapshots" / "old" / "etc" / "hostname")
    target = repository / "snapshots" / "new.in-progress"
    target.mkdir()
    argv = build_argv(
        rsync=RSYNC,
        source=str(source),
        target=str(target),
        link_dests=(),
        one_file_system=False,
        excludes=(),
        filter_rules=exclude_repository_rule(str(source), str(repository)),
    )
    _transfer(argv)
    assert _files(target) == {"etc/hostname", "media/disk [1]/other"}
    assert (target / "media" / "disk [1]").is_dir()
    assert not (target / "media" / "disk [1]" / "host").exists()


@pytest.mark.integration
@needs_rsync
def test_real_transfer_progress_stats_and_link_dest(tmp_path: Path) -> None:
    source = tmp_path / "src"
    for index in range(30):
        _write(source / f"d{index % 3}" / f"f{index}", bytes(1000 + index))
    _write(source / "big", os.urandom(200_000))
    os.link(source / "big", source / "big-link")
    snapshots = tmp_path / "snapshots"
    snapshots.mkdir()
    first, second = snapshots / "1", snapshots / "2.in-progress"

    stdout, stderr = _transfer(
        build_argv(rsync=RSYNC, source=str(source), target=str(first), link_dests=(), one_file_system=True, excludes=())
    )
    assert stderr == []
    parser = ProgressParser()
    progress = [p for p in map(parser.feed, stdout) if p is not None]
    assert progress, stdout
    last = progress[-1]
    assert (last.files, last.checked, last.total, last.scanning) == (31, 36, 36, False)
    assert last.bytes == sum(1000 + index for index in range(30)) + 200_000
    stats = parse_stats(stdout)
    # percent is bytes sent of the total size: the hard link is never sent.
    assert last.percent == int(100 * last.bytes / stats.total_size) < 100
    assert (stats.files, stats.regular_files, stats.directories) == (36, 32, 4)
    assert stats.created_files == 36
    assert stats.transferred_files == 31  # the hard link is made, not sent
    assert stats.total_size == sum(1000 + index for index in range(30)) + 2 * 200_000
    assert stats.transferred_size == stats.literal_data == last.bytes

    stdout, stderr = _transfer(
        build_argv(
            rsync=RSYNC, source=str(source), target=str(second), link_dests=[str(first)], one_file_system=True, excludes=()
        )
    )
    assert stderr == []
    stats = parse_stats(stdout)
    # rsync 3.5.0 does not count what it finds in a --link-dest as created.
    assert (stats.files, stats.created_files, stats.transferred_files, stats.transferred_size) == (36, 0, 0, 0)
    assert os.stat(second / "big").st_ino == os.stat(first / "big").st_ino
    assert os.stat(second / "big-link").st_ino == os.stat(first / "big").st_ino
    parser = ProgressParser()
    last_progress = [p for p in map(parser.feed, stdout) if p is not None][-1]
    # Nothing transferred: bytes and percent stay 0, the checked files tell the progress.
    assert (last_progress.bytes, last_progress.percent) == (0, 0)
    assert (last_progress.checked, last_progress.total) == (36, 36)


@pytest.mark.integration
@needs_rsync
def test_progress_arrives_while_rsync_runs(tmp_path: Path) -> None:
    """Through a pipe, progress records arrive during a slow transfer, not at the end."""
    source = tmp_path / "src"
    _write(source / "slow", os.urandom(60_000))
    argv = build_argv(
        rsync=RSYNC, source=str(source), target=str(tmp_path / "dst"), link_dests=(), one_file_system=True, excludes=()
    )
    argv += ("--bwlimit=30",)  # KiB/s: about 2 seconds
    parser = ProgressParser()
    seen: list[tuple[float, Progress]] = []

    def on_stdout(line: str) -> None:
        progress = parser.feed(line)
        if progress is not None:
            seen.append((time.monotonic(), progress))

    Runner().run(argv, step="transfer", exit_table=EXIT_TABLE, on_stdout=on_stdout)
    finished = time.monotonic()
    assert seen[-1][1].percent == 100
    early = [progress for when, progress in seen if finished - when > 0.5]
    assert early, [(finished - when, progress) for when, progress in seen]
    assert early[0].percent < 100


def _progress_of(argv: tuple[str, ...]) -> list[Progress]:
    """Every progress record of a real rsync run, parsed as the cycle parses them."""
    parser = ProgressParser()
    seen: list[Progress] = []

    def on_stdout(line: str) -> None:
        progress = parser.feed(line)
        if progress is not None:
            seen.append(progress)

    Runner().run(argv, step="transfer", exit_table=EXIT_TABLE, on_stdout=on_stdout)
    return seen


@pytest.mark.integration
@needs_rsync
def test_the_percent_counts_bytes_when_every_file_is_copied_and_files_when_most_are_linked(tmp_path: Path) -> None:
    """30 small files, then one large one: while it copies, 30 of 34 files are done but few of the bytes."""
    source = tmp_path / "src"
    for index in range(30):
        _write(source / "a" / f"f{index:02d}", os.urandom(1000))
    big = 600_000
    _write(source / "z" / "big.bin", os.urandom(big))
    first, second = tmp_path / "1", tmp_path / "2"
    argv = build_argv(rsync=RSYNC, source=str(source), target=str(first), link_dests=(), one_file_system=True, excludes=())
    seen = _progress_of(argv + ("--bwlimit=200",))  # KiB/s: the large file takes about 3 s
    total = 30 * 1000 + big
    # The first snapshot copies everything: the percent is rsync's, the bytes sent of the total size ...
    for update in seen:
        assert transfer_progress(update, 1.0, copies_all=True)[0] == update.percent
    copying = [u for u in seen if u.files == 30 and 30_000 < u.bytes < total // 2]
    assert copying, seen
    for update in copying:
        assert update.percent == 100 * update.bytes // total < 50
        # ... where the share of files checked would be far ahead of the work done
        assert transfer_progress(update, 1.0)[0] >= 80
    assert transfer_progress(seen[-1], 3.0, copies_all=True) == (100, 0)

    # With a snapshot to link to, nearly nothing is sent: rsync's percent stays near 0, files checked tell.
    (source / "a" / "new").write_bytes(b"new\n")
    argv = build_argv(rsync=RSYNC, source=str(source), target=str(second), link_dests=[str(first)],
                      one_file_system=True, excludes=())
    last = _progress_of(argv)[-1]
    assert last.percent == 0 and (last.checked, last.total) == (35, 35)
    assert transfer_progress(last, 1.0) == (100, 0)


@pytest.mark.integration
@needs_rsync
def test_installed_rsync_accepts_every_option() -> None:
    argv = build_argv(
        rsync=RSYNC,
        source="/nonexistent-src",
        target="/nonexistent-dst",
        link_dests=["/x"],
        one_file_system=True,
        excludes=["a"],
        filter_rules=["--include=/b/CACHEDIR.TAG", "--exclude=/b/*"],
        io_timeout=5,
        dry_run=True,
    )
    completed = subprocess.run(argv, capture_output=True, text=True, env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"})
    # 23: the source does not exist; 1 would be an unknown option.
    assert completed.returncode == 23, completed.stderr
    assert "unknown option" not in completed.stderr


# --- the file being copied ---------------------------------------------------


def test_itemized_lines_name_the_file_being_copied_and_nothing_else_does() -> None:
    """Lines as rsync 3.5.0 prints them with --itemize-changes; only a file received or sent is "being copied"."""
    parser = ProgressParser()
    record = "              7  31%    0.00kB/s    0:00:00 (xfr#1, to-chk=8/12)"

    def current() -> str | None:
        update = parser.feed(record)
        assert update is not None
        return update.current

    assert current() is None
    for line, taken, expected in [
        (">f+++++++++ a/new file", True, "a/new file"),
        ("cd+++++++++ a/dir/", True, "a/new file"),
        ("*deleting   a/zz", True, "a/new file"),
        ("hf+++++++++ a/hard => a/f1", True, "a/new file"),
        ("cL+++++++++ a/link -> f1", True, "a/new file"),
        (".f..t...... a/touched", True, "a/new file"),
        ("<f.st...... remote/sent", True, "remote/sent"),
        (">f.st...... caf\\#303\\#251", True, "caf\\#303\\#251"),
        ("created directory /media/disk/snapshots/x.in-progress", False, "caf\\#303\\#251"),
        ("Number of files: 12 (reg: 8, dir: 3, link: 1)", False, "caf\\#303\\#251"),
        ("Total file size: 22 bytes", False, "caf\\#303\\#251"),
        ("sent 213 bytes  received 43 bytes  512.00 bytes/sec", False, "caf\\#303\\#251"),
        (record, False, "caf\\#303\\#251"),
    ]:
        assert parser.item(line) is taken, line
        assert current() == expected, line


def test_a_name_is_read_back_as_one_line_of_text() -> None:
    assert readable_name("a/plain name") == "a/plain name"
    assert readable_name("caf\\#303\\#251/na\\#303\\#257ve") == "café/naïve"
    assert readable_name("new\\#012line") == "new?line"
    assert readable_name("latin1 \\#351t\\#351") == "latin1 \ufffdt\ufffd"
    assert readable_name("back\\#134#slash") == "back\\#slash"
