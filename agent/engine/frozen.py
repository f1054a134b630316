"""A source frozen by btrfs: a read-only snapshot of the subvolume, read at the live path.

A database or a mailbox copied file by file while it is written ends up in
the backup as no state it was ever in. When a source is a btrfs subvolume,
:class:`FrozenSource` takes a read-only snapshot of it first (``btrfs
subvolume snapshot -r``, an instant and nearly free), and the transfer reads
that instead (docs/ARCHITECTURE.md, "Sources"):

- the snapshot lies inside the subvolume itself, named
  ``.backup-agent-frozen.<pid>-<time>`` (a snapshot never holds itself), so
  it is on the same filesystem whatever is mounted where;
- the transfer runs in a private mount namespace (``unshare --mount
  --propagation private`` running :mod:`agent.engine.frozen_view`, argv
  only) where the snapshot is bound over the live path, with the
  filesystems mounted below that path carried onto it: every path the
  transfer, its errors and the metadata name is the live one, and nothing
  of it is visible outside;
- nested subvolumes the transfer reads (``one_file_system = false``; with
  it, rsync stays out of them as out of any other filesystem) are each
  snapshotted and bound at their place;
- the snapshots are deleted when the transfer ends, whatever happened; one a
  killed run left behind is recognised by its name and deleted by the next.

``freeze``: ``auto`` freezes a subvolume and reads anything else live,
``always`` refuses a source that is not a subvolume, ``never`` reads live.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import posixpath
import stat
import sys
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Sequence

from agent.core.commands import Runner
from agent.core.errors import CommandError, UsageError
from agent.core.mounts import MountEntry, read_mountinfo, skipped_mount_points
from agent.engine.sources import PathSource, Tree

log = logging.getLogger(__name__)

#: The start of every snapshot this module makes: what the next run may delete as a leftover.
MARK = ".backup-agent-frozen."
#: The inode number of every btrfs subvolume's root directory.
SUBVOLUME_INODE = 256
VIEW_MODULE = "agent.engine.frozen_view"


def containing_mount(entries: Sequence[MountEntry], path: str) -> MountEntry | None:
    """The mount ``path`` lies on: the last mounted at the longest mount point above it (pure)."""
    best: MountEntry | None = None
    for entry in entries:
        point = entry.mount_point
        if path == point or path.startswith(point.rstrip("/") + "/"):
            if best is None or len(point) >= len(best.mount_point):
                best = entry
    return best


def is_subvolume(path: str, entries: Sequence[MountEntry]) -> bool:
    """``path`` is the root of a btrfs subvolume (its inode is 256 on a btrfs mount)."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    mount = containing_mount(entries, os.path.realpath(path))
    return stat.S_ISDIR(info.st_mode) and info.st_ino == SUBVOLUME_INODE and mount is not None and mount.fstype == "btrfs"


def nested_subvolumes(root: str, mount_points: frozenset[str]) -> list[str]:
    """The subvolumes below ``root`` (outer first), not crossing into other mounts nor into our own snapshots."""
    found: list[str] = []
    stack = [(root, os.lstat(root).st_dev)]
    while stack:
        directory, device = stack.pop()
        try:
            with os.scandir(directory) as entries:
                subdirs = [e.path for e in entries if e.is_dir(follow_symlinks=False) and not e.name.startswith(MARK)]
        except OSError as exc:
            log.debug("cannot list %s while looking for subvolumes: %s", directory, exc)
            continue
        for sub in subdirs:
            try:
                info = os.lstat(sub)
            except OSError:
                continue
            if info.st_dev == device:
                stack.append((sub, device))
            elif sub not in mount_points and info.st_ino == SUBVOLUME_INODE:
                found.append(sub)
                stack.append((sub, info.st_dev))
    return sorted(found, key=lambda p: (p.count("/"), p))


def leftovers(subvolume: str) -> list[str]:
    """Snapshots a killed run left in ``subvolume``: our name, and the root of a subvolume."""
    found: list[str] = []
    try:
        with os.scandir(subvolume) as entries:
            for entry in entries:
                if entry.name.startswith(MARK) and entry.is_dir(follow_symlinks=False):
                    if os.lstat(entry.path).st_ino == SUBVOLUME_INODE:
                        found.append(entry.path)
    except OSError as exc:
        log.debug("cannot list %s for leftover snapshots: %s", subvolume, exc)
    return sorted(found)


def view_prefix(
    *, unshare: str, python: str, path: str, snapshot: str, carried: Sequence[tuple[str, str, bool]]
) -> tuple[str, ...]:
    """The argv prefix that runs a command with ``snapshot`` at ``path`` in a private mount namespace (pure).

    ``carried``: (what, its place inside the snapshot, required), outer first.
    """
    argv: list[str] = [unshare, "--mount", "--propagation", "private", "--", python, "-I", "-m", VIEW_MODULE]
    for source, target, required in carried:
        argv += ["--carry" if required else "--carry-if-present", source, target]
    argv += ["--root", snapshot] if path == "/" else ["--over", snapshot, path]
    argv.append("--")
    return tuple(argv)


def _inside(root: str, path: str) -> str:
    """``path`` (below ``root``) at the same place below ``snapshot``'s root: its relative part."""
    return posixpath.relpath(path, root)


@dataclass(frozen=True)
class FrozenSource:
    """A :class:`PathSource` read from read-only btrfs snapshots when it is a subvolume (``freeze``)."""

    live: PathSource
    runner: Runner
    freeze: str = "auto"
    btrfs: str = "/bin/btrfs"
    unshare: str = "/usr/bin/unshare"
    warn: Callable[[str], None] = log.warning
    python: str = sys.executable

    @property
    def path(self) -> str:
        return self.live.path

    def _subvolume(self) -> bool:
        return self.freeze != "never" and is_subvolume(self.path, read_mountinfo())

    def check(self, repository: str) -> None:
        self.live.check(repository)
        if self.freeze == "never":
            return
        subvolume = self._subvolume()
        if self.freeze == "always" and not subvolume:
            raise UsageError(
                f'source {self.path} is not a btrfs subvolume, but freeze = "always": '
                'make it one, or set freeze = "auto" to back it up live',
                step="prepare",
            )
        if subvolume:
            repo = os.path.realpath(repository)
            if repo.startswith(os.path.realpath(self.path).rstrip("/") + "/") and _same_device(repo, self.path):
                raise UsageError(
                    f"the repository {repository} lies in the btrfs subvolume {self.path}, which is backed up frozen "
                    '(read-only): put the repository on another filesystem, or set freeze = "never"',
                    step="prepare",
                )

    @contextlib.contextmanager
    def opened(self, repository: str) -> Iterator[Tree]:
        with self.live.opened(repository) as tree:
            if not self._subvolume():
                yield replace(tree, record={**tree.record, "freeze": self.freeze, "frozen": False})
                return
            if self.runner.dry_run:
                log.info("would freeze %s with a read-only btrfs snapshot", self.path)
                yield replace(tree, record={**tree.record, "freeze": self.freeze, "frozen": False, "would_freeze": True})
                return
            with contextlib.ExitStack() as stack:
                try:
                    frozen = self._frozen(tree, stack)
                except CommandError as exc:
                    if self.freeze == "always":
                        raise
                    # "auto" freezes what can be frozen: a read-only filesystem (a read-only root) is read live.
                    stack.close()
                    self.warn(f"{self.path} could not be frozen ({exc.message}): it is backed up live")
                    frozen = replace(tree, record={**tree.record, "freeze": self.freeze, "frozen": False,
                                                   "freeze_failed": exc.message})
                yield frozen

    def _frozen(self, tree: Tree, stack: contextlib.ExitStack) -> Tree:
        entries = read_mountinfo()
        root = os.path.realpath(self.path)
        mount_points = frozenset(entry.mount_point for entry in entries)
        nested = [] if self.live.one_file_system else nested_subvolumes(root, mount_points)
        subvolumes = [root, *nested]
        for subvolume in subvolumes:
            for leftover in leftovers(subvolume):
                self.warn(f"removing {leftover}, a snapshot an interrupted backup left behind")
                self._delete(leftover)
        token = f"{MARK}{os.getpid()}-{dt.datetime.now().strftime('%Y%m%dT%H%M%S%f')}"
        snapshots: dict[str, str] = {}
        for subvolume in subvolumes:
            snapshot = os.path.join(subvolume, token)
            self.runner.run(
                (self.btrfs, "subvolume", "snapshot", "-r", subvolume, snapshot), step="transfer"
            )
            stack.callback(self._delete_at_end, snapshot)
            snapshots[subvolume] = snapshot
        top = snapshots[root]
        carried: list[tuple[str, str, bool]] = [
            (snapshots[sub], os.path.join(top, _inside(root, sub)), True) for sub in nested
        ]
        # Every filesystem mounted below the source (the repository's among them) stays where it is.
        for point in skipped_mount_points(root, mount_points, lambda _point: False):
            carried.append((point, os.path.join(top, _inside(root, point)), False))
        carried.sort(key=lambda item: item[1].count("/"))
        prefix = view_prefix(unshare=self.unshare, python=self.python, path=root, snapshot=top, carried=carried)
        own = tuple(
            f"--exclude=/{posixpath.join(_inside(root, sub), MARK)}*" if sub != root else f"--exclude=/{MARK}*"
            for sub in subvolumes
        )
        return replace(
            tree,
            command_prefix=prefix + tree.command_prefix,
            filter_rules=own + tree.filter_rules,
            record={
                **tree.record,
                "freeze": self.freeze,
                "frozen": True,
                "frozen_subvolumes": subvolumes,
                "frozen_at": dt.datetime.now().astimezone().isoformat(timespec="milliseconds"),
            },
        )

    def _delete(self, snapshot: str) -> None:
        self.runner.run((self.btrfs, "subvolume", "delete", snapshot), step="transfer")

    def _delete_at_end(self, snapshot: str) -> None:
        """Delete one snapshot; a failure is a warning (the next run deletes it), never hiding the transfer's own result."""
        try:
            self._delete(snapshot)
        except Exception as exc:  # noqa: BLE001 - reported, and the next run removes the leftover
            self.warn(f"the read-only snapshot {snapshot} could not be deleted ({exc}): the next backup removes it")


def _same_device(a: str, b: str) -> bool:
    """``a`` (or, while it does not exist yet, the nearest directory above it) lies on ``b``'s filesystem."""
    while not os.path.lexists(a) and a != "/":
        a = os.path.dirname(a)
    try:
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return False
