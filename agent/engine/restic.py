"""restic's command lines and output, pure: argv builders return tuples, parsers take text.

The off-site copy drives restic (docs/ARCHITECTURE.md, "The off-site copy");
this module is everything that knows restic's words, so that a new restic
changes one file. It relies on restic 0.14 (Debian 12's), the oldest that
has all of: ``backup --json`` status and summary lines, ``snapshots --json``,
``find --json``, ``restore --include``, ``check --read-data-subset=k/N``,
``backup --time/--host/--tag/--parent/--ignore-ctime``, ``--pack-size``,
``RESTIC_PASSWORD_COMMAND`` and ``RESTIC_REPOSITORY_FILE``. ``restore --json``
came later, so a restore reports no progress.

Secrets never reach an argv: the repository, the password file or command
and the backend's credentials go into restic's own environment
(:func:`environment`), which only root can read.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shlex
from dataclasses import dataclass
from typing import Any, Final, Iterable, Mapping, Sequence

from agent.config.model import Offsite
from agent.policy.rotation import FREQUENCIES, Scheme

MIN_VERSION: Final = (0, 14, 0)
#: The tag every off-site snapshot carries; the local snapshot's name is the other.
TAG: Final = "backup-agent"
#: restic 0.14 has no "unlimited" keep count (-1 came in 0.16): "always" is this many.
ALWAYS: Final = 1_000_000
#: How often restic prints its status line with --json when not on a terminal (it defaults to once a minute).
PROGRESS_FPS: Final = "2"

_VERSION_RE: Final = re.compile(r"restic (\d+)\.(\d+)\.(\d+)")


def parse_version(text: str) -> tuple[int, int, int] | None:
    """``(0, 14, 0)`` from ``restic version``'s line; None when it is not one."""
    match = _VERSION_RE.search(text)
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


def version_problem(found: tuple[int, int, int] | None) -> str | None:
    """Why this restic will not do, or None."""
    need = ".".join(map(str, MIN_VERSION))
    if found is None:
        return f"restic did not say its version; backup-agent needs restic {need} or newer"
    if found < MIN_VERSION:
        return f"restic {'.'.join(map(str, found))} is too old; backup-agent needs {need} or newer (apt install restic)"
    return None


def environment(offsite: Offsite, cache_dir: str, credentials: Mapping[str, str]) -> dict[str, str]:
    """restic's environment: where the repository is, how to get the password, the backend's credentials.

    The password itself is never here: a file restic reads or a command it
    runs. ``credentials`` (from the root-only environment file) cannot
    override what this function sets.
    """
    env = {key: value for key, value in credentials.items() if not key.startswith("RESTIC_")}
    if offsite.repository is not None:
        env["RESTIC_REPOSITORY"] = offsite.repository
    if offsite.repository_file is not None:
        env["RESTIC_REPOSITORY_FILE"] = offsite.repository_file
    if offsite.password_file is not None:
        env["RESTIC_PASSWORD_FILE"] = offsite.password_file
    if offsite.password_command is not None:
        env["RESTIC_PASSWORD_COMMAND"] = shlex.join(offsite.password_command)
    env["RESTIC_CACHE_DIR"] = cache_dir
    env["RESTIC_PROGRESS_FPS"] = PROGRESS_FPS
    env["TZ"] = "UTC"  # --time is read in this zone, whatever the machine's or the caller's
    # restic looks for a home for nothing else; a fixed one keeps root's out of it.
    env["HOME"] = cache_dir
    return env


def parse_environment_file(text: str, where: str) -> dict[str, str]:
    """``KEY=VALUE`` lines (``#`` comments, blank lines, an optional ``export``); ValueError naming the line."""
    found: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        key, equals, value = line.partition("=")
        if not equals or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"{where}:{number}: expected KEY=VALUE (such as AWS_ACCESS_KEY_ID=...)")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        found[key] = value
    return found


def with_options(argv: Sequence[str], offsite: Offsite) -> tuple[str, ...]:
    """``argv`` with this repository's global options after the program (restic takes them before the command)."""
    return (argv[0], *global_options(offsite), *argv[1:])


def global_options(offsite: Offsite) -> tuple[str, ...]:
    """The options every command of this repository gets (``-o``: a backend's own, such as ``sftp.command``)."""
    out: tuple[str, ...] = ()
    for option in offsite.options:
        out += ("-o", option)
    if offsite.pack_size is not None:
        out += ("--pack-size", str(offsite.pack_size))
    if offsite.limit_upload is not None:
        out += ("--limit-upload", str(offsite.limit_upload))
    return out


def restic_time(moment: dt.datetime) -> str:
    """``--time``: restic reads it in its own zone, which :func:`environment` makes UTC, so it is given in UTC."""
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def backup_argv(
    restic: str, *, host: str, snapshot: str, moment: dt.datetime, parent: str | None
) -> tuple[str, ...]:
    """``restic backup .`` run in the stable path, so the off-site tree's root is the snapshot's.

    ``--ignore-ctime``: every hard-link snapshot changes ctimes; ``--parent``:
    the previous off-site copy, whose unchanged files are not read again.
    """
    argv: tuple[str, ...] = (
        restic, "backup", "--json", "--ignore-ctime", "--host", host,
        "--tag", TAG, "--tag", snapshot, "--time", restic_time(moment),
    )
    if parent is not None:
        argv += ("--parent", parent)
    return argv + (".",)


def snapshots_argv(restic: str, host: str) -> tuple[str, ...]:
    return (restic, "snapshots", "--json", "--no-lock", "--host", host, "--tag", TAG)


def init_argv(restic: str) -> tuple[str, ...]:
    return (restic, "init")


def config_argv(restic: str) -> tuple[str, ...]:
    """``cat config``: reads the repository's id, and proves the password opens it."""
    return (restic, "cat", "config", "--no-lock")


def unlock_argv(restic: str) -> tuple[str, ...]:
    """Removes only stale locks (restic's own advice); ``--remove-all`` is never used."""
    return (restic, "unlock")


def keep_options(scheme: Scheme) -> tuple[str, ...]:
    """``--keep-daily 7`` and so on, from a rotation scheme (``always``: :data:`ALWAYS`)."""
    out: tuple[str, ...] = ()
    for frequency in FREQUENCIES:
        count = scheme.counts.get(frequency)
        if count is None:
            continue
        out += (f"--keep-{frequency}", str(ALWAYS if count == "always" else count))
    return out


def forget_argv(restic: str, host: str, scheme: Scheme, keep_last: int = 1) -> tuple[str, ...]:
    """Forgets only this machine's off-site snapshots; the newest ``keep_last`` (at least 1) are always kept."""
    last = str(max(keep_last, 1))
    return (restic, "forget", "--json", "--host", host, "--tag", TAG, "--group-by", "host", "--keep-last", last, *keep_options(scheme))


def prune_argv(restic: str) -> tuple[str, ...]:
    return (restic, "prune")


def check_argv(restic: str, part: int, parts: int) -> tuple[str, ...]:
    """``check``, reading part ``part`` of ``parts`` of the data; the structure alone when ``parts`` is 0."""
    if parts == 0:
        return (restic, "check")
    return (restic, "check", f"--read-data-subset={part}/{parts}")


def next_part(previous: int | None, parts: int) -> int:
    """The part to read now: 1, 2, ... N, 1 ... so that every N checks read the whole repository."""
    if parts <= 0:
        return 0
    if previous is None or not 1 <= previous < parts:
        return 1
    return previous + 1


def find_argv(restic: str, host: str, path: str) -> tuple[str, ...]:
    return (restic, "find", "--json", "--no-lock", "--host", host, "--tag", TAG, path)


def restore_argv(restic: str, snapshot_id: str, target: str, include: str) -> tuple[str, ...]:
    return (restic, "restore", "--no-lock", snapshot_id, "--target", target, "--include", include)


# -- what restic says ----------------------------------------------------------------


@dataclass(frozen=True)
class Status:
    """One ``backup --json`` status line, in our Progress fields."""

    percent: float | None
    bytes_done: int
    bytes_total: int | None
    files_done: int
    files_total: int | None
    eta: int | None
    errors: int
    current: str | None
    elapsed: float | None


@dataclass(frozen=True)
class Summary:
    """The ``backup --json`` summary line."""

    snapshot_id: str
    files_new: int
    files_changed: int
    files_unmodified: int
    data_added: int
    files: int
    bytes: int
    duration: float


@dataclass(frozen=True)
class Problem:
    """An ``error`` line of ``backup --json``: a file restic could not read."""

    item: str
    message: str


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def parse_backup_line(line: str) -> Status | Summary | Problem | None:
    """What one line of ``restic backup --json`` means; None for anything else (verbose lines, text)."""
    try:
        value = json.loads(line)
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    kind = value.get("message_type")
    if kind == "status":
        percent = _number(value.get("percent_done"))
        current = value.get("current_files")
        first = current[0] if isinstance(current, list) and current and isinstance(current[0], str) else None
        remaining = _int(value.get("seconds_remaining"))
        return Status(
            percent=None if percent is None else round(min(max(percent, 0.0), 1.0) * 100, 1),
            bytes_done=_int(value.get("bytes_done")) or 0,
            bytes_total=_int(value.get("total_bytes")),
            files_done=_int(value.get("files_done")) or 0,
            files_total=_int(value.get("total_files")),
            eta=remaining,
            errors=_int(value.get("error_count")) or 0,
            current=first,
            elapsed=_number(value.get("seconds_elapsed")),
        )
    if kind == "summary" and isinstance(value.get("snapshot_id"), str):
        return Summary(
            snapshot_id=value["snapshot_id"],
            files_new=_int(value.get("files_new")) or 0,
            files_changed=_int(value.get("files_changed")) or 0,
            files_unmodified=_int(value.get("files_unmodified")) or 0,
            data_added=_int(value.get("data_added")) or 0,
            files=_int(value.get("total_files_processed")) or 0,
            bytes=_int(value.get("total_bytes_processed")) or 0,
            duration=_number(value.get("total_duration")) or 0.0,
        )
    if kind == "error":
        error = value.get("error")
        message = error.get("message") if isinstance(error, dict) else error
        item = value.get("item")
        return Problem(item=item if isinstance(item, str) else "", message=str(message or "unreadable"))
    return None


@dataclass(frozen=True)
class Snapshot:
    """An off-site snapshot as ``snapshots --json`` lists it."""

    id: str
    short_id: str
    time: dt.datetime
    host: str
    tags: tuple[str, ...]

    @property
    def local_name(self) -> str | None:
        """The local snapshot it copies: its tag other than :data:`TAG`."""
        others = [tag for tag in self.tags if tag != TAG]
        return others[0] if others else None


def parse_time(text: str) -> dt.datetime:
    """restic's RFC 3339 times carry nanoseconds, which fromisoformat (3.11) takes only up to micro."""
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", text)
    if match is None:
        raise ValueError(f"not a restic time: {text!r}")
    fraction = (match[2] or "0")[:6].ljust(6, "0")
    zone = "+00:00" if match[3] == "Z" else match[3]
    return dt.datetime.fromisoformat(f"{match[1]}.{fraction}{zone}")


def parse_snapshots(text: str) -> list[Snapshot]:
    """``snapshots --json``, oldest first; ValueError when it is not that."""
    value = json.loads(text or "[]")
    if not isinstance(value, list):
        raise ValueError("restic snapshots --json did not print a list")
    found = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str) or not isinstance(item.get("time"), str):
            raise ValueError("restic snapshots --json listed something that is not a snapshot")
        tags = item.get("tags") or []
        found.append(
            Snapshot(
                id=item["id"],
                short_id=str(item.get("short_id") or item["id"][:8]),
                time=parse_time(item["time"]),
                host=str(item.get("hostname") or ""),
                tags=tuple(tag for tag in tags if isinstance(tag, str)),
            )
        )
    return sorted(found, key=lambda snapshot: snapshot.time)


def parse_config_id(text: str) -> str:
    """The repository id from ``cat config``."""
    value = json.loads(text)
    if not isinstance(value, dict) or not isinstance(value.get("id"), str):
        raise ValueError("restic cat config did not print a repository config")
    return str(value["id"])


@dataclass(frozen=True)
class Match:
    """One version of a path in one off-site snapshot (``find --json``)."""

    snapshot_id: str
    path: str
    kind: str
    size: int | None
    mtime: str


def parse_find(text: str) -> list[Match]:
    """``find --json``: one entry per snapshot with its matches."""
    value = json.loads(text or "[]")
    if not isinstance(value, list):
        raise ValueError("restic find --json did not print a list")
    found = []
    for group in value:
        if not isinstance(group, dict):
            continue
        snapshot = group.get("snapshot")
        for match in group.get("matches") or []:
            if isinstance(match, dict) and isinstance(snapshot, str):
                found.append(
                    Match(
                        snapshot_id=snapshot,
                        path=str(match.get("path", "")),
                        kind=str(match.get("type", "")),
                        size=_int(match.get("size")),
                        mtime=str(match.get("mtime", "")),
                    )
                )
    return found


# -- a backup that stopped moving ------------------------------------------------

class StallWatch:
    """Whether ``restic backup`` still moves, from its status lines (the clock is given: tested without waiting).

    restic 0.14 can stop for good after a backend error (a pack it could not
    store) while its status goes on printing the same numbers twice a second:
    the cycle would wait for ever with the disk open. The same numbers for
    ``limit`` seconds are taken for that (docs/ARCHITECTURE.md, "The off-site copy").
    """

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self._seen: tuple[int, int, int | None, int | None, int] | None = None
        self._since = 0.0

    def stalled(self, status: Status, clock: float) -> bool:
        """Take one status line seen at ``clock``; True once nothing has moved for ``limit`` seconds."""
        key = (status.bytes_done, status.files_done, status.bytes_total, status.files_total, status.errors)
        if key != self._seen:
            self._seen, self._since = key, clock
            return False
        return clock - self._since >= self.limit


# -- why it failed ------------------------------------------------------------------

# (reason, what restic says, in lower case): the first that matches the stderr tail wins.
_FAILURES: Final[tuple[tuple[str, tuple[str, ...]], ...]] = (
    ("password", ("wrong password", "no key found")),
    ("locked", ("repository is already locked", "unable to create lock")),
    ("quota", ("quota", "no space left", "insufficient storage", "507 ", "entity too large", "storage limit")),
    (
        "unreachable",
        (
            "connection refused", "no such host", "dial tcp", "i/o timeout", "network is unreachable",
            "connection reset", "no route to host", "ssh command exited", "unable to start the sftp session",
            "server unexpectedly closed", "unexpected eof",
        ),
    ),
    ("append-only", ("403 forbidden", "forbidden", "append-only", "appendonly")),
    # --parent of a snapshot this repository does not hold (forgotten by someone else, or another repository).
    ("no-parent", ("invalid id", "no matching id found")),
    ("no-repository", ("is there a repository at the following location", "unable to open config file", "config file does not exist")),
)

_ADVICE: Final[Mapping[str, str]] = {
    "password": "the repository refused the password: check password_file or password_command",
    "locked": (
        "the repository is locked by another client; stale locks of dead restic processes were removed "
        "(restic unlock) and it is still locked: wait for that client, or, once sure no client runs, "
        "remove its lock with restic unlock --remove-all yourself"
    ),
    "quota": "the off-site storage is full (quota exceeded): free space there or raise the quota",
    "append-only": "the server refused to delete (an append-only repository): set append_only = true for it, pruning is its owner's",
    "no-parent": "the off-site snapshot given as the parent is not in the repository",
    "stalled": "restic showed no progress for stall_timeout and was stopped; the next backup copies again",
    "no-repository": "there is no restic repository there yet: create it with backup-agent init --offsite NAME",
    "unreachable": "the off-site repository cannot be reached: check the network and the repository address",
}


def refused_deletion(line: str) -> bool:
    """restic retrying a deletion the server refused (an append-only rest-server or rclone answers 403)."""
    lowered = line.lower()
    return lowered.startswith("remove(") and "403" in lowered and "retrying" in lowered


_FULL: Final = ("no space left on device", "quota", "insufficient storage", "507 ")


def final_retry(line: str) -> str | None:
    """The reason when restic retries what will not get better by retrying (``append-only``, ``quota``), else None.

    restic 0.14 retries every failed save or deletion ten times over most of
    a minute; a refusal or a full store is final, so the caller stops it at once.
    """
    if refused_deletion(line):
        return "append-only"
    lowered = line.lower()
    if lowered.startswith("save(") and "retrying" in lowered and any(word in lowered for word in _FULL):
        return "quota"
    return None


def classify(lines: Iterable[str]) -> str:
    """The reason of a failure from restic's stderr (``failed`` when nothing known matches)."""
    text = "\n".join(lines).lower()
    for reason, needles in _FAILURES:
        if any(needle in text for needle in needles):
            return reason
    return "failed"


def explain(reason: str, lines: Sequence[str], fallback: str = "") -> str:
    """One line for a failure: what it means and what to do, then restic's own last words (or ``fallback``)."""
    said = next((line.strip() for line in reversed(lines) if line.strip()), fallback)
    advice = _ADVICE.get(reason, "restic failed")
    return f"{advice} (restic: {said[:200]})" if said else advice
