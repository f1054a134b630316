"""Writing a file so that readers see the old one or the new one, never half of one.

The repository's marker and metadata, a disk's recorded id, the agent's
state file and the files ``install`` puts in /etc all go through
:func:`write_atomic`: a temporary file beside the target (made with
O_EXCL, so no one else's file is ever followed or reused), its mode and
owner set before it is visible, optionally checked, then renamed over the
target.
"""

from __future__ import annotations

import contextlib
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
