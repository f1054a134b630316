"""Validation: parsed TOML (plain dicts) in, :class:`~agent.config.model.Settings` out, pure.

Kept apart from reading the file (:mod:`agent.config.load`), so every rule is
tested with plain dicts. Each value and table has its validator; a problem
is refused in one line (:mod:`agent.config.messages`) that names the
``table.key``, the value found and what was expected. Also here, as they
read the same keys: :func:`check_exclude`, the rule rsync's argv builder
applies to every exclude too, and :func:`named_programs`, the programs a
file names, which root runs only when :mod:`agent.config.trust` accepts them.
"""

from __future__ import annotations

import posixpath
import re
import socket
from types import MappingProxyType
from typing import Any, Final, Mapping, Sequence

from agent.core.commands import IONICE_CLASSES
from agent.policy.rotation import DEFAULT_SCHEME, FREQUENCIES, Count, Scheme
from agent.policy.schedule import ON_PLUG_CHOICES
from agent.policy.conditions import parse_quiet_hours
from agent.config.messages import fail, got_type, literal, quote, show, suggest
from agent.config.offsite_keys import OFFSITE_KEYS
from agent.config.model import (
    DEFAULT_HOOK_TIMEOUT,
    DEFAULT_MIN_SNAPSHOTS,
    FREEZE_CHOICES,
    REPORT_WHEN,
    CommandSource,
    Commands,
    Disk,
    Hook,
    KeepFree,
    MailReport,
    Packages,
    PingReport,
    RemoteRepository,
    Report,
    Settings,
    SourceSpec,
)
from agent.config.source_names import directory_for, directory_problem

# Top-level directories that hold the system itself: a repository there would
# mix snapshots into (or delete from) the running system.
SYSTEM_DIRECTORIES: Final = frozenset(
    {
        "/",
        "/bin",
        "/boot",
        "/dev",
        "/etc",
        "/lib",
        "/lib32",
        "/lib64",
        "/libx32",
        "/proc",
        "/run",
        "/sbin",
        "/sys",
        "/usr",
        "/var",
    }
)

# Gentlest first ("idle" is class 3), as commands.py knows them, then "none".
IONICE_CHOICES: Final[tuple[str, ...]] = (
    *sorted(IONICE_CLASSES, key=lambda name: IONICE_CLASSES[name], reverse=True),
    "none",
)
NICE_RANGE: Final = (0, 19)
# More periods than this cannot be meant (100000 hours are 11 years, 100000
# days 270): such a count is a typo, or a try at "forever", which is "always".
MAX_COUNT: Final = 100_000
# rsync's --timeout is a C int.
MAX_IO_TIMEOUT: Final = 2**31 - 1
MAX_REMIND_DAYS: Final = 3650
# Destination layouts (README, "Choosing a layout") and transfer methods.
LAYOUT_CHOICES: Final[tuple[str, ...]] = ("auto", "links", "btrfs")
METHOD_CHOICES: Final[tuple[str, ...]] = ("rsync", "send")  # [notifications] remind_after: ten years

_TABLE_KEYS: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        "backup": (
            "source",
            "repository",
            "exclude",
            "one_file_system",
            "ionice",
            "nice",
            "skip_cachedir_tagged",
            "io_timeout",
            "freeze",
            "layout",
            "method",
        ),
        "rotation": (*FREQUENCIES, "prefer_recent", "strict", "keep_free", "min_snapshots"),
        "commands": (
            "rsync",
            "ionice",
            "nice",
            "rm",
            "blkid",
            "cryptdisks_start",
            "cryptdisks_stop",
            "cryptsetup",
            "systemctl",
            "mount",
            "umount",
            "sync",
            "btrfs",
            "unshare",
            "ssh",
            "restic",
            "find",
        ),
        "notifications": ("enabled", "remind_after"),
        "tray": ("enabled",),
        "system": ("state_dir", "crypttab", "fstab"),
        "agent": ("interval", "on_plug"),
        "packages": ("enabled",),
        "conditions": ("battery_below", "skip_metered", "quiet_hours"),
    }
)
# Arrays of tables ([[disk]], [[hooks]]): each element has these keys.
_ARRAY_KEYS: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        "disk": (
            "name",
            "luks_uuid",
            "mount_point",
            "mapped_device",
            "repository",
            "unlock",
            "filesystem",
            "mount_options",
            "layout",
        ),
        "hooks": ("name", "around", "before", "after", "timeout", "critical"),
        "report": (
            "type",
            "on",
            "host",
            "port",
            "security",
            "user",
            "password_file",
            "ca_file",
            "from",
            "to",
            "url",
            "timeout",
        ),
        "command_source": ("name", "command", "file", "compress", "timeout", "critical"),
        "source": ("path", "name", "exclude", "one_file_system", "skip_cachedir_tagged", "freeze"),
        "remote": (
            "name", "host", "port", "user", "path", "identity_file", "known_hosts", "connect_timeout", "module", "password_file",
            "metered", "interval",
        ),  # fmt: skip
        "offsite": OFFSITE_KEYS,
    }
)
# What one element of each array of tables is, for messages.
_ARRAY_ELEMENT: Final[Mapping[str, str]] = MappingProxyType(
    {
        "disk": "disk", "hooks": "hook", "report": "report channel", "command_source": "command source", "source": "source",
        "remote": "remote repository", "offsite": "off-site repository",
    }
)

UNLOCK_METHODS: Final[tuple[str, ...]] = ("auto", "cryptdisks", "systemd")
HOOK_AROUND: Final[tuple[str, ...]] = ("backup", "snapshot")
# The crypttab target name: also a file name under /dev/mapper and part of a
# systemd unit name (systemd-cryptsetup@NAME.service), so nothing to escape.
DISK_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", re.ASCII)
_UUID_RE: Final = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}", re.ASCII)
_FILESYSTEM_RE: Final = re.compile(r"[a-z0-9][a-z0-9_.+-]{0,31}", re.ASCII)
# Filesystems that cannot hold a snapshot: no hard links, or no Unix owners and modes.
FILESYSTEMS_WITHOUT_LINKS_OR_OWNERS: Final = frozenset({"vfat", "msdos", "fat", "exfat", "ntfs", "ntfs3", "ntfs-3g"})
# Mounting the disk over one of these would hide what the system or its users need.
MOUNT_POINTS_REFUSED: Final = SYSTEM_DIRECTORIES | {"/home", "/root", "/tmp", "/opt", "/srv"}
# Longer than a week is a stuck hook, not a slow one (and keeps timers in range).
MAX_HOOK_TIMEOUT: Final = 7 * 86400
_SIZE_UNITS: Final[Mapping[str, int]] = MappingProxyType({"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4})
_SIZE_RE: Final = re.compile(r"([0-9]+)([KMGT]?)", re.ASCII)
_PERCENT_RE: Final = re.compile(r"([0-9]+(?:\.[0-9]+)?)%", re.ASCII)
# A plain number below this could as well be a percentage without its sign.
_AMBIGUOUS_BELOW: Final = 100
MAX_KEEP_FREE_BYTES: Final = 2**63 - 1

_COUNT_EXPECTED: Final = 'a whole number of 0 or more, or "always"'
_DURATION_EXPECTED: Final = (
    'a duration string such as "90s", "10m", "1h30m" or "7d" (whole numbers with the units d, h, m, s, '
    'largest first), or "0" for none'
)
_KEEP_FREE_EXPECTED: Final = (
    'a size with a binary unit such as "500M", "20G" or "1T" (K, M, G, T: 1024, 1024^2, 1024^3, 1024^4 bytes; '
    'a plain number of 100 or more is bytes), or a percentage of the disk above 0 and below 100 such as "10%"'
)
_MIN_SNAPSHOTS_EXPECTED: Final = f"a whole number from 1 to {MAX_COUNT}"
_DURATION_RE: Final = re.compile(r"(?:([0-9]+)d)?(?:([0-9]+)h)?(?:([0-9]+)m)?(?:([0-9]+)s)?", re.ASCII)
_DURATION_UNITS: Final = (86400, 3600, 60, 1)
# Python refuses int() of longer digit strings (4300 digits, since 3.11).
_MAX_DIGITS: Final = 1000


# --------------------------------------------------------------------------
# Durations


def _duration_seconds(text: str) -> int | None:
    """Seconds of a duration string, or None when it is not one."""
    if text == "0":
        return 0
    match = _DURATION_RE.fullmatch(text)
    if not text or match is None:
        return None
    if any(part is not None and len(part) > _MAX_DIGITS for part in match.groups()):
        return None  # int() refuses such a string; no one means it
    return sum(int(part) * unit for part, unit in zip(match.groups(), _DURATION_UNITS) if part is not None)


def _duration_hint(text: str) -> str:
    """A hint for the commonest mistake: a bare number of seconds."""
    if text.isascii() and text.isdigit():
        return f' (a number needs a unit: "{int(text)}s" for seconds)'
    return ""


def parse_duration(text: str) -> int:
    """Seconds in "90s", "10m", "1h", "1h30m", "7d" or "0".

    Written with units so that "10" never silently means seconds to one
    reader and minutes to another.
    """
    seconds = _duration_seconds(text)
    if seconds is None:
        raise ValueError(f"invalid duration {show(text)}{_duration_hint(text)}: expected {_DURATION_EXPECTED}")
    return seconds


# --------------------------------------------------------------------------
# Validation of single values


def _bool(file: str, key: str, value: object) -> bool:
    if not isinstance(value, bool):
        fail(file, key, f"{got_type(value)}; expected a boolean (true or false)")
    return value


def _path(file: str, key: str, value: object, *, what: str = "an absolute path") -> str:
    """A safe absolute path, normalised: no "..", no option-like component."""
    if not isinstance(value, str):
        fail(file, key, f"{got_type(value)}; expected a string holding {what}")
    shown = show(value)
    if "\x00" in value or "\n" in value or "\r" in value:
        fail(file, key, f"got {shown}, which holds a NUL or newline character; expected {what} without them")
    if not value.startswith("/"):
        fail(file, key, f"got {shown}, a relative path; expected {what} (starting with /)")
    parts = [part for part in value.split("/") if part not in ("", ".")]
    if ".." in parts:
        fail(file, key, f'got {shown}, which holds a ".." component; expected {what} without ".."')
    for part in parts:
        if part.startswith("-"):
            fail(
                file,
                key,
                f"got {shown}, whose component {quote(part)} starts with - and could be taken for an option; "
                f"expected {what} whose components do not start with -",
            )
    return "/" + "/".join(parts)


def _count(file: str, key: str, value: object) -> Count:
    if isinstance(value, str):
        if value == "always":
            return "always"
        close = suggest(value, ["always"])
        hint = ' (did you mean "always"?)' if close else ""
        fail(file, key, f"got {show(value)}{hint}; expected {_COUNT_EXPECTED}")
    if isinstance(value, bool) or not isinstance(value, int):
        fail(file, key, f"{got_type(value)}; expected {_COUNT_EXPECTED}")
    if value < 0:
        fail(file, key, f"got {value}; expected {_COUNT_EXPECTED}")
    if value > MAX_COUNT:
        fail(file, key, f'got {value}, more than can be meant; expected a whole number from 0 to {MAX_COUNT}, or "always"')
    return value


def _table_label(name: str) -> str:
    """How a table's header looks in the file: [name], or [[name]] for an array of tables."""
    return f"[[{name}]]" if name in _ARRAY_KEYS else f"[{name}]"


def _check_keys(file: str, table: str, data: Mapping[str, Any], *, prefix: str | None = None) -> None:
    """Refuse a key the table does not have, suggesting the likely one.

    ``prefix`` names an element of an array of tables in messages (``disk[1]``).
    """
    accepted = _ARRAY_KEYS[table] if table in _ARRAY_KEYS else _TABLE_KEYS[table]
    for key in data:
        if key not in accepted:
            close = suggest(key, accepted)
            hint = f", did you mean {close}?" if close else ""
            fail(
                file,
                f"{prefix or table}.{key}",
                f"unknown key {quote(key)} in {_table_label(table)}{hint}; expected one of {', '.join(accepted)}",
            )


# --------------------------------------------------------------------------
# Tables


def _own_directory(file: str, key: str, value: object, expected: str) -> str:
    """An absolute directory path that is not / or a system directory (backup-agent writes there)."""
    path = _path(file, key, value, what="an absolute directory path")
    if path in SYSTEM_DIRECTORIES:
        fail(file, key, f"got {show(value)}, a system directory; expected {expected}")
    return path


def _backup(file: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """The [backup] table as keyword arguments of Settings."""
    _check_keys(file, "backup", data)
    out: dict[str, Any] = {}
    if "source" in data:
        out["source"] = _path(file, "backup.source", data["source"], what="an absolute directory path")
    if "repository" in data:
        out["repository"] = _own_directory(
            file, "backup.repository", data["repository"], "a directory of its own for the snapshots, such as /srv/backup/<host>"
        )
    if "exclude" in data:
        out["exclude"] = _excludes(file, data["exclude"])
    for key in ("one_file_system", "skip_cachedir_tagged"):
        if key in data:
            out[key] = _bool(file, f"backup.{key}", data[key])
    if "ionice" in data:
        out["ionice"] = _ionice(file, data["ionice"])
    if "nice" in data:
        out["nice"] = _nice(file, data["nice"])
    if "io_timeout" in data:
        out["io_timeout"] = _io_timeout(file, data["io_timeout"])
    if "freeze" in data:
        out["freeze"] = _choice(file, "backup.freeze", data["freeze"], FREEZE_CHOICES)
    if "layout" in data:
        out["layout"] = _choice(file, "backup.layout", data["layout"], LAYOUT_CHOICES)
    if "method" in data:
        out["method"] = _choice(file, "backup.method", data["method"], METHOD_CHOICES)
    return out


def check_exclude(pattern: str) -> None:
    """Refuse excludes that rsync would read as a rule instead of a pattern.

    ``--exclude`` accepts the old rule prefixes: ``--exclude='+ x'``
    *includes* x, ``--exclude='- x'`` excludes x, and ``--exclude='!'``
    clears every rule before it (the CACHEDIR.TAG rules and the exclusion of
    the repository included). All three were checked with rsync 3.5.0.
    """
    if not pattern:
        raise ValueError("an exclude pattern must not be empty")
    if pattern == "!" or pattern.startswith(("+ ", "- ")):
        raise ValueError(
            f"exclude pattern {pattern!r} would be read by rsync as a filter rule, "
            "not a pattern; write it as a bracket expression instead, e.g. '[+] x'"
        )


def _excludes(file: str, value: object, where: str = "backup.exclude") -> tuple[str, ...]:
    if not isinstance(value, list):
        example = f"[{show(value)}]" if isinstance(value, str) else '["/home/*/Downloads"]'
        fail(file, where, f"{got_type(value)}; expected an array of rsync patterns such as {example}")
    patterns = []
    for index, item in enumerate(value):
        key = f"{where}[{index}]"
        if not isinstance(item, str):
            fail(file, key, f"{got_type(item)}; expected a string holding an rsync pattern")
        if not item:
            fail(file, key, 'got ""; expected a non-empty rsync pattern')
        if "\x00" in item or "\n" in item or "\r" in item:
            fail(file, key, f"got {show(item)}, which holds a NUL or newline character; expected a pattern without them")
        try:
            check_exclude(item)
        except ValueError as error:
            fail(file, key, str(error))
        patterns.append(item)
    return tuple(patterns)


def _ionice(file: str, value: object) -> str:
    choices = ", ".join(quote(choice) for choice in IONICE_CHOICES)
    if not isinstance(value, str):
        fail(file, "backup.ionice", f"{got_type(value)}; expected one of the strings {choices}")
    if value not in IONICE_CHOICES:
        close = suggest(value, IONICE_CHOICES)
        hint = f" (did you mean {quote(close)}?)" if close else ""
        fail(file, "backup.ionice", f"got {show(value)}{hint}; expected one of {choices}")
    return value


def _nice(file: str, value: object) -> int:
    low, high = NICE_RANGE
    if isinstance(value, bool) or not isinstance(value, int):
        fail(file, "backup.nice", f"{got_type(value)}; expected an integer from {low} to {high}")
    if not low <= value <= high:
        fail(file, "backup.nice", f"got {value}; expected an integer from {low} (normal) to {high} (lowest priority)")
    return value


def _duration(file: str, key: str, value: object) -> int:
    """Seconds of a duration string in the file; anything else is refused with a hint."""
    if not isinstance(value, str):
        hint = ""
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            hint = f' (write "{value}s" for {value} seconds)' if value else ' (write "0")'
        fail(file, key, f"{got_type(value)}; expected {_DURATION_EXPECTED}{hint}")
    seconds = _duration_seconds(value)
    if seconds is None:
        fail(file, key, f"got {show(value)}{_duration_hint(value)}; expected {_DURATION_EXPECTED}")
    return seconds


def _io_timeout(file: str, value: object) -> int:
    seconds = _duration(file, "backup.io_timeout", value)
    if seconds > MAX_IO_TIMEOUT:
        fail(
            file,
            "backup.io_timeout",
            f"got {show(value)} ({seconds} seconds); expected at most {MAX_IO_TIMEOUT} seconds, rsync's limit",
        )
    return seconds


def _rotation(file: str, data: Mapping[str, Any]) -> Scheme:
    """The [rotation] table: absent frequencies mean the default scheme's counts."""
    _check_keys(file, "rotation", data)
    prefer_recent = _bool(file, "rotation.prefer_recent", data.get("prefer_recent", DEFAULT_SCHEME.prefer_recent))
    strict = _bool(file, "rotation.strict", data.get("strict", DEFAULT_SCHEME.strict))
    given = {name: _count(file, f"rotation.{name}", data[name]) for name in FREQUENCIES if name in data}
    if not given:
        return Scheme(counts=dict(DEFAULT_SCHEME.counts), prefer_recent=prefer_recent, strict=strict)
    counts = {name: count for name, count in given.items() if count != 0}
    if not counts:
        zeros = ", ".join(f"{name} = 0" for name in given)
        default = ", ".join(f"{name} = {literal(count)}" for name, count in DEFAULT_SCHEME.counts.items())
        fail(
            file,
            "rotation",
            f"got {zeros}, a scheme that keeps nothing and would delete every snapshot but the newest; "
            f'expected at least one frequency with a count of 1 or more or "always" (for example daily = 7), '
            f"or no frequency keys at all for the default scheme ({default})",
        )
    return Scheme(counts=counts, prefer_recent=prefer_recent, strict=strict)


def _commands(file: str, data: Mapping[str, Any]) -> Commands:
    _check_keys(file, "commands", data)
    paths = {
        key: _path(file, f"commands.{key}", value, what="an absolute path to the program")
        for key, value in data.items()
    }
    return Commands(**paths)


MIN_INTERVAL: Final = 60
# The longest interval the agent schedules: a year (anything longer is a typo).
MAX_INTERVAL: Final = 366 * 86400


def _agent(file: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """The [agent] table: when the desktop agent backs up."""
    _check_keys(file, "agent", data)
    out: dict[str, Any] = {}
    if "interval" in data:
        seconds = _duration(file, "agent.interval", data["interval"])
        if seconds < MIN_INTERVAL:
            fail(
                file,
                "agent.interval",
                f"got {show(data['interval'])}; expected at least \"1m\" (a backup every {seconds} s never rests)",
            )
        if seconds > MAX_INTERVAL:
            fail(
                file,
                "agent.interval",
                f"got {show(data['interval'])} ({seconds} seconds); expected at most \"366d\" (a backup a year)",
            )
        out["interval"] = seconds
    if "on_plug" in data:
        value = data["on_plug"]
        if value not in ON_PLUG_CHOICES:
            fail(file, "agent.on_plug", f"got {show(value)}; expected {' or '.join(map(show, ON_PLUG_CHOICES))}")
        out["on_plug"] = value
    return out


def _conditions(file: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """The [conditions] table: moments the desktop agent does not back up (agent.policy.conditions)."""
    _check_keys(file, "conditions", data)
    out: dict[str, Any] = {}
    if "battery_below" in data:
        value = data["battery_below"]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
            shown = f"got {show(value)}" if isinstance(value, (int, str)) and not isinstance(value, bool) else got_type(value)
            fail(file, "conditions.battery_below",
                 f"{shown}; expected a whole percent from 0 (never wait for the battery) to 100, such as 30")
        out["battery_below"] = value
    if "skip_metered" in data:
        out["skip_metered"] = _bool(file, "conditions.skip_metered", data["skip_metered"])
    if "quiet_hours" in data:
        value = data["quiet_hours"]
        if not isinstance(value, str):
            fail(file, "conditions.quiet_hours", f'{got_type(value)}; expected a string such as "23:00-07:00", or "" for none')
        if value.strip():
            try:
                out["quiet_hours"] = parse_quiet_hours(value)
            except ValueError as exc:
                fail(file, "conditions.quiet_hours", f"got {show(value)}: {exc}")
    return out


def _notifications(file: str, data: Mapping[str, Any]) -> dict[str, Any]:
    _check_keys(file, "notifications", data)
    out: dict[str, Any] = {}  # what is left out keeps the model's default (agent.config.model.Settings)
    if "enabled" in data:
        out["notifications"] = _bool(file, "notifications.enabled", data["enabled"])
    if "remind_after" in data:
        out["remind_after"] = _remind_after(file, data["remind_after"])
    return out


def _remind_after(file: str, value: object) -> int:
    """Whole days (0: no reminders); a duration string gets a hint, as people write "7d"."""
    key = "notifications.remind_after"
    expected = f"a whole number of days from 0 (no reminders) to {MAX_REMIND_DAYS}, such as 7"
    if isinstance(value, str):
        seconds = _duration_seconds(value)
        hint = f" (write {seconds // 86400} for {seconds // 86400} days)" if seconds and seconds % 86400 == 0 else ""
        fail(file, key, f"got {show(value)}{hint}; expected {expected}")
    if isinstance(value, bool) or not isinstance(value, int):
        fail(file, key, f"{got_type(value)}; expected {expected}")
    if not 0 <= value <= MAX_REMIND_DAYS:
        fail(file, key, f"got {value}; expected {expected}")
    return value


def _tray(file: str, data: Mapping[str, Any]) -> dict[str, Any]:
    _check_keys(file, "tray", data)
    return {"tray": _bool(file, "tray.enabled", data["enabled"])} if "enabled" in data else {}


# --------------------------------------------------------------------------
# keep_free: room to make before a transfer


def parse_keep_free(text: str) -> tuple[int | None, float | None]:
    """``(bytes, None)`` for "500M", "20G", "1T", "123"; ``(None, percent)`` for "10%".

    Units are binary (K = 1024). A plain number below 100 is refused: it may
    as well be a percentage written without its sign. Raises ValueError whose
    message is the config's one-line problem ("got ...; expected ...").
    """
    shown = show(text)
    percent = _PERCENT_RE.fullmatch(text)
    if percent is not None:
        value = float(percent.group(1))
        if not 0 < value < 100:
            raise ValueError(f'got {shown}; expected a percentage of the disk above 0 and below 100, such as "10%"')
        return None, value
    size = _SIZE_RE.fullmatch(text)
    if size is None:
        hint = ""
        lower = re.fullmatch(r"([0-9]+)([kmgt])", text, re.ASCII)
        if lower is not None:
            hint = f' (the units are upper case: "{lower.group(1)}{lower.group(2).upper()}")'
        raise ValueError(f"got {shown}{hint}; expected {_KEEP_FREE_EXPECTED}")
    if len(size.group(1)) > _MAX_DIGITS:
        raise ValueError(f"got {shown}, more than any disk holds; expected at most {MAX_KEEP_FREE_BYTES // 1024**4}T")
    number, unit = int(size.group(1)), size.group(2)
    if number == 0:
        raise ValueError(f"got {shown}; expected a size above 0 (leave keep_free out to make no room)")
    if not unit and number < _AMBIGUOUS_BELOW:
        raise ValueError(
            f"got {shown}, a number without a unit that could mean {number} bytes or {number} percent; "
            f'expected "{number}%" for a percentage of the disk, or a size with its unit such as "{number}G"'
        )
    amount = number * _SIZE_UNITS[unit]
    if amount > MAX_KEEP_FREE_BYTES:
        raise ValueError(f"got {shown}, more than any disk holds; expected at most {MAX_KEEP_FREE_BYTES // 1024**4}T")
    return amount, None


def _keep_free(file: str, data: Mapping[str, Any]) -> KeepFree | None:
    """rotation.keep_free and rotation.min_snapshots as KeepFree (None when not asked for)."""
    if "keep_free" not in data:
        if "min_snapshots" in data:
            fail(
                file,
                "rotation.min_snapshots",
                f"got {show(data['min_snapshots'])} without keep_free; expected min_snapshots only together with "
                "keep_free (it is the fewest snapshots that making room may leave)",
            )
        return None
    value = data["keep_free"]
    if not isinstance(value, str):
        hint = ""
        if isinstance(value, int) and not isinstance(value, bool):
            hint = f' (write it as a string: "{value}%" for a percentage, "{value}G" for a size)'
        fail(file, "rotation.keep_free", f"{got_type(value)}; expected a string holding {_KEEP_FREE_EXPECTED}{hint}")
    try:
        amount, percent = parse_keep_free(value)
    except ValueError as error:
        fail(file, "rotation.keep_free", str(error))
    min_snapshots = DEFAULT_MIN_SNAPSHOTS
    if "min_snapshots" in data:
        count = data["min_snapshots"]
        if isinstance(count, bool) or not isinstance(count, int):
            fail(file, "rotation.min_snapshots", f"{got_type(count)}; expected {_MIN_SNAPSHOTS_EXPECTED}")
        if not 1 <= count <= MAX_COUNT:
            fail(
                file,
                "rotation.min_snapshots",
                f"got {count}; expected {_MIN_SNAPSHOTS_EXPECTED} (the newest snapshot is never deleted)",
            )
        min_snapshots = count
    return KeepFree(bytes=amount, percent=percent, min_snapshots=min_snapshots)


# --------------------------------------------------------------------------
# [system]


def _system(file: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """The [system] table as keyword arguments of Settings."""
    _check_keys(file, "system", data)
    out: dict[str, Any] = {}
    if "state_dir" in data:
        out["state_dir"] = _own_directory(
            file, "system.state_dir", data["state_dir"], "a directory of backup-agent's own, such as /var/lib/backup-agent"
        )
    for key in ("crypttab", "fstab"):
        if key in data:
            out[key] = _path(file, f"system.{key}", data[key], what="an absolute path to the file")
    return out


# --------------------------------------------------------------------------
# [[disk]] and [[hooks]]


def _elements(file: str, table: str, value: object) -> list[Mapping[str, Any]]:
    """The tables of an array of tables, each refused unless it is a table."""
    element = _ARRAY_ELEMENT[table]
    if not isinstance(value, list):
        fail(
            file,
            table,
            f"{got_type(value)}; expected the array of tables [[{table}]], one [[{table}]] section per {element}",
        )
    for index, item in enumerate(value):
        if not isinstance(item, Mapping):
            fail(
                file, f"{table}[{index}]", f"{got_type(item)}; expected a table: one [[{table}]] section per {element}"
            )
    return value


def _required(file: str, prefix: str, data: Mapping[str, Any], key: str, expected: str) -> object:
    if key not in data:
        fail(file, f"{prefix}.{key}", f"missing; expected {expected}")
    return data[key]


def _choice(file: str, key: str, value: object, choices: Sequence[str]) -> str:
    shown = ", ".join(quote(choice) for choice in choices)
    if not isinstance(value, str):
        fail(file, key, f"{got_type(value)}; expected one of the strings {shown}")
    if value not in choices:
        close = suggest(value, choices)
        hint = f" (did you mean {quote(close)}?)" if close else ""
        fail(file, key, f"got {show(value)}{hint}; expected one of {shown}")
    return value


_DISK_NAME_EXPECTED: Final = (
    'a name of 1 to 64 ASCII letters, digits, "_", "." and "-" that starts with a letter or digit, '
    'such as "backup1" (the crypttab target name)'
)
_UUID_EXPECTED: Final = (
    'the UUID of the LUKS partition, 8-4-4-4-12 hex digits such as "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0" '
    '(blkid shows it as UUID="..." with TYPE="crypto_LUKS")'
)


def _disk_name(file: str, key: str, value: object) -> str:
    if not isinstance(value, str):
        fail(file, key, f"{got_type(value)}; expected a string holding {_DISK_NAME_EXPECTED}")
    if DISK_NAME_RE.fullmatch(value) is None:
        fail(file, key, f"got {show(value)}; expected {_DISK_NAME_EXPECTED}")
    return value


def _luks_uuid(file: str, key: str, value: object) -> str:
    if not isinstance(value, str):
        fail(file, key, f"{got_type(value)}; expected a string holding {_UUID_EXPECTED}")
    if _UUID_RE.fullmatch(value) is None:
        hint = ""
        for prefix in ("UUID=", "/dev/disk/by-uuid/"):
            if value.startswith(prefix) and _UUID_RE.fullmatch(value[len(prefix) :]):
                hint = f" (write the UUID alone: {quote(value[len(prefix) :])})"
        fail(file, key, f"got {show(value)}{hint}; expected {_UUID_EXPECTED}")
    return value.lower()


def _mount_options(file: str, key: str, value: object) -> tuple[str, ...]:
    example = '["noatime", "nodev"]'
    if not isinstance(value, list):
        fail(file, key, f"{got_type(value)}; expected an array of mount options such as {example}")
    options = []
    for index, item in enumerate(value):
        item_key = f"{key}[{index}]"
        if not isinstance(item, str):
            fail(file, item_key, f"{got_type(item)}; expected a string holding one mount option such as \"noatime\"")
        if not item:
            fail(file, item_key, 'got ""; expected a non-empty mount option such as "noatime"')
        if "," in item:
            fail(
                file,
                item_key,
                f"got {show(item)}, which holds a comma; expected one mount option per string, such as {example}",
            )
        if "\x00" in item or any(char.isspace() for char in item):
            fail(
                file,
                item_key,
                f"got {show(item)}, which holds whitespace or a NUL character; expected one mount option without them",
            )
        options.append(item)
    return tuple(options)


def _disk(file: str, index: int, data: Mapping[str, Any], hostname: str) -> Disk:
    prefix = f"disk[{index}]"
    _check_keys(file, "disk", data, prefix=prefix)
    name = _disk_name(file, f"{prefix}.name", _required(file, prefix, data, "name", _DISK_NAME_EXPECTED))
    luks_uuid = _luks_uuid(file, f"{prefix}.luks_uuid", _required(file, prefix, data, "luks_uuid", _UUID_EXPECTED))
    mount_what = "an absolute directory path"
    raw_mount = _required(file, prefix, data, "mount_point", f"{mount_what} to mount the disk on, such as /mnt/{name}")
    mount_point = _path(file, f"{prefix}.mount_point", raw_mount, what=mount_what)
    if mount_point in MOUNT_POINTS_REFUSED:
        fail(
            file,
            f"{prefix}.mount_point",
            f"got {show(raw_mount)}, a directory the system or its users need; "
            f"expected a directory of its own to mount the disk on, such as /mnt/{name}",
        )
    mapped_device = f"/dev/mapper/{name}"
    if "mapped_device" in data:
        mapped_device = _path(
            file, f"{prefix}.mapped_device", data["mapped_device"], what="an absolute path to the unlocked device"
        )
    example = posixpath.join(mount_point, hostname) if hostname else f"{mount_point}/<hostname>"
    if "repository" in data:
        raw_repository: object = data["repository"]
        repository = _path(file, f"{prefix}.repository", raw_repository, what="an absolute directory path")
        shown = show(raw_repository)
    else:
        # The default must be a directory of its own below the mount point.
        if not hostname or hostname in (".", "..") or "/" in hostname or hostname.startswith("-"):
            fail(
                file,
                f"{prefix}.repository",
                f"not set, and this machine's host name {quote(hostname)} makes no directory name; "
                f"expected repository set to a directory below the mount point, such as {mount_point}/backups",
            )
        repository = posixpath.join(mount_point, hostname)
        shown = quote(repository)
    if repository == mount_point:
        fail(
            file,
            f"{prefix}.repository",
            f"got {shown}, the mount point itself; expected a directory below it such as {example}: "
            "the repository must be a directory on the disk, not its root",
        )
    if not repository.startswith(mount_point.rstrip("/") + "/"):
        fail(
            file,
            f"{prefix}.repository",
            f"got {shown}, which is not below the disk's mount point {quote(mount_point)}; "
            f"expected a directory on the disk, such as {example}",
        )
    unlock = "auto"
    if "unlock" in data:
        unlock = _choice(file, f"{prefix}.unlock", data["unlock"], UNLOCK_METHODS)
    filesystem: str | None = None
    if "filesystem" in data:
        filesystem = _filesystem(file, f"{prefix}.filesystem", data["filesystem"])
    mount_options: tuple[str, ...] = ()
    if "mount_options" in data:
        if filesystem is None:
            fail(
                file,
                f"{prefix}.mount_options",
                f"got {show(data['mount_options'])} without filesystem; expected mount_options only together with "
                "filesystem (without it, the disk is mounted through its fstab entry, whose options apply)",
            )
        mount_options = _mount_options(file, f"{prefix}.mount_options", data["mount_options"])
    return Disk(
        name=name,
        luks_uuid=luks_uuid,
        mount_point=mount_point,
        mapped_device=mapped_device,
        repository=repository,
        unlock=unlock,
        filesystem=filesystem,
        mount_options=mount_options,
        layout=_choice(file, f"{prefix}.layout", data["layout"], LAYOUT_CHOICES[1:]) if "layout" in data else None,
    )


def _filesystem(file: str, key: str, value: object) -> str:
    expected = 'a filesystem type as mount -t takes it, such as "ext4", "btrfs" or "xfs"'
    if not isinstance(value, str):
        fail(file, key, f"{got_type(value)}; expected a string holding {expected}")
    if _FILESYSTEM_RE.fullmatch(value) is None:
        fail(file, key, f"got {show(value)}; expected {expected}")
    if value in FILESYSTEMS_WITHOUT_LINKS_OR_OWNERS:
        fail(
            file,
            key,
            f"got {show(value)}, which cannot keep hard links with Unix owners and permissions as snapshots need; "
            'expected a Linux filesystem such as "ext4", "btrfs" or "xfs"',
        )
    return value


def _disks(file: str, value: object, hostname: str) -> tuple[Disk, ...]:
    disks: list[Disk] = []
    for index, data in enumerate(_elements(file, "disk", value)):
        disk = _disk(file, index, data, hostname)
        for key, what in (("name", "name"), ("mount_point", "mount point"), ("mapped_device", "mapped device")):
            for other_index, other in enumerate(disks):
                if getattr(disk, key) == getattr(other, key):
                    fail(
                        file,
                        f"disk[{index}].{key}",
                        f"got {quote(getattr(disk, key))}, already the {what} of disk[{other_index}] "
                        f"({quote(other.name)}); expected a {what} of its own for each disk",
                    )
        disks.append(disk)
    return tuple(disks)


_ARGV_EXAMPLE: Final = '["/usr/bin/pg_dumpall", "-f", "/var/backups/db.sql"]'
_ARGV_EXPECTED: Final = (
    f"an array of strings, the program and its arguments, such as {_ARGV_EXAMPLE} "
    '(no shell: write ["/bin/sh", "-c", "..."] for one)'
)
_PROGRAM: Final = "an absolute path to the program"


def _argv(file: str, key: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        fail(file, key, f"{got_type(value)}; expected {_ARGV_EXPECTED}")
    if not value:
        fail(file, key, f"got an empty array; expected {_ARGV_EXPECTED}")
    program = value[0]
    if isinstance(program, str) and not program.startswith("/") and "\x00" not in program and "\n" not in program:
        fail(
            file,
            f"{key}[0]",
            f"got {show(program)}, a relative path; expected {_PROGRAM} (starting with /): hooks are run "
            f"without a PATH lookup, and `command -v {program or 'NAME'}` shows the full path",
        )
    argv = [_path(file, f"{key}[0]", program, what=_PROGRAM)]
    for index, item in enumerate(value[1:], start=1):
        if not isinstance(item, str):
            number = isinstance(item, (int, float)) and not isinstance(item, bool)
            hint = f" (write {quote(literal(item))})" if number else ""
            fail(file, f"{key}[{index}]", f"{got_type(item)}; expected a string, as every argument is one{hint}")
        if "\x00" in item:
            fail(
                file, f"{key}[{index}]", f"got {show(item)}, which holds a NUL character; expected an argument without it"
            )
        argv.append(item)
    return tuple(argv)


def _hook(file: str, index: int, data: Mapping[str, Any]) -> Hook:
    prefix = f"hooks[{index}]"
    _check_keys(file, "hooks", data, prefix=prefix)
    name_expected = 'a non-empty name for the hook, such as "database dump"'
    name = _required(file, prefix, data, "name", name_expected)
    if not isinstance(name, str):
        fail(file, f"{prefix}.name", f"{got_type(name)}; expected a string holding {name_expected}")
    if "\x00" in name or "\n" in name or "\r" in name:
        fail(
            file,
            f"{prefix}.name",
            f"got {show(name)}, which holds a NUL or newline character; expected a name without them",
        )
    if not name.strip():
        fail(file, f"{prefix}.name", f"got {show(name)}; expected {name_expected}")
    around_expected = 'one of "backup" (around the whole cycle) or "snapshot" (around the transfer)'
    around = _choice(
        file, f"{prefix}.around", _required(file, prefix, data, "around", around_expected), HOOK_AROUND
    )
    before = _argv(file, f"{prefix}.before", data["before"]) if "before" in data else None
    after = _argv(file, f"{prefix}.after", data["after"]) if "after" in data else None
    if before is None and after is None:
        fail(
            file,
            prefix,
            f"got neither before nor after in [[hooks]] {quote(name)}; "
            f"expected at least one of them, {_ARGV_EXPECTED}",
        )
    timeout = DEFAULT_HOOK_TIMEOUT
    if "timeout" in data:
        timeout = _duration(file, f"{prefix}.timeout", data["timeout"])
        if timeout == 0:
            fail(
                file,
                f"{prefix}.timeout",
                f'got {show(data["timeout"])}; expected a duration of 1 second or more, such as "10m": '
                "a hook needs a time limit",
            )
        if timeout > MAX_HOOK_TIMEOUT:
            fail(
                file,
                f"{prefix}.timeout",
                f'got {show(data["timeout"])} ({timeout} seconds); expected at most "7d" ({MAX_HOOK_TIMEOUT} seconds)',
            )
    critical = _bool(file, f"{prefix}.critical", data["critical"]) if "critical" in data else True
    return Hook(name=name, around=around, before=before, after=after, timeout=timeout, critical=critical)


def _hooks(file: str, value: object) -> tuple[Hook, ...]:
    hooks: list[Hook] = []
    for index, data in enumerate(_elements(file, "hooks", value)):
        hook = _hook(file, index, data)
        for other_index, other in enumerate(hooks):
            if hook.name == other.name:
                fail(
                    file,
                    f"hooks[{index}].name",
                    f"got {quote(hook.name)}, already the name of hooks[{other_index}]; "
                    "expected a name of its own for each hook",
                )
        hooks.append(hook)
    return tuple(hooks)


REPORT_TYPES: Final[tuple[str, ...]] = ("mail", "ping")
SMTP_SECURITY: Final[tuple[str, ...]] = ("starttls", "tls", "none")
_SMTP_PORTS: Final[Mapping[str, int]] = MappingProxyType({"starttls": 587, "tls": 465, "none": 25})
_MAIL_KEYS: Final = frozenset({"type", "on", "host", "port", "security", "user", "password_file", "ca_file", "from", "to", "timeout"})
_PING_KEYS: Final = frozenset({"type", "on", "url", "timeout"})
MAX_REPORT_TIMEOUT: Final = 300
_HOST_RE: Final = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.:-]{0,252}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]", re.ASCII)
_ADDRESS_RE: Final = re.compile(r"[^@\s<>,;\"]+@[^@\s<>,;\"]+", re.ASCII)
_URL_RE: Final = re.compile(r"https?://[^\s/?#]+[^\s]*", re.ASCII)


def _text(file: str, key: str, value: object, expected: str, pattern: "re.Pattern[str]") -> str:
    if not isinstance(value, str):
        fail(file, key, f"{got_type(value)}; expected a string holding {expected}")
    if pattern.fullmatch(value) is None:
        fail(file, key, f"got {show(value)}; expected {expected}")
    return value


def _report_on(file: str, key: str, value: object) -> tuple[str, ...]:
    expected = f"an array of one or more of {', '.join(quote(w) for w in REPORT_WHEN)}"
    if not isinstance(value, list) or not value:
        fail(file, key, f"{got_type(value)}; expected {expected}")
    for index, item in enumerate(value):
        _choice(file, f"{key}[{index}]", item, REPORT_WHEN)
    return tuple(when for when in REPORT_WHEN if when in value)


def _report_timeout(file: str, key: str, value: object) -> int:
    seconds = _duration(file, key, value)
    if not 1 <= seconds <= MAX_REPORT_TIMEOUT:
        fail(file, key, f'got {show(value)}; expected a duration from "1s" to "5m": a report must never hold up a backup for long')
    return seconds


def _mail(file: str, prefix: str, data: Mapping[str, Any]) -> MailReport:
    for key in data:
        if key not in _MAIL_KEYS:
            fail(file, f"{prefix}.{key}", f"the key {quote(key)} is not one of a mail report's; expected {', '.join(sorted(_MAIL_KEYS))}")
    host_expected = 'the SMTP server\'s host name or address, such as "smtp.example.org"'
    host = _text(file, f"{prefix}.host", _required(file, prefix, data, "host", host_expected), host_expected, _HOST_RE)
    address = 'a mail address such as "backup@example.org" (no name, no <>)'
    sender = _text(file, f"{prefix}.from", _required(file, prefix, data, "from", address), address, _ADDRESS_RE)
    raw_to = _required(file, prefix, data, "to", f"an array of {address}")
    if isinstance(raw_to, str):
        fail(file, f"{prefix}.to", f"got {show(raw_to)}; expected an array of addresses, such as [{show(raw_to)}]")
    if not isinstance(raw_to, list) or not raw_to:
        fail(file, f"{prefix}.to", f"{got_type(raw_to)}; expected a non-empty array of {address}")
    to = tuple(_text(file, f"{prefix}.to[{i}]", item, address, _ADDRESS_RE) for i, item in enumerate(raw_to))
    security = _choice(file, f"{prefix}.security", data["security"], SMTP_SECURITY) if "security" in data else "starttls"
    port = _SMTP_PORTS[security]
    if "port" in data:
        port = data["port"]
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            fail(file, f"{prefix}.port", f"{got_type(port)}; expected a TCP port from 1 to 65535 (587 for starttls, 465 for tls)")
    user: str | None = None
    if "user" in data:
        user = data["user"]
        if not isinstance(user, str) or not user or any(c in user for c in "\x00\r\n"):
            fail(file, f"{prefix}.user", f"{got_type(user)}; expected the SMTP login name on one line")
    password_file: str | None = None
    if "password_file" in data:
        password_file = _path(file, f"{prefix}.password_file", data["password_file"], what="an absolute path to a file only root can read")
    if (user is None) != (password_file is None):
        fail(file, prefix, "got only one of user and password_file; expected both (to log in) or neither")
    if user is not None and security == "none":
        fail(
            file,
            f"{prefix}.security",
            'got "none" with a login; expected "starttls" or "tls", so the password never crosses the network in clear',
        )
    ca_file = _path(file, f"{prefix}.ca_file", data["ca_file"], what="an absolute path to a PEM file") if "ca_file" in data else None
    timeout = _report_timeout(file, f"{prefix}.timeout", data["timeout"]) if "timeout" in data else 30
    on = _report_on(file, f"{prefix}.on", data["on"]) if "on" in data else ("failure", "stale")
    return MailReport(
        host=host, sender=sender, to=to, port=port, security=security, user=user,
        password_file=password_file, ca_file=ca_file, timeout=timeout, on=on,
    )


def _ping(file: str, prefix: str, data: Mapping[str, Any]) -> PingReport:
    for key in data:
        if key not in _PING_KEYS:
            fail(file, f"{prefix}.{key}", f"the key {quote(key)} is not one of a ping report's; expected {', '.join(sorted(_PING_KEYS))}")
    expected = 'an http:// or https:// URL to ping, such as "https://hc-ping.com/<uuid>" (without /start or /fail)'
    url = _text(file, f"{prefix}.url", _required(file, prefix, data, "url", expected), expected, _URL_RE).rstrip("/")
    if url.endswith(("/start", "/fail")):
        fail(file, f"{prefix}.url", f"got {show(url)}; expected the check's own URL: /start and /fail are added to it")
    timeout = _report_timeout(file, f"{prefix}.timeout", data["timeout"]) if "timeout" in data else 10
    on = _report_on(file, f"{prefix}.on", data["on"]) if "on" in data else REPORT_WHEN
    return PingReport(url=url, timeout=timeout, on=on)


def _reports(file: str, value: object) -> tuple[Report, ...]:
    reports: list[Report] = []
    for index, data in enumerate(_elements(file, "report", value)):
        prefix = f"report[{index}]"
        kind = _choice(file, f"{prefix}.type", _required(file, prefix, data, "type", '"mail" or "ping"'), REPORT_TYPES)
        reports.append(_mail(file, prefix, data) if kind == "mail" else _ping(file, prefix, data))
    return tuple(reports)


# --------------------------------------------------------------------------
# [[command_source]] and [packages]: what every snapshot stores besides the source

COMPRESS_CHOICES: Final[tuple[str, ...]] = ("none", "gzip")
# A plain file name in .backup-agent/commands/: no directory, no dot file, nothing to quote.
_DUMP_FILE_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}", re.ASCII)


def _command_source(file: str, index: int, data: Mapping[str, Any]) -> CommandSource:
    prefix = f"command_source[{index}]"
    _check_keys(file, "command_source", data, prefix=prefix)
    name_expected = 'a non-empty name on one line, such as "mariadb"'
    name = _required(file, prefix, data, "name", name_expected)
    if not isinstance(name, str) or not name.strip() or any(c in name for c in "\x00\r\n"):
        fail(file, f"{prefix}.name", f"{got_type(name)}; expected {name_expected}")
    command = _argv(file, f"{prefix}.command", _required(file, prefix, data, "command", _ARGV_EXPECTED))
    file_expected = 'a plain file name (letters, digits, . _ + -; no /), such as "mariadb.sql"'
    stored = _text(file, f"{prefix}.file", _required(file, prefix, data, "file", file_expected), file_expected, _DUMP_FILE_RE)
    compress = _choice(file, f"{prefix}.compress", data["compress"], COMPRESS_CHOICES) if "compress" in data else "none"
    if compress == "gzip" and not stored.endswith(".gz"):
        stored += ".gz"
    timeout = DEFAULT_HOOK_TIMEOUT
    if "timeout" in data:
        timeout = _duration(file, f"{prefix}.timeout", data["timeout"])
        if not 1 <= timeout <= MAX_HOOK_TIMEOUT:
            fail(file, f"{prefix}.timeout", f'got {show(data["timeout"])}; expected a duration from "1s" to "7d"')
    critical = _bool(file, f"{prefix}.critical", data["critical"]) if "critical" in data else True
    return CommandSource(name=name, command=command, file=stored, compress=compress, timeout=timeout, critical=critical)


def _command_sources(file: str, value: object) -> tuple[CommandSource, ...]:
    sources: list[CommandSource] = []
    for index, data in enumerate(_elements(file, "command_source", value)):
        source = _command_source(file, index, data)
        for other_index, other in enumerate(sources):
            for key in ("name", "file"):
                if getattr(source, key) == getattr(other, key):
                    fail(
                        file,
                        f"command_source[{index}].{key}",
                        f"got {quote(getattr(source, key))}, already the {key} of command_source[{other_index}]; "
                        f"expected a {key} of its own for each command source",
                    )
        sources.append(source)
    return tuple(sources)


def _packages(file: str, data: Mapping[str, Any]) -> Packages:
    _check_keys(file, "packages", data)
    return Packages(enabled=_bool(file, "packages.enabled", data["enabled"]) if "enabled" in data else None)


def _sources(file: str, value: object, backup: Mapping[str, Any]) -> tuple[SourceSpec, ...]:
    """``[[source]]``: several sources in one snapshot, each under its own directory (agent.config.source_names)."""
    for key in ("source", "exclude", "freeze"):
        if isinstance(backup, Mapping) and key in backup:
            fail(
                file,
                f"backup.{key}",
                f"given beside [[source]]; expected either [backup] {key} for one source, "
                f"or {key if key != 'source' else 'path'} in each [[source]]",
            )
    specs: list[SourceSpec] = []
    for index, data in enumerate(_elements(file, "source", value)):
        prefix = f"source[{index}]"
        _check_keys(file, "source", data, prefix=prefix)
        path = _path(
            file, f"{prefix}.path", _required(file, prefix, data, "path", "the absolute path of a directory to back up"),
            what="an absolute directory path",
        )
        if "name" in data:
            name = data["name"]
            if not isinstance(name, str):
                fail(file, f"{prefix}.name", f"{got_type(name)}; expected a string, the source's directory in a snapshot")
            problem = directory_problem(name)
            if problem is not None:
                fail(file, f"{prefix}.name", f"got {show(name)}: {problem}")
        else:
            name = directory_for(path)
            problem = directory_problem(name)
            if problem is not None:
                fail(file, f"{prefix}.path", f"the directory named after {show(path)} would be {problem}: set name")
        for other_index, other in enumerate(specs):
            if other.path == path:
                fail(file, f"{prefix}.path", f"got {show(path)}, already source[{other_index}]; expected each path once")
            if other.directory == name:
                fail(
                    file, f"{prefix}.name",
                    f"the directory {show(name)} is already source[{other_index}]'s ({other.path}); expected a name of its own",
                )
        specs.append(
            SourceSpec(
                path=path,
                directory=name,
                exclude=_excludes(file, data["exclude"], f"{prefix}.exclude") if "exclude" in data else None,
                one_file_system=_bool(file, f"{prefix}.one_file_system", data["one_file_system"])
                if "one_file_system" in data else None,
                skip_cachedir_tagged=_bool(file, f"{prefix}.skip_cachedir_tagged", data["skip_cachedir_tagged"])
                if "skip_cachedir_tagged" in data else None,
                freeze=_choice(file, f"{prefix}.freeze", data["freeze"], FREEZE_CHOICES) if "freeze" in data else "auto",
            )
        )
    if not specs:
        fail(file, "source", "an empty array; expected at least one [[source]] table with a path")
    return tuple(specs)


_REMOTE_HOST_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,252}|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*", re.ASCII)
_REMOTE_USER_RE: Final = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]{0,63}", re.ASCII)
_REMOTE_PATH_RE: Final = re.compile(r"/[^\x00-\x1f\x7f]*", re.ASCII | re.DOTALL)


def _remote(file: str, index: int, data: Mapping[str, Any]) -> RemoteRepository:
    prefix = f"remote[{index}]"
    _check_keys(file, "remote", data, prefix=prefix)
    name = _disk_name(file, f"{prefix}.name", _required(file, prefix, data, "name", _DISK_NAME_EXPECTED))
    host_expected = 'the server\'s host name or address, such as "nas.home.arpa" or "192.168.1.10"'
    host = _text(file, f"{prefix}.host", _required(file, prefix, data, "host", host_expected), host_expected, _REMOTE_HOST_RE)
    module = None
    if "module" in data:
        module = _text(file, f"{prefix}.module", data["module"], 'an rsync daemon module\'s name, such as "laptop"', _REMOTE_USER_RE)
        if "path" in data:
            fail(file, f"{prefix}.path", "got both module and path; expected one: an rsync daemon's module is the repository itself")
    path_expected = 'the repository\'s absolute path on the server, such as "/srv/backup/laptop" (or an rsync daemon\'s module)'
    path = "" if module else _text(file, f"{prefix}.path", _required(file, prefix, data, "path", path_expected), path_expected, _REMOTE_PATH_RE)
    password_file = None
    if "password_file" in data:
        if module is None:
            fail(file, f"{prefix}.password_file", "got a password file without module; expected it only for an rsync daemon")
        password_file = _path(file, f"{prefix}.password_file", data["password_file"], what="an absolute path to a file only root can read")
    user = None
    if "user" in data:
        user = _text(file, f"{prefix}.user", data["user"], "a login name on the server, such as \"backup\"", _REMOTE_USER_RE)
    port = None
    if "port" in data:
        port = data["port"]
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            fail(file, f"{prefix}.port", f"{got_type(port)}; expected the ssh server's TCP port from 1 to 65535 (22 by default)")
    identity = None
    if "identity_file" in data:
        identity = _path(file, f"{prefix}.identity_file", data["identity_file"], what="an absolute path to a private key only root can read")
    known_hosts = None
    if "known_hosts" in data:
        known_hosts = _path(
            file, f"{prefix}.known_hosts", data["known_hosts"], what="an absolute path to a known_hosts file holding the server's key"
        )
    timeout = 10
    if "connect_timeout" in data:
        timeout = _duration(file, f"{prefix}.connect_timeout", data["connect_timeout"])
        if not 1 <= timeout <= 120:
            fail(file, f"{prefix}.connect_timeout", f'got {show(data["connect_timeout"])}; expected a duration from "1s" to "2m"')
    metered = _bool(file, f"{prefix}.metered", data["metered"]) if "metered" in data else False
    interval = None
    if "interval" in data:
        interval = _duration(file, f"{prefix}.interval", data["interval"])
        if not MIN_INTERVAL <= interval <= MAX_INTERVAL:
            fail(file, f"{prefix}.interval", f'got {show(data["interval"])}; expected a duration from "1m" to "366d"')
    return RemoteRepository(
        name=name, host=host, path=(path.rstrip("/") or "/") if path else "", user=user, port=port,
        identity_file=identity, known_hosts=known_hosts, connect_timeout=timeout, module=module, password_file=password_file,
        metered=metered, interval=interval,
    )


def _remote_names_apart(file: str, remotes: tuple[RemoteRepository, ...], disks: tuple[Disk, ...]) -> None:
    """The desktop agent keeps one schedule per name, disks and remotes alike: a name may not be both."""
    disk_names = {disk.name for disk in disks}
    for index, remote in enumerate(remotes):
        if remote.name in disk_names:
            fail(file, f"remote[{index}].name", f"got {show(remote.name)}, the name of a [[disk]] too; expected a name of its own")


def _remotes(file: str, value: object) -> tuple[RemoteRepository, ...]:
    remotes = tuple(_remote(file, index, data) for index, data in enumerate(_elements(file, "remote", value)))
    seen: set[str] = set()
    for index, remote in enumerate(remotes):
        if remote.name in seen:
            fail(file, f"remote[{index}].name", f"got {show(remote.name)} twice; expected a name of its own for each [[remote]]")
        seen.add(remote.name)
    return remotes


def _check_tables(file: str, data: Mapping[str, Any]) -> None:
    """Refuse anything at the top level that is not one of the known tables."""
    known = [*_TABLE_KEYS, *_ARRAY_KEYS]
    tables = ", ".join(_table_label(name) for name in known)
    for name, value in data.items():
        if name in _TABLE_KEYS:
            if not isinstance(value, Mapping):
                fail(file, name, f"{got_type(value)}; expected the table [{name}]")
            continue
        if name in _ARRAY_KEYS and (name != "source" or isinstance(value, list)):
            continue  # checked with its elements
        is_array_of_tables = (
            isinstance(value, list) and bool(value) and all(isinstance(item, Mapping) for item in value)
        )
        if isinstance(value, Mapping) or is_array_of_tables:
            close = suggest(name, known)
            hint = f", did you mean {_table_label(close)}?" if close else ""
            header = f"[[{name}]]" if is_array_of_tables else f"[{name}]"
            fail(file, name, f"unknown table {header}{hint}; expected one of the tables {tables}")
        owners = [table for table, keys in (*_TABLE_KEYS.items(), *_ARRAY_KEYS.items()) if name in keys]
        if owners:
            where = " or ".join(_table_label(table) for table in owners)
            fail(file, name, f"got the key {quote(name)} outside any table; expected it below the line {where}")
        fail(file, name, f"unknown key {quote(name)} outside any table; expected only the tables {tables}")


def settings_from_mapping(data: Mapping[str, Any], path: str, *, hostname: str | None = None) -> Settings:
    """Validate parsed TOML into Settings; ``path`` only names the file in errors.

    ``hostname`` names the default repository on each disk
    (``<mount_point>/<hostname>``); by default this machine's,
    :func:`socket.gethostname`. Otherwise pure (no I/O), so every rule is
    tested with plain dicts.
    """
    _check_tables(path, data)
    fields: dict[str, Any] = {}
    if "backup" in data:
        fields.update(_backup(path, data["backup"]))
    if "rotation" in data:
        fields["rotation"] = _rotation(path, data["rotation"])
        fields["keep_free"] = _keep_free(path, data["rotation"])
    if "commands" in data:
        fields["commands"] = _commands(path, data["commands"])
    if "notifications" in data:
        fields.update(_notifications(path, data["notifications"]))
    if "tray" in data:
        fields.update(_tray(path, data["tray"]))
    if "system" in data:
        fields.update(_system(path, data["system"]))
    if "agent" in data:
        fields.update(_agent(path, data["agent"]))
    if "conditions" in data:
        fields.update(_conditions(path, data["conditions"]))
    if "disk" in data:
        fields["disks"] = _disks(path, data["disk"], socket.gethostname() if hostname is None else hostname)
    if "hooks" in data:
        fields["hooks"] = _hooks(path, data["hooks"])
    if "report" in data:
        fields["reports"] = _reports(path, data["report"])
    if "command_source" in data:
        fields["command_sources"] = _command_sources(path, data["command_source"])
    if "packages" in data:
        fields["packages"] = _packages(path, data["packages"])
    if "source" in data:
        fields["sources"] = _sources(path, data["source"], data.get("backup", {}))
    if "remote" in data:
        fields["remotes"] = _remotes(path, data["remote"])
        _remote_names_apart(path, fields["remotes"], fields.get("disks", ()))
    if "offsite" in data:
        from agent.config.offsite import offsite_tables  # it uses this module's validators

        fields["offsite"] = offsite_tables(path, _elements(path, "offsite", data["offsite"]), fields.get("rotation", DEFAULT_SCHEME))
    return Settings(path=path, **fields)


def named_programs(data: Mapping[str, Any], settings: Settings) -> tuple[tuple[str, str], ...]:
    """``(key, path)`` of every program the file itself names, that the cycle may run.

    The ``[commands]`` keys given in ``data`` (defaults are system paths and
    are not listed), then each hook's before and after program.
    """
    given = data.get("commands", {})
    programs = [
        (f"commands.{key}", getattr(settings.commands, key)) for key in _TABLE_KEYS["commands"] if key in given
    ]
    for index, hook in enumerate(settings.hooks):
        for side, argv in (("before", hook.before), ("after", hook.after)):
            if argv is not None:
                programs.append((f"hooks[{index}].{side}", argv[0]))
    for index, source in enumerate(settings.command_sources):
        programs.append((f"command_source[{index}].command", source.command[0]))
    for index, offsite in enumerate(settings.offsite):
        if offsite.password_command is not None:
            programs.append((f"offsite[{index}].password_command", offsite.password_command[0]))
    return tuple(programs)
