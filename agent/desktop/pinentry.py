"""Asking the user for a disk's passphrase with pinentry, speaking its Assuan protocol.

pinentry is the prompt GnuPG uses on every desktop: a small program per
toolkit (pinentry-gnome3, -qt, -gtk2; -curses and -tty on a terminal) that
grabs the keyboard and returns what was typed. The agent starts one per
question and talks to it over its stdin and stdout (docs/ARCHITECTURE.md, "A
passphrase disk"). The protocol part is pure and tested alone: escaping the
arguments of a command, parsing a reply line, decoding a ``D`` line's
percent escapes straight into a bytearray, and choosing the program from what
is installed and what the session is.

A typed passphrase exists in this process as: the bytes pinentry wrote
(asyncio's read buffer and the one line ``readline`` returns: Python gives
no way to wipe those), and the one bytearray it is decoded into, which the
caller wipes once the cycle has it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Final, Literal, Mapping, Sequence

log = logging.getLogger(__name__)

#: GnuPG's error code for "cancelled" (the low 16 bits of an ERR code; the
#: source, pinentry's 5, is in the high byte). 198 is "fully cancelled".
CANCELLED_CODES: Final = frozenset({99, 198})
#: GnuPG's "timeout" and "no pinentry" codes: the prompt could not be answered.
TIMEOUT_CODE: Final = 62
#: The longest Assuan line, escapes included (the protocol's limit is 1000 bytes).
MAX_LINE: Final = 1000
#: Seconds the prompt stays up (pinentry's own SETTIMEOUT), then counts as cancelled.
PROMPT_TIMEOUT: Final = 300

# By desktop: the toolkit's own prompt first. Debian names GTK 2's binary pinentry-gtk-2.
_GRAPHICAL: Final = {
    "kde": ("pinentry-qt", "pinentry-qt5", "pinentry-gnome3", "pinentry-gtk-2", "pinentry-gtk2", "pinentry-x11"),
    "lxqt": ("pinentry-qt", "pinentry-qt5", "pinentry-gtk-2", "pinentry-gtk2", "pinentry-gnome3", "pinentry-x11"),
    "gnome": ("pinentry-gnome3", "pinentry-gtk-2", "pinentry-gtk2", "pinentry-qt", "pinentry-x11"),
    "other": ("pinentry-gtk-2", "pinentry-gtk2", "pinentry-gnome3", "pinentry-qt", "pinentry-x11"),
}
_GNOME_LIKE: Final = ("gnome", "unity", "budgie", "pantheon", "cinnamon", "mate", "xfce")
_TERMINAL: Final = ("pinentry-curses", "pinentry-tty")


class PromptUnavailable(RuntimeError):
    """No prompt can be shown (no pinentry fits the session, or it failed): said in one line."""


@dataclass(frozen=True)
class Reply:
    """One line from pinentry: ``OK``, ``ERR`` (with ``code``), ``D`` (``data`` still escaped), ``S``, ``INQUIRE`` or ``#``."""

    kind: Literal["OK", "ERR", "D", "S", "INQUIRE", "#"]
    code: int = 0
    text: str = ""
    data: bytes = b""

    @property
    def cancelled(self) -> bool:
        return self.kind == "ERR" and (self.code & 0xFFFF) in CANCELLED_CODES

    @property
    def timed_out(self) -> bool:
        return self.kind == "ERR" and (self.code & 0xFFFF) == TIMEOUT_CODE


@dataclass(frozen=True)
class Prompt:
    """What the dialog says (``error``: shown above the field, after a wrong passphrase)."""

    title: str
    description: str
    prompt: str = "Passphrase:"
    error: str | None = None
    ok: str | None = None
    cancel: str | None = None


def escape(text: str) -> str:
    """An Assuan argument: ``%``, CR and LF percent-escaped, so one command stays one line (pure)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def command(name: str, argument: str | None = None) -> bytes:
    """One command line, escaped and ended (pure); ValueError when it would exceed the protocol's line."""
    line = name if argument is None else f"{name} {escape(argument)}"
    encoded = line.encode("utf-8") + b"\n"
    if len(encoded) > MAX_LINE:
        raise ValueError(f"the {name} line is {len(encoded)} bytes, over Assuan's {MAX_LINE}")
    return encoded


def parse(line: bytes) -> Reply:
    """One reply line (without its newline) (pure); ValueError for a line that is not Assuan."""
    if line.startswith(b"D "):
        return Reply("D", data=line[2:])
    word, _, rest = line.partition(b" ")
    text = rest.decode("utf-8", "replace")
    if word == b"OK":
        return Reply("OK", text=text)
    if word == b"ERR":
        code, _, message = text.partition(" ")
        if not code.isdigit():
            raise ValueError(f"an ERR line without a code: {text[:80]!r}")
        return Reply("ERR", code=int(code), text=message)
    if word in (b"S", b"INQUIRE"):
        return Reply("S" if word == b"S" else "INQUIRE", text=text)
    if word == b"#" or line.startswith(b"#"):
        return Reply("#", text=text)
    raise ValueError(f"not an Assuan reply: {line[:40]!r}")


def decode_into(data: bytes, out: bytearray) -> None:
    """Append a ``D`` line's data to ``out``, its ``%XX`` escapes decoded (pure); ValueError for a bad escape."""
    index = 0
    length = len(data)
    while index < length:
        byte = data[index]
        if byte == 0x25:  # "%"
            pair = data[index + 1 : index + 3]
            if len(pair) != 2 or not all(c in b"0123456789abcdefABCDEF" for c in pair):
                raise ValueError("a D line with a broken % escape")
            out.append(int(pair, 16))
            index += 3
        else:
            out.append(byte)
            index += 1


def setup_commands(prompt: Prompt, tty: str | None, term: str | None) -> list[bytes]:
    """The lines that set the dialog up before GETPIN or CONFIRM (pure)."""
    lines: list[bytes] = []
    if tty is not None:
        lines.append(command("OPTION", f"ttyname={tty}"))
        lines.append(command("OPTION", f"ttytype={term or 'dumb'}"))
    lines.append(command("SETTIMEOUT", str(PROMPT_TIMEOUT)))
    lines.append(command("SETTITLE", prompt.title))
    lines.append(command("SETDESC", prompt.description))
    lines.append(command("SETPROMPT", prompt.prompt))
    if prompt.error is not None:
        lines.append(command("SETERROR", prompt.error))
    if prompt.ok is not None:
        lines.append(command("SETOK", prompt.ok))
    if prompt.cancel is not None:
        lines.append(command("SETCANCEL", prompt.cancel))
    return lines


def confirm_commands(question: Prompt) -> list[bytes]:
    """The lines that turn the same dialog into a yes/no question, then ask it (pure)."""
    lines = [command("SETDESC", question.description)]
    if question.ok is not None:
        lines.append(command("SETOK", question.ok))
    if question.cancel is not None:
        lines.append(command("SETCANCEL", question.cancel))
    return [*lines, command("CONFIRM")]


def choose(environ: Mapping[str, str], which: Callable[[str], str | None], *, tty: str | None = None) -> str | None:
    """The pinentry to use (its path), or None when none fits (pure but for ``which``).

    With a graphical session (``WAYLAND_DISPLAY`` or ``DISPLAY``), the
    desktop's own toolkit first (``XDG_CURRENT_DESKTOP``: KDE and LXQt Qt,
    GNOME and its kin GNOME's, else GTK); with only a terminal (``tty``),
    pinentry-curses then -tty. Never a terminal pinentry without a terminal:
    it would wait on a console nobody watches.
    """
    if environ.get("WAYLAND_DISPLAY") or environ.get("DISPLAY"):
        desktops = [part.strip().lower() for part in environ.get("XDG_CURRENT_DESKTOP", "").split(":")]
        kind = "other"
        if "kde" in desktops:
            kind = "kde"
        elif "lxqt" in desktops:
            kind = "lxqt"
        elif any(desktop in _GNOME_LIKE for desktop in desktops):
            kind = "gnome"
        for name in _GRAPHICAL[kind]:
            found = which(name)
            if found is not None:
                return found
    if tty is not None:
        for name in _TERMINAL:
            found = which(name)
            if found is not None:
                return found
    return None


class Pinentry:
    """One pinentry program, started once per question; every method raises PromptUnavailable when it cannot ask."""

    def __init__(self, program: str, *, tty: str | None = None, environ: Mapping[str, str] | None = None) -> None:
        self.program = program
        self.tty = tty
        self._environ = dict(os.environ if environ is None else environ)

    async def get_pin(self, prompt: Prompt, confirm: Prompt | None = None) -> tuple[bytearray | None, bool]:
        """The passphrase typed (None: cancelled or timed out), and, when ``confirm`` is given, its answer.

        Both questions go to one pinentry, one after the other: the
        passphrase, then (only when one was typed) ``confirm`` ("remember
        it?") with its OK and Cancel buttons.
        """
        async with self._session() as talk:
            secret = bytearray()
            reply = await talk(setup_commands(prompt, self.tty, self._environ.get("TERM")) + [command("GETPIN")], secret)
            if reply.kind != "OK":
                secret[:] = bytes(len(secret))
                if not (reply.cancelled or reply.timed_out):
                    raise PromptUnavailable(f"{os.path.basename(self.program)} refused the prompt: {reply.text or reply.code}")
                return None, False
            if confirm is None:
                return secret, False
            answer = await talk(confirm_commands(confirm), None)
            return secret, answer.kind == "OK"

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[Callable[[Sequence[bytes], bytearray | None], Awaitable[Reply]]]:
        """A started pinentry and a ``talk(lines, secret)`` that sends lines and returns the last reply."""
        try:
            process = await asyncio.create_subprocess_exec(
                self.program,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
                env=self._environ,
                start_new_session=self.tty is None,
            )
        except OSError as exc:
            raise PromptUnavailable(f"cannot start {self.program}: {exc.strerror or exc}") from None
        stdin, stdout = process.stdin, process.stdout
        if stdin is None or stdout is None:  # PIPE gives both: a bug
            raise RuntimeError(f"{self.program} was started without its pipes")

        async def read_reply(secret: bytearray | None) -> Reply:
            while True:
                line = await stdout.readline()
                if not line:
                    raise PromptUnavailable(f"{os.path.basename(self.program)} ended without answering")
                try:
                    reply = parse(line.rstrip(b"\r\n"))
                except ValueError as exc:
                    raise PromptUnavailable(f"{os.path.basename(self.program)} said something unexpected: {exc}") from None
                if reply.kind == "D" and secret is not None:
                    decode_into(reply.data, secret)
                    del line, reply  # drop the escaped copy at once (Python cannot wipe it)
                    continue
                if reply.kind == "INQUIRE":
                    stdin.write(b"CAN\n")  # nothing of ours is for pinentry to ask
                    await stdin.drain()
                    continue
                if reply.kind in ("OK", "ERR"):
                    return reply

        async def talk(lines: Sequence[bytes], secret: bytearray | None) -> Reply:
            reply = Reply("OK")
            for line in lines:
                stdin.write(line)
                await stdin.drain()
                reply = await read_reply(secret)
                if reply.kind != "OK":
                    return reply
            return reply

        finished = False
        try:
            greeting = await read_reply(None)
            if greeting.kind != "OK":
                raise PromptUnavailable(f"{os.path.basename(self.program)} did not greet: {greeting.text}")
            yield talk
            with contextlib.suppress(ConnectionError):
                stdin.write(b"BYE\n")
                await stdin.drain()
            finished = True
        except (BrokenPipeError, ConnectionResetError):
            raise PromptUnavailable(f"{os.path.basename(self.program)} ended without answering") from None
        finally:
            with contextlib.suppress(ConnectionError, OSError):
                stdin.close()
            if finished:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(process.wait(), 5)
            if process.returncode is None:
                # Given up on (an error, the agent stopping): the dialog goes too.
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
