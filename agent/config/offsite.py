"""Validation of ``[[offsite]]``: parsed TOML in, :class:`~agent.config.model.Offsite` out, pure.

Its own module so the off-site copy adds to the configuration without
growing :mod:`agent.config.validate`, whose single-value validators it uses.
A secret is only ever named here (a file, a command): restic gets it by
name or from its environment, never on a command line (docs/ARCHITECTURE.md,
"The off-site copy").
"""

from __future__ import annotations

import re
from typing import Any, Final, Mapping, Sequence

from agent.config import validate as v
from agent.config.messages import fail, got_type, show
from agent.config.model import Offsite
from agent.policy.rotation import FREQUENCIES, Scheme

#: Repository strings restic understands that we accept: a local path or a backend prefix.
BACKENDS: Final[tuple[str, ...]] = ("sftp:", "rest:", "s3:", "b2:", "azure:", "gs:", "swift:", "rclone:")
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", re.ASCII)
_NAME_EXPECTED: Final = 'a name of 1 to 64 ASCII letters, digits, "_", "." and "-", such as "cloud"'
_REPOSITORY_EXPECTED: Final = (
    'a restic repository: an absolute path, or one starting with ' + ", ".join(BACKENDS) + ' such as "sftp:backup@host:/srv/restic"'
)
_ROTATION_KEYS: Final = (*FREQUENCIES, "last", "prefer_recent", "strict")
_ROOT_FILE: Final = "an absolute path to a file only root can read"
MAX_CHECK_PARTS: Final = 1000
MIN_PACK_SIZE: Final = 4  # MiB: restic refuses less
MAX_PACK_SIZE: Final = 128  # MiB: restic's own limit


def _repository(file: str, key: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        fail(file, key, f"{got_type(value)}; expected {_REPOSITORY_EXPECTED}")
    if any(char in value for char in "\x00\r\n"):
        fail(file, key, f"got {show(value)}, which holds a NUL or newline character; expected {_REPOSITORY_EXPECTED}")
    if value.startswith("/"):
        return v._path(file, key, value, what="an absolute directory path for the restic repository")
    if not value.startswith(BACKENDS):
        fail(file, key, f"got {show(value)}; expected {_REPOSITORY_EXPECTED}")
    return value


def _whole(file: str, key: str, value: object, low: int, high: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        found = f"got {value}" if isinstance(value, int) and not isinstance(value, bool) else got_type(value)
        fail(file, key, f"{found}; expected {what}")
    return value


def _keep_last(file: str, prefix: str, value: object) -> int:
    """``[offsite.rotation] last``: restic's --keep-last (the newest N whatever their period); at least 1."""
    if not isinstance(value, Mapping) or "last" not in value:
        return 1
    return _whole(file, f"{prefix}.rotation.last", value["last"], 1, v.MAX_COUNT, f"a whole number from 1 to {v.MAX_COUNT}")


def _rotation(file: str, prefix: str, value: object, local: Scheme) -> Scheme:
    """``[offsite.rotation]``: the keep-* of restic forget; absent frequencies: the local scheme's."""
    if not isinstance(value, Mapping):
        fail(file, f"{prefix}.rotation", f"{got_type(value)}; expected the table [offsite.rotation] below its [[offsite]]")
    for key in value:
        if key not in _ROTATION_KEYS:
            fail(file, f"{prefix}.rotation.{key}", f"unknown key; expected one of {', '.join(_ROTATION_KEYS)}")
    counts = {name: v._count(file, f"{prefix}.rotation.{name}", value[name]) for name in FREQUENCIES if name in value}
    kept = {name: count for name, count in counts.items() if count != 0}
    if counts and not kept:
        fail(
            file,
            f"{prefix}.rotation",
            "got only counts of 0, which would forget every off-site snapshot but the newest; expected at least one count of 1 or more",
        )
    prefer_recent = v._bool(file, f"{prefix}.rotation.prefer_recent", value.get("prefer_recent", local.prefer_recent))
    strict = v._bool(file, f"{prefix}.rotation.strict", value.get("strict", local.strict))
    return Scheme(counts=kept or dict(local.counts), prefer_recent=prefer_recent, strict=strict)


_OPTION_RE: Final = re.compile(r"[a-z0-9][a-z0-9._-]*=[^\x00\r\n]*", re.ASCII)
_OPTION_EXPECTED: Final = 'an array of restic options "key=value", such as ["sftp.command=/usr/bin/ssh -i /root/.ssh/backup host -s sftp"]'


def _options(file: str, key: str, value: object) -> tuple[str, ...]:
    """restic's ``-o key=value`` options; they are on restic's command line, so no secret belongs here."""
    if not isinstance(value, list):
        fail(file, key, f"{got_type(value)}; expected {_OPTION_EXPECTED}")
    for index, item in enumerate(value):
        if not isinstance(item, str) or _OPTION_RE.fullmatch(item) is None:
            fail(file, f"{key}[{index}]", f"{got_type(item) if not isinstance(item, str) else 'got ' + show(item)}; expected {_OPTION_EXPECTED}")
    return tuple(value)


def _one(file: str, index: int, data: Mapping[str, Any], local: Scheme, names: set[str]) -> Offsite:
    prefix = f"offsite[{index}]"
    v._check_keys(file, "offsite", data, prefix=prefix)
    name = v._required(file, prefix, data, "name", _NAME_EXPECTED)
    if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
        fail(file, f"{prefix}.name", f"got {show(name) if isinstance(name, str) else got_type(name)}; expected {_NAME_EXPECTED}")
    if name in names:
        fail(file, f"{prefix}.name", f"got {show(name)} a second time; expected a name of its own for each [[offsite]]")
    names.add(name)
    fields: dict[str, Any] = {"name": name}
    if ("repository" in data) == ("repository_file" in data):
        fail(file, prefix, "expected exactly one of repository (the restic repository) and repository_file (a root-only file that holds it)")
    if "repository" in data:
        fields["repository"] = _repository(file, f"{prefix}.repository", data["repository"])
    else:
        fields["repository_file"] = v._path(file, f"{prefix}.repository_file", data["repository_file"], what=_ROOT_FILE)
    if ("password_file" in data) == ("password_command" in data):
        fail(file, prefix, "expected exactly one of password_file (a root-only file) and password_command (a program printing the password)")
    if "password_file" in data:
        fields["password_file"] = v._path(file, f"{prefix}.password_file", data["password_file"], what=_ROOT_FILE)
    else:
        fields["password_command"] = v._argv(file, f"{prefix}.password_command", data["password_command"])
    if "environment_file" in data:
        fields["environment_file"] = v._path(
            file, f"{prefix}.environment_file", data["environment_file"], what="an absolute path to a root-only file of KEY=VALUE lines"
        )
    if "host" in data:
        host = data["host"]
        if not isinstance(host, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,252}", host, re.ASCII):
            fail(file, f"{prefix}.host", f"{got_type(host)}; expected a host name such as \"laptop\"")
        fields["host"] = host
    for key in ("interval", "prune_interval", "check_interval", "stall_timeout"):
        if key in data:
            seconds = v._duration(file, f"{prefix}.{key}", data[key])
            if key == "stall_timeout" and seconds < 1:
                fail(file, f"{prefix}.{key}", f'got {show(data[key])}; expected at least "1s" (how long restic may show no progress)')
            if key == "interval" and seconds > v.MAX_INTERVAL:
                fail(file, f"{prefix}.{key}", f'got {show(data[key])}; expected at most "366d"')
            fields[key] = seconds
    for key in ("metered", "append_only"):
        if key in data:
            fields[key] = v._bool(file, f"{prefix}.{key}", data[key])
    if "remind_after" in data:
        fields["remind_after"] = _whole(
            file, f"{prefix}.remind_after", data["remind_after"], 0, v.MAX_REMIND_DAYS, "a whole number of days, 0 for no reminders"
        )
    if "check_parts" in data:
        fields["check_parts"] = _whole(
            file, f"{prefix}.check_parts", data["check_parts"], 0, MAX_CHECK_PARTS,
            f"N of restic check --read-data-subset=k/N, from 1 to {MAX_CHECK_PARTS} (0: check the structure only)",
        )
    if "pack_size" in data:
        fields["pack_size"] = _whole(
            file, f"{prefix}.pack_size", data["pack_size"], MIN_PACK_SIZE, MAX_PACK_SIZE, f"MiB from {MIN_PACK_SIZE} to {MAX_PACK_SIZE}"
        )
    if "limit_upload" in data:
        fields["limit_upload"] = _whole(file, f"{prefix}.limit_upload", data["limit_upload"], 1, 2**31 - 1, "KiB/s, 1 or more")
    if "options" in data:
        fields["options"] = _options(file, f"{prefix}.options", data["options"])
    fields["rotation"] = _rotation(file, prefix, data["rotation"], local) if "rotation" in data else local
    fields["keep_last"] = _keep_last(file, prefix, data.get("rotation"))
    return Offsite(**fields)


def offsite_tables(file: str, elements: Sequence[Mapping[str, Any]], local: Scheme) -> tuple[Offsite, ...]:
    """Every ``[[offsite]]``, checked; ``local``: the ``[rotation]`` scheme, the default of each ``[offsite.rotation]``."""
    names: set[str] = set()
    return tuple(_one(file, index, data, local, names) for index, data in enumerate(elements))
