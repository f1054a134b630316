"""Reading the history a repository holds: where a path lies in each snapshot,
its versions, and what changed between two snapshots.

Hard links do the work (and in the btrfs layout, where a snapshot keeps
every inode number, the inode's change time: agent.repository.versions). A snapshot is made with ``rsync --link-dest``, so a
file that did not change is the previous snapshot's inode, and one that
changed in any way (content, mode, owner, times, ACLs, xattrs) is a new one:

- a file's **version** is its inode: the same inode in two snapshots is the
  same version, and nothing is read or compared;
- a **directory** is never hard-linked (each snapshot has its own), so its
  version is what it holds itself: its own mode and owner, and its entries
  (names, and for everything but subdirectories, their inodes). A new
  version starts when an entry is added, removed or replaced, or the mode or
  owner changes; what happens deeper down shows in the versions of the
  subdirectory, not here;
- **diff** walks both trees with ``os.scandir``, which gives each entry's
  inode and type from the directory itself: an entry with the same inode in
  both is unchanged without a single ``stat``; only entries whose inodes
  differ are looked at (and read, when their sizes and times agree).

Paths are the source's paths as they were backed up: each snapshot's
metadata records its source, so a backup of ``/`` holds ``/home/me/x`` at
``snapshots/<name>/home/me/x`` and a backup of ``/home`` at
``snapshots/<name>/me/x``. A snapshot of several sources holds each under
its own directory (agent.engine.source_set): :func:`narrow` gives, for one
path, each snapshot as the part that holds it, so everything below reads
one tree per snapshot either way. Nothing here follows a symbolic link inside a
snapshot: a link is a backed-up file, and points into the live system.
"""

from __future__ import annotations

import datetime as dt
import errno
import filecmp
import os
import posixpath
import stat
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from agent.core.errors import RepositoryError, UsageError
from agent.engine.source_set import covering, stored_parts
from agent.repository.store import Repository
from agent.repository.versions import same_version, shares_inodes


@dataclass(frozen=True)
class Snapshot:
    """A complete snapshot, with what its metadata says about it."""

    name: str
    path: str
    source: str
    partial: bool
    # Several sources: (live path, directory) of each; () for a snapshot of one source.
    parts: tuple[tuple[str, str], ...] = ()

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(source for source, _directory in self.parts) if self.parts else (self.source,)


def snapshots(repo: Repository) -> list[Snapshot]:
    """The repository's complete snapshots, oldest first. Without metadata, the source is taken as /."""
    found = []
    for name in repo.snapshot_names():
        metadata = repo.read_metadata(name) or {}
        source = metadata.get("source")
        parts = stored_parts(metadata)
        found.append(
            Snapshot(
                name=name,
                path=repo.snapshot_path(name),
                source=parts[0][0] if parts else (
                    posixpath.normpath(source) if isinstance(source, str) and source.startswith("/") else "/"
                ),
                partial=bool(metadata.get("partial")),
                parts=parts,
            )
        )
    return found


def narrow(history: Sequence[Snapshot], path: str) -> list[Snapshot]:
    """Each snapshot as the one tree that holds ``path``: a snapshot of several sources becomes the part
    whose source holds it (the longest such source path), stored under its directory."""
    out = []
    for snap in history:
        if not snap.parts:
            out.append(snap)
            continue
        source, directory = covering(snap.parts, path) or snap.parts[0]
        out.append(Snapshot(snap.name, os.path.join(snap.path, directory), source, snap.partial))
    return out


def part_pairs(a: Snapshot, b: Snapshot) -> list[tuple[str, str, str]]:
    """(source, tree in ``a``, tree in ``b``) for each source both snapshots hold; UsageError when they differ."""
    if a.sources != b.sources and sorted(a.sources) != sorted(b.sources):
        raise UsageError(
            f"{a.name} backs up {', '.join(a.sources)} and {b.name} backs up {', '.join(b.sources)}: "
            "they cannot be compared"
        )
    if not a.parts:
        return [(a.source, a.path, b.path)]
    in_b = dict(b.parts)
    return [(source, os.path.join(a.path, directory), os.path.join(b.path, in_b[source])) for source, directory in a.parts]


def within(source: str, path: str) -> str | None:
    """``path`` relative to the backed-up ``source`` ("" for the source itself), None when outside it (pure)."""
    source, path = posixpath.normpath(source), posixpath.normpath(path)
    if path == source:
        return ""
    prefix = source.rstrip("/") + "/"
    return path[len(prefix) :] if path.startswith(prefix) else None


def live_path(path: str, cwd: str) -> str:
    """What the user means by ``path``: absolute from ``cwd``, with the directories above it resolved as
    the system resolves them now (symbolic links included), the last name itself kept as given."""
    absolute = posixpath.normpath(posixpath.join(cwd, path))
    if absolute == "/":
        return absolute
    parent, name = posixpath.split(absolute)
    return posixpath.join(os.path.realpath(parent), name)


def lstat_in(root: str, rel: str) -> os.stat_result | None:
    """lstat of ``root/rel`` following no symbolic link below ``root``; None when it is not there."""
    current = root
    try:
        info = os.lstat(current)
        for part in [p for p in rel.split("/") if p]:
            if not stat.S_ISDIR(info.st_mode):
                return None
            current = os.path.join(current, part)
            info = os.lstat(current)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return info


def kind_of(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def iso_time(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9).astimezone().isoformat(timespec="seconds")


def holding(history: Sequence[Snapshot], path: str) -> list[tuple[Snapshot, str]]:
    """(snapshot, path inside it) for each snapshot whose source covers ``path`` and that holds it."""
    found = []
    for snap in narrow(history, path):
        rel = within(snap.source, path)
        if rel is not None and lstat_in(snap.path, rel) is not None:
            found.append((snap, rel))
    return found


def not_held(history: Sequence[Snapshot], path: str) -> UsageError:
    """The error for a path no snapshot holds, naming the nearest parent one does."""
    if not history:
        return UsageError(f"{path}: the repository holds no snapshot yet")
    covering = [snap for snap in narrow(history, path) if within(snap.source, path) is not None]
    if not covering:
        sources = ", ".join(sorted({source for snap in history for source in snap.sources}))
        return UsageError(f"{path} is outside what was backed up ({sources}): give a path below it")
    parent = posixpath.dirname(path)
    while True:
        found = holding(covering, parent)
        if found:
            snap = found[-1][0]
            return UsageError(
                f"no snapshot holds {path}; the nearest parent that one does is {parent} (newest in {snap.name}): "
                f"see what it held with backup-agent versions {parent}"
            )
        if parent in ("/", covering[-1].source):
            return UsageError(f"no snapshot holds {path}, nor any directory above it")
        parent = posixpath.dirname(parent)


# -- versions ----------------------------------------------------------------------


@dataclass
class Version:
    """One version of a path, over the snapshots that hold it unchanged (consecutive)."""

    kind: str
    first: str
    last: str
    snapshots: list[str]
    size: int | None
    mtime_ns: int
    mode: int
    uid: int
    gid: int
    inode: int
    partial: list[str] = field(default_factory=list)  # those of its snapshots that are partial
    target: str | None = None  # a symbolic link's
    entries: int | None = None  # a directory's
    added: list[str] = field(default_factory=list)  # a directory's changes from the version before
    removed: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = {
            "kind": self.kind,
            "first": self.first,
            "last": self.last,
            "snapshots": self.snapshots,
            "partial": self.partial,
            "size": self.size,
            "mtime": iso_time(self.mtime_ns),
            "mode": f"{self.mode:04o}",
            "uid": self.uid,
            "gid": self.gid,
            "inode": self.inode,
        }
        if self.kind == "symlink":
            out["target"] = self.target
        if self.kind == "directory":
            out.update(entries=self.entries, added=self.added, removed=self.removed, replaced=self.replaced)
        return out


DirSignature = tuple[int, int, int, frozenset[tuple[str, int]]]


def _directory_signature(path: str, info: os.stat_result) -> DirSignature:
    """A directory's own mode and owner, and its entries: subdirectories by name, others by inode (-1)."""
    with os.scandir(path) as entries:
        members = frozenset((e.name, -1 if e.is_dir(follow_symlinks=False) else e.inode()) for e in entries)
    return (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid, members)


def _directory_size(path: str) -> int:
    """The bytes of the files directly in a directory."""
    total = 0
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_size
    return total


def _changes(before: DirSignature, after: DirSignature) -> tuple[list[str], list[str], list[str]]:
    """Names added, removed and replaced (another inode) between two directory signatures (pure)."""
    old = dict(before[3])
    new = dict(after[3])
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    replaced = sorted(name for name in set(old) & set(new) if old[name] != new[name])
    return added, removed, replaced


def versions(history: Sequence[Snapshot], path: str) -> list[Version]:
    """Every version of ``path``, oldest first; empty when no snapshot holds it."""
    found: list[Version] = []
    previous_key: object = None
    previous_signature: DirSignature | None = None
    for snap in narrow(history, path):
        rel = within(snap.source, path)
        info = lstat_in(snap.path, rel) if rel is not None else None
        if info is None or rel is None:
            previous_key, previous_signature = None, None
            continue
        full = os.path.join(snap.path, rel) if rel else snap.path
        kind = kind_of(info.st_mode)
        signature = _directory_signature(full, info) if kind == "directory" else None
        # One inode, change time, modification time and size: one version in
        # either layout (agent.repository.versions; a btrfs snapshot keeps inode numbers).
        key: object = (
            ("directory", signature)
            if signature is not None
            else (kind, info.st_ino, info.st_ctime_ns, info.st_mtime_ns, info.st_size)
        )
        if found and key == previous_key:
            current = found[-1]
            current.last = snap.name
            current.snapshots.append(snap.name)
        else:
            current = Version(
                kind=kind,
                first=snap.name,
                last=snap.name,
                snapshots=[snap.name],
                size=info.st_size if kind != "directory" else _directory_size(full),
                mtime_ns=info.st_mtime_ns,
                mode=stat.S_IMODE(info.st_mode),
                uid=info.st_uid,
                gid=info.st_gid,
                inode=info.st_ino,
                target=os.readlink(full) if kind == "symlink" else None,
            )
            if signature is not None:
                current.entries = len(signature[3])
                if previous_signature is not None:
                    current.added, current.removed, current.replaced = _changes(previous_signature, signature)
            found.append(current)
        if snap.partial:
            current.partial.append(snap.name)
        previous_key, previous_signature = key, signature
    return found


# -- diff --------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One entry that differs between two snapshots; ``path`` is relative to the source."""

    path: str
    change: str  # added | removed | changed
    kind: str  # file | directory | symlink | other (the newer one's, for changed)
    size_before: int | None = None
    size_after: int | None = None
    what: str | None = None  # changed: content | metadata | type

    def as_dict(self, source: str) -> dict[str, Any]:
        return {
            "path": posixpath.join(source, self.path),
            "change": self.change,
            "kind": self.kind,
            "size_before": self.size_before,
            "size_after": self.size_after,
            "what": self.what,
        }


def _entries(path: str) -> dict[str, os.DirEntry[str]]:
    with os.scandir(path) as entries:
        return {entry.name: entry for entry in entries}


def _subtree(root: str, rel: str, change: str) -> Iterator[Change]:
    """The entry at ``rel`` and, for a directory, everything below it, as added or removed."""
    info = os.lstat(os.path.join(root, rel))
    kind = kind_of(info.st_mode)
    size = info.st_size if kind != "directory" else None
    yield Change(rel, change, kind, size if change == "removed" else None, size if change == "added" else None)
    if kind == "directory":
        for name in sorted(_entries(os.path.join(root, rel))):
            yield from _subtree(root, posixpath.join(rel, name), change)


def _xattrs(path: str) -> dict[str, bytes]:
    """An entry's extended attributes: none on a filesystem without them; any other failure is an error,
    never taken for "none" (two snapshots would look alike when one could not be read)."""
    try:
        return {name: os.getxattr(path, name, follow_symlinks=False) for name in os.listxattr(path, follow_symlinks=False)}
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise RepositoryError(f"cannot read the extended attributes of {path}: {exc.strerror}") from exc


def compare(a: str, b: str, info_a: os.stat_result, info_b: os.stat_result) -> str | None:
    """How two non-directory entries of one type differ: "content", "metadata" or None (equal)."""
    if info_a.st_size != info_b.st_size:
        return "content"
    if stat.S_ISLNK(info_a.st_mode):
        if os.readlink(a) != os.readlink(b):
            return "content"
    elif stat.S_ISREG(info_a.st_mode) and not filecmp.cmp(a, b, shallow=False):
        return "content"
    same = (info_a.st_mode, info_a.st_uid, info_a.st_gid, info_a.st_mtime_ns) == (
        info_b.st_mode,
        info_b.st_uid,
        info_b.st_gid,
        info_b.st_mtime_ns,
    )
    if not same or _xattrs(a) != _xattrs(b):
        return "metadata"
    return None


def diff(a_root: str, b_root: str) -> list[Change]:
    """What differs from tree ``a_root`` to tree ``b_root``, sorted by path.

    A directory counts as changed when its own mode or owner changed (its
    time follows its entries, so it is not compared); its entries are listed
    on their own.
    """
    out: list[Change] = []
    # One device (hard links): one inode is one version, no stat needed.
    # btrfs snapshots keep inode numbers through changes: there the stat decides.
    linked = shares_inodes(a_root, b_root)
    pending = [""]
    while pending:
        rel = pending.pop()
        a_entries = _entries(os.path.join(a_root, rel))
        b_entries = _entries(os.path.join(b_root, rel))
        for name in a_entries.keys() | b_entries.keys():
            child = posixpath.join(rel, name)
            ea, eb = a_entries.get(name), b_entries.get(name)
            if eb is None:
                out.extend(_subtree(a_root, child, "removed"))
                continue
            if ea is None:
                out.extend(_subtree(b_root, child, "added"))
                continue
            a_is_dir, b_is_dir = ea.is_dir(follow_symlinks=False), eb.is_dir(follow_symlinks=False)
            if not a_is_dir and not b_is_dir and ea.inode() == eb.inode() and linked:
                continue  # one inode: unchanged, nothing to look at
            info_a, info_b = ea.stat(follow_symlinks=False), eb.stat(follow_symlinks=False)
            if not a_is_dir and not b_is_dir and same_version(info_a, info_b):
                continue
            if a_is_dir and b_is_dir:
                own_a = (stat.S_IMODE(info_a.st_mode), info_a.st_uid, info_a.st_gid)
                if own_a != (stat.S_IMODE(info_b.st_mode), info_b.st_uid, info_b.st_gid):
                    out.append(Change(child, "changed", "directory", what="metadata"))
                pending.append(child)
            elif stat.S_IFMT(info_a.st_mode) != stat.S_IFMT(info_b.st_mode):
                out.append(Change(child, "changed", kind_of(info_b.st_mode), _size(info_a), _size(info_b), "type"))
                if a_is_dir:
                    out.extend(c for c in _subtree(a_root, child, "removed") if c.path != child)
                if b_is_dir:
                    out.extend(c for c in _subtree(b_root, child, "added") if c.path != child)
            else:
                what = compare(ea.path, eb.path, info_a, info_b)
                if what is not None:
                    out.append(Change(child, "changed", kind_of(info_b.st_mode), info_a.st_size, info_b.st_size, what))
    return sorted(out, key=lambda c: c.path)


def _size(info: os.stat_result) -> int | None:
    return None if stat.S_ISDIR(info.st_mode) else info.st_size


def pick_pair(history: Sequence[Snapshot], a: str | None, b: str | None) -> tuple[Snapshot, Snapshot]:
    """The two snapshots to compare: named ones, or the last two; B alone given: the one before it."""
    by_name = {snap.name: snap for snap in history}
    for name in (a, b):
        if name is not None and name not in by_name:
            known = ", ".join(s.name for s in history[-5:]) or "none"
            raise UsageError(f"no snapshot is named {name}: `backup-agent list` shows them (newest: {known})")
    if a is not None and b is not None:
        return by_name[a], by_name[b]
    if a is not None:  # one name: from it to the newest
        if a == history[-1].name:
            raise UsageError(f"{a} is the newest snapshot: give an older one, or two names")
        return by_name[a], history[-1]
    if len(history) < 2:
        raise UsageError(f"diff needs two snapshots; the repository holds {len(history)}")
    return history[-2], history[-1]
