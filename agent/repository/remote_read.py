"""Reading a repository on a server: listings with stat, and checksums, computed there with POSIX tools.

The server has no Python (a NAS), so what the reading commands need of a
remote snapshot is asked of ``find``, ``stat -c``, ``sha256sum``,
``readlink``, ``cmp`` and ``xargs -0``, which coreutils and busybox both
provide (docs/ARCHITECTURE.md, "Remote repositories"). Every name crosses
the connection NUL-terminated and every script is fixed text with its
values as positional arguments (:func:`agent.repository.remote.script_argv`),
so any name survives both ways:

- a listing is batches: ``B <count>\\0``, then ``count`` names each ending
  in NUL, then ``count`` lines of ``stat -c`` (numbers only, one per name,
  in the same order: a name is never parsed out of stat's output);
- checksums: ``sha256sum -- NAMES...`` for names without a newline,
  carriage return or backslash (the only ones coreutils escapes), whose
  lines are ``<hex>  <name>`` and matched to the names given; every other
  name is hashed alone from its standard input (``W<hex>\\0``);
- a whole snapshot can be listed and hashed in one call (HASHED_TREE): each
  batch's stat lines are then followed by its checksums.

Names to hash (the files of a later snapshot that no earlier one shares)
go to the server on standard input, NUL-separated, in pieces smaller than
a pipe's buffer (the runner writes stdin whole before it reads the answer).

Scripts and parsers are pure; :func:`run_bytes` runs one through the runner.
"""

from __future__ import annotations

import re
import stat as stat_module
from dataclasses import dataclass
from typing import Iterable, Iterator, NamedTuple, Sequence

from agent.core.errors import CommandError
from agent.repository.remote import WALK_WITHOUT_LINKS, RemoteRepository, connection_failure, script_argv

# One line of stat per name: device, inode, raw mode (hex), uid, gid, size, mtime, ctime (seconds).
STAT_FORMAT = "%d %i %f %u %g %s %Y %Z"

# Run by find -exec and by the scripts below with names as "$@".
BATCH = r"""printf 'B %d\0' "$#"
[ "$#" -gt 0 ] || exit 0
printf '%s\0' "$@"
exec stat -c '""" + STAT_FORMAT + r"""' -- "$@"
"""

# As BATCH, each file then hashed: ``sha256sum -- NAMES`` and ``E\0`` (its lines are ``<hex>  <name>``).
HASHED_BATCH = r"""printf 'B %d\0' "$#"
[ "$#" -gt 0 ] || exit 0
printf '%s\0' "$@"
stat -c '""" + STAT_FORMAT + r"""' -- "$@"
sha256sum -- "$@"
printf 'E\0'
"""

# As BATCH, for names sha256sum would escape: each file then hashed alone from stdin, ``W<hex>\0`` or
# ``X\0`` (unreadable) per name, in order.
HASHED_ALONE_BATCH = r"""printf 'B %d\0' "$#"
[ "$#" -gt 0 ] || exit 0
printf '%s\0' "$@"
stat -c '""" + STAT_FORMAT + r"""' -- "$@"
for g do if h=$(sha256sum < "$g"); then printf 'W%s\0' "${h%% *}"; else printf 'X\0'; fi; done
"""

# $1 the snapshot directory, HASHED_BATCH and HASHED_ALONE_BATCH: every regular file listed and hashed, find
# sorting the names sha256sum would escape (a newline, a carriage return or a backslash anywhere in the
# path) to the second. No parentheses: busybox's find runs no "-exec {} +" inside them; -a binds
# tighter than -o, and "-exec {} +" is true, so each file goes to the first branch it matches.
HASHED_TREE = r"""cd -- "$1" || exit 3
nl='
'
cr=$(printf '\r')
exec find . -type f -path "*$nl*" -exec sh -c "$3" sh {} + -o -type f -path "*$cr*" -exec sh -c "$3" sh {} + \
  -o -type f -path '*\\*' -exec sh -c "$3" sh {} + -o -type f -exec sh -c "$2" sh {} +
"""

# $1 the snapshot directory, $2 "f" for regular files only, $3 BATCH (or HASHED_BATCH, with "f").
TREE = r"""cd -- "$1" || exit 3
if [ "$2" = f ]; then exec find . -type f -exec sh -c "$3" sh {} +; fi
exec find . -exec sh -c "$3" sh {} +
"""

# Run by xargs -0 with names that sha256sum would escape (a newline, a carriage return or a backslash)
# as "$@": each hashed alone from its standard input, so its name never passes through sha256sum.
HASH_ALONE = r"""for f do
  if h=$(sha256sum < "$f"); then printf 'W%s\0%s\0' "${h%% *}" "$f"; fi
done
"""

# $1 the snapshot directory, $2 "alone" for the names HASH_ALONE takes, $3 HASH_ALONE; the names on stdin, NUL-separated.
HASH = r"""cd -- "$1" || exit 3
if [ "$2" = alone ]; then exec xargs -0 sh -c "$3" sh; fi
exec xargs -0 sha256sum --
"""

# $1 the repository, $2 the path below each snapshot, $3 BATCH, then snapshot names. For each that
# holds the path (no symbolic link followed on the way, as HOLDS): S<name>\0, L<target>\0 for a link,
# then one batch: the path, and for a directory its entries.
VERSIONS = r"""set -f
cd -- "$1/snapshots" || exit 3
rel=$2; batch=$3
shift 3
for n do
""" + WALK_WITHOUT_LINKS + r"""  [ -e "$p" ] || [ -L "$p" ] || continue
  printf 'S%s\0' "$n"
  if [ -L "$p" ]; then printf 'L%s\0' "$(readlink -- "$p")"; sh -c "$batch" sh "$p"; continue; fi
  if [ -d "$p" ]; then
    set +f
    set -- "$p"
    for f in "$p"/* "$p"/.[!.]* "$p"/..?*; do
      if [ -e "$f" ] || [ -L "$f" ]; then set -- "$@" "$f"; fi
    done
    set -f
    sh -c "$batch" sh "$@"
  else
    sh -c "$batch" sh "$p"
  fi
done
"""

# Run by xargs -0 as ``sh -c SAME sh A B REL...``: one letter per REL, s when A/REL and B/REL hold
# the same (contents, or a link's target), d otherwise.
SAME = r"""a=$1; b=$2
shift 2
for r do
  if [ -L "$a/$r" ]; then
    if [ "$(readlink -- "$a/$r")" = "$(readlink -- "$b/$r")" ]; then printf s; else printf d; fi
  elif cmp -s -- "$a/$r" "$b/$r"; then printf s
  else printf d
  fi
done
"""

# $1 the first tree, $2 the second, $3 SAME; the relative paths on stdin, NUL-separated.
COMPARE = r"""exec xargs -0 sh -c "$3" sh "$1" "$2"
"""

# $1 the repository, $2 the previous snapshot, $3 the new one: the previous manifest copied as the new one's
# (beside, then renamed); exit 4 when there is none to copy.
COPY_MANIFEST = r"""cd -- "$1/metadata" || exit 3
if [ -L "$2.manifest" ] || [ ! -f "$2.manifest" ]; then exit 4; fi
cp -- "$2.manifest" ".$3.manifest.tmp" && mv -f -- ".$3.manifest.tmp" "$3.manifest" && echo copied
"""

# What stdin carries per call: below a pipe's 64 KiB, so writing it never waits for the answer.
STDIN_PIECE = 60000


class Stat(NamedTuple):
    """What ``stat -c STAT_FORMAT`` says of one entry (a tuple: a snapshot has hundreds of thousands)."""

    device: int
    inode: int
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int
    ctime: int

    @property
    def is_dir(self) -> bool:
        return stat_module.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat_module.S_ISREG(self.mode)

    @property
    def is_link(self) -> bool:
        return stat_module.S_ISLNK(self.mode)


_SUM_LINE = re.compile(rb"\\?([0-9a-f]{64}) [ *](.*)", re.DOTALL)


class AnswerError(ValueError):
    """The server's answer does not have the expected form."""


def _stat(line: bytes) -> Stat:
    fields = line.split(b" ")
    if len(fields) != 8:
        raise AnswerError(f"not a stat line: {line[:80]!r}")
    try:
        device, inode, mode, uid, gid, size, mtime, ctime = fields
        return Stat(int(device), int(inode), int(mode, 16), int(uid), int(gid), int(size), int(mtime), int(ctime))
    except ValueError:
        raise AnswerError(f"not a stat line: {line[:80]!r}") from None


class _Reader:
    """A cursor over the server's bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    @property
    def done(self) -> bool:
        return self.at >= len(self.data)

    def until(self, end: bytes) -> bytes:
        where = self.data.find(end, self.at)
        if where < 0:
            raise AnswerError("the answer is cut short")
        found = self.data[self.at : where]
        self.at = where + 1
        return found

    def peek(self) -> bytes:
        return self.data[self.at : self.at + 1]


def _batch(reader: _Reader) -> list[tuple[bytes, Stat]]:
    head = reader.until(b"\0")
    if not head.startswith(b"B ") or not head[2:].isdigit():
        raise AnswerError(f"not a batch: {head[:40]!r}")
    count = int(head[2:])
    names = [reader.until(b"\0") for _ in range(count)]
    return [(name, _stat(reader.until(b"\n"))) for name in names]


def parse_listing(data: bytes) -> list[tuple[bytes, Stat]]:
    """BATCH's answers, one after another: (name as given, its stat) (pure)."""
    reader = _Reader(data)
    found: list[tuple[bytes, Stat]] = []
    while not reader.done:
        found += _batch(reader)
    return found


def parse_hashed_listing(data: bytes) -> list[tuple[bytes, Stat, str | None]]:
    """HASHED_BATCH's answers: (name as given, its stat, its sha256 or None when it could not be read) (pure)."""
    reader = _Reader(data)
    found: list[tuple[bytes, Stat, str | None]] = []
    while not reader.done:
        listed = _batch(reader)
        if not listed:
            continue
        if reader.peek() in (b"W", b"X"):
            for name, info in listed:
                record = reader.until(b"\0")
                found.append((name, info, record[1:].decode("ascii") if record[:1] == b"W" else None))
            continue
        digests: dict[bytes, str] = {}
        while not reader.data.startswith(b"E\0", reader.at):
            match = _SUM_LINE.fullmatch(reader.until(b"\n"))
            if match is None:
                raise AnswerError("not a checksum line")
            digests[match[2]] = match[1].decode("ascii")
        reader.at += 2
        found += [(name, info, digests.get(name)) for name, info in listed]
    return found


def relative(name: bytes) -> bytes:
    """``./a/b`` as find names it -> ``a/b``; ``.`` -> ``b""`` (pure)."""
    return b"" if name == b"." else name[2:] if name.startswith(b"./") else name


@dataclass(frozen=True)
class Held:
    """What one snapshot holds at a path (VERSIONS's answer): its stat, a link's target, a directory's entries."""

    snapshot: str
    stat: Stat
    target: bytes | None
    entries: tuple[tuple[bytes, Stat], ...]


def parse_versions(data: bytes) -> list[Held]:
    """VERSIONS's answer (pure)."""
    reader = _Reader(data)
    found: list[Held] = []
    while not reader.done:
        head = reader.until(b"\0")
        if not head.startswith(b"S"):
            raise AnswerError(f"not a snapshot record: {head[:40]!r}")
        target = None
        if reader.peek() == b"L":
            target = reader.until(b"\0")[1:]
        listed = _batch(reader)
        if not listed:
            raise AnswerError("a snapshot record without its entry")
        (_, own), entries = listed[0], listed[1:]
        found.append(Held(head[1:].decode("ascii"), own, target, tuple((n.rsplit(b"/", 1)[-1], s) for n, s in entries)))
    return found


def parse_sums(data: bytes) -> dict[bytes, str]:
    """HASH's answer: name as given -> hex digest; a name missing could not be read (pure)."""
    reader = _Reader(data)
    found: dict[bytes, str] = {}
    while not reader.done:
        if reader.peek() == b"W":
            digest = reader.until(b"\0")[1:].decode("ascii")
            found[reader.until(b"\0")] = digest
            continue
        match = _SUM_LINE.fullmatch(reader.until(b"\n"))
        if match is None:
            raise AnswerError("not a checksum line")
        found[match[2]] = match[1].decode("ascii")
    return found


def pieces(names: Iterable[bytes], limit: int = STDIN_PIECE) -> Iterator[bytes]:
    """The NUL-terminated names, cut into pieces of at most ``limit`` bytes (one longer name alone) (pure)."""
    piece = bytearray()
    for name in names:
        if piece and len(piece) + len(name) + 1 > limit:
            yield bytes(piece)
            piece.clear()
        piece += name + b"\0"
    if piece:
        yield bytes(piece)


# -- running -------------------------------------------------------------------------


def run_bytes(
    repo: RemoteRepository, script: str, *args: str, step: str, stdin: bytes | None = None, ok: Sequence[int] = (0,)
) -> tuple[bytes, tuple[str, ...]]:
    """One server script; its whole stdout as bytes and its stderr's last lines. Another status than ``ok`` raises."""
    argv = script_argv(repo.remote, script, *args, ssh=repo.ssh)
    chunks: list[bytes] = []
    result = repo.runner.run(
        argv, step=step, on_stdout_data=chunks.append, mutating=False, check=False,
        stdin=bytearray(stdin) if stdin is not None else None,
    )  # fmt: skip
    if result.returncode not in ok:
        failure = connection_failure(repo.remote, result.stderr_tail, step=step, during=False) if result.returncode == 255 else None
        raise failure or CommandError(
            f"on {repo.remote.host}: {' | '.join(result.stderr_tail[-2:]) or f'status {result.returncode}'}",
            argv=result.argv, returncode=result.returncode, stderr_tail=result.stderr_tail, step=step,
        )  # fmt: skip
    return b"".join(chunks), result.stderr_tail


def tree(repo: RemoteRepository, directory: str, *, files_only: bool, step: str) -> dict[bytes, Stat]:
    """Every entry (or regular file) below ``directory`` on the server: relative path -> stat."""
    data, _ = run_bytes(repo, TREE, directory, "f" if files_only else "", BATCH, step=step)
    try:
        listed = parse_listing(data)
    except AnswerError as exc:
        raise CommandError(f"the listing of {directory} on {repo.remote.host} could not be read ({exc})", step=step) from None
    return {relative(name): info for name, info in listed if name != b"."}


def escaped_by_sha256sum(name: bytes) -> bool:
    """Whether coreutils' sha256sum would escape ``name`` in its output (busybox's never does) (pure)."""
    return b"\n" in name or b"\r" in name or b"\\" in name


def hashed_tree(repo: RemoteRepository, directory: str, *, step: str) -> dict[bytes, tuple[Stat, str | None]]:
    """Every regular file below ``directory`` with its stat and sha256, listed and hashed on the server in one call
    (the whole tree is read: for a first manifest, or the first snapshot verify checks)."""
    # find says 1 when a sha256sum in it did (a file it could not read): the others are still good.
    data, _ = run_bytes(repo, HASHED_TREE, directory, HASHED_BATCH, HASHED_ALONE_BATCH, step=step, ok=(0, 1))
    try:
        listed = parse_hashed_listing(data)
    except AnswerError as exc:
        raise CommandError(f"the listing of {directory} on {repo.remote.host} could not be read ({exc})", step=step) from None
    return {relative(name): (info, digest) for name, info, digest in listed}


def sums(repo: RemoteRepository, directory: str, names: Iterable[bytes], *, step: str) -> tuple[dict[bytes, str], tuple[str, ...]]:
    """sha256 of each relative path below ``directory``, computed on the server; what could not be read is left out
    (with sha256sum's complaints, the last lines)."""
    found: dict[bytes, str] = {}
    complaints: list[str] = []
    given = [b"./" + name for name in names]
    plain = [name for name in given if not escaped_by_sha256sum(name)]
    alone = [name for name in given if escaped_by_sha256sum(name)]
    work = [(piece, "") for piece in pieces(plain)] + [(piece, "alone") for piece in pieces(alone)]
    for piece, how in work:
        # xargs says 123 when a sha256sum said 1 (a file it could not read): the others are still good.
        data, tail = run_bytes(repo, HASH, directory, how, HASH_ALONE, step=step, stdin=piece, ok=(0, 123))
        complaints += tail
        try:
            answered = parse_sums(data)
        except AnswerError as exc:
            raise CommandError(f"the checksums from {repo.remote.host} could not be read ({exc})", step=step) from None
        found.update((relative(name), digest) for name, digest in answered.items())
    return found, tuple(complaints[-5:])


def held_at(repo: RemoteRepository, rel: str, names: Sequence[str], *, step: str) -> list[Held]:
    """What each snapshot of ``names`` holds at ``rel`` (those that hold nothing there left out)."""
    data, _ = run_bytes(repo, VERSIONS, repo.remote.path, rel, BATCH, *names, step=step)
    try:
        return parse_versions(data)
    except AnswerError as exc:
        raise CommandError(f"the answer of {repo.remote.host} about {rel} could not be read ({exc})", step=step) from None


def same_contents(repo: RemoteRepository, a: str, b: str, rels: Sequence[bytes], *, step: str) -> dict[bytes, bool]:
    """Whether ``a/rel`` and ``b/rel`` hold the same bytes (or link target), compared on the server with cmp."""
    found: dict[bytes, bool] = {}
    remaining = list(rels)
    for piece in pieces(remaining):
        names = piece.split(b"\0")[:-1]
        data, _ = run_bytes(repo, COMPARE, a, b, SAME, step=step, stdin=piece)
        if len(data) != len(names) or data.strip(b"sd"):
            raise CommandError(f"the comparison on {repo.remote.host} answered {len(data)} of {len(names)}", step=step)
        found.update((name, data[i : i + 1] == b"s") for i, name in enumerate(names))
    return found
