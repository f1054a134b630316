"""Destination layouts: how a snapshot is begun, completed and deleted in a repository.

The seam (docs/ARCHITECTURE.md, "Seams for what comes next"). A :class:`Layout` must provide:

- ``begin(start, dry_run=)``: reserve the new snapshot's name and the
  directory the transfer writes into, and say what the transfer links
  against (:class:`Begun`: target, ``--link-dest`` directories, the snapshot
  and the unfinished transfers it reuses). A dry run reserves nothing.
- ``end_transfer(begun, whole=)``: after the transfer, whole or not: tidy
  the unfinished transfers it resumed from, so at most one is left.
- ``finished_transfer()`` and ``transfer_path(name)``: the transfer that
  finished but was not completed yet (``backup --snapshot`` alone), and the
  directory holding a transfer's files until it completes (the manifest is
  recorded from it).
- ``complete(name)``: make the transferred snapshot complete and ``latest``,
  durable on return (the repository's promise: a snapshot's files and
  metadata on the disk before its name says complete, the rename and
  ``latest`` on the disk before success is reported or anything deleted).
- ``delete(entries, step=)``: take snapshots or unfinished transfers out
  of the listing at once, so that a half-deleted one never looks like a
  snapshot; and ``empty_trash(step=)``: remove what was taken out, the slow
  part, which the cycle runs after it reported success (and which finishes
  what an interrupted run left).

Who calls it: :class:`agent.engine.cycle.Cycle`, in its transfer, snapshot,
make-room and rotate steps; :func:`for_repository` is the one place a
repository gets its layout. Listing snapshots, metadata and manifests stay
with :class:`agent.repository.store.Repository`, shared by every layout and by the
reading commands.

Two layouts: :class:`LinksLayout`: ``rsync --link-dest`` into
``snapshots/<name>.in-progress``, completed by a rename, deleted through
``.trash``, every step a call into :class:`~agent.repository.store.Repository`,
whose operations open directories by descriptor and follow no link; and
:class:`agent.engine.btrfs.BtrfsLayout` (read-only subvolume snapshots),
chosen in :func:`for_repository` by the kind ``init`` records in the
marker. A repository over SSH or on an rsync daemon has its own layout,
:class:`agent.engine.remote.RemoteLayout` (the same names, each step run on
the server), chosen with its cycle by the command line, since the
repository is not a directory here.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from agent.repository import unfinished
from agent.core.commands import Runner
from agent.core.errors import BackupAgentError, RepositoryError, StepError
from agent.repository.store import IN_PROGRESS, SNAPSHOTS, Repository, reserve_name
from agent.engine.rsync import MAX_LINK_DESTS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Begun:
    """A transfer about to start: the snapshot's name, where its files go, what they link against.

    ``previous`` is the complete snapshot linked against (metadata
    ``link_dest``), ``resumed_from`` the unfinished transfers whose files are
    reused, newest first (metadata ``resumed_from``); ``link_dests`` are the
    directories rsync gets as ``--link-dest``, in its order.
    """

    name: str
    target: str
    link_dests: tuple[str, ...]
    previous: str | None
    resumed_from: tuple[str, ...]
    # rsync updates ``target`` in place (--inplace --no-whole-file --delete): a
    # clone of the newest tree (agent.engine.btrfs), not a fresh directory.
    inplace: bool = False

    @property
    def copies_all(self) -> bool:
        """Nothing to link to: every file is sent (the progress then counts bytes)."""
        return self.previous is None and not self.resumed_from


class Layout(Protocol):
    """How snapshots are made and deleted in one repository (this module's docstring says who calls what)."""

    def begin(self, start: dt.datetime, *, dry_run: bool) -> Begun:
        """Reserve the snapshot started at ``start`` and say where the transfer writes; a dry run reserves nothing."""
        ...

    def end_transfer(self, begun: Begun, *, whole: bool) -> None:
        """After the transfer (``whole``: it finished): leave at most one unfinished transfer to resume from."""
        ...

    def finished_transfer(self) -> str:
        """The name of the transfer that finished and awaits completing; StepError when there is none."""
        ...

    def transfer_path(self, name: str) -> str:
        """The directory holding ``name``'s files until it completes."""
        ...

    def complete(self, name: str) -> tuple[str, ...]:
        """Make ``name`` a complete snapshot and ``latest``, durable on return; the entries deleted with it."""
        ...

    def delete(self, entries: Sequence[str], *, step: str) -> None:
        """Take snapshots or unfinished transfers (names with their suffix) and their metadata out of the listing."""
        ...

    def empty_trash(self, *, step: str) -> tuple[str, ...]:
        """Remove what ``delete`` took out, also what an interrupted run left; the entries removed."""
        ...


class LinksLayout:
    """Hard-linked snapshots: ``rsync --link-dest`` into ``<name>.in-progress``, then a rename.

    ``repository`` is None only for a dry run into a repository that does
    not exist yet: ``begin`` then says what would be made under ``root``.
    ``rm_argv`` deletes trees (rm under idle I/O priority); ``warn`` reports
    what the cycle goes on despite.
    """

    def __init__(
        self,
        root: str,
        repository: Repository | None,
        *,
        runner: Runner,
        rm_argv: Sequence[str],
        warn: Callable[[str], None],
    ) -> None:
        self.root = root
        self.repository = repository
        self.runner = runner
        self.rm_argv = tuple(rm_argv)
        self.warn = warn

    def _repo(self) -> Repository:
        if self.repository is None:
            raise RepositoryError(f"{self.root} holds no repository yet", step="prepare")
        return self.repository

    # -- begin ---------------------------------------------------------------

    def begin(self, start: dt.datetime, *, dry_run: bool) -> Begun:
        """Reserve ``<name>.in-progress`` (after folding older unfinished transfers into one) and link to latest.

        A dry run reserves nothing: rsync -n then compares with the latest
        snapshot itself, since what differs is what a real run would copy
        (rsync 3.5 with --xattrs and --link-dest fails a dry run into a
        directory that does not exist).
        """
        repo = self.repository
        if repo is None:
            snapshots_dir = os.path.join(self.root, SNAPSHOTS)
            name = reserve_name(snapshots_dir, start, create=False)
            return Begun(name, os.path.join(snapshots_dir, name + IN_PROGRESS), (), None, ())
        if dry_run:
            name = reserve_name(repo.snapshots_dir, start, create=False)
            leftovers = repo.in_progress_names()
        else:
            leftovers = self._fold_leftovers(repo, repo.in_progress_names())
            name = repo.reserve(start)
        latest = repo.latest_name()
        # Newest leftovers first: they hold the most recent partial copies.
        resumed = tuple(n for n in reversed(leftovers) if n != name)[: MAX_LINK_DESTS - 1]
        if dry_run and latest is not None:
            return Begun(name, repo.snapshot_path(latest), (), latest, resumed)
        link_dests = ([repo.snapshot_path(latest)] if latest is not None else []) + [repo.in_progress_path(n) for n in resumed]
        return Begun(name, repo.in_progress_path(name), tuple(link_dests), latest, resumed)

    def end_transfer(self, begun: Begun, *, whole: bool) -> None:
        """Leave at most one unfinished transfer behind (agent.repository.unfinished).

        Whole: what the transfer resumed from is not needed any more. Not
        whole: fold what it resumed from into it, so one remains to resume
        from next time.
        """
        repo = self._repo()
        older = [n for n in reversed(begun.resumed_from)]  # oldest first
        if whole:
            self.delete([n + IN_PROGRESS for n in older], step="transfer")
            return
        if not older or not os.path.isdir(repo.in_progress_path(begun.name)):
            return
        if (repo.read_metadata(begun.name) or {}).get("state") == "transferred":
            # Whole already (a later step failed): never add older entries to it.
            self.delete([n + IN_PROGRESS for n in older], step="transfer")
            return
        for name in older:
            self._fold(repo, name, begun.name)

    def _fold_leftovers(self, repo: Repository, leftovers: list[str]) -> list[str]:
        """More than one unfinished transfer (left by an older version): fold them into the newest."""
        if len(leftovers) < 2:
            return leftovers
        newest = leftovers[-1]
        for older in leftovers[:-1]:
            self._fold(repo, older, newest)
        return [newest]

    def _fold(self, repo: Repository, older: str, newer: str) -> None:
        """Fold one unfinished transfer into another and delete it; a failure is a warning, both are kept."""
        try:
            linked = unfinished.fold(repo.in_progress_path(older), repo.in_progress_path(newer))
            self.delete([older + IN_PROGRESS], step="transfer")
        except (OSError, BackupAgentError) as exc:
            self.warn(f"the unfinished transfer {older} could not be folded into {newer} ({exc}): both are kept")
            return
        log.info("folded the unfinished transfer %s into %s (%d entries linked)", older, newer, linked)

    # -- complete ------------------------------------------------------------

    def finished_transfer(self) -> str:
        """The newest unfinished transfer whose metadata says its transfer finished."""
        repo = self._repo()
        for candidate in reversed(repo.in_progress_names()):
            if (repo.read_metadata(candidate) or {}).get("state") == "transferred":
                return candidate
        raise StepError(
            f"{repo.root} has no finished transfer to complete: run backup-agent backup --backup first",
            step="snapshot",
        )

    def transfer_path(self, name: str) -> str:
        return self._repo().in_progress_path(name)

    def complete(self, name: str) -> tuple[str, ...]:
        """Rename ``<name>.in-progress`` to ``<name>`` and point ``latest`` at it, durably
        (:meth:`Repository.complete`: syncfs, rename, fsync); then delete the
        other unfinished transfers, which served only as ``--link-dest``. The entries deleted."""
        repo = self._repo()
        repo.complete(name)
        log.info("snapshot %s complete", name)
        leftovers = tuple(n + IN_PROGRESS for n in repo.in_progress_names() if n != name)
        self.delete(leftovers, step="snapshot")
        return leftovers

    # -- delete --------------------------------------------------------------

    def delete(self, entries: Sequence[str], *, step: str) -> None:
        """Entries of snapshots/ (names with any suffix) renamed into .trash, their metadata removed."""
        self._repo().discard(entries, step=step)

    def empty_trash(self, *, step: str) -> tuple[str, ...]:
        """Remove what .trash holds (rm under idle I/O priority), this run's deletions and an interrupted run's."""
        return tuple(self._repo().empty_trash(self.runner, self.rm_argv, step=step))


def for_repository(
    root: str,
    repository: Repository | None,
    *,
    runner: Runner,
    rm_argv: Sequence[str],
    warn: Callable[[str], None],
    btrfs: str = "/bin/btrfs",
    wanted: str = "auto",
) -> Layout:
    """The layout of the repository at ``root``: the one its marker records (hard links when it records none).

    The one place a layout is chosen. ``wanted`` is the configuration's
    ``layout``: "auto" accepts what the marker says; "links" or "btrfs"
    must agree with it (a repository keeps the layout it was made with).
    A dry run into a repository not made yet plans hard links.
    """
    kind = repository.marker.layout if repository is not None else "links"
    if repository is not None and wanted not in ("auto", kind):
        raise RepositoryError(
            f"{root} was made with layout = \"{kind}\" and the configuration asks for \"{wanted}\": a repository "
            f"keeps its layout; set layout = \"{kind}\" (or \"auto\"), or give a new repository for the other layout",
            step="prepare",
        )
    if kind == "btrfs":
        from agent.engine.btrfs import BtrfsLayout  # it builds on LinksLayout, defined above

        return BtrfsLayout(root, repository, runner=runner, rm_argv=rm_argv, btrfs=btrfs, warn=warn)
    return LinksLayout(root, repository, runner=runner, rm_argv=rm_argv, warn=warn)
