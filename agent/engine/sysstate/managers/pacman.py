"""pacman (Arch): the installed and explicitly installed packages and the local database."""

from __future__ import annotations

from agent.engine.sysstate.managers import Manager, Output, Texts, table, wrapped

INSTALLED = "installed.txt"
EXPLICIT = "explicit.txt"


def installed(texts: Texts) -> dict[str, str]:
    """name → version (pacman -Q)."""
    return {fields[0]: fields[1] for fields in table(texts.get(INSTALLED, ""), 2)}


def manual(texts: Texts) -> tuple[str, ...]:
    """The explicitly installed packages (pacman -Qqe)."""
    return tuple(sorted({line.strip() for line in texts.get(EXPLICIT, "").splitlines() if line.strip()}))


def reinstall(texts: Texts) -> tuple[str, ...]:
    """--needed skips what is there; packages from outside the repositories (the AUR) are named by pacman as missing."""
    return wrapped("pacman -S --needed", list(manual(texts)))


MANAGER = Manager(
    name="pacman",
    program="/usr/bin/pacman",
    # Every install and removal adds or removes a directory in local/.
    database=("/var/lib/pacman/local",),
    outputs=(
        Output(INSTALLED, ("/usr/bin/pacman", "-Q")),
        Output(EXPLICIT, ("/usr/bin/pacman", "-Qqe")),
    ),
    installed=installed,
    manual=manual,
    reinstall=reinstall,
    archive="/var/lib/pacman",
    # The sync databases are downloaded again by pacman -Sy.
    archive_skip=("sync", "db.lck"),
)
