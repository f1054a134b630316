"""Package managers, one module each: the plugin protocol of the system state.

A module here is a package manager when it defines ``MANAGER``, a
:class:`Manager` (docs/ARCHITECTURE.md, "System state"). Adding a manager is
adding one file: :func:`all_managers` finds every module of this package.
A manager says:

- ``name``: the directory under ``.backup-agent/packages/`` and the name
  ``backup-agent packages`` shows;
- ``program``: the absolute path whose presence says the manager is in use
  (it must be root's when the cycle runs as root);
- ``database``: the files or directories whose size, times and inode change
  whenever packages change: when none did since the previous snapshot, the
  capture is skipped and the previous snapshot's files are hard-linked;
- ``outputs``: the small text files, each one command's stdout (argv; an
  optional one is left out when its program is missing);
- ``archive`` and ``archive_skip``: the manager's own database directory,
  stored as ``database.tar.gz`` without what is large and derivable;
- ``installed(texts)``, ``manual(texts)``, ``reinstall(texts)``: pure
  functions over the outputs' texts (file name to text): the installed
  packages (name to version), the ones installed on purpose, and the shell
  commands that install those on a fresh system.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable, Mapping

Texts = Mapping[str, str]


@dataclass(frozen=True)
class Output:
    """One text file of a manager's capture: a command's stdout."""

    file: str
    argv: tuple[str, ...]
    optional: bool = False  # its program may be missing (apt-mark without apt): then it is left out


@dataclass(frozen=True)
class Manager:
    """What the system state knows of one package manager (this module's docstring)."""

    name: str
    program: str
    database: tuple[str, ...]
    outputs: tuple[Output, ...]
    installed: Callable[[Texts], dict[str, str]]
    manual: Callable[[Texts], tuple[str, ...]]
    reinstall: Callable[[Texts], tuple[str, ...]]
    archive: str | None = None
    archive_skip: tuple[str, ...] = ()


def all_managers() -> tuple[Manager, ...]:
    """Every manager this package holds, by name."""
    found: list[Manager] = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        manager = getattr(module, "MANAGER", None)
        if isinstance(manager, Manager):
            found.append(manager)
    return tuple(sorted(found, key=lambda m: m.name))


def table(text: str, columns: int, *, separator: str | None = None) -> list[list[str]]:
    """The lines of ``text`` split into at least ``columns`` fields; other lines are left out (pure)."""
    rows = []
    for line in text.splitlines():
        fields = line.split(separator) if separator is not None else line.split()
        if len(fields) >= columns and fields[0]:
            rows.append(fields)
    return rows


def wrapped(command: str, names: list[str] | tuple[str, ...], width: int = 78) -> tuple[str, ...]:
    """``command NAME...`` as shell lines continued with backslashes, or nothing without names (pure)."""
    if not names:
        return ()
    lines: list[str] = []
    line = command
    for name in names:
        if len(line) + 1 + len(name) > width - 2:
            lines.append(line + " \\")
            line = "    " + name
        else:
            line += " " + name
    lines.append(line)
    return tuple(lines)
