"""The btrfs layout: snapshots as read-only btrfs subvolumes (docs/ARCHITECTURE.md, "The btrfs layout").

A transfer writes into ``snapshots/<name>.in-progress``, a writable
snapshot of the newest tree the repository holds (the unfinished transfer
it resumes, else ``latest``), made in one step whatever its size; rsync
updates it with ``--inplace --no-whole-file`` (and ``--delete``), so only
the changed blocks of a changed file are written and every other block
stays shared with the older snapshots. Completing sets it read-only, then
renames it to ``<name>`` as the links layout does: history is never
rewritten, since a change of mode, owner, ACL or xattr is applied to the
writable clone's own inode, never to an older snapshot's.

What a kill at each step leaves: a snapshot of a subvolume, a read-only
flag, a rename and a subvolume deletion are each atomic, so the listing
holds the old snapshots and at most one ``.in-progress`` entry (never listed
as a snapshot; the next run resumes from it), never a name that looks
complete and is not.

Deletion is ``btrfs subvolume delete``: the entry leaves the listing at
once and the filesystem reclaims its blocks in the background (the
cleaner); ``empty_trash`` waits for that (``btrfs subvolume sync``) only
after this run deleted something, which ``make-room`` relies on.

Argv builders and the filesystem test are pure; :class:`BtrfsLayout` acts
through :class:`agent.core.commands.Runner` and the repository's directory
descriptors (``/proc/self/fd/N/<entry>``: no path inside the repository is
followed).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import stat
from typing import Callable, Iterable, Sequence

from agent.core.commands import Runner
from agent.core.errors import RepositoryError
from agent.core.mounts import MountEntry, read_mountinfo
from agent.engine.layouts import Begun, LinksLayout
from agent.repository.store import IN_PROGRESS, SNAPSHOTS, Repository, reserve_name

log = logging.getLogger(__name__)

# The inode number of every btrfs subvolume's root directory (BTRFS_FIRST_FREE_OBJECTID).
SUBVOLUME_INODE = 256


# -- pure -----------------------------------------------------------------------


def filesystem_type(path: str, entries: Iterable[MountEntry]) -> str | None:
    """The type of the filesystem mounted deepest above the absolute, resolved ``path`` (pure)."""
    best: MountEntry | None = None
    for entry in entries:
        point = entry.mount_point.rstrip("/") or "/"
        if path == point or path.startswith(point.rstrip("/") + "/") or point == "/":
            if best is None or len(point) >= len(best.mount_point.rstrip("/") or "/"):
                best = entry
    return best.fstype if best is not None else None


def choose_layout(wanted: str, fstype: str | None, where: str) -> str:
    """The layout a new repository at ``where`` gets: ``wanted`` ("auto", "links", "btrfs") on ``fstype`` (pure)."""
    if wanted == "auto":
        return "btrfs" if fstype == "btrfs" else "links"
    if wanted == "btrfs" and fstype != "btrfs":
        raise RepositoryError(
            f"layout = \"btrfs\" needs a btrfs filesystem, and {where} is on {fstype or 'an unknown filesystem'}: "
            "make the disk's filesystem btrfs (crypttab-examples/btrfs), or set layout = \"links\"; nothing was written",
            step="prepare",
        )
    return wanted


def subvolume_snapshot_argv(btrfs: str, source: str, target: str, *, readonly: bool) -> tuple[str, ...]:
    return (btrfs, "subvolume", "snapshot", *(("-r",) if readonly else ()), source, target)


def subvolume_create_argv(btrfs: str, target: str) -> tuple[str, ...]:
    return (btrfs, "subvolume", "create", target)


def subvolume_delete_argv(btrfs: str, targets: Sequence[str]) -> tuple[str, ...]:
    return (btrfs, "subvolume", "delete", *targets)


def set_readonly_argv(btrfs: str, target: str) -> tuple[str, ...]:
    return (btrfs, "property", "set", "-ts", target, "ro", "true")


def subvolume_sync_argv(btrfs: str, path: str) -> tuple[str, ...]:
    return (btrfs, "subvolume", "sync", path)


def linked_inodes_argv(find: str, target: str) -> tuple[str, ...]:
    """find's argv that prints the inode number of every regular file with more than one link below ``target``."""
    return (find, target, "-xdev", "-type", "f", "-links", "+1", "-printf", "%i\\n")


def groups_to_split(groups: dict[int, list[bytes]], source: Callable[[bytes], os.stat_result | None]) -> list[bytes]:
    """The paths to unlink from a clone so that no write in place reaches a file it should not (pure).

    ``groups``: the clone's hard-linked paths by inode; ``source(path)``: the
    source's lstat of a path (None when it is gone). A group the source
    still has as one file is kept (a write into it is right for every
    path); otherwise every path but the first is unlinked, and rsync makes
    it anew.
    """
    doomed: list[bytes] = []
    for paths in groups.values():
        seen = [source(path) for path in paths]
        found = {(info.st_dev, info.st_ino) for info in seen if info is not None and stat.S_ISREG(info.st_mode)}
        if len(found) == 1 and all(info is not None for info in seen):
            continue
        doomed.extend(sorted(paths)[1:])
    return doomed


# -- acting ---------------------------------------------------------------------


def detect_layout(path: str, wanted: str) -> str:
    """The layout for a new repository at ``path``: ``wanted``, or by the filesystem that holds it (mountinfo)."""
    probe = os.path.realpath(path)
    while not os.path.exists(probe) and probe != "/":
        probe = os.path.dirname(probe)
    return choose_layout(wanted, filesystem_type(probe, read_mountinfo()), path)


def split_hard_links(target: str, source: str, *, runner: Runner, find: str, step: str) -> int:
    """Unlink from the clone at ``target`` the hard links the source no longer has; the count unlinked.

    Needed before rsync --inplace: rsync writes into a file's inode, so
    where the clone still links two paths the source has split, the write
    for one would show through the other (rsync's manual: with --inplace
    "hard links are not broken"). find lists the linked inodes (most trees
    have few); only then is the clone walked for their paths (readdir, no stat).
    """
    inodes: set[int] = set()
    runner.run(
        linked_inodes_argv(find, target),
        step=step,
        mutating=False,
        on_stdout=lambda line: inodes.add(int(line)) if line.strip().isdigit() else None,
    )
    if not inodes:
        return 0
    groups: dict[int, list[bytes]] = {}
    root = os.fsencode(target)
    pending = [b""]
    while pending:
        relative = pending.pop()
        with os.scandir(root + b"/" + relative if relative else root) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(relative + entry.name + b"/")
                elif entry.inode() in inodes and entry.is_file(follow_symlinks=False):
                    groups.setdefault(entry.inode(), []).append(relative + entry.name)
    origin = os.fsencode(source.rstrip("/"))

    def in_source(path: bytes) -> os.stat_result | None:
        try:
            return os.lstat(origin + b"/" + path)
        except OSError:
            return None

    doomed = groups_to_split(groups, in_source)
    for path in doomed:
        os.unlink(root + b"/" + path)
    if doomed:
        log.info("unlinked %d hard links in %s that the source split", len(doomed), target)
    return len(doomed)


def is_subvolume(info: os.stat_result) -> bool:
    """A directory that is a btrfs subvolume's root (on btrfs, only those have inode 256)."""
    return stat.S_ISDIR(info.st_mode) and info.st_ino == SUBVOLUME_INODE


class BtrfsLayout(LinksLayout):
    """Read-only subvolume snapshots, each a clone of the one before updated in place (this module's docstring).

    ``finished_transfer`` and ``transfer_path`` are the links layout's:
    both name ``<name>.in-progress``.
    """

    def __init__(
        self,
        root: str,
        repository: Repository | None,
        *,
        runner: Runner,
        rm_argv: Sequence[str],
        btrfs: str,
        warn: Callable[[str], None],
    ) -> None:
        super().__init__(root, repository, runner=runner, rm_argv=rm_argv, warn=warn)
        self.btrfs = btrfs
        self._deleted_subvolumes = False

    def _in_snapshots(self, entries: Sequence[str], action: Callable[[int, list[str]], object]) -> None:
        """Run ``action(fd, paths)`` with snapshots/ open and each entry as /proc/self/fd/N/<entry>."""
        with self._repo().directory(SNAPSHOTS) as snapshots:
            if snapshots is None:
                raise RepositoryError(f"{self._repo().snapshots_dir} is gone", step="transfer")
            action(snapshots, [f"/proc/self/fd/{snapshots}/{entry}" for entry in entries])

    def _subvolumes(self, entries: Sequence[str]) -> set[str]:
        """Which of ``entries`` of snapshots/ are subvolumes (lstat: a link is none)."""
        found: set[str] = set()
        with self._repo().directory(SNAPSHOTS) as snapshots:
            for entry in entries if snapshots is not None else ():
                try:
                    if is_subvolume(os.lstat(entry, dir_fd=snapshots)):
                        found.add(entry)
                except FileNotFoundError:
                    continue
        return found

    # -- begin ---------------------------------------------------------------

    def begin(self, start: dt.datetime, *, dry_run: bool) -> Begun:
        """A writable snapshot of the newest tree, as ``<name>.in-progress``, for rsync --inplace.

        The newest tree is the unfinished transfer left by an interrupted
        run (it holds the most recent copy; it is deleted once cloned, so
        one unfinished transfer is left at most), else ``latest``, else
        an empty subvolume. A dry run makes nothing: rsync -n compares with
        the latest snapshot.
        """
        repo = self.repository
        if repo is None or dry_run:
            planned = super().begin(start, dry_run=True)
            return Begun(planned.name, planned.target, (), planned.previous, planned.resumed_from, inplace=True)
        os.makedirs(repo.snapshots_dir, mode=0o755, exist_ok=True)
        leftovers = repo.in_progress_names()
        name = reserve_name(repo.snapshots_dir, start, create=False)
        latest = repo.latest_name()
        clonable = self._subvolumes([n + IN_PROGRESS for n in leftovers])
        seeds = [n for n in reversed(leftovers) if n + IN_PROGRESS in clonable]
        target = name + IN_PROGRESS

        def make(snapshots: int, paths: list[str]) -> None:
            where = paths[-1]
            if seeds:
                argv = subvolume_snapshot_argv(self.btrfs, f"/proc/self/fd/{snapshots}/{seeds[0]}{IN_PROGRESS}", where, readonly=False)
            elif latest is not None:
                argv = subvolume_snapshot_argv(self.btrfs, f"/proc/self/fd/{snapshots}/{latest}", where, readonly=False)
            else:
                argv = subvolume_create_argv(self.btrfs, where)
            self.runner.run(argv, step="transfer", pass_fds=(snapshots,))

        self._in_snapshots([target], make)
        resumed = tuple(seeds[:1])
        if leftovers:
            self.delete([n + IN_PROGRESS for n in leftovers], step="transfer")
        return Begun(name, repo.in_progress_path(name), (), latest, resumed, inplace=True)

    def end_transfer(self, begun: Begun, *, whole: bool) -> None:
        """Nothing to fold: ``begin`` left the one unfinished transfer, which rsync updated in place."""

    # -- complete ------------------------------------------------------------

    def complete(self, name: str) -> tuple[str, ...]:
        """Set ``<name>.in-progress`` read-only, then the links layout's durable rename and ``latest``."""
        repo = self._repo()
        entry = name + IN_PROGRESS
        if entry not in self._subvolumes([entry]):
            raise RepositoryError(
                f"{repo.in_progress_path(name)} is not a btrfs subvolume: it cannot be made a read-only snapshot; "
                "run the backup again (a new transfer is made)",
                step="snapshot",
            )
        self._in_snapshots(
            [entry],
            lambda fd, paths: self.runner.run(set_readonly_argv(self.btrfs, paths[0]), step="snapshot", pass_fds=(fd,)),
        )
        return super().complete(name)

    # -- delete --------------------------------------------------------------

    def delete(self, entries: Sequence[str], *, step: str) -> None:
        """Subvolumes by ``btrfs subvolume delete`` (out of the listing at once), anything else through .trash."""
        if not entries:
            return
        repo = self._repo()
        subvolumes = self._subvolumes(entries)
        doomed = [entry for entry in entries if entry in subvolumes]
        if doomed:
            for entry in doomed:
                log.info("deleting %s", entry)
            self._in_snapshots(
                doomed,
                lambda fd, paths: self.runner.run(subvolume_delete_argv(self.btrfs, paths), step=step, pass_fds=(fd,)),
            )
            self._deleted_subvolumes = True
            repo.forget(doomed)
        rest = [entry for entry in entries if entry not in subvolumes]
        if rest:
            repo.discard(rest, step=step)

    def empty_trash(self, *, step: str) -> tuple[str, ...]:
        """What .trash holds (rm), then, after subvolumes were deleted, wait until btrfs has freed their blocks."""
        removed = super().empty_trash(step=step)
        if self._deleted_subvolumes:
            repo = self._repo()
            with repo.directory(SNAPSHOTS) as snapshots:
                if snapshots is not None:
                    self.runner.run(subvolume_sync_argv(self.btrfs, f"/proc/self/fd/{snapshots}"), step=step, pass_fds=(snapshots,))
            self._deleted_subvolumes = False
        return removed
