"""crypttab(5) and fstab(5) read as the system's tools read them (pure).

The unlock step takes the disk's crypttab line (device, key file) and the
mount step its fstab line from here; both files are named in the config
(``[system]``), so the lines checked are the lines used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Iterable

from .devices import last_at

_OCTAL_RE: Final = re.compile(r"\\([0-7]{3})")


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


def _unescape(field: str) -> str:
    """Undo octal escapes (``\\040`` space, ``\\011`` tab, ``\\134`` backslash)."""
    return _OCTAL_RE.sub(lambda match: chr(int(match.group(1), 8)), field)


def _options(field: str) -> tuple[str, ...]:
    return tuple(option for option in field.split(",") if option)


def parse_crypttab(text: str) -> dict[str, CrypttabEntry]:
    """The entries of a crypttab by name (pure); the first line for a name wins, as in cryptdisks_start.

    Comments (``#`` at the start of a line) and blank lines are skipped, and
    so are lines with fewer than two fields.
    """
    entries: dict[str, CrypttabEntry] = {}
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = stripped.split()
        if len(fields) < 2:
            continue
        name, device = _unescape(fields[0]), _unescape(fields[1])
        key_file: str | None = _unescape(fields[2]) if len(fields) > 2 else None
        if key_file in ("none", "-", ""):
            key_file = None
        options = _options(fields[3]) if len(fields) > 3 else ()
        entries.setdefault(name, CrypttabEntry(name, device, key_file, options))
    return entries


def parse_fstab(text: str) -> list[FstabEntry]:
    """The entries of an fstab in order (pure); fields are separated by blanks, spaces inside written ``\\040``.

    A missing type is "auto" and missing options "defaults", as mount(8) reads them.
    """
    entries: list[FstabEntry] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = stripped.split()
        if len(fields) < 2:
            continue
        entries.append(
            FstabEntry(
                device=_unescape(fields[0]),
                mount_point=_unescape(fields[1]),
                fstype=_unescape(fields[2]) if len(fields) > 2 else "auto",
                options=_options(_unescape(fields[3])) if len(fields) > 3 else ("defaults",),
            )
        )
    return entries


def fstab_entry_for(entries: Iterable[FstabEntry], mount_point: str) -> FstabEntry | None:
    """The fstab line for ``mount_point``; the last one wins, as for mount."""
    return last_at(entries, mount_point)
