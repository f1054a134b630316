"""Tests of agent.config: validation rules, messages, file reading, trust."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import stat
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import config

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]
from agent.config import (
    DEFAULT_SYSTEM_EXCLUDES,
    SYSTEM_CONFIG,
    Commands,
    Settings,
    check_trusted,
    effective_excludes,
    load_settings,
    parse_duration,
    running_through_sudo,
    settings_from_mapping,
)
from agent.errors import EXIT_USAGE, ConfigError
from agent.rotation import DEFAULT_SCHEME, FREQUENCIES, Scheme, plan_rotation

FILE = "/etc/backup-agent/config.toml"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "config.toml"
IS_ROOT = os.geteuid() == 0

TABLES = "[backup], [rotation], [commands], [notifications]"
BACKUP_KEYS = "source, repository, exclude, one_file_system, ionice, nice, skip_cachedir_tagged, io_timeout"
COUNT = 'expected a whole number of 0 or more, or "always"'
DURATION = (
    'expected a duration string such as "90s", "10m", "1h30m" or "7d" (whole numbers with the units '
    'd, h, m, s, largest first), or "0" for none'
)
IONICE = '"idle", "best-effort", "realtime", "none"'
DIR = "expected a string holding an absolute directory path"
PROGRAM = "an absolute path to the program"
UNSAFE = (
    "expected the file and every directory above it to be owned by root and writable by root only, "
    "with no symbolic links"
)


def write(directory: Path, text: str | bytes, name: str = "config.toml") -> str:
    path = directory / name
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    return str(path)


def config_error(data: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        settings_from_mapping(data, FILE)
    return info.value


# --------------------------------------------------------------------------
# Every validation message, exactly

ERRORS = [
    # tables and keys
    pytest.param(
        {"rotaton": {"daily": 7}},
        "rotaton",
        f"unknown table [rotaton], did you mean [rotation]?; expected one of the tables {TABLES}",
        id="unknown-table-suggested",
    ),
    pytest.param(
        {"hooks": {"pre": "x"}},
        "hooks",
        f"unknown table [hooks]; expected one of the tables {TABLES}",
        id="unknown-table",
    ),
    pytest.param(
        {"backup": {"exlude": ["/x"]}},
        "backup.exlude",
        f'unknown key "exlude" in [backup], did you mean exclude?; expected one of {BACKUP_KEYS}',
        id="unknown-key-suggested",
    ),
    pytest.param(
        {"rotation": {"hourley": 3}},
        "rotation.hourley",
        'unknown key "hourley" in [rotation], did you mean hourly?; '
        "expected one of hourly, daily, weekly, monthly, yearly, prefer_recent, strict",
        id="unknown-rotation-key-suggested",
    ),
    pytest.param(
        {"notifications": {"sound": True}},
        "notifications.sound",
        'unknown key "sound" in [notifications]; expected one of enabled',
        id="unknown-key",
    ),
    pytest.param(
        {"source": "/"},
        "source",
        'got the key "source" outside any table; expected it below the line [backup]',
        id="key-outside-table",
    ),
    pytest.param(
        {"ionice": "idle"},
        "ionice",
        'got the key "ionice" outside any table; expected it below the line [backup] or [commands]',
        id="key-outside-table-two-owners",
    ),
    pytest.param(
        {"verbose": True},
        "verbose",
        f'unknown key "verbose" outside any table; expected only the tables {TABLES}',
        id="unknown-top-level-key",
    ),
    pytest.param(
        {"backup": 1},
        "backup",
        "got an integer (1); expected the table [backup]",
        id="table-not-a-table",
    ),
    pytest.param(
        {"backup": [{"source": "/"}]},
        "backup",
        'got an array of tables ([{ source = "/" }]); expected the table [backup]',
        id="array-of-tables",
    ),
    # wrong types
    pytest.param({"backup": {"source": 5}}, "backup.source", f"got an integer (5); {DIR}", id="source-int"),
    pytest.param(
        {"backup": {"source": dt.date(2024, 1, 31)}},
        "backup.source",
        f"got a date (2024-01-31); {DIR}",
        id="source-date",
    ),
    pytest.param(
        {"backup": {"one_file_system": "yes"}},
        "backup.one_file_system",
        'got a string ("yes"); expected a boolean (true or false)',
        id="bool-string",
    ),
    pytest.param(
        {"backup": {"skip_cachedir_tagged": 1}},
        "backup.skip_cachedir_tagged",
        "got an integer (1); expected a boolean (true or false)",
        id="bool-int",
    ),
    pytest.param(
        {"rotation": {"prefer_recent": "false"}},
        "rotation.prefer_recent",
        'got a string ("false"); expected a boolean (true or false)',
        id="prefer-recent-string",
    ),
    pytest.param(
        {"rotation": {"strict": 0}},
        "rotation.strict",
        "got an integer (0); expected a boolean (true or false)",
        id="strict-int",
    ),
    pytest.param(
        {"notifications": {"enabled": "no"}},
        "notifications.enabled",
        'got a string ("no"); expected a boolean (true or false)',
        id="notifications-string",
    ),
    pytest.param(
        {"backup": {"nice": "19"}},
        "backup.nice",
        'got a string ("19"); expected an integer from 0 to 19',
        id="nice-string",
    ),
    pytest.param(
        {"backup": {"nice": True}},
        "backup.nice",
        "got a boolean (true); expected an integer from 0 to 19",
        id="nice-bool",
    ),
    pytest.param(
        {"backup": {"nice": 10.0}},
        "backup.nice",
        "got a float (10.0); expected an integer from 0 to 19",
        id="nice-float",
    ),
    pytest.param(
        {"backup": {"nice": 25}},
        "backup.nice",
        "got 25; expected an integer from 0 (normal) to 19 (lowest priority)",
        id="nice-too-high",
    ),
    pytest.param(
        {"backup": {"nice": -5}},
        "backup.nice",
        "got -5; expected an integer from 0 (normal) to 19 (lowest priority)",
        id="nice-negative",
    ),
    pytest.param(
        {"backup": {"ionice": 3}},
        "backup.ionice",
        f"got an integer (3); expected one of the strings {IONICE}",
        id="ionice-int",
    ),
    pytest.param(
        {"backup": {"ionice": "low"}},
        "backup.ionice",
        f'got "low"; expected one of {IONICE}',
        id="ionice-unknown",
    ),
    pytest.param(
        {"backup": {"ionice": "idel"}},
        "backup.ionice",
        f'got "idel" (did you mean "idle"?); expected one of {IONICE}',
        id="ionice-suggested",
    ),
    pytest.param(
        {"backup": {"exclude": "/home/*/Downloads"}},
        "backup.exclude",
        'got a string ("/home/*/Downloads"); expected an array of rsync patterns such as ["/home/*/Downloads"]',
        id="exclude-string",
    ),
    pytest.param(
        {"backup": {"exclude": {"a": 1}}},
        "backup.exclude",
        'got a table ({ a = 1 }); expected an array of rsync patterns such as ["/home/*/Downloads"]',
        id="exclude-table",
    ),
    pytest.param(
        {"backup": {"exclude": ["/a", 3]}},
        "backup.exclude[1]",
        "got an integer (3); expected a string holding an rsync pattern",
        id="exclude-item-int",
    ),
    pytest.param(
        {"backup": {"exclude": [""]}},
        "backup.exclude[0]",
        'got ""; expected a non-empty rsync pattern',
        id="exclude-item-empty",
    ),
    pytest.param(
        {"backup": {"exclude": ["/a\nb"]}},
        "backup.exclude[0]",
        'got "/a\\nb", which holds a NUL or newline character; expected a pattern without them',
        id="exclude-item-newline",
    ),
    pytest.param(
        {"backup": {"exclude": ["/a", "/b\x00"]}},
        "backup.exclude[1]",
        'got "/b\\u0000", which holds a NUL or newline character; expected a pattern without them',
        id="exclude-item-nul",
    ),
    pytest.param(
        {"commands": {"rsync": ["/usr/bin/rsync"]}},
        "commands.rsync",
        f'got an array (["/usr/bin/rsync"]); expected a string holding {PROGRAM}',
        id="command-array",
    ),
    # durations
    pytest.param(
        {"backup": {"io_timeout": 600}},
        "backup.io_timeout",
        f'got an integer (600); {DURATION} (write "600s" for 600 seconds)',
        id="timeout-int",
    ),
    pytest.param(
        {"backup": {"io_timeout": 0}},
        "backup.io_timeout",
        f'got an integer (0); {DURATION} (write "0")',
        id="timeout-int-zero",
    ),
    pytest.param(
        {"backup": {"io_timeout": 1.5}},
        "backup.io_timeout",
        f"got a float (1.5); {DURATION}",
        id="timeout-float",
    ),
    pytest.param(
        {"backup": {"io_timeout": "10x"}},
        "backup.io_timeout",
        f'got "10x"; {DURATION}',
        id="timeout-bad-unit",
    ),
    pytest.param(
        {"backup": {"io_timeout": "600"}},
        "backup.io_timeout",
        f'got "600" (a number needs a unit: "600s" for seconds); {DURATION}',
        id="timeout-no-unit",
    ),
    pytest.param(
        {"backup": {"io_timeout": "30m1h"}},
        "backup.io_timeout",
        f'got "30m1h"; {DURATION}',
        id="timeout-wrong-order",
    ),
    pytest.param(
        {"backup": {"io_timeout": "1.5h"}},
        "backup.io_timeout",
        f'got "1.5h"; {DURATION}',
        id="timeout-fraction",
    ),
    pytest.param(
        {"backup": {"io_timeout": "-1m"}},
        "backup.io_timeout",
        f'got "-1m"; {DURATION}',
        id="timeout-negative",
    ),
    pytest.param(
        {"backup": {"io_timeout": ""}},
        "backup.io_timeout",
        f'got ""; {DURATION}',
        id="timeout-empty",
    ),
    pytest.param(
        {"backup": {"io_timeout": "99999d"}},
        "backup.io_timeout",
        "got \"99999d\" (8639913600 seconds); expected at most 2147483647 seconds, rsync's limit",
        id="timeout-too-long",
    ),
    # paths
    pytest.param(
        {"backup": {"source": "home/me"}},
        "backup.source",
        'got "home/me", a relative path; expected an absolute directory path (starting with /)',
        id="source-relative",
    ),
    pytest.param(
        {"backup": {"source": ""}},
        "backup.source",
        'got "", a relative path; expected an absolute directory path (starting with /)',
        id="source-empty",
    ),
    pytest.param(
        {"commands": {"rsync": "rsync"}},
        "commands.rsync",
        f'got "rsync", a relative path; expected {PROGRAM} (starting with /)',
        id="command-relative",
    ),
    pytest.param(
        {"backup": {"repository": "/srv/backup/../../etc"}},
        "backup.repository",
        'got "/srv/backup/../../etc", which holds a ".." component; expected an absolute directory path without ".."',
        id="repository-dotdot",
    ),
    pytest.param(
        {"commands": {"rm": "/usr/bin/../../tmp/rm"}},
        "commands.rm",
        f'got "/usr/bin/../../tmp/rm", which holds a ".." component; expected {PROGRAM} without ".."',
        id="command-dotdot",
    ),
    pytest.param(
        {"backup": {"repository": "/srv/-rf/host"}},
        "backup.repository",
        'got "/srv/-rf/host", whose component "-rf" starts with - and could be taken for an option; '
        "expected an absolute directory path whose components do not start with -",
        id="repository-dash",
    ),
    pytest.param(
        {"backup": {"source": "/--delete"}},
        "backup.source",
        'got "/--delete", whose component "--delete" starts with - and could be taken for an option; '
        "expected an absolute directory path whose components do not start with -",
        id="source-dash",
    ),
    pytest.param(
        {"commands": {"rm": "/bin/-rm"}},
        "commands.rm",
        'got "/bin/-rm", whose component "-rm" starts with - and could be taken for an option; '
        f"expected {PROGRAM} whose components do not start with -",
        id="command-dash",
    ),
    pytest.param(
        {"backup": {"source": "/home/\nme"}},
        "backup.source",
        'got "/home/\\nme", which holds a NUL or newline character; expected an absolute directory path without them',
        id="source-newline",
    ),
    pytest.param(
        {"commands": {"nice": "/usr/bin/nice\x00"}},
        "commands.nice",
        f'got "/usr/bin/nice\\u0000", which holds a NUL or newline character; expected {PROGRAM} without them',
        id="command-nul",
    ),
    pytest.param(
        {"backup": {"repository": "/"}},
        "backup.repository",
        'got "/", a system directory; expected a directory of its own for the snapshots, such as /srv/backup/<host>',
        id="repository-root",
    ),
    pytest.param(
        {"backup": {"repository": "//"}},
        "backup.repository",
        'got "//", a system directory; expected a directory of its own for the snapshots, such as /srv/backup/<host>',
        id="repository-root-double-slash",
    ),
    pytest.param(
        {"backup": {"repository": "/etc/"}},
        "backup.repository",
        'got "/etc/", a system directory; expected a directory of its own for the snapshots, such as /srv/backup/<host>',
        id="repository-etc-trailing-slash",
    ),
    pytest.param(
        {"backup": {"repository": "/usr/./"}},
        "backup.repository",
        'got "/usr/./", a system directory; expected a directory of its own for the snapshots, such as /srv/backup/<host>',
        id="repository-usr-dot",
    ),
    # rotation counts
    pytest.param({"rotation": {"hourly": -3}}, "rotation.hourly", f"got -3; {COUNT}", id="count-negative"),
    pytest.param({"rotation": {"daily": 2.5}}, "rotation.daily", f"got a float (2.5); {COUNT}", id="count-float"),
    pytest.param({"rotation": {"daily": 7.0}}, "rotation.daily", f"got a float (7.0); {COUNT}", id="count-whole-float"),
    pytest.param({"rotation": {"weekly": True}}, "rotation.weekly", f"got a boolean (true); {COUNT}", id="count-bool"),
    pytest.param({"rotation": {"monthly": "sometimes"}}, "rotation.monthly", f'got "sometimes"; {COUNT}', id="count-word"),
    pytest.param(
        {"rotation": {"monthly": "Always"}},
        "rotation.monthly",
        f'got "Always" (did you mean "always"?); {COUNT}',
        id="count-always-capitalised",
    ),
    pytest.param(
        {"rotation": {"yearly": ["always"]}},
        "rotation.yearly",
        f'got an array (["always"]); {COUNT}',
        id="count-array",
    ),
    pytest.param(
        {"rotation": {"hourly": 10**12}},
        "rotation.hourly",
        'got 1000000000000, more than can be meant; expected a whole number from 0 to 100000, or "always"',
        id="count-impossible",
    ),
    pytest.param(
        {"rotation": {"hourly": 0, "daily": 0}},
        "rotation",
        "got hourly = 0, daily = 0, a scheme that keeps nothing and would delete every snapshot but the newest; "
        'expected at least one frequency with a count of 1 or more or "always" (for example daily = 7), '
        'or no frequency keys at all for the default scheme (hourly = 24, daily = 7, weekly = 4, monthly = "always")',
        id="scheme-all-zero",
    ),
]


@pytest.mark.parametrize(("data", "key", "problem"), ERRORS)
def test_error_message(data: dict[str, Any], key: str, problem: str) -> None:
    error = config_error(data)
    assert (error.path, error.key, error.problem) == (FILE, key, problem)
    assert str(error) == f"{FILE}: {key}: {problem}"
    assert "\n" not in str(error)
    assert error.exit_code == EXIT_USAGE


def test_the_briefs_example_message() -> None:
    error = config_error({"rotation": {"hourly": -3}})
    assert str(error) == (
        '/etc/backup-agent/config.toml: rotation.hourly: got -3; expected a whole number of 0 or more, or "always"'
    )


def test_first_problem_in_a_valid_table_is_still_found() -> None:
    """Valid keys before a bad one do not hide it."""
    error = config_error({"backup": {"source": "/", "nice": 5, "ionice": "none", "io_timeout": "1x"}})
    assert error.key == "backup.io_timeout"


def test_long_values_are_shortened_in_messages() -> None:
    error = config_error({"backup": {"source": "x" * 500}})
    assert len(str(error)) < 250
    assert "…" in error.problem


# --------------------------------------------------------------------------
# Valid configurations


def test_empty_mapping_gives_defaults() -> None:
    assert settings_from_mapping({}, FILE) == Settings(path=FILE)


def test_defaults() -> None:
    settings = Settings(path=None)
    assert settings.source == "/"
    assert settings.repository is None
    assert settings.exclude is None
    assert settings.one_file_system is True
    assert (settings.ionice, settings.nice) == ("idle", 19)
    assert settings.skip_cachedir_tagged is True
    assert settings.io_timeout == 0
    assert settings.rotation == DEFAULT_SCHEME
    assert settings.commands == Commands("/usr/bin/rsync", "/usr/bin/ionice", "/usr/bin/nice", "/bin/rm")
    assert settings.notifications is True


def test_every_key() -> None:
    data = {
        "backup": {
            "source": "/home/",
            "repository": "/srv/backup//host/",
            "exclude": ["/home/*/Downloads", "*.iso"],
            "one_file_system": False,
            "ionice": "best-effort",
            "nice": 0,
            "skip_cachedir_tagged": False,
            "io_timeout": "1h30m",
        },
        "rotation": {"hourly": 0, "daily": 14, "weekly": "always", "prefer_recent": True, "strict": False},
        "commands": {
            "rsync": "/opt/rsync/bin/rsync",
            "ionice": "/bin/ionice",
            "nice": "/bin/nice",
            "rm": "/usr/bin/rm",
        },
        "notifications": {"enabled": False},
    }
    assert settings_from_mapping(data, FILE) == Settings(
        path=FILE,
        source="/home",
        repository="/srv/backup/host",
        exclude=("/home/*/Downloads", "*.iso"),
        one_file_system=False,
        ionice="best-effort",
        nice=0,
        skip_cachedir_tagged=False,
        io_timeout=5400,
        rotation=Scheme(counts={"daily": 14, "weekly": "always"}, prefer_recent=True, strict=False),
        commands=Commands("/opt/rsync/bin/rsync", "/bin/ionice", "/bin/nice", "/usr/bin/rm"),
        notifications=False,
    )


@pytest.mark.parametrize(
    ("given", "expected"),
    [("/", "/"), ("//", "/"), ("/home/", "/home"), ("//home//me/./docs/", "/home/me/docs"), ("/srv/a.b/c", "/srv/a.b/c")],
)
def test_source_is_normalised(given: str, expected: str) -> None:
    assert settings_from_mapping({"backup": {"source": given}}, FILE).source == expected


@pytest.mark.parametrize("repository", ["/srv/backup/host", "/media/disk/host", "/var/backups", "/home/backup", "/srv/x-y"])
def test_repository_accepted(repository: str) -> None:
    assert settings_from_mapping({"backup": {"repository": repository}}, FILE).repository == repository


@pytest.mark.parametrize("ionice", ["idle", "best-effort", "realtime", "none"])
def test_ionice_choices(ionice: str) -> None:
    assert settings_from_mapping({"backup": {"ionice": ionice}}, FILE).ionice == ionice


def test_partial_rotation_table_is_exactly_the_frequencies_given() -> None:
    scheme = settings_from_mapping({"rotation": {"monthly": "always", "daily": 14, "hourly": 0}}, FILE).rotation
    assert dict(scheme.counts) == {"daily": 14, "monthly": "always"}
    assert list(scheme.counts) == ["daily", "monthly"]  # FREQUENCIES order, whatever the file's order
    assert (scheme.prefer_recent, scheme.strict) == (False, True)


def test_rotation_without_frequencies_keeps_default_counts() -> None:
    scheme = settings_from_mapping({"rotation": {"prefer_recent": True, "strict": False}}, FILE).rotation
    assert scheme == Scheme(counts=dict(DEFAULT_SCHEME.counts), prefer_recent=True, strict=False)


def test_one_nonzero_frequency_is_enough() -> None:
    scheme = settings_from_mapping({"rotation": {"hourly": 0, "daily": 0, "yearly": 1}}, FILE).rotation
    assert dict(scheme.counts) == {"yearly": 1}


def test_largest_count_accepted() -> None:
    scheme = settings_from_mapping({"rotation": {"hourly": config.MAX_COUNT}}, FILE).rotation
    assert dict(scheme.counts) == {"hourly": config.MAX_COUNT}


SNAPSHOT = "2026-11-22T13-00-00+0100"


@given(
    st.dictionaries(
        st.sampled_from(FREQUENCIES),
        st.one_of(st.integers(0, 5), st.just(config.MAX_COUNT), st.just("always")),
    ),
    st.booleans(),
    st.booleans(),
)
def test_the_planner_accepts_every_scheme_the_config_accepts(
    counts: dict[str, Any], prefer_recent: bool, strict: bool
) -> None:
    table = {**counts, "prefer_recent": prefer_recent, "strict": strict}
    if counts and all(count == 0 for count in counts.values()):
        with pytest.raises(ConfigError):
            settings_from_mapping({"rotation": table}, FILE)
        return
    scheme = settings_from_mapping({"rotation": table}, FILE).rotation
    assert plan_rotation([SNAPSHOT], scheme).keep  # no ValueError: the scheme is usable


def test_partial_commands_table_keeps_other_defaults() -> None:
    commands = settings_from_mapping({"commands": {"rsync": "/usr/local/bin/rsync/"}}, FILE).commands
    assert commands == Commands(rsync="/usr/local/bin/rsync")


def test_empty_exclude_list_means_nothing_excluded() -> None:
    settings = settings_from_mapping({"backup": {"exclude": []}}, FILE)
    assert settings.exclude == ()
    assert effective_excludes(settings) == ()


@pytest.mark.parametrize(
    ("source", "exclude", "expected"),
    [
        ("/", None, DEFAULT_SYSTEM_EXCLUDES),
        ("/home", None, ()),
        ("/", ("/srv/*",), ("/srv/*",)),
        ("/home", ("/me/.cache",), ("/me/.cache",)),
    ],
)
def test_effective_excludes(source: str, exclude: tuple[str, ...] | None, expected: tuple[str, ...]) -> None:
    assert effective_excludes(Settings(path=None, source=source, exclude=exclude)) == expected


def test_default_system_excludes() -> None:
    required = {
        "/dev/*", "/proc/*", "/sys/*", "/run/*", "/tmp/*", "/var/tmp/*", "/mnt/*", "/media/*", "/lost+found",
        "/swapfile", "/var/cache/apt/archives/*.deb", "/var/lib/systemd/coredump/*", "/home/*/.cache/*",
        "/root/.cache/*",
    }  # fmt: skip
    assert required <= set(DEFAULT_SYSTEM_EXCLUDES)
    assert len(set(DEFAULT_SYSTEM_EXCLUDES)) == len(DEFAULT_SYSTEM_EXCLUDES)
    assert all(pattern.startswith("/") for pattern in DEFAULT_SYSTEM_EXCLUDES)  # anchored at the source


# --------------------------------------------------------------------------
# Durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0", 0), ("0s", 0), ("90s", 90), ("10m", 600), ("1h", 3600), ("1h30m", 5400), ("7d", 604800),
     ("1d2h3m4s", 93784), ("2d12h", 216000)],
)  # fmt: skip
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "10", "1.5h", "-1m", "10x", "30m1h", "1h 30m", " 1h", "1H", "h", "1w", "٣m"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=r'^invalid duration ".*"(?: \(a number needs a unit: "10s" for seconds\))?: expected a duration string such as "90s"'):
        parse_duration(text)


def test_parse_duration_hints_at_a_unit() -> None:
    with pytest.raises(ValueError, match=r'^invalid duration "600" \(a number needs a unit: "600s" for seconds\)'):
        parse_duration("600")


@given(st.integers(0, 400), st.integers(0, 23), st.integers(0, 59), st.integers(0, 59))
def test_parse_duration_round_trip(days: int, hours: int, minutes: int, seconds: int) -> None:
    text = f"{days}d{hours}h{minutes}m{seconds}s"
    assert parse_duration(text) == ((days * 24 + hours) * 60 + minutes) * 60 + seconds


# --------------------------------------------------------------------------
# Reading files


def test_load_toml_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[backup]\nrepository = "/srv/backup/host"\nio_timeout = "10m"\n[rotation]\ndaily = 3\n')
    settings = load_settings(path)
    assert settings == Settings(path=path, repository="/srv/backup/host", io_timeout=600, rotation=Scheme(counts={"daily": 3}))


def test_empty_file_gives_defaults_with_its_path(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    assert load_settings(path) == Settings(path=path)


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, "\ufeff[backup]\nnice = 5\n")
    assert load_settings(path).nice == 5


def test_validation_error_from_a_file_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[backup]\nexlude = ["/x"]\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(info.value) == (
        f'{path}: backup.exlude: unknown key "exlude" in [backup], did you mean exclude?; expected one of {BACKUP_KEYS}'
    )


def test_toml_true_is_not_a_count(tmp_path: Path) -> None:
    path = write(tmp_path, "[rotation]\nhourly = true\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(info.value) == f"{path}: rotation.hourly: got a boolean (true); {COUNT}"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[backup]\nnice = \n", "invalid TOML at line 2, column 8: Invalid value; fix the TOML syntax"),
        ('[backup]\nsource = "/\n', "invalid TOML at line 2, column 12: Illegal character '\\n'; fix the TOML syntax"),
        ('[backup]\nsource = "/', "invalid TOML at end of document: Unterminated string; fix the TOML syntax"),
        ("[backup]\n[backup]\n", "invalid TOML at line 2, column 8: Cannot declare ('backup',) twice; fix the TOML syntax"),
    ],
    ids=["invalid-value", "newline-in-string", "unterminated", "duplicate-table"],
)
def test_toml_syntax_error(tmp_path: Path, text: str, problem: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert (info.value.path, info.value.key, info.value.problem) == (path, None, problem)
    assert str(info.value) == f"{path}: {problem}"


def test_missing_explicit_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(info.value) == f"{path}: the file does not exist; expected a TOML config file: check the path"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(str(tmp_path))
    assert str(info.value) == f"{tmp_path}: this is a directory; expected a TOML config file"


def test_not_utf8(tmp_path: Path) -> None:
    path = write(tmp_path, b'[backup]\nsource = "/caf\xe9"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(info.value) == (
        f"{path}: the file is not UTF-8 text (byte 0xe9 on line 2); expected a UTF-8 encoded TOML file"
    )


@contextmanager
def effective_uid(uid: int) -> Iterator[None]:
    """Run the block with this effective uid and gid, then root's again (root only)."""
    os.setegid(uid)
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_unreadable_file(tmp_path: Path) -> None:
    """Root reads any file whatever its mode: as root, the reading is done as nobody."""
    if not IS_ROOT:
        path = write(tmp_path, "[backup]\n")
        os.chmod(path, 0o000)
        uid = os.geteuid()
        with pytest.raises(ConfigError) as info:
            load_settings(path)
    else:
        # Not under tmp_path: pytest's directories there are closed to others,
        # and the test is about the file's own mode.
        directory = tempfile.mkdtemp(prefix="backup-agent-test-", dir="/var/tmp")
        try:
            os.chmod(directory, 0o755)
            path = write(Path(directory), "[backup]\n")
            os.chmod(path, 0o600)
            uid = 65534
            with effective_uid(uid), pytest.raises(ConfigError) as info:
                load_settings(path)
        finally:
            shutil.rmtree(directory)
    assert str(info.value) == (
        f"{path}: cannot read the file: permission denied for uid {uid}; expected a file this user can read"
    )


def test_no_path_and_no_system_config_gives_builtin_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "SYSTEM_CONFIG", str(tmp_path / "absent.toml"))
    assert load_settings() == Settings(path=None)
    assert load_settings(None, through_sudo=True) == Settings(path=None)


def test_no_path_reads_the_system_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[backup]\nnice = 7\n")
    monkeypatch.setattr(config, "SYSTEM_CONFIG", path)
    assert load_settings() == Settings(path=path, nice=7)


def test_system_config_constant() -> None:
    assert SYSTEM_CONFIG == "/etc/backup-agent/config.toml"


# --------------------------------------------------------------------------
# The example config


def test_example_config_loads_and_shows_the_defaults() -> None:
    assert load_settings(str(EXAMPLE)) == Settings(path=str(EXAMPLE))


def test_example_config_mentions_every_key() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    for table, keys in config._TABLE_KEYS.items():
        assert f"[{table}]" in text
        for key in keys:
            assert f"\n{key} = " in text or f"\n# {key} = " in text, f"{table}.{key} missing from {EXAMPLE}"


def test_example_config_lists_the_default_excludes() -> None:
    """The commented-out exclude list is the real default, so copying it changes nothing."""
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    start = lines.index("# exclude = [")
    end = lines.index("# ]", start)
    block = "\n".join(line.removeprefix("# ") for line in lines[start : end + 1])
    assert tuple(tomllib.loads(block)["exclude"]) == DEFAULT_SYSTEM_EXCLUDES


# --------------------------------------------------------------------------
# Trust: check_trusted, through_sudo, running_through_sudo


def _trusted_ancestry(path: str) -> bool:
    """True when path and every directory above it are root's and not group/other-writable."""
    current = path
    while True:
        info = os.lstat(current)
        if stat.S_ISLNK(info.st_mode) or info.st_uid != 0 or info.st_mode & 0o022:
            return False
        if current == "/":
            return True
        current = os.path.dirname(current)


@pytest.fixture
def trusted_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A root-owned 0755 directory under root's home, whose parents are root's too.

    pytest's tmp_path lies under /tmp, which anyone may write, so check_trusted
    rightly refuses everything there.
    """
    if not IS_ROOT:
        pytest.skip("needs root: only root can make files owned by root")
    candidates = [os.path.expanduser("~"), "/root"]
    home = next((path for path in candidates if os.path.isabs(path) and os.path.isdir(path) and _trusted_ancestry(path)), None)
    if home is None:
        request.applymarker(pytest.mark.may_skip)
        pytest.skip(f"none of {candidates} is a root-owned directory closed to others, with such parents")
    directory = tempfile.mkdtemp(prefix=".backup-agent-test-", dir=home)
    os.chmod(directory, 0o755)
    try:
        yield Path(directory)
    finally:
        shutil.rmtree(directory)


def trusted_error(path: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        check_trusted(path)
    assert info.value.path == path and info.value.key is None
    return info.value


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
def test_group_or_other_writable_file_refused(tmp_path: Path, mode: int) -> None:
    path = write(tmp_path, "")
    os.chmod(path, mode)
    error = trusted_error(path)
    assert error.problem == (
        f"refusing an unsafe config: {path} is writable by group or others (mode {mode:04o}); {UNSAFE}"
    )


def test_symlinked_file_refused(tmp_path: Path) -> None:
    target = write(tmp_path, "", "real.toml")
    link = tmp_path / "config.toml"
    link.symlink_to(target)
    error = trusted_error(str(link))
    assert error.problem == f"refusing an unsafe config: {link} is a symbolic link; {UNSAFE}"


def test_directory_is_not_a_config(tmp_path: Path) -> None:
    error = trusted_error(str(tmp_path))
    assert error.problem == f"refusing an unsafe config: {tmp_path} is not a regular file; {UNSAFE}"


def test_missing_file_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.toml")
    error = trusted_error(path)
    assert error.problem == f"{path} does not exist; expected the config file at this path"


@pytest.mark.parametrize("path", ["etc/backup-agent/config.toml", "/etc/../tmp/config.toml", "/etc//backup-agent/config.toml"])
def test_path_must_be_absolute_and_normalised(path: str) -> None:
    error = trusted_error(path)
    assert error.problem == (
        "refusing an unsafe config path; expected an absolute path without //, . or .. components"
    )


@pytest.mark.skipif(not IS_ROOT, reason="needs root: a root-owned file is needed to reach the directory checks")
def test_file_under_world_writable_tmp_refused(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    writable = next(
        (str(parent) for parent in reversed(tmp_path.parents) if os.lstat(parent).st_mode & stat.S_IWOTH), None
    )
    if writable is None:
        request.applymarker(pytest.mark.may_skip)
        pytest.skip(f"no world-writable directory above {tmp_path} (pytest --basetemp elsewhere)")
    path = write(tmp_path, "")
    os.chmod(path, 0o644)
    error = trusted_error(path)
    mode = stat.S_IMODE(os.lstat(writable).st_mode)
    assert error.problem == (
        f"refusing an unsafe config: {writable} is writable by group or others (mode {mode:04o}); {UNSAFE}"
    )


def test_root_owned_file_under_root_owned_dirs_accepted(trusted_dir: Path) -> None:
    path = write(trusted_dir, "[backup]\n")
    os.chmod(path, 0o644)
    check_trusted(path)  # no error
    os.chmod(path, 0o600)
    check_trusted(path)


def test_file_owned_by_another_uid_refused(trusted_dir: Path) -> None:
    path = write(trusted_dir, "")
    os.chmod(path, 0o644)
    os.chown(path, 65534, 65534)
    error = trusted_error(path)
    assert error.problem == f"refusing an unsafe config: {path} is owned by uid 65534, not root; {UNSAFE}"


def test_directory_owned_by_another_uid_refused(trusted_dir: Path) -> None:
    sub = trusted_dir / "sub"
    sub.mkdir(mode=0o755)
    path = write(sub, "")
    os.chmod(path, 0o644)
    os.chown(sub, 65534, 65534)
    error = trusted_error(path)
    assert error.problem == f"refusing an unsafe config: {sub} is owned by uid 65534, not root; {UNSAFE}"


def test_group_writable_directory_refused(trusted_dir: Path) -> None:
    sub = trusted_dir / "sub"
    sub.mkdir()
    os.chmod(sub, 0o775)
    path = write(sub, "")
    os.chmod(path, 0o644)
    error = trusted_error(path)
    assert error.problem == f"refusing an unsafe config: {sub} is writable by group or others (mode 0775); {UNSAFE}"


def test_symlinked_directory_refused(trusted_dir: Path) -> None:
    real = trusted_dir / "real"
    real.mkdir(mode=0o755)
    os.chmod(write(real, ""), 0o644)
    (trusted_dir / "link").symlink_to(real)
    path = str(trusted_dir / "link" / "config.toml")
    error = trusted_error(path)
    assert error.problem == f"refusing an unsafe config: {trusted_dir / 'link'} is a symbolic link; {UNSAFE}"


def test_through_sudo_refuses_config_option(tmp_path: Path) -> None:
    path = write(tmp_path, "[backup]\n")
    for candidate in (path, str(tmp_path / "absent.toml")):  # refused before anything is read
        with pytest.raises(ConfigError) as info:
            load_settings(candidate, through_sudo=True)
        assert str(info.value) == (
            f"{candidate}: --config is not accepted through sudo; the cycle reads only {SYSTEM_CONFIG}: "
            "expected no --config option (edit the system config instead)"
        )
    assert load_settings(path) == Settings(path=path)  # the same file is fine without sudo


def test_through_sudo_refuses_an_untrusted_system_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[backup]\nnice = 3\n")
    os.chmod(path, 0o666)
    monkeypatch.setattr(config, "SYSTEM_CONFIG", path)
    assert load_settings().nice == 3  # read when not through sudo
    for explicit in (None, path):
        with pytest.raises(ConfigError) as info:
            load_settings(explicit, through_sudo=True)
        assert str(info.value) == (
            f"{path}: refusing an unsafe config: {path} is writable by group or others (mode 0666); {UNSAFE}"
        )


def test_through_sudo_reads_a_trusted_system_config(trusted_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(trusted_dir, "[backup]\nnice = 3\n")
    os.chmod(path, 0o644)
    monkeypatch.setattr(config, "SYSTEM_CONFIG", path)
    assert load_settings(through_sudo=True) == Settings(path=path, nice=3)
    assert load_settings(path, through_sudo=True) == Settings(path=path, nice=3)


@pytest.mark.parametrize(
    ("euid", "sudo_uid", "expected"),
    [(0, "1000", True), (0, None, False), (1000, "1000", False), (1000, None, False)],
)
def test_running_through_sudo(monkeypatch: pytest.MonkeyPatch, euid: int, sudo_uid: str | None, expected: bool) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: euid)
    if sudo_uid is None:
        monkeypatch.delenv("SUDO_UID", raising=False)
    else:
        monkeypatch.setenv("SUDO_UID", sudo_uid)
    assert running_through_sudo() is expected
