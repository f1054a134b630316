"""The on-disk repository: marker, snapshots/, metadata/, latest, and deletion.

Layout (README, "The repository"):

    <repository>/
      .backup-agent.toml         marker: format, random id, host, created
      .lock                      the per-repository flock
      snapshots/<name>/          complete snapshots, never written again
      snapshots/<name>.in-progress/   unfinished transfers: never listed
      metadata/<name>.json       each snapshot's metadata, apart from backed-up names
      metadata/<name>.manifest   each snapshot's content checksums (agent/repository/manifest.py)
      latest -> snapshots/<name> replaced atomically
      .trash/                    snapshots being deleted (out of the listed names)

Only this module knows these names.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
import socket
import stat
import uuid
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from agent.core.commands import Runner
from agent.core.errors import RepositoryError
from agent.core.files import syncfs, write_atomic
from agent.policy.rotation import format_snapshot_name, parse_snapshot_name

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
# The ways a repository makes its snapshots (the marker's layout; agent.engine.layouts).
LAYOUTS = ("links", "btrfs")

# Bounds on what is read from a repository (it lives on a removable disk
# anyone may have written): a file larger than this is not read at all.
MAX_MARKER_BYTES = 64 * 1024
MAX_METADATA_BYTES = 4 * 1024 * 1024
# Leftovers of a write killed half-way (files.write_atomic's temporary names).
_TEMPORARY = re.compile(r"^\..+\.tmp$")
_LATEST_TEMPORARY = re.compile(r"^latest\.new-\d+$")
_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

_MARKER_LINE = re.compile(r'^(\w+)\s*=\s*(?:"([^"\\]*)"|(\d+))\s*$')


@dataclass(frozen=True)
class Marker:
    """What identifies a repository (and, later, proves a disk is ours)."""

    version: int
    id: str
    host: str
    created: str
    # How snapshots are made (agent.engine.layouts): "links" (hard links) or
    # "btrfs" (subvolumes). A marker without it is a links repository.
    layout: str = "links"

    def render(self) -> str:
        return (
            "# backup-agent repository marker: do not edit or copy to another disk\n"
            f"version = {self.version}\n"
            f'id = "{self.id}"\n'
            f'host = "{_toml_safe(self.host)}"\n'
            f'created = "{self.created}"\n'
            + (f'layout = "{self.layout}"\n' if self.layout != "links" else "")
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
        marker = Marker(version, values["id"], values["host"], values["created"], values.get("layout", "links"))
    except (KeyError, ValueError):
        raise RepositoryError(f"{path}: incomplete repository marker (needs version, id, host, created)", step="prepare") from None
    if marker.layout not in LAYOUTS:
        raise RepositoryError(
            f"{path}: layout {marker.layout!r} is not one this version knows ({', '.join(LAYOUTS)}); upgrade backup-agent",
            step="prepare",
        )
    if version != FORMAT_VERSION:
        raise RepositoryError(
            f"{path}: repository format {version} is not supported by this version (format {FORMAT_VERSION}); upgrade backup-agent",
            step="prepare",
        )
    return marker


def _kind(info: os.stat_result) -> str:
    """What an entry is, in words for an error message (pure)."""
    if stat.S_ISLNK(info.st_mode):
        return "a symbolic link"
    if stat.S_ISDIR(info.st_mode):
        return "a directory"
    if stat.S_ISREG(info.st_mode):
        return "a file"
    return "a special file"


def classify(path: str) -> str:
    """'missing', 'empty', 'repository' or 'foreign' (a non-empty non-repository)."""
    if not os.path.lexists(path):
        return "missing"
    if not os.path.isdir(path) or os.path.islink(path):
        return "foreign"
    try:
        marker = os.lstat(os.path.join(path, MARKER))
    except FileNotFoundError:
        marker = None
    if marker is not None and stat.S_ISREG(marker.st_mode):
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
            raw = read_bounded(root, MARKER, MAX_MARKER_BYTES)
            marker = parse_marker(raw.decode("utf-8"), marker_path)
        except (OSError, UnicodeDecodeError) as exc:
            raise RepositoryError(f"{marker_path}: cannot read the repository marker: {exc}", step="prepare") from None
        repository = cls(root, marker)
        repository.check_layout()
        return repository

    @classmethod
    def create(cls, root: str, *, host: str | None = None, layout: str = "links") -> "Repository":
        """Create a repository in a missing or empty directory; ``layout`` is recorded in its marker."""
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
            layout,
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

    # -- the layout ----------------------------------------------------------

    def check_layout(self) -> None:
        """Refuse a repository whose snapshots/, metadata/ or .trash is not a real directory, or whose latest is not a link.

        Nothing inside a repository is followed (README, "The repository"):
        a symbolic link there could send a deletion, a rename or a read
        anywhere on the system, so it is named and refused, never used.
        """
        for sub in (SNAPSHOTS, METADATA, TRASH):
            path = os.path.join(self.root, sub)
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                continue
            if not stat.S_ISDIR(info.st_mode):
                found = _kind(info)
                if stat.S_ISLNK(info.st_mode):
                    found += f" (to {os.readlink(path)!r})"
                raise RepositoryError(
                    f"{path} is {found}, not a directory: backup-agent follows no link inside a repository "
                    f"and uses nothing in this one until {sub} is a real directory again (move the link away)",
                    step="prepare",
                )
        try:
            latest = os.lstat(self.latest_link)
        except FileNotFoundError:
            return
        if not stat.S_ISLNK(latest.st_mode):
            # It could not be replaced by the next snapshot's link (a rename does not replace a directory).
            raise RepositoryError(
                f"{self.latest_link} is {_kind(latest)}, not the symbolic link backup-agent keeps there: "
                "move it away (the next backup makes the link again)",
                step="prepare",
            )

    @contextlib.contextmanager
    def directory(self, sub: str | None = None, *, create: bool = False) -> Iterator[int | None]:
        """A descriptor on the repository (``sub`` None) or one of its directories, never through a link.

        Every rename and deletion inside the repository goes through such
        descriptors, so a link put in place after :meth:`check_layout` is
        refused by the kernel (O_NOFOLLOW) instead of followed. None when
        ``sub`` does not exist (and ``create`` is false).
        """
        root = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if sub is None:
                yield root
                return
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(sub, 0o700 if sub == TRASH else 0o755, dir_fd=root)
            try:
                fd = os.open(sub, _DIRECTORY_FLAGS, dir_fd=root)
            except FileNotFoundError:
                yield None
                return
            except (NotADirectoryError, OSError) as exc:
                self.check_layout()  # names what was found
                raise RepositoryError(f"{os.path.join(self.root, sub)}: {exc.strerror}", step="prepare") from None
            try:
                yield fd
            finally:
                os.close(fd)
        finally:
            os.close(root)

    # -- reading -------------------------------------------------------------

    def _listing(self) -> list[tuple[str, bool]]:
        """(name, is a real directory) of every entry of snapshots/; links are never real directories."""
        with self.directory(SNAPSHOTS) as fd:
            if fd is None:
                return []
            with os.scandir(fd) as entries:
                return [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries]

    def snapshot_names(self) -> list[str]:
        """Complete snapshots, oldest first: real directories with a snapshot's name (a link is not one)."""
        names = [name for name, real in self._listing() if real and parse_snapshot_name(name) is not None]
        return sorted(names, key=snapshot_sort_key)

    def foreign_names(self) -> list[str]:
        """Entries of snapshots/ that are neither snapshots nor in-progress transfers (links included)."""
        return sorted(
            name
            for name, real in self._listing()
            if not real
            or (parse_snapshot_name(name) is None and parse_snapshot_name(name.removesuffix(IN_PROGRESS)) is None)
        )

    def in_progress_names(self) -> list[str]:
        """Names (without suffix) of unfinished transfers (real directories), oldest first."""
        names = [
            name[: -len(IN_PROGRESS)]
            for name, real in self._listing()
            if real and name.endswith(IN_PROGRESS) and parse_snapshot_name(name[: -len(IN_PROGRESS)]) is not None
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
            data = parse_json(read_bounded(self.metadata_dir, name + ".json", MAX_METADATA_BYTES), "metadata")
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("unreadable metadata %s: %s", path, exc)
            return None
        if not isinstance(data, dict):
            log.warning("unreadable metadata %s: not a JSON object", path)
            return None
        return data

    def latest_name(self) -> str | None:
        """The newest complete snapshot: what ``latest`` points to when that is snapshots/<a snapshot>,
        else the newest by name (``latest`` is only a pointer; it is never followed)."""
        try:
            target = os.readlink(self.latest_link)
        except OSError:
            target = ""
        name = target[len(SNAPSHOTS) + 1 :].rstrip("/") if target.startswith(SNAPSHOTS + "/") else ""
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
        # No fsync of its own: complete() syncs the whole filesystem once
        # (the snapshot's files, this file and the manifest) before the
        # rename, which costs one journal commit instead of one per file.
        write_atomic(
            self.metadata_path(name), (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode(), durable=False
        )

    def complete(self, name: str) -> None:
        """Turn ``<name>.in-progress`` into ``<name>`` (atomic rename), then move ``latest``; durable on return.

        Durable before visible (README, "The repository"): one syncfs puts
        every file of the snapshot, its metadata and manifest on the disk
        before the rename names it complete; an fsync of snapshots/ and of
        the repository makes the rename and ``latest`` durable before the
        caller reports success or rotation deletes anything.
        """
        with self.directory(SNAPSHOTS) as snapshots, self.directory() as root:
            if snapshots is None or root is None:
                raise RepositoryError(f"{self.snapshots_dir} is gone", step="snapshot")
            syncfs(snapshots)
            os.rename(name + IN_PROGRESS, name, src_dir_fd=snapshots, dst_dir_fd=snapshots)
            self._link_latest(root, name)
            os.fsync(snapshots)
            os.fsync(root)

    def set_latest(self, name: str) -> None:
        with self.directory() as root:
            if root is not None:
                self._link_latest(root, name)
                os.fsync(root)

    def _link_latest(self, root: int, name: str) -> None:
        temporary = f"{LATEST}.new-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary, dir_fd=root)
        os.symlink(os.path.join(SNAPSHOTS, name), temporary, dir_fd=root)
        os.replace(temporary, LATEST, src_dir_fd=root, dst_dir_fd=root)

    def remove_leftovers(self) -> list[str]:
        """Remove what a write killed half-way left: metadata/.*.tmp and latest.new-*; the names removed.

        Only regular files and links directly in those directories, each
        unlinked through the directory's descriptor (unlink never follows a
        link). Called with the repository's lock held, so no write is under way.
        """
        removed: list[str] = []
        for sub, pattern, kinds in ((METADATA, _TEMPORARY, (stat.S_ISREG,)), (None, _LATEST_TEMPORARY, (stat.S_ISLNK,))):
            with self.directory(sub) as fd:
                if fd is None:
                    continue
                for entry in os.listdir(fd):
                    if not pattern.match(entry):
                        continue
                    info = os.lstat(entry, dir_fd=fd)
                    if any(kind(info.st_mode) for kind in kinds):
                        os.unlink(entry, dir_fd=fd)
                        removed.append(os.path.join(sub or "", entry))
        for entry in removed:
            log.info("removed %s, left by an interrupted run", entry)
        return removed

    def discard(self, entries: Sequence[str], *, step: str) -> None:
        """Take entries of snapshots/ (names with any suffix) out of the listing, with their metadata.

        Each is renamed into .trash/, so a half-deleted tree never looks like
        a snapshot; its files are removed later by :meth:`empty_trash` (the
        cycle does that after it reported success, docs/ARCHITECTURE.md,
        rule 4), and what is in .trash/ is never listed, read or restored.
        """
        if not entries:
            return
        with self.directory(SNAPSHOTS) as snapshots, self.directory(TRASH, create=True) as trash:
            if snapshots is None or trash is None:
                raise RepositoryError(f"{self.snapshots_dir} is gone: nothing to delete", step=step)
            for entry in entries:
                # A unique name: a deletion killed half-way may have left the
                # same name in .trash/ (renaming onto it would fail). Both
                # directories are descriptors: no link is followed.
                os.rename(entry, f"{entry}.{uuid.uuid4().hex[:12]}", src_dir_fd=snapshots, dst_dir_fd=trash)
                log.info("deleting %s", entry)
        self.forget(entries)

    def forget(self, entries: Sequence[str]) -> None:
        """Remove the metadata and manifests of entries of snapshots/ (names with any suffix) that are gone."""
        with self.directory(METADATA) as metadata:
            for entry in entries if metadata is not None else ():
                name = entry.removesuffix(IN_PROGRESS)
                for with_it in (name + ".json", name + MANIFEST_SUFFIX):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(with_it, dir_fd=metadata)

    def trash_names(self) -> list[str]:
        """What .trash/ holds: deletions not finished yet (by this run, or one that was interrupted)."""
        with self.directory(TRASH) as trash:
            return [] if trash is None else sorted(os.listdir(trash))

    def empty_trash(self, runner: Runner, rm_argv: Sequence[str], *, step: str) -> list[str]:
        """Finish deletions (also those an interrupted run left in .trash/); the entries removed.

        rm is given the opened .trash itself (``/proc/self/fd/N``, the
        descriptor passed to it), never the path: a link put at .trash
        cannot send it elsewhere. Killed half-way, rm leaves the rest in
        .trash/, which the next call removes.
        """
        with self.directory(TRASH) as trash:
            if trash is None:
                return []
            leftovers = sorted(os.listdir(trash))
            if leftovers:
                log.info("emptying %s: %s", self.trash_dir, ", ".join(leftovers))
                runner.run(
                    (*rm_argv, "-rf", "--one-file-system", "--", *(f"/proc/self/fd/{trash}/{e}" for e in leftovers)),
                    step=step,
                    pass_fds=(trash,),
                )
            return leftovers


def read_bounded(directory: str, name: str, limit: int) -> bytes:
    """The bytes of ``directory/name``, a regular file of at most ``limit`` bytes, opened without following links.

    A link, a special file or a larger file is an OSError saying so: it is
    never read (a hostile repository cannot make a command read a device or
    fill the memory).
    """
    parent = os.open(directory, _DIRECTORY_FLAGS)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=parent)
    finally:
        os.close(parent)
    try:
        info = os.fstat(fd)
        path = os.path.join(directory, name)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{path} is {_kind(info)}, not a regular file")
        if info.st_size > limit:
            raise OSError(f"{path} holds {info.st_size} bytes, more than the {limit} such a file may hold")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read(limit + 1)[:limit]
    finally:
        os.close(fd)


def parse_json(raw: bytes, where: str) -> Any:
    """JSON from the repository; ValueError (never RecursionError) for anything malformed or nested too deep."""
    try:
        return json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise ValueError(f"nested too deeply to be read ({where})") from None


def free_space(path: str) -> tuple[int, int]:
    """Bytes available to root and total bytes of the filesystem holding ``path``."""
    info = os.statvfs(path)
    return info.f_bavail * info.f_frsize, info.f_blocks * info.f_frsize


