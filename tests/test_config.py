"""Tests of agent.config: validation rules, messages, file reading, trust."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import shutil
import socket
import stat
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.config import load, trust, validate

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]
from agent.config.load import SYSTEM_CONFIG, load_settings
from agent.config.model import DEFAULT_SYSTEM_EXCLUDES, Commands, Disk, Hook, KeepFree, MailReport, PingReport, Settings, effective_excludes
from agent.config.trust import check_trusted, running_through_sudo
from agent.config.validate import named_programs, parse_duration, parse_keep_free, settings_from_mapping
from agent.core.errors import EXIT_USAGE, ConfigError
from agent.policy.rotation import DEFAULT_SCHEME, FREQUENCIES, Scheme, plan_rotation

FILE = "/etc/backup-agent/config.toml"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "config.toml"
IS_ROOT = os.geteuid() == 0

TABLES = (
    "[backup], [rotation], [commands], [notifications], [tray], [system], [agent], [packages], [conditions], "
    "[[disk]], [[hooks]], [[report]], [[command_source]], [[source]], [[remote]], [[offsite]]"
)
BACKUP_KEYS = "source, repository, exclude, one_file_system, ionice, nice, skip_cachedir_tagged, io_timeout, freeze, layout, method"
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
    "and any symbolic link on the way to be root's"
)
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root: only root can make files owned by root, or chown")


def write(directory: Path, text: str | bytes, name: str = "config.toml") -> str:
    path = directory / name
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    return str(path)


def config_error(data: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        settings_from_mapping(data, FILE, hostname="testhost")
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
        {"scripts": {"pre": "x"}},
        "scripts",
        f"unknown table [scripts]; expected one of the tables {TABLES}",
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
        "expected one of hourly, daily, weekly, monthly, yearly, prefer_recent, strict, keep_free, min_snapshots",
        id="unknown-rotation-key-suggested",
    ),
    pytest.param(
        {"notifications": {"sound": True}},
        "notifications.sound",
        'unknown key "sound" in [notifications]; expected one of enabled, remind_after',
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
        {"tray": {"enabled": 1}},
        "tray.enabled",
        "got an integer (1); expected a boolean (true or false)",
        id="tray-int",
    ),
    pytest.param(
        {"tray": {"icon": "x"}},
        "tray.icon",
        'unknown key "icon" in [tray]; expected one of enabled',
        id="tray-unknown-key",
    ),
    pytest.param(
        {"notifications": {"remind_after": "7d"}},
        "notifications.remind_after",
        'got "7d" (write 7 for 7 days); expected a whole number of days from 0 (no reminders) to 3650, such as 7',
        id="remind-after-duration",
    ),
    pytest.param(
        {"notifications": {"remind_after": -1}},
        "notifications.remind_after",
        "got -1; expected a whole number of days from 0 (no reminders) to 3650, such as 7",
        id="remind-after-negative",
    ),
    pytest.param(
        {"notifications": {"remind_after": 7.5}},
        "notifications.remind_after",
        "got a float (7.5); expected a whole number of days from 0 (no reminders) to 3650, such as 7",
        id="remind-after-float",
    ),
    pytest.param(
        {"notifications": {"remind_after": True}},
        "notifications.remind_after",
        "got a boolean (true); expected a whole number of days from 0 (no reminders) to 3650, such as 7",
        id="remind-after-bool",
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


# --------------------------------------------------------------------------
# Every message of the disk lifecycle's keys: [system], [[disk]], [[hooks]],
# the new [commands] keys, keep_free and min_snapshots

HOST = "testhost"
UUID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
DISK_KEYS = "name, luks_uuid, mount_point, mapped_device, repository, unlock, filesystem, mount_options, layout"
HOOK_KEYS = "name, around, before, after, timeout, critical"
DISK_NAME = (
    'a name of 1 to 64 ASCII letters, digits, "_", "." and "-" that starts with a letter or digit, '
    'such as "backup1" (the crypttab target name)'
)
LUKS_UUID = (
    'the UUID of the LUKS partition, 8-4-4-4-12 hex digits such as "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0" '
    '(blkid shows it as UUID="..." with TYPE="crypto_LUKS")'
)
FILESYSTEM = 'a filesystem type as mount -t takes it, such as "ext4", "btrfs" or "xfs"'
UNLOCK = '"auto", "cryptdisks", "systemd"'
ARGV = (
    'an array of strings, the program and its arguments, such as ["/usr/bin/pg_dumpall", "-f", "/var/backups/db.sql"] '
    '(no shell: write ["/bin/sh", "-c", "..."] for one)'
)
KEEP_FREE = (
    'a size with a binary unit such as "500M", "20G" or "1T" (K, M, G, T: 1024, 1024^2, 1024^3, 1024^4 bytes; '
    'a plain number of 100 or more is bytes), or a percentage of the disk above 0 and below 100 such as "10%"'
)
PERCENT = 'expected a percentage of the disk above 0 and below 100, such as "10%"'
HOOK_NAME = 'a non-empty name for the hook, such as "database dump"'


def disk(**changes: Any) -> dict[str, Any]:
    """A valid [[disk]] table, changed; a value of None removes the key."""
    table: dict[str, Any] = {"name": "backup1", "luks_uuid": UUID, "mount_point": "/mnt/backup1"}
    table.update(changes)
    return {key: value for key, value in table.items() if value is not None}


def hook(**changes: Any) -> dict[str, Any]:
    """A valid [[hooks]] table, changed; a value of None removes the key."""
    table: dict[str, Any] = {"name": "dump", "around": "snapshot", "before": ["/usr/bin/true"]}
    table.update(changes)
    return {key: value for key, value in table.items() if value is not None}


LIFECYCLE_ERRORS = [
    # the tables themselves
    pytest.param({"system": "x"}, "system", 'got a string ("x"); expected the table [system]', id="system-not-a-table"),
    pytest.param(
        {"disk": {"name": "backup1"}},
        "disk",
        'got a table ({ name = "backup1" }); expected the array of tables [[disk]], one [[disk]] section per disk',
        id="disk-single-table",
    ),
    pytest.param(
        {"disk": "backup1"},
        "disk",
        'got a string ("backup1"); expected the array of tables [[disk]], one [[disk]] section per disk',
        id="disk-string",
    ),
    pytest.param(
        {"hooks": {"pre": "x"}},
        "hooks",
        'got a table ({ pre = "x" }); expected the array of tables [[hooks]], one [[hooks]] section per hook',
        id="hooks-single-table",
    ),
    pytest.param(
        {"disk": [disk(), 1]},
        "disk[1]",
        "got an integer (1); expected a table: one [[disk]] section per disk",
        id="disk-element-not-a-table",
    ),
    pytest.param(
        {"hooks": [["/bin/true"]]},
        "hooks[0]",
        'got an array (["/bin/true"]); expected a table: one [[hooks]] section per hook',
        id="hooks-element-not-a-table",
    ),
    pytest.param(
        {"disks": [disk()]},
        "disks",
        f"unknown table [[disks]], did you mean [[disk]]?; expected one of the tables {TABLES}",
        id="unknown-array-of-tables-suggested",
    ),
    pytest.param(
        {"hook": [hook()]},
        "hook",
        f"unknown table [[hook]], did you mean [[hooks]]?; expected one of the tables {TABLES}",
        id="unknown-hook-array-suggested",
    ),
    pytest.param(
        {"sytem": {"state_dir": "/x"}},
        "sytem",
        f"unknown table [sytem], did you mean [system]?; expected one of the tables {TABLES}",
        id="unknown-system-table-suggested",
    ),
    pytest.param(
        {"name": "backup1"},
        "name",
        'got the key "name" outside any table; expected it below the line [[disk]] or [[hooks]] or [[command_source]] or [[source]] '
        "or [[remote]] or [[offsite]]",
        id="key-outside-table-arrays",
    ),
    pytest.param(
        {"repository": "/srv/backup"},
        "repository",
        'got the key "repository" outside any table; expected it below the line [backup] or [[disk]] or [[offsite]]',
        id="key-outside-table-backup-or-disk",
    ),
    pytest.param(
        {"keep_free": "10%"},
        "keep_free",
        'got the key "keep_free" outside any table; expected it below the line [rotation]',
        id="keep-free-outside-table",
    ),
    # [system]
    pytest.param(
        {"system": {"statedir": "/var/lib/x"}},
        "system.statedir",
        'unknown key "statedir" in [system], did you mean state_dir?; expected one of state_dir, crypttab, fstab',
        id="system-unknown-key",
    ),
    pytest.param(
        {"system": {"state_dir": "var/lib/backup-agent"}},
        "system.state_dir",
        'got "var/lib/backup-agent", a relative path; expected an absolute directory path (starting with /)',
        id="state-dir-relative",
    ),
    pytest.param(
        {"system": {"state_dir": "/var/"}},
        "system.state_dir",
        'got "/var/", a system directory; expected a directory of backup-agent\'s own, such as /var/lib/backup-agent',
        id="state-dir-system-directory",
    ),
    pytest.param(
        {"system": {"crypttab": 1}},
        "system.crypttab",
        "got an integer (1); expected a string holding an absolute path to the file",
        id="crypttab-int",
    ),
    pytest.param(
        {"system": {"fstab": "/etc/../tmp/fstab"}},
        "system.fstab",
        'got "/etc/../tmp/fstab", which holds a ".." component; expected an absolute path to the file without ".."',
        id="fstab-dotdot",
    ),
    # [commands], the new keys
    pytest.param(
        {"commands": {"cryptdisks_start": "cryptdisks_start"}},
        "commands.cryptdisks_start",
        f'got "cryptdisks_start", a relative path; expected {PROGRAM} (starting with /)',
        id="cryptdisks-start-relative",
    ),
    pytest.param(
        {"commands": {"umount": "/bin/umount\n"}},
        "commands.umount",
        f'got "/bin/umount\\n", which holds a NUL or newline character; expected {PROGRAM} without them',
        id="umount-newline",
    ),
    pytest.param(
        {"commands": {"cryptdisk_stop": "/sbin/cryptdisks_stop"}},
        "commands.cryptdisk_stop",
        'unknown key "cryptdisk_stop" in [commands], did you mean cryptdisks_stop?; expected one of rsync, ionice, '
        "nice, rm, blkid, cryptdisks_start, cryptdisks_stop, cryptsetup, systemctl, mount, umount, sync, btrfs, unshare, ssh, restic, find",
        id="commands-unknown-key-suggested",
    ),
    # [[disk]]: keys, required keys
    pytest.param(
        {"disk": [disk(mountpoint="/mnt/b")]},
        "disk[0].mountpoint",
        f'unknown key "mountpoint" in [[disk]], did you mean mount_point?; expected one of {DISK_KEYS}',
        id="disk-unknown-key",
    ),
    pytest.param({"disk": [disk(name=None)]}, "disk[0].name", f"missing; expected {DISK_NAME}", id="disk-name-missing"),
    pytest.param(
        {"disk": [disk(), disk(name="backup2", luks_uuid=None)]},
        "disk[1].luks_uuid",
        f"missing; expected {LUKS_UUID}",
        id="disk-uuid-missing",
    ),
    pytest.param(
        {"disk": [disk(mount_point=None)]},
        "disk[0].mount_point",
        "missing; expected an absolute directory path to mount the disk on, such as /mnt/backup1",
        id="disk-mount-point-missing",
    ),
    # name
    pytest.param({"disk": [disk(name=1)]}, "disk[0].name", f"got an integer (1); expected a string holding {DISK_NAME}", id="disk-name-int"),
    pytest.param({"disk": [disk(name="")]}, "disk[0].name", f'got ""; expected {DISK_NAME}', id="disk-name-empty"),
    pytest.param({"disk": [disk(name="back up")]}, "disk[0].name", f'got "back up"; expected {DISK_NAME}', id="disk-name-space"),
    pytest.param({"disk": [disk(name="-backup")]}, "disk[0].name", f'got "-backup"; expected {DISK_NAME}', id="disk-name-dash"),
    pytest.param({"disk": [disk(name=".backup")]}, "disk[0].name", f'got ".backup"; expected {DISK_NAME}', id="disk-name-dot"),
    pytest.param({"disk": [disk(name="a/b")]}, "disk[0].name", f'got "a/b"; expected {DISK_NAME}', id="disk-name-slash"),
    pytest.param({"disk": [disk(name="bäckup")]}, "disk[0].name", f'got "bäckup"; expected {DISK_NAME}', id="disk-name-non-ascii"),
    pytest.param({"disk": [disk(name="backup\n")]}, "disk[0].name", f'got "backup\\n"; expected {DISK_NAME}', id="disk-name-newline"),
    pytest.param({"disk": [disk(name="a" * 65)]}, "disk[0].name", f'got "{"a" * 65}"; expected {DISK_NAME}', id="disk-name-too-long"),
    # luks_uuid
    pytest.param(
        {"disk": [disk(luks_uuid=12)]},
        "disk[0].luks_uuid",
        f"got an integer (12); expected a string holding {LUKS_UUID}",
        id="uuid-int",
    ),
    pytest.param(
        {"disk": [disk(luks_uuid="0f1e2d3c4b5a69788796a5b4c3d2e1f0")]},
        "disk[0].luks_uuid",
        f'got "0f1e2d3c4b5a69788796a5b4c3d2e1f0"; expected {LUKS_UUID}',
        id="uuid-without-dashes",
    ),
    pytest.param(
        {"disk": [disk(luks_uuid="0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1fg")]},
        "disk[0].luks_uuid",
        f'got "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1fg"; expected {LUKS_UUID}',
        id="uuid-not-hex",
    ),
    pytest.param(
        {"disk": [disk(luks_uuid=f"UUID={UUID}")]},
        "disk[0].luks_uuid",
        f'got "UUID={UUID}" (write the UUID alone: "{UUID}"); expected {LUKS_UUID}',
        id="uuid-with-prefix",
    ),
    pytest.param(
        {"disk": [disk(luks_uuid=f"/dev/disk/by-uuid/{UUID}")]},
        "disk[0].luks_uuid",
        f'got "/dev/disk/by-uuid/{UUID}" (write the UUID alone: "{UUID}"); expected {LUKS_UUID}',
        id="uuid-device-path",
    ),
    # mount_point
    pytest.param(
        {"disk": [disk(mount_point="/")]},
        "disk[0].mount_point",
        'got "/", a directory the system or its users need; expected a directory of its own to mount the disk on, '
        "such as /mnt/backup1",
        id="mount-point-root",
    ),
    pytest.param(
        {"disk": [disk(mount_point="/home/")]},
        "disk[0].mount_point",
        'got "/home/", a directory the system or its users need; expected a directory of its own to mount the disk '
        "on, such as /mnt/backup1",
        id="mount-point-home",
    ),
    pytest.param(
        {"disk": [disk(mount_point="/etc")]},
        "disk[0].mount_point",
        'got "/etc", a directory the system or its users need; expected a directory of its own to mount the disk '
        "on, such as /mnt/backup1",
        id="mount-point-etc",
    ),
    pytest.param(
        {"disk": [disk(mount_point="mnt/backup1")]},
        "disk[0].mount_point",
        'got "mnt/backup1", a relative path; expected an absolute directory path (starting with /)',
        id="mount-point-relative",
    ),
    # mapped_device
    pytest.param(
        {"disk": [disk(mapped_device="mapper/backup1")]},
        "disk[0].mapped_device",
        'got "mapper/backup1", a relative path; expected an absolute path to the unlocked device (starting with /)',
        id="mapped-device-relative",
    ),
    # repository
    pytest.param(
        {"disk": [disk(repository="/mnt/backup1/")]},
        "disk[0].repository",
        'got "/mnt/backup1/", the mount point itself; expected a directory below it such as /mnt/backup1/testhost: '
        "the repository must be a directory on the disk, not its root",
        id="repository-is-the-mount-point",
    ),
    pytest.param(
        {"disk": [disk(repository="/mnt/backup1/./")]},
        "disk[0].repository",
        'got "/mnt/backup1/./", the mount point itself; expected a directory below it such as /mnt/backup1/testhost: '
        "the repository must be a directory on the disk, not its root",
        id="repository-is-the-mount-point-dot",
    ),
    pytest.param(
        {"disk": [disk(repository="/srv/backup/host")]},
        "disk[0].repository",
        'got "/srv/backup/host", which is not below the disk\'s mount point "/mnt/backup1"; '
        "expected a directory on the disk, such as /mnt/backup1/testhost",
        id="repository-outside",
    ),
    pytest.param(
        {"disk": [disk(repository="/mnt/backup10/host")]},
        "disk[0].repository",
        'got "/mnt/backup10/host", which is not below the disk\'s mount point "/mnt/backup1"; '
        "expected a directory on the disk, such as /mnt/backup1/testhost",
        id="repository-beside-with-common-prefix",
    ),
    pytest.param(
        {"disk": [disk(repository="/mnt")]},
        "disk[0].repository",
        'got "/mnt", which is not below the disk\'s mount point "/mnt/backup1"; '
        "expected a directory on the disk, such as /mnt/backup1/testhost",
        id="repository-above",
    ),
    pytest.param(
        {"disk": [disk(repository="/mnt/backup1/../etc")]},
        "disk[0].repository",
        'got "/mnt/backup1/../etc", which holds a ".." component; expected an absolute directory path without ".."',
        id="repository-dotdot",
    ),
    # unlock
    pytest.param({"disk": [disk(unlock="luks")]}, "disk[0].unlock", f'got "luks"; expected one of {UNLOCK}', id="unlock-unknown"),
    pytest.param(
        {"disk": [disk(unlock="cryptdisk")]},
        "disk[0].unlock",
        f'got "cryptdisk" (did you mean "cryptdisks"?); expected one of {UNLOCK}',
        id="unlock-suggested",
    ),
    pytest.param(
        {"disk": [disk(unlock=True)]},
        "disk[0].unlock",
        f"got a boolean (true); expected one of the strings {UNLOCK}",
        id="unlock-bool",
    ),
    # filesystem, mount_options
    pytest.param(
        {"disk": [disk(filesystem=4)]},
        "disk[0].filesystem",
        f"got an integer (4); expected a string holding {FILESYSTEM}",
        id="filesystem-int",
    ),
    pytest.param({"disk": [disk(filesystem="EXT4")]}, "disk[0].filesystem", f'got "EXT4"; expected {FILESYSTEM}', id="filesystem-upper"),
    pytest.param({"disk": [disk(filesystem="")]}, "disk[0].filesystem", f'got ""; expected {FILESYSTEM}', id="filesystem-empty"),
    pytest.param(
        {"disk": [disk(filesystem="ext4,ro")]}, "disk[0].filesystem", f'got "ext4,ro"; expected {FILESYSTEM}', id="filesystem-comma"
    ),
    pytest.param(
        {"disk": [disk(filesystem="exfat")]},
        "disk[0].filesystem",
        'got "exfat", which cannot keep hard links with Unix owners and permissions as snapshots need; '
        'expected a Linux filesystem such as "ext4", "btrfs" or "xfs"',
        id="filesystem-exfat",
    ),
    pytest.param(
        {"disk": [disk(filesystem="vfat")]},
        "disk[0].filesystem",
        'got "vfat", which cannot keep hard links with Unix owners and permissions as snapshots need; '
        'expected a Linux filesystem such as "ext4", "btrfs" or "xfs"',
        id="filesystem-vfat",
    ),
    pytest.param(
        {"disk": [disk(mount_options=["noatime"])]},
        "disk[0].mount_options",
        'got ["noatime"] without filesystem; expected mount_options only together with filesystem (without it, '
        "the disk is mounted through its fstab entry, whose options apply)",
        id="mount-options-without-filesystem",
    ),
    pytest.param(
        {"disk": [disk(filesystem="ext4", mount_options="noatime,nodev")]},
        "disk[0].mount_options",
        'got a string ("noatime,nodev"); expected an array of mount options such as ["noatime", "nodev"]',
        id="mount-options-string",
    ),
    pytest.param(
        {"disk": [disk(filesystem="ext4", mount_options=["noatime", "nodev,nosuid"])]},
        "disk[0].mount_options[1]",
        'got "nodev,nosuid", which holds a comma; expected one mount option per string, such as ["noatime", "nodev"]',
        id="mount-option-comma",
    ),
    pytest.param(
        {"disk": [disk(filesystem="ext4", mount_options=["no atime"])]},
        "disk[0].mount_options[0]",
        'got "no atime", which holds whitespace or a NUL character; expected one mount option without them',
        id="mount-option-space",
    ),
    pytest.param(
        {"disk": [disk(filesystem="ext4", mount_options=["noatime\t"])]},
        "disk[0].mount_options[0]",
        'got "noatime\\t", which holds whitespace or a NUL character; expected one mount option without them',
        id="mount-option-tab",
    ),
    pytest.param(
        {"disk": [disk(filesystem="ext4", mount_options=["a\x00"])]},
        "disk[0].mount_options[0]",
        'got "a\\u0000", which holds whitespace or a NUL character; expected one mount option without them',
        id="mount-option-nul",
    ),
    pytest.param(
        {"disk": [disk(filesystem="ext4", mount_options=[""])]},
        "disk[0].mount_options[0]",
        'got ""; expected a non-empty mount option such as "noatime"',
        id="mount-option-empty",
    ),
    pytest.param(
        {"disk": [disk(filesystem="ext4", mount_options=[1])]},
        "disk[0].mount_options[0]",
        'got an integer (1); expected a string holding one mount option such as "noatime"',
        id="mount-option-int",
    ),
    # duplicates across disks
    pytest.param(
        {"disk": [disk(), disk(mount_point="/mnt/other")]},
        "disk[1].name",
        'got "backup1", already the name of disk[0] ("backup1"); expected a name of its own for each disk',
        id="disk-name-duplicate",
    ),
    pytest.param(
        {"disk": [disk(), disk(name="b2", mount_point="/mnt/x"), disk(name="b3", mount_point="//mnt/backup1/")]},
        "disk[2].mount_point",
        'got "/mnt/backup1", already the mount point of disk[0] ("backup1"); '
        "expected a mount point of its own for each disk",
        id="disk-mount-point-duplicate-normalised",
    ),
    pytest.param(
        {"disk": [disk(), disk(name="backup2", mount_point="/mnt/backup2", mapped_device="/dev/mapper/backup1")]},
        "disk[1].mapped_device",
        'got "/dev/mapper/backup1", already the mapped device of disk[0] ("backup1"); '
        "expected a mapped device of its own for each disk",
        id="disk-mapped-device-duplicate",
    ),
    # [[hooks]]
    pytest.param(
        {"hooks": [hook(before_backup=["/bin/true"])]},
        "hooks[0].before_backup",
        f'unknown key "before_backup" in [[hooks]], did you mean before?; expected one of {HOOK_KEYS}',
        id="hook-unknown-key",
    ),
    pytest.param({"hooks": [hook(name=None)]}, "hooks[0].name", f"missing; expected {HOOK_NAME}", id="hook-name-missing"),
    pytest.param({"hooks": [hook(name="")]}, "hooks[0].name", f'got ""; expected {HOOK_NAME}', id="hook-name-empty"),
    pytest.param({"hooks": [hook(name="  ")]}, "hooks[0].name", f'got "  "; expected {HOOK_NAME}', id="hook-name-blank"),
    pytest.param(
        {"hooks": [hook(name=7)]}, "hooks[0].name", f"got an integer (7); expected a string holding {HOOK_NAME}", id="hook-name-int"
    ),
    pytest.param(
        {"hooks": [hook(name="a\nb")]},
        "hooks[0].name",
        'got "a\\nb", which holds a NUL or newline character; expected a name without them',
        id="hook-name-newline",
    ),
    pytest.param(
        {"hooks": [hook(), hook(around="backup")]},
        "hooks[1].name",
        'got "dump", already the name of hooks[0]; expected a name of its own for each hook',
        id="hook-name-duplicate",
    ),
    pytest.param(
        {"hooks": [hook(around=None)]},
        "hooks[0].around",
        'missing; expected one of "backup" (around the whole cycle) or "snapshot" (around the transfer)',
        id="hook-around-missing",
    ),
    pytest.param(
        {"hooks": [hook(around="transfer")]},
        "hooks[0].around",
        'got "transfer"; expected one of "backup", "snapshot"',
        id="hook-around-unknown",
    ),
    pytest.param(
        {"hooks": [hook(around="snapshots")]},
        "hooks[0].around",
        'got "snapshots" (did you mean "snapshot"?); expected one of "backup", "snapshot"',
        id="hook-around-suggested",
    ),
    pytest.param(
        {"hooks": [hook(before=None)]},
        "hooks[0]",
        f'got neither before nor after in [[hooks]] "dump"; expected at least one of them, {ARGV}',
        id="hook-neither-before-nor-after",
    ),
    pytest.param(
        {"hooks": [hook(before="pg_dumpall -f /var/backups/db.sql")]},
        "hooks[0].before",
        f'got a string ("pg_dumpall -f /var/backups/db.sql"); expected {ARGV}',
        id="hook-argv-string",
    ),
    pytest.param({"hooks": [hook(after=[])]}, "hooks[0].after", f"got an empty array; expected {ARGV}", id="hook-argv-empty"),
    pytest.param(
        {"hooks": [hook(before=["pg_dumpall", "-f", "/var/backups/db.sql"])]},
        "hooks[0].before[0]",
        f'got "pg_dumpall", a relative path; expected {PROGRAM} (starting with /): hooks are run without a PATH '
        "lookup, and `command -v pg_dumpall` shows the full path",
        id="hook-program-relative",
    ),
    pytest.param(
        {"hooks": [hook(before=[""])]},
        "hooks[0].before[0]",
        f'got "", a relative path; expected {PROGRAM} (starting with /): hooks are run without a PATH '
        "lookup, and `command -v NAME` shows the full path",
        id="hook-program-empty",
    ),
    pytest.param(
        {"hooks": [hook(before=[5])]},
        "hooks[0].before[0]",
        f"got an integer (5); expected a string holding {PROGRAM}",
        id="hook-program-int",
    ),
    pytest.param(
        {"hooks": [hook(before=["/usr/bin/../../tmp/x"])]},
        "hooks[0].before[0]",
        f'got "/usr/bin/../../tmp/x", which holds a ".." component; expected {PROGRAM} without ".."',
        id="hook-program-dotdot",
    ),
    pytest.param(
        {"hooks": [hook(after=["/bin/sleep", 5])]},
        "hooks[0].after[1]",
        'got an integer (5); expected a string, as every argument is one (write "5")',
        id="hook-argument-int",
    ),
    pytest.param(
        {"hooks": [hook(after=["/bin/echo", ["a"]])]},
        "hooks[0].after[1]",
        'got an array (["a"]); expected a string, as every argument is one',
        id="hook-argument-array",
    ),
    pytest.param(
        {"hooks": [hook(after=["/bin/echo", "a\x00b"])]},
        "hooks[0].after[1]",
        'got "a\\u0000b", which holds a NUL character; expected an argument without it',
        id="hook-argument-nul",
    ),
    pytest.param(
        {"hooks": [hook(timeout="0")]},
        "hooks[0].timeout",
        'got "0"; expected a duration of 1 second or more, such as "10m": a hook needs a time limit',
        id="hook-timeout-zero",
    ),
    pytest.param(
        {"hooks": [hook(timeout="0m")]},
        "hooks[0].timeout",
        'got "0m"; expected a duration of 1 second or more, such as "10m": a hook needs a time limit',
        id="hook-timeout-zero-minutes",
    ),
    pytest.param(
        {"hooks": [hook(timeout=600)]},
        "hooks[0].timeout",
        f'got an integer (600); {DURATION} (write "600s" for 600 seconds)',
        id="hook-timeout-int",
    ),
    pytest.param(
        {"hooks": [hook(timeout="10")]},
        "hooks[0].timeout",
        f'got "10" (a number needs a unit: "10s" for seconds); {DURATION}',
        id="hook-timeout-no-unit",
    ),
    pytest.param(
        {"hooks": [hook(timeout="8d")]},
        "hooks[0].timeout",
        'got "8d" (691200 seconds); expected at most "7d" (604800 seconds)',
        id="hook-timeout-too-long",
    ),
    pytest.param(
        {"hooks": [hook(critical="yes")]},
        "hooks[0].critical",
        'got a string ("yes"); expected a boolean (true or false)',
        id="hook-critical-string",
    ),
    # rotation.keep_free, rotation.min_snapshots
    pytest.param(
        {"rotation": {"keep_free": "10"}},
        "rotation.keep_free",
        'got "10", a number without a unit that could mean 10 bytes or 10 percent; '
        'expected "10%" for a percentage of the disk, or a size with its unit such as "10G"',
        id="keep-free-ambiguous",
    ),
    pytest.param({"rotation": {"keep_free": "%"}}, "rotation.keep_free", f'got "%"; expected {KEEP_FREE}', id="keep-free-percent-sign"),
    pytest.param({"rotation": {"keep_free": "150%"}}, "rotation.keep_free", f'got "150%"; {PERCENT}', id="keep-free-150-percent"),
    pytest.param({"rotation": {"keep_free": "100%"}}, "rotation.keep_free", f'got "100%"; {PERCENT}', id="keep-free-100-percent"),
    pytest.param({"rotation": {"keep_free": "0%"}}, "rotation.keep_free", f'got "0%"; {PERCENT}', id="keep-free-0-percent"),
    pytest.param({"rotation": {"keep_free": "0.0%"}}, "rotation.keep_free", f'got "0.0%"; {PERCENT}', id="keep-free-0.0-percent"),
    pytest.param({"rotation": {"keep_free": "-5G"}}, "rotation.keep_free", f'got "-5G"; expected {KEEP_FREE}', id="keep-free-negative"),
    pytest.param({"rotation": {"keep_free": "-5%"}}, "rotation.keep_free", f'got "-5%"; expected {KEEP_FREE}', id="keep-free-negative-percent"),
    pytest.param({"rotation": {"keep_free": "5X"}}, "rotation.keep_free", f'got "5X"; expected {KEEP_FREE}', id="keep-free-unknown-unit"),
    pytest.param({"rotation": {"keep_free": "1.5G"}}, "rotation.keep_free", f'got "1.5G"; expected {KEEP_FREE}', id="keep-free-fraction"),
    pytest.param({"rotation": {"keep_free": "20 G"}}, "rotation.keep_free", f'got "20 G"; expected {KEEP_FREE}', id="keep-free-space"),
    pytest.param({"rotation": {"keep_free": "20GB"}}, "rotation.keep_free", f'got "20GB"; expected {KEEP_FREE}', id="keep-free-gb"),
    pytest.param({"rotation": {"keep_free": ""}}, "rotation.keep_free", f'got ""; expected {KEEP_FREE}', id="keep-free-empty"),
    pytest.param(
        {"rotation": {"keep_free": "20g"}},
        "rotation.keep_free",
        f'got "20g" (the units are upper case: "20G"); expected {KEEP_FREE}',
        id="keep-free-lower-case-unit",
    ),
    pytest.param(
        {"rotation": {"keep_free": "0"}},
        "rotation.keep_free",
        'got "0"; expected a size above 0 (leave keep_free out to make no room)',
        id="keep-free-zero",
    ),
    pytest.param(
        {"rotation": {"keep_free": "0G"}},
        "rotation.keep_free",
        'got "0G"; expected a size above 0 (leave keep_free out to make no room)',
        id="keep-free-zero-gib",
    ),
    pytest.param(
        {"rotation": {"keep_free": "99999999T"}},
        "rotation.keep_free",
        'got "99999999T", more than any disk holds; expected at most 8388607T',
        id="keep-free-too-large",
    ),
    pytest.param(
        {"rotation": {"keep_free": 10}},
        "rotation.keep_free",
        f'got an integer (10); expected a string holding {KEEP_FREE} (write it as a string: "10%" for a percentage, '
        '"10G" for a size)',
        id="keep-free-int",
    ),
    pytest.param(
        {"rotation": {"keep_free": 0.1}},
        "rotation.keep_free",
        f"got a float (0.1); expected a string holding {KEEP_FREE}",
        id="keep-free-float",
    ),
    pytest.param(
        {"rotation": {"min_snapshots": 3}},
        "rotation.min_snapshots",
        "got 3 without keep_free; expected min_snapshots only together with keep_free "
        "(it is the fewest snapshots that making room may leave)",
        id="min-snapshots-without-keep-free",
    ),
    pytest.param(
        {"rotation": {"keep_free": "10%", "min_snapshots": 0}},
        "rotation.min_snapshots",
        "got 0; expected a whole number from 1 to 100000 (the newest snapshot is never deleted)",
        id="min-snapshots-zero",
    ),
    pytest.param(
        {"rotation": {"keep_free": "10%", "min_snapshots": 100001}},
        "rotation.min_snapshots",
        "got 100001; expected a whole number from 1 to 100000 (the newest snapshot is never deleted)",
        id="min-snapshots-too-many",
    ),
    pytest.param(
        {"rotation": {"keep_free": "10%", "min_snapshots": "3"}},
        "rotation.min_snapshots",
        'got a string ("3"); expected a whole number from 1 to 100000',
        id="min-snapshots-string",
    ),
    pytest.param(
        {"rotation": {"keep_free": "10%", "min_snapshots": True}},
        "rotation.min_snapshots",
        "got a boolean (true); expected a whole number from 1 to 100000",
        id="min-snapshots-bool",
    ),
]


@pytest.mark.parametrize(("data", "key", "problem"), ERRORS + LIFECYCLE_ERRORS)
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


def test_each_default_has_one_home_and_empty_tables_keep_it() -> None:
    """The defaults the reading of a file and the agent's schedule use are the model's, not copies of them."""
    from agent.config.model import DEFAULT_HOOK_TIMEOUT, DEFAULT_MIN_SNAPSHOTS
    from agent.policy import schedule

    empty = {"notifications": {}, "tray": {}, "agent": {}}
    assert settings_from_mapping(empty, FILE) == Settings(path=FILE)
    assert (Settings(path=None).interval, Settings(path=None).on_plug) == (schedule.DEFAULT_INTERVAL, schedule.DEFAULT_ON_PLUG)
    assert (schedule.Policy().interval, schedule.Policy().on_plug) == (schedule.DEFAULT_INTERVAL, schedule.DEFAULT_ON_PLUG)
    hook = {"name": "h", "around": "backup", "before": ["/bin/true"]}
    assert settings_from_mapping({"hooks": [hook]}, FILE).hooks[0].timeout == DEFAULT_HOOK_TIMEOUT == Hook("h", "backup").timeout
    kept = settings_from_mapping({"rotation": {"keep_free": "10%"}}, FILE).keep_free
    assert kept is not None and kept.min_snapshots == DEFAULT_MIN_SNAPSHOTS == KeepFree(percent=10.0).min_snapshots


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
    assert settings.tray is True
    assert settings.remind_after == 7


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
        "notifications": {"enabled": False, "remind_after": 0},
        "tray": {"enabled": False},
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
        remind_after=0,
        tray=False,
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
    scheme = settings_from_mapping({"rotation": {"hourly": validate.MAX_COUNT}}, FILE).rotation
    assert dict(scheme.counts) == {"hourly": validate.MAX_COUNT}


SNAPSHOT = "2026-11-22T13-00-00+0100"


@given(
    st.dictionaries(
        st.sampled_from(FREQUENCIES),
        st.one_of(st.integers(0, 5), st.just(validate.MAX_COUNT), st.just("always")),
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
# The disk lifecycle's settings: defaults and valid values


def test_new_defaults() -> None:
    settings = Settings(path=None)
    assert (settings.disks, settings.hooks, settings.keep_free) == ((), (), None)
    assert (settings.state_dir, settings.crypttab, settings.fstab) == ("/var/lib/backup-agent", "/etc/crypttab", "/etc/fstab")
    assert settings.commands == Commands(
        rsync="/usr/bin/rsync",
        ionice="/usr/bin/ionice",
        nice="/usr/bin/nice",
        rm="/bin/rm",
        blkid="/sbin/blkid",
        cryptdisks_start="/sbin/cryptdisks_start",
        cryptdisks_stop="/sbin/cryptdisks_stop",
        systemctl="/bin/systemctl",
        mount="/bin/mount",
        umount="/bin/umount",
        sync="/bin/sync",
    )


def test_disk_defaults() -> None:
    settings = settings_from_mapping({"disk": [disk()]}, FILE, hostname="myhost")
    assert settings.disks == (
        Disk(
            name="backup1",
            luks_uuid=UUID,
            mount_point="/mnt/backup1",
            mapped_device="/dev/mapper/backup1",
            repository="/mnt/backup1/myhost",
            unlock="auto",
            filesystem=None,
            mount_options=(),
        ),
    )


def test_default_repository_is_named_after_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "laptop.example")
    assert settings_from_mapping({"disk": [disk()]}, FILE).disks[0].repository == "/mnt/backup1/laptop.example"


@pytest.mark.parametrize("hostname", ["", ".", "..", "-x"])
def test_a_host_name_that_makes_no_directory_needs_a_repository(hostname: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_mapping({"disk": [disk()]}, FILE, hostname=hostname)
    assert (info.value.key, info.value.problem) == (
        "disk[0].repository",
        f'not set, and this machine\'s host name "{hostname}" makes no directory name; expected repository set to '
        "a directory below the mount point, such as /mnt/backup1/backups",
    )
    given = settings_from_mapping({"disk": [disk(repository="/mnt/backup1/backups")]}, FILE, hostname=hostname)
    assert given.disks[0].repository == "/mnt/backup1/backups"


def test_every_disk_key() -> None:
    table = {
        "name": "Off-site_2.b",
        "luks_uuid": UUID.upper(),
        "mount_point": "/media//offsite/",
        "mapped_device": "/dev/mapper/luks-offsite/",
        "repository": "/media/offsite/./machines//myhost/",
        "unlock": "systemd",
        "filesystem": "ext4",
        "mount_options": ["noatime", "nodev", "errors=remount-ro"],
    }
    assert settings_from_mapping({"disk": [table]}, FILE, hostname="ignored").disks == (
        Disk(
            name="Off-site_2.b",
            luks_uuid=UUID,  # stored in lower case
            mount_point="/media/offsite",
            mapped_device="/dev/mapper/luks-offsite",
            repository="/media/offsite/machines/myhost",
            unlock="systemd",
            filesystem="ext4",
            mount_options=("noatime", "nodev", "errors=remount-ro"),
        ),
    )


def test_several_disks_keep_their_order() -> None:
    disks = settings_from_mapping(
        {"disk": [disk(), disk(name="offsite", mount_point="/mnt/offsite", unlock="cryptdisks")]}, FILE, hostname="h"
    ).disks
    assert [(d.name, d.mapped_device, d.repository, d.unlock) for d in disks] == [
        ("backup1", "/dev/mapper/backup1", "/mnt/backup1/h", "auto"),
        ("offsite", "/dev/mapper/offsite", "/mnt/offsite/h", "cryptdisks"),
    ]


def test_no_disks_is_fine() -> None:
    assert settings_from_mapping({"disk": []}, FILE).disks == ()


@pytest.mark.parametrize("name", ["b", "0", "backup1", "a" * 64, "my.disk-2_x", "UPPER"])
def test_disk_names_accepted(name: str) -> None:
    table = disk(name=name)
    assert settings_from_mapping({"disk": [table]}, FILE, hostname="h").disks[0].mapped_device == f"/dev/mapper/{name}"


@pytest.mark.parametrize("mount_point", ["/mnt", "/media", "/run/media/me/backup", "/mnt/backup1", "/backup"])
def test_mount_points_accepted(mount_point: str) -> None:
    assert settings_from_mapping({"disk": [disk(mount_point=mount_point)]}, FILE, hostname="h").disks[0].mount_point == mount_point


def test_mount_options_may_be_empty_with_a_filesystem() -> None:
    found = settings_from_mapping({"disk": [disk(filesystem="btrfs", mount_options=[])]}, FILE, hostname="h").disks[0]
    assert (found.filesystem, found.mount_options) == ("btrfs", ())


def test_settings_from_mapping_asks_for_the_hostname_only_with_disks(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_hostname() -> str:
        raise AssertionError("gethostname called without disks")

    monkeypatch.setattr(socket, "gethostname", no_hostname)
    assert settings_from_mapping({"backup": {"nice": 3}}, FILE).nice == 3


def test_system_table() -> None:
    fields = {"state_dir": "/var/lib/backup-agent/", "crypttab": "/etc//crypttab", "fstab": "/etc/fstab.d/./x"}
    settings = settings_from_mapping({"system": fields}, FILE)
    assert (settings.state_dir, settings.crypttab, settings.fstab) == ("/var/lib/backup-agent", "/etc/crypttab", "/etc/fstab.d/x")


def test_new_commands() -> None:
    keys = ("blkid", "cryptdisks_start", "cryptdisks_stop", "cryptsetup", "systemctl", "mount", "umount", "sync")
    table = {key: f"/opt/tools/{key}" for key in keys}
    commands = settings_from_mapping({"commands": table}, FILE).commands
    assert commands == Commands(**table)
    assert commands.rsync == "/usr/bin/rsync"  # the others keep their defaults


def test_hook_defaults() -> None:
    hooks = settings_from_mapping({"hooks": [hook()]}, FILE).hooks
    assert hooks == (
        Hook(name="dump", around="snapshot", before=("/usr/bin/true",), after=None, timeout=600, critical=True),
    )


def test_every_hook_key() -> None:
    tables = [
        {
            "name": "mail server",
            "around": "backup",
            "before": ["/bin/systemctl", "stop", "postfix.service"],
            "after": ["/bin/systemctl", "start", "postfix.service"],
            "timeout": "2m",
            "critical": False,
        },
        {"name": "database dump", "around": "snapshot", "after": ["//usr/bin/rm/", "-f", "", "a\nb"], "timeout": "7d"},
    ]
    assert settings_from_mapping({"hooks": tables}, FILE).hooks == (
        Hook("mail server", "backup", ("/bin/systemctl", "stop", "postfix.service"), ("/bin/systemctl", "start", "postfix.service"), 120, False),
        Hook("database dump", "snapshot", None, ("/usr/bin/rm", "-f", "", "a\nb"), 604800, True),
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("123", (123, None)),
        ("100", (100, None)),
        ("1K", (1024, None)),
        ("500M", (500 * 1024**2, None)),
        ("20G", (20 * 1024**3, None)),
        ("1T", (1024**4, None)),
        ("8388607T", (8388607 * 1024**4, None)),
        ("10%", (None, 10.0)),
        ("12.5%", (None, 12.5)),
        ("0.5%", (None, 0.5)),
        ("99.9%", (None, 99.9)),
    ],
)
def test_parse_keep_free(text: str, expected: tuple[int | None, float | None]) -> None:
    assert parse_keep_free(text) == expected


@pytest.mark.parametrize("text", ["10", "%", "150%", "0%", "-5G", "5X", "", "0", "1.5G", "10 %", "١٠%", "10g"])
def test_parse_keep_free_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=r'^got "'):
        parse_keep_free(text)


@pytest.mark.parametrize(
    ("table", "key", "problem"),
    [
        ({"rotation": {"keep_free": "9" * 5000 + "G"}}, "rotation.keep_free", "more than any disk holds"),
        ({"hooks": [hook(timeout="9" * 5000 + "s")]}, "hooks[0].timeout", "expected a duration string"),
        ({"backup": {"io_timeout": "9" * 5000 + "s"}}, "backup.io_timeout", "expected a duration string"),
    ],
    ids=["keep-free", "hook-timeout", "io-timeout"],
)
def test_numbers_too_long_for_int_are_config_errors(table: dict[str, Any], key: str, problem: str) -> None:
    error = config_error(table)
    assert error.key == key and problem in error.problem and len(str(error)) < 400


def test_keep_free_into_settings() -> None:
    assert settings_from_mapping({"rotation": {"daily": 7}}, FILE).keep_free is None
    assert settings_from_mapping({"rotation": {"keep_free": "20G"}}, FILE).keep_free == KeepFree(
        bytes=20 * 1024**3, percent=None, min_snapshots=3
    )
    settings = settings_from_mapping({"rotation": {"keep_free": "10%", "min_snapshots": 1, "daily": 7}}, FILE)
    assert settings.keep_free == KeepFree(bytes=None, percent=10.0, min_snapshots=1)
    assert settings.rotation == Scheme(counts={"daily": 7})  # keep_free leaves the scheme alone


# --------------------------------------------------------------------------
# Root executes only what root owns: [commands] and hook programs, hooks' file

PROGRAM_TRUST = (
    "expected a program owned by root and writable only by root, in directories owned by root and writable only "
    "by root (symbolic links on the way included), because backup-agent runs it as root"
)


def world_writable_above(path: Path) -> str:
    """The topmost group/other-writable directory above path (pytest's tmp_path: /tmp)."""
    found = next((str(parent) for parent in reversed(path.parents) if os.lstat(parent).st_mode & 0o022), None)
    if found is None:
        pytest.skip(reason=f"no world-writable directory above {path} (pytest --basetemp elsewhere)")
    return found


def writable_problem(path: Path) -> str:
    directory = world_writable_above(path)
    return f"{directory} is writable by group or others (mode {stat.S_IMODE(os.lstat(directory).st_mode):04o})"


def make_program(directory: Path, name: str = "rsync") -> str:
    path = directory / name
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """load_settings believes it runs as root: the checks apply to this test's own files too."""
    monkeypatch.setattr(os, "geteuid", lambda: 0)


def test_named_programs() -> None:
    data = {
        "commands": {"rsync": "/opt/rsync/", "mount": "/usr/bin/mount"},
        "hooks": [hook(after=["/bin/rm", "x"]), hook(name="b", before=None, after=["/usr/bin/env", "a"])],
    }
    settings = settings_from_mapping(data, FILE)
    assert named_programs(data, settings) == (
        ("commands.rsync", "/opt/rsync"),  # normalised, in the field order of Commands
        ("commands.mount", "/usr/bin/mount"),
        ("hooks[0].before", "/usr/bin/true"),
        ("hooks[0].after", "/bin/rm"),
        ("hooks[1].after", "/usr/bin/env"),
    )
    assert named_programs({}, Settings(path=None)) == ()  # defaults are system paths, not checked


def test_untrusted_command_refused_as_root(tmp_path: Path, as_root: None) -> None:
    program = make_program(tmp_path)
    path = write(tmp_path, f'[commands]\nrsync = "{program}"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    # Not as root, the test's own file is owned by the test's uid: that is found first.
    problem = writable_problem(tmp_path) if IS_ROOT else f"{program} is owned by uid {os.getuid()}, not root"
    assert str(info.value) == f'{path}: commands.rsync: got "{program}", but {problem}; {PROGRAM_TRUST}'


def test_untrusted_hook_program_refused_as_root(trusted_dir: Path, tmp_path: Path, as_root: None) -> None:
    program = make_program(tmp_path, "dump")
    path = write(
        trusted_dir,
        f'[[hooks]]\nname = "a"\naround = "backup"\nafter = ["/bin/true"]\n'
        f'[[hooks]]\nname = "b"\naround = "snapshot"\nbefore = ["/bin/true"]\nafter = ["{program}", "--all"]\n',
    )
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    if not IS_ROOT:  # trusted_dir is tmp_path: the file is the test's own
        assert info.value.key == "hooks"
        return
    assert str(info.value) == (
        f'{path}: hooks[1].after: got "{program}", but {writable_problem(tmp_path)}; {PROGRAM_TRUST}'
    )


def test_programs_are_not_checked_unless_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    program = make_program(tmp_path)
    path = write(tmp_path, f'[commands]\nrsync = "{program}"\n[[hooks]]\nname = "x"\naround = "backup"\nbefore = ["{program}"]\n')
    settings = load_settings(path)
    assert settings.commands.rsync == program and settings.hooks[0].before == (program,)


def test_trusted_program_in_trusted_dir_accepted(trusted_dir: Path) -> None:
    """The stand-in programs of tests live in trusted_dir, and the cycle run as root accepts them."""
    program = make_program(trusted_dir)
    path = write(
        trusted_dir,
        f'[commands]\nrsync = "{program}"\n[[hooks]]\nname = "x"\naround = "backup"\nbefore = ["{program}", "-v"]\n',
    )
    os.chmod(path, 0o644)
    settings = load_settings(path)
    assert settings.commands.rsync == program
    assert settings.hooks[0].before == (program, "-v")


def test_default_paths_through_merged_usr_accepted(tmp_path: Path, as_root: None) -> None:
    """Every default command path, given explicitly, passes: /bin and /sbin may be root's links to usr/."""
    if IS_ROOT:
        assert os.path.islink("/bin") or os.path.isdir("/bin")  # either way it must pass
    table = "\n".join(f'{key} = "{value}"' for key, value in dataclasses.asdict(Commands()).items())
    path = write(tmp_path, f"[commands]\n{table}\n")
    assert load_settings(path).commands == Commands()
    for program in dataclasses.asdict(Commands()).values():
        assert trust.untrusted_program(program) is None, program


def test_merged_usr_symlink_is_root_owned_here() -> None:
    """So the test above does go through a root-owned symbolic link on this machine (skipped where /usr is split)."""
    if not os.path.islink("/bin"):
        pytest.skip(reason="/bin is a directory here: no merged /usr")
    assert os.lstat("/bin").st_uid == 0
    assert trust.untrusted_program("/bin/sh") is None
    assert os.path.realpath("/bin/sh") != "/bin/sh"


@needs_root
def test_program_through_a_symlink_owned_by_another_uid_refused(trusted_dir: Path, as_root: None) -> None:
    program = make_program(trusted_dir)
    link = trusted_dir / "rsync-link"
    link.symlink_to(program)
    path = write(trusted_dir, f'[commands]\nrsync = "{link}"\n')
    os.chmod(path, 0o644)
    assert load_settings(path).commands.rsync == str(link)  # root's link: followed
    os.lchown(link, 65534, 65534)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(info.value) == (
        f'{path}: commands.rsync: got "{link}", but {link} is a symbolic link owned by uid 65534, not root; {PROGRAM_TRUST}'
    )


@needs_root
def test_program_in_a_directory_reached_through_a_foreign_symlink_refused(trusted_dir: Path) -> None:
    real = trusted_dir / "real"
    real.mkdir(mode=0o755)
    make_program(real)
    (trusted_dir / "bin").symlink_to("real")
    os.lchown(trusted_dir / "bin", 1000, 1000)
    assert trust.untrusted_program(str(trusted_dir / "bin" / "rsync")) == (
        f"{trusted_dir / 'bin'} is a symbolic link owned by uid 1000, not root"
    )


@needs_root
def test_program_owned_by_another_uid_refused(trusted_dir: Path) -> None:
    program = make_program(trusted_dir)
    os.chown(program, 1000, 1000)
    assert trust.untrusted_program(program) == f"{program} is owned by uid 1000, not root"
    os.chown(program, 0, 0)
    os.chmod(program, 0o775)
    assert trust.untrusted_program(program) == f"{program} is writable by group or others (mode 0775)"


def test_missing_program_accepted_only_where_no_one_else_can_create_it(tmp_path: Path) -> None:
    assert trust.untrusted_program("/usr/bin/backup-agent-test-no-such-program") is None
    assert trust.untrusted_program("/usr/lib/no-such-dir/no-such-program") is None
    assert trust.untrusted_program(str(tmp_path / "absent")) == writable_problem(tmp_path)


def test_hooks_in_an_untrusted_file_refused_as_root(tmp_path: Path, as_root: None) -> None:
    path = write(tmp_path, '[[hooks]]\nname = "x"\naround = "backup"\nbefore = ["/bin/true"]\n')
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    problem = writable_problem(tmp_path) if IS_ROOT else f"{path} is owned by uid {os.getuid()}, not root"
    assert str(info.value) == (
        f"{path}: hooks: got [[hooks]] in a file that root does not control ({problem}); hooks are run as root, "
        "so they are read only from a file that root owns and only root can write: expected this file and every "
        f"directory above it to be owned by root and writable by root only (such as {SYSTEM_CONFIG})"
    )
    # The same file without hooks is read (no program named, nothing to run).
    path = write(tmp_path, "[backup]\nnice = 2\n")
    assert load_settings(path).nice == 2


def test_a_validation_error_comes_before_the_hooks_file_check(tmp_path: Path, as_root: None) -> None:
    path = write(tmp_path, '[[hooks]]\nname = "x"\naround = "backup"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert info.value.key == "hooks[0]"


@needs_root
def test_hooks_in_a_trusted_file_accepted_as_root(trusted_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(trusted_dir, '[[hooks]]\nname = "x"\naround = "backup"\nbefore = ["/bin/true"]\n')
    os.chmod(path, 0o644)
    assert load_settings(path).hooks[0].name == "x"
    monkeypatch.chdir(trusted_dir)
    assert load_settings("config.toml").hooks[0].name == "x"  # a relative --config too
    monkeypatch.setattr(load, "SYSTEM_CONFIG", path)
    assert load_settings(through_sudo=True).hooks[0].name == "x"
    os.chmod(path, 0o664)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert info.value.key == "hooks"
    assert f"({path} is writable by group or others (mode 0664))" in info.value.problem


# --------------------------------------------------------------------------
# The example config's commented disk and hooks


def uncommented_block(first_line: str) -> str:
    """The example's commented block from first_line to the next blank line, uncommented."""
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    start = lines.index(first_line)
    block = []
    for line in lines[start:]:
        if not line.strip():
            break
        block.append(line.removeprefix("#").removeprefix(" "))
    return "\n".join(block) + "\n"


def test_example_commented_disk_and_hooks_are_valid() -> None:
    hooks_text = EXAMPLE.read_text(encoding="utf-8").split("# [[hooks]]", 1)[1]
    hooks_block = "\n".join(
        line.removeprefix("#").removeprefix(" ") for line in ("# [[hooks]]" + hooks_text).splitlines()
    )
    keep_free = uncommented_block("# keep_free = \"10%\"")
    data = tomllib.loads(uncommented_block("# [[disk]]") + hooks_block + "\n[rotation]\n" + keep_free)
    settings = settings_from_mapping(data, str(EXAMPLE), hostname="myhost")
    assert settings.disks[0] == Disk(
        name="backup1",
        luks_uuid="0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
        mount_point="/mnt/backup1",
        mapped_device="/dev/mapper/backup1",
        repository="/mnt/backup1/myhost",
        unlock="auto",
        filesystem="ext4",
        mount_options=("noatime", "nodev"),
        layout="btrfs",
    )
    assert [(hook.name, hook.around) for hook in settings.hooks] == [
        ("stop the mail server", "backup"),
        ("database dump", "snapshot"),
    ]
    assert settings.keep_free == KeepFree(bytes=None, percent=10.0, min_snapshots=3)


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
    with pytest.raises(ValueError, match=r'^invalid duration ".*"(?: \(a number needs a unit: "10s" for seconds\))?: '
                                         r'expected a duration string such as "90s"'):
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
    monkeypatch.setattr(load, "SYSTEM_CONFIG", str(tmp_path / "absent.toml"))
    assert load_settings() == Settings(path=None)
    assert load_settings(None, through_sudo=True) == Settings(path=None)


def test_no_path_reads_the_system_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[backup]\nnice = 7\n")
    monkeypatch.setattr(load, "SYSTEM_CONFIG", path)
    assert load_settings() == Settings(path=path, nice=7)


def test_system_config_constant() -> None:
    assert SYSTEM_CONFIG == "/etc/backup-agent/config.toml"


# --------------------------------------------------------------------------
# The example config


def test_example_config_loads_and_shows_the_defaults() -> None:
    assert load_settings(str(EXAMPLE)) == Settings(path=str(EXAMPLE))


def test_example_config_mentions_every_key() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    for table, keys in [*validate._TABLE_KEYS.items(), *validate._ARRAY_KEYS.items()]:
        assert f"\n[{table}]\n" in text or f"\n# [[{table}]]\n" in text, f"[{table}] missing from {EXAMPLE}"
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


@needs_root
def test_symlinked_file_owned_by_another_uid_refused(trusted_dir: Path) -> None:
    target = write(trusted_dir, "", "real.toml")
    os.chmod(target, 0o644)
    link = trusted_dir / "config.toml"
    link.symlink_to(target)
    os.lchown(link, 65534, 65534)
    error = trusted_error(str(link))
    assert error.problem == f"refusing an unsafe config: {link} is a symbolic link owned by uid 65534, not root; {UNSAFE}"


@needs_root
def test_root_owned_symlinked_file_in_a_trusted_directory_is_followed(trusted_dir: Path) -> None:
    target = write(trusted_dir, "", "real.toml")
    os.chmod(target, 0o644)
    (trusted_dir / "config.toml").symlink_to("real.toml")  # relative target
    check_trusted(str(trusted_dir / "config.toml"))
    os.chmod(target, 0o664)  # the target is examined, not the link
    error = trusted_error(str(trusted_dir / "config.toml"))
    assert error.problem == f"refusing an unsafe config: {target} is writable by group or others (mode 0664); {UNSAFE}"


@needs_root
def test_root_owned_symlink_to_an_untrusted_place_refused(trusted_dir: Path, tmp_path: Path) -> None:
    target = write(tmp_path, "")
    os.chmod(target, 0o644)
    (trusted_dir / "config.toml").symlink_to(target)
    error = trusted_error(str(trusted_dir / "config.toml"))
    assert error.problem.startswith("refusing an unsafe config: ")
    assert "is writable by group or others" in error.problem  # /tmp, or a directory below it


def test_symlinked_file_in_an_untrusted_directory_refused(tmp_path: Path) -> None:
    target = write(tmp_path, "", "real.toml")
    os.chmod(target, 0o644)
    link = tmp_path / "config.toml"
    link.symlink_to(target)
    error = trusted_error(str(link))
    if IS_ROOT:  # the link is root's, but the directory that holds it is not root's alone
        assert "is writable by group or others" in error.problem
    else:
        assert error.problem == (
            f"refusing an unsafe config: {link} is a symbolic link owned by uid {os.geteuid()}, not root; {UNSAFE}"
        )


def test_symlink_loop_refused(trusted_dir: Path) -> None:
    (trusted_dir / "a").symlink_to("b")
    (trusted_dir / "b").symlink_to("a")
    problem = trust.untrusted_program(str(trusted_dir / "a"))
    assert problem is not None
    if IS_ROOT:
        assert problem == f"{trusted_dir / 'a'} leads through more than 40 symbolic links"


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
        pytest.skip(reason=f"no world-writable directory above {tmp_path} (pytest --basetemp elsewhere)")
    path = write(tmp_path, "")
    os.chmod(path, 0o644)
    error = trusted_error(path)
    mode = stat.S_IMODE(os.lstat(writable).st_mode)
    assert error.problem == (
        f"refusing an unsafe config: {writable} is writable by group or others (mode {mode:04o}); {UNSAFE}"
    )


@needs_root
def test_root_owned_file_under_root_owned_dirs_accepted(trusted_dir: Path) -> None:
    path = write(trusted_dir, "[backup]\n")
    os.chmod(path, 0o644)
    check_trusted(path)  # no error
    os.chmod(path, 0o600)
    check_trusted(path)


@needs_root
def test_file_owned_by_another_uid_refused(trusted_dir: Path) -> None:
    path = write(trusted_dir, "")
    os.chmod(path, 0o644)
    os.chown(path, 65534, 65534)
    error = trusted_error(path)
    assert error.problem == f"refusing an unsafe config: {path} is owned by uid 65534, not root; {UNSAFE}"


@needs_root
def test_directory_owned_by_another_uid_refused(trusted_dir: Path) -> None:
    sub = trusted_dir / "sub"
    sub.mkdir(mode=0o755)
    path = write(sub, "")
    os.chmod(path, 0o644)
    os.chown(sub, 65534, 65534)
    error = trusted_error(path)
    assert error.problem == f"refusing an unsafe config: {sub} is owned by uid 65534, not root; {UNSAFE}"


@needs_root
def test_group_writable_directory_refused(trusted_dir: Path) -> None:
    sub = trusted_dir / "sub"
    sub.mkdir()
    os.chmod(sub, 0o775)
    path = write(sub, "")
    os.chmod(path, 0o644)
    error = trusted_error(path)
    assert error.problem == f"refusing an unsafe config: {sub} is writable by group or others (mode 0775); {UNSAFE}"


@needs_root
def test_symlinked_directory_owned_by_another_uid_refused(trusted_dir: Path) -> None:
    real = trusted_dir / "real"
    real.mkdir(mode=0o755)
    os.chmod(write(real, ""), 0o644)
    (trusted_dir / "link").symlink_to(real)
    path = str(trusted_dir / "link" / "config.toml")
    check_trusted(path)  # root's link in root's directory: followed
    os.lchown(trusted_dir / "link", 65534, 65534)
    error = trusted_error(path)
    assert error.problem == (
        f"refusing an unsafe config: {trusted_dir / 'link'} is a symbolic link owned by uid 65534, not root; {UNSAFE}"
    )


@needs_root
def test_through_sudo_reads_a_config_through_a_root_symlink(trusted_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """NixOS-style /etc/backup-agent/config.toml -> a root-owned file elsewhere."""
    real = trusted_dir / "store"
    real.mkdir(mode=0o755)
    target = write(real, "[backup]\nnice = 4\n")
    os.chmod(target, 0o644)
    link = trusted_dir / "config.toml"
    link.symlink_to(target)
    monkeypatch.setattr(load, "SYSTEM_CONFIG", str(link))
    assert load_settings(through_sudo=True) == Settings(path=str(link), nice=4)


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
    monkeypatch.setattr(load, "SYSTEM_CONFIG", path)
    assert load_settings().nice == 3  # read when not through sudo
    for explicit in (None, path):
        with pytest.raises(ConfigError) as info:
            load_settings(explicit, through_sudo=True)
        assert str(info.value) == (
            f"{path}: refusing an unsafe config: {path} is writable by group or others (mode 0666); {UNSAFE}"
        )


@needs_root
def test_through_sudo_reads_a_trusted_system_config(trusted_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(trusted_dir, "[backup]\nnice = 3\n")
    os.chmod(path, 0o644)
    monkeypatch.setattr(load, "SYSTEM_CONFIG", path)
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


# -- [agent] ----------------------------------------------------------------------


def test_agent_defaults_and_values() -> None:
    assert (Settings(path=None).interval, Settings(path=None).on_plug) == (3600, "if-due")
    settings = settings_from_mapping({"agent": {"interval": "30m", "on_plug": "always"}}, "/c.toml")
    assert (settings.interval, settings.on_plug) == (1800, "always")


@pytest.mark.parametrize(
    ("table", "key", "problem"),
    [
        ({"interval": "30s"}, "agent.interval", 'got "30s"; expected at least "1m"'),
        ({"interval": 3600}, "agent.interval", "expected a duration string"),
        ({"interval": "1 hour"}, "agent.interval", "expected a duration string"),
        ({"on_plug": "sometimes"}, "agent.on_plug", 'got "sometimes"; expected "if-due" or "always"'),
        ({"on_plug": True}, "agent.on_plug", 'expected "if-due" or "always"'),
        ({"interva": "1h"}, "agent.interva", "interval"),
    ],
)
def test_agent_errors_name_the_key(table: dict[str, object], key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping({"agent": table}, "/c.toml")
    assert caught.value.key == key
    assert problem in str(caught.value)
    assert str(caught.value).startswith(f"/c.toml: {key}: ")


def test_a_config_path_that_cannot_be_examined_is_told_as_such_not_as_distrust() -> None:
    """lstat fails (a name too long for the filesystem): nothing to trust, and the message says why."""
    path = "/" + "x" * 300 + "/config.toml"
    with pytest.raises(ConfigError) as caught:
        check_trusted(path)
    message = str(caught.value)
    assert "cannot examine" in message and "File name too long" in message
    assert "expected a readable path" in message and "refusing an unsafe config" not in message


def test_example_commented_reports_are_valid() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    block = text[text.index("# [[report]]") : text.index("# Hooks:")]
    data = tomllib.loads("\n".join(line.removeprefix("#").removeprefix(" ") for line in block.splitlines()))
    mail, ping = settings_from_mapping(data, str(EXAMPLE)).reports
    assert isinstance(mail, MailReport) and isinstance(ping, PingReport)
    assert (mail.security, mail.port, mail.on, mail.timeout) == ("starttls", 587, ("failure", "stale"), 30)
    assert (ping.url, ping.on, ping.timeout) == ("https://hc-ping.com/your-check-uuid", ("failure", "success", "stale"), 10)


# --------------------------------------------------------------------------
# [[report]]

MAIL = {"type": "mail", "host": "smtp.example.org", "from": "backup@example.org", "to": ["admin@example.org"]}


def test_report_defaults() -> None:
    mail, ping = settings_from_mapping({"report": [MAIL, {"type": "ping", "url": "https://hc-ping.com/abc/"}]}, FILE).reports
    assert mail == MailReport(host="smtp.example.org", sender="backup@example.org", to=("admin@example.org",))
    assert (mail.port, mail.security, mail.on, mail.timeout) == (587, "starttls", ("failure", "stale"), 30)
    assert ping == PingReport(url="https://hc-ping.com/abc", timeout=10, on=("failure", "success", "stale"))
    tls = settings_from_mapping({"report": [{**MAIL, "security": "tls", "on": ["stale", "failure", "stale"]}]}, FILE).reports[0]
    assert isinstance(tls, MailReport) and (tls.port, tls.on) == (465, ("failure", "stale"))
    assert settings_from_mapping({}, FILE).reports == ()


@pytest.mark.parametrize(
    ("report", "key", "problem"),
    [
        ({"type": "sms"}, "report[0].type", 'got "sms"; expected one of "mail", "ping"'),
        ({**MAIL, "to": "admin@example.org"}, "report[0].to", 'got "admin@example.org"; expected an array of addresses'),
        ({**MAIL, "to": ["admin@example.org\nBcc: x@y"]}, "report[0].to[0]", "expected a mail address"),
        ({**MAIL, "from": "Backup <b@example.org>"}, "report[0].from", "expected a mail address"),
        ({**MAIL, "user": "me"}, "report[0]", "got only one of user and password_file"),
        ({**MAIL, "user": "me", "password_file": "/etc/p", "security": "none"}, "report[0].security", "never crosses the network in clear"),
        ({**MAIL, "security": "ssl"}, "report[0].security", 'got "ssl"; expected one of "starttls", "tls", "none"'),
        ({**MAIL, "port": 0}, "report[0].port", "expected a TCP port from 1 to 65535"),
        ({**MAIL, "password_file": "secret.txt", "user": "me"}, "report[0].password_file", "a relative path"),
        ({**MAIL, "url": "https://x"}, "report[0].url", "is not one of a mail report's"),
        ({**MAIL, "on": []}, "report[0].on", "expected an array of one or more of"),
        ({**MAIL, "on": ["failed"]}, "report[0].on[0]", '(did you mean "failure"?)'),
        ({**MAIL, "timeout": "10m"}, "report[0].timeout", 'expected a duration from "1s" to "5m"'),
        ({"type": "ping", "url": "hc-ping.com/abc"}, "report[0].url", "expected an http:// or https:// URL"),
        ({"type": "ping", "url": "https://hc-ping.com/abc/fail"}, "report[0].url", "/start and /fail are added to it"),
        ({"type": "ping", "url": "https://h/x", "host": "h"}, "report[0].host", "is not one of a ping report's"),
        ({"type": "ping"}, "report[0].url", "missing; expected an http:// or https:// URL"),
    ],
)
def test_report_refusals(report: dict[str, object], key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_mapping({"report": [report]}, FILE)
    assert info.value.key == key and problem in info.value.problem, info.value.message
