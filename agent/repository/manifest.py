"""Manifests: the content checksum of every regular file in a snapshot.

A manifest is written when a snapshot completes. Files the snapshot shares
with the previous one (hard links made by ``rsync --link-dest``: the same
inode, on the same filesystem) take their checksum from the previous
snapshot's manifest without being read again, so the cost follows the
changed data, not the size of the system. The previous snapshot's inodes are
live (nothing deletes a file in a completed snapshot, and rotation runs only
after this), so an inode number it lists cannot have been reused.

The format is text, one file per line, sorted by nothing in particular::

    # backup-agent manifest 2 sha256
    <hex digest> <size> <inode> <path, relative, \\ and newline escaped>
    = <inode> <type> <mode> <uid> <gid> <size> <link target in hex, or -> <path>
    ...
    # end <entries> sha256:<hex digest of every byte above this line>

Format 2 adds the ``=`` lines: one for every entry of the snapshot
(directories, links and special files too), so verify can tell a changed
type, mode, owner or link target, not only changed contents. ``<entries>``
counts the content lines only, as in format 1, which is still read.

The trailer makes the manifest check itself: a damaged or truncated manifest
is reported as such, never as thousands of damaged files. Paths are bytes,
so names that are not UTF-8 survive.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from agent.core.errors import CorruptManifestError
from agent.core.files import write_atomic
from agent.repository.versions import same_version, shares_inodes

log = logging.getLogger(__name__)

FORMAT = 2
READABLE_FORMATS = (1, 2)
# A manifest is read whole (it is checked against its own checksum first):
# bigger than this, it is not read at all (a repository is untrusted data).
MAX_MANIFEST_BYTES = 2 << 30
# Chosen by measurement (README, "Benchmarks"): with the SHA extensions
# (sha_ni) OpenSSL's SHA-256 hashes about twice as fast as hashlib's BLAKE2b.
ALGORITHM = "sha256"
READ_SIZE = 1 << 20

_HEADER = re.compile(rb"# backup-agent manifest (\d+) ([a-z0-9_]+)\n")
_TRAILER = re.compile(rb"# end (\d+) ([a-z0-9_]+):([0-9a-f]+)\n")
_ESCAPED = re.compile(rb"\\(.)", re.DOTALL)
# A content line (a digest of the algorithm's length), and, when there is
# one, the ``=`` line of the same inode, size and path right after it
# (format 2 writes them together): group 4 is that line, group 5 its
# b"<mode> <uid> <gid>".
_REUSABLE = re.compile(
    rb"^[0-9a-f]{%d} ([0-9]+) ([0-9]+) ([^\n]*)\n(= \2 f ([0-7]+ [0-9]+ [0-9]+) \1 - \3\n)?"
    % (2 * hashlib.new(ALGORITHM).digest_size),
    re.MULTILINE,
)
TYPES = {
    stat.S_IFREG: "f", stat.S_IFDIR: "d", stat.S_IFLNK: "l", stat.S_IFIFO: "p",
    stat.S_IFSOCK: "s", stat.S_IFCHR: "c", stat.S_IFBLK: "b",
}
TYPE_NAMES = {
    "f": "a file", "d": "a directory", "l": "a symbolic link", "p": "a pipe",
    "s": "a socket", "c": "a character device", "b": "a block device",
}


@dataclass(frozen=True)
class Entry:
    """One regular file of a snapshot as the manifest records it."""

    path: bytes
    digest: str
    size: int
    inode: int


@dataclass(frozen=True)
class Attributes:
    """What an entry was when it was backed up, apart from its contents (format 2)."""

    path: bytes
    inode: int
    type: str  # a key of TYPES' values: f d l p s c b
    mode: int  # permission bits (and setuid, setgid, sticky)
    uid: int
    gid: int
    size: int
    target: bytes | None  # a link's target


@dataclass(frozen=True)
class Manifest:
    algorithm: str
    entries: tuple[Entry, ...]
    digest: str  # "<algorithm>:<hex>", the manifest's own checksum (its trailer)
    attributes: tuple[Attributes, ...] = ()  # empty in format 1


@dataclass(frozen=True)
class Recorded:
    """What writing a manifest cost; ``hashed_*`` counts only what was read."""

    entries: int
    hashed_files: int
    hashed_bytes: int
    reused_files: int
    digest: str
    seconds: float

    def as_metadata(self, previous: str | None) -> dict[str, object]:
        return {
            "algorithm": ALGORITHM,
            "format": FORMAT,
            "entries": self.entries,
            "digest": self.digest,
            "hashed_files": self.hashed_files,
            "hashed_bytes": self.hashed_bytes,
            "reused_files": self.reused_files,
            "reused_from": previous,
            "duration": round(self.seconds, 3),
        }


# -- the format (pure) -------------------------------------------------------


_SPACE, _NEWLINE, _BACKSLASH = ord(" "), ord("\n"), ord("\\")


def escape_path(path: bytes) -> bytes:
    # The bytes' values, not one-byte bytes: ``b"\\" in path`` first tries the needle as an int and
    # drops the TypeError it raises, which cost a sixth of the manifest's walk.
    return path.replace(b"\\", b"\\\\").replace(b"\n", b"\\n") if _BACKSLASH in path or _NEWLINE in path else path


def unescape_path(text: bytes) -> bytes:
    if b"\\" not in text:
        return text
    return _ESCAPED.sub(lambda m: b"\n" if m.group(1) == b"n" else m.group(1), text)


def header(algorithm: str = ALGORITHM) -> bytes:
    return b"# backup-agent manifest %d %s\n" % (FORMAT, algorithm.encode())


def trailer(entries: int, own: str) -> bytes:
    """The last line: how many entries, and ``own`` ("<algorithm>:<hex>") of every byte above it."""
    return b"# end %d %s\n" % (entries, own.encode())


def _line(start: bytes, inode: int, path: bytes) -> bytes:
    """An entry's line from its start (b"<digest> <size>", as :data:`Known` keeps it)."""
    return b"%s %d %s\n" % (start, inode, escape_path(path))


def line(digest: str, size: int, inode: int, path: bytes) -> bytes:
    """One entry's line."""
    return _line(b"%s %d" % (digest.encode(), size), inode, path)


def _attributes_line(inode: int, kind: str, owner: bytes, size: int, target: bytes | None, path: bytes) -> bytes:
    """An entry's ``=`` line; ``owner`` is b"<mode in octal> <uid> <gid>"."""
    shown = target.hex().encode() if target is not None else b"-"
    return b"= %d %s %s %d %s %s\n" % (inode, kind.encode(), owner, size, shown, escape_path(path))


def attributes_line(attributes: Attributes) -> bytes:
    """One entry's ``=`` line (format 2)."""
    owner = b"%o %d %d" % (attributes.mode, attributes.uid, attributes.gid)
    return _attributes_line(attributes.inode, attributes.type, owner, attributes.size, attributes.target, attributes.path)


def _owner(info: os.stat_result) -> bytes:
    return b"%o %d %d" % (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid)


def render(body: bytes, entries: int, algorithm: str = ALGORITHM) -> tuple[bytes, str]:
    """The whole manifest from its entry lines (header, lines, self-checking trailer), and its own digest."""
    head = header(algorithm)
    own = f"{algorithm}:{hashlib.new(algorithm, head + body).hexdigest()}"
    return head + body + trailer(entries, own), own


@dataclass(frozen=True)
class _Checked:
    """Where a manifest's entry lines are, once its header and trailer check out."""

    algorithm: str
    start: int  # the first entry line
    cut: int  # the trailer
    count: int  # the entries the trailer announces
    own: str  # the hex digest of everything above the trailer


def _check(data: bytes, where: str) -> _Checked:
    """The header, the trailer and the manifest's own checksum; :class:`CorruptManifestError` when any is wrong."""
    header = _HEADER.match(data)
    if header is None:
        raise CorruptManifestError(f"{where}: not a backup-agent manifest (no header line)")
    if int(header.group(1)) not in READABLE_FORMATS:
        raise CorruptManifestError(f"{where}: manifest format {header.group(1).decode()} is not supported by this version")
    algorithm = header.group(2).decode()
    if algorithm not in hashlib.algorithms_available:
        raise CorruptManifestError(f"{where}: manifest algorithm {algorithm} is not available here")
    cut = data.rfind(b"# end ", 0, len(data) - 1)
    trailer = _TRAILER.fullmatch(data, cut) if cut >= 0 else None
    if trailer is None or data[cut - 1 : cut] != b"\n":
        raise CorruptManifestError(f"{where}: manifest is truncated (no trailer line)")
    own = hashlib.new(algorithm, data[:cut]).hexdigest()
    if trailer.group(2).decode() != algorithm or trailer.group(3).decode() != own:
        raise CorruptManifestError(f"{where}: manifest does not match its own checksum")
    return _Checked(algorithm, header.end(), cut, int(trailer.group(1)), own)


def _wrong_count(where: str, found: int, checked: _Checked) -> CorruptManifestError:
    return CorruptManifestError(f"{where}: manifest lists {found} files, its trailer says {checked.count}")


def parse(data: bytes, where: str) -> Manifest:
    """Read a manifest; :class:`CorruptManifestError` when it does not check out."""
    checked = _check(data, where)
    entries = []
    attributes = []
    for line in data[checked.start : checked.cut].split(b"\n")[:-1]:
        try:
            if line.startswith(b"= "):
                attributes.append(_parse_attributes(line))
                continue
            fields = line.split(b" ", 3)
            entries.append(Entry(unescape_path(fields[3]), fields[0].decode(), int(fields[1]), int(fields[2])))
        except (IndexError, ValueError):
            raise CorruptManifestError(f"{where}: unreadable manifest line {line[:60]!r}") from None
    if len(entries) != checked.count:
        raise _wrong_count(where, len(entries), checked)
    return Manifest(checked.algorithm, tuple(entries), f"{checked.algorithm}:{checked.own}", tuple(attributes))


def _parse_attributes(line: bytes) -> Attributes:
    _, inode, kind, mode, uid, gid, size, target, path = line.split(b" ", 8)
    if kind.decode() not in TYPE_NAMES:
        raise ValueError(kind)
    return Attributes(
        unescape_path(path), int(inode), kind.decode(), int(mode, 8), int(uid), int(gid), int(size),
        None if target == b"-" else bytes.fromhex(target.decode()),
    )


@dataclass(frozen=True)
class Known:
    """The previous snapshot's manifest as the next one reuses it (:func:`reusable`).

    ``data`` is the checked manifest itself; ``lines`` maps an inode to
    where its file's line starts in ``data``, shifted left by one, the low
    bit set when the file's ``=`` line follows it and agrees (same inode,
    size and path). One small int per file and the bytes already read: a
    bytes object per file cost more memory (a backup of a whole system
    has hundreds of thousands), and a file shared under the same path is
    written out as the two lines it had, with nothing parsed or formatted.
    """

    data: bytes = b""
    lines: dict[int, int] = field(default_factory=dict)

    def start(self, inode: int) -> bytes | None:
        """b"<digest> <size>" of the file at ``inode``, None when the manifest does not list it."""
        where = self.lines.get(inode)
        if where is None:
            return None
        begin = where >> 1
        return self.data[begin : self.data.index(b" ", self.data.index(b" ", begin) + 1)]

    def owner(self, inode: int) -> bytes | None:
        """b"<mode> <uid> <gid>" of the file at ``inode`` as its ``=`` line records it, None when it has none."""
        where = self.lines.get(inode)
        if where is None or not where & 1:
            return None
        data = self.data
        attributes = data.index(b"\n", where >> 1) + 1  # "= <inode> f <mode> <uid> <gid> ..."
        begin = data.index(b" ", data.index(b" ", attributes + 2) + 1) + 1
        return data[begin : data.index(b" ", data.index(b" ", data.index(b" ", begin) + 1) + 1)]


def shared_line(known: Known, inode: int) -> int | None:
    """Where ``known`` records the file now at ``inode`` when this snapshot shares it with the previous one.

    The reuse decision, in one place: the same inode on the same
    filesystem is the same file, since rsync --link-dest made it a hard
    link to the previous snapshot's, whose inodes are live until rotation
    runs after this (the module's docstring). What the previous manifest
    says of it is then true of this one. The value is :attr:`Known.lines`'
    (None: not shared, read it).
    """
    return known.lines.get(inode)


def read_manifest(path: str) -> bytes:
    """A manifest's bytes: a regular file of at most MAX_MANIFEST_BYTES, its last name not followed if a link."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CorruptManifestError(f"{path}: not a regular file")
        if info.st_size > MAX_MANIFEST_BYTES:
            raise CorruptManifestError(f"{path}: {info.st_size} bytes, more than a manifest may hold ({MAX_MANIFEST_BYTES})")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            # What fstat said, bounded above: read(MAX) would reserve the whole bound at once.
            return handle.read(info.st_size + 1)[:MAX_MANIFEST_BYTES]
    finally:
        os.close(fd)


def reusable(path: str) -> Known:
    """The previous snapshot's manifest, checked like :func:`load`, indexed by inode for reuse.

    Leaner than :func:`parse` (a backup of a whole system has hundreds of
    thousands of files): no object per entry (:class:`Known`). A manifest
    of another algorithm gives nothing to reuse.
    """
    data = read_manifest(path)
    checked = _check(data, path)
    if checked.algorithm != ALGORITHM:
        log.info("%s uses %s, not %s: nothing in it is reused", path, checked.algorithm, ALGORITHM)
        return Known()
    lines: dict[int, int] = {}
    found = 0
    # One match per well-formed content line (a path never holds a raw
    # newline): a line that does not match leaves the count short of the
    # trailer's. The last line of an inode wins, as in parse().
    for match in _REUSABLE.finditer(data, checked.start, checked.cut):  # not findall: no list of every line
        lines[int(match[2])] = match.start() << 1 | (match.start(4) >= 0)
        found += 1
    if found != checked.count:
        raise _wrong_count(path, found, checked)
    return Known(data, lines)


def load(path: str) -> Manifest:
    """Read and check the manifest at ``path`` (OSError when it cannot be read)."""
    return parse(read_manifest(path), path)


# -- reading files --------------------------------------------------------------


def open_to_hash(path: bytes) -> int:
    """A descriptor on a regular file, without following a symbolic link.

    O_NOATIME where allowed, so reading a whole backup back does not write
    to it.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags | os.O_NOATIME)
    except PermissionError:  # O_NOATIME needs the file's owner or CAP_FOWNER
        return os.open(path, flags)


def hash_fd(fd: int, algorithm: str = ALGORITHM, buffer: bytearray | None = None) -> tuple[str, int]:
    """Digest and size of what ``fd`` reads to its end."""
    digest = hashlib.new(algorithm)
    view = memoryview(buffer if buffer is not None else bytearray(READ_SIZE))
    size = 0
    while True:
        count = os.readv(fd, [view])
        if not count:
            break
        digest.update(view[:count])
        size += count
    return digest.hexdigest(), size


def hash_file(path: bytes, algorithm: str = ALGORITHM, buffer: bytearray | None = None) -> tuple[str, int]:
    """Digest and size of a regular file, read without following a symbolic link."""
    fd = open_to_hash(path)
    try:
        return hash_fd(fd, algorithm, buffer)
    finally:
        os.close(fd)


def walk_files(
    root: bytes,
    unlistable: list[tuple[bytes, OSError]] | None = None,
    others: list[tuple[bytes, "os.DirEntry[bytes]"]] | None = None,
) -> Iterator[tuple[bytes, int]]:
    """(relative path, inode) of every regular file below ``root``, from readdir alone (no stat).

    A directory that cannot be listed raises, unless ``unlistable`` is
    given: then it is added there (relative path, ``b""`` for ``root``,
    and the error) and the walk goes on, so a reader can name it.
    ``others`` receives every other entry (directories, links, special
    files) with its relative path, as it is found.
    """
    stack: list[tuple[bytes, bytes]] = [(root, b"")]
    while stack:
        directory, prefix = stack.pop()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append((entry.path, prefix + entry.name + b"/"))
                        if others is not None:
                            others.append((prefix + entry.name, entry))
                    elif entry.is_file(follow_symlinks=False):
                        yield prefix + entry.name, entry.inode()
                    elif others is not None:
                        others.append((prefix + entry.name, entry))
        except OSError as exc:
            if unlistable is None:
                raise
            unlistable.append((prefix.rstrip(b"/"), exc))


_BATCH = 1024  # lines hashed and written together
_DIGEST_HEX = 2 * hashlib.new(ALGORITHM).digest_size  # the length of a content line's first field


class _Writer:
    """The manifest's bytes as the walk finds the files, its own checksum kept on the way."""

    def __init__(
        self,
        root: bytes,
        known: Known,
        on_file: Callable[[int], None] | None,
        previous: bytes | None = None,
        written: frozenset[bytes] | None = None,
    ) -> None:
        self.root = root
        self.known = known  # the previous manifest's (reusable())
        # The previous snapshot's tree, when it is not on this tree's device (btrfs subvolumes):
        # there one inode number is not one version (_shared).
        self.previous = previous if previous is not None and not shares_inodes(previous, root) else None
        self.written = written  # when known: the only files changed since the previous snapshot
        self.owners: dict[int, bytes] = {}  # inode -> b"<mode> <uid> <gid>" of what this snapshot read or lstat'ed
        self.hashed: dict[int, bytes] = {}  # inode -> b"<digest> <size>" of what this snapshot read (hard links inside it)
        self.on_file = on_file
        self.own = hashlib.new(ALGORITHM)
        self.entries = self.hashed_files = self.hashed_bytes = self.reused = 0

    def chunks(self) -> Iterator[bytes]:
        yield self._hashed([header()])
        buffer = bytearray(READ_SIZE)
        batch: list[bytes] = []
        others: list[tuple[bytes, os.DirEntry[bytes]]] = []
        # The no-change common case, inlined (docs/ARCHITECTURE.md, "One backup"): a file shared
        # with the previous snapshot under the same path is its two lines copied, not parsed and
        # formatted again; they say what this snapshot's lines would (the same inode, checksum,
        # size, owner and path), and reusable() checked that the "=" line agrees. Another name of
        # the inode (a hard link inside the tree) is formatted anew below.
        same_device = self.previous is None
        lines = self.known.lines
        data = self.known.data
        find = data.index
        copied = 0
        for rel, inode in walk_files(self.root, others=others):
            where = lines.get(inode) if same_device else self._shared(rel, inode)
            if where is not None and where & 1:
                # "<digest> <size> <inode> <path>\n= <inode> f ... <path>\n": the path starts after
                # the size's end, a space, the inode's digits and a space; it must end at a newline.
                begin = where >> 1
                escaped = escape_path(rel) if _BACKSLASH in rel or _NEWLINE in rel else rel
                path = find(_SPACE, begin + _DIGEST_HEX + 1) + len(b"%d" % inode) + 2
                end = path + len(escaped)
                if data[end : end + 1] == b"\n" and data.startswith(escaped, path):
                    batch.append(data[begin : find(_NEWLINE, end + 1) + 1])
                    copied += 1
                    if others:
                        self._others(others, batch)
                    if len(batch) >= _BATCH:
                        yield self._hashed(batch)
                    continue
            owner: bytes | None = None
            start = self.hashed.get(inode)
            if where is not None:
                start, owner = self.known.start(inode), self.known.owner(inode)
            if start is None:
                fd = open_to_hash(self.root + b"/" + rel)
                try:
                    self.owners[inode] = _owner(os.fstat(fd))
                    digest, size = hash_fd(fd, ALGORITHM, buffer)
                finally:
                    os.close(fd)
                start = self.hashed[inode] = b"%s %d" % (digest.encode(), size)
                self.hashed_files += 1
                self.hashed_bytes += size
                if self.on_file is not None:
                    self.on_file(size)
            else:
                self.reused += 1
            if owner is None:
                owner = self.owners.get(inode)
            if owner is None:  # shared with a format-1 manifest's file: one lstat
                owner = self.owners[inode] = _owner(os.lstat(self.root + b"/" + rel))
            batch.append(_line(start, inode, rel))
            batch.append(_attributes_line(inode, "f", owner, int(start.rsplit(b" ", 1)[1]), None, rel))
            self.entries += 1
            self._others(others, batch)
            if len(batch) >= _BATCH:
                yield self._hashed(batch)
        self._others(others, batch)  # what the walk found after the last file
        self.reused += copied
        self.entries += copied
        yield self._hashed(batch)
        yield trailer(self.entries, self.digest)

    def _shared(self, rel: bytes, inode: int) -> int | None:
        """Where the previous manifest holds this file (:func:`shared_line`), when the file is the version it recorded.

        On one device the inode is the proof (a hard link). Across devices
        (btrfs snapshots keep inode numbers through changes made in place)
        a file rsync did not write into a clone of the previous snapshot
        (``written``, its itemized list) is that snapshot's; without that
        list the file at the same path in the previous snapshot must be the
        same version (agent.repository.versions): two lstat per file.
        """
        where = shared_line(self.known, inode)
        if where is None or self.previous is None:
            return where
        if self.written is not None:
            return None if rel in self.written else where
        try:
            now, before = os.lstat(self.root + b"/" + rel), os.lstat(self.previous + b"/" + rel)
        except OSError:
            return None
        return where if same_version(now, before) else None

    @staticmethod
    def _others(others: list[tuple[bytes, "os.DirEntry[bytes]"]], batch: list[bytes]) -> None:
        """The ``=`` lines of the entries that are not regular files (one lstat each), emptying ``others``."""
        for rel, entry in others:
            info = entry.stat(follow_symlinks=False)
            kind = TYPES.get(stat.S_IFMT(info.st_mode), "f")
            target = os.readlink(entry.path) if kind == "l" else None
            batch.append(_attributes_line(info.st_ino, kind, _owner(info), info.st_size, target, rel))
        others.clear()

    @property
    def digest(self) -> str:
        return f"{ALGORITHM}:{self.own.hexdigest()}"

    def _hashed(self, lines: list[bytes]) -> bytes:
        chunk = b"".join(lines)
        lines.clear()
        self.own.update(chunk)
        return chunk


def record(
    snapshot: str,
    target: str,
    known: Known,
    *,
    on_file: Callable[[int], None] | None = None,
    previous: str | None = None,
    written: frozenset[bytes] | None = None,
) -> Recorded:
    """Write the manifest of the tree at ``snapshot`` to ``target`` (atomically).

    Files whose inode is in ``known`` (the previous snapshot's manifest, whose
    tree is ``previous``: on another device, as btrfs snapshots are, a file
    must also be the same version there, :meth:`_Writer._reuse`) or
    was hashed already (a hard link inside this snapshot) are not read. The
    lines are hashed and written as the walk goes: memory follows ``known``
    and the new files, not the whole manifest.
    """
    started = time.monotonic()
    writer = _Writer(os.fsencode(snapshot), known, on_file, os.fsencode(previous) if previous is not None else None, written)
    # Not durable by itself: Repository.complete syncs the filesystem before the rename.
    # Root's alone: it names every file with a checksum of its content, also
    # files only their owner may read (a disk opened for browsing, agent.disk.browse).
    write_atomic(target, writer.chunks(), mode=0o600, durable=False)
    return Recorded(
        writer.entries, writer.hashed_files, writer.hashed_bytes, writer.reused, writer.digest,
        time.monotonic() - started,
    )
