"""The passphrase prompt (agent/desktop/pinentry.py): the Assuan protocol alone, then a real pinentry.

The real part is pinentry-tty (and pinentry-curses) in a pseudo-terminal
this test opens: a typist thread (tests/helpers/typist.py) reads what the
prompt shows there and types the answers. Nothing of pinentry is replaced.
"""

from __future__ import annotations

import asyncio
import shutil
from typing import Callable, Iterator

import pytest

from agent.desktop.pinentry import (
    Pinentry,
    Prompt,
    PromptUnavailable,
    Reply,
    choose,
    command,
    confirm_commands,
    decode_into,
    escape,
    parse,
    setup_commands,
)
from tests.helpers.typist import Typist

PROMPT = Prompt(title="Backup disk backup1", description="The backup disk backup1 is locked.\nType it.")
REMEMBER = Prompt(title="Backup disk backup1", description="Remember it?", ok="Remember", cancel="Not now")

# -- the protocol (pure) ---------------------------------------------------------------------


def test_arguments_are_escaped_so_one_command_stays_one_line() -> None:
    assert escape("100% sure\r\nnext") == "100%25 sure%0D%0Anext"
    assert command("SETDESC", "a\nb %") == b"SETDESC a%0Ab %25\n"
    assert command("GETPIN") == b"GETPIN\n"
    with pytest.raises(ValueError, match="over Assuan"):
        command("SETDESC", "x" * 1000)


def test_reply_lines_are_parsed() -> None:
    assert parse(b"OK Pleased to meet you") == Reply("OK", text="Pleased to meet you")
    cancelled = parse(b"ERR 83886179 Operation cancelled <Pinentry>")
    assert cancelled.kind == "ERR" and cancelled.code == 83886179 and cancelled.cancelled and not cancelled.timed_out
    assert parse(b"ERR 83886142 Timeout <Pinentry>").timed_out
    assert not parse(b"ERR 83886179 x").timed_out and not parse(b"ERR 5 other").cancelled
    assert parse(b"D s%25cret") == Reply("D", data=b"s%25cret")
    assert parse(b"S PASSWORD_FROM_CACHE").kind == "S"
    assert parse(b"# a comment").kind == "#"
    assert parse(b"INQUIRE QUALITY x").kind == "INQUIRE"
    for bad in (b"HELLO", b"ERR notanumber", b""):
        with pytest.raises(ValueError):
            parse(bad)


def test_d_lines_are_decoded_into_the_callers_buffer() -> None:
    out = bytearray(b"ab")
    decode_into(b"c%25d%0A%0d\xc3\xa9", out)
    assert out == bytearray(b"abc%d\n\r\xc3\xa9")
    for broken in (b"%", b"%4", b"%zz"):
        with pytest.raises(ValueError, match="broken % escape"):
            decode_into(broken, bytearray())


def test_the_dialog_is_set_up_before_it_asks() -> None:
    lines = setup_commands(Prompt("T", "D", error="Wrong passphrase", ok="Unlock"), "/dev/pts/7", "xterm")
    assert lines == [
        b"OPTION ttyname=/dev/pts/7\n", b"OPTION ttytype=xterm\n", b"SETTIMEOUT 300\n", b"SETTITLE T\n",
        b"SETDESC D\n", b"SETPROMPT Passphrase:\n", b"SETERROR Wrong passphrase\n", b"SETOK Unlock\n",
    ]
    assert setup_commands(PROMPT, None, None)[0] == b"SETTIMEOUT 300\n"  # no terminal: no tty options
    assert confirm_commands(REMEMBER) == [b"SETDESC Remember it?\n", b"SETOK Remember\n", b"SETCANCEL Not now\n", b"CONFIRM\n"]


def _which(*present: str) -> Callable[[str], str | None]:
    return lambda name: f"/usr/bin/{name}" if name in present else None


@pytest.mark.parametrize(
    ("environ", "present", "tty", "chosen"),
    [
        ({"DISPLAY": ":0", "XDG_CURRENT_DESKTOP": "KDE"}, ("pinentry-qt", "pinentry-gnome3"), None, "pinentry-qt"),
        ({"WAYLAND_DISPLAY": "wayland-0", "XDG_CURRENT_DESKTOP": "ubuntu:GNOME"}, ("pinentry-qt", "pinentry-gnome3"), None, "pinentry-gnome3"),
        ({"DISPLAY": ":0", "XDG_CURRENT_DESKTOP": "XFCE"}, ("pinentry-gtk-2", "pinentry-gnome3"), None, "pinentry-gnome3"),
        ({"DISPLAY": ":0", "XDG_CURRENT_DESKTOP": "sway"}, ("pinentry-gtk-2", "pinentry-gnome3"), None, "pinentry-gtk-2"),
        ({"DISPLAY": ":0"}, ("pinentry-qt",), None, "pinentry-qt"),
        ({"DISPLAY": ":0"}, ("pinentry-curses", "pinentry-tty"), None, None),  # never a terminal one without a terminal
        ({}, ("pinentry-gnome3", "pinentry-curses", "pinentry-tty"), "/dev/pts/3", "pinentry-curses"),
        ({}, ("pinentry-tty",), "/dev/pts/3", "pinentry-tty"),
        ({}, ("pinentry-gnome3",), None, None),  # no display, no terminal
    ],
)
def test_the_prompt_is_chosen_by_the_session_and_what_is_installed(
    environ: dict[str, str], present: tuple[str, ...], tty: str | None, chosen: str | None
) -> None:
    found = choose(environ, _which(*present), tty=tty)
    assert found == (f"/usr/bin/{chosen}" if chosen else None)


# -- a real pinentry ------------------------------------------------------------------------


@pytest.fixture(params=["pinentry-tty", "pinentry-curses"])
def program(request: pytest.FixtureRequest) -> str:
    path = shutil.which(request.param)
    if path is None:
        pytest.skip(reason=f"{request.param} is not installed (apt-get install -y {request.param})")
    return path


@pytest.fixture
def typist_for() -> Iterator["list[Typist]"]:
    made: list[Typist] = []
    yield made
    for typist in made:
        typist.close()


def _ask(program: str, typist: Typist, confirm: Prompt | None = None, prompt: Prompt = PROMPT) -> tuple[bytearray | None, bool]:
    return asyncio.run(asyncio.wait_for(Pinentry(program, tty=typist.tty).get_pin(prompt, confirm), 20))


@pytest.mark.integration
def test_a_typed_passphrase_comes_back_byte_for_byte(program: str, typist_for: list[Typist]) -> None:
    # "%" and a non-ASCII letter: pinentry escapes the one and passes the other's UTF-8 bytes.
    typist = Typist([(b"Passphrase", "p%ss wörd\r".encode())])
    typist_for.append(typist)
    secret, remember = _ask(program, typist)
    assert secret == bytearray("p%ss wörd".encode()) and remember is False
    assert b"backup1 is locked" in typist.shown


@pytest.mark.integration
def test_the_remember_question_follows_in_the_same_dialog(typist_for: list[Typist]) -> None:
    program = shutil.which("pinentry-tty")
    if program is None:
        pytest.skip(reason="pinentry-tty is not installed (apt-get install -y pinentry-tty)")
    for answer, expected in ((b"r", True), (b"n", False)):
        typist = Typist([(b"Passphrase:", b"pw\n"), (b"[rn]?", answer)])
        typist_for.append(typist)
        assert _ask(program, typist, REMEMBER) == (bytearray(b"pw"), expected)
        assert b"Remember it?" in typist.shown


@pytest.mark.integration
def test_a_wrong_try_is_said_and_a_cancel_gives_nothing(typist_for: list[Typist]) -> None:
    program = shutil.which("pinentry-tty")
    if program is None:
        pytest.skip(reason="pinentry-tty is not installed (apt-get install -y pinentry-tty)")
    typist = Typist([(b"Passphrase:", b"\x04")])  # Ctrl-D: pinentry-tty's cancel
    typist_for.append(typist)
    wrong = Prompt(title="T", description="D", error="Wrong passphrase (try 2 of 3)")
    assert _ask(program, typist, REMEMBER, wrong) == (None, False)
    assert b"Wrong passphrase (try 2 of 3)" in typist.shown
    assert b"Remember" not in typist.shown  # nothing typed: nothing to remember


def test_a_missing_or_broken_pinentry_is_told_in_one_line() -> None:
    with pytest.raises(PromptUnavailable, match="cannot start"):
        asyncio.run(Pinentry("/nonexistent/pinentry").get_pin(PROMPT))
    with pytest.raises(PromptUnavailable, match="ended without answering|did not greet|said something"):
        asyncio.run(Pinentry("/bin/true").get_pin(PROMPT))
