"""Restoring files and trees out of snapshots, never losing what is there now.

Three destinations:

- default: a new directory ``restored-<snapshot>`` beside the original (in
  the nearest directory above it that exists now), holding the restored
  path below it; a name that is taken gets ``-2``, ``-3``...; nothing is
  ever written over. It is made root's (the runner's) and private (0700)
  and written only through an open descriptor, and gets the owner and mode
  of the directory it is in only when rsync has finished: through sudo that
  directory is the caller's, who could otherwise swap the name for a link
  while root writes;
- ``--to DIR``: ``DIR/<name>``; refused when that exists;
- ``--in-place``: back where it was. Whatever is there now is first renamed
  aside to ``<name>.before-restore-<time>`` in the same directory (a rename
  that never replaces: a name that appeared since gets ``.2``...; nothing is
  copied or deleted). If rsync then fails, the aside one is
  renamed back when nothing took its place, else both are kept and the
  error says where.

rsync (``-aHAX --numeric-ids --relative``) copies contents, owner, mode,
times, ACLs, xattrs and hard links within what is restored. The planner is
pure (facts in, plan out); :func:`execute` does the renames and runs rsync
through the Runner.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import logging
import os
import posixpath
import stat
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

from agent.engine import rsync
from agent.core.commands import Runner
from agent.core.errors import CommandError, StepError, UsageError
from agent.core.files import rename_noreplace
from agent.engine.history import Snapshot, kind_of, lstat_in, narrow, within
from agent.policy.rotation import format_snapshot_name, parse_snapshot_name

log = logging.getLogger(__name__)

RESTORED = "restored-"
BEFORE = ".before-restore-"


@dataclass(frozen=True)
class Target:
    """A path to restore and the snapshot chosen for it (with its place inside)."""

    path: str
    snapshot: Snapshot
    rel: str
    kind: str


@dataclass(frozen=True)
class Item:
    """One rsync run: ``source`` (``<snapshot>/<where>/./<path>``) into ``destination``."""

    path: str
    snapshot: str
    partial: bool
    kind: str
    source: str
    destination: str
    result: str  # where the restored path will be
    aside: str | None = None  # --in-place: where what is there now goes first


@dataclass(frozen=True)
class Plan:
    items: tuple[Item, ...]
    make: tuple[str, ...]  # directories to create first (restored-<snapshot>, --to DIR)
    beside: tuple[str, ...]  # of those, the ones that take their owner and mode from the directory they are in


def choose(
    history: Sequence[Snapshot],
    path: str,
    *,
    snapshot: str | None,
    at: dt.datetime | None,
    kind_in: Callable[[Snapshot, str], str | None] | None = None,
) -> Target:
    """The snapshot to restore ``path`` from: the one named, the newest at or before ``at``, else the
    newest that holds it (a file deleted since is found in the last snapshot that had it)."""
    history = narrow(history, path)  # several sources: the part that holds the path
    if snapshot is not None:
        chosen = [s for s in history if s.name == snapshot]
        if not chosen:
            raise UsageError(f"--snapshot {snapshot}: no such snapshot; `backup-agent list` shows them")
        candidates = chosen
    elif at is not None:
        before = [s for s in history if (moment := parse_snapshot_name(s.name)) is not None and moment <= at]
        if not before:
            first = history[0].name if history else "none"
            raise UsageError(f"--at {at.isoformat(timespec='seconds')}: no snapshot is that old (the oldest is {first})")
        candidates = before[-1:]
    else:
        candidates = list(reversed(history))
    for snap in candidates:
        rel = within(snap.source, path)
        if rel is None:
            continue
        kind = kind_in(snap, rel) if kind_in is not None else _local_kind(snap, rel)
        if kind is not None:
            return Target(path, snap, rel, kind)
    if snapshot is not None or at is not None:
        raise UsageError(
            f"snapshot {candidates[0].name} does not hold {path}: `backup-agent versions {path}` shows which ones do"
        )
    raise LookupError(path)  # the caller explains with history.not_held


def _local_kind(snap: Snapshot, rel: str) -> str | None:
    """What ``rel`` is in a snapshot on this machine (None: it does not hold it)."""
    info = lstat_in(snap.path, rel)
    return kind_of(info.st_mode) if info is not None else None


def _numbered(name: str, sep: str) -> Iterator[str]:
    """``name``, then ``name<sep>2``, ``name<sep>3``...: the names tried for something new beside others."""
    yield name
    for number in range(2, 10_000):
        yield f"{name}{sep}{number}"


def _free(name: str, taken: Callable[[str], bool], sep: str) -> str:
    for candidate in _numbered(name, sep):
        if not taken(candidate):
            return candidate
    raise UsageError(f"{name}: no free name beside it; clean up earlier restores")


def _anchor(target: Target, exists: Callable[[str], bool]) -> str:
    """The nearest directory above the path that exists now, within the backed-up source."""
    source = target.snapshot.source
    anchor = posixpath.dirname(target.path)
    while not exists(anchor):
        if anchor == source or anchor == "/":
            raise UsageError(f"{source}, where {target.path} was backed up from, does not exist now: restore it with --to DIR")
        anchor = posixpath.dirname(anchor)
    return anchor


def plan_restore(
    targets: Iterable[Target],
    *,
    to: str | None,
    in_place: bool,
    now: dt.datetime,
    exists: Callable[[str], bool],
    is_dir: Callable[[str], bool],
) -> Plan:
    """What to create, move aside and copy (pure: ``exists`` and ``is_dir`` answer about the live system)."""
    items: list[Item] = []
    make: list[str] = []
    beside: list[str] = []
    made_for: dict[tuple[str, str], str] = {}
    results: set[str] = set()
    stamp = format_snapshot_name(now)
    if to is not None:
        if exists(to) and not is_dir(to):
            raise UsageError(f"--to {to} exists and is not a directory: give a directory")
        if not exists(to):
            if not is_dir(posixpath.dirname(to)):
                raise UsageError(f"--to {to}: its parent directory does not exist; create it first")
            make.append(to)
    for target in targets:
        snap = target.snapshot
        if target.rel == "" and (to is None or in_place):
            raise UsageError(
                f"{target.path} is the whole backed-up source: restore it with --to DIR, or restore what is in it one by one"
            )
        name = posixpath.basename(target.path)
        where = posixpath.join(snap.path, posixpath.dirname(target.rel))
        if to is not None:
            source = f"{where.rstrip('/')}/./{name}" if target.rel else f"{snap.path}/./"
            destination = to
            result = posixpath.join(to, name) if target.rel else to
            if target.rel and (exists(result) or result in results):
                raise UsageError(f"{result} exists already: nothing was restored; give --to an empty directory")
            aside = None
        else:
            anchor = _anchor(target, exists)
            inner = within(anchor, target.path) or name
            source = f"{posixpath.join(snap.path, within(snap.source, anchor) or '').rstrip('/')}/./{inner}"
            if in_place:
                destination, result = anchor, target.path
                aside = _free(f"{target.path}{BEFORE}{stamp}", exists, ".") if exists(target.path) else None
                if result in results:
                    raise UsageError(f"{result} is given twice: give each path once")
            else:
                key = (anchor, snap.name)
                if key not in made_for:
                    made_for[key] = _free(posixpath.join(anchor, RESTORED + snap.name), lambda p: exists(p) or p in make, "-")
                    make.append(made_for[key])
                    beside.append(made_for[key])
                destination = made_for[key]
                result = posixpath.join(destination, inner)
                aside = None
        results.add(result)
        items.append(Item(target.path, snap.name, snap.partial, target.kind, source, destination, result, aside))
    return Plan(tuple(items), tuple(make), tuple(beside))


# -- through sudo ------------------------------------------------------------------


def may_search(mode: int, owner: int, group: int, uid: int, gids: Iterable[int]) -> bool:
    """Whether ``uid`` (in ``gids``) may enter a directory with these mode bits (pure; ACLs not counted)."""
    if uid == owner:
        return bool(mode & stat.S_IXUSR)
    if group in set(gids):
        return bool(mode & stat.S_IXGRP)
    return bool(mode & stat.S_IXOTH)


def early_refusal(paths: Sequence[str], uid: int, exists: Callable[[str], bool], owner: Callable[[str], int]) -> str | None:
    """Through sudo, the part of :func:`caller_refusal` the live system alone answers (pure).

    Checked before the disk is opened, so a restore that would be refused
    unlocks and mounts nothing: the nearest directory above each path that
    exists now is where ``restored-<snapshot>`` would be made, and it must
    be the caller's.
    """
    for path in paths:
        anchor = posixpath.dirname(path)
        while anchor != "/" and not exists(anchor):
            anchor = posixpath.dirname(anchor)
        found = owner(anchor)
        if found != uid:
            return f"{anchor} is not yours (owner uid {found}): through sudo, restore only into your own directories"
    return None


def caller_refusal(plan: Plan, targets: Sequence[Target], uid: int, gids: Sequence[int]) -> str | None:
    """Through sudo, restore only what the caller could reach, only into directories the caller owns.

    The directory a ``restored-<snapshot>`` is made in must be the caller's;
    and every directory above the restored path in the snapshot (down to
    where the restore starts, which keeps its own modes) must have let the
    caller in, so a restore never hands out a file a private directory hid.
    """
    for item, target in zip(plan.items, targets):
        anchor = posixpath.dirname(item.destination)
        try:
            owner = os.lstat(anchor).st_uid
        except OSError as exc:
            return f"cannot examine {anchor}: {exc.strerror}"
        if owner != uid:
            return f"{anchor} is not yours (owner uid {owner}): through sudo, restore only into your own directories"
        snap = target.snapshot
        chain = [snap.path]
        for part in [p for p in (within(snap.source, anchor) or "").split("/") if p]:
            chain.append(posixpath.join(chain[-1], part))
        for directory in chain:
            info = os.lstat(directory)
            if not stat.S_ISDIR(info.st_mode) or not may_search(info.st_mode, info.st_uid, info.st_gid, uid, gids):
                shown = posixpath.normpath(posixpath.join(snap.source, posixpath.relpath(directory, snap.path)))
                return f"in snapshot {snap.name}, {shown} did not let you in: restore {target.path} as root"
    return None


# -- doing it -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Private:
    """A new ``restored-<snapshot>`` while it is filled: root's (the runner's), mode 0700, held open.

    rsync writes into it through ``/proc/self/fd/<fd>``, so renaming its
    name away or putting a link there changes nothing; and while it is
    0700 no one else can reach inside. Only when rsync has finished does
    it get the owner and mode of the directory it is in (``parent``), on
    the descriptor, never by name.
    """

    path: str
    fd: int
    parent: os.stat_result


def _make_private(path: str, owner: int | None) -> _Private:
    """Create ``path`` as a private directory, open it without following links, and prove it is the one made.

    ``owner``: through sudo, the uid the directory it is made in must
    belong to, checked on the opened directory (not its name) so a
    directory swapped in since planning is refused.
    """
    where, name = posixpath.split(path)
    try:
        parent_fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise StepError(f"cannot create {path}: {where}: {exc.strerror}; nothing was restored", step="restore") from exc
    try:
        parent = os.fstat(parent_fd)
        if owner is not None and parent.st_uid != owner:
            raise StepError(f"{where} is no longer yours (owner uid {parent.st_uid}): nothing was restored", step="restore")
        try:
            os.mkdir(name, 0o700, dir_fd=parent_fd)
        except OSError as exc:
            raise StepError(f"cannot create {path}: {exc.strerror}; nothing was restored", step="restore") from exc
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
        except OSError as exc:
            raise StepError(f"{path} was replaced as soon as it was made: nothing was restored", step="restore") from exc
    finally:
        os.close(parent_fd)
    made = os.fstat(fd)
    if made.st_uid != os.geteuid() or stat.S_IMODE(made.st_mode) & 0o077 or os.listdir(fd):
        os.close(fd)
        raise StepError(f"{path} was replaced as soon as it was made: nothing was restored", step="restore")
    return _Private(path, fd, parent)


def _hand_over(private: _Private) -> str | None:
    """Give the finished directory the owner and mode of the one it is in, and close it; what failed, or None."""
    try:
        if os.geteuid() == 0:
            os.fchown(private.fd, private.parent.st_uid, private.parent.st_gid)
        os.fchmod(private.fd, stat.S_IMODE(private.parent.st_mode) & 0o3777)
    except OSError as exc:
        return f"{private.path} keeps mode 0700 and owner uid {os.geteuid()}: setting its owner and mode failed: {exc.strerror}"
    finally:
        os.close(private.fd)
    return None


def _move_aside(item: Item) -> Item:
    """Rename what is at ``item.result`` to its aside name, or the next free one when that name
    appeared since planning: never over anything (the item, with the name used)."""
    if item.aside is None:
        return item
    for candidate in _numbered(item.aside, "."):
        try:
            rename_noreplace(item.result, candidate)
        except FileExistsError:
            continue
        return dataclasses.replace(item, aside=candidate)
    raise FileExistsError(errno.EEXIST, "no free name beside it; clean up earlier restores", item.aside)


def execute(
    plan: Plan,
    runner: Runner,
    rsync_program: str,
    *,
    say: Callable[[str], None],
    caller: int | None = None,
    remote: tuple[str, str] | None = None,
    daemon: tuple[tuple[str, ...], str] | None = None,
) -> None:
    """Create the directories, move aside, run rsync for each item; CommandError on a failure, after
    putting back (or naming) what was moved aside. ``remote`` (the ssh command for rsync's ``-e``, the
    host): the snapshots are paths on that server. ``daemon`` (rsync's options for it, the module's
    ``rsync://`` URL): the snapshots are paths in that rsync daemon's module.

    A new ``restored-<snapshot>`` is written only through its descriptor
    (:class:`_Private`); ``caller`` (through sudo) is who must own the
    directory it is made in, and gets no setuid/setgid bits or file
    capabilities with what is restored.
    """
    private: dict[str, _Private] = {}
    try:
        for directory in plan.make:
            if directory in plan.beside:
                private[directory] = _make_private(directory, caller)
                continue
            try:
                os.mkdir(directory, 0o700)
            except OSError as exc:
                raise StepError(f"cannot create {directory}: {exc.strerror}; {_done(plan, None)}", step="restore") from exc
        for planned in plan.items:
            _restore_one(plan, planned, runner, rsync_program, say, private, hand_out=caller is not None, remote=remote, daemon=daemon)
    except BaseException:
        for held in private.values():
            problem = _hand_over(held)
            if problem is not None:
                log.error("%s", problem)
        raise
    problems = [problem for problem in map(_hand_over, private.values()) if problem is not None]
    if problems:
        raise StepError("; ".join(problems), step="restore")


def _restore_one(
    plan: Plan,
    planned: Item,
    runner: Runner,
    rsync_program: str,
    say: Callable[[str], None],
    private: dict[str, _Private],
    *,
    hand_out: bool,
    remote: tuple[str, str] | None = None,
    daemon: tuple[tuple[str, ...], str] | None = None,
) -> None:
    try:
        item = _move_aside(planned)
    except OSError as exc:
        raise StepError(
            f"cannot move {planned.result} aside to {planned.aside}: {exc.strerror}; it is left as it was; {_done(plan, planned)}",
            step="restore",
        ) from exc
    if item.aside is not None:
        say(f"moved the current {item.result} aside to {item.aside}")
    held = private.get(item.destination)
    destination = f"/proc/self/fd/{held.fd}" if held is not None else item.destination
    argv = rsync.restore_argv(rsync=rsync_program, source=item.source, destination=destination, hand_out=hand_out)
    if remote is not None:  # the snapshot is on a server (agent.engine.remote): rsync reads it over ssh
        shell, host = remote
        argv = (*argv[:-2], "-e", shell, f"{host}:{argv[-2]}", argv[-1])
    if daemon is not None:  # the snapshot is in an rsync daemon's module: rsync reads it from there
        options, module_url = daemon
        argv = (*argv[:-2], *options, module_url + argv[-2], argv[-1])
    try:
        result = runner.run(
            argv, step="restore", exit_table=rsync.EXIT_TABLE, check=False, pass_fds=() if held is None else (held.fd,)
        )
    except BaseException:
        log.error("%s", _put_back(item, "the restore was stopped"))
        raise
    if result.kind in ("ok", "warning"):
        return
    # rsync names what it wrote by the descriptor's path: show the directory's name instead.
    tail = tuple(line.replace(destination, item.destination) for line in result.stderr_tail)
    why = f"rsync failed ({result.meaning}): {' | '.join(tail[-2:]) or 'no error output'}"
    raise CommandError(_put_back(item, why), argv=result.argv, returncode=result.returncode, stderr_tail=tail, step="restore")


def _done(plan: Plan, failed: Item | None) -> str:
    """What a restore that stopped at ``failed`` (None: before the first) had restored already."""
    done = [item.result for item in plan.items[: plan.items.index(failed) if failed is not None else 0]]
    return f"restored before it stopped: {', '.join(done)}" if done else "nothing was restored"


def _put_back(item: Item, why: str) -> str:
    """After a failed restore: what was moved aside goes back if nothing took its place; says where things are."""
    if item.aside is None:
        return why
    try:
        rename_noreplace(item.aside, item.result)
    except FileExistsError:
        return f"{why}; what was at {item.result} before is kept at {item.aside}, the unfinished restore is at {item.result}"
    except OSError as exc:
        return f"{why}; what was at {item.result} before is kept at {item.aside} (putting it back failed: {exc.strerror})"
    return f"{why}; {item.result} was put back as it was"
