"""A snapshot's manifest from the previous snapshot's and what a ``btrfs send`` stream changed.

A snapshot received with ``btrfs send -p`` is the previous one plus the
stream's changes (agent.engine.send). Its manifest is therefore the
previous manifest with the lines of what the stream touched cut out and
listed anew from the new snapshot, not a walk of every file: the cost
follows the change (docs/ARCHITECTURE.md, "The manifest of a received
snapshot"). When the stream changed nothing a manifest records, the new
manifest is the previous one byte for byte: a reflink of it.

What it trusts: the previous manifest (checked against its own checksum
first) described the previous snapshot, and the stream names every entry
whose contents, size, mode, owner, type or name changed. The inode numbers
of a received snapshot are those of its parent's (receive works in a
snapshot of it), so a file the stream did not write and only moved keeps
its checksum, and the other names of a hard-linked file the stream wrote
are found by inode in the previous manifest.

The lines to cut are found by searching the previous manifest for each
path (a few hundredths of a second for 500,000 files each); beyond
``MAX_SEARCHES`` paths, in one pass over every line (about a second for
500,000 files), still no walk of the snapshot.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import os
import re
import stat
import tempfile
import time
from dataclasses import dataclass
from typing import Iterator

from agent.core.errors import CorruptManifestError
from agent.core.files import write_atomic
from agent.repository import manifest as manifests

# Beyond this many paths, one pass over the previous manifest costs less than a search of it per path.
MAX_SEARCHES = 24
_FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)


@dataclass(frozen=True)
class StreamChanges:
    """What an incremental stream changed, in a manifest's terms (paths relative to the snapshot, bytes).

    ``gone``: paths of the previous snapshot whose entry (and what is below
    it) is no longer at that path; ``fresh``: paths of the new snapshot to
    list anew with what is below them (made or moved there by the stream);
    ``touched``: paths of the new snapshot whose own entry changed.
    """

    gone: frozenset[bytes]
    fresh: frozenset[bytes]
    touched: frozenset[bytes]

    @property
    def empty(self) -> bool:
        return not (self.gone or self.fresh or self.touched)


def _under(path: bytes, tops: frozenset[bytes] | set[bytes]) -> bool:
    """Whether ``path`` or a directory above it is in ``tops``."""
    while True:
        if path in tops:
            return True
        if b"/" not in path:
            return False
        path = path.rpartition(b"/")[0]


def _kind(path: bytes) -> int | None:
    """The file type bits of ``path`` (not followed), None when nothing is there."""
    try:
        return stat.S_IFMT(os.lstat(path).st_mode)
    except FileNotFoundError:
        return None


def _line_path(line: bytes) -> bytes:
    """The escaped path a manifest line ends with (both kinds of line)."""
    return line.split(b" ", 8)[8] if line.startswith(b"= ") else line.split(b" ", 3)[3]


def find_lines(data: bytes, start: int, cut: int, path: bytes, below: bool) -> Iterator[tuple[int, int]]:
    """(begin, end) of every line of the manifest ``data`` for ``path`` (``below``: for what is below it), pure.

    A search for `` <path>\\n`` (or `` <path>/``) finds candidates; each is
    kept only when its line's path field is the path (or below it), so a
    name holding spaces never cuts another file's line.
    """
    escaped = manifests.escape_path(path)
    needle = b" " + escaped + (b"/" if below else b"\n")
    at = data.find(needle, start, cut)
    while at >= 0:
        begin = data.rfind(b"\n", start - 1, at) + 1
        end = data.index(b"\n", at) + 1
        found = _line_path(data[begin : end - 1])
        if found == escaped if not below else found.startswith(escaped + b"/"):
            yield begin, end
        at = data.find(needle, end, cut)


def _inode_lines(data: bytes, start: int, cut: int, inodes: set[int]) -> Iterator[bytes]:
    """The escaped paths of the regular files at ``inodes`` in the manifest ``data`` (their ``=`` lines), pure.

    One pass whatever their number: the search skips from one ``= `` to the next.
    """
    if not inodes:
        return
    pattern = re.compile(rb"^= (?:%s) f [^\n]*$" % b"|".join(b"%d" % inode for inode in sorted(inodes)), re.MULTILINE)
    for match in pattern.finditer(data, start, cut):
        yield _line_path(match[0])


# Any line of a format-2 manifest, its path as group 1 (escaped).
_ANY_LINE = re.compile(
    rb"^(?:= [0-9]+ [a-z] [0-7]+ [0-9]+ [0-9]+ [0-9]+ (?:-|[0-9a-f]*) |[0-9a-f]{%d} [0-9]+ [0-9]+ )([^\n]*)\n"
    % (2 * hashlib.new(manifests.ALGORITHM).digest_size),
    re.MULTILINE,
)


def _one_pass(
    data: bytes, start: int, cut: int, exact: set[bytes] | frozenset[bytes], below: set[bytes], before: bytes
) -> set[tuple[int, int]]:
    """The lines of ``exact`` paths and of what the previous snapshot ``before`` holds below ``below``, in one pass.

    For a change too large to search the manifest once per path: one
    regular expression reads every line's path and keeps the wanted ones
    (about a second for 500,000 files), and what was below a gone
    directory is listed from the previous snapshot, so the rest follows
    the change.
    """
    wanted = set(exact)
    for top in below:
        others: list[tuple[bytes, os.DirEntry[bytes]]] = []
        wanted.update(top + b"/" + rel for rel, _ in manifests.walk_files(before + b"/" + top, others=others))
        wanted.update(top + b"/" + rel for rel, _ in others)
    escaped = {manifests.escape_path(path) for path in wanted}
    return {line.span() for line in _ANY_LINE.finditer(data, start, cut) if line[1] in escaped}


@dataclass
class _Listing:
    """The new snapshot's lines for what the stream changed, files read only when needed."""

    root: bytes
    reusable: dict[int, bytes]  # inode -> b"<digest> <size>" of cut lines whose file the stream did not write
    lines: dict[bytes, list[bytes]]
    hashed_files: int = 0
    hashed_bytes: int = 0

    def entry(self, rel: bytes, info: os.stat_result) -> None:
        kind = manifests.TYPES.get(stat.S_IFMT(info.st_mode), "f")
        owner = b"%o %d %d" % (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid)
        if kind != "f" or not stat.S_ISREG(info.st_mode):
            target = os.readlink(self.root + b"/" + rel) if kind == "l" else None
            self.lines[rel] = [manifests._attributes_line(info.st_ino, kind, owner, info.st_size, target, rel)]
            return
        start = self.reusable.get(info.st_ino)
        if start is None or int(start.rsplit(b" ", 1)[1]) != info.st_size:
            digest, size = manifests.hash_file(self.root + b"/" + rel)
            start = self.reusable[info.st_ino] = b"%s %d" % (digest.encode(), size)
            self.hashed_files += 1
            self.hashed_bytes += size
        size = int(start.rsplit(b" ", 1)[1])
        self.lines[rel] = [manifests._line(start, info.st_ino, rel), manifests._attributes_line(info.st_ino, "f", owner, size, None, rel)]

    def tree(self, top: bytes) -> None:
        """``top`` and everything below it."""
        try:
            info = os.lstat(self.root + b"/" + top)
        except FileNotFoundError:
            return
        self.entry(top, info)
        if not stat.S_ISDIR(info.st_mode):
            return
        others: list[tuple[bytes, os.DirEntry[bytes]]] = []
        for rel, _ in manifests.walk_files(self.root + b"/" + top, others=others):
            self.entry(top + b"/" + rel, os.lstat(self.root + b"/" + top + b"/" + rel))
        for rel, found in others:
            self.entry(top + b"/" + rel, found.stat(follow_symlinks=False))


def _clone(source: str, target: str, size: int) -> None:
    """``target`` made a reflink of ``source`` (FICLONE; a copy where the filesystem cannot), atomically, root's alone."""
    fd, temporary = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=os.path.dirname(target))
    try:
        src = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            try:
                fcntl.ioctl(fd, _FICLONE, src)
            except OSError:  # not btrfs/xfs, or another filesystem: the bytes are copied
                copied = 0
                while copied < size:
                    count = os.copy_file_range(src, fd, size - copied)
                    if not count:
                        break
                    copied += count
        finally:
            os.close(src)
        if os.fstat(fd).st_size != size:
            raise OSError(f"{source} changed while it was copied")
        os.fchmod(fd, 0o600)
        os.close(fd)
        fd = -1
        os.replace(temporary, target)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        os.unlink(temporary)
        raise


def record_from_stream(
    snapshot: str, previous_snapshot: str, previous_manifest: str, target: str, changes: StreamChanges
) -> manifests.Recorded | None:
    """Write the manifest of ``snapshot`` to ``target`` from the previous one and ``changes``; None: walk instead.

    None when the previous manifest is not of this format and algorithm. Raises
    :class:`CorruptManifestError` when it does not check out, OSError when
    a file cannot be read (the caller then walks the snapshot).
    """
    started = time.monotonic()
    data = manifests.read_manifest(previous_manifest)
    checked = manifests._check(data, previous_manifest)
    if checked.algorithm != manifests.ALGORITHM or not data.startswith(manifests.header()):
        return None
    own = f"{checked.algorithm}:{checked.own}"
    if changes.empty:
        _clone(previous_manifest, target, len(data))
        return manifests.Recorded(checked.count, 0, 0, checked.count, own, time.monotonic() - started)
    try:
        return _spliced(data, checked, snapshot, previous_snapshot, target, changes, started)
    except (ValueError, IndexError) as exc:  # a line its own checksum vouches for, but not one this writes
        raise CorruptManifestError(f"{previous_manifest}: a line cannot be read ({exc})") from None


def _spliced(
    data: bytes,
    checked: manifests._Checked,
    snapshot: str,
    previous_snapshot: str,
    target: str,
    changes: StreamChanges,
    started: float,
) -> manifests.Recorded:
    """record_from_stream for a stream that changed something: the parent's lines cut and the changed paths listed."""
    root, before = os.fsencode(snapshot), os.fsencode(previous_snapshot)
    gone = {p for p in changes.gone if _kind(before + b"/" + p) is not None}
    touched = {p for p in changes.touched if not _under(p, changes.fresh)}
    written: set[int] = set()  # the inodes whose file the stream wrote, wherever it moved them
    hard_linked: set[int] = set()
    for path in changes.touched:
        sides = (root,) if _under(path, changes.fresh) else (root, before)  # a fresh path was another entry before
        for side in sides:
            try:
                info = os.lstat(side + b"/" + path)
            except FileNotFoundError:
                continue
            if side is root:
                written.add(info.st_ino)
            if stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
                hard_linked.add(info.st_ino)
    directories = {p for p in gone if _kind(before + b"/" + p) == stat.S_IFDIR}
    start, cut = checked.start, checked.cut
    for escaped in _inode_lines(data, start, cut, hard_linked):  # a written file's other names, the stream names one
        other = manifests.unescape_path(escaped)
        if not _under(other, gone) and not _under(other, changes.fresh):
            touched.add(other)
    exact = gone | touched | changes.fresh
    if len(exact) + len(directories) <= MAX_SEARCHES:  # one search of the manifest per path (two for a directory)
        spans = {span for path in exact for span in find_lines(data, start, cut, path, below=False)}
        spans.update(span for path in directories for span in find_lines(data, start, cut, path, below=True))
    else:
        spans = _one_pass(data, start, cut, exact, directories, before)
    reusable: dict[int, bytes] = {}
    dropped = 0
    for begin, end in spans:
        line = data[begin:end]
        if not line.startswith(b"= "):
            dropped += 1
            content, length, number, _ = line.split(b" ", 3)
            if int(number) not in written:
                reusable[int(number)] = content + b" " + length
    listing = _Listing(root, reusable, {})
    for top in changes.fresh:
        if b"/" not in top or not _under(top.rpartition(b"/")[0], changes.fresh):  # the topmost alone: tree() lists the rest
            listing.tree(top)
    for path in touched:
        if path not in listing.lines:
            try:
                listing.entry(path, os.lstat(root + b"/" + path))
            except FileNotFoundError:
                continue
    added = sum(1 for lines in listing.lines.values() if len(lines) == 2)
    entries = checked.count - dropped + added

    kept: list[tuple[int, int]] = []  # the parts of the parent's lines that stay
    position = start
    for begin, end in sorted(spans):
        kept.append((position, begin))
        position = end
    kept.append((position, cut))
    checksum = hashlib.new(manifests.ALGORITHM)

    def chunks() -> Iterator[bytes]:
        """The manifest, hashed as it is written, in pieces of at most READ_SIZE: no second copy of it in memory."""
        pieces: Iterator[bytes] = (
            data[at : min(at + manifests.READ_SIZE, end)] for begin, end in kept for at in range(begin, end, manifests.READ_SIZE)
        )
        for piece in itertools.chain((manifests.header(),), pieces):
            checksum.update(piece)
            yield piece
        for lines in listing.lines.values():
            piece = b"".join(lines)
            checksum.update(piece)
            yield piece
        yield manifests.trailer(entries, f"{manifests.ALGORITHM}:{checksum.hexdigest()}")

    write_atomic(target, chunks(), mode=0o600, durable=False)
    return manifests.Recorded(
        entries, listing.hashed_files, listing.hashed_bytes, entries - listing.hashed_files,
        f"{manifests.ALGORITHM}:{checksum.hexdigest()}", time.monotonic() - started,
    )
