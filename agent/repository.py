"""The on-disk repository: marker, snapshots/, metadata/, latest, and deletion.

Layout (README, "The repository"):

    <repository>/
      .backup-agent.toml         marker: format, random id, host, created
      .lock                      the per-repository flock
      snapshots/<name>/          complete snapshots, never written again
      snapshots/<name>.in-progress/   unfinished transfers: never listed
      metadata/<name>.json       each snapshot's metadata, apart from backed-up names
      metadata/<name>.manifest   each snapshot's content checksums (agent/manifest.py)
      latest -> snapshots/<name> replaced atomically
      .trash/                    snapshots being deleted (out of the listed names)

Only this module knows these names.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import socket
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

from .commands import Runner
from .errors import RepositoryError
from .files import write_atomic
from .rotation import format_snapshot_name, parse_snapshot_name

log = logging.getLogger(__name__)

MARKER = ".backup-agent.toml"
FORMAT_VERSION = 1
IN_PROGRESS = ".in-progress"
SNAPSHOTS = "snapshots"
METADATA = "metadata"
TRASH = ".trash"
LATEST = "latest"
LOCK = ".lock"
MANIFEST_SUFFIX = ".manifest"

_MARKER_LINE = re.compile(r'^(\w+)\s*=\s*(?:"([^"\\]*)"|(\d+))\s*$')


@dataclass(frozen=True)
class Marker:
    """What identifies a repository (and, later, proves a disk is ours)."""

    version: int
    id: str
    host: str
    created: str

    def render(self) -> str:
        return (
            "# backup-agent repository marker: do not edit or copy to another disk\n"
            f"version = {self.version}\n"
            f'id = "{self.id}"\n'
            f'host = "{_toml_safe(self.host)}"\n'
            f'created = "{self.created}"\n'
        )


def _toml_safe(text: str) -> str:
    return re.sub(r'["\\\x00-\x1f]', "_", text)


def parse_marker(text: str, path: str) -> Marker:
    """Read the marker written by :meth:`Marker.render` (a strict TOML subset)."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _MARKER_LINE.match(line)
        if not match:
            raise RepositoryError(f"{path}: unreadable repository marker line {line[:60]!r}", step="prepare")
        values[match.group(1)] = match.group(2) if match.group(2) is not None else match.group(3)
    try:
        version = int(values["version"])
        marker = Marker(version, values["id"], values["host"], values["created"])
    except (KeyError, ValueError):
        raise RepositoryError(f"{path}: incomplete repository marker (needs version, id, host, created)", step="prepare") from None
    if version != FORMAT_VERSION:
        raise RepositoryError(
            f"{path}: repository format {version} is not supported by this version (format {FORMAT_VERSION}); upgrade backup-agent",
            step="prepare",
        )
    return marker


def classify(path: str) -> str:
    """'missing', 'empty', 'repository' or 'foreign' (a non-empty non-repository)."""
    if not os.path.lexists(path):
        return "missing"
    if not os.path.isdir(path) or os.path.islink(path):
        return "foreign"
    if os.path.isfile(os.path.join(path, MARKER)):
        return "repository"
    with os.scandir(path) as entries:
        for entry in entries:
            # lost+found comes with a new filesystem; a marker's temporary
            # file is what a create killed mid-way leaves.
            if entry.name != "lost+found" and not entry.name.startswith(MARKER + ".tmp-"):
                return "foreign"
    return "empty"


def snapshot_sort_key(name: str) -> tuple[dt.datetime, str]:
    moment = parse_snapshot_name(name)
    if moment is None:
        raise ValueError(f"not a snapshot name: {name!r}")
    return (moment, name)


def reserve_name(snapshots_dir: str, start: dt.datetime, *, create: bool) -> str:
    """Reserve ``<name>.in-progress`` with an exclusive mkdir; later second on a clash."""
    moment = start.replace(microsecond=0)
    for _ in range(120):
        name = format_snapshot_name(moment)
        taken = os.path.lexists(os.path.join(snapshots_dir, name))
        target = os.path.join(snapshots_dir, name + IN_PROGRESS)
        if not taken:
            if not create:
                if not os.path.lexists(target):
                    return name
            else:
                try:
                    os.mkdir(target, 0o755)
                    return name
                except FileExistsError:
                    pass
        moment += dt.timedelta(seconds=1)
    raise RepositoryError(f"no free snapshot name near {format_snapshot_name(start)} in {snapshots_dir}", step="snapshot")


class Repository:
    """A repository directory; every path inside it is derived here."""

    def __init__(self, root: str, marker: Marker) -> None:
        self.root = root
        self.marker = marker
        self.snapshots_dir = os.path.join(root, SNAPSHOTS)
        self.metadata_dir = os.path.join(root, METADATA)
        self.trash_dir = os.path.join(root, TRASH)
        self.latest_link = os.path.join(root, LATEST)
        self.lock_path = os.path.join(root, LOCK)

    # -- opening -----------------------------------------------------------

    @classmethod
    def open(cls, root: str) -> "Repository":
        """Open an existing repository; a clear error for anything else."""
        state = classify(root)
        if state == "missing":
            raise RepositoryError(f"{root} does not exist: give an existing repository", step="prepare")
        if state != "repository":
            raise RepositoryError(f"{root} is not a backup-agent repository (no {MARKER})", step="prepare")
        marker_path = os.path.join(root, MARKER)
        try:
            with open(marker_path, encoding="utf-8") as handle:
                marker = parse_marker(handle.read(), marker_path)
        except (OSError, UnicodeDecodeError) as exc:
            raise RepositoryError(f"{marker_path}: cannot read the repository marker: {exc}", step="prepare") from None
        return cls(root, marker)

    @classmethod
    def create(cls, root: str, *, host: str | None = None) -> "Repository":
        """Create a repository in a missing or empty directory."""
        state = classify(root)
        if state == "repository":
            return cls.open(root)
        if state == "foreign":
            raise RepositoryError(
                f"{root} is not empty and is not a backup-agent repository: "
                "give an empty or new directory as DESTINATION, or move its contents away",
                step="prepare",
            )
        os.makedirs(root, mode=0o755, exist_ok=True)
        marker = Marker(
            FORMAT_VERSION,
            uuid.uuid4().hex,
            host or socket.gethostname(),
            dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        )
        # The marker first: a create killed half-way leaves a repository
        # (or a directory classify() still calls empty), never a foreign one.
        write_atomic(os.path.join(root, MARKER), marker.render().encode(), prefix=MARKER + ".tmp-")
        for leftover in os.listdir(root):
            if leftover.startswith(MARKER + ".tmp-"):
                os.unlink(os.path.join(root, leftover))
        for sub in (SNAPSHOTS, METADATA):
            os.makedirs(os.path.join(root, sub), mode=0o755, exist_ok=True)
        log.info("created repository %s (id %s)", root, marker.id)
        return cls(root, marker)

    # -- reading -------------------------------------------------------------

    def _entries(self) -> list[str]:
        try:
            return os.listdir(self.snapshots_dir)
        except FileNotFoundError:
            return []

    def snapshot_names(self) -> list[str]:
        """Complete snapshots, oldest first. In-progress and foreign names excluded."""
        names = [
            name
            for name in self._entries()
            if parse_snapshot_name(name) is not None and os.path.isdir(os.path.join(self.snapshots_dir, name))
        ]
        return sorted(names, key=snapshot_sort_key)

    def foreign_names(self) -> list[str]:
        """Entries of snapshots/ that are neither snapshots nor in-progress transfers."""
        return sorted(
            name
            for name in self._entries()
            if parse_snapshot_name(name) is None and parse_snapshot_name(name.removesuffix(IN_PROGRESS)) is None
        )

    def in_progress_names(self) -> list[str]:
        """Names (without suffix) of unfinished transfers, oldest first."""
        names = [
            name[: -len(IN_PROGRESS)]
            for name in self._entries()
            if name.endswith(IN_PROGRESS) and parse_snapshot_name(name[: -len(IN_PROGRESS)]) is not None
        ]
        return sorted(names, key=snapshot_sort_key)

    def snapshot_path(self, name: str) -> str:
        return os.path.join(self.snapshots_dir, name)

    def in_progress_path(self, name: str) -> str:
        return os.path.join(self.snapshots_dir, name + IN_PROGRESS)

    def metadata_path(self, name: str) -> str:
        return os.path.join(self.metadata_dir, name + ".json")

    def manifest_path(self, name: str) -> str:
        return os.path.join(self.metadata_dir, name + MANIFEST_SUFFIX)

    def read_metadata(self, name: str) -> dict[str, Any] | None:
        """A snapshot's metadata, or None when missing or unreadable (logged)."""
        path = self.metadata_path(name)
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("unreadable metadata %s: %s", path, exc)
            return None
        return data if isinstance(data, dict) else None

    def latest_name(self) -> str | None:
        """The newest complete snapshot (what ``latest`` points to, if valid)."""
        try:
            target = os.readlink(self.latest_link)
        except OSError:
            target = ""
        name = os.path.basename(target.rstrip("/"))
        names = self.snapshot_names()
        if name in names:
            return name
        return names[-1] if names else None

    # -- writing -------------------------------------------------------------

    def reserve(self, start: dt.datetime) -> str:
        os.makedirs(self.snapshots_dir, mode=0o755, exist_ok=True)
        return reserve_name(self.snapshots_dir, start, create=True)

    def write_metadata(self, name: str, data: dict[str, Any]) -> None:
        os.makedirs(self.metadata_dir, mode=0o755, exist_ok=True)
        # No fsync: right after rsync, an fsync commits the filesystem's
        # whole journal (tens of thousands of new hard links), 5% of a
        # no-change backup. Journaled filesystems commit the links, this
        # file and the snapshot's rename in order, so a crash loses at most
        # the newest snapshot (its transfer is resumed); a disk is flushed
        # by its unmount before it is locked.
        write_atomic(
            self.metadata_path(name), (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode(), durable=False
        )

    def complete(self, name: str) -> None:
        """Turn ``<name>.in-progress`` into ``<name>`` (atomic rename), then move ``latest``."""
        os.rename(self.in_progress_path(name), self.snapshot_path(name))
        self.set_latest(name)

    def set_latest(self, name: str) -> None:
        temporary = f"{self.latest_link}.new-{os.getpid()}"
        if os.path.lexists(temporary):
            os.unlink(temporary)
        os.symlink(os.path.join(SNAPSHOTS, name), temporary)
        os.replace(temporary, self.latest_link)

    def discard(self, entries: Sequence[str], runner: Runner, rm_argv: Sequence[str], *, step: str) -> None:
        """Delete entries of snapshots/ (names with any suffix) and their metadata.

        Each is first renamed into .trash/, out of the listed names, so a
        half-deleted tree never looks like a snapshot; then removed with
        ``rm_argv`` (rm under ionice) through the runner.
        """
        if not entries:
            return
        os.makedirs(self.trash_dir, mode=0o700, exist_ok=True)
        for entry in entries:
            source = os.path.join(self.snapshots_dir, entry)
            # A unique name: a deletion killed half-way may have left the
            # same name in .trash/ (renaming onto it would fail).
            victim = os.path.join(self.trash_dir, f"{entry}.{uuid.uuid4().hex[:12]}")
            os.rename(source, victim)
            log.info("deleting %s", entry)
        for entry in entries:
            name = entry.removesuffix(IN_PROGRESS)
            for with_it in (self.metadata_path(name), self.manifest_path(name)):
                if os.path.exists(with_it):
                    os.unlink(with_it)
        self.empty_trash(runner, rm_argv, step=step)

    def empty_trash(self, runner: Runner, rm_argv: Sequence[str], *, step: str) -> None:
        """Finish deletions (also those an interrupted run left in .trash/)."""
        try:
            leftovers = sorted(os.listdir(self.trash_dir))
        except FileNotFoundError:
            return
        if leftovers:
            runner.run(
                (*rm_argv, "-rf", "--one-file-system", "--", *(os.path.join(self.trash_dir, e) for e in leftovers)),
                step=step,
            )


def free_space(path: str) -> tuple[int, int]:
    """Bytes available to root and total bytes of the filesystem holding ``path``."""
    info = os.statvfs(path)
    return info.f_bavail * info.f_frsize, info.f_blocks * info.f_frsize


