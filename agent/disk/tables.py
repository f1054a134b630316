"""crypttab(5) and fstab(5) read as the system's tools read them (pure).

The unlock step takes the disk's crypttab line (device, key file) and the
mount step its fstab line from here; both files are named in the config
(``[system]``), so the lines checked are the lines used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

from agent.core.mounts import unescape
from agent.disk.devices import last_at


@dataclass(frozen=True)
class CrypttabEntry:
    """One line of crypttab(5): ``name device [key_file [options]]``."""

    name: str
    device: str  # "UUID=…", "PARTUUID=…", "LABEL=…" or a path
    key_file: str | None  # None: no key file ("none", "-" or absent): a passphrase is asked
    options: tuple[str, ...]


@dataclass(frozen=True)
class FstabEntry:
    """One line of fstab(5), escapes decoded."""

    device: str
    mount_point: str
    fstype: str
    options: tuple[str, ...]


def _table_lines(text: str) -> Iterator[list[str]]:
    """The raw fields of each line of crypttab or fstab that has at least two (pure).

    Comments (``#`` at the start of a line) and blank lines are skipped;
    fields are separated by blanks, so blanks inside one are written as
    octal escapes, decoded by the caller with :func:`agent.core.mounts.unescape`.
    """
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = stripped.split()
        if len(fields) >= 2:
            yield fields


def _options(field: str) -> tuple[str, ...]:
    """An options field: split at commas first, then each option decoded, so an escaped comma stays in its value."""
    return tuple(unescape(option) for option in field.split(",") if option)


def parse_crypttab(text: str) -> dict[str, CrypttabEntry]:
    """The entries of a crypttab by name (pure); the first line for a name wins, as in cryptdisks_start.

    Every field is decoded as fstab's are (:func:`_table_lines`); lines with
    fewer than two fields are skipped.
    """
    entries: dict[str, CrypttabEntry] = {}
    for fields in _table_lines(text):
        name, device = unescape(fields[0]), unescape(fields[1])
        key_file: str | None = unescape(fields[2]) if len(fields) > 2 else None
        if key_file in ("none", "-", ""):
            key_file = None
        options = _options(fields[3]) if len(fields) > 3 else ()
        entries.setdefault(name, CrypttabEntry(name, device, key_file, options))
    return entries


def parse_fstab(text: str) -> list[FstabEntry]:
    """The entries of an fstab in order (pure); every field decoded as crypttab's are (:func:`_table_lines`).

    A missing type is "auto" and missing options "defaults", as mount(8) reads them.
    """
    return [
        FstabEntry(
            device=unescape(fields[0]),
            mount_point=unescape(fields[1]),
            fstype=unescape(fields[2]) if len(fields) > 2 else "auto",
            options=_options(fields[3]) if len(fields) > 3 else ("defaults",),
        )
        for fields in _table_lines(text)
    ]


def fstab_entry_for(entries: Iterable[FstabEntry], mount_point: str) -> FstabEntry | None:
    """The fstab line for ``mount_point``; the last one wins, as for mount."""
    return last_at(entries, mount_point)
