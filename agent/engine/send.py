"""``method = "send"``: a snapshot made by ``btrfs send | btrfs receive`` instead of rsync.

When the source is a btrfs subvolume and the repository uses the btrfs
layout, a read-only snapshot of the source is sent to the repository,
incrementally against the snapshot sent last time (``send -p``): no walk of
the tree, a cost that follows what changed (README, "Incremental send").

On the source's filesystem the snapshots sent live in
``<source>/.backup-agent-send/<repository id>/`` (root's alone), one chain
per repository; only the newest one whose copy the repository holds is
kept as the next parent. A snapshot is named ``<name>.in-progress`` on
both sides, since ``btrfs receive`` gives the received subvolume the sent
one's name: in the repository it is an unfinished transfer until the
layout's ``complete`` renames it (agent.engine.btrfs).

Limits, said where they apply: ``exclude`` cannot apply inside a
subvolume (everything in it is sent; nested subvolumes are not, as with
any btrfs snapshot); without a parent on both sides the whole subvolume is
sent once (a warning says so); and when send or receive fails, the partial
copy is deleted and the run goes on with rsync (a warning says why).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import re
import signal
import socket
import stat
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from agent.core.commands import ExitTable, Runner
from agent.core.errors import BackupAgentError, Interrupted, RepositoryError
from agent.core.mounts import read_mountinfo
from agent.engine.btrfs import SUBVOLUME_INODE, BtrfsLayout, filesystem_type, subvolume_delete_argv, subvolume_snapshot_argv
from agent.repository.manifest_stream import StreamChanges
from agent.repository.store import IN_PROGRESS, SNAPSHOTS, Repository

log = logging.getLogger(__name__)

SEND_DIRECTORY = ".backup-agent-send"


# -- pure -----------------------------------------------------------------------------


def send_argv(btrfs: str, snapshot: str, parent: str | None, out: str) -> tuple[str, ...]:
    return (btrfs, "send", *(("-p", parent) if parent is not None else ()), "-f", out, snapshot)


def receive_argv(btrfs: str, into: str, stream: str) -> tuple[str, ...]:
    # -e: stop at the stream's end marker rather than wait for the end of the pipe.
    return (btrfs, "receive", "-e", "-f", stream, into)


def dump_argv(btrfs: str, stream: str) -> tuple[str, ...]:
    return (btrfs, "receive", "--dump", "-f", stream)


_DUMP_LINE = re.compile(r"^(?P<command>\S+)\s+(?P<path>(?:\\.|[^\s\\])+)(?P<rest>.*)$")
_DUMP_DEST = re.compile(r"\bdest=(?P<path>(?:\\.|[^\s\\])+)")


# The escapes btrfs-progs (6.2) prints for control characters with a C name.
_C_ESCAPES = {"a": 7, "b": 8, "e": 27, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11}


def _dump_path(token: str, prefix: str) -> bytes | None:
    """A path of ``btrfs receive --dump`` (``./<subvolume>/<path>``, escaped) as bytes relative to the subvolume.

    btrfs escapes a space or a backslash with a backslash, the control
    characters C names (``\\n``, ``\\t``...) as C does, and any other byte
    that is not printable as ``\\ooo``; anything else after a backslash is
    not read, and None says so (the caller then trusts nothing of the dump).
    """
    if not token.startswith(prefix) or not token.isascii():
        return None
    out = bytearray()
    text = token[len(prefix):]
    index = 0
    while index < len(text):
        char = text[index]
        if char != "\\":
            out += char.encode("ascii")
            index += 1
            continue
        octal = text[index + 1 : index + 4]
        if len(octal) == 3 and all(digit in "01234567" for digit in octal):
            out.append(int(octal, 8))
            index += 4
        elif text[index + 1 : index + 2] in (" ", "\\"):
            out += text[index + 1].encode("ascii")
            index += 2
        elif (control := _C_ESCAPES.get(text[index + 1 : index + 2])) is not None:
            out.append(control)
            index += 2
        else:
            return None
    return bytes(out)


def written_from_dump(lines: list[str], entry: str) -> frozenset[bytes] | None:
    """Every path an incremental stream (its ``receive --dump``) creates, writes or changes, renames followed (pure).

    ``entry`` is the received subvolume's name. A file a rename moves (or a
    directory above it) is named at its final path. None when a line cannot
    be read exactly: then nothing may be concluded from the list.
    """
    prefix = f"./{entry}/"
    written: set[bytes] = set()
    for line in lines:
        match = _DUMP_LINE.match(line)
        if match is None:
            return None
        command = match["command"]
        if command in ("snapshot", "subvol"):
            continue
        path = _dump_path(match["path"], prefix)
        if path is None:
            if match["path"] in (prefix, prefix.rstrip("/")):
                continue  # the subvolume's own directory
            return None
        if command in ("unlink", "rmdir"):
            written.discard(path)
            continue
        if command == "rename":
            dest_match = _DUMP_DEST.search(match["rest"])
            dest = _dump_path(dest_match["path"], prefix) if dest_match else None
            if dest is None:
                return None
            under = path + b"/"
            moved = {dest + p[len(path):] for p in written if p == path or p.startswith(under)}
            written = {p for p in written if p != path and not p.startswith(under)} | moved | {dest}
            continue
        written.add(path)
    return frozenset(written)


# What a command of ``btrfs receive --dump`` does to the manifest's entries.
_CREATES = frozenset({"mkfile", "mkdir", "mknod", "mkfifo", "mksock", "symlink", "link"})
_REMOVES = frozenset({"unlink", "rmdir"})
# Contents, size, mode or owner (what a manifest line records); xattrs and
# file attributes are not recorded but are counted too: one more file listed anew.
_CHANGES = frozenset({
    "write", "clone", "truncate", "chmod", "chown", "update_extent", "encoded_write", "fallocate",
    "set_xattr", "remove_xattr", "fileattr", "enable_verity",
})
_TIMES = frozenset({"utimes"})  # a manifest records no times


def _parent(path: bytes) -> bytes:
    return path.rpartition(b"/")[0]


def _under(path: bytes, top: bytes) -> bool:
    return path == top or path.startswith(top + b"/")


def changes_from_dump(lines: list[str], entry: str) -> StreamChanges | None:
    """What an incremental stream (its ``receive --dump``) changed, in the terms of a manifest (pure).

    The stream's paths are those of the tree as it is being changed
    (btrfs moves entries through temporary ``o<inode>-<gen>-0`` names), so
    each rename is followed: ``moved`` maps a path of the tree now to the
    previous snapshot's path it holds (None: made by the stream), and the
    entries a path held in the previous snapshot before it was removed,
    renamed or replaced are ``gone``. A directory that gained or lost an
    entry changed size: it is listed anew too. None when a line is not
    understood: then nothing may be concluded from the stream.
    """
    prefix = f"./{entry}/"
    moved: dict[bytes, bytes | None] = {}
    gone: set[bytes] = set()
    touched: set[bytes] = set()

    def origin(path: bytes) -> bytes | None:
        """The previous snapshot's path of what ``path`` holds now (None: made by the stream)."""
        top = path
        while top:
            if top in moved:
                base = moved[top]
                return None if base is None else base + path[len(top):]
            top = _parent(top)
        return path

    def rekey(source: bytes, dest: bytes) -> None:
        nonlocal touched
        for key in [k for k in moved if _under(k, source)]:
            moved[dest + key[len(source):]] = moved.pop(key)
        touched = {dest + p[len(source):] if _under(p, source) else p for p in touched}

    def drop(path: bytes) -> None:
        nonlocal touched
        for key in [k for k in moved if _under(k, path)]:
            del moved[key]
        touched = {p for p in touched if not _under(p, path)}

    for line in lines:
        match = _DUMP_LINE.match(line)
        if match is None:
            return None
        command = match["command"]
        if command in ("snapshot", "subvol"):
            continue
        path = _dump_path(match["path"], prefix)
        if path is None:
            if match["path"] in (prefix, prefix.rstrip("/")) and (command in _TIMES or command in _CHANGES):
                continue  # the subvolume's own directory: the manifest has no line for it
            return None
        if command in _TIMES:
            continue
        if command in _CHANGES:
            touched.add(path)
        elif command in _CREATES:
            drop(path)
            moved[path] = None
            touched.add(_parent(path))
        elif command in _REMOVES:
            was = origin(path)
            if was is not None:
                gone.add(was)
            drop(path)
            touched.add(_parent(path))
        elif command == "rename":
            dest_match = _DUMP_DEST.search(match["rest"])
            dest = _dump_path(dest_match["path"], prefix) if dest_match else None
            if dest is None or _under(dest, path):
                return None
            was, replaced = origin(path), origin(dest)
            for old in (was, replaced):
                if old is not None:
                    gone.add(old)
            drop(dest)
            rekey(path, dest)
            moved[dest] = was
            touched.update((_parent(path), _parent(dest)))
        else:
            return None
    touched.discard(b"")
    return StreamChanges(gone=frozenset(gone), fresh=frozenset(moved), touched=frozenset(touched))


def choose_parent(snapshots: list[str], metadata: Callable[[str], dict[str, Any] | None], sent: set[str]) -> str | None:
    """The newest complete snapshot that was received from a source snapshot still on the source side (pure).

    ``snapshots``: the repository's complete snapshots, oldest first;
    ``sent``: the names of the snapshots in the source's send directory.
    """
    for name in reversed(snapshots):
        record = (metadata(name) or {}).get("sent")
        if isinstance(record, dict) and record.get("snapshot") in sent:
            return name
    return None


def why_not(layout_is_btrfs: bool, source_fstype: str | None, source_is_subvolume: bool, source: str) -> str | None:
    """Why ``method = "send"`` cannot run here, in words for a warning; None when it can (pure)."""
    if not layout_is_btrfs:
        return "the repository does not use the btrfs layout"
    if source_fstype != "btrfs":
        return f"the source {source} is not on btrfs"
    if not source_is_subvolume:
        return f"the source {source} is not a btrfs subvolume (btrfs subvolume list shows which are)"
    return None


# -- acting ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    """What a send left: the snapshot's name in the repository, its parent, and what the metadata records."""

    name: str
    parent: str | None
    record: dict[str, Any]
    # What the stream changed (written_from_dump), when it was incremental and read exactly.
    written: frozenset[bytes] | None = None
    # The same, in a manifest's terms (changes_from_dump): the manifest is made from the previous one.
    changes: StreamChanges | None = None


def metadata(sent: Sent, start: dt.datetime, source: str, version: str, warnings: list[str]) -> dict[str, Any]:
    """The metadata of a received transfer (state ``transferred``), in the fields rsync's transfer writes."""
    return {
        "format": 1,
        "name": sent.name,
        "state": "transferred",
        "host": socket.gethostname(),
        "source": source,
        "tool_version": version,
        "start": start.isoformat(timespec="milliseconds"),
        "transfer_end": dt.datetime.now().astimezone().isoformat(timespec="milliseconds"),
        "link_dest": sent.parent,
        "resumed_from": [],
        "statistics": {},  # send reports no per-file counts
        "partial": False,
        "errors": {"count": 0, "first": []},
        "vanished": 0,
        "warnings": list(warnings),
        "method": "send",
        "sent": sent.record,
    }


def refusal(layout: object, source: str) -> str | None:
    """Why this repository and source cannot use send (None: they can)."""
    try:
        info = os.lstat(source)
    except OSError as exc:
        return f"the source {source} cannot be read ({exc.strerror})"
    subvolume = stat.S_ISDIR(info.st_mode) and info.st_ino == SUBVOLUME_INODE
    fstype = filesystem_type(os.path.realpath(source), read_mountinfo())
    return why_not(isinstance(layout, BtrfsLayout), fstype, subvolume, source)


@contextlib.contextmanager
def _send_directory(source: str, repository_id: str) -> Iterator[int]:
    """A descriptor on ``<source>/.backup-agent-send/<id>``, made root's alone; nothing on the way is followed."""
    fd = os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for part in (SEND_DIRECTORY, repository_id):
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o700, dir_fd=fd)
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = child
            info = os.fstat(fd)
            if info.st_uid != os.geteuid() or info.st_mode & 0o077:
                raise RepositoryError(
                    f"{os.path.join(source, SEND_DIRECTORY)} is not this user's alone (owner {info.st_uid}, mode "
                    f"{stat.S_IMODE(info.st_mode):o}): remove it, and the next run makes it again",
                    step="transfer",
                )
        yield fd
    finally:
        os.close(fd)


# Only read once receive succeeded (_pipe): a receive that failed raises its own error first.
_SEND_EXIT: ExitTable = {0: ("ok", "success"), -signal.SIGPIPE: ("ok", "stopped by receive at the stream's end command")}


def _pipe(
    runner: Runner,
    send: Callable[[int], tuple[str, ...]],
    receive: Callable[[int], tuple[str, ...]],
    step: str,
    send_fds: tuple[int, ...],
    receive_fds: tuple[int, ...],
    on_receive_line: Callable[[str], None] | None = None,
) -> None:
    """Run send into a pipe read by receive, each through the runner; the first failure is raised.

    Each end reaches its process as /proc/self/fd/N. send runs in a thread;
    when it ends the write end is closed (receive sees the end), when
    receive ends the read end is closed (a send still writing stops).

    receive stops at the stream's end command, and send may still write
    after it (its last bytes): send killed by SIGPIPE then is no failure.
    receive's success proves the stream whole: it cannot have seen the end
    of the pipe while send held it open, so it read the end command.
    """
    read_end, write_end = os.pipe()
    failures: list[BaseException] = []
    closed = {"read": False, "write": False}

    def close(which: str) -> None:
        if not closed[which]:
            closed[which] = True
            os.close(read_end if which == "read" else write_end)

    def sending() -> None:
        try:
            runner.run(send(write_end), step=step, pass_fds=(write_end, *send_fds), exit_table=_SEND_EXIT)
        except BaseException as exc:  # handed to the main thread, which raises it
            failures.append(exc)
        finally:
            close("write")

    thread = threading.Thread(target=sending, name="btrfs-send", daemon=True)
    thread.start()
    try:
        runner.run(receive(read_end), step=step, pass_fds=(read_end, *receive_fds), on_stdout=on_receive_line)
    finally:
        close("read")
        thread.join()
    if failures:
        raise failures[0]


def send(
    repo: Repository,
    layout: BtrfsLayout,
    source: str,
    name: str,
    *,
    runner: Runner,
    btrfs: str,
    warn: Callable[[str], None],
) -> Sent:
    """Snapshot ``source``, send it (incrementally when a parent exists on both sides), receive it as ``<name>.in-progress``.

    The unfinished transfers of the repository are deleted first (a
    partial receive cannot be resumed), and so are the source side's
    snapshots other than the parent. On failure the partial copy on both
    sides is deleted and the error raised (the caller falls back to rsync).
    """
    entry = name + IN_PROGRESS
    leftovers = [n + IN_PROGRESS for n in repo.in_progress_names()]
    if leftovers:
        layout.delete(leftovers, step="transfer")
    with _send_directory(source, repo.marker.id) as side, repo.directory(SNAPSHOTS) as snapshots:
        if snapshots is None:
            raise RepositoryError(f"{repo.snapshots_dir} is gone", step="transfer")
        here = f"/proc/self/fd/{side}"
        existing = sorted(e for e in os.listdir(side) if os.lstat(e, dir_fd=side).st_ino == SUBVOLUME_INODE)
        parent = choose_parent(repo.snapshot_names(), repo.read_metadata, set(existing))
        parent_sent = ((repo.read_metadata(parent) or {}).get("sent") or {}).get("snapshot") if parent else None
        stale = [e for e in existing if e != parent_sent]
        if stale:
            runner.run(subvolume_delete_argv(btrfs, [f"{here}/{e}" for e in stale]), step="transfer", pass_fds=(side,))
        runner.run(subvolume_snapshot_argv(btrfs, source, f"{here}/{entry}", readonly=True), step="transfer", pass_fds=(side,))
        if parent_sent is None:
            warn(
                f"method = \"send\": no earlier snapshot of {source} is on both sides, so the whole subvolume is sent "
                "this time; the next runs send only what changed"
            )
        try:
            _pipe(
                runner,
                lambda out: send_argv(
                    btrfs, f"{here}/{entry}", f"{here}/{parent_sent}" if parent_sent else None, f"/proc/self/fd/{out}"
                ),
                lambda stream: receive_argv(btrfs, f"/proc/self/fd/{snapshots}", f"/proc/self/fd/{stream}"),
                "transfer",
                (side,),
                (snapshots,),
            )
        except (OSError, BackupAgentError):
            # Neither half is of use: the received part is incomplete, and a
            # source snapshot without its copy cannot be a parent.
            with contextlib.suppress(OSError, BackupAgentError):
                runner.run(subvolume_delete_argv(btrfs, [f"{here}/{entry}"]), step="transfer", pass_fds=(side,))
            with contextlib.suppress(OSError, BackupAgentError):
                layout.delete([entry], step="transfer")
            raise
        dump = _dump(runner, btrfs, here, entry, parent_sent, side) if parent_sent else None
    written = written_from_dump(dump, entry) if dump is not None else None
    changes = changes_from_dump(dump, entry) if dump is not None else None
    log.info("received %s from %s%s", entry, source, f" (parent {parent})" if parent else " (whole)")
    return Sent(name, parent, {"snapshot": entry, "parent": parent, "whole": parent is None}, written, changes)


def _dump(runner: Runner, btrfs: str, here: str, entry: str, parent: str, side: int) -> list[str] | None:
    """What the incremental stream changed: its metadata alone (send --no-data) read by receive --dump.

    Cheap (no file data), and it spares the manifest a walk of the snapshot
    (agent.repository.manifest_stream), or at least a stat of every file
    (agent.repository.manifest._Writer._reuse). A failure only costs that.
    """
    lines: list[str] = []
    try:
        _pipe(
            runner,
            lambda out: (btrfs, "send", "--no-data", "-p", f"{here}/{parent}", "-f", f"/proc/self/fd/{out}", f"{here}/{entry}"),
            lambda stream: dump_argv(btrfs, f"/proc/self/fd/{stream}"),
            "transfer",
            (side,),
            (),
            lines.append,
        )
    except Interrupted:
        raise
    except BackupAgentError as exc:
        log.warning("what the stream changed could not be listed (%s): the manifest compares every file", exc)
        return None
    return lines
