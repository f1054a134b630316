"""Loading: the TOML file read, decoded and parsed, then validated and checked for trust.

:func:`load_settings` is the one way in: it reads the system file (or the
``--config`` one), refuses in one line what cannot be read, is not UTF-8, is
not TOML or nests too deep, validates the contents
(:func:`~agent.config.validate.settings_from_mapping`) and, as root, refuses
what anyone but root could have written (:mod:`agent.config.trust`).
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
import sys
from typing import Any, Final

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

from agent.config.messages import fail
from agent.config.model import Settings
from agent.config.trust import Distrust, check_programs, refuse_untrusted, trusted_stat, walk_trusted
from agent.config.validate import named_programs, settings_from_mapping

SYSTEM_CONFIG: Final = "/etc/backup-agent/config.toml"


def _read_bytes(path: str, *, trusted: tuple[str, os.stat_result] | None) -> bytes:
    """The file's bytes; ``trusted``: the real path that was checked, and its lstat.

    Then that real path (no symbolic link in it) is opened, and what was
    opened must be the file that was checked.
    """
    flags = os.O_RDONLY | os.O_CLOEXEC
    if trusted is not None:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path if trusted is None else trusted[0], flags)
    except FileNotFoundError:
        fail(path, None, "the file does not exist; expected a TOML config file: check the path")
    except IsADirectoryError:
        fail(path, None, "this is a directory; expected a TOML config file")
    except PermissionError:
        fail(path, None, f"cannot read the file: permission denied for uid {os.geteuid()}; expected a file this user can read")
    except OSError as error:
        fail(path, None, f"cannot open the file ({error.strerror}); expected a readable TOML config file")
    try:
        info = os.fstat(fd)
        if trusted is not None and (info.st_dev, info.st_ino) != (trusted[1].st_dev, trusted[1].st_ino):
            refuse_untrusted(path, "the file changed while it was being checked")
        if stat.S_ISDIR(info.st_mode):
            fail(path, None, "this is a directory; expected a TOML config file")
        with os.fdopen(fd, "rb", closefd=False) as stream:
            return stream.read()
    except IsADirectoryError:
        fail(path, None, "this is a directory; expected a TOML config file")
    except OSError as error:
        fail(path, None, f"cannot read the file ({error.strerror}); expected a readable TOML config file")
    finally:
        os.close(fd)


def _decode(path: str, raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        fail(
            path,
            None,
            f"the file is not UTF-8 text (byte 0x{raw[error.start]:02x} on line {line}); "
            "expected a UTF-8 encoded TOML file",
        )
    return text.removeprefix("\ufeff")


def _parse(path: str, text: str) -> dict[str, Any]:
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except RecursionError:
        fail(path, None, f"arrays or tables are nested more than {MAX_NESTING} deep; expected a config of a few levels")
    except tomllib.TOMLDecodeError as error:
        message = str(error)
        match = re.fullmatch(r"(.*) \(at (line \d+, column \d+|end of document)\)", message, re.DOTALL)
        what, where = (match.group(1), match.group(2)) if match else (message, "unknown position")
        what = " ".join(what.split())
        fail(path, None, f"invalid TOML at {where}: {what}; fix the TOML syntax")
    if _nesting(data) > MAX_NESTING:
        fail(path, None, f"arrays or tables are nested more than {MAX_NESTING} deep; expected a config of a few levels")
    return data


# Deeper than any key needs; what is deeper is refused before anything walks it.
MAX_NESTING: Final = 16


def _nesting(data: object) -> int:
    """How deep arrays and tables nest in ``data`` (iterative: the depth is not yet known to be small)."""
    deepest = 0
    stack: list[tuple[object, int]] = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_NESTING:
            break
        if isinstance(value, dict):
            stack.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)
    return deepest


def load_settings(path: str | None = None, *, through_sudo: bool = False) -> Settings:
    """Read and validate the config; without ``path``, SYSTEM_CONFIG or built-in defaults.

    ``through_sudo``: the caller is not root, so only the system file is
    read, and only if root alone could have written it.

    Running as root (through sudo or not), root executes only what root
    owns: every program the file names must pass :func:`check_programs`, and
    ``[[hooks]]`` are accepted only from a file that passes
    :func:`check_trusted`.
    """
    system = SYSTEM_CONFIG
    explicit = path is not None
    file = system if path is None else path
    if through_sudo and explicit and file != system:
        fail(
            file,
            None,
            f"--config is not accepted through sudo; the cycle reads only {system}: "
            "expected no --config option (edit the system config instead)",
        )
    if not explicit:
        try:
            os.lstat(file)
        except FileNotFoundError:
            return Settings(path=None)
        except OSError:
            pass  # reported with its reason by the reading below
    as_root = os.geteuid() == 0
    trusted: tuple[str, os.stat_result] | None = None
    distrust: str | None = None  # why root does not control the file, as root
    if through_sudo:
        trusted = trusted_stat(file)
    elif as_root:
        try:
            trusted = walk_trusted(file if file.startswith("/") else posixpath.join(os.getcwd(), file))
        except Distrust as error:
            distrust = error.problem  # refused below if the file holds hooks; read as any file
    raw = _read_bytes(file, trusted=trusted)
    data = _parse(file, _decode(file, raw))
    settings = settings_from_mapping(data, file)
    if as_root:
        if settings.hooks and distrust is not None:
            fail(
                file,
                "hooks",
                f"got [[hooks]] in a file that root does not control ({distrust}); hooks are run as root, so they are "
                "read only from a file that root owns and only root can write: expected this file and every "
                f"directory above it to be owned by root and writable by root only (such as {system})",
            )
        if settings.command_sources and distrust is not None:
            fail(
                file,
                "command_source",
                f"got [[command_source]] in a file that root does not control ({distrust}); its commands are run as "
                "root, so they are read only from a file that root owns and only root can write (such as "
                f"{system})",
            )
        check_programs(file, named_programs(data, settings))
    return settings
