"""Trust: whether only root can have written a file or a program, for what root reads and runs.

As root, the config decides what is executed and deleted, so the file, the
programs it names and every directory above them must be root's and
writable by root only; a symbolic link is followed only when root owns it.
Each check examines the path with lstat, component by component, and says
in one line why a path is refused.
"""

from __future__ import annotations

import os
import posixpath
import stat
from typing import Final, Iterable, Literal, NoReturn, overload

from agent.config.messages import fail, show


def running_through_sudo() -> bool:
    """True when root was reached through sudo: then the caller is someone else."""
    return os.geteuid() == 0 and "SUDO_UID" in os.environ


_MAX_SYMLINKS: Final = 40
_UNSAFE_EXPECTED: Final = (
    "expected the file and every directory above it to be owned by root and writable by root only, "
    "and any symbolic link on the way to be root's"
)
_PROGRAM_EXPECTED: Final = (
    "expected a program owned by root and writable only by root, in directories owned by root and writable only "
    "by root (symbolic links on the way included), because backup-agent runs it as root"
)


class Distrust(Exception):
    """Why a path is not under root's sole control.

    ``missing`` names a component that does not exist; ``unreadable`` says
    the path could not be examined at all (no sign of distrust, but nothing
    to trust either).
    """

    def __init__(self, problem: str, *, missing: str | None = None, unreadable: bool = False) -> None:
        super().__init__(problem)
        self.problem = problem
        self.missing = missing
        self.unreadable = unreadable


def _owner_mode_problem(name: str, info: os.stat_result) -> str | None:
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{name} is writable by group or others (mode {stat.S_IMODE(info.st_mode):04o})"
    if info.st_uid != 0:
        return f"{name} is owned by uid {info.st_uid}, not root"
    return None


@overload
def _lstat_component(name: str, *, missing_ok: Literal[False]) -> os.stat_result: ...
@overload
def _lstat_component(name: str, *, missing_ok: bool) -> os.stat_result | None: ...
def _lstat_component(name: str, *, missing_ok: bool) -> os.stat_result | None:
    """lstat; None only when ``missing_ok`` and the name does not exist."""
    try:
        return os.lstat(name)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise Distrust(f"{name} does not exist", missing=name) from None
    except OSError as error:
        raise Distrust(f"cannot examine {name} ({error.strerror})", unreadable=True) from None


def _check_component(name: str, info: os.stat_result, *, last: bool) -> None:
    """A resolved (not symlink) component: a directory on the way, a regular file at the end, root's alone."""
    if last and not stat.S_ISREG(info.st_mode):
        raise Distrust(f"{name} is not a regular file")
    if not last and not stat.S_ISDIR(info.st_mode):
        raise Distrust(f"{name} is not a directory")
    problem = _owner_mode_problem(name, info)
    if problem is not None:
        raise Distrust(problem)


def _root_symlink(name: str, info: os.stat_result) -> None:
    if info.st_uid != 0:
        raise Distrust(f"{name} is a symbolic link owned by uid {info.st_uid}, not root")


@overload
def walk_trusted(path: str, *, missing_ok: Literal[False] = False) -> tuple[str, os.stat_result]: ...
@overload
def walk_trusted(path: str, *, missing_ok: bool) -> tuple[str, os.stat_result] | None: ...
def walk_trusted(path: str, *, missing_ok: bool = False) -> tuple[str, os.stat_result] | None:
    """The regular file ``path`` leads to, and its lstat, if only root can have put it there.

    The file itself is examined first (its own problem is the likeliest),
    then every component from "/" down with lstat. A symbolic link is
    followed only when root owns it: the directory holding it has already
    been found root's and closed to others, so no one else can have made or
    changed it. Any other symbolic link, a component owned by someone else
    or writable by group or others, is refused with a :class:`Distrust`.

    ``missing_ok``: a path that does not exist is accepted (returns None)
    when the directories down to where it would be are root's alone, as no
    one else can create it there.
    """
    info = _lstat_component(path, missing_ok=missing_ok)
    if info is not None:
        if stat.S_ISLNK(info.st_mode):
            _root_symlink(path, info)
        else:
            _check_component(path, info, last=True)
    root = _lstat_component("/", missing_ok=False)
    _check_component("/", root, last=False)
    current = "/"
    pending = [part for part in path.split("/") if part]
    links = 0
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            current = posixpath.dirname(current)  # already examined, as was everything above it
            continue
        name = posixpath.join(current, part)
        found = _lstat_component(name, missing_ok=missing_ok)
        if found is None:
            return None
        if stat.S_ISLNK(found.st_mode):
            _root_symlink(name, found)
            links += 1
            if links > _MAX_SYMLINKS:
                raise Distrust(f"{path} leads through more than {_MAX_SYMLINKS} symbolic links")
            try:
                target = os.readlink(name)
            except OSError as error:
                raise Distrust(f"cannot read the symbolic link {name} ({error.strerror})") from None
            if target.startswith("/"):
                current = "/"
            pending[:0] = target.split("/")
            continue
        _check_component(name, found, last=not pending)
        current = name
    final = _lstat_component(current, missing_ok=False)
    _check_component(current, final, last=True)  # a path that ends in ".." is a directory
    return current, final


def refuse_untrusted(path: str, problem: str) -> NoReturn:
    fail(path, None, f"refusing an unsafe config: {problem}; {_UNSAFE_EXPECTED}")


def trusted_stat(path: str) -> tuple[str, os.stat_result]:
    """check_trusted that returns the file's real path and lstat, for the caller to compare after opening."""
    if not path.startswith("/") or path != "/" + "/".join(p for p in path.split("/") if p not in ("", ".", "..")):
        fail(path, None, "refusing an unsafe config path; expected an absolute path without //, . or .. components")
    try:
        found = walk_trusted(path)
    except Distrust as distrust:
        if distrust.missing is not None:
            fail(path, None, f"{distrust.missing} does not exist; expected the config file at this path")
        if distrust.unreadable:
            fail(path, None, f"{distrust.problem}; expected a readable path")
        refuse_untrusted(path, distrust.problem)
    return found


def check_trusted(path: str) -> None:
    """Refuse a config that anyone but root could have written.

    As root, the file decides what is executed and deleted, so it and every
    directory above it must be root's and writable by root only. Each
    component is examined with lstat. A symbolic link is followed only when
    root owns it (its directory, already examined, is root's alone), as on
    merged-/usr systems where /bin is a link to usr/bin; a symbolic link
    owned by anyone else is refused, as its target could be swapped.
    """
    trusted_stat(path)


def untrusted_program(path: str) -> str | None:
    """Why root must not run the program at ``path``, or None when only root can have written it.

    The same rules as :func:`check_trusted`. A program that does not exist
    is accepted when only root could create it there: running it then fails
    with its own message.
    """
    try:
        walk_trusted(path, missing_ok=True)
    except Distrust as distrust:
        return distrust.problem
    return None


def check_programs(file: str, programs: Iterable[tuple[str, str]]) -> None:
    """Refuse, naming its key, a program that anyone but root could have written (for a cycle run as root)."""
    for key, program in programs:
        problem = untrusted_program(program)
        if problem is not None:
            fail(file, key, f"got {show(program)}, but {problem}; {_PROGRAM_EXPECTED}")


_MAX_SECRET: Final = 4096


def read_secret(path: str) -> str:
    """The first line of a password file that only its owner can read: root's alone when run as root.

    As root the file and every directory above it must pass the rules of
    :func:`walk_trusted` (no one else can have put or changed it); for any
    user, nobody but the owner may read it (mode 0600 or 0400), as it holds
    a secret. Raises :class:`Distrust` saying why not, without the secret.
    """
    if os.geteuid() == 0:
        real, info = walk_trusted(path)
    else:
        real, info = path, _lstat_component(path, missing_ok=False)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            raise Distrust(f"{path} is not a regular file of uid {os.geteuid()}")
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise Distrust(f"{path} may be read by group or others (mode {stat.S_IMODE(info.st_mode):04o}); chmod 600 it")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        raise Distrust(f"cannot open {path} ({error.strerror})", unreadable=True) from None
    try:
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino):
            raise Distrust(f"{path} changed while it was being checked")
        raw = os.read(fd, _MAX_SECRET + 1)
    finally:
        os.close(fd)
    if len(raw) > _MAX_SECRET:
        raise Distrust(f"{path} is longer than {_MAX_SECRET} bytes; expected one line holding the password")
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise Distrust(f"{path} is not UTF-8 text; expected one line holding the password") from None
    if not lines or not lines[0]:
        raise Distrust(f"{path} is empty; expected one line holding the password")
    return lines[0]
