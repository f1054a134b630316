"""The configuration: one TOML file in, typed and validated settings out.

Reading the file (:func:`load_settings`) is kept apart from validating its
contents (:func:`settings_from_mapping`), so the rules are tested with plain
dicts. Every problem is a :class:`~agent.errors.ConfigError` of one line that
names the file, the ``table.key``, the value found and what was expected:
the user should be able to fix the file from the message alone.
"""

from __future__ import annotations

import datetime as dt
import difflib
import os
import re
import stat
import sys
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Mapping, NoReturn, Sequence

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

from .commands import IONICE_CLASSES
from .errors import ConfigError
from .rotation import DEFAULT_SCHEME, FREQUENCIES, Count, Scheme

SYSTEM_CONFIG: Final = "/etc/backup-agent/config.toml"

# Used when the whole system is backed up and the user did not list excludes:
# virtual and runtime filesystems, mount points of other disks, swap, and
# caches that are rebuilt on demand. Anchored at the transfer root ("/"), and
# "dir/*" keeps the (empty) directory itself so a restore recreates it.
DEFAULT_SYSTEM_EXCLUDES: Final[tuple[str, ...]] = (
    "/dev/*",
    "/proc/*",
    "/sys/*",
    "/run/*",
    "/tmp/*",
    "/var/tmp/*",
    "/mnt/*",
    "/media/*",
    "/lost+found",
    "/swapfile",
    "/swap.img",
    "/var/cache/apt/archives/*.deb",
    "/var/lib/systemd/coredump/*",
    "/home/*/.cache/*",
    "/home/*/.local/share/Trash/*",
    "/root/.cache/*",
    "/root/.local/share/Trash/*",
)

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
        ),
        "rotation": (*FREQUENCIES, "prefer_recent", "strict"),
        "commands": ("rsync", "ionice", "nice", "rm"),
        "notifications": ("enabled",),
    }
)

_COUNT_EXPECTED: Final = 'a whole number of 0 or more, or "always"'
_DURATION_EXPECTED: Final = (
    'a duration string such as "90s", "10m", "1h30m" or "7d" (whole numbers with the units d, h, m, s, '
    'largest first), or "0" for none'
)
_DURATION_RE: Final = re.compile(r"(?:([0-9]+)d)?(?:([0-9]+)h)?(?:([0-9]+)m)?(?:([0-9]+)s)?", re.ASCII)
_DURATION_UNITS: Final = (86400, 3600, 60, 1)
_SHOW_LIMIT: Final = 80


@dataclass(frozen=True)
class Commands:
    """Absolute paths of every external program the cycle runs.

    Absolute so that no PATH lookup decides what root executes.
    """

    rsync: str = "/usr/bin/rsync"
    ionice: str = "/usr/bin/ionice"
    nice: str = "/usr/bin/nice"
    rm: str = "/bin/rm"
    # /bin and /sbin: right with and without Debian's merged /usr.
    blkid: str = "/sbin/blkid"
    cryptdisks_start: str = "/sbin/cryptdisks_start"
    cryptdisks_stop: str = "/sbin/cryptdisks_stop"
    systemctl: str = "/bin/systemctl"
    mount: str = "/bin/mount"
    umount: str = "/bin/umount"
    sync: str = "/bin/sync"


@dataclass(frozen=True)
class Disk:
    """One encrypted backup disk: how to find, unlock and mount it, and its repository."""

    name: str  # the crypttab target name; the mapped device is /dev/mapper/<name>
    luks_uuid: str  # UUID of the LUKS partition (lower case, canonical form)
    mount_point: str
    mapped_device: str  # default /dev/mapper/<name>
    repository: str  # default <mount_point>/<hostname>; always strictly below mount_point
    unlock: str = "auto"  # auto | cryptdisks | systemd
    # When filesystem is set, the cycle mounts the mapped device itself
    # (mount -t FILESYSTEM -o OPTIONS); otherwise through the fstab entry.
    filesystem: str | None = None
    mount_options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Hook:
    """A command pair run around the whole cycle ("backup") or the transfer ("snapshot")."""

    name: str
    around: str  # "backup" | "snapshot"
    before: tuple[str, ...] | None = None  # argv; no shell unless the user writes sh -c
    after: tuple[str, ...] | None = None
    timeout: int = 600  # seconds, for each of before and after
    critical: bool = True  # a failed critical before-hook stops the cycle before anything is written


@dataclass(frozen=True)
class KeepFree:
    """Free space to make before a transfer by deleting the oldest snapshots (opt-in)."""

    bytes: int | None = None
    percent: float | None = None
    min_snapshots: int = 3  # never delete below this many complete snapshots


@dataclass(frozen=True)
class Settings:
    """Everything the configuration decides, validated; ``path`` is the file read."""

    path: str | None
    source: str = "/"
    repository: str | None = None
    exclude: tuple[str, ...] | None = None
    one_file_system: bool = True
    ionice: str = "idle"
    nice: int = 19
    skip_cachedir_tagged: bool = True
    io_timeout: int = 0
    rotation: Scheme = DEFAULT_SCHEME
    commands: Commands = Commands()
    notifications: bool = True
    disks: tuple[Disk, ...] = ()
    hooks: tuple[Hook, ...] = ()
    keep_free: KeepFree | None = None
    state_dir: str = "/var/lib/backup-agent"  # where init records each disk's repository id
    crypttab: str = "/etc/crypttab"
    fstab: str = "/etc/fstab"


def effective_excludes(settings: Settings) -> tuple[str, ...]:
    """The rsync exclude patterns to use: the user's list, else the defaults for "/"."""
    if settings.exclude is not None:
        return settings.exclude
    if settings.source == "/":
        return DEFAULT_SYSTEM_EXCLUDES
    return ()


# --------------------------------------------------------------------------
# Showing values in messages


def _quote(text: str) -> str:
    """A string as a one-line TOML basic string, so control characters stay visible."""
    escapes = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
    out = []
    for char in text:
        if char in escapes:
            out.append(escapes[char])
        elif not char.isprintable():
            out.append(f"\\u{ord(char):04x}" if ord(char) <= 0xFFFF else f"\\U{ord(char):08x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _literal(value: object) -> str:
    """A value written the way it looks in TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{key} = {_literal(item)}" for key, item in value.items()) + " }"
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    return repr(value)


def _show(value: object) -> str:
    """A value for a message: TOML-like, one line, not too long."""
    text = _literal(value)
    if len(text) > _SHOW_LIMIT:
        text = text[: _SHOW_LIMIT - 1] + "…"
    return text


def _type_name(value: object) -> str:
    """The TOML name of a value's type, with its article."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        if value and all(isinstance(item, dict) for item in value):
            return "an array of tables"
        return "an array"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, dt.datetime):
        return "a date-time"
    if isinstance(value, dt.date):
        return "a date"
    if isinstance(value, dt.time):
        return "a time"
    return f"a {type(value).__name__}"


def _got_type(value: object) -> str:
    return f"got {_type_name(value)} ({_show(value)})"


def _suggest(name: str, accepted: Sequence[str]) -> str | None:
    matches = difflib.get_close_matches(name, accepted, n=1, cutoff=0.6)
    return matches[0] if matches else None


def _fail(file: str, key: str | None, problem: str) -> NoReturn:
    raise ConfigError(file, key, problem)


# --------------------------------------------------------------------------
# Durations


def _duration_seconds(text: str) -> int | None:
    """Seconds of a duration string, or None when it is not one."""
    if text == "0":
        return 0
    match = _DURATION_RE.fullmatch(text)
    if not text or match is None:
        return None
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
        raise ValueError(f"invalid duration {_show(text)}{_duration_hint(text)}: expected {_DURATION_EXPECTED}")
    return seconds


# --------------------------------------------------------------------------
# Validation of single values


def _bool(file: str, key: str, value: object) -> bool:
    if not isinstance(value, bool):
        _fail(file, key, f"{_got_type(value)}; expected a boolean (true or false)")
    return value


def _path(file: str, key: str, value: object, *, what: str = "an absolute path") -> str:
    """A safe absolute path, normalised: no "..", no option-like component."""
    if not isinstance(value, str):
        _fail(file, key, f"{_got_type(value)}; expected a string holding {what}")
    shown = _show(value)
    if "\x00" in value or "\n" in value or "\r" in value:
        _fail(file, key, f"got {shown}, which holds a NUL or newline character; expected {what} without them")
    if not value.startswith("/"):
        _fail(file, key, f"got {shown}, a relative path; expected {what} (starting with /)")
    parts = [part for part in value.split("/") if part not in ("", ".")]
    if ".." in parts:
        _fail(file, key, f'got {shown}, which holds a ".." component; expected {what} without ".."')
    for part in parts:
        if part.startswith("-"):
            _fail(
                file,
                key,
                f"got {shown}, whose component {_quote(part)} starts with - and could be taken for an option; "
                f"expected {what} whose components do not start with -",
            )
    return "/" + "/".join(parts)


def _count(file: str, key: str, value: object) -> Count:
    if isinstance(value, str):
        if value == "always":
            return "always"
        close = _suggest(value, ["always"])
        hint = ' (did you mean "always"?)' if close else ""
        _fail(file, key, f"got {_show(value)}{hint}; expected {_COUNT_EXPECTED}")
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(file, key, f"{_got_type(value)}; expected {_COUNT_EXPECTED}")
    if value < 0:
        _fail(file, key, f"got {value}; expected {_COUNT_EXPECTED}")
    if value > MAX_COUNT:
        _fail(file, key, f'got {value}, more than can be meant; expected a whole number from 0 to {MAX_COUNT}, or "always"')
    return value


def _check_keys(file: str, table: str, data: Mapping[str, Any]) -> None:
    """Refuse a key the table does not have, suggesting the likely one."""
    accepted = _TABLE_KEYS[table]
    for key in data:
        if key not in accepted:
            close = _suggest(key, accepted)
            hint = f", did you mean {close}?" if close else ""
            _fail(
                file,
                f"{table}.{key}",
                f"unknown key {_quote(key)} in [{table}]{hint}; expected one of {', '.join(accepted)}",
            )


# --------------------------------------------------------------------------
# Tables


def _backup(file: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """The [backup] table as keyword arguments of Settings."""
    _check_keys(file, "backup", data)
    out: dict[str, Any] = {}
    if "source" in data:
        out["source"] = _path(file, "backup.source", data["source"], what="an absolute directory path")
    if "repository" in data:
        repository = _path(file, "backup.repository", data["repository"], what="an absolute directory path")
        if repository in SYSTEM_DIRECTORIES:
            _fail(
                file,
                "backup.repository",
                f"got {_show(data['repository'])}, a system directory; "
                "expected a directory of its own for the snapshots, such as /srv/backup/<host>",
            )
        out["repository"] = repository
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
    return out


def _excludes(file: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        example = f"[{_show(value)}]" if isinstance(value, str) else '["/home/*/Downloads"]'
        _fail(file, "backup.exclude", f"{_got_type(value)}; expected an array of rsync patterns such as {example}")
    patterns = []
    for index, item in enumerate(value):
        key = f"backup.exclude[{index}]"
        if not isinstance(item, str):
            _fail(file, key, f"{_got_type(item)}; expected a string holding an rsync pattern")
        if not item:
            _fail(file, key, 'got ""; expected a non-empty rsync pattern')
        if "\x00" in item or "\n" in item or "\r" in item:
            _fail(file, key, f"got {_show(item)}, which holds a NUL or newline character; expected a pattern without them")
        patterns.append(item)
    return tuple(patterns)


def _ionice(file: str, value: object) -> str:
    choices = ", ".join(_quote(choice) for choice in IONICE_CHOICES)
    if not isinstance(value, str):
        _fail(file, "backup.ionice", f"{_got_type(value)}; expected one of the strings {choices}")
    if value not in IONICE_CHOICES:
        close = _suggest(value, IONICE_CHOICES)
        hint = f" (did you mean {_quote(close)}?)" if close else ""
        _fail(file, "backup.ionice", f"got {_show(value)}{hint}; expected one of {choices}")
    return value


def _nice(file: str, value: object) -> int:
    low, high = NICE_RANGE
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(file, "backup.nice", f"{_got_type(value)}; expected an integer from {low} to {high}")
    if not low <= value <= high:
        _fail(file, "backup.nice", f"got {value}; expected an integer from {low} (normal) to {high} (lowest priority)")
    return value


def _io_timeout(file: str, value: object) -> int:
    if not isinstance(value, str):
        hint = ""
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            hint = f' (write "{value}s" for {value} seconds)' if value else ' (write "0")'
        _fail(file, "backup.io_timeout", f"{_got_type(value)}; expected {_DURATION_EXPECTED}{hint}")
    seconds = _duration_seconds(value)
    if seconds is None:
        _fail(file, "backup.io_timeout", f"got {_show(value)}{_duration_hint(value)}; expected {_DURATION_EXPECTED}")
    if seconds > MAX_IO_TIMEOUT:
        _fail(
            file,
            "backup.io_timeout",
            f"got {_show(value)} ({seconds} seconds); expected at most {MAX_IO_TIMEOUT} seconds, rsync's limit",
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
        default = ", ".join(f"{name} = {_literal(count)}" for name, count in DEFAULT_SCHEME.counts.items())
        _fail(
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


def _notifications(file: str, data: Mapping[str, Any]) -> bool:
    _check_keys(file, "notifications", data)
    return _bool(file, "notifications.enabled", data.get("enabled", True))


def _check_tables(file: str, data: Mapping[str, Any]) -> None:
    """Refuse anything at the top level that is not one of the known tables."""
    tables = ", ".join(f"[{name}]" for name in _TABLE_KEYS)
    for name, value in data.items():
        if name in _TABLE_KEYS:
            if not isinstance(value, Mapping):
                _fail(file, name, f"{_got_type(value)}; expected the table [{name}]")
            continue
        if isinstance(value, Mapping):
            close = _suggest(name, list(_TABLE_KEYS))
            hint = f", did you mean [{close}]?" if close else ""
            _fail(file, name, f"unknown table [{name}]{hint}; expected one of the tables {tables}")
        owners = [table for table, keys in _TABLE_KEYS.items() if name in keys]
        if owners:
            where = " or ".join(f"[{table}]" for table in owners)
            _fail(file, name, f"got the key {_quote(name)} outside any table; expected it below the line {where}")
        _fail(file, name, f"unknown key {_quote(name)} outside any table; expected only the tables {tables}")


def settings_from_mapping(data: Mapping[str, Any], path: str) -> Settings:
    """Validate parsed TOML into Settings; ``path`` only names the file in errors.

    Pure (no I/O), so every rule is tested with plain dicts.
    """
    _check_tables(path, data)
    fields: dict[str, Any] = {}
    if "backup" in data:
        fields.update(_backup(path, data["backup"]))
    if "rotation" in data:
        fields["rotation"] = _rotation(path, data["rotation"])
    if "commands" in data:
        fields["commands"] = _commands(path, data["commands"])
    if "notifications" in data:
        fields["notifications"] = _notifications(path, data["notifications"])
    return Settings(path=path, **fields)


# --------------------------------------------------------------------------
# Trust and reading the file


def running_through_sudo() -> bool:
    """True when root was reached through sudo: then the caller is someone else."""
    return os.geteuid() == 0 and "SUDO_UID" in os.environ


def _untrusted(path: str, problem: str) -> NoReturn:
    _fail(
        path,
        None,
        f"refusing an unsafe config: {problem}; expected the file and every directory above it "
        "to be owned by root and writable by root only, with no symbolic links",
    )


def _check_owner_mode(path: str, name: str, info: os.stat_result) -> None:
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        _untrusted(path, f"{name} is writable by group or others (mode {stat.S_IMODE(info.st_mode):04o})")
    if info.st_uid != 0:
        _untrusted(path, f"{name} is owned by uid {info.st_uid}, not root")


def _lstat(path: str, name: str) -> os.stat_result:
    try:
        return os.lstat(name)
    except FileNotFoundError:
        _fail(path, None, f"{name} does not exist; expected the config file at this path")
    except OSError as error:
        _fail(path, None, f"cannot examine {name} ({error.strerror}); expected a readable path")


def _trusted_stat(path: str) -> os.stat_result:
    """check_trusted that returns the file's lstat, for the caller to compare after opening."""
    if not path.startswith("/") or path != "/" + "/".join(p for p in path.split("/") if p not in ("", ".", "..")):
        _fail(path, None, "refusing an unsafe config path; expected an absolute path without //, . or .. components")
    info = _lstat(path, path)
    if stat.S_ISLNK(info.st_mode):
        _untrusted(path, f"{path} is a symbolic link")
    if not stat.S_ISREG(info.st_mode):
        _untrusted(path, f"{path} is not a regular file")
    _check_owner_mode(path, path, info)
    parts = path.split("/")[1:-1]
    for depth in range(len(parts) + 1):
        directory = "/" + "/".join(parts[:depth])
        dir_info = _lstat(path, directory)
        if stat.S_ISLNK(dir_info.st_mode):
            _untrusted(path, f"{directory} is a symbolic link")
        if not stat.S_ISDIR(dir_info.st_mode):
            _untrusted(path, f"{directory} is not a directory")
        _check_owner_mode(path, directory, dir_info)
    return info


def check_trusted(path: str) -> None:
    """Refuse a config that anyone but root could have written.

    As root, the file decides what is executed and deleted, so it and every
    directory above it must be root's and writable by root only. Each
    component is examined with lstat: a symbolic link anywhere is refused,
    as its target could be swapped.
    """
    _trusted_stat(path)


def _read_bytes(path: str, *, trusted: tuple[int, int] | None) -> bytes:
    """The file's bytes; ``trusted`` (dev, inode) must match what was checked."""
    flags = os.O_RDONLY | os.O_CLOEXEC
    if trusted is not None:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        _fail(path, None, "the file does not exist; expected a TOML config file: check the path")
    except IsADirectoryError:
        _fail(path, None, "this is a directory; expected a TOML config file")
    except PermissionError:
        _fail(path, None, f"cannot read the file: permission denied for uid {os.geteuid()}; expected a file this user can read")
    except OSError as error:
        _fail(path, None, f"cannot open the file ({error.strerror}); expected a readable TOML config file")
    try:
        info = os.fstat(fd)
        if trusted is not None and (info.st_dev, info.st_ino) != trusted:
            _untrusted(path, "the file changed while it was being checked")
        if stat.S_ISDIR(info.st_mode):
            _fail(path, None, "this is a directory; expected a TOML config file")
        with os.fdopen(fd, "rb", closefd=False) as stream:
            return stream.read()
    except IsADirectoryError:
        _fail(path, None, "this is a directory; expected a TOML config file")
    except OSError as error:
        _fail(path, None, f"cannot read the file ({error.strerror}); expected a readable TOML config file")
    finally:
        os.close(fd)


def _decode(path: str, raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        _fail(
            path,
            None,
            f"the file is not UTF-8 text (byte 0x{raw[error.start]:02x} on line {line}); "
            "expected a UTF-8 encoded TOML file",
        )
    return text.removeprefix("\ufeff")


def _parse(path: str, text: str) -> dict[str, Any]:
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        message = str(error)
        match = re.fullmatch(r"(.*) \(at (line \d+, column \d+|end of document)\)", message, re.DOTALL)
        what, where = (match.group(1), match.group(2)) if match else (message, "unknown position")
        what = " ".join(what.split())
        _fail(path, None, f"invalid TOML at {where}: {what}; fix the TOML syntax")
    return data


def load_settings(path: str | None = None, *, through_sudo: bool = False) -> Settings:
    """Read and validate the config; without ``path``, SYSTEM_CONFIG or built-in defaults.

    ``through_sudo``: the caller is not root, so only the system file is
    read, and only if root alone could have written it.
    """
    system = SYSTEM_CONFIG
    explicit = path is not None
    file = system if path is None else path
    if through_sudo and explicit and file != system:
        _fail(
            file,
            None,
            f"--config is not accepted through sudo; the cycle reads only {system}: "
            "expected no --config option (edit the system config instead)",
        )
    if not explicit:
        try:
            os.lstat(file)
        except FileNotFoundError:
            return Settings(path=None)
        except OSError:
            pass  # reported with its reason by the reading below
    trusted: tuple[int, int] | None = None
    if through_sudo:
        info = _trusted_stat(file)
        trusted = (info.st_dev, info.st_ino)
    raw = _read_bytes(file, trusted=trusted)
    return settings_from_mapping(_parse(file, _decode(file, raw)), file)
