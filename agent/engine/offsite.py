"""The off-site copy: the newest local snapshot, copied with restic to each ``[[offsite]]``.

A step after the local cycle (docs/ARCHITECTURE.md, "The off-site copy"):
once a snapshot is complete and reported, while the disk is still open,
each off-site repository that is due gets the newest complete snapshot,
read from one stable path in a private mount namespace
(:mod:`agent.engine.bindrun`) with ``--parent`` of its previous copy and
``--ignore-ctime``, so an unchanged tree costs a scan of metadata and no
upload. Then retention (``forget``, ``prune`` on its own slower schedule,
neither on an append-only repository) and a rolling ``check`` that reads
1/N of the data each time. Every result is a ``step`` event of its own
(``offsite``, ``offsite-forget``, ``offsite-prune``, ``offsite-check``) and
a failure is a warning: it never turns the local backup into a failure.

What each repository did last is in a small state file of root's,
``<state_dir>/offsite/<name>.json``: the repository id recorded by
``init --offsite``, the last copy, prune and check. The reading commands
(``list``, ``versions``, ``restore`` with ``--offsite``) need no disk.
restic's words are all in :mod:`agent.engine.restic`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import posixpath
import shutil
import stat
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from agent.config.model import Offsite, Settings
from agent.config.trust import Distrust, read_secret, walk_trusted
from agent.core.commands import Result, Runner
from agent.core.errors import BackupAgentError, CommandError, Interrupted, OffsiteError, UsageError
from agent.core.events import Emitter, progress, step, warning
from agent.core.files import write_atomic
from agent.engine import bindrun, restic
from agent.policy.rotation import parse_snapshot_name
from agent.repository.store import Repository

log = logging.getLogger(__name__)

#: Where the snapshot being copied is seen, in the copy's own mount namespace only.
STABLE_PATH = "/run/backup-agent-offsite/snapshot"
STEP = "offsite"
_MAX_STATE = 64 * 1024
_MAX_ENVIRONMENT = 64 * 1024
#: Whether the connection is metered: True, False, or None when nothing says (then it counts as not metered).
Metered = Callable[[], "bool | None"]


def not_known() -> bool | None:
    """The default answer to "metered?": nothing here knows (the desktop's conditions may)."""
    return None


# -- the state file -------------------------------------------------------------------


@dataclass
class State:
    """What this machine remembers of one off-site repository."""

    id: str | None = None
    last_copy: str | None = None  # ISO time of the last successful copy
    snapshot: str | None = None  # the local snapshot it copied
    offsite_id: str | None = None  # restic's id of that copy
    last_prune: str | None = None
    last_check: str | None = None
    check_part: int | None = None
    check_result: str | None = None  # "ok" or the problem
    append_only: bool = False  # the server refused a deletion
    last_failure: str | None = None  # the last copy's failure, None after a success
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            **self.extra,
            "id": self.id, "last_copy": self.last_copy, "snapshot": self.snapshot, "offsite_id": self.offsite_id,
            "last_prune": self.last_prune, "last_check": self.last_check, "check_part": self.check_part,
            "check_result": self.check_result, "append_only": self.append_only, "last_failure": self.last_failure,
        }


def state_path(settings: Settings, offsite: Offsite) -> str:
    return os.path.join(settings.state_dir, "offsite", offsite.name + ".json")


def parse_state(raw: bytes) -> State:
    """The state from its file's bytes; a malformed file reads as empty (a warning), never a crash."""
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        log.warning("the off-site state file is not JSON; starting afresh")
        return State()
    if not isinstance(value, dict):
        return State()
    state = State()
    for name in ("id", "last_copy", "snapshot", "offsite_id", "last_prune", "last_check", "check_result", "last_failure"):
        if isinstance(value.get(name), str):
            setattr(state, name, value[name])
    part = value.get("check_part")
    state.check_part = part if isinstance(part, int) and not isinstance(part, bool) else None
    state.append_only = value.get("append_only") is True
    return state


def read_state(settings: Settings, offsite: Offsite) -> State:
    path = state_path(settings, offsite)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return State()
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or (os.geteuid() == 0 and info.st_uid != 0):
            log.warning("%s is not a regular file of root's; ignored", path)
            return State()
        raw = os.read(fd, _MAX_STATE)
    finally:
        os.close(fd)
    return parse_state(raw)


def write_state(settings: Settings, offsite: Offsite, state: State) -> None:
    path = state_path(settings, offsite)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    write_atomic(path, json.dumps(state.to_json(), indent=1).encode() + b"\n", mode=0o600, prefix=f".{offsite.name}.")


def _age(then: str | None, now: dt.datetime) -> float | None:
    if then is None:
        return None
    try:
        moment = dt.datetime.fromisoformat(then)
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    return (now - moment).total_seconds()


# -- decisions (pure) --------------------------------------------------------------------


def recorded_parent(state: State) -> str | None:
    """The last copy this machine recorded, when the record can be trusted to be the newest copy there.

    Not after a failure (a stopped restic may have finished its snapshot),
    nor when nothing was copied yet (or the record was lost and ``init``
    adopted the repository): then the repository is listed.
    """
    if state.id is None or state.snapshot is None or state.last_failure is not None:
        return None
    return state.offsite_id


def skip_reason(
    offsite: Offsite, state: State, *, newest: str | None, now: dt.datetime, metered: bool | None
) -> str | None:
    """Why no copy is made now, or None when one is due."""
    if newest is None:
        return "there is no complete local snapshot to copy"
    if state.id is None:
        return f"the off-site repository {offsite.name} is not initialised here: run backup-agent init --offsite {offsite.name}"
    if state.snapshot == newest and state.last_failure is None:
        return f"the newest snapshot {newest} is already copied off-site"
    if metered is True and not offsite.metered:
        return "the connection is metered (set metered = true in [[offsite]] to copy over it anyway)"
    age = _age(state.last_copy, now)
    if age is not None and 0 <= age < offsite.interval and state.last_failure is None:
        return f"the last off-site copy is {_duration(age)} old; the next is due after {_duration(offsite.interval)}"
    return None


def due(last: str | None, interval: int, now: dt.datetime) -> bool:
    age = _age(last, now)
    return age is None or age < 0 or age >= interval


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


# -- restic for one repository -------------------------------------------------------------


def _read_private(path: str) -> str:
    """A file only its owner may read, root's alone as root (the backend's credentials)."""
    if os.geteuid() == 0:
        real, info = walk_trusted(path)
    else:
        real, info = path, os.lstat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            raise Distrust(f"{path} is not a regular file of uid {os.geteuid()}")
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise Distrust(f"{path} may be read by group or others (mode {stat.S_IMODE(info.st_mode):04o}); chmod 600 it")
    fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        raw = os.read(fd, _MAX_ENVIRONMENT + 1)
    finally:
        os.close(fd)
    if len(raw) > _MAX_ENVIRONMENT:
        raise Distrust(f"{path} is longer than {_MAX_ENVIRONMENT} bytes")
    return raw.decode("utf-8", "replace")


class Restic:
    """restic for one off-site repository: its environment, the version checked once, failures as OffsiteError."""

    def __init__(self, settings: Settings, offsite: Offsite, runner: Runner) -> None:
        self.settings = settings
        self.offsite = offsite
        self.runner = runner
        self.program = settings.commands.restic
        self._env: dict[str, str] | None = None

    @property
    def host(self) -> str:
        import socket

        return self.offsite.host or socket.gethostname()

    def prepare(self) -> None:
        """restic there and new enough; the password and credential files private: else OffsiteError."""
        lines: list[str] = []
        try:
            self.runner.run((self.program, "version"), step=STEP, on_stdout=lines.append, mutating=False)
        except CommandError as exc:
            if exc.returncode is None:
                raise OffsiteError(
                    f"restic was not found at {self.program}: apt install restic (0.14 or newer), or set [commands] restic", reason="missing"
                ) from None
            raise OffsiteError(f"restic version failed: {exc.message}", reason="missing") from None
        problem = restic.version_problem(restic.parse_version("\n".join(lines)))
        if problem is not None:
            raise OffsiteError(problem, reason="too-old")
        self.environment()

    def environment(self) -> dict[str, str]:
        if self._env is None:
            offsite = self.offsite
            credentials: dict[str, str] = {}
            try:
                if offsite.password_file is not None:
                    read_secret(offsite.password_file)  # refused unless private; restic reads it itself
                if offsite.repository_file is not None:
                    read_secret(offsite.repository_file)
                if offsite.environment_file is not None:
                    credentials = restic.parse_environment_file(_read_private(offsite.environment_file), offsite.environment_file)
            except Distrust as exc:
                raise OffsiteError(f"[[offsite]] {offsite.name}: {exc.problem}", reason="failed") from None
            except (OSError, ValueError) as exc:
                raise OffsiteError(f"[[offsite]] {offsite.name}: {exc}", reason="failed") from None
            cache = os.path.join(self.settings.state_dir, "restic-cache")
            if not self.runner.dry_run:
                os.makedirs(cache, mode=0o700, exist_ok=True)
            self._env = restic.environment(offsite, cache, credentials)
        return self._env

    def run(
        self,
        argv: Sequence[str],
        *,
        step_name: str = STEP,
        on_stdout: Callable[[str], None] | None = None,
        mutating: bool = True,
        prefix: Sequence[str] = (),
        retry_locked: bool = True,
    ) -> Result:
        """Run restic; a lock left by a dead restic is removed (``restic unlock``) and the command tried once more."""

        def on_stderr(line: str) -> None:
            # restic 0.14 retries a refused deletion or a full store for most of a minute: both are final, so it is stopped at once.
            reason = restic.final_retry(line)
            if reason is not None:
                raise OffsiteError(f"off-site {self.offsite.name}: {restic.explain(reason, [line])}", reason=reason, step=step_name)

        full = restic.with_options(argv, self.offsite)
        try:
            return self.runner.run(
                (*prefix, *full), step=step_name, on_stdout=on_stdout, on_stderr=on_stderr, mutating=mutating, env=self.environment()
            )
        except CommandError as exc:
            if exc.returncode is None and "was not found" in exc.message:
                raise OffsiteError(f"restic was not found at {self.program}: apt install restic", reason="missing", step=step_name) from None
            reason = restic.classify(exc.stderr_tail)
            if reason == "locked" and retry_locked:
                log.info("the off-site repository %s is locked; removing stale locks as restic advises (restic unlock)", self.offsite.name)
                try:
                    self.runner.run(restic.with_options(restic.unlock_argv(self.program), self.offsite), step=step_name, env=self.environment())
                except CommandError as unlocking:
                    log.warning("restic unlock failed (%s); trying once more anyway", unlocking.message)
                return self.run(argv, step_name=step_name, on_stdout=on_stdout, mutating=mutating, prefix=prefix, retry_locked=False)
            raise OffsiteError(
                f"off-site {self.offsite.name}: {restic.explain(reason, exc.stderr_tail, exc.message)}", reason=reason, step=step_name
            ) from None

    def output(self, argv: Sequence[str], *, step_name: str = STEP) -> str:
        lines: list[str] = []
        self.run(argv, step_name=step_name, on_stdout=lines.append, mutating=False)
        return "\n".join(lines)

    def repository_id(self) -> str:
        try:
            return restic.parse_config_id(self.output(restic.config_argv(self.program)))
        except ValueError as exc:
            raise OffsiteError(f"off-site {self.offsite.name}: {exc}") from None

    def snapshots(self) -> list[restic.Snapshot]:
        """This machine's off-site snapshots, oldest first."""
        try:
            return restic.parse_snapshots(self.output(restic.snapshots_argv(self.program, self.host)))
        except ValueError as exc:
            raise OffsiteError(f"off-site {self.offsite.name}: {exc}") from None


# -- the copy ------------------------------------------------------------------------------


@dataclass
class Copied:
    """What one repository's copy did, for the caller's summary and the tests."""

    name: str
    state: str  # "done", "skipped", "failed"
    snapshot: str | None = None
    offsite_id: str | None = None
    reason: str | None = None
    message: str | None = None
    summary: restic.Summary | None = None


def namespace_prefix(settings: Settings, snapshot_path: str) -> tuple[str, ...]:
    """The argv before restic's: a private mount namespace with the snapshot at :data:`STABLE_PATH`.

    The helper is run by its file (it needs nothing but the standard
    library), isolated (``-I``: no environment, no user site, not the current
    directory), so nothing but the installed package's own file is run.
    """
    return (
        settings.commands.unshare, "--mount", "--propagation", "private", "--",
        sys.executable, "-I", os.path.abspath(bindrun.__file__), settings.commands.mount, snapshot_path, STABLE_PATH, "--",
    )


class OffsiteCopy:
    """The off-site step of one cycle, for every configured repository in turn."""

    def __init__(
        self,
        settings: Settings,
        emitter: Emitter,
        runner: Runner,
        *,
        metered: Metered = not_known,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now().astimezone(),
    ) -> None:
        self.settings = settings
        self.emitter = emitter
        self.runner = runner
        self.metered = metered
        self.now = now

    def run(self, repo: Repository) -> list[Copied]:
        """Copy the newest complete snapshot of ``repo`` where due; never raises but for an interruption."""
        newest = repo.latest_name()
        results: list[Copied] = []
        for offsite in self.settings.offsite:
            results.append(self.one(offsite, repo, newest))
            if results[-1].reason == "interrupted":
                break  # stopped: the other repositories wait for the next backup too
        return results

    def one(self, offsite: Offsite, repo: Repository, newest: str | None) -> Copied:
        state = read_state(self.settings, offsite)
        try:
            metered = self.metered()
        except Exception:
            log.exception("asking whether the connection is metered failed; taken as not metered")
            metered = None
        reason = skip_reason(offsite, state, newest=newest, now=self.now(), metered=metered)
        if reason is not None or newest is None:
            self.emitter.emit(step(STEP, "skipped", offsite=offsite.name, reason=reason))
            log.info("off-site %s: %s", offsite.name, reason)
            return Copied(offsite.name, "skipped", snapshot=newest, reason=reason)
        tool = Restic(self.settings, offsite, self.runner)
        self.emitter.emit(step(STEP, "start", offsite=offsite.name, snapshot=newest))
        try:
            copied = self._copy(tool, state, repo, newest)
        except OffsiteError as exc:
            return self._failed(offsite, state, newest, exc.message, exc.reason, exc.exit_code)
        except Interrupted as exc:
            # The local snapshot is complete and reported: a stop here ends the copy only.
            stopped = f"the off-site copy was stopped ({exc.message}); the next run copies again"
            return self._failed(offsite, state, newest, stopped, "interrupted", exc.exit_code)
        except (OSError, BackupAgentError) as exc:
            message = exc.message if isinstance(exc, BackupAgentError) else str(exc)
            return self._failed(offsite, state, newest, f"off-site {offsite.name}: {message}", "failed", OffsiteError("").exit_code)
        self._maintain(tool, offsite, state)
        return copied

    def _failed(self, offsite: Offsite, state: State, newest: str, message: str, reason: str, exit_code: int) -> Copied:
        log.warning("%s", message)
        state.last_failure = message
        with contextlib.suppress(OSError):
            write_state(self.settings, offsite, state)
        self.emitter.emit(warning(STEP, message, offsite=offsite.name, reason=reason, exit_code=exit_code))
        self.emitter.emit(step(STEP, "failed", offsite=offsite.name, snapshot=newest, reason=reason, exit_code=exit_code, message=message))
        return Copied(offsite.name, "failed", snapshot=newest, reason=reason, message=message)

    def _copy(self, tool: Restic, state: State, repo: Repository, newest: str) -> Copied:
        offsite = tool.offsite
        tool.prepare()
        recorded = recorded_parent(state)
        if recorded is not None:
            # The usual run: the last copy, recorded here, is the parent. Every restic command costs a key
            # derivation (restic aims it at half a second), so the id check and the listing are not run:
            # restic looks the parent up before it stores anything but its lock, and only this repository holds it.
            try:
                return self._backup(tool, repo, state, newest, recorded)
            except OffsiteError as exc:
                if exc.reason != "no-parent":
                    raise
                log.info("off-site %s: the last copy recorded here (%s) is not there; checking the repository", offsite.name, recorded)
        found_id = tool.repository_id()
        if found_id != state.id:
            raise OffsiteError(
                f"off-site {offsite.name}: the repository there has id {found_id}, not the {state.id} recorded by init: "
                f"nothing was written; if it is the right one, adopt it with backup-agent init --offsite {offsite.name}",
                reason="no-repository",
            )
        earlier = tool.snapshots()
        there = [snapshot for snapshot in earlier if newest in snapshot.tags]
        if there:
            # Copied before this machine's record said so (a lost state file, a copy stopped after restic finished).
            log.info("off-site %s: %s is already there (%s)", offsite.name, newest, there[-1].short_id)
            self._record(offsite, state, newest, there[-1].short_id)
            self.emitter.emit(step(STEP, "done", offsite=offsite.name, snapshot=newest, id=there[-1].short_id, already=True))
            return Copied(offsite.name, "done", snapshot=newest, offsite_id=there[-1].short_id)
        return self._backup(tool, repo, state, newest, earlier[-1].id if earlier else None)

    def _backup(self, tool: Restic, repo: Repository, state: State, newest: str, parent: str | None) -> Copied:
        """``restic backup`` of ``newest`` at the stable path with ``parent``; the copy recorded when it ends."""
        offsite = tool.offsite
        moment = parse_snapshot_name(newest) or self.now()
        argv = restic.backup_argv(tool.program, host=tool.host, snapshot=newest, moment=moment, parent=parent)
        summary: list[restic.Summary] = []
        problems: list[restic.Problem] = []
        last = [0.0]
        watch = restic.StallWatch(offsite.stall_timeout)

        def on_stdout(line: str) -> None:
            parsed = restic.parse_backup_line(line)
            if isinstance(parsed, restic.Summary):
                summary.append(parsed)
            elif isinstance(parsed, restic.Problem):
                problems.append(parsed)
                log.warning("off-site %s: could not read %s: %s", offsite.name, parsed.item, parsed.message)
            elif isinstance(parsed, restic.Status):
                clock = time.monotonic()
                if watch.stalled(parsed, clock):  # raised here, restic is stopped by the runner
                    raise OffsiteError(
                        f"off-site {offsite.name}: {restic.explain('stalled', [], '')} "
                        f"({offsite.stall_timeout} s at {parsed.files_done} files, {parsed.bytes_done} bytes)",
                        reason="stalled",
                    )
                if clock - last[0] >= 0.5:
                    last[0] = clock
                    self.emitter.emit(status_progress(parsed))
            elif line.strip():
                log.debug("restic: %s", line)

        os.makedirs(STABLE_PATH, mode=0o700, exist_ok=True)
        result = tool.run(argv, on_stdout=on_stdout, prefix=namespace_prefix(self.settings, repo.snapshot_path(newest)))
        if not summary:
            raise OffsiteError(f"off-site {offsite.name}: restic backup ended ({result.meaning}) without saying which snapshot it made")
        made = summary[-1]
        self._record(offsite, state, newest, made.snapshot_id)
        self.emitter.emit(
            step(
                STEP, "done", offsite=offsite.name, snapshot=newest, id=made.snapshot_id, files=made.files,
                files_new=made.files_new, files_changed=made.files_changed, bytes_added=made.data_added,
                unreadable=len(problems), duration=round(made.duration, 3),
            )
        )
        return Copied(offsite.name, "done", snapshot=newest, offsite_id=made.snapshot_id, summary=made)

    def _record(self, offsite: Offsite, state: State, newest: str, offsite_id: str) -> None:
        state.last_copy = self.now().isoformat(timespec="seconds")
        state.snapshot = newest
        state.offsite_id = offsite_id
        state.last_failure = None
        write_state(self.settings, offsite, state)

    def dry_run(self, newest: str) -> None:
        """What a real run would do with the snapshot it would make, said and not done (docs/ARCHITECTURE.md, rule 7)."""
        for offsite in self.settings.offsite:
            reason = skip_reason(offsite, read_state(self.settings, offsite), newest=newest, now=self.now(), metered=None)
            what = reason or f"dry run: would copy {newest} to {offsite.name}"
            self.emitter.emit(step(STEP, "skipped", offsite=offsite.name, reason=what))
            log.info("off-site %s: %s", offsite.name, what)

    # -- retention and checks ----------------------------------------------------------------

    def _maintain(self, tool: Restic, offsite: Offsite, state: State) -> None:
        """forget, prune when due, check when due: each its own step; a failure is a warning."""
        now = self.now()
        if offsite.append_only or state.append_only:
            self.emitter.emit(step("offsite-forget", "skipped", offsite=offsite.name, reason=append_only_note(offsite.name)))
        else:
            self._guarded(offsite, state, "offsite-forget", lambda: self._forget(tool, offsite))
            if due(state.last_prune, offsite.prune_interval, now) and not state.append_only:
                self._guarded(offsite, state, "offsite-prune", lambda: self._prune(tool, offsite, state))
        if due(state.last_check, offsite.check_interval, now):
            self._guarded(offsite, state, "offsite-check", lambda: self._check(tool, offsite, state))
        with contextlib.suppress(OSError):
            write_state(self.settings, offsite, state)

    def _guarded(self, offsite: Offsite, state: State, name: str, action: Callable[[], dict[str, Any]]) -> None:
        self.emitter.emit(step(name, "start", offsite=offsite.name))
        try:
            detail = action()
        except OffsiteError as exc:
            if exc.reason == "append-only":
                state.append_only = True
            log.warning("%s", exc.message)
            self.emitter.emit(warning(name, exc.message, offsite=offsite.name, reason=exc.reason, exit_code=exc.exit_code))
            self.emitter.emit(step(name, "failed", offsite=offsite.name, reason=exc.reason, message=exc.message))
            return
        self.emitter.emit(step(name, "done", offsite=offsite.name, **detail))

    def _forget(self, tool: Restic, offsite: Offsite) -> dict[str, Any]:
        lines: list[str] = []
        tool.run(restic.forget_argv(tool.program, tool.host, offsite.rotation, offsite.keep_last), step_name="offsite-forget", on_stdout=lines.append)
        removed = 0
        with contextlib.suppress(ValueError):
            for group in json.loads("\n".join(lines) or "[]"):
                removed += len(group.get("remove") or []) if isinstance(group, dict) else 0
        return {"forgotten": removed}

    def _prune(self, tool: Restic, offsite: Offsite, state: State) -> dict[str, Any]:
        tool.run(restic.prune_argv(tool.program), step_name="offsite-prune")
        state.last_prune = self.now().isoformat(timespec="seconds")
        return {}

    def _check(self, tool: Restic, offsite: Offsite, state: State) -> dict[str, Any]:
        part = restic.next_part(state.check_part, offsite.check_parts)
        subset = f"{part}/{offsite.check_parts}" if part else "structure"
        try:
            tool.run(restic.check_argv(tool.program, part, offsite.check_parts), step_name="offsite-check")
        except OffsiteError as exc:
            if exc.reason == "failed":
                # restic check found damage: reported like verify's, and the next check reads the same part again.
                state.check_result = exc.message
                state.last_check = self.now().isoformat(timespec="seconds")
                raise OffsiteError(
                    f"off-site {offsite.name}: restic check of {subset} found damage: {exc.message}", reason="damaged", step="offsite-check"
                ) from None
            raise
        state.check_part = part or None
        state.check_result = "ok"
        state.last_check = self.now().isoformat(timespec="seconds")
        return {"subset": subset, "result": "ok"}


def append_only_note(name: str) -> str:
    return f"{name} is append-only: forgetting and pruning old off-site snapshots belong to the server's owner"


def status_progress(status: restic.Status) -> Any:
    """restic's status line as our progress event (``step="offsite"``)."""
    rate = status.bytes_done / status.elapsed if status.elapsed else None
    return progress(
        status.percent, status.bytes_done, status.files_done, None if rate is None else round(rate, 1), status.eta,
        step=STEP, bytes_total=status.bytes_total, files_total=status.files_total, errors=status.errors, current=status.current,
    )


# -- init ------------------------------------------------------------------------------------


def find(settings: Settings, name: str) -> Offsite:
    for offsite in settings.offsite:
        if offsite.name == name:
            return offsite
    known = ", ".join(o.name for o in settings.offsite) or "none is configured"
    raise UsageError(f"no [[offsite]] named {name!r} in {settings.path} ({known}): add one, see the README's [[offsite]]")


def initialise(settings: Settings, offsite: Offsite, runner: Runner) -> tuple[str, bool]:
    """Create the restic repository, or adopt the one there after checking it; record its id. ``(id, created)``."""
    tool = Restic(settings, offsite, runner)
    tool.prepare()
    created = False
    try:
        found = tool.repository_id()
    except OffsiteError as exc:
        if exc.reason != "no-repository":
            raise
        tool.run(restic.init_argv(tool.program), step_name="init")
        found = tool.repository_id()
        created = True
    else:
        # Adopted: its structure must hold together before this machine trusts it.
        tool.run(restic.check_argv(tool.program, 0, 0), step_name="init")
    state = read_state(settings, offsite)
    state.id = found
    # Pruning and reading back are first due one interval after this: an initialised repository has nothing to prune or check.
    stamp = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    state.last_prune = state.last_prune or stamp
    state.last_check = state.last_check or stamp
    write_state(settings, offsite, state)
    return found, created


# -- reading: list, versions, restore ------------------------------------------------------


def offsite_path(settings: Settings, live: str) -> str:
    """Where a live path is in an off-site snapshot: its path below the backed-up source, from the root."""
    source = settings.source.rstrip("/") or "/"
    if source != "/" and live != source and not live.startswith(source + "/"):
        raise UsageError(f"{live} is not below the backed-up source {source}: it is in no snapshot")
    relative = live[len(source):] if source != "/" else live
    return "/" + relative.lstrip("/")


def choose(snapshots: Sequence[restic.Snapshot], *, name: str | None, at: dt.datetime | None) -> restic.Snapshot:
    """The off-site snapshot of a local name, the newest at or before ``at``, else the newest."""
    if not snapshots:
        raise UsageError("the off-site repository holds no snapshot of this machine yet")
    if name is not None:
        for snapshot in snapshots:
            if name in snapshot.tags or snapshot.id.startswith(name) and len(name) >= 8:
                return snapshot
        raise UsageError(f"no off-site snapshot of {name!r}: backup-agent list --offsite NAME lists them")
    if at is not None:
        before = [snapshot for snapshot in snapshots if snapshot.time <= at]
        if not before:
            raise UsageError(f"no off-site snapshot is as old as {at.isoformat(timespec='seconds')}")
        return before[-1]
    return snapshots[-1]


@contextlib.contextmanager
def _staging(parent: str) -> Iterator[str]:
    staging = tempfile.mkdtemp(prefix=".offsite-restore-", dir=parent)
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def restore(
    settings: Settings, offsite: Offsite, runner: Runner, live: str, *, name: str | None, at: dt.datetime | None, to: str | None
) -> tuple[str, restic.Snapshot]:
    """Restore ``live`` from the chosen off-site snapshot into a new place; where it went, and from which.

    ``--to DIR``: ``DIR/<name>``; otherwise ``restored-<snapshot>/<name>``
    beside the original. Nothing is written over: restic restores into a
    private staging directory next to the target and the result is renamed
    into place only when that name is free.
    """
    tool = Restic(settings, offsite, runner)
    tool.prepare()
    chosen = choose(tool.snapshots(), name=name, at=at)
    inside = offsite_path(settings, live)
    base = posixpath.basename(live.rstrip("/")) or "root"
    if to is not None:
        parent = os.path.abspath(to)
    else:
        parent = os.path.join(os.path.dirname(live.rstrip("/")) or "/", f"restored-{chosen.local_name or chosen.short_id}")
    target = os.path.join(parent, base)
    if os.path.lexists(target):
        raise UsageError(f"{target} exists: nothing is written over; give --to another directory")
    os.makedirs(parent, mode=0o700, exist_ok=True)
    with _staging(parent) as staging:
        tool.run(restic.restore_argv(tool.program, chosen.id, staging, inside), step_name="restore")
        restored = os.path.join(staging, inside.lstrip("/"))
        if not os.path.lexists(restored):
            raise UsageError(f"{live} is not in the off-site snapshot {chosen.local_name or chosen.short_id}")
        os.rename(restored, target)
    return target, chosen


def versions(settings: Settings, offsite: Offsite, runner: Runner, live: str) -> list[tuple[restic.Snapshot, restic.Match]]:
    """Every off-site snapshot that holds ``live``, oldest first, with what it holds there."""
    tool = Restic(settings, offsite, runner)
    tool.prepare()
    by_id = {snapshot.id: snapshot for snapshot in tool.snapshots()}
    inside = offsite_path(settings, live)
    try:
        matches = restic.parse_find(tool.output(restic.find_argv(tool.program, tool.host, inside), step_name="versions"))
    except ValueError as exc:
        raise OffsiteError(f"off-site {offsite.name}: {exc}") from None
    found = [(by_id[m.snapshot_id], m) for m in matches if m.snapshot_id in by_id and m.path == inside]
    return sorted(found, key=lambda pair: pair[0].time)


def listing(settings: Settings, offsite: Offsite, runner: Runner) -> list[restic.Snapshot]:
    tool = Restic(settings, offsite, runner)
    tool.prepare()
    return tool.snapshots()
