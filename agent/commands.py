"""The one place that runs external programs.

Every command goes through :class:`Runner`: it logs the exact argv, streams
output line by line (``\\r`` ends a line too, for rsync's progress), keeps the
tail of stderr for the error message, and maps the exit status through a
table so that "rsync said 24" becomes a warning and not a failure. argv is
always a tuple of strings; no shell is ever involved.
"""

from __future__ import annotations

import collections
import logging
import os
import shlex
import signal
from dataclasses import dataclass
from typing import Callable, Literal, Mapping, Sequence

import sh

from .errors import CommandError

log = logging.getLogger(__name__)

Kind = Literal["ok", "warning", "partial", "error"]

# code -> (kind, meaning). Codes not listed are errors; 0 is always ok.
ExitTable = Mapping[int, tuple[Kind, str]]

DEFAULT_EXIT_TABLE: ExitTable = {0: ("ok", "success")}

# The environment every command gets: nothing of the caller's leaks in
# (no PATH, PYTHONPATH, LD_* from a user), and output is not localised so it
# can be parsed.
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
IONICE_CLASSES = {"realtime": "1", "best-effort": "2", "idle": "3"}


@dataclass(frozen=True)
class Result:
    """What a finished command did."""

    argv: tuple[str, ...]
    returncode: int
    kind: Kind
    meaning: str
    stderr_tail: tuple[str, ...]


def clean_environment() -> dict[str, str]:
    """The environment for child processes: fixed PATH, C locale."""
    return {"PATH": SAFE_PATH, "LC_ALL": "C", "LANG": "C"}


def priority_prefix(
    ionice_program: str,
    nice_program: str,
    ionice_class: str | None,
    nice_level: int | None,
) -> tuple[str, ...]:
    """argv prefix that runs a command under ionice and nice (pure)."""
    prefix: tuple[str, ...] = ()
    if ionice_class is not None and ionice_class != "none":
        prefix += (ionice_program, "-c", IONICE_CLASSES[ionice_class])
    if nice_level is not None and nice_level != 0:
        prefix += (nice_program, "-n", str(nice_level))
    return prefix


def describe_status(returncode: int, table: ExitTable) -> tuple[Kind, str]:
    """Meaning of an exit status; a negative one is death by a signal."""
    if returncode in table:
        return table[returncode]
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return "error", f"killed by {name}"
    return "error", f"exit status {returncode}"


class _LineSplitter:
    """Turns arbitrary output chunks into lines ended by \\n or \\r."""

    def __init__(self, sink: Callable[[str], None]) -> None:
        self._sink = sink
        self._pending = ""

    def feed(self, chunk: str) -> None:
        data = self._pending + chunk
        start = 0
        for index, char in enumerate(data):
            if char in "\r\n":
                if index > start:
                    self._sink(data[start:index])
                start = index + 1
        self._pending = data[start:]

    def close(self) -> None:
        if self._pending:
            self._sink(self._pending)
            self._pending = ""


class Runner:
    """Runs argv tuples; in dry-run mode it only says what it would run.

    ``mutating=False`` marks a command that changes nothing (``rsync -n``,
    ``find``): it runs even in dry-run mode.
    """

    def __init__(self, *, dry_run: bool = False, stderr_tail: int = 20, kill_grace: float = 10.0) -> None:
        self.dry_run = dry_run
        self.stderr_tail = stderr_tail
        self.kill_grace = kill_grace

    def run(
        self,
        argv: Sequence[str],
        *,
        step: str,
        exit_table: ExitTable = DEFAULT_EXIT_TABLE,
        on_stdout: Callable[[str], None] | None = None,
        on_stderr: Callable[[str], None] | None = None,
        mutating: bool = True,
        check: bool = True,
        cwd: str | None = None,
    ) -> Result:
        """Run ``argv`` to the end; raise :class:`CommandError` on an error status."""
        argv = tuple(argv)
        if not argv:
            raise ValueError("empty argv")
        shown = shlex.join(argv)
        if self.dry_run and mutating:
            log.info("would run: %s", shown)
            return Result(argv, 0, "ok", "not run (dry run)", ())
        log.info("running: %s", shown)
        tail: collections.deque[str] = collections.deque(maxlen=self.stderr_tail)

        def stderr_line(line: str) -> None:
            tail.append(line)
            log.debug("%s: %s", os.path.basename(argv[0]), line)
            if on_stderr is not None:
                on_stderr(line)

        def stdout_line(line: str) -> None:
            if on_stdout is not None:
                on_stdout(line)
            else:
                log.debug("%s: %s", os.path.basename(argv[0]), line)

        out = _LineSplitter(stdout_line)
        err = _LineSplitter(stderr_line)
        try:
            program = sh.Command(argv[0])
        except sh.CommandNotFound:
            raise CommandError(
                f"{argv[0]} was not found: install it, or set its path in the [commands] table of the config",
                argv=argv,
                step=step,
            ) from None
        process = program(
            *argv[1:],
            _bg=True,
            _bg_exc=False,
            _out=out.feed,
            _err=err.feed,
            _out_bufsize=0,
            _err_bufsize=0,
            _tty_out=False,
            _in=None,
            _env=clean_environment(),
            _cwd=cwd,
            _ok_code=list(range(-64, 256)),
            _decode_errors="replace",
        )
        try:
            process.wait()
        except BaseException:
            # Interrupted (SIGTERM/SIGINT turned into an exception): stop the
            # child first so nothing keeps writing while we clean up.
            self._stop(process, shown)
            raise
        out.close()
        err.close()
        returncode = int(process.exit_code)
        kind, meaning = describe_status(returncode, exit_table)
        result = Result(argv, returncode, kind, meaning, tuple(tail))
        log.debug("%s finished: %s (%s)", argv[0], meaning, returncode)
        if kind == "error" and check:
            last = f": {tail[-1]}" if tail else ""
            raise CommandError(
                f"{os.path.basename(argv[0])} failed ({meaning}){last}",
                argv=argv,
                returncode=returncode,
                stderr_tail=tuple(tail),
                step=step,
            )
        return result

    def _stop(self, process: "sh.RunningCommand", shown: str) -> None:
        """Terminate a running child, then kill it if it does not go."""
        if not process.process.is_alive()[0]:
            return
        log.warning("stopping: %s", shown)
        try:
            process.terminate()
            process.wait(timeout=self.kill_grace)
        except sh.TimeoutException:
            log.warning("still running after %ss, killing: %s", self.kill_grace, shown)
            process.kill()
            process.wait()
