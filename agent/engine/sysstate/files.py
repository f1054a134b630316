"""Files under a snapshot's ``.backup-agent/``: opened by descriptor, never through a link.

The previous snapshot lives on a removable disk that anyone could have
written (docs/ARCHITECTURE.md, rule 9), so every directory on the way to a
file that is read or linked from it is opened with ``O_NOFOLLOW``, what is
read is bounded, and only regular files are used. The snapshot being made is
ours, written the same way, so nothing there is reached through a link
either.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from typing import Iterator

#: The snapshot's reserved top-level directory, written after the transfer (docs/ARCHITECTURE.md, "System state").
STATE_DIR = ".backup-agent"
COMMANDS = "commands"  # .backup-agent/commands/<file>: the command sources' output
PACKAGES = "packages"  # .backup-agent/packages/<manager>/: lists, database archive, stamp.json
# A file name written or linked there: nothing to quote, no directory, no dot file.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}", re.ASCII)

DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# Not there, not a directory, a link: each is "no usable earlier copy".
_ABSENT = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)
CHUNK = 1024 * 1024


def open_directory(root: str, *parts: str, create: int | None = None) -> int | None:
    """A descriptor of ``root/parts...``, each component opened without following a link.

    ``create``: the mode to make missing components with (the snapshot being
    made); without it a missing or linked component gives None.
    """
    try:
        fd = os.open(root, DIRECTORY_FLAGS)
    except OSError as exc:
        if exc.errno in _ABSENT and create is None:
            return None
        raise
    for part in parts:
        try:
            made = False
            if create is not None:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, create, dir_fd=fd)
                    made = True
            inner = os.open(part, DIRECTORY_FLAGS, dir_fd=fd)
            if made and create is not None:
                os.fchmod(inner, create)  # whatever the umask: the modes are part of what the README promises
        except OSError as exc:
            os.close(fd)
            if exc.errno in _ABSENT and create is None:
                return None
            raise
        os.close(fd)
        fd = inner
    return fd


@contextlib.contextmanager
def directory(root: str, *parts: str, create: int | None = None) -> Iterator[int | None]:
    """:func:`open_directory` as a context: the descriptor is closed at the end."""
    fd = open_directory(root, *parts, create=create)
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def open_regular(directory_fd: int, name: str) -> int | None:
    """A read descriptor of a regular file in ``directory_fd``, or None (absent, a link, anything else)."""
    try:
        fd = os.open(name, READ_FLAGS, dir_fd=directory_fd)
    except OSError as exc:
        if exc.errno in _ABSENT:
            return None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    os.set_blocking(fd, True)
    return fd


def read_small(directory_fd: int, name: str, limit: int) -> bytes | None:
    """The bytes of a regular file of at most ``limit`` bytes, or None when there is none that small."""
    fd = open_regular(directory_fd, name)
    if fd is None:
        return None
    try:
        if os.fstat(fd).st_size > limit:
            return None
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(limit + 1)
        return data if len(data) <= limit else None
    finally:
        os.close(fd)


def create(directory_fd: int, name: str, mode: int) -> int:
    """A new file for writing with exactly ``mode``, whatever the umask (it must not exist: the snapshot
    being made starts without it)."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=directory_fd)
    os.fchmod(fd, mode)
    return fd


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write every byte (os.write may write fewer)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def link_from(source_fd: int, name: str, target_fd: int, new_name: str | None = None) -> bool:
    """Hard-link a regular file of the previous snapshot into this one; False when it is not one.

    In the btrfs layout each snapshot is a subvolume of its own, and a hard
    link cannot cross subvolumes (EXDEV): there the file is copied with
    copy_file_range, which btrfs carries out by sharing the extents, so the
    copy costs no data either.
    """
    try:
        info = os.stat(name, dir_fd=source_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(info.st_mode):
        return False
    try:
        os.link(name, new_name or name, src_dir_fd=source_fd, dst_dir_fd=target_fd, follow_symlinks=False)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _copy_shared(source_fd, name, target_fd, new_name or name, stat.S_IMODE(info.st_mode))
    return True


def _copy_shared(source_fd: int, name: str, target_fd: int, new_name: str, mode: int) -> None:
    """Copy a regular file between directories on different subvolumes, its extents shared where the filesystem can."""
    source = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=source_fd)
    try:
        target = create(target_fd, new_name, mode)
        try:
            while os.copy_file_range(source, target, 1 << 30) > 0:
                pass
        finally:
            os.close(target)
    finally:
        os.close(source)
