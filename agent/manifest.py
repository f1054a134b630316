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


def line(digest: str, size: int, inode: int, path: bytes) -> bytes:
    """One entry's line."""
    return b"%s %d %d %s\n" % (digest.encode(), size, inode, escape_path(path))


def render(body: bytes, entries: int, algorithm: str = ALGORITHM) -> tuple[bytes, str]:
    """The whole manifest from its entry lines (header, lines, self-checking trailer), and its own digest."""
    head = b"# backup-agent manifest %d %s\n" % (FORMAT, algorithm.encode())
    own = f"{algorithm}:{hashlib.new(algorithm, head + body).hexdigest()}"
    return head + body + b"# end %d %s\n" % (entries, own.encode()), own


def parse(data: bytes, where: str) -> Manifest:
    """Read a manifest; :class:`CorruptManifestError` when it does not check out."""
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
    entries = []
    for line in data[header.end() : cut].split(b"\n")[:-1]:
        fields = line.split(b" ", 3)
        if len(fields) != 4:
            raise CorruptManifestError(f"{where}: unreadable manifest line {line[:60]!r}")
        entries.append(Entry(unescape_path(fields[3]), fields[0].decode(), int(fields[1]), int(fields[2])))
    if len(entries) != int(trailer.group(1)):
        raise CorruptManifestError(f"{where}: manifest lists {len(entries)} files, its trailer says {trailer.group(1).decode()}")
    return Manifest(algorithm, tuple(entries), f"{algorithm}:{own}")


def load(path: str) -> Manifest:
    """Read and check the manifest at ``path`` (OSError when it cannot be read)."""
    with open(path, "rb") as handle:
        return parse(handle.read(), path)


# -- reading files --------------------------------------------------------------


def hash_file(path: bytes, algorithm: str = ALGORITHM, buffer: bytearray | None = None) -> tuple[str, int]:
    """Digest and size of a regular file, read without following a symbolic link.

    O_NOATIME where allowed, so reading a whole backup back does not write
    to it.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | os.O_NOATIME)
    except PermissionError:  # O_NOATIME needs the file's owner or CAP_FOWNER
        fd = os.open(path, flags)
    try:
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


def known_digests(manifest: Manifest) -> dict[int, tuple[str, int]]:
    """inode -> (digest, size), for a later snapshot to reuse."""
    return {entry.inode: (entry.digest, entry.size) for entry in manifest.entries}


def record(
    snapshot: str,
    target: str,
    known: dict[int, tuple[str, int]],
    *,
    on_file: Callable[[int], None] | None = None,
) -> Recorded:
    """Write the manifest of the tree at ``snapshot`` to ``target`` (atomically).

    Files whose inode is in ``known`` (the previous snapshot's manifest) or
    was hashed already (a hard link inside this snapshot) are not read.
    """
    started = time.monotonic()
    seen = dict(known)
    lines: list[bytes] = []
    hashed_files = hashed_bytes = reused = 0
    buffer = bytearray(READ_SIZE)
    root = os.fsencode(snapshot)
    for rel, inode in walk_files(root):
        found = seen.get(inode)
        if found is None:
            found = hash_file(root + b"/" + rel, ALGORITHM, buffer)
            seen[inode] = found
            hashed_files += 1
            hashed_bytes += found[1]
            if on_file is not None:
                on_file(found[1])
        else:
            reused += 1
        lines.append(line(found[0], found[1], inode, rel))
    data, digest = render(b"".join(lines), len(lines))
    # Not durable, like the metadata beside it (repository.write_metadata says why).
    write_atomic(target, data, durable=False)
    return Recorded(len(lines), hashed_files, hashed_bytes, reused, digest, time.monotonic() - started)
