"""How a config problem is told: values shown as TOML writes them, in one line.

Every refusal is a :class:`~agent.core.errors.ConfigError` of one line that names
the file, the ``table.key``, the value found and what was expected, so the
user can fix the file from the message alone; the validators, the trust
checks and the reading of the file all word it with these helpers.
"""

from __future__ import annotations

import datetime as dt
import difflib
from typing import Final, Mapping, NoReturn, Sequence

from agent.core.errors import ConfigError

_SHOW_LIMIT: Final = 80


def quote(text: str) -> str:
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


def literal(value: object) -> str:
    """A value written the way it looks in TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(literal(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{key} = {literal(item)}" for key, item in value.items()) + " }"
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    return repr(value)


def show(value: object) -> str:
    """A value for a message: TOML-like, one line, not too long."""
    text = literal(value)
    if len(text) > _SHOW_LIMIT:
        text = text[: _SHOW_LIMIT - 1] + "…"
    return text


def type_name(value: object) -> str:
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


def got_type(value: object) -> str:
    return f"got {type_name(value)} ({show(value)})"


def suggest(name: str, accepted: Sequence[str]) -> str | None:
    matches = difflib.get_close_matches(name, accepted, n=1, cutoff=0.6)
    return matches[0] if matches else None


def fail(file: str, key: str | None, problem: str) -> NoReturn:
    raise ConfigError(file, key, problem)
