"""Manifests: the content checksum of every regular file in a snapshot.

A manifest is written when a snapshot completes. Files the snapshot shares
with the previous one (hard links made by ``rsync --link-dest``: the same
inode, on the same filesystem) take their checksum from the previous
snapshot's manifest without being read again, so the cost follows the
changed data, not the size of the system. The previous snapshot's inodes are
live (nothing deletes a file in a completed snapshot, and rotation runs only
after this), so an inode number it lists cannot have been reused.

The format is text, one file per line, sorted by nothing in particular::

    # backup-agent manifest 1 sha256
    <hex digest> <size> <inode> <path, relative, \\ and newline escaped>
    ...
    # end <entries> sha256:<hex digest of every byte above this line>

The trailer makes the manifest check itself: a damaged or truncated manifest
is reported as such, never as thousands of damaged files. Paths are bytes,
so names that are not UTF-8 survive.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from .errors import CorruptManifestError
from .files import write_atomic

log = logging.getLogger(__name__)

FORMAT = 1
# Chosen by measurement (README, "Benchmarks"): with the SHA extensions
# (sha_ni) OpenSSL's SHA-256 hashes about twice as fast as hashlib's BLAKE2b.
ALGORITHM = "sha256"
READ_SIZE = 1 << 20

_HEADER = re.compile(rb"# backup-agent manifest (\d+) ([a-z0-9_]+)\n")
_TRAILER = re.compile(rb"# end (\d+) ([a-z0-9_]+):([0-9a-f]+)\n")
_ESCAPED = re.compile(rb"\\(.)", re.DOTALL)
_REUSABLE = re.compile(rb"^([0-9a-f]+ [0-9]+) ([0-9]+) [^\n]*\n", re.MULTILINE)


@dataclass(frozen=True)
class Entry:
    """One regular file of a snapshot as the manifest records it."""

    path: bytes
    digest: str
    size: int
    inode: int


@dataclass(frozen=True)
class Manifest:
    algorithm: str
    entries: tuple[Entry, ...]
    digest: str  # "<algorithm>:<hex>", the manifest's own checksum (its trailer)


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


def escape_path(path: bytes) -> bytes:
    return path.replace(b"\\", b"\\\\").replace(b"\n", b"\\n") if b"\\" in path or b"\n" in path else path


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
    if int(header.group(1)) != FORMAT:
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
    for line in data[checked.start : checked.cut].split(b"\n")[:-1]:
        fields = line.split(b" ", 3)
        if len(fields) != 4:
            raise CorruptManifestError(f"{where}: unreadable manifest line {line[:60]!r}")
        entries.append(Entry(unescape_path(fields[3]), fields[0].decode(), int(fields[1]), int(fields[2])))
    if len(entries) != checked.count:
        raise _wrong_count(where, len(entries), checked)
    return Manifest(checked.algorithm, tuple(entries), f"{checked.algorithm}:{checked.own}")


# inode -> b"<digest> <size>", the start of its manifest line: what the next
# snapshot reuses for a file it shares.
Known = dict[int, bytes]


def reusable(path: str) -> Known:
    """The previous snapshot's checksums by inode, checked like :func:`load`.

    Leaner than :func:`parse` (a backup of a whole system has hundreds of
    thousands of files): no object per entry, only the start of each line
    by its inode. A manifest of another algorithm gives nothing to reuse.
    """
    with open(path, "rb") as handle:
        data = handle.read()
    checked = _check(data, path)
    known: Known = {}
    if checked.algorithm != ALGORITHM:
        log.info("%s uses %s, not %s: nothing in it is reused", path, checked.algorithm, ALGORITHM)
        return known
    found = 0
    # One match per well-formed line (a path never holds a raw newline): a
    # line that does not match leaves the count short of the trailer's.
    for match in _REUSABLE.finditer(data, checked.start, checked.cut):  # not findall: no list of every line
        known[int(match[2])] = match[1]
        found += 1
    if found != checked.count:
        raise _wrong_count(path, found, checked)
    return known


def load(path: str) -> Manifest:
    """Read and check the manifest at ``path`` (OSError when it cannot be read)."""
    with open(path, "rb") as handle:
        return parse(handle.read(), path)


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


def walk_files(root: bytes, unlistable: list[tuple[bytes, OSError]] | None = None) -> Iterator[tuple[bytes, int]]:
    """(relative path, inode) of every regular file below ``root``, from readdir alone (no stat).

    A directory that cannot be listed raises, unless ``unlistable`` is
    given: then it is added there (relative path, ``b""`` for ``root``,
    and the error) and the walk goes on, so a reader can name it.
    """
    stack: list[tuple[bytes, bytes]] = [(root, b"")]
    while stack:
        directory, prefix = stack.pop()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append((entry.path, prefix + entry.name + b"/"))
                    elif entry.is_file(follow_symlinks=False):
                        yield prefix + entry.name, entry.inode()
        except OSError as exc:
            if unlistable is None:
                raise
            unlistable.append((prefix.rstrip(b"/"), exc))


_BATCH = 1024  # lines hashed and written together


class _Writer:
    """The manifest's bytes as the walk finds the files, its own checksum kept on the way."""

    def __init__(self, root: bytes, known: Known, on_file: Callable[[int], None] | None) -> None:
        self.root = root
        self.known = known
        self.hashed: Known = {}  # inodes read in this snapshot (hard links inside it)
        self.on_file = on_file
        self.own = hashlib.new(ALGORITHM)
        self.entries = self.hashed_files = self.hashed_bytes = self.reused = 0

    def chunks(self) -> Iterator[bytes]:
        yield self._hashed([header()])
        buffer = bytearray(READ_SIZE)
        batch: list[bytes] = []
        for rel, inode in walk_files(self.root):
            start = self.known.get(inode) or self.hashed.get(inode)
            if start is None:
                digest, size = hash_file(self.root + b"/" + rel, ALGORITHM, buffer)
                start = self.hashed[inode] = b"%s %d" % (digest.encode(), size)
                self.hashed_files += 1
                self.hashed_bytes += size
                if self.on_file is not None:
                    self.on_file(size)
            else:
                self.reused += 1
            batch.append(_line(start, inode, rel))
            self.entries += 1
            if len(batch) == _BATCH:
                yield self._hashed(batch)
        yield self._hashed(batch)
        yield trailer(self.entries, self.digest)

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
) -> Recorded:
    """Write the manifest of the tree at ``snapshot`` to ``target`` (atomically).

    Files whose inode is in ``known`` (the previous snapshot's manifest) or
    was hashed already (a hard link inside this snapshot) are not read. The
    lines are hashed and written as the walk goes: memory follows ``known``
    and the new files, not the whole manifest.
    """
    started = time.monotonic()
    writer = _Writer(os.fsencode(snapshot), known, on_file)
    # Not durable, like the metadata beside it (repository.write_metadata says why).
    # Root's alone: it names every file with a checksum of its content, also
    # files only their owner may read (a disk opened for browsing, agent.browse).
    write_atomic(target, writer.chunks(), mode=0o600, durable=False)
    return Recorded(
        writer.entries, writer.hashed_files, writer.hashed_bytes, writer.reused, writer.digest,
        time.monotonic() - started,
    )
