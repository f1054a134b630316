"""The one error hierarchy of backup-agent.

Every error a user can meet is a :class:`BackupAgentError`: the CLI prints its
one-line message and exits with its ``exit_code``. Anything else is a bug and
gets a traceback. Each class owns a distinct exit status so scripts and the
agent can tell failures apart without parsing text.
"""

from __future__ import annotations

import signal
from typing import Any, Mapping

# Exit statuses, documented in the README. 1 is left to Python for bugs.
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_REPOSITORY = 3
EXIT_BUSY = 4
EXIT_STEP_FAILED = 5
EXIT_DISK_MISSING = 6
EXIT_PARTIAL = 7
EXIT_NOT_AVAILABLE = 8
EXIT_DISK_BUSY = 9
EXIT_NO_AGENT = 10
EXIT_DAMAGED = 11  # verify found damage (a report, not an exception)
EXIT_DISK_FULL = 12
EXIT_UNVERIFIED = 13  # verify found nothing wrong, but could check no snapshot (no manifests)
EXIT_STALE = 14  # check-stale: no backup succeeded for remind_after days (a report, not an exception)
EXIT_WRONG_PASSPHRASE = 15  # the passphrase given on standard input does not open the disk
# Remote repositories (agent.repository.remote): why the server could not be used
# (20 and up).
EXIT_HOST_KEY = 20  # the server's host key is unknown or changed
EXIT_REFUSED = 21  # the server refused the key (or the rsync daemon the password)
EXIT_UNREACHABLE = 22  # no connection to the server at all
EXIT_CONNECTION_LOST = 23  # the connection broke off during the run
# The off-site copy (agent.engine.offsite); the local backup is not affected by either.
EXIT_OFFSITE = 16  # the off-site copy failed (unreachable, restic failed)
EXIT_OFFSITE_PASSWORD = 17  # the off-site repository refused the password (or has no key for it)
EXIT_INTERRUPTED = 130


class BackupAgentError(Exception):
    """Base of every expected failure; ``str()`` is the one line shown."""

    exit_code = EXIT_STEP_FAILED

    def __init__(self, message: str, *, step: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.step = step
        # Set by the cycle: True when no complete snapshot was touched.
        self.snapshots_untouched: bool | None = None


class UsageError(BackupAgentError):
    """The command line is wrong (bad option, bad value, missing argument)."""

    exit_code = EXIT_USAGE


class ConfigError(BackupAgentError):
    """The configuration file is unreadable, unsafe or invalid."""

    exit_code = EXIT_USAGE

    def __init__(self, path: str, key: str | None, problem: str) -> None:
        where = f"{path}: {key}" if key else path
        super().__init__(f"{where}: {problem}", step="config")
        self.path = path
        self.key = key
        self.problem = problem


class NotAvailableError(BackupAgentError):
    """An option is recognised but its capability is not built yet."""

    exit_code = EXIT_NOT_AVAILABLE


class RepositoryError(BackupAgentError):
    """The destination is not a repository we may write to, or is damaged."""

    exit_code = EXIT_REPOSITORY


class CorruptManifestError(RepositoryError):
    """A snapshot's manifest does not match its own checksum, or cannot be parsed."""


class BusyError(BackupAgentError):
    """Another backup cycle holds the lock.

    ``holder`` is what the holder wrote about itself into the lock file
    (pid, started, command...; empty when unknown), so callers read who it
    is from the error instead of from its words.
    """

    exit_code = EXIT_BUSY

    def __init__(self, message: str, *, step: str | None = None, holder: Mapping[str, Any] | None = None) -> None:
        super().__init__(message, step=step)
        self.holder: dict[str, Any] = dict(holder or {})

    @property
    def pid(self) -> int | None:
        """The holder's process id, when it wrote a plausible one."""
        pid = self.holder.get("pid")
        return pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else None


class LockFileError(BusyError):
    """The lock file itself cannot be opened (permissions, a link in its place).

    No sign that a cycle runs (a held lock is readable); a kind of BusyError
    so the exit status and every caller that only asks "busy?" stay as they were.
    """


class DiskMissingError(BackupAgentError):
    """The configured backup disk is not attached."""

    exit_code = EXIT_DISK_MISSING


class WrongDiskError(RepositoryError):
    """The mounted filesystem is not the configured disk's, or carries another repository."""


class DiskError(BackupAgentError):
    """Unlocking, mounting or checking the backup disk failed."""

    exit_code = EXIT_STEP_FAILED


class WrongPassphraseError(DiskError):
    """The passphrase given on standard input opens no key slot: the agent asks again (nothing was unlocked)."""

    exit_code = EXIT_WRONG_PASSPHRASE


class DiskBusyError(BackupAgentError):
    """The disk could not be unmounted: it is left mounted and unlocked, on purpose."""

    exit_code = EXIT_DISK_BUSY


class UnsafeKeyFileError(BackupAgentError):
    """crypttab names a key file others could read or change, or one on the backup disk."""

    exit_code = EXIT_USAGE


class HookError(BackupAgentError):
    """A critical before-hook failed: the cycle stops before anything is written."""

    exit_code = EXIT_STEP_FAILED


class CommandError(BackupAgentError):
    """An external program failed; carries its argv, status and stderr tail."""

    exit_code = EXIT_STEP_FAILED

    def __init__(
        self,
        message: str,
        *,
        argv: tuple[str, ...] = (),
        returncode: int | None = None,
        stderr_tail: tuple[str, ...] = (),
        step: str | None = None,
    ) -> None:
        super().__init__(message, step=step)
        self.argv = argv
        self.returncode = returncode
        self.stderr_tail = stderr_tail


class StepError(BackupAgentError):
    """A step of the cycle failed for a reason that is not a command's status."""

    exit_code = EXIT_STEP_FAILED


class DiskFullError(StepError):
    """The backup disk ran out of space (or inodes, or quota) during the transfer.

    Its own exit status, so that the agent can say what to do about it
    without reading the message.
    """

    exit_code = EXIT_DISK_FULL


class Interrupted(BackupAgentError):
    """The cycle received SIGINT or SIGTERM and stopped after cleaning up."""

    exit_code = EXIT_INTERRUPTED

    def __init__(self, signum: int, *, step: str | None = None) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name}", step=step)
        self.signum = signum
        self.exit_code = 128 + signum


class HostKeyError(BackupAgentError):
    """The server's host key is not the one known_hosts holds for it (unknown or changed): nothing was sent."""

    exit_code = EXIT_HOST_KEY


class RefusedError(BackupAgentError):
    """The server refused our key (or the rsync daemon our password or module)."""

    exit_code = EXIT_REFUSED


class UnreachableError(BackupAgentError):
    """The server could not be reached (refused, timed out, no route, unknown name)."""

    exit_code = EXIT_UNREACHABLE


class ConnectionLostError(BackupAgentError):
    """The connection to the server broke off during the run; the unfinished transfer is kept to resume from."""

    exit_code = EXIT_CONNECTION_LOST


class OffsiteError(BackupAgentError):
    """The off-site copy, or a command on the off-site repository, failed.

    ``reason`` says what kind of failure it is in one word (``password``,
    ``unreachable``, ``locked``, ``quota``, ``missing``, ``too-old``,
    ``no-repository``, ``append-only``, ``failed``), and each has its exit
    status, so the agent and scripts tell them apart without reading the text.
    """

    _EXIT_CODES = {
        "password": EXIT_OFFSITE_PASSWORD,
        "locked": EXIT_BUSY,
        "quota": EXIT_DISK_FULL,
        "missing": EXIT_NOT_AVAILABLE,
        "too-old": EXIT_NOT_AVAILABLE,
        "no-repository": EXIT_REPOSITORY,
    }

    def __init__(self, message: str, *, reason: str = "failed", step: str | None = "offsite") -> None:
        super().__init__(message, step=step)
        self.reason = reason
        self.exit_code = self._EXIT_CODES.get(reason, EXIT_OFFSITE)
