"""Sources: what a backup reads, and what a snapshot's metadata says of it.

The seam (docs/ARCHITECTURE.md, "Seams for what comes next"). A :class:`Source` must provide:

- ``path``: the live path the snapshot stands for. The metadata records it as
  ``source``, and ``versions``, ``diff`` and ``restore`` map live paths to
  snapshot paths through it.
- ``check(repository)``: refuse, before anything is written, a source that
  cannot be backed up into that repository (not a directory, a repository
  itself, inside the repository).
- ``opened(repository)``: a context manager giving a :class:`Tree`, the
  directory the transfer reads and the rsync arguments that belong to the
  source (one file system or not, filter rules, excludes), plus the fields
  the snapshot's metadata records of it. The tree is readable while the
  context is open; whatever the source set up for it is undone on exit,
  also when the transfer fails.

Who calls it: :class:`agent.engine.cycle.Cycle`, which checks the source while
preparing and enters ``opened`` inside its transfer step, around the rsync
run; the destination layout decides where the tree is written.

:class:`PathSource` is one live path with its excludes,
``one_file_system`` and the CACHEDIR.TAG rule, built from the configuration
by :meth:`PathSource.from_settings`. :class:`agent.engine.frozen.FrozenSource`
wraps one for a btrfs subvolume: ``opened`` takes read-only snapshots and
removes them on exit, also after a failure, and its tree's
``command_prefix`` reads them at the live path inside a private mount
namespace. Several sources in one snapshot, each under its own directory,
are :class:`agent.engine.source_set.Part`s: the cycle opens each and runs
one transfer per source. A command's output and the system's package lists
are not sources of this seam: the system-state step writes them into the
snapshot after the transfer (agent.engine.sysstate; docs/ARCHITECTURE.md,
"System state").
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from contextlib import AbstractContextManager
from typing import Any, Iterator, Mapping, Protocol

from agent.engine import rsync
from agent.config.model import Settings, effective_excludes
from agent.core.errors import UsageError
from agent.core.mounts import find_skipped_mounts
from agent.repository.store import classify

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tree:
    """What a source gives one transfer: a directory to read and how to read it.

    ``filter_rules`` are whole rsync arguments (``--include=``/``--exclude=``)
    placed before ``excludes``, so they win; ``record`` holds what the
    snapshot's metadata says of the source (beside ``source``, its path);
    ``skipped_mounts`` are the mount points the transfer leaves empty, shown
    in the transfer step's result; ``command_prefix`` runs the transfer
    through another program first (a frozen source's private mount
    namespace, :mod:`agent.engine.frozen`).
    """

    root: str
    one_file_system: bool
    filter_rules: tuple[str, ...]
    excludes: tuple[str, ...]
    skipped_mounts: tuple[str, ...]
    record: Mapping[str, Any]
    command_prefix: tuple[str, ...] = ()


class Source(Protocol):
    """What the cycle reads a snapshot from (this module's docstring says who calls what)."""

    @property
    def path(self) -> str:
        """The live path the snapshot stands for (metadata ``source``)."""
        ...

    def check(self, repository: str) -> None:
        """Raise UsageError when this source cannot be backed up into ``repository``."""
        ...

    def opened(self, repository: str) -> AbstractContextManager[Tree]:
        """The tree to transfer, readable until the context ends."""
        ...


@dataclass(frozen=True)
class PathSource:
    """A live directory, read where it is: today's only source."""

    path: str
    excludes: tuple[str, ...] = ()
    one_file_system: bool = True
    skip_cachedir_tagged: bool = True

    @classmethod
    def from_settings(cls, settings: Settings, path: str) -> PathSource:
        """The source the configuration describes, at ``path`` (the command line may have replaced ``source``)."""
        return cls(
            path=path,
            excludes=effective_excludes(settings),
            one_file_system=settings.one_file_system,
            skip_cachedir_tagged=settings.skip_cachedir_tagged,
        )

    def check(self, repository: str) -> None:
        source = self.path
        if not os.path.isdir(source):
            raise UsageError(f"source {source} is not a directory: give the directory to back up", step="prepare")
        if classify(source) == "repository":
            raise UsageError(
                f"source {source} is a backup-agent repository: did you swap SOURCE and DESTINATION?",
                step="prepare",
            )
        repo_real = os.path.realpath(repository)
        source_real = os.path.realpath(source)
        if repo_real == source_real or source_real.startswith(repo_real.rstrip("/") + "/"):
            raise UsageError(
                f"source {source} lies inside the repository {repository}: give another source",
                step="prepare",
            )

    @contextlib.contextmanager
    def opened(self, repository: str) -> Iterator[Tree]:
        """The live tree: nothing to set up or undo; the walks for skipped mounts and CACHEDIR.TAG happen here."""
        source = self.path
        skipped = find_skipped_mounts(source) if self.one_file_system else ()
        tagged = find_cachedir_tagged(source, self.one_file_system) if self.skip_cachedir_tagged else []
        filters = rsync.cachedir_filter_rules(source, tagged) + rsync.exclude_repository_rule(source, repository)
        yield Tree(
            root=source,
            one_file_system=self.one_file_system,
            filter_rules=filters,
            excludes=self.excludes,
            skipped_mounts=skipped,
            record={
                "excludes": list(self.excludes),
                "cachedir_tagged": tagged,
                "skipped_mounts": list(skipped),
                "one_file_system": self.one_file_system,
            },
        )


def find_cachedir_tagged(source: str, one_file_system: bool) -> list[str]:
    """Directories under ``source`` holding a valid CACHEDIR.TAG (not below one another)."""
    found: list[str] = []
    try:
        top_dev = os.lstat(source).st_dev
    except OSError:
        return found
    stack = [source]
    while stack:
        directory = stack.pop()
        subdirs: list[str] = []
        tagged = False
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            subdirs.append(entry.path)
                        elif entry.name == "CACHEDIR.TAG" and entry.is_file(follow_symlinks=False):
                            with open(entry.path, "rb") as handle:
                                tagged = rsync.is_cachedir_tag(handle.read(len(rsync.CACHEDIR_SIGNATURE)))
                    except OSError as exc:
                        log.debug("skipping %s while looking for CACHEDIR.TAG: %s", entry.path, exc)
        except OSError as exc:
            log.debug("cannot list %s while looking for CACHEDIR.TAG: %s", directory, exc)
            continue
        if tagged and directory != source:
            found.append(directory)
            continue
        for sub in subdirs:
            if one_file_system:
                try:
                    if os.lstat(sub).st_dev != top_dev:
                        continue
                except OSError:
                    continue
            stack.append(sub)
    return sorted(found)
