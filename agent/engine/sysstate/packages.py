"""The installed packages and the package database, stored with every snapshot.

For each manager of :mod:`agent.engine.sysstate.managers` whose program is
present, ``.backup-agent/packages/<manager>/`` holds its output files, the
archive of its database (``database.tar.gz``) and ``stamp.json``: the size,
times and inode of its database files when the capture began, and the files
written. When the stamp is the previous snapshot's, nothing changed: the
previous snapshot's files are hard-linked and no command runs (the cheap
check that keeps an hourly backup's cost near nothing). A stamp taken before
the capture also notices a change made while it ran, at the next backup.

Reading them back (``backup-agent packages``) is here too: what a snapshot
holds, what changed between two, and the commands that reinstall the manual
set.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import tarfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from agent.config.trust import untrusted_program
from agent.core.commands import Runner
from agent.core.errors import CommandError
from agent.engine.sysstate import files
from agent.engine.sysstate.managers import Manager, all_managers

log = logging.getLogger(__name__)

STEP = "system-state"
STAMP = "stamp.json"
ARCHIVE = "database.tar.gz"
STAMP_LIMIT = 64 * 1024
TEXT_LIMIT = 64 * 1024 * 1024  # a package list is a few hundred KiB; the bound is for a hostile disk
FILE_MODE = 0o644  # the package lists are readable by all, as the live database is
ARCHIVE_LEVEL = 1  # the archive is written only when packages changed; speed over size


def present(manager: Manager, *, as_root: bool) -> str | None:
    """Why ``manager`` is not captured here, or None when it is (its program is there, and root's when run as root)."""
    if not os.path.isfile(manager.program):
        return "not installed"
    if as_root:
        problem = untrusted_program(manager.program)
        if problem is not None:
            return problem
    return None


def stamp(paths: Sequence[str]) -> dict[str, list[int] | None]:
    """Size, modification and change times and inode of each database path; None for one that is missing."""
    found: dict[str, list[int] | None] = {}
    for path in paths:
        try:
            info = os.stat(path)
        except FileNotFoundError:
            found[path] = None
            continue
        found[path] = [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino]
    return found


def _previous_stamp(previous_fd: int | None) -> dict[str, Any] | None:
    if previous_fd is None:
        return None
    raw = files.read_small(previous_fd, STAMP, STAMP_LIMIT)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _link_previous(previous_fd: int, names: Sequence[str], target_fd: int) -> bool:
    """Link every file the previous capture wrote; False (nothing left linked) when one is not a regular file there."""
    linked: list[str] = []
    for name in names:
        if not files.link_from(previous_fd, name, target_fd):
            for done in linked:
                os.unlink(done, dir_fd=target_fd)
            return False
        linked.append(name)
    return True


def _skipped(relative: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(relative, p) or fnmatch.fnmatchcase(os.path.basename(relative), p) for p in patterns)


def write_archive(root: str, skip: Sequence[str], out: int) -> int:
    """``root`` as a gzip-compressed tar streamed to ``out``, without the entries ``skip`` matches; the entries stored.

    Entries are named ``<basename of root>/...``; links are stored as links.
    A file that goes away meanwhile (the database changed) is left out: the
    next backup sees the change in the stamp and captures again.
    """
    base = os.path.basename(root.rstrip("/"))
    count = 0
    with os.fdopen(os.dup(out), "wb") as handle, tarfile.open(fileobj=handle, mode="w:gz", compresslevel=ARCHIVE_LEVEL) as tar:
        for directory, subdirs, names in os.walk(root):
            relative_dir = os.path.normpath(os.path.relpath(directory, root))
            inside = "" if relative_dir == "." else relative_dir
            subdirs[:] = sorted(d for d in subdirs if not _skipped(os.path.join(inside, d), skip))
            linked_dirs = [d for d in subdirs if os.path.islink(os.path.join(directory, d))]
            subdirs[:] = [d for d in subdirs if d not in linked_dirs]
            entries = [""] + sorted(n for n in [*names, *linked_dirs] if not _skipped(os.path.join(inside, n), skip))
            for name in entries:
                relative = os.path.join(inside, name) if name else inside
                try:
                    tar.add(os.path.join(root, relative), arcname=os.path.join(base, relative).rstrip("/"), recursive=False)
                except FileNotFoundError:
                    log.info("%s went away while it was archived (the package database changed)", os.path.join(root, relative))
                    continue
                count += 1
    return count


def _run_output(runner: Runner, argv: tuple[str, ...], target_fd: int, name: str) -> int:
    """One command's stdout streamed into ``name``; its size."""
    temporary = f".{name}.part"
    out = files.create(target_fd, temporary, FILE_MODE)
    size = 0

    def chunk(data: bytes) -> None:
        nonlocal size
        size += len(data)
        files.write_all(out, data)

    try:
        runner.run(argv, step=STEP, on_stdout_data=chunk, timeout=600)
    except BaseException:
        os.unlink(temporary, dir_fd=target_fd)
        raise
    finally:
        os.close(out)
    os.rename(temporary, name, src_dir_fd=target_fd, dst_dir_fd=target_fd)
    return size


def capture_manager(
    manager: Manager,
    runner: Runner,
    target_fd: int,
    previous_fd: int | None,
    warn: Callable[[str], None],
) -> dict[str, Any]:
    """One manager's files into ``target_fd`` (this snapshot's packages/<name>/); what the metadata records."""
    started = time.monotonic()
    now = stamp(manager.database)
    before = _previous_stamp(previous_fd)
    # Only a capture that got every list is reused: one that missed a list (a warning then) is tried again.
    if previous_fd is not None and before is not None and before.get("database") == now and before.get("complete") is True:
        names = before.get("files")
        if isinstance(names, list) and all(isinstance(n, str) and files.SAFE_NAME.fullmatch(n) for n in names):
            if _link_previous(previous_fd, [*names, STAMP], target_fd):
                return {"unchanged": True, "files": names, "seconds": round(time.monotonic() - started, 3)}
    written: list[str] = []
    complete = True
    as_root = os.geteuid() == 0
    for output in manager.outputs:
        if output.optional and not os.path.isfile(output.argv[0]):
            continue
        problem = untrusted_program(output.argv[0]) if as_root else None
        if problem is not None:
            warn(f"the {manager.name} package list {output.file} was not captured: {problem}")
            complete = False
            continue
        try:
            _run_output(runner, output.argv, target_fd, output.file)
        except CommandError as failure:
            warn(f"the {manager.name} package list {output.file} was not captured: {failure.message}")
            complete = False
            continue
        written.append(output.file)
    if manager.archive is not None and os.path.isdir(manager.archive):
        temporary = f".{ARCHIVE}.part"
        out = files.create(target_fd, temporary, FILE_MODE)
        try:
            write_archive(manager.archive, manager.archive_skip, out)
        except BaseException:
            os.unlink(temporary, dir_fd=target_fd)
            raise
        finally:
            os.close(out)
        os.rename(temporary, ARCHIVE, src_dir_fd=target_fd, dst_dir_fd=target_fd)
        written.append(ARCHIVE)
    record = {"manager": manager.name, "database": now, "files": written, "complete": complete}
    out = files.create(target_fd, STAMP, FILE_MODE)
    try:
        files.write_all(out, json.dumps(record, indent=1, sort_keys=True).encode() + b"\n")
    finally:
        os.close(out)
    return {"unchanged": False, "files": written, "complete": complete, "seconds": round(time.monotonic() - started, 3)}


# -- reading them back ------------------------------------------------------------


@dataclass(frozen=True)
class Inventory:
    """One manager's packages in one snapshot."""

    manager: str
    installed: dict[str, str]
    manual: tuple[str, ...]
    reinstall: tuple[str, ...]


@dataclass(frozen=True)
class Difference:
    """What changed for one manager between two snapshots (pure result of :func:`compare`)."""

    manager: str
    added: dict[str, str] = field(default_factory=dict)
    removed: dict[str, str] = field(default_factory=dict)
    changed: dict[str, tuple[str, str]] = field(default_factory=dict)
    manual_added: tuple[str, ...] = ()
    manual_removed: tuple[str, ...] = ()


def read_inventories(snapshot: str) -> list[Inventory]:
    """The package sets a snapshot holds, one per manager captured; empty when it holds none."""
    known = {m.name: m for m in all_managers()}
    found: list[Inventory] = []
    with files.directory(snapshot, files.STATE_DIR, files.PACKAGES) as top:
        if top is None:
            return found
        for name in sorted(os.listdir(top)):
            manager = known.get(name)
            if manager is None:
                continue
            with files.directory(snapshot, files.STATE_DIR, files.PACKAGES, name) as inner:
                if inner is None:
                    continue
                texts: dict[str, str] = {}
                for output in manager.outputs:
                    raw = files.read_small(inner, output.file, TEXT_LIMIT)
                    if raw is not None:
                        texts[output.file] = raw.decode("utf-8", "replace")
            if texts:
                found.append(
                    Inventory(name, manager.installed(texts), manager.manual(texts), manager.reinstall(texts))
                )
    return found


def compare(before: Sequence[Inventory], after: Sequence[Inventory]) -> list[Difference]:
    """Per manager in either: what was added, removed and changed version, and the manual set's changes (pure)."""
    old = {i.manager: i for i in before}
    new = {i.manager: i for i in after}
    out = []
    for name in sorted(set(old) | set(new)):
        a = old.get(name, Inventory(name, {}, (), ()))
        b = new.get(name, Inventory(name, {}, (), ()))
        out.append(
            Difference(
                manager=name,
                added={p: v for p, v in sorted(b.installed.items()) if p not in a.installed},
                removed={p: v for p, v in sorted(a.installed.items()) if p not in b.installed},
                changed={
                    p: (a.installed[p], v) for p, v in sorted(b.installed.items()) if p in a.installed and a.installed[p] != v
                },
                manual_added=tuple(sorted(set(b.manual) - set(a.manual))),
                manual_removed=tuple(sorted(set(a.manual) - set(b.manual))),
            )
        )
    return out


def as_json(item: Inventory | Difference) -> Mapping[str, Any]:
    """A dict for --json output."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in item.__dict__.items()}



def render_inventories(snapshot: str, inventories: Sequence[Inventory]) -> list[str]:
    """What ``backup-agent packages`` prints for one snapshot: per manager, the counts, the manual set,
    and the commands that reinstall it on a fresh system (pure)."""
    lines = []
    for inventory in inventories:
        lines.append(
            f"{inventory.manager}: {len(inventory.installed)} packages installed in {snapshot}, "
            f"{len(inventory.manual)} of them on purpose:"
        )
        lines += [f"  {name} {inventory.installed.get(name, '')}".rstrip() for name in inventory.manual]
        if inventory.reinstall:
            lines.append("  to install them again on a fresh system (as root, with its package sources set up as they were):")
            lines += [f"    {command}" for command in inventory.reinstall]
    return lines


def render_differences(a: str, b: str, differences: Sequence[Difference]) -> list[str]:
    """What ``backup-agent packages --diff A B`` prints: + added, - removed, ~ changed version (pure)."""
    lines = [f"{a} -> {b}"]
    for difference in differences:
        counts = (len(difference.added), len(difference.removed), len(difference.changed))
        lines.append(f"{difference.manager}: {counts[0]} added, {counts[1]} removed, {counts[2]} changed version")
        lines += [f"+ {name} {version}" for name, version in difference.added.items()]
        lines += [f"- {name} {version}" for name, version in difference.removed.items()]
        lines += [f"~ {name} {old} -> {new}" for name, (old, new) in difference.changed.items()]
        if difference.manual_added or difference.manual_removed:
            lines.append(
                "  installed on purpose: "
                + ", ".join([*(f"+{n}" for n in difference.manual_added), *(f"-{n}" for n in difference.manual_removed)])
            )
    return lines
