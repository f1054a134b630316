"""Writing a file so that readers see the old one or the new one, never half of one.

The repository's marker and metadata, a disk's recorded id, the agent's
state file and the files ``install`` puts in /etc all go through
:func:`write_atomic`: a temporary file beside the target (made with
O_EXCL, so no one else's file is ever followed or reused), its mode and
owner set before it is visible, optionally checked, then renamed over the
target.

:func:`rename_noreplace` renames without ever replacing what is at the new
name (``renameat2`` with ``RENAME_NOREPLACE``): a name that appeared since
it was chosen is an error, not a loss.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import tempfile
from typing import Callable, Iterable


def write_atomic(
    path: str,
    data: bytes | Iterable[bytes],
    *,
    mode: int = 0o644,
    owner: tuple[int, int] | None = None,
    durable: bool = True,
    prefix: str = ".",
    suffix: str = ".tmp",
    check: Callable[[str], None] | None = None,
) -> None:
    """Replace ``path`` with ``data`` (bytes, or chunks written as they come) in one rename.

    ``durable`` fsyncs the file and its directory (skip it where an fsync
    would commit a whole journal for nothing, see repository.py);
    ``prefix``/``suffix`` name the temporary file so that readers of the
    directory skip it (sudo ignores names with a dot); ``check`` sees the
    finished temporary file and may raise to keep the old one.
    """
    directory = os.path.dirname(path) or "."
    fd, temporary = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            if isinstance(data, bytes):
                handle.write(data)
            else:
                handle.writelines(data)
            handle.flush()
            if owner is not None:
                os.fchown(handle.fileno(), *owner)
            os.fchmod(handle.fileno(), mode)
            if durable:
                os.fsync(handle.fileno())
        if check is not None:
            check(temporary)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    if durable:
        fsync_directory(directory)


def fsync_directory(path: str) -> None:
    """Make a rename in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def rename_noreplace(source: str, target: str) -> None:
    """Rename ``source`` to ``target`` unless ``target`` exists (FileExistsError), in one step.

    A check before ``os.rename`` would leave a moment in which a new
    ``target`` is silently replaced; the kernel's flag leaves none. A
    filesystem without the flag is an OSError saying so, never a fallback
    to a rename that replaces.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "this C library cannot rename without replacing (no renameat2)", source)
    renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE) == 0:
        return
    code = ctypes.get_errno()
    if code == errno.EINVAL:
        raise OSError(code, "this filesystem cannot rename without replacing", source, None, target)
    raise OSError(code, os.strerror(code), source, None, target)


def syncfs(fd: int) -> None:
    """Write everything cached for the filesystem holding ``fd`` to the disk (syncfs(2)).

    One call for a whole snapshot: an fsync of each of its files would cost
    a journal commit each (README, "The repository" argues the order).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syncfs.argtypes = (ctypes.c_int,)
    libc.syncfs.restype = ctypes.c_int
    if libc.syncfs(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"cannot write the backup disk's cache to the disk: {os.strerror(code)}")
