"""flatpak (the system installation): the installed applications and runtimes, with their remotes."""

from __future__ import annotations

from agent.engine.sysstate.managers import Manager, Output, Texts, table

INSTALLED = "installed.tsv"
APPS = "apps.tsv"
_COLUMNS = "--columns=application,version,branch,origin"


def installed(texts: Texts) -> dict[str, str]:
    """application id → version (or branch when there is none)."""
    return {f[0]: f[1] or f[2] for f in table(texts.get(INSTALLED, ""), 4, separator="\t")}


def manual(texts: Texts) -> tuple[str, ...]:
    """The applications; runtimes come with them."""
    return tuple(sorted({f[0] for f in table(texts.get(APPS, ""), 4, separator="\t")}))


def reinstall(texts: Texts) -> tuple[str, ...]:
    return tuple(
        f"flatpak install --system --noninteractive {f[3]} {f[0]}//{f[2]}"
        for f in sorted(table(texts.get(APPS, ""), 4, separator="\t"))
    )


MANAGER = Manager(
    name="flatpak",
    program="/usr/bin/flatpak",
    # flatpak touches .changed on every change of the installation.
    database=("/var/lib/flatpak/.changed", "/var/lib/flatpak/app", "/var/lib/flatpak/runtime"),
    outputs=(
        Output(INSTALLED, ("/usr/bin/flatpak", "list", "--system", _COLUMNS)),
        Output(APPS, ("/usr/bin/flatpak", "list", "--system", "--app", _COLUMNS)),
    ),
    installed=installed,
    manual=manual,
    reinstall=reinstall,
    # No archive: the installation is the applications themselves, downloaded again from their remotes.
)
