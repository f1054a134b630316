"""Reading snapshots back and checking them against their manifests.

Each distinct inode is read once, however many snapshots share it, and a
damaged one is reported once with every snapshot path that holds it: a hard
link is one file on the disk, and a flipped bit in it damages every snapshot
that links to it. A manifest that does not match its own checksum is
reported as a corrupted manifest, and its snapshot's files are not judged
against it. Snapshots are processed one at a time, so memory follows the
size of one snapshot, not of the history.
"""

from __future__ import annotations

import difflib
import logging
import os
import stat
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from agent.repository import manifest as manifests
from agent.core.commands import Runner
from agent.core.errors import CommandError, CorruptManifestError, UsageError
from agent.repository.store import Repository

log = logging.getLogger(__name__)

# Problem kinds, worst first.
CORRUPTED_MANIFEST = "corrupted-manifest"
MISSING_MANIFEST = "missing-manifest"
DAMAGED = "damaged"
CHANGED = "changed"  # type, mode, owner or link target differ from the manifest's (format 2)
UNREADABLE = "unreadable"
MISSING = "missing"
UNLISTED = "not-in-manifest"
KINDS = (CORRUPTED_MANIFEST, MISSING_MANIFEST, DAMAGED, CHANGED, UNREADABLE, MISSING, UNLISTED)


@dataclass(frozen=True)
class Location:
    snapshot: str
    path: bytes


@dataclass
class Problem:
    """One thing wrong; ``locations`` names every snapshot path it touches."""

    kind: str
    locations: list[Location]
    detail: str
    expected: str | None = None
    actual: str | None = None
    expected_size: int | None = None
    size: int | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "locations": [{"snapshot": where.snapshot, "path": os.fsdecode(where.path)} for where in self.locations],
            "detail": self.detail,
            "expected": self.expected,
            "actual": self.actual,
            "expected_size": self.expected_size,
            "size": self.size,
        }


@dataclass
class Progress:
    """How far a run is, for a progress line."""

    snapshot: str = ""
    index: int = 0
    snapshots: int = 0
    files: int = 0
    bytes: int = 0
    bytes_total: int = 0  # of this snapshot's files still to read, as the manifest gives their sizes


@dataclass
class Report:
    repository: str
    checked: list[str] = field(default_factory=list)
    unchecked: dict[str, str] = field(default_factory=dict)  # snapshot -> why it could not be checked
    problems: list[Problem] = field(default_factory=list)
    files: int = 0  # snapshot paths compared with a manifest
    inodes: int = 0  # distinct files read
    bytes: int = 0  # bytes read
    seconds: float = 0.0

    @property
    def intact(self) -> bool:
        """Nothing wrong was found in what was checked, and something was: snapshots that could not be
        checked at all (no manifest) prove nothing, so a run that checked none of them is not intact."""
        return not self.problems and (bool(self.checked) or not self.unchecked)

    @property
    def unverified(self) -> bool:
        """Nothing wrong was found, but no snapshot could be checked."""
        return not self.problems and not self.intact

    def as_json(self) -> dict[str, Any]:
        return {
            "repository": self.repository,
            "intact": self.intact,
            "checked": self.checked,
            "unchecked": self.unchecked,
            "files": self.files,
            "read": {"files": self.inodes, "bytes": self.bytes},
            "duration": round(self.seconds, 3),
            "problems": [problem.as_json() for problem in self.problems],
        }


def shown(path: bytes) -> str:
    """A path on one line for people: backslashes, newlines and undecodable bytes escaped."""
    return path.replace(b"\\", b"\\\\").replace(b"\n", b"\\n").decode("utf-8", "backslashreplace")


def _where(locations: list[Location]) -> str:
    paths = {where.path for where in locations}
    if len(paths) == 1:
        names = ", ".join(where.snapshot for where in locations)
        count = f"{len(locations)} snapshots: " if len(locations) > 1 else ""
        return f"{shown(locations[0].path)} (in {count}{names})"
    return "; ".join(f"{shown(where.path)} (in {where.snapshot})" for where in locations)


def describe(problem: Problem) -> str:
    """One line per problem (pure)."""
    if problem.kind in (CORRUPTED_MANIFEST, MISSING_MANIFEST):
        return f"{problem.kind}: {problem.locations[0].snapshot}: {problem.detail}"
    return f"{problem.kind}: {_where(problem.locations)}: {problem.detail}"


def summary(report: Report) -> str:
    """The first line of the human report (pure)."""
    checked = f"{len(report.checked)} snapshot{'s' if len(report.checked) != 1 else ''}"
    read = f"{report.files} files ({report.inodes} read, {report.bytes / (1 << 20):.1f} MiB) in {report.seconds:.1f} s"
    unchecked = f"; not checked: {', '.join(f'{n} ({why})' for n, why in report.unchecked.items())}" if report.unchecked else ""
    if report.intact:
        return f"intact: {checked}, {read}{unchecked}"
    if report.unverified:
        return f"NOT VERIFIED: no snapshot could be checked{unchecked}"
    counts = ", ".join(
        f"{sum(1 for p in report.problems if p.kind == kind)} {kind}" for kind in KINDS if any(p.kind == kind for p in report.problems)
    )
    return f"DAMAGE FOUND in {report.repository}: {counts}; {checked}, {read}{unchecked}"


def choose(names: list[str], wanted: str | None, every: bool) -> list[str]:
    """The snapshots to check: all, the one named, or the latest (pure).

    An unknown name is refused with the nearest existing names, so a typo
    in a timestamp is easy to fix.
    """
    if every:
        if wanted is not None:
            raise UsageError(f"give either SNAPSHOT ({wanted}) or --all, not both")
        return list(names)
    if wanted is None or wanted == "latest":
        return names[-1:]
    if wanted in names:
        return [wanted]
    nearest = difflib.get_close_matches(wanted, names, n=3, cutoff=0.0)
    hint = f"nearest: {', '.join(nearest)}" if nearest else "the repository holds no snapshot yet"
    raise UsageError(f"no snapshot named {wanted!r}: {hint} (backup-agent list shows them all)")


def read_gently(ionice: str, nice: int, runner: Runner) -> None:
    """Read at idle I/O priority (and the configured CPU niceness), as rotation's rm does.

    verify reads in this process, so it lowers its own priority, before any
    thread exists (threads inherit it): ``ionice -c3 -p PID`` through the
    runner, like every other program run.
    """
    try:
        runner.run((ionice, "-c", "3", "-p", str(os.getpid())), step="verify")
    except CommandError as exc:
        log.warning("reading at normal I/O priority: %s", exc.message)
    if nice > 0:
        os.setpriority(os.PRIO_PROCESS, 0, max(nice, os.getpriority(os.PRIO_PROCESS, 0)))


# -- the run -------------------------------------------------------------------------


@dataclass
class _Read:
    """What one inode holds now: digest and size, or why it could not be read."""

    digest: str | None
    size: int
    error: str | None = None


def _load_manifest(repo: Repository, name: str, report: Report) -> manifests.Manifest | None:
    """The snapshot's manifest, or None with the reason in the report."""
    metadata = repo.read_metadata(name)
    recorded = (metadata or {}).get("manifest")
    path = repo.manifest_path(name)
    try:
        loaded = manifests.load(path)
    except FileNotFoundError:
        if isinstance(recorded, dict) and recorded.get("digest"):
            report.problems.append(
                Problem(MISSING_MANIFEST, [Location(name, b"")], f"{path} is gone; the metadata says it was written")
            )
        elif isinstance(recorded, dict) and recorded.get("error"):
            report.unchecked[name] = f"no manifest: {recorded['error']}"
        elif metadata is None:
            # Every snapshot gets metadata: without it nothing says whether a manifest was written.
            report.unchecked[name] = "no manifest, and no metadata to say whether one was written"
        else:
            report.unchecked[name] = "no manifest: made before manifests existed"
        return None
    except PermissionError:
        # Manifests are root's alone (they name every file, agent.repository.manifest.record): not damage.
        report.unchecked[name] = "its manifest is readable by root only: run verify as root (sudo backup-agent verify)"
        return None
    except CorruptManifestError as exc:
        report.problems.append(Problem(CORRUPTED_MANIFEST, [Location(name, b"")], exc.message))
        return None
    except OSError as exc:
        report.problems.append(Problem(CORRUPTED_MANIFEST, [Location(name, b"")], f"{path}: cannot be read: {exc.strerror}"))
        return None
    if isinstance(recorded, dict) and recorded.get("digest") not in (None, loaded.digest):
        report.problems.append(
            Problem(CORRUPTED_MANIFEST, [Location(name, b"")], f"{path} is not the manifest its metadata recorded")
        )
        return None
    return loaded


def verify(
    repo: Repository,
    names: list[str],
    *,
    on_progress: Callable[[Progress], None] | None = None,
) -> Report:
    """Check ``names`` against their manifests; every problem goes into the report."""
    started = time.monotonic()
    report = Report(repo.root)
    # device -> inode -> what it holds now, across the snapshots checked: one
    # device for hard-linked snapshots, one per snapshot for btrfs subvolumes,
    # whose inode numbers repeat with other contents (agent.repository.versions).
    by_device: dict[int, dict[int, _Read]] = {}
    # (device, inode) -> (expected digest, expected size, where) for every snapshot path that disagrees
    bad: dict[tuple[int, int], list[tuple[str, int, Location]]] = {}
    progress = Progress(snapshots=len(names))
    for index, name in enumerate(names):
        progress.snapshot, progress.index = name, index + 1
        loaded = _load_manifest(repo, name, report)
        if loaded is None:
            continue
        root = os.fsencode(repo.snapshot_path(name))
        try:
            device = os.lstat(root).st_dev
        except OSError:
            report.unchecked[name] = "deleted while it was being verified"
            continue
        digests = by_device.setdefault(device, {})
        unlistable: list[tuple[bytes, OSError]] = []
        others: list[tuple[bytes, os.DirEntry[bytes]]] = []
        present = dict(manifests.walk_files(root, unlistable, others if loaded.attributes else None))
        if unlistable and not os.path.isdir(root):
            # Rotation deleted it while this ran (a backup may run beside verify).
            report.unchecked[name] = "deleted while it was being verified"
            continue
        found = [
            Problem(UNREADABLE, [Location(name, rel)], f"cannot list this directory: {exc.strerror}; nothing below it was checked")
            for rel, exc in unlistable
        ]
        hidden = _below(rel for rel, _ in unlistable)
        listed: set[bytes] = set()
        to_read: dict[int, bytes] = {}
        for entry in loaded.entries:
            listed.add(entry.path)
            if hidden(entry.path):
                continue
            inode = present.get(entry.path)
            if inode is None:
                what = "not in the snapshot" if not os.path.lexists(root + b"/" + entry.path) else "no longer a regular file"
                found.append(Problem(MISSING, [Location(name, entry.path)], what, entry.digest, None, entry.size))
            elif inode not in digests and inode not in to_read:
                to_read[inode] = entry.path
        progress.bytes_total = progress.bytes + sum(
            entry.size for entry in loaded.entries if present.get(entry.path) in to_read
        )
        for inode, read in _read_all(root, to_read, loaded.algorithm):
            digests[inode] = read
            report.inodes += 1
            report.bytes += digests[inode].size
            progress.files += 1
            progress.bytes += digests[inode].size
            if on_progress is not None:
                on_progress(progress)
        if not os.path.isdir(root):
            report.unchecked[name] = "deleted while it was being verified"
            continue
        for entry in loaded.entries:
            inode = present.get(entry.path)
            if inode is None:
                continue
            report.files += 1
            if digests[inode].digest != entry.digest:
                bad.setdefault((device, inode), []).append((entry.digest, entry.size, Location(name, entry.path)))
        if loaded.attributes:
            found += _changed(name, root, loaded.attributes, hidden)
            listed.update(attributes.path for attributes in loaded.attributes)
        for path in sorted((set(present) | {rel for rel, _ in others}) - listed):
            found.append(
                Problem(UNLISTED, [Location(name, path)], "in the snapshot but not in its manifest: nothing to check it against")
            )
        report.problems += found
        report.checked.append(name)
    if bad:
        _add_sharers(repo, names, bad)
    for (device, inode), places in sorted(bad.items(), key=lambda item: item[1][0][2].path):
        now = by_device[device][inode]
        expected, expected_size, _ = places[0]
        locations = [where for _, _, where in places]
        if now.error is not None:
            report.problems.append(Problem(UNREADABLE, locations, f"cannot be read: {now.error}", expected, None, expected_size))
            continue
        if now.size != expected_size:
            detail = f"size {now.size}, was {expected_size}" + (" (truncated)" if now.size < expected_size else "")
        else:
            detail = "content differs from the checksum recorded when it was backed up"
        report.problems.append(Problem(DAMAGED, locations, detail, expected, now.digest, expected_size, now.size))
    report.problems.sort(key=lambda p: KINDS.index(p.kind))
    report.seconds = time.monotonic() - started
    return report


def _changed(
    name: str, root: bytes, recorded: Iterable[manifests.Attributes], hidden: Callable[[bytes], bool]
) -> list[Problem]:
    """Entries whose type, mode, owner or link target is not what the manifest recorded (one lstat each).

    A regular file that is gone or no longer one is reported by the content
    check already (missing); its size and contents too (damaged).
    """
    found: list[Problem] = []
    for was in recorded:
        if hidden(was.path):
            continue
        try:
            info = os.lstat(root + b"/" + was.path)
        except (FileNotFoundError, NotADirectoryError):
            if was.type != "f":
                found.append(Problem(MISSING, [Location(name, was.path)], f"not in the snapshot (was {manifests.TYPE_NAMES[was.type]})"))
            continue
        except OSError as exc:
            found.append(Problem(UNREADABLE, [Location(name, was.path)], f"cannot be examined: {exc.strerror}"))
            continue
        kind = manifests.TYPES.get(stat.S_IFMT(info.st_mode), "?")
        differences: list[str] = []
        if kind != was.type:
            if was.type != "f":
                differences.append(f"{manifests.TYPE_NAMES.get(kind, 'unknown')}, was {manifests.TYPE_NAMES[was.type]}")
        else:
            if stat.S_IMODE(info.st_mode) != was.mode:
                differences.append(f"mode {stat.S_IMODE(info.st_mode):04o}, was {was.mode:04o}")
            if (info.st_uid, info.st_gid) != (was.uid, was.gid):
                differences.append(f"owner {info.st_uid}:{info.st_gid}, was {was.uid}:{was.gid}")
            if kind == "l":
                target = os.readlink(root + b"/" + was.path)
                if target != was.target:
                    differences.append(f"points to {shown(target)}, was {shown(was.target or b'')}")
            elif kind in ("c", "b") and info.st_size != was.size:
                differences.append(f"size {info.st_size}, was {was.size}")
        if differences:
            found.append(Problem(CHANGED, [Location(name, was.path)], "; ".join(differences)))
    return found


AHEAD = 16  # files opened, and their reading asked of the kernel, before they are hashed


def _read_all(root: bytes, to_read: dict[int, bytes], algorithm: str) -> Iterator[tuple[int, _Read]]:
    """What each inode holds now, in inode order (close to disk order on ext4).

    The next files are opened a little ahead and the kernel is asked to read
    them (POSIX_FADV_WILLNEED), so the disk works while this process hashes:
    with a cold cache that took a 50,000-file verify from 5.1 s to 3.1 s
    here. Threads were measured slower (README, "Benchmarks").
    """
    order = sorted(to_read)
    ahead: deque[tuple[int, int | OSError]] = deque()
    buffer = bytearray(manifests.READ_SIZE)
    following = 0
    try:
        for _ in order:
            while following < len(order) and len(ahead) < AHEAD:
                inode = order[following]
                following += 1
                try:
                    fd = manifests.open_to_hash(root + b"/" + to_read[inode])
                except OSError as exc:
                    ahead.append((inode, exc))
                    continue
                ahead.append((inode, fd))
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            inode, opened = ahead.popleft()
            if isinstance(opened, OSError):
                yield inode, _Read(None, 0, opened.strerror or str(opened))
                continue
            try:
                digest, size = manifests.hash_fd(opened, algorithm, buffer)
            except OSError as exc:
                yield inode, _Read(None, 0, exc.strerror or str(exc))
                continue
            finally:
                os.close(opened)
            yield inode, _Read(digest, size)
    finally:
        for _, opened in ahead:
            if not isinstance(opened, OSError):
                os.close(opened)


def _below(directories: Iterable[bytes]) -> Callable[[bytes], bool]:
    """Whether a path lies below one of ``directories`` (relative; ``b""`` is the snapshot itself)."""
    prefixes = tuple(directory + b"/" for directory in directories)
    if b"/" in prefixes:
        return lambda path: True
    return lambda path: path.startswith(prefixes)


def _add_sharers(repo: Repository, checked: list[str], bad: dict[tuple[int, int], list[tuple[str, int, Location]]]) -> None:
    """Name the snapshots not checked in this run that hold a damaged inode too.

    Their manifests record each file's inode; a path still carrying that
    inode (lstat) on the same device is the same damaged file.
    """
    inodes = {inode for _, inode in bad}
    for name in repo.snapshot_names():
        if name in checked:
            continue
        try:
            other = manifests.load(repo.manifest_path(name))
        except (OSError, CorruptManifestError) as exc:
            log.debug("cannot look for shared damaged files in %s: %s", name, exc)
            continue
        root = os.fsencode(repo.snapshot_path(name))
        for entry in other.entries:
            if entry.inode not in inodes:
                continue
            try:
                info = os.lstat(root + b"/" + entry.path)
            except OSError:
                continue
            places = bad.get((info.st_dev, entry.inode)) if info.st_ino == entry.inode else None
            if places is None:
                continue
            places.append((entry.digest, entry.size, Location(name, entry.path)))
    for places in bad.values():
        places.sort(key=lambda place: (place[2].snapshot, place[2].path))
