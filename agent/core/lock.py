"""One cycle at a time: flock-based locks that a killed run never leaves held.

The kernel drops an flock when its holder dies, so a crashed or SIGKILLed run
never blocks the next one. The holder writes who it is into the file so the
second run can name it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from typing import Any, Iterator

from agent.core.errors import BusyError, LockFileError


def machine_lock_path() -> str:
    """Where the per-machine lock lives: /run for root, the runtime dir otherwise.

    ``BACKUP_AGENT_RUNTIME_DIR`` moves it (tests, a second instance), except
    through sudo, where the caller's environment is never trusted.
    """
    override = os.environ.get("BACKUP_AGENT_RUNTIME_DIR")
    if override and os.path.isabs(override) and "SUDO_UID" not in os.environ:
        return os.path.join(override, "backup-agent.lock")
    if os.geteuid() == 0:
        return "/run/backup-agent.lock"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime):
        return os.path.join(runtime, "backup-agent.lock")
    return f"/tmp/backup-agent-{os.getuid()}.lock"


def _parse_holder(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8", "replace")
        holder = json.loads(text) if text.strip() else {}
    except (ValueError, RecursionError):  # the lock file lives in the repository: anyone may have written it
        return {}
    return holder if isinstance(holder, dict) else {}


def read_holder(path: str) -> dict[str, Any]:
    """What the lock's holder wrote about itself (pid, started, repository, command); {} when nothing readable.

    Only meaningful while someone holds the lock (the holder empties it when done).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        return _parse_holder(os.pread(fd, 4096, 0))
    except OSError:
        return {}
    finally:
        os.close(fd)


def holder_details(holder: dict[str, Any]) -> str:
    """The holder in words: "pid 4242, started …, writing to …" ("" without a pid)."""
    if "pid" not in holder:
        return ""
    what = f"pid {holder['pid']}"
    if holder.get("started"):
        what += f", started {holder['started']}"
    if holder.get("repository"):
        what += f", writing to {holder['repository']}"
    if holder.get("disk"):
        what += f", disk {holder['disk']}"
    return what


def _holder_of(fd: int) -> dict[str, Any]:
    try:
        return _parse_holder(os.pread(fd, 4096, 0))
    except OSError:
        return {}


def _describe_holder(holder: dict[str, Any], path: str) -> str:
    what = holder_details(holder)
    if not what:
        return f"another backup holds {path}"
    command = holder.get("command")
    if isinstance(command, str) and command != "backup":
        # init and eject take the same lock: name them, they are not backups
        return f"backup-agent {command} is running ({what})"
    return f"another backup is running ({what})"


def _busy(fd: int, path: str, advice: str) -> BusyError:
    """The lock is held: who holds it, in words and as :attr:`BusyError.holder`."""
    holder = _holder_of(fd)
    return BusyError(f"{_describe_holder(holder, path)}; {advice}", step="lock", holder=holder)


@contextlib.contextmanager
def hold(path: str, holder: dict[str, Any]) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed) for the block."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        raise LockFileError(f"cannot open the lock file {path}: {exc.strerror}", step="lock") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise _busy(fd, path, "wait for it to finish or stop it, then try again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def probe(path: str) -> None:
    """Raise BusyError if someone holds ``path`` (LockFileError if it cannot be opened); creates nothing (for --dry-run)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise LockFileError(f"cannot open the lock file {path}: {exc.strerror}", step="lock") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise _busy(fd, path, "wait for it to finish") from None
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
