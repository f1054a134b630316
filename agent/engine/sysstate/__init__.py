"""System state: what every snapshot stores besides its source, under ``.backup-agent/``.

Two kinds (docs/ARCHITECTURE.md, "System state"): the output of the
``[[command_source]]`` commands (:mod:`.dumps`, a database dump) in
``.backup-agent/commands/``, and the installed packages with the package
managers' databases (:mod:`.packages`, one plugin per manager in
:mod:`.managers`) in ``.backup-agent/packages/<manager>/``.

The cycle calls :func:`capture` after rsync finished writing the snapshot
being made (``<name>.in-progress``) and before its metadata says
``transferred``: so they are covered by the same ``syncfs`` → rename order
as the files, recorded in the manifest and checked by ``verify``, and a
snapshot whose capture failed is never completed. The transfer excludes
``/.backup-agent`` of the source (:data:`EXCLUDE_RULE`), so the directory
is always this capture's and nothing of the live system lands there.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Callable

from agent.config.model import Settings, packages_wanted
from agent.core.commands import Runner
from agent.engine.sysstate import dumps, files, packages
from agent.engine.sysstate.managers import all_managers

log = logging.getLogger(__name__)

STATE_DIR = files.STATE_DIR
#: The rsync rule that keeps a live ``/.backup-agent`` of the source out of the snapshot.
EXCLUDE_RULE = f"--exclude=/{STATE_DIR}"
_TOP_MODE = 0o755
_COMMANDS_MODE = 0o700  # dumps hold the databases' content: root's alone


def wanted(settings: Settings, source: str) -> bool:
    """Whether a backup of ``source`` stores anything under .backup-agent/."""
    return bool(settings.command_sources) or packages_wanted(settings, source)


def capture(
    settings: Settings,
    source: str,
    runner: Runner,
    target: str,
    previous: str | None,
    warn: Callable[[str], None],
) -> dict[str, Any]:
    """Write the command sources' output and the package state into ``target``; what the metadata records.

    ``target`` is the snapshot being made, ``previous`` the complete snapshot
    it links to (whose copies are reused when nothing changed). Raises
    HookError when a critical command source fails.
    """
    record: dict[str, Any] = {}
    want_packages = packages_wanted(settings, source)
    if not settings.command_sources and not want_packages:
        return record
    with files.directory(target, STATE_DIR, create=_TOP_MODE):
        pass  # made readable by all first: the package lists are; commands/ below is root's alone
    if settings.command_sources:
        record["commands"] = {}
        with (
            files.directory(target, STATE_DIR, files.COMMANDS, create=_COMMANDS_MODE) as out,
            files.directory(previous, STATE_DIR, files.COMMANDS) if previous else contextlib.nullcontext() as before,
        ):
            for command_source in settings.command_sources:
                record["commands"][command_source.name] = dumps.capture(command_source, runner, _opened(out), before, warn)
    if want_packages:
        record["packages"] = {}
        as_root = os.geteuid() == 0
        for manager in all_managers():
            why_not = packages.present(manager, as_root=as_root)
            if why_not is not None:
                if why_not != "not installed":
                    warn(f"the {manager.name} packages are not captured: {why_not}")
                continue
            with (
                files.directory(target, STATE_DIR, files.PACKAGES, manager.name, create=_TOP_MODE) as out,
                files.directory(previous, STATE_DIR, files.PACKAGES, manager.name) if previous else contextlib.nullcontext() as before,
            ):
                record["packages"][manager.name] = packages.capture_manager(manager, runner, _opened(out), before, warn)
    return record


def _opened(fd: int | None) -> int:
    """A directory made with ``create`` is always opened; None here is a bug, said as one."""
    if fd is None:
        raise RuntimeError("a directory of the snapshot being made could not be opened")
    return fd
