"""How each source of a snapshot of several sources names its directory (pure).

A snapshot of one source is that source's tree, as it always was. A snapshot
of several (``[[source]]``) holds one directory per source at its top, named
by the source's ``name`` or, without one, by its path: ``/`` is ``root``,
any other path its components joined by ``-`` (``/boot/efi`` is
``boot-efi``, ``/srv/data`` is ``srv-data``). Names starting with a dot are
refused: ``.backup-agent`` is reserved for what the backup itself adds to a
snapshot (docs/ARCHITECTURE.md, "Sources").
"""

from __future__ import annotations

import re
from typing import Final

#: Reserved at the top of every snapshot for what the backup adds itself (system state), never a source's.
RESERVED_DIRECTORY: Final = ".backup-agent"
#: A source's directory: one plain file name, safe on any filesystem and in any shell.
DIRECTORY_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}", re.ASCII)
DIRECTORY_EXPECTED: Final = (
    'a name of 1 to 128 ASCII letters, digits, "_", ".", "+" and "-" that starts with a letter or digit, such as "data"'
)


def directory_for(path: str) -> str:
    """The directory a source at ``path`` gets without a ``name``: ``root`` for /, else its components joined by -."""
    parts = [part for part in path.split("/") if part]
    return "-".join(parts) if parts else "root"


def directory_problem(name: str) -> str | None:
    """Why ``name`` cannot be a source's directory, or None when it can."""
    if name == RESERVED_DIRECTORY or name.startswith("."):
        return f"{name!r} starts with a dot; {RESERVED_DIRECTORY} is reserved for what the backup adds to each snapshot"
    if DIRECTORY_RE.fullmatch(name) is None:
        return f"{name!r} is not {DIRECTORY_EXPECTED}"
    return None
