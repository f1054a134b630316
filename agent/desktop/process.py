"""The backup cycle's child process as the desktop agent runs it: Popen, its two pipes, its exit.

The agent's event loop reads the cycle's stdout (JSON lines) and stderr
(its log) without blocking, and learns of its exit through a pidfd (a
thread blocked in waitpid where the kernel has none), so udev, D-Bus and the
timers keep being served while a backup runs for hours.

Why not asyncio's subprocess transport: closing it kills a child that still
runs, and it is closed when the loop stops. The agent must be able to stop
reading a cycle and leave it running (an agent that is restarted or stopped
never kills a backup half-way; the cycle finishes and cleans up on its own).
And a hook's background job may keep the pipes open after the cycle exited,
so "the cycle ended" is its exit, not end-of-file on its output.

This is the one place besides :class:`agent.core.commands.Runner` that starts a
program: the runner waits for its commands, the agent cannot.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
from typing import Callable, Final, Literal, Sequence, cast

log = logging.getLogger(__name__)

Stream = Literal["stdout", "stderr"]

#: Longest line read from the cycle (a ``complete`` event with its statistics
#: and the first rsync errors is a few KiB).
MAX_LINE: Final = 1 << 20
READ_SIZE: Final = 65536


class ChildProcess:
    """One started program whose lines and exit are handed to callbacks on ``loop``.

    ``on_line(stream, line)`` for each line (``\\n`` ends it, a trailing
    ``\\r`` is dropped, bytes that are not UTF-8 are replaced); ``on_exit()``
    once the process has exited (it then reads what is left with :meth:`drain`).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_line: Callable[[Stream, str], None],
        on_exit: Callable[[], None],
    ) -> None:
        self._loop = loop
        self._on_line = on_line
        self._on_exit = on_exit
        self._process: subprocess.Popen[bytes] | None = None
        self._fds: dict[Stream, int] = {"stdout": -1, "stderr": -1}
        self._buffers: dict[Stream, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        self._pidfd = -1

    def start(self, argv: Sequence[str], stdin: bytearray | None = None) -> None:
        """Start ``argv`` (no shell) in its own session: a signal to the agent's group does not reach it.

        ``stdin``: written to its standard input, which is then closed (a
        passphrase: a few hundred bytes, far below a pipe's buffer, so this
        does not wait); otherwise it reads /dev/null. Raises OSError when it
        cannot be started.
        """
        log.info("running %s", " ".join(argv))
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
        )
        self._process = process
        if process.stdin is not None:
            try:
                with memoryview(stdin or bytearray()) as view:
                    written = 0
                    while written < len(view):
                        written += os.write(process.stdin.fileno(), view[written:])
            except BrokenPipeError:
                log.warning("%s exited before reading its standard input", argv[0])
            finally:
                process.stdin.close()
        if process.stdout is None or process.stderr is None:  # stdout=PIPE, stderr=PIPE give both: a bug
            raise RuntimeError(f"{argv[0]} (pid {process.pid}) was started without its output pipes")
        self._fds = {"stdout": process.stdout.fileno(), "stderr": process.stderr.fileno()}
        for stream, fd in self._fds.items():
            os.set_blocking(fd, False)
            self._loop.add_reader(fd, self._read, stream)
        try:
            self._pidfd = os.pidfd_open(process.pid)
        except (AttributeError, OSError):
            self._pidfd = -1
        if self._pidfd >= 0:
            self._loop.add_reader(self._pidfd, self._exited)
        else:  # no pidfd (Linux before 5.3): a thread blocked in waitpid, not polling
            waiter = self._loop.run_in_executor(None, process.wait)
            waiter.add_done_callback(lambda _: self._exited())

    @property
    def pid(self) -> int:
        return self._process.pid if self._process is not None else -1

    @property
    def returncode(self) -> int | None:
        return self._process.returncode if self._process is not None else None

    def poll(self) -> int | None:
        return self._process.poll() if self._process is not None else None

    def drain(self) -> None:
        """After the exit: read what it left in the pipes, then stop reading them.

        A child of it (a hook's background job) may keep them open, so this
        reads to "nothing more now", not to end-of-file.
        """
        for stream in ("stdout", "stderr"):
            self._read(stream)
            self._close_pipe(stream)

    def detach(self) -> None:
        """Stop reading the process (it keeps running if it still runs)."""
        for stream in ("stdout", "stderr"):
            self._close_pipe(stream)
        if self._pidfd >= 0:
            if not self._loop.is_closed():
                self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1

    def _exited(self) -> None:
        if self.poll() is None:
            return  # not yet (a spurious wake-up)
        self._on_exit()

    def _read(self, stream: Stream) -> None:
        """Readable: take what is there (without blocking), hand on the complete lines."""
        fd = self._fds[stream]
        if fd < 0:
            return
        buffer = self._buffers[stream]
        for _ in range(16):
            try:
                data = os.read(fd, READ_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                log.warning("reading the backup cycle's %s failed: %s", stream, exc)
                data = b""
            if not data:
                self._close_pipe(stream)
                return
            buffer += data
            self._lines(stream)
        if len(buffer) > MAX_LINE:
            log.warning("dropping an over-long line from the backup cycle (%d bytes)", len(buffer))
            buffer.clear()

    def _lines(self, stream: Stream, *, final: bool = False) -> None:
        buffer = self._buffers[stream]
        while True:
            end = buffer.find(b"\n")
            if end < 0:
                if not final or not buffer:
                    return
                end = len(buffer)
            raw = bytes(buffer[:end])
            del buffer[: end + 1]
            self._on_line(stream, raw.decode("utf-8", "replace").rstrip("\r"))

    def _close_pipe(self, stream: Stream) -> None:
        """Stop reading one pipe: hand on a last unterminated line, close our end."""
        fd = self._fds[stream]
        if fd < 0:
            return
        self._fds[stream] = -1
        if not self._loop.is_closed():
            self._loop.remove_reader(fd)
        self._lines(stream, final=True)
        if self._process is not None:
            pipe = self._process.stdout if stream == "stdout" else self._process.stderr
            if pipe is not None:
                pipe.close()


async def run_to_end(argv: Sequence[str], stdin: bytearray | None = None) -> tuple[int, list[str], list[str]]:
    """Run a short command of the agent's (``eject``, ``open``) to its end: (exit status, stdout lines, stderr lines).

    Waited for in a thread, so the loop goes on; in its own session, as the
    cycle is. ``stdin``: what it reads on its standard input (a passphrase;
    handed over without a copy). Raises OSError when it cannot be started.
    """
    process = subprocess.Popen(
        list(argv), stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, start_new_session=True, close_fds=True,
    )
    # communicate reads its input through a memoryview: a bytearray goes as it is, uncopied.
    out, err = await asyncio.to_thread(process.communicate, cast(bytes, stdin))
    return process.returncode, out.decode("utf-8", "replace").splitlines(), err.decode("utf-8", "replace").splitlines()


async def start_and_wait(argv: Sequence[str], wait: float) -> int | None:
    """Start a program of the user's session (a file manager's opener) and wait at most ``wait`` seconds.

    Its exit status, or None when it still runs then: it is left running
    (never killed), in its own session, with the session's environment.
    Raises OSError when it cannot be started.
    """
    log.info("running %s", " ".join(argv))
    process = subprocess.Popen(
        list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, close_fds=True,
    )
    try:
        return await asyncio.to_thread(process.wait, wait)
    except subprocess.TimeoutExpired:
        return None
