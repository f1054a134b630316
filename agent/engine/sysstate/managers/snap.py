"""snap (snapd): the installed snaps with their channels."""

from __future__ import annotations

from agent.engine.sysstate.managers import Manager, Output, Texts, table

INSTALLED = "installed.txt"
# Snaps that snapd installs by itself.
_SYSTEM_NOTES = frozenset({"base", "core", "snapd", "gadget", "kernel"})


def _rows(texts: Texts) -> list[list[str]]:
    """snap list: Name Version Rev Tracking Publisher Notes, after a header line."""
    return [f for f in table(texts.get(INSTALLED, ""), 5) if f[0] != "Name"]


def installed(texts: Texts) -> dict[str, str]:
    return {f[0]: f[1] for f in _rows(texts)}


def _notes(fields: list[str]) -> set[str]:
    return set(fields[5].split(",")) if len(fields) > 5 else set()


def manual(texts: Texts) -> tuple[str, ...]:
    return tuple(sorted(f[0] for f in _rows(texts) if not _notes(f) & _SYSTEM_NOTES))


def reinstall(texts: Texts) -> tuple[str, ...]:
    wanted = set(manual(texts))
    lines = []
    for fields in sorted(_rows(texts)):
        if fields[0] in wanted:
            classic = " --classic" if "classic" in _notes(fields) else ""
            channel = f" --channel={fields[3]}" if fields[3] not in ("-", "") else ""
            lines.append(f"snap install {fields[0]}{channel}{classic}")
    return tuple(lines)


MANAGER = Manager(
    name="snap",
    program="/usr/bin/snap",
    database=("/var/lib/snapd/state.json",),
    outputs=(Output(INSTALLED, ("/usr/bin/snap", "list")),),
    installed=installed,
    manual=manual,
    reinstall=reinstall,
    # No archive: snapd's state holds login secrets, and the snaps are downloaded again.
)
